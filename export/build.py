"""``atop export``: a model folder -> a verified serving folder (+ a BentoML model store entry).

    serving folder  card.json          the source card + an "export" section (files, sha256, graph contract,
                                       verification, variant measurements, versions, command)
                    MODEL_CARD.md      that card rendered for people (atop_serve/modelcard.py)
                    pipeline.onnx      fp32 graph: RT + purifier + classifier (+ TTA) + softmax, dynamic N and K
                    classifier.onnx    the bare classifier f (+ TTA): images -> logits, for the service's attack demo;
                                       its weights are external data read from classifier.safetensors (copied
                                       along when --out is another folder)
                    pipeline.opt.onnx  faster CPU variant, only where it keeps accuracy (see export/optimize.py)
                    pipeline.trt.ep    Torch-TensorRT program (--format tensorrt|all, GPU only)

Everything is written into a temporary folder next to the target and moved into place only after every
verification passed, so a failed or interrupted export leaves nothing behind. With ``--out`` equal to the model
folder the new files are moved in one by one, MODEL_CARD.md and card.json last (each move atomic); the weights
stay.
"""
from __future__ import annotations

import datetime as _dt
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from atop_serve import modelcard, modelio
from atop_serve.config import RTConfig
from atop_serve.errors import AtopError, ExportError, ModelError

FORMATS = {"onnx": ("onnx",), "tensorrt": ("onnx", "tensorrt"), "all": ("onnx", "tensorrt")}
EXPORTED_FILES = (modelio.ONNX_FILE, modelio.CLASSIFIER_ONNX_FILE, modelio.OPT_ONNX_FILE, modelio.TRT_FILE)


def parse_format(fmt: str) -> tuple[str, ...]:
    key = (fmt or "").strip().lower()
    if key not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    return FORMATS[key]


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    import atop_serve

    from . import tensorrt

    v = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
         "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
         "atop_serve": atop_serve.__version__, "exporter": "torch.onnx.export(dynamo=True)"}
    trt = tensorrt.version()
    if trt:
        v["torch_tensorrt"] = trt
    return v


def _check_weights(folder: Path, card: dict) -> dict:
    """sha256 of the weight files; a mismatch with what the card recorded means a corrupt folder."""
    out = {}
    for part, default in (("classifier", modelio.CLASSIFIER_FILE), ("purifier", modelio.PURIFIER_FILE)):
        entry = card.get(part)
        if not isinstance(entry, dict):
            continue
        f = folder / entry.get("file", default)
        if not f.exists():
            raise ModelError(f"weights file {f} is missing")
        digest = modelio.sha256(f)
        if entry.get("sha256") and entry["sha256"] != digest:
            raise ModelError(f"corrupt model folder {folder}: {f.name} has sha256 {digest[:12]}..., "
                             f"the card records {entry['sha256'][:12]}...")
        out[part] = digest
    return out


