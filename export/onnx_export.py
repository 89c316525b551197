"""Export the whole purified classification (RT + purifier + classifier + softmax) to one ONNX graph.

Graph contract (also what the service feeds):
  inputs   images (N, 3, 32, 32) float32 in [0, 1]
           u_mask (N, K, V, 1, G, G) ~ U[0, 1), z (N, K, V, 3, 32, 32) ~ N(0, 1), u_mix (N, K, V) ~ U(0, 1]
           (inputs the transform does not use, e.g. z for RT1, are dropped from the graph: feed only the
           names the session lists)
  outputs  probs (N, C), logits (N, C), purified (N, 3, 32, 32), transformed (N, 3, 32, 32), mask (N, 1, 32, 32)
N (batch) and K (purification samples) are dynamic.

Randomness enters as explicit inputs rather than random ops inside the graph: the server draws it from the
OS entropy pool per request (fresh and unpredictable), while tests and the export's own verification feed
identical draws to PyTorch and the graph.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from atop_serve.config import draw_rt_inputs_numpy
from atop_serve.pipeline import PipelineGraph, PurifiedClassifier
from atop_serve.transforms import RTInputs

INPUT_NAMES = ("images", "u_mask", "z", "u_mix")
OPSET = 18


def export_onnx(pipeline: PurifiedClassifier, out: str | Path, opset: int = OPSET) -> Path:
    """Write ``pipeline`` as an ONNX graph with dynamic N and K. Returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = PipelineGraph(pipeline.eval()).eval()
    rt = pipeline.transform
    draws = draw_rt_inputs_numpy(rt, 2, 3, np.random.default_rng(0))
    args = (torch.rand(2, 3, rt.image_size, rt.image_size), *(torch.from_numpy(draws[k]) for k in INPUT_NAMES[1:]))
    n, k = torch.export.Dim("N", min=1, max=65536), torch.export.Dim("K", min=1, max=256)
    shapes = {"images": {0: n}, "u_mask": {0: n, 1: k}, "z": {0: n, 1: k}, "u_mix": {0: n, 1: k}}
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, args, input_names=list(INPUT_NAMES), output_names=list(PipelineGraph.OUTPUTS),
            dynamic_shapes=shapes, dynamo=True, opset_version=opset, external_data=False, verbose=False,
        )
        program.save(str(tmp))
    tmp.replace(out)
    return out


def feed_for(session_inputs, images: np.ndarray, draws: dict) -> dict:
    """The feed dict for an ONNX Runtime session: images plus the draws the graph uses."""
    feed = {"images": images}
    feed.update({i: draws[i] for i in session_inputs if i != "images"})
    return feed


def compare(pipeline: PurifiedClassifier, session, images: np.ndarray, k: int = 1, seed: int = 0) -> dict:
    """Run eager PyTorch and the ONNX session on identical draws; max abs logit diff and top-1 agreement."""
    draws = draw_rt_inputs_numpy(pipeline.transform, len(images), k, np.random.default_rng(seed))
    names = [i.name for i in session.get_inputs()]
    onnx_logits = session.run(["logits"], feed_for(names, images, draws))[0]
    with torch.no_grad():
        ref = pipeline.run(torch.from_numpy(images), RTInputs(*(torch.from_numpy(draws[n]) for n in INPUT_NAMES[1:])))
    ref_logits = ref["logits"].numpy()
    return {
        "max_abs_diff": float(np.abs(onnx_logits - ref_logits).max()),
        "top1_agreement": float((onnx_logits.argmax(1) == ref_logits.argmax(1)).mean()),
        "n": int(len(images)),
        "k": k,
    }
