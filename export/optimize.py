"""A faster CPU variant of the exported graph, shipped only where it keeps accuracy.

Candidates (each built from the verified fp32 ``pipeline.onnx``):

  - ``ort-offline``: ONNX Runtime's graph optimisations (constant folding, Conv+BN/activation fusion, ...)
    applied once and saved (level ORT_ENABLE_EXTENDED: portable; ORT_ENABLE_ALL adds NCHWc layouts tied to the
    exporting CPU, so it is not offered). Same maths as fp32; saves the optimisation work at session start.
  - ``int8``: static int8 quantisation (QDQ, per-channel symmetric int8 weights, uint8 activations) of the
    Conv / MatMul / Gemm nodes, calibrated (min-max) on class-balanced *training* images pushed through the
    graph with fresh RT draws. The random transform, sigmoid/softmax and everything elementwise stay fp32.
  - ``int8-full``: the same, plus the purifier's gating and glue (LeakyReLU, sigmoid, the gate product, skip
    additions, slices, upsampling) on uint8, so the purifier stays quantised between its convolutions. It pays
    off for ``gated-unet-lrelu`` (a quantised LeakyReLU is a table lookup); ELU has no quantised kernel.
  - ``int8-full-in``: ``int8-full`` plus the purifier's input convolution (the output one and the classifier's ends
    stay fp32). For ``gated-unet-s2d`` it is not tiny: it runs at 16x16 on the 16 folded channels and was, with the
    layout conversions around it, about a sixth of its time in float (docs/export.md). Its input is the
    noisy transformed image, whose noise (sigma 0.1) dwarfs uint8 steps. (Quantising the output convolution too
    was tried: 20 % faster again, but 0.7 points of robust accuracy lost on 1,000 images, over the tolerance.)
  - ``int8-full-gate``: ``int8-full-in`` plus the last gated layer's glue (its sigmoid, LeakyReLU and gate product)
    on uint8; only the output convolution and the sigmoid after it stay fp32 in the purifier. Without it that layer,
    the widest at 32x32, dequantises its whole pre-gate output (2 x 32 channels) to float and gates there.

Every int8 candidate has 7-bit weights (per-channel symmetric, range [-64, 64]: ``reduce_range``). ONNX Runtime's
int8 kernels on x86 CPUs without VNNI add pairs of uint8 x int8 products in 16 bits and saturate with full 8-bit
weights (atop_serve/cpu.py); with 7 bits no pair can, so the graph's integer sums are exact, and the same, on every
CPU, and the accuracy gates below, measured on the exporting CPU, hold wherever it is served. (8-bit weights,
exported on a CPU with VNNI, lost 3.5 points of clean accuracy on one without: docs/export.md.)

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atop_serve.config import RTConfig

from .verify import TOLERANCES, VerificationSet, draws, session_logits

CANDIDATES = ("ort-offline", "int8", "int8-full", "int8-full-in", "int8-full-gate")
WEIGHT_BITS = 7  # int8 weights in [-64, 64]: exact on CPUs without VNNI too (see the module docstring)


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


def int8_weight_bits(path: Path) -> int | None:
    """7 if every int8 weight of the graph lies in [-64, 64] (no U8S8 saturation on any CPU), else 8; None without
    int8 weights."""
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path), load_external_data=False).graph.initializer
               if t.data_type == onnx.TensorProto.INT8]
    if not weights:
        return None
    return 7 if max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64 else 8


def edge_layers(path: Path, max_channels: int = 16) -> list[str]:
    """Conv/MatMul/Gemm nodes at the image and class ends of the graph: weights with <= ``max_channels`` input or
    output channels (the purifier's first and last convolutions, the classifier's whitening conv and head).
    They hold a tiny share of the FLOPs, int8 rounds pixel- and logit-level values hardest there, and their
    quantise/dequantise overhead outweighs the int8 gain: they stay fp32."""
    return [name for name, w in weight_shapes(path).items() if len(w) >= 2 and min(w[0], w[1]) <= max_channels]


def weight_shapes(path: Path) -> dict[str, list[int]]:
    """Conv/MatMul/Gemm node name -> the shape of its weight (for a Conv: out, in, kH, kW)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:  # weights stored in half precision reach the layer through a Cast
        if node.op_type == "Cast" and node.input and node.input[0] in dims:
            dims[node.output[0]] = dims[node.input[0]]
    return {node.name: dims[node.input[1]] for node in model.graph.node
            if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in dims}


