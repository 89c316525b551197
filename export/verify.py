"""Numerical verification of an exported pipeline against eager PyTorch.

Every export runs the exported graph and the eager ``PurifiedClassifier`` on the same images with the same
random draws (mask uniforms, noise, mixing weights) and compares their logits:

  - ``max_abs_diff``     max |exported - eager| over all images and classes;
  - ``top1_agreement``   share of images whose argmax agrees;
  - ``accuracy``         clean accuracy of both (only with labelled images), for the variant gates.

Tolerances (``TOLERANCES``) are part of the export contract, documented in docs/export.md:
fp32 ONNX on CPU must match within 1e-4 with 100 % top-1 agreement; a faster variant (int8, offline-optimised)
must keep clean and robust (PGD-20 crafted on the classifier) accuracy within 0.5 point of fp32; TensorRT fp16 must agree on >= 99 % of top-1 decisions and
keep clean accuracy within 0.5 point.

Verification images are real CIFAR-10 test images (a fixed class-balanced subset) where the dataset is
present; otherwise uniform random images, and the card says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from atop_serve.config import RTConfig, draw_rt_inputs_numpy
from atop_serve.errors import DataError, ExportError

RT_INPUTS = ("u_mask", "z", "u_mix")

TOLERANCES = {
    # fp32 graph on ONNX Runtime CPU vs eager fp32: same maths, only summation order differs
    "onnx-fp32": {"max_abs_diff": 1e-4, "top1_agreement": 1.0},
    # the bare classifier's graph (classifier.onnx) on raw images: the same, but its logits have any size (a test
    # model's scaled head gives ~1e4), so the difference is measured relative to max(1, max |logit|)
    "classifier-fp32": {"max_rel_diff": 1e-5, "top1_agreement": 1.0},
    # faster CPU variants are judged on what users see: clean and robust accuracy each within 0.5 point of fp32
    "cpu-variant": {"max_accuracy_drop": 0.005, "min_top1_agreement_without_labels": 0.995, "min_speedup": 1.1},
    # TensorRT fp16 vs eager fp32 on the GPU: half precision moves logits by ~1e-2, so the gate is on decisions
    "tensorrt-fp16": {"max_abs_diff": 0.25, "top1_agreement": 0.99, "max_accuracy_drop": 0.005},
}


@dataclass
class VerificationSet:
    images: np.ndarray  # float32 (N, 3, H, W) in [0, 1]
    labels: np.ndarray | None  # int64 (N,), None for random images
    source: str  # what the images are, for the card

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict:
        return {"n": len(self), "source": self.source, "labelled": self.labels is not None}


def load_images(n: int, data: str | Path | None = None, split: str = "test", seed: int = 0,
                size: int = 32) -> VerificationSet:
    """A fixed class-balanced subset of ``n`` images of ``split`` (``n`` rounded down to a multiple of the classes).

    ``data`` None or "" means the default data root; when that is absent, ``n`` uniform random images are
    returned instead (labels None) and ``source`` says so. An explicitly named ``data`` that cannot be read
    is an error.
    """
    from training.data import default_data_root, load_split

    if n < 1:
        raise ExportError(f"need at least 1 verification image, got {n}")
    root = Path(data) if data else default_data_root()
    try:
        ds = load_split(root, split, size=size)
    except DataError as e:
        if data:
            raise
        rng = np.random.default_rng(seed)
        images = rng.random((n, 3, size, size), dtype=np.float32)
        return VerificationSet(images, None, f"uniform random images (seed {seed}): no dataset at {root} ({e})")
    if n < len(ds.classes):
        sub = ds.subset(np.random.default_rng(seed).permutation(len(ds))[:n])
    else:
        sub = ds.balanced_subset(n, seed=seed)
    images = sub.images.numpy().astype(np.float32) / 255.0
    return VerificationSet(images, sub.labels.numpy(), f"{root} split '{split}', class-balanced subset (seed {seed})")


def adversarial_set(classifier, vset: VerificationSet, n: int, eps: float = 8 / 255, steps: int = 20,
                    seed: int = 0, batch: int = 250) -> VerificationSet:
    """PGD-``steps`` (l_inf ``eps``, step eps/4, random start, fp32) crafted on the eager ``classifier`` alone for
    the first ``n`` labelled images of ``vset``: the `classifier` threat of `atop eval`, for the variant gate."""
    import copy

    import torch

    from training.attacks import PGD

    if vset.labels is None:
        raise ExportError("adversarial verification images need labelled images")
    n = min(n, len(vset))
    # channels_last: the same function, about 20 % faster on CPU (oneDNN); on a copy, the caller's model is untouched
    model = copy.deepcopy(classifier).to(memory_format=torch.channels_last)
    x = torch.from_numpy(vset.images[:n]).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(vset.labels[:n])
    gen = torch.Generator().manual_seed(seed)
    adv = PGD(model, eps=eps, alpha=eps / 4, steps=steps, random_start=True, generator=gen).batched(x, y, batch)
    return VerificationSet(np.ascontiguousarray(adv.numpy(), dtype=np.float32), vset.labels[:n],
                           f"PGD-{steps} (l_inf {eps * 255:.0f}/255, step {eps * 255 / 4:g}/255, crafted on the classifier "
                           f"alone) of the first {n} verification images")


def draws(rt: RTConfig, n: int, k: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """The RT draws fed identically to every backend (fixed seed: reproducible verification)."""
    return draw_rt_inputs_numpy(rt, n, k, np.random.default_rng(seed))


def _batched(fn: Callable, images: np.ndarray, rt_draws: dict, batch: int) -> np.ndarray:
    outs = []
    for i in range(0, len(images), batch):
        sl = slice(i, i + batch)
        outs.append(fn(images[sl], {k: v[sl] for k, v in rt_draws.items()}))
    return np.concatenate(outs)


def eager_logits(pipeline, images: np.ndarray, rt_draws: dict, batch: int = 250, device: str = "cpu") -> np.ndarray:
    """Logits of the eager PyTorch pipeline (fp32) on the given draws."""
    import torch

    from atop_serve.transforms import RTInputs

    def run(x, d):
        with torch.no_grad():
            inputs = RTInputs(*(torch.from_numpy(d[k]).to(device) for k in RT_INPUTS))
            return pipeline.run(torch.from_numpy(x).to(device), inputs)["logits"].float().cpu().numpy()

    return _batched(run, images, rt_draws, batch)


def session_logits(session, images: np.ndarray, rt_draws: dict, batch: int = 250) -> np.ndarray:
    """Logits of an ONNX Runtime session on the given draws (feeds only the inputs the graph declares)."""
    from .onnx_export import feed_for

    names = [i.name for i in session.get_inputs()]
    return _batched(lambda x, d: session.run(["logits"], feed_for(names, x, d))[0], images, rt_draws, batch)


def compare_logits(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Max abs diff, top-1 agreement and (with labels) both clean accuracies."""
    res = {
        "n": int(len(ref)),
        "max_abs_diff": float(np.abs(out.astype(np.float64) - ref).max()),
        "mean_abs_diff": float(np.abs(out.astype(np.float64) - ref).mean()),
        "max_abs_logit": float(np.abs(ref).max()),
        "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
    }
    if labels is not None:
        res["accuracy_reference"] = float((ref.argmax(1) == labels).mean())
        res["accuracy"] = float((out.argmax(1) == labels).mean())
    return res


