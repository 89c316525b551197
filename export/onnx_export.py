"""Export the whole purified classification (RT + purifier + classifier + softmax) to one ONNX graph.

Graph contract (also what the service feeds):
  inputs   images (N, 3, 32, 32) float32 in [0, 1]
           u_mask (N, K, V, 1, G, G) ~ U[0, 1), z (N, K, V, 3, 32, 32) ~ N(0, 1), u_mix (N, K, V) ~ U(0, 1]
           (feed the names the session lists: today all four, also where the transform ignores one, e.g.
           u_mix outside RT3; ``feed_for`` does it)
  outputs  probs (N, C), logits (N, C), purified (N, 3, 32, 32), transformed (N, 3, 32, 32), mask (N, 1, 32, 32)
N (batch) and K (purification samples) are dynamic.

A second, small graph holds the bare classifier f alone (``export_classifier``: images -> logits, dynamic N), for
the service's attack demo; its weights are not copied but read from the folder's classifier.safetensors.

Randomness enters as explicit inputs rather than random ops inside the graph: the server draws it from the
OS entropy pool per request (fresh and unpredictable), while tests and the export's own verification feed
identical draws to PyTorch and the graph.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from atop_serve import engine
from atop_serve.engine import feed_for  # noqa: F401  (one definition, shared with the service)
from atop_serve.config import RTConfig, draw_rt_inputs_numpy
from atop_serve.pipeline import PipelineGraph, PurifiedClassifier

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
            optimize=False,  # keep every weight as stored (no Conv+BN folding): it can then be shared; ORT fuses at load
        )
        program.save(str(tmp))
    tmp.replace(out)
    return out


def export_classifier(classifier, out: str | Path, weights: str | Path, size: int = 32,
                      opset: int = OPSET) -> tuple[Path, dict]:
    """Write the bare classifier f (with its test-time augmentation) as an ONNX graph: ``images`` (N, 3, S, S) in
    [0, 1] -> ``logits`` (N, C), dynamic N.

    Its weights are ONNX external data pointing into ``weights`` (the safetensors file ``classifier`` was loaded
    from, which must sit next to ``out`` and stay unchanged) instead of a second copy: safetensors stores raw
    little-endian C-order tensors, the layout ONNX external data reads. A float32 initializer equal to a stored
    float32 tensor reads that tensor's byte range; one equal to a stored float16 tensor (weights packed with
    ``atop pack --half``) reads the float16 bytes and a Cast node makes them float32 again, exactly what loading
    them into the eager model does. Anything else (small constants, folded tensors) stays inside the graph.
    Returns the path and what was shared (see ``share_weights``).
    """
    out, weights = Path(out), Path(weights)
    if weights.parent.resolve() != out.parent.resolve():
        raise ValueError(f"{weights} must be in the folder of {out}: ONNX Runtime reads external data beside the graph")
    n = torch.export.Dim("N", min=1, max=65536)
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            classifier.eval(), (torch.rand(2, 3, size, size),), input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: n},), dynamo=True, opset_version=opset, external_data=False, verbose=False,
            optimize=False,  # see export_pipeline
        )
        program.save(str(tmp))
    tmp.replace(out)
    return out, share_weights(out, [weights])


def share_weights(graph: str | Path, weights: list[str | Path]) -> dict:
    """Rewrite the saved ONNX ``graph`` so that its large float32 initializers read their values from the
    safetensors ``weights`` files beside it (ONNX external data) instead of holding a second copy.

    safetensors stores raw little-endian C-order tensors, the layout ONNX external data reads. An initializer
    equal to a stored float32 tensor reads that tensor's byte range; one equal to a stored float16 tensor
    (``atop pack --half``) reads the float16 bytes and a Cast node makes them float32 again, exactly what
    loading them into the eager model does. Anything else (small constants, folded tensors) stays inside.
    Returns {"files": {name: sha256}, "external_bytes", "inline_bytes"}."""
    import onnx
    from onnx import helper, numpy_helper

    from atop_serve.modelio import sha256

    graph = Path(graph)
    paths = [Path(w) for w in weights]
    for w in paths:
        if w.parent.resolve() != graph.parent.resolve():
            raise ValueError(f"{w} must be in the folder of {graph}: ONNX Runtime reads external data beside the graph")
    model = onnx.load(str(graph))
    stored = {}
    for w in paths:
        for key, (data_type, offset, length) in _stored_tensors(w).items():
            stored.setdefault(key, (w.name, data_type, offset, length))
    kept, casts, shared, inline = [], [], 0, 0
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        hit = stored.get(a.astype("<f4").tobytes()) if a.dtype == np.float32 and a.nbytes >= 1024 else None
        if hit is None:
            kept.append(t)
            inline += a.nbytes
            continue
        location, data_type, offset, length = hit
        if data_type == onnx.TensorProto.FLOAT:
            _read_from(t, location, offset, length)
            kept.append(t)
        else:
            half = onnx.TensorProto(name=f"{t.name}.stored", data_type=data_type, dims=t.dims)
            _read_from(half, location, offset, length)
            kept.append(half)
            casts.append(helper.make_node("Cast", [half.name], [t.name], to=onnx.TensorProto.FLOAT))
        shared += length
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    tmp = graph.with_name(graph.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(graph)
    return {"files": {w.name: sha256(w) for w in paths}, "external_bytes": shared, "inline_bytes": inline}


def _read_from(tensor, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` ONNX external data: ``length`` bytes at ``offset`` of the file ``location`` beside the graph."""
    import onnx

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _stored_tensors(path: Path) -> dict[bytes, tuple[int, int, int]]:
    """A safetensors file's float32 and float16 tensors: their values as float32 bytes -> (ONNX data type, offset
    in the file, length). The format: an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets: [begin, end]}}, then the data."""
    import json
    import struct

    import onnx

    types = {"F32": ("<f4", onnx.TensorProto.FLOAT), "F16": ("<f2", onnx.TensorProto.FLOAT16)}
    raw = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    base = 8 + header_len
    found: dict[bytes, tuple[int, int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry.get("dtype") not in types:
            continue
        dtype, data_type = types[entry["dtype"]]
        begin, end = entry["data_offsets"]
        values = np.frombuffer(raw[base + begin : base + end], dtype=dtype).astype("<f4")
        found.setdefault(values.tobytes(), (data_type, base + begin, end - begin))
    return found


def compare(pipeline: PurifiedClassifier, session, images: np.ndarray, k: int = 1, seed: int = 0) -> dict:
    """Run eager PyTorch and the ONNX session on identical draws; max abs logit diff and top-1 agreement."""
    from .verify import compare_logits, draws, eager_logits, session_logits

    d = draws(pipeline.transform, len(images), k, seed)
    res = compare_logits(eager_logits(pipeline, images, d), session_logits(session, images, d))
    return {"max_abs_diff": res["max_abs_diff"], "top1_agreement": res["top1_agreement"], "n": res["n"], "k": k}


def make_session(path, providers=("CPUExecutionProvider",), threads: int = 0, optimize: bool = True):
    """The serving session (``atop_serve.engine.make_session``); ``optimize=False`` reads the graph as saved."""
    if optimize:
        return engine.make_session(Path(path), threads, providers)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=list(providers))


def graph_contract(path, rt: RTConfig, num_classes: int) -> dict:
    """Inputs and outputs of an exported graph as plain data (names, shapes with 'N'/'K' symbols, dtypes, meaning).

    Read from the saved graph itself, so the card lists exactly what the serving session will ask for."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meaning = {
        "images": "RGB float32 in [0, 1], NCHW",
        "u_mask": f"U[0, 1) per {rt.block}x{rt.block} block; block missing where u_mask < rate ({rt.rate})",
        "z": f"N(0, 1) per pixel; noise sigma * z (sigma {rt.sigma})",
        "u_mix": "U(0, 1] per view; mixing weights -log(u_mix), normalised (rt3)",
        "probs": "mean over K samples of softmax(logits): the prediction",
        "logits": "mean over K samples of the classifier logits",
        "purified": "g(RT(x)) of the first sample",
        "transformed": "RT(x) of the first sample",
        "mask": "missing-pixel mask of the first sample (soft for rt3)",
    }

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "meaning": meaning.get(v.name, "")}

    return {
        "inputs": [spec(v) for v in model.graph.input],
        "outputs": [spec(v) for v in model.graph.output],
        "dynamic": {"N": "images per request", "K": "purification samples per image"},
        "num_classes": num_classes,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
    }
