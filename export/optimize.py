"""A faster CPU variant of the exported graph, shipped only where it keeps accuracy.

Candidates (each built from the verified fp32 ``pipeline.onnx``):

  - ``ort-offline``: ONNX Runtime's graph optimisations (constant folding, Conv+BN/activation fusion, ...)
    applied once and saved (level ORT_ENABLE_EXTENDED: portable; ORT_ENABLE_ALL adds NCHWc layouts tied to the
    exporting CPU, so it is not offered). Same maths as fp32; saves the optimisation work at session start.
  - ``int8``: static int8 quantisation (QDQ, per-channel symmetric int8 weights, uint8 activations) of the
    Conv / MatMul / Gemm nodes, calibrated (min-max) on class-balanced *training* images pushed through the
    graph with fresh RT draws. The random transform, sigmoid/softmax and everything elementwise stay fp32.

bf16 / fp16 are not candidates: ONNX Runtime's CPU provider has no bf16 convolution kernels and its fp16 CPU
kernels are slower than fp32.

Each candidate is measured against fp32 *under the same session options the service uses* (all cores, full
online optimisation) for speed (median batch latency at batch 64, K = 1, interleaved repetitions) and for clean
accuracy on the verification images with the verification draws. A candidate is shipped (as
``pipeline.opt.onnx``) only if its clean accuracy is within 0.5 point of fp32 (without labels: >= 99.5 %
top-1 agreement with fp32, which bounds the accuracy change by 0.5 point) and it is at least 1.1x faster; of
those, the fastest. Every measurement goes into the card either way.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from atop_serve.config import RTConfig

from .verify import TOLERANCES, VerificationSet, compare_logits, draws, session_logits

CANDIDATES = ("ort-offline", "int8")


def build_ort_offline(src: Path, dst: Path) -> Path:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return dst


def _calibration_batches(input_names, images: np.ndarray, rt: RTConfig, batch: int = 32, seed: int = 1) -> list[dict]:
    """Calibration feeds: training images with fresh RT draws, in the graph's input names."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        d = draws(rt, len(x), 1, seed + i)
        out.append({"images": x, **{k: d[k] for k in input_names if k != "images"}})
    return out


def build_int8(src: Path, dst: Path, calib_images: np.ndarray, rt: RTConfig) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_export import make_session

    names = [i.name for i in make_session(src, optimize=False).get_inputs()]
    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001  (pre-processing only helps; quantise the plain graph if it fails)
        pre = src
    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = _calibration_batches(names, calib_images, rt)
            self._it = iter(self.batches)

        def get_next(self):
            return next(self._it, None)

    reader = Reader()
    quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    if pre != src:
        pre.unlink(missing_ok=True)
    return dst