def check(result: dict, kind: str, what: str) -> dict:
    """Apply ``TOLERANCES[kind]`` to a ``compare_logits`` result; raise ExportError past them.

    Returns the result with ``tolerance`` and ``passed`` added (what goes into the card)."""
    tol = TOLERANCES[kind]
    fails = []
    if "max_abs_diff" in tol and not result["max_abs_diff"] <= tol["max_abs_diff"]:  # `not <=` also catches NaN
        fails.append(f"max abs logit diff {result['max_abs_diff']:.3g} > {tol['max_abs_diff']:g}")
    if "max_rel_diff" in tol:
        result = {**result, "max_rel_diff": result["max_abs_diff"] / max(1.0, result["max_abs_logit"])}
        if not result["max_rel_diff"] <= tol["max_rel_diff"]:
            fails.append(f"max logit diff relative to max(1, max |logit|) {result['max_rel_diff']:.3g} > "
                         f"{tol['max_rel_diff']:g}")
    if "top1_agreement" in tol and result["top1_agreement"] < tol["top1_agreement"]:
        fails.append(f"top-1 agreement {100 * result['top1_agreement']:.2f} % < {100 * tol['top1_agreement']:g} %")
    if "max_accuracy_drop" in tol and "accuracy" in result:
        drop = result["accuracy_reference"] - result["accuracy"]
        if drop > tol["max_accuracy_drop"]:
            fails.append(f"clean accuracy drop {100 * drop:.2f} points > {100 * tol['max_accuracy_drop']:g}")
    out = {**result, "tolerance": {k: v for k, v in tol.items() if k in ("max_abs_diff", "max_rel_diff", "top1_agreement", "max_accuracy_drop")},
           "passed": not fails}
    if fails:
        raise ExportError(f"verification of {what} failed on {result['n']} images: {'; '.join(fails)} "
                          "(the exported graph and eager PyTorch disagree)")
    return out