# The purifier's gating and glue, quantised too in the ``int8-full`` candidate: ONNX Runtime then runs them on
# uint8 (QLinearLeakyRelu / QLinearSigmoid as 256-entry tables, QLinearMul / QLinearAdd, Slice and Resize in
# place) instead of dequantising every gated convolution's output to float and back.
PURIFIER_GLUE = ("LeakyRelu", "Sigmoid", "Mul", "Add", "Resize", "Slice")


@dataclass(frozen=True)
class Int8Recipe:
    glue: tuple[str, ...] = ()  # purifier op types quantised besides the matmul-like nodes
    purifier_input: bool = False  # quantise the purifier's input convolution too
    edge_glue_depth: int = 4  # glue feeding an fp32 edge layer within this many nodes stays fp32 (glue_nodes' depth)


INT8_RECIPES = {"int8": Int8Recipe(), "int8-full": Int8Recipe(PURIFIER_GLUE),
                "int8-full-in": Int8Recipe(PURIFIER_GLUE, purifier_input=True),
                "int8-full-gate": Int8Recipe(PURIFIER_GLUE, purifier_input=True, edge_glue_depth=0)}


def kept_fp32(path: Path, recipe: Int8Recipe, max_channels: int = 16) -> list[str]:
    """The matmul-like nodes a recipe leaves in fp32: the edge layers, less the purifier's input convolution (its
    edge layer with few input channels) where the recipe quantises it."""
    kept = edge_layers(path, max_channels)
    if not recipe.purifier_input:
        return kept
    weight, purifier = weight_shapes(path), set(nodes_of(path, ("Conv",), scope="pipeline.purifier"))
    return [n for n in kept if not (n in purifier and weight[n][1] <= max_channels)]


def nodes_of(path: Path, op_types, scope: str | None = None) -> list[str]:
    """Nodes of the given op types, optionally only inside a module scope (the exporter's ``namespace``
    metadata), e.g. the purifier's ``pipeline.purifier``."""
    import onnx

    out = []
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        ns = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        if node.op_type in op_types and (scope is None or f"/{scope}:" in ns):
            out.append(node.name)
    return out


