"""TensorRT export through Torch-TensorRT (fp16, dynamic batch profile), verified against eager fp32 on the GPU.

Needs a CUDA GPU and ``torch_tensorrt`` (``pip install -e '.[gpu]'``). The artifact, ``pipeline.trt.ep``, is a
``torch.export`` program with embedded TensorRT engines: load it with ``torch.export.load(path).module()`` in a
process that has imported ``torch_tensorrt``, on a GPU of the same family. Engines are built for one GPU
architecture and one TensorRT version; re-export on the serving GPU.

Precision: the graph stays fp32 at its inputs and outputs; Torch-TensorRT's rule-based autocast (torch-tensorrt
>= 2.10: ``enable_autocast`` + ``autocast_low_precision_type=float16``) lowers the convolutions and matmuls to
fp16, keeping reductions and the random transform's comparisons in fp32. Older releases get the equivalent
``enabled_precisions={fp16, fp32}``.

Without a GPU the same pipeline can still be served through ONNX Runtime's TensorRT execution provider from
``pipeline.onnx`` (``onnxruntime-gpu``; providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"]).
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np

from .verify import RT_INPUTS, VerificationSet, check, compare_logits, draws, eager_logits

MAX_BATCH, OPT_BATCH, MAX_K = 256, 64, 8


def unavailable_reason() -> str | None:
    """None where a TensorRT export can run here, else why not (one line, for the user)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available on this machine (torch.cuda.is_available() is False)"
    try:
        import torch_tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken CUDA/TensorRT library)
        return f"torch_tensorrt cannot be imported ({type(e).__name__}: {e}); install the gpu extra: pip install -e '.[gpu]'"
    return None


def version() -> str | None:
    try:
        import torch_tensorrt

        return torch_tensorrt.__version__
    except Exception:  # noqa: BLE001
        return None


def _precision_kwargs(compile_fn) -> dict:
    import torch

    params = inspect.signature(compile_fn).parameters
    if "enable_autocast" in params:
        return {"use_explicit_typing": True, "enable_autocast": True, "autocast_low_precision_type": torch.float16}
    return {"enabled_precisions": {torch.float16, torch.float32}}


def export_tensorrt(pipeline, out: Path, max_batch: int = MAX_BATCH, opt_batch: int = OPT_BATCH, max_k: int = MAX_K) -> Path:
    """Compile ``PipelineGraph(pipeline)`` with Torch-TensorRT for N in [1, max_batch], K in [1, max_k] and save it."""
    import torch
    import torch_tensorrt

    from atop_serve.pipeline import PipelineGraph

    out = Path(out)
    dev = torch.device("cuda")
    graph = PipelineGraph(pipeline.eval().to(dev)).eval()
    rt = pipeline.transform
    shapes1 = rt.input_shapes(1, 1)
    d = draws(rt, 2, 2, 0)
    example = (torch.rand(2, 3, rt.image_size, rt.image_size, device=dev),
               *(torch.from_numpy(d[k]).to(dev) for k in RT_INPUTS))
    n, k = torch.export.Dim("N", min=1, max=max_batch), torch.export.Dim("K", min=1, max=max_k)
    dyn = {"images": {0: n}, "u_mask": {0: n, 1: k}, "z": {0: n, 1: k}, "u_mix": {0: n, 1: k}}

    def spec(tail, lead_k=True):
        lo, opt, hi = (1, 1), (opt_batch, 1), (max_batch, max_k)
        if not lead_k:
            return torch_tensorrt.Input(min_shape=(1, *tail), opt_shape=(opt_batch, *tail), max_shape=(max_batch, *tail),
                                        dtype=torch.float32)
        return torch_tensorrt.Input(min_shape=(*lo, *tail), opt_shape=(*opt, *tail), max_shape=(*hi, *tail), dtype=torch.float32)

    inputs = [spec((3, rt.image_size, rt.image_size), lead_k=False),
              *(spec(shapes1[name][2:]) for name in RT_INPUTS)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(graph, example, dynamic_shapes=dyn)
        compile_fn = torch_tensorrt.dynamo.compile
        trt_module = compile_fn(program, arg_inputs=inputs, min_block_size=1, **_precision_kwargs(compile_fn))
        save_kw = {"output_format": "exported_program", "arg_inputs": list(example)}
        if "dynamic_shapes" in inspect.signature(torch_tensorrt.save).parameters:
            save_kw["dynamic_shapes"] = dyn
        tmp = out.with_name(out.name + ".tmp")
        torch_tensorrt.save(trt_module, str(tmp), **save_kw)
    tmp.replace(out)
    return out


def verify_tensorrt(pipeline, path: Path, vset: VerificationSet, seed: int = 0, batch: int = 250) -> dict:
    """Load the saved TensorRT program back and compare it with eager fp32 on the GPU (``TOLERANCES['tensorrt-fp16']``)."""
    import torch
    import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops the saved program uses)

    dev = torch.device("cuda")
    pipeline = pipeline.to(dev)
    module = torch.export.load(str(path)).module()
    d = draws(pipeline.transform, len(vset), 1, seed)
    ref = eager_logits(pipeline, vset.images, d, batch=batch, device="cuda")
    outs = []
    with torch.no_grad():
        for i in range(0, len(vset), batch):
            sl = slice(i, i + batch)
            args = (torch.from_numpy(vset.images[sl]).to(dev), *(torch.from_numpy(d[k][sl]).to(dev) for k in RT_INPUTS))
            outs.append(module(*args)[1].float().cpu().numpy())  # outputs as PipelineGraph.OUTPUTS: (probs, logits, ...)
    res = compare_logits(ref, np.concatenate(outs), vset.labels)
    rec = check(res, "tensorrt-fp16", path.name)
    return {"runtime": f"Torch-TensorRT {version()} on {torch.cuda.get_device_name()}", "precision": "fp16 autocast",
            "images": vset.describe(), "seed": seed, "k": 1,
            "profile": {"N": [1, OPT_BATCH, MAX_BATCH], "K": [1, 1, MAX_K]}, **rec}