def verify_classifier(classifier, onnx_path, vset: VerificationSet, batch: int = 250) -> dict:
    """Verify the bare classifier's graph (``export_classifier``) on ONNX Runtime CPU against eager PyTorch on the
    images of ``vset`` (``TOLERANCES['classifier-fp32']``). Raises ExportError past it; returns the card record."""
    import torch

    from .onnx_export import make_session

    session = make_session(onnx_path)

    def eager(x, _):
        with torch.no_grad():
            return classifier(torch.from_numpy(x)).float().numpy()

    ref = _batched(eager, vset.images, {}, batch)
    out = _batched(lambda x, _: session.run(["logits"], {"images": x})[0], vset.images, {}, batch)
    result = check(compare_logits(ref, out, vset.labels), "classifier-fp32", Path(onnx_path).name)
    return {"runtime": "onnxruntime CPUExecutionProvider", "images": vset.describe(), **result}


def verify_onnx(pipeline, onnx_path, vset: VerificationSet, seed: int = 0, k_check: int = 3,
                reference: np.ndarray | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Verify an fp32 ONNX graph on ONNX Runtime CPU against eager PyTorch (``TOLERANCES['onnx-fp32']``).

    Main check: K = 1 on every image of ``vset``; a second check runs K = ``k_check`` samples on up to 32
    images (exercises the dynamic K dimension and the mean over samples). Raises ExportError past the
    tolerance. Returns (card record, eager logits, ONNX logits) so later steps reuse the eager pass.
    """
    from .onnx_export import make_session

    session = make_session(onnx_path)
    d = draws(pipeline.transform, len(vset), 1, seed)
    ref = eager_logits(pipeline, vset.images, d) if reference is None else reference
    out = session_logits(session, vset.images, d)
    main = check(compare_logits(ref, out, vset.labels), "onnx-fp32", f"{Path(onnx_path).name} (K=1)")
    record = {"runtime": "onnxruntime CPUExecutionProvider", "images": vset.describe(), "seed": seed, "k": 1, **main}
    if k_check > 1:
        m = min(32, len(vset))
        dk = draws(pipeline.transform, m, k_check, seed + 1)
        res = compare_logits(eager_logits(pipeline, vset.images[:m], dk), session_logits(session, vset.images[:m], dk))
        record["multi_sample"] = {"k": k_check, **check(res, "onnx-fp32", f"{Path(onnx_path).name} (K={k_check})")}
    return record, ref, out