def glue_nodes(path: Path, glue, excluded, scope: str = "pipeline.purifier", depth: int = 4) -> list[str]:
    """The ``glue`` nodes of ``scope`` that sit between quantised layers: a node reading an fp32 edge layer's output,
    or feeding one through up to ``depth`` non-matmul nodes (for the gated U-Net: the input scaling and the first
    gated layer's slices around its fp32 first convolution, the last gated layer and the output sigmoid around its
    fp32 output convolution), stays fp32 like the edge layer: quantising pixel-level values there costs accuracy
    and saves little."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {t: n for n in graph.node for t in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    excluded, matmul = set(excluded), ("Conv", "MatMul", "Gemm")

    def feeds_edge(node) -> bool:
        frontier = [node]
        for _ in range(depth):
            frontier = [c for n in frontier for t in n.output for c in consumers.get(t, [])]
            if any(c.name in excluded for c in frontier):
                return True
            frontier = [c for c in frontier if c.op_type not in matmul]
        return False

    chosen = set(nodes_of(path, glue, scope=scope))
    return [n.name for n in graph.node if n.name in chosen
            and not any(producer[t].name in excluded for t in n.input if t in producer) and not feeds_edge(n)]


def build_int8(src: Path, dst: Path, calib_images: np.ndarray, rt: RTConfig, recipe: Int8Recipe = Int8Recipe()) -> Path:
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
    glue = recipe.glue
    excluded = kept_fp32(src, recipe)
    chosen = None  # None: every node of the op types below
    if glue:  # the matmul-like nodes everywhere (bar the edge layers), the purifier's inner glue besides
        chosen = ([n for n in nodes_of(src, ("Conv", "MatMul", "Gemm")) if n not in excluded]
                  + glue_nodes(src, glue, excluded, depth=recipe.edge_glue_depth))
    # with the glue quantised, ranges from the mean of per-batch min/max: the global extremes of sums and
    # activations waste uint8 levels (exploratory, shipped model, K = 4, 1,000 images: global min-max lost 0.6 clean
    # points against fp32, the per-batch mean 0.0)
    quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm", *glue], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,  # WEIGHT_BITS
                    nodes_to_exclude=excluded, nodes_to_quantize=chosen,
                    extra_options={"CalibMovingAverage": bool(glue)})
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


def _accuracy_gate(ref: np.ndarray, session, vset: VerificationSet, d: dict) -> dict:
    """Paired comparison of a candidate with fp32's predictions ``ref`` on the same images and draws
    (accuracy, drop, images lost/gained, top-1 agreement)."""
    pred = session_logits(session, vset.images, d).argmax(1)
    rec = {"n": int(len(pred)), "top1_agreement_with_fp32": float((pred == ref).mean())}
    if vset.labels is not None:
        ok_ref, ok = ref == vset.labels, pred == vset.labels
        rec.update({"accuracy_fp32": float(ok_ref.mean()), "accuracy": float(ok.mean()),
                    "drop_points": round(100 * float(ok_ref.mean() - ok.mean()), 2),
                    "lost": int((ok_ref & ~ok).sum()), "gained": int((~ok_ref & ok).sum())})
    return rec


def select_variant(fp32_path: Path, workdir: Path, vset: VerificationSet, rt: RTConfig,
                   calib_images: np.ndarray | None, calib_source: str, seed: int = 0, candidates=CANDIDATES,
                   reps: int = 7, samples: int = 1, robust: VerificationSet | None = None, log=print) -> tuple[Path | None, dict]:
    """Build, measure and judge every candidate. Returns (path of the shipped variant or None, card record).

    Speed first (K = 1, batch 64); a candidate fast enough is then compared with fp32 at K = ``samples`` (what the
    service runs) on the same draws: clean accuracy on ``vset`` and, given ``robust`` (adversarial images crafted on
    the eager classifier, ``verify.adversarial_set``), robust accuracy. Both must stay within the tolerance."""
    from .onnx_export import make_session

    tol = TOLERANCES["cpu-variant"]
    built: dict[str, Path] = {}
    record: dict = {"baseline": "pipeline.onnx (fp32)", "candidates": {}, "shipped": None,
                    "rule": f"ship the fastest candidate with speedup >= {tol['min_speedup']:g}x whose clean accuracy and "
                            f"robust accuracy (adversarial examples crafted on the classifier) are each within "
                            f"{100 * tol['max_accuracy_drop']:g} point of fp32 at K = {samples}, same images and draws "
                            f"(no labels: top-1 agreement with fp32 >= {100 * tol['min_top1_agreement_without_labels']:g} %)",
                    "k": samples, "robust_set": robust.describe() if robust is not None else None}
    for name in candidates:
        dst = workdir / f"candidate-{name}.onnx"
        t0 = time.perf_counter()
        try:
            if name == "ort-offline":
                build_ort_offline(fp32_path, dst)
            elif name in INT8_RECIPES:
                if calib_images is None:
                    record["candidates"][name] = {"built": False, "reason": "no calibration images"}
                    continue
                build_int8(fp32_path, dst, calib_images, rt, INT8_RECIPES[name])
            else:
                raise ValueError(f"unknown candidate {name!r}")
        except Exception as e:  # noqa: BLE001  (a candidate that cannot be built is recorded, not fatal)
            record["candidates"][name] = {"built": False, "reason": f"{type(e).__name__}: {e}"[:300]}
            continue
        built[name] = dst
        record["candidates"][name] = {"built": True, "build_seconds": round(time.perf_counter() - t0, 2),
                                      "bytes": dst.stat().st_size}
        if name in INT8_RECIPES:
            recipe = INT8_RECIPES[name]
            record["candidates"][name]["quantised_purifier_glue"] = list(recipe.glue)
            record["candidates"][name]["quantised_purifier_input_conv"] = recipe.purifier_input
            record["candidates"][name]["calibration"] = {"images": int(len(calib_images)), "source": calib_source,
                                                         "method": ("min-max (mean of per-batch)" if recipe.glue else "min-max")
                                                         + f", QDQ, per-channel int8 weights ({WEIGHT_BITS}-bit range),"
                                                         " uint8 activations",
                                                         "kept_fp32": kept_fp32(fp32_path, recipe)}
    if not built:
        return None, record
    latency = benchmark({"fp32": fp32_path, **built}, rt, reps=reps, seed=seed)
    record["speed"] = {"batch": 64, "k": 1, "statistic": f"median of {reps} interleaved runs after a warm-up", "fp32_ms": round(latency["fp32"], 2),
                       "fp32_images_per_s": round(64000 / latency["fp32"], 1)}
    fp32 = make_session(fp32_path)
    sets = {"clean": (vset, draws(rt, len(vset), samples, seed))}
    if robust is not None:
        sets["robust"] = (robust, draws(rt, len(robust), samples, seed + 1))
    fp32_pred: dict[str, np.ndarray] = {}
    best = None
    for name, path in built.items():
        speedup = latency["fp32"] / latency[name]
        rec = record["candidates"][name]
        rec.update({"ms_per_batch": round(latency[name], 2), "images_per_s": round(64000 / latency[name], 1),
                    "speedup": round(speedup, 3)})
        fast = speedup >= tol["min_speedup"]
        if not fast:  # not worth shipping whatever its accuracy: not measured
            rec.update({"accepted": False, "reason": f"speedup {speedup:.2f}x below {tol['min_speedup']:g}x (accuracy not measured)"})
            log(f"  variant {name}: {latency[name]:.1f} ms/batch vs fp32 {latency['fp32']:.1f} ({speedup:.2f}x) -> rejected: too slow")
            continue
        session, fails, parts = make_session(path), [], []
        for what, (vs, d) in sets.items():
            if what not in fp32_pred:
                fp32_pred[what] = session_logits(fp32, vs.images, d).argmax(1)
            g = _accuracy_gate(fp32_pred[what], session, vs, d)
            rec[what] = g
            if "accuracy" in g:
                parts.append(f"{what} {100 * g['accuracy']:.1f} vs {100 * g['accuracy_fp32']:.1f} %")
                if g["drop_points"] > 100 * tol["max_accuracy_drop"]:
                    fails.append(f"{what} accuracy {g['drop_points']:.1f} points below fp32")
            else:
                parts.append(f"{what} top-1 agreement {100 * g['top1_agreement_with_fp32']:.1f} %")
                if g["top1_agreement_with_fp32"] < tol["min_top1_agreement_without_labels"]:
                    fails.append(f"{what} top-1 agreement below {100 * tol['min_top1_agreement_without_labels']:g} %")
        rec["accepted"] = not fails
        rec["reason"] = "within tolerance and faster" if not fails else "; ".join(fails)
        log(f"  variant {name}: {latency[name]:.1f} ms/batch vs fp32 {latency['fp32']:.1f} ({speedup:.2f}x), K = {samples}: "
            + ", ".join(parts) + f" -> {'accepted' if rec['accepted'] else 'rejected: ' + rec['reason']}")
        if rec["accepted"] and (best is None or latency[name] < latency[best]):
            best = name
    record["shipped"] = best
    if best in INT8_RECIPES:  # read off the shipped graph: what the service's CPU check relies on
        record["weight_bits"] = int8_weight_bits(built[best])
    return (built[best] if best else None), record