def benchmark(paths: dict[str, Path], rt: RTConfig, batch: int = 64, reps: int = 7, seed: int = 0) -> dict[str, float]:
    """Median latency (ms) of one batch per graph, repetitions interleaved so load on the machine hits all alike."""
    from .onnx_export import feed_for, make_session

    rng = np.random.default_rng(seed)
    images = rng.random((batch, 3, rt.image_size, rt.image_size), dtype=np.float32)
    d = draws(rt, batch, 1, seed)
    sessions = {k: make_session(p) for k, p in paths.items()}
    feeds = {k: feed_for([i.name for i in s.get_inputs()], images, d) for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():  # warm-up
        s.run(["logits"], feeds[k])
    for _ in range(reps):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(["logits"], feeds[k])
            times[k].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def select_variant(fp32_path: Path, workdir: Path, vset: VerificationSet, fp32_logits: np.ndarray, rt: RTConfig,
                   calib_images: np.ndarray | None, calib_source: str, seed: int = 0, candidates=CANDIDATES,
                   reps: int = 7, log=print) -> tuple[Path | None, dict]:
    """Build, measure and judge every candidate. Returns (path of the shipped variant or None, card record)."""
    from .onnx_export import make_session

    tol = TOLERANCES["cpu-variant"]
    built: dict[str, Path] = {}
    record: dict = {"baseline": "pipeline.onnx (fp32)", "candidates": {}, "shipped": None,
                    "rule": f"ship the fastest candidate with clean accuracy within {100 * tol['max_accuracy_drop']:g} point "
                            f"of fp32 (no labels: top-1 agreement with fp32 >= {100 * tol['min_top1_agreement_without_labels']:g} %) "
                            f"and speedup >= {tol['min_speedup']:g}x"}
    for name in candidates:
        dst = workdir / f"candidate-{name}.onnx"
        t0 = time.perf_counter()
        try:
            if name == "ort-offline":
                build_ort_offline(fp32_path, dst)
            elif name == "int8":
                if calib_images is None:
                    record["candidates"][name] = {"built": False, "reason": "no calibration images"}
                    continue
                build_int8(fp32_path, dst, calib_images, rt)
            else:
                raise ValueError(f"unknown candidate {name!r}")
        except Exception as e:  # noqa: BLE001  (a candidate that cannot be built is recorded, not fatal)
            record["candidates"][name] = {"built": False, "reason": f"{type(e).__name__}: {e}"[:300]}
            continue
        built[name] = dst
        record["candidates"][name] = {"built": True, "build_seconds": round(time.perf_counter() - t0, 2),
                                      "bytes": dst.stat().st_size}
        if name == "int8":
            record["candidates"][name]["calibration"] = {"images": int(len(calib_images)), "source": calib_source,
                                                         "method": "min-max, QDQ, per-channel int8 weights, uint8 activations"}
    if not built:
        return None, record
    latency = benchmark({"fp32": fp32_path, **built}, rt, reps=reps, seed=seed)
    record["speed"] = {"batch": 64, "k": 1, "statistic": f"median of {reps} interleaved runs after a warm-up", "fp32_ms": round(latency["fp32"], 2),
                       "fp32_images_per_s": round(64000 / latency["fp32"], 1)}
    d = draws(rt, len(vset), 1, seed)
    best = None
    for name, path in built.items():
        out = session_logits(make_session(path), vset.images, d)
        res = compare_logits(fp32_logits, out, vset.labels)
        speedup = latency["fp32"] / latency[name]
        rec = record["candidates"][name]
        rec.update({"ms_per_batch": round(latency[name], 2), "images_per_s": round(64000 / latency[name], 1),
                    "speedup": round(speedup, 3), "top1_agreement_with_fp32": res["top1_agreement"],
                    "max_abs_diff_vs_fp32": res["max_abs_diff"], "n": res["n"]})
        if vset.labels is not None:
            rec["accuracy_fp32"], rec["accuracy"] = res["accuracy_reference"], res["accuracy"]
            rec["accuracy_drop_points"] = round(100 * (res["accuracy_reference"] - res["accuracy"]), 2)
            accurate = res["accuracy_reference"] - res["accuracy"] <= tol["max_accuracy_drop"]
        else:
            accurate = res["top1_agreement"] >= tol["min_top1_agreement_without_labels"]
        fast = speedup >= tol["min_speedup"]
        rec["accepted"] = bool(accurate and fast)
        rec["reason"] = ("within tolerance and faster" if rec["accepted"] else
                         "; ".join(r for r, bad in (("accuracy outside tolerance", not accurate),
                                                    (f"speedup {speedup:.2f}x below {tol['min_speedup']:g}x", not fast)) if bad))
        log(f"  variant {name}: {latency[name]:.1f} ms/batch vs fp32 {latency['fp32']:.1f} ({speedup:.2f}x), "
            f"top-1 agreement {100 * res['top1_agreement']:.2f} %"
            + (f", accuracy {100 * res['accuracy']:.2f} % vs {100 * res['accuracy_reference']:.2f} %" if vset.labels is not None else "")
            + f" -> {'accepted' if rec['accepted'] else 'rejected: ' + rec['reason']}")
        if rec["accepted"] and (best is None or latency[name] < latency[best]):
            best = name
    record["shipped"] = best
    return (built[best] if best else None), record