def source_metrics(card: dict) -> dict:
    """Numeric metrics of the source card, flattened ('classifier.test_acc_tta_none': 0.94, ...)."""
    flat = {}
    for prefix, d in (("", card.get("metrics")), ("classifier.", card.get("classifier", {}).get("metrics")),
                      ("purifier.", (card.get("purifier") or {}).get("metrics"))):
        for k, v in (d or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[prefix + k] = float(v)
    return flat


def _prepare_target(out: Path, in_place: bool) -> list[Path]:
    """Check ``out`` may be (re)written; create missing parents. Returns the parents created (removed on failure)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.exists() and not in_place and any(out.iterdir()) and not (out / modelio.CARD).exists():
        raise ExportError(f"--out {out} is a non-empty folder without {modelio.CARD}; refusing to replace it "
                          "(give a new or empty folder, an earlier serving folder, or the model folder itself)")
    created = []
    p = out.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    for c in reversed(created):
        c.mkdir()
    return created


def _commit(tmp: Path, out: Path, in_place: bool) -> None:
    """Move the finished serving folder into place (see the module docstring)."""
    tmp.chmod(0o755)  # mkdtemp makes it private; a serving folder is read by the service's user
    if in_place:
        for name in EXPORTED_FILES:
            if (tmp / name).exists():
                (tmp / name).replace(out / name)
            elif name != modelio.ONNX_FILE:
                (out / name).unlink(missing_ok=True)  # a variant from an earlier export the new card does not list
        (tmp / modelcard.FILE).replace(out / modelcard.FILE)
        (tmp / modelio.CARD).replace(out / modelio.CARD)
        shutil.rmtree(tmp)
        return
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        try:
            tmp.rename(out)
        except BaseException:
            (old / out.name).rename(out)
            raise
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def parse_variants(variants: str | None) -> tuple[str, ...]:
    """``--variants``: comma-separated candidate names (None or empty: all of them), checked before any work."""
    from .optimize import CANDIDATES

    if not variants:
        return CANDIDATES
    names = tuple(dict.fromkeys(v.strip() for v in variants.split(",") if v.strip()))
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        what = f"unknown candidate(s) {', '.join(unknown)}" if unknown else f"no candidate named in {variants!r}"
        raise ExportError(f"--variants: {what}; valid: {', '.join(CANDIDATES)}")
    return names


def export_model(model=None, out=None, fmt: str = "onnx", name: str = "atop-default", register: bool = True,
                 verify_n: int = 1000, data=None, optimize: bool = True, calib_n: int = 1024, robust_n: int = 1000, seed: int = 0, bench_reps: int = 7,
                 variants: str | None = None, command: str | None = None, log=print) -> dict:
    """Export, verify and register a model folder; returns a summary (serving folder, store tag, numbers).

    ``model``: folder or None/'default'; ``out``: serving folder (default: the model folder, in place).
    Raises ModelError / ExportError / DataError with one-line messages; on any failure nothing is left behind.
    """
    t_start = time.perf_counter()
    targets = parse_format(fmt)
    if "tensorrt" in targets:
        from .tensorrt import unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise ExportError(f"--format {fmt} needs TensorRT, which cannot run here: {reason}. "
                              "Use --format onnx on this machine.")
    if verify_n < 1:
        raise ExportError(f"--verify-n must be >= 1, got {verify_n}")
    if robust_n < 0 or calib_n < 0:
        raise ExportError(f"--robust-n and --calib-n must be >= 0, got {robust_n} and {calib_n}")
    candidates = parse_variants(variants)
    src = modelio.resolve(model)
    card = modelio.read_card(src)
    if "purifier" not in card:
        raise ModelError(f"model folder {src} holds no purifier: `atop export` exports the purified pipeline")
    weights_sha = _check_weights(src, card)
    try:
        pipeline = modelio.load_pipeline(src)
    except (ValueError, KeyError, TypeError) as e:  # a card whose entries do not fit (bad RT config, wrong types)
        raise ModelError(f"corrupt model card in {src}: {type(e).__name__}: {e}") from None
    rt: RTConfig = pipeline.transform
    out = Path(out) if out else src
    in_place = out.resolve() == src.resolve()
    created_parents = _prepare_target(out, in_place)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    tag = None
    try:
        from . import onnx_export, verify

        log(f"exporting {src} -> {out} ({', '.join(targets)})")
        t0 = time.perf_counter()
        # the graphs read their weights from the safetensors files beside them (no second copy in the folder)
        weights = {kind: src / card[kind].get("file", default) for kind, default in
                   (("classifier", modelio.CLASSIFIER_FILE), ("purifier", modelio.PURIFIER_FILE))}
        for w in weights.values():
            shutil.copyfile(w, tmp / w.name)  # readable by the service (not the source's mode)
        onnx_path = onnx_export.export_onnx(pipeline, tmp / modelio.ONNX_FILE)
        pipe_shared = onnx_export.share_weights(onnx_path, [tmp / w.name for w in weights.values()])
        t_onnx = time.perf_counter() - t0
        vset = verify.load_images(verify_n, data, "test", seed)
        log(f"  ONNX graph written in {t_onnx:.1f} s; verifying on {len(vset)} images ({vset.source})")
        ver_onnx, _, _ = verify.verify_onnx(pipeline, onnx_path, vset, seed=seed)
        log(f"  ONNX Runtime CPU vs PyTorch: max |diff| {ver_onnx['max_abs_diff']:.2e}, "
            f"top-1 agreement {100 * ver_onnx['top1_agreement']:.2f} %"
            + (f", clean accuracy {100 * ver_onnx['accuracy']:.2f} %" if "accuracy" in ver_onnx else ""))
        files = {modelio.ONNX_FILE: {"precision": "fp32", "runtime": "onnxruntime (any provider)", "role": "pipeline",
                                     "external_data": pipe_shared}}
        section: dict = {"formats": list(targets), "verification": {"onnx": ver_onnx}}

        # the bare classifier f for the service's attack demo; its graph reads the weights file next to it
        clf_weights = weights["classifier"]
        clf_path, shared = onnx_export.export_classifier(pipeline.classifier, tmp / modelio.CLASSIFIER_ONNX_FILE,
                                                         tmp / clf_weights.name, rt.image_size)
        section["verification"]["classifier"] = verify.verify_classifier(pipeline.classifier, clf_path, vset)
        log(f"  bare classifier graph: {shared['inline_bytes'] / 1e6:.2f} MB inline, "
            f"{shared['external_bytes'] / 1e6:.2f} MB read from {clf_weights.name}; verified")
        files[modelio.CLASSIFIER_ONNX_FILE] = {"precision": "fp32", "runtime": "onnxruntime (any provider)",
                                               "role": "bare classifier f (attack demo)", "external_data": shared}
        for kind, w in weights.items():
            files[w.name] = {"precision": {"float16": "fp16"}.get(card[kind].get("weights_dtype"), "fp32"),
                             "runtime": "safetensors; external data of the ONNX graphs", "role": f"{kind} weights"}

        if optimize:
            from .optimize import select_variant

            calib = verify.load_images(calib_n, data, "train", seed) if calib_n > 0 else None
            robust = None
            if robust_n > 0 and vset.labels is not None:
                t1 = time.perf_counter()
                robust = verify.adversarial_set(pipeline.classifier, vset, robust_n, seed=seed)
                log(f"  {len(robust)} adversarial images for the variant gate in {time.perf_counter() - t1:.1f} s")
            variant, vrec = select_variant(onnx_path, tmp, vset, rt, calib.images if calib is not None else None,
                                           calib.source if calib is not None else "", seed=seed, reps=bench_reps,
                                           samples=modelio.default_samples(card), robust=robust, log=log,
                                           candidates=candidates)
            if variant is not None:
                variant.replace(tmp / modelio.OPT_ONNX_FILE)
                files[modelio.OPT_ONNX_FILE] = {"precision": "int8" if vrec["shipped"].startswith("int8") else "fp32",
                                                "runtime": "onnxruntime CPUExecutionProvider", "role": "faster CPU variant",
                                                "variant": vrec["shipped"]}
            for f in tmp.glob("candidate-*"):
                f.unlink()
            section["cpu_variant"] = vrec
        if "tensorrt" in targets:
            from . import tensorrt

            log("  compiling with Torch-TensorRT (fp16) ...")
            trt_path = tensorrt.export_tensorrt(pipeline, tmp / modelio.TRT_FILE)
            section["verification"]["tensorrt"] = tensorrt.verify_tensorrt(pipeline, trt_path, vset, seed=seed)
            files[modelio.TRT_FILE] = {"precision": "fp16", "runtime": "torch + torch_tensorrt, CUDA", "role": "GPU pipeline"}

        for f, rec in files.items():
            rec.update({"sha256": modelio.sha256(tmp / f), "bytes": (tmp / f).stat().st_size})
        contract = onnx_export.graph_contract(onnx_path, rt, len(card["classes"]))
        section.update({
            "files": files,
            "opset": contract["opset"],
            "graph": contract,
            "randomness": "explicit graph inputs u_mask, z, u_mix: the caller draws them (the service: fresh from the "
                          "OS entropy pool per request; tests and verification: fixed seeds). See docs/export.md.",
            "source": {"folder": str(src.resolve()), "name": card.get("name", src.name), "weights_sha256": weights_sha},
            "versions": versions(),
            "command": command or " ".join(sys.argv),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        new_card = {k: v for k, v in card.items() if k != "export"}
        new_card["export"] = section
        section["seconds"] = round(time.perf_counter() - t_start, 1)
        modelio.write_card(tmp, new_card)

        if register:
            from . import store

            tag = store.register(tmp, name, _metadata(new_card), _labels(new_card))
            log(f"  registered in the BentoML store as {tag}")
        _commit(tmp, out, in_place)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if tag:
            from . import store

            try:
                store.delete(tag)
            except Exception:  # noqa: BLE001  (report the original failure, not the rollback's)
                pass
        for c in created_parents:
            try:
                c.rmdir()
            except OSError:
                pass
        if isinstance(e, AtopError):
            raise type(e)(f"{e}; nothing was written to {out}") from None
        raise
    seconds = round(time.perf_counter() - t_start, 1)
    log(f"done in {seconds} s: {out}")
    return {"folder": str(out), "tag": tag, "seconds": seconds, "files": sorted(files),
            "verification": {k: {m: v.get(m) for m in ("n", "max_abs_diff", "top1_agreement", "accuracy", "passed")}
                             for k, v in section["verification"].items()},
            "cpu_variant": section.get("cpu_variant", {}).get("shipped")}


def _metadata(card: dict) -> dict:
    ex = card["export"]
    ver = ex["verification"]["onnx"]
    metrics_export = {"n": ver["n"], "max_abs_diff": ver["max_abs_diff"], "top1_agreement": ver["top1_agreement"],
                      "images": ver["images"]["source"]}
    if "accuracy" in ver:
        metrics_export["clean_accuracy"] = ver["accuracy"]
    return {
        "format": card.get("format", ""),
        "classes": list(card["classes"]),
        "input": card.get("input", {}),
        "graph": {"inputs": ex["graph"]["inputs"], "outputs": ex["graph"]["outputs"], "opset": ex["opset"]},
        "rt": card["purifier"]["rt"],
        "metrics": {"source": source_metrics(card), "export": metrics_export},
        "files": {f: {"sha256": r["sha256"], "bytes": r["bytes"], "precision": r["precision"]} for f, r in ex["files"].items()},
        "cpu_variant": (ex.get("cpu_variant") or {}).get("shipped") or "",
        "versions": ex["versions"],
        "source_model": {"name": ex["source"]["name"], "weights_sha256": ex["source"]["weights_sha256"]},
    }


def _labels(card: dict) -> dict[str, str]:
    ex = card["export"]
    return {"project": "atop-serve", "task": "cifar10-classification", "source": str(ex["source"]["name"]),
            "formats": ",".join(ex["formats"]), "rt": card["purifier"]["rt"]["kind"],
            "cpu_variant": (ex.get("cpu_variant") or {}).get("shipped") or "none", "verified": "true"}
