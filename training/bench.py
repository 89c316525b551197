"""``atop bench``: how fast is purified classification here, on every backend and through the live service.

Model level (in process): for each backend, the bare classifier f and the purified pipeline f(g(RT(x))), for
purification samples K and batch sizes; per cell p50/p95/p99 latency and images/s after a warm-up, with as many
repeats as fill a time target (at least ``min_reps``), each repeat on fresh inputs: real CIFAR-10 test images
drawn at random from a pool plus fresh RT draws (never zeros). Timed: numpy in -> class scores out (host/device
copies included); the RT draws themselves are made outside the timer and measured apart (``reference.rt_draws``).

Reference: FLOPs per image (torch.utils.flop_counter: matmul/conv FLOPs, 2 per multiply-add), this machine's
matmul peak per dtype, hence the fraction of peak each cell reaches and the compute floor (peak / FLOPs); DiffPure's
per-image compute for scale (``DIFFPURE``, derivation in docs/benchmarks.md).

HTTP level: ``bentoml serve`` started on 127.0.0.1 for each candidate ``ATOP_MAX_BATCH_SIZE`` and driven by
training.loadgen at each concurrency with real CIFAR-10 test files; the batching settings are chosen from these
runs. Everything is bounded by request counts and a wall-clock budget, so a run stops by itself.

Output (``write_report``): report.json, report.md (pasteable into a Markdown file next to the report folder, e.g.
docs/benchmarks.md for ``--out docs/bench``), latency_vs_batch.png, throughput_vs_concurrency.png.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from atop_serve import modelio
from atop_serve.config import RTConfig, draw_rt_inputs_numpy
from atop_serve.cpu import CPU_FLAGS, bf16_native, cpu_flags
from atop_serve.errors import AtopError, ModelError

from . import loadgen

SCHEMA = "atop-bench/1"
CLASSIFIER_ONNX_FILE = getattr(modelio, "CLASSIFIER_ONNX_FILE", "classifier.onnx")
FOLDER_WEIGHTS = "the folder's weights"
CPU_BACKENDS = ("torch-fp32", "torch-bf16", "ort-fp32", "ort-opt")
GPU_BACKENDS = ("ort-cuda-fp32", "ort-trt-fp16", "torch-trt-fp16")
BACKENDS = CPU_BACKENDS + GPU_BACKENDS
TTA_PASSES = {"none": 1, "flip": 2, "flip-translate": 6}
BARS = {"throughput_images_per_s": 1000.0, "overhead_at_batch": 32, "overhead_max": 2.0, "http_concurrency": 32,
        "http_share_min": 0.5, "cores": 2}

# DiffPure (Nie et al., ICML 2022) on CIFAR-10, per image and purification: see docs/benchmarks.md for the derivation.
DIFFPURE = {
    "score_model": "NCSN++ / DDPM++ cont. deep, VP SDE (Song et al., ICLR 2021; score_sde checkpoint "
                   "vp/cifar10_ddpmpp_deep_continuous, checkpoint_8.pth), 106.6 M parameters",
    "score_gflops_per_forward": 37.09,
    "reverse_steps": 100,
    "classifier": "WideResNet-28-10 (36.5 M parameters)",
    "classifier_gflops": 10.49,
    "gflops_per_image": round(100 * 37.09 + 10.49, 1),
    "derivation": (
        "No published per-image FLOPs figure was found, so it is counted: DiffPure's own score network "
        "(NVlabs/DiffPure@985703f, score_sde/models/ncsnpp.py with configs/cifar10.yml: nf 128, ch_mult 1-2-2-2, "
        "8 res blocks per resolution, attention at 16x16, BigGAN res blocks) run once at batch 1 on 32x32 under "
        "torch.utils.flop_counter.FlopCounterMode gives 37.09 GFLOPs per forward (35.25 convolution, 1.82 attention "
        "bmm, 0.02 linear). The CIFAR-10 runs (run_scripts/cifar10/run_cifar_rand_inf.sh, --t 100) integrate the "
        "reverse VP SDE from t = 1 - 100/1000 = 0.9 to 1 - 1e-5 with torchsde.sdeint_adjoint(method='euler') at "
        "torchsde's default dt = 1e-3 (runners/diffpure_sde.py): ceil(0.09999 / 0.001) = 100 Euler steps, one "
        "score evaluation each, i.e. t* = 0.1 and 100 network evaluations per image. Plus one WideResNet-28-10 "
        "pass (10.49 GFLOPs, same counter, atop_serve's wrn-28-10). Total 100 x 37.09 + 10.49 = 3719.4 GFLOPs per "
        "image, per purification sample (DiffPure's EOT attacks multiply this further). Counting convention as for "
        "AToP here: matmul/conv FLOPs only (2 per multiply-add), normalisations and activations not counted."),
    "sources": [
        "Nie et al., Diffusion Models for Adversarial Purification, ICML 2022 (t* = 0.1 for CIFAR-10 l_inf)",
        "github.com/NVlabs/DiffPure: configs/cifar10.yml, runners/diffpure_sde.py, run_scripts/cifar10/run_cifar_rand_inf.sh",
        "Song et al., Score-Based Generative Modeling through Stochastic Differential Equations, ICLR 2021",
        "torchsde.sdeint_adjoint: dt defaults to 1e-3",
    ],
}


# ------------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class Preset:
    batch_sizes: tuple[int, ...]
    samples: tuple[int, ...]
    concurrency: tuple[int, ...]
    requests: int  # most requests per concurrency level
    level_seconds: float  # most seconds per concurrency level
    batching: tuple[int, ...]  # ATOP_MAX_BATCH_SIZE candidates (() = the settings default)
    budget_s: float
    target_s: float  # time per model-level cell to aim for
    min_reps: int
    max_reps: int
    peak_n: int  # matmul size for the peak
    pool: int  # real images held for model-level inputs
    http_images: int  # distinct files the load generator cycles through
    model_share: float  # share of the budget for setup + model level (the rest: HTTP, report)


FULL = Preset(batch_sizes=(1, 8, 32, 128, 256), samples=(1, 4), concurrency=(1, 8, 32, 128), requests=2000,
              level_seconds=15.0, batching=(16, 64, 128), budget_s=840.0, target_s=2.0, min_reps=10, max_reps=200,
              peak_n=2048, pool=1024, http_images=1000, model_share=0.55)
QUICK = Preset(batch_sizes=(1, 32), samples=(1,), concurrency=(1, 8, 32), requests=96, level_seconds=5.0,
               batching=(), budget_s=110.0, target_s=0.25, min_reps=3, max_reps=20, peak_n=768, pool=256,
               http_images=200, model_share=0.5)


@dataclass
class BenchConfig:
    model: str = "default"
    out: Path = Path("runs/bench")
    quick: bool = False
    backends: tuple[str, ...] = ()  # () = every backend (unavailable ones are skipped with a reason)
    batch_sizes: tuple[int, ...] = ()  # () = the preset's
    samples: tuple[int, ...] = ()
    concurrency: tuple[int, ...] = ()
    requests: int = 0
    level_seconds: float = 0.0
    batching: tuple[int, ...] = ()
    http: bool = True
    url: str | None = None  # drive this running server instead of starting one
    threads: int = 0  # model-level CPU threads (0: all cores)
    budget_s: float = 0.0
    data: str | None = None
    seed: int = 0
    command: str = ""
    settings: tuple[str, ...] = ()  # ATOP_NAME=value for the servers the HTTP level starts (e.g. ATOP_FAST_PATH=0)

    def preset(self) -> Preset:
        base = QUICK if self.quick else FULL
        over = {k: getattr(self, k) for k in ("batch_sizes", "samples", "concurrency", "requests", "level_seconds",
                                               "batching", "budget_s") if getattr(self, k)}
        return Preset(**{**asdict(base), **over})

    def validate(self) -> None:
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise AtopError(f"--out {self.out} is a file; name a folder for the report")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise AtopError(f"unknown backend(s) {unknown}; valid: {', '.join(BACKENDS)}")
        for name in ("batch_sizes", "samples", "concurrency", "batching"):
            if any(v < 1 for v in getattr(self, name)):
                raise AtopError(f"--{name.replace('_', '-')} values must be >= 1")
        for name in ("requests", "level_seconds", "threads", "budget_s"):
            if getattr(self, name) < 0:
                raise AtopError(f"--{name.replace('_s', '').replace('_', '-')} must be >= 0 (0: the default)")
        if self.url:
            loadgen.check_local(self.url)
        self.server_env()

    def server_env(self) -> dict[str, str]:
        """--setting values as environment variables, checked as the service would read them."""
        from atop_serve.settings import Settings

        env: dict[str, str] = {}
        for item in self.settings:
            name, eq, value = item.partition("=")
            if not eq or not re.fullmatch(r"ATOP_[A-Z_]+", name):
                raise AtopError(f"--setting {item!r}: write ATOP_NAME=value (docs/service.md lists the settings)")
            if name in ("ATOP_MODEL", "ATOP_MAX_BATCH_SIZE"):
                raise AtopError(f"--setting {name}: the bench sets it (--model, --batching)")
            if name.lower()[5:] not in {f.name for f in fields(Settings)}:
                raise AtopError(f"--setting {name}: no such setting (docs/service.md lists them)")
            env[name] = value
        if env and self.url:
            raise AtopError("--setting applies to the servers the bench starts; a server at --url has its own")
        Settings.from_env(env)  # a bad value fails here, clearly, not in a server's log
        return env


class Clock:
    """The run's wall-clock budget."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def at(self, share: float) -> float:
        """perf_counter() value at ``share`` of the budget."""
        return self.t0 + share * self.budget_s


class Skip(Exception):
    """A backend that cannot run here; the message says why."""


# ------------------------------------------------------------------------------------------ machine
def machine_info() -> dict:
    from importlib import metadata

    info: dict = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                  "platform": platform.platform(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and info["cpu"] in (platform.processor(), platform.machine(), ""):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags() or frozenset()
    info["cpu_flags"] = {f: f in flags for f in CPU_FLAGS}
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    versions = {}
    for pkg in ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "bentoml", "aiohttp", "pillow",
                "torch-tensorrt", "tensorrt", "atop-serve"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        info["gpu"] = None
    info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


class CpuMeter:
    """How much of the machine's CPU other processes used during the run: busy time of all cores (/proc/stat)
    minus this process's and its waited-for children's (the servers it started), as a share of all cores."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float, float] | None:
        import resource

        try:
            f = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (f[0] + f[1] + f[2] + f[5] + f[6]) / hz  # user nice system irq softirq
        steal = (f[7] if len(f) > 7 else 0) / hz
        ours = sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for k in ("ru_utime", "ru_stime"))
        return time.monotonic(), busy, steal, ours

    def result(self) -> dict:
        end = self._read()
        if self.start is None or end is None:
            return {}
        wall = max(end[0] - self.start[0], 1e-9)
        cores = os.cpu_count() or 1
        others = max(0.0, (end[1] - self.start[1]) - (end[3] - self.start[3]))
        return {"other_processes_cpu_share": round(others / (wall * cores), 3),
                "steal_share": round((end[2] - self.start[2]) / (wall * cores), 3),
                "own_cpu_seconds": round(end[3] - self.start[3], 1)}


def busy_note(machine: dict) -> str | None:
    """A warning when the machine was not quiet: other processes used over 10 % of all cores during the run (or,
    where that cannot be measured, the 1-minute load average at start exceeded a quarter of the cores)."""
    cores = machine.get("cores") or 1
    use = machine.get("cpu_during_run") or {}
    others, steal = use.get("other_processes_cpu_share"), use.get("steal_share") or 0
    start = machine.get("load_average_start", [0])[0]
    if others is not None and others + steal > 0.10:
        return (f"the machine was busy: other processes used {100 * others:.0f} % of its {cores} cores during the run"
                + (f" and the hypervisor took {100 * steal:.0f} %" if steal > 0.01 else "")
                + f" (1-minute load average {start} at start): these numbers understate what it can do; re-run on a "
                  "quiet machine before publishing")
    if others is None and start > 0.25 * cores:
        return (f"the machine was busy (1-minute load average {start} at start on {cores} cores): these numbers "
                "understate what it can do; re-run on a quiet machine before publishing")
    return None


# ------------------------------------------------------------------------------------------ model
@dataclass
class Model:
    folder: Path
    card: dict
    rt: RTConfig
    pipeline: object  # PurifiedClassifier (CPU, eval)
    weights: str  # where the weights came from
    tta: str

    @property
    def size(self) -> int:
        return self.rt.image_size


def load_model(folder: Path) -> Model:
    """The folder's pipeline in PyTorch; a serving folder without weights gets random weights of the card's
    architectures (speed does not depend on weight values; the report says so)."""
    from atop_serve.engine import read_serving_card

    card, rt = read_serving_card(folder)
    tta = card["classifier"].get("tta", "none")
    try:
        pipeline = modelio.load_pipeline(folder)
        weights = FOLDER_WEIGHTS
    except ModelError as e:
        if "is missing" not in str(e):
            raise
        import torch

        from atop_serve.pipeline import PurifiedClassifier, TTAClassifier
        from atop_serve.registry import create_classifier, create_purifier

        torch.manual_seed(0)
        clf = TTAClassifier(create_classifier(card["classifier"]["arch"], num_classes=len(card["classes"])), tta)
        pipeline = PurifiedClassifier(create_purifier(card["purifier"]["arch"]), clf, rt,
                                      mirror=modelio.mirrored(card)).eval()
        weights = ("random weights of the card's architectures: the folder holds no weights (PyTorch backends, the "
                   "bare-classifier graphs and FLOP counts need only the architecture; speed does not depend on "
                   "weight values)")
    return Model(folder, card, rt, pipeline.eval(), weights, tta)


def count_flops(model: Model, ks) -> dict:
    """FLOPs per image (batch 1) of the purifier, the classifier with its TTA, and the whole pipeline per K."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from atop_serve.transforms import RTInputs, random_transform

    def flops(fn) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())

    p, s = model.pipeline, model.size
    x = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    d = {k: torch.from_numpy(v) for k, v in draw_rt_inputs_numpy(model.rt, 1, 1, np.random.default_rng(0)).items()}
    inputs = RTInputs(d["u_mask"], d["z"], d["u_mix"])
    x_t, mask = random_transform(x, model.rt, inputs.flat())
    out = {"purifier": flops(lambda: p.purifier(x_t, mask)), "classifier": flops(lambda: p.classifier(x)),
           "classifier_single_pass": flops(lambda: p.classifier.classifier(x)), "tta": model.tta,
           "tta_passes": TTA_PASSES.get(model.tta), "pipeline_per_k": {}}
    for k in sorted(set(ks) | {1}):
        dk = {n: torch.from_numpy(v) for n, v in draw_rt_inputs_numpy(model.rt, 1, k, np.random.default_rng(0)).items()}
        out["pipeline_per_k"][str(k)] = flops(lambda: p.run(x, RTInputs(dk["u_mask"], dk["z"], dk["u_mix"])))
    out["pipeline"] = out["pipeline_per_k"]["1"]
    out["counter"] = "torch.utils.flop_counter.FlopCounterMode, batch 1: conv/matmul FLOPs (2 per multiply-add)"
    return out


def flops_of(flops: dict, part: str, k: int) -> int:
    return flops["classifier"] if part == "classifier" else flops["pipeline_per_k"].get(str(k), k * flops["pipeline"])


# ------------------------------------------------------------------------------------------ peaks
def matmul_peaks(kinds, n: int, threads: int, seconds: float = 1.5) -> dict:
    """This machine's matmul peak per kind, GFLOP/s of the best repeat of an n x n x n product: cpu-fp32 and cpu-int8
    from the faster of torch (MKL / oneDNN: ``matmul``, ``_int_mm`` int8 x int8 -> int32) and ONNX Runtime (MLAS:
    MatMul, MatMulInteger uint8 x int8 -> int32), which need not pick the same kernels on every CPU; cpu-bf16 from
    torch; cuda-fp32 (TF32 off) and cuda-fp16 from torch on the GPU."""
    out = {}
    for kind in kinds:
        device, dtype = kind.split("-")
        found = {}
        libs = ("torch", "onnxruntime") if device == "cpu" and dtype in ("fp32", "int8") else ("torch",)
        for lib in libs:
            try:
                found[lib] = (_torch_peak if lib == "torch" else _ort_peak)(device, dtype, n, threads, seconds)
            except Exception as e:  # noqa: BLE001  (a dtype this build or CPU cannot do is recorded, not fatal)
                found[lib] = {"gflops_per_s": None, "error": f"{type(e).__name__}: {e}"[:200]}
        ok = {k: v for k, v in found.items() if v.get("gflops_per_s")}
        if not ok:
            out[kind] = {"gflops_per_s": None, "error": "; ".join(f"{k}: {v.get('error')}" for k, v in found.items())}
            continue
        lib = max(ok, key=lambda k: ok[k]["gflops_per_s"])
        out[kind] = {"gflops_per_s": ok[lib]["gflops_per_s"], "library": lib,
                     "how": "; ".join(f"{k} {v['how']}: {v['gflops_per_s']:,.1f}" for k, v in ok.items()),
                     "by_library": {k: v["gflops_per_s"] for k, v in found.items()}}
    return out


def _best_time(fn, seconds: float, sync=lambda: None) -> tuple[float, int]:
    fn()
    sync()
    best, reps, t_end = float("inf"), 0, time.perf_counter() + seconds
    # at least 3 repeats, unless one alone outlasts the budget (an emulated dtype): then the first is the answer
    while reps < 3 and not (reps and best > seconds) or (time.perf_counter() < t_end and reps < 50):
        t = time.perf_counter()
        fn()
        sync()
        best, reps = min(best, time.perf_counter() - t), reps + 1
    return best, reps


def _torch_peak(device: str, dtype: str, n: int, threads: int, seconds: float) -> dict:
    import torch

    torch.set_num_threads(threads)
    m = n if device == "cpu" else max(n, 8192)
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    if dtype == "int8":
        a = torch.randint(-128, 128, (m, m), dtype=torch.int8, device=dev)
        b = torch.randint(-128, 128, (m, m), dtype=torch.int8, device=dev)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        a, b = torch.randn(m, m, device=dev).to(dt), torch.randn(m, m, device=dev).to(dt)
        fn = lambda: a @ b  # noqa: E731
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        best, reps = _best_time(fn, seconds, torch.cuda.synchronize if device == "cuda" else (lambda: None))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    op = "_int_mm" if dtype == "int8" else "matmul"
    return {"gflops_per_s": round(2 * m**3 / best / 1e9, 1),
            "how": f"{op} {m}^3, best of {reps}" + (f", {threads} threads" if device == "cpu" else "")}


def _ort_peak(device: str, dtype: str, n: int, threads: int, seconds: float) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if dtype == "fp32":
        types, op = (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT), "MatMul"
        rng = np.random.default_rng(0)
        a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    else:
        types, op = (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32), "MatMulInteger"
        rng = np.random.default_rng(0)
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
        b = rng.integers(-128, 128, (n, n), dtype=np.int8)
    graph = helper.make_graph([helper.make_node(op, ["A", "B"], ["Y"])], "matmul",
                              [helper.make_tensor_value_info("A", types[0], [n, n]),
                               helper.make_tensor_value_info("B", types[1], [n, n])],
                              [helper.make_tensor_value_info("Y", types[2], [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"A": a, "B": b}
    best, reps = _best_time(lambda: sess.run(None, feed), seconds)
    return {"gflops_per_s": round(2 * n**3 / best / 1e9, 1), "how": f"{op} {n}^3, best of {reps}, {threads} threads"}


# ------------------------------------------------------------------------------------------ inputs
def image_pool(data: str | None, n: int, size: int, seed: int) -> tuple[np.ndarray, str]:
    """float32 (n, 3, size, size) in [0, 1]: real test images (decoded from the dataset files) or, without the
    dataset, uniform random images."""
    import io

    from PIL import Image

    if not data and not (loadgen.default_data_root() / "test").is_dir():
        rng = np.random.default_rng(seed)
        return (rng.random((n, 3, size, size), dtype=np.float32),
                f"{n} uniform random images (no dataset at {loadgen.default_data_root()})")
    payloads, source = loadgen.load_images(data, n=n, seed=seed)
    arrays = []
    for p in payloads:
        with Image.open(io.BytesIO(p.data)) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(im, dtype=np.uint8))
    x = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(x), source


class Inputs:
    """Fresh inputs per repeat: a random choice of pool images and fresh RT draws."""

    def __init__(self, pool: np.ndarray, rt: RTConfig, seed: int):
        self.pool, self.rt, self.rng = pool, rt, np.random.default_rng(seed)

    def __call__(self, part: str, batch: int, k: int) -> tuple:
        x = self.pool[self.rng.integers(0, len(self.pool), batch)]
        if part == "classifier":
            return (x,)
        return x, draw_rt_inputs_numpy(self.rt, batch, k, self.rng)


# ------------------------------------------------------------------------------------------ backends
@dataclass
class Backend:
    name: str
    device: str
    precision: str
    peak: str  # key into the peaks
    pipeline: Callable  # (images, draws) -> probs
    classifier: Callable | None  # (images,) -> logits; None when its graph could not be built (classifier_note says why)
    detail: str = ""
    warmup: int = 2
    classifier_note: str = ""
    variant: str | None = None  # ort-opt: which faster CPU variant pipeline.opt.onnx is (export.cpu_variant)


class Context:
    """What the backends share: the model, a work folder, the threads, lazily built bare-classifier graphs."""

    def __init__(self, model: Model, work: Path, threads: int, max_batch: int, max_k: int, pool: np.ndarray,
                 log: Callable, skip_emulated_bf16: bool = True):
        self.model, self.work, self.threads, self.max_batch, self.max_k, self.pool = model, work, threads, max_batch, max_k, pool
        self.log, self.skip_emulated_bf16 = log, skip_emulated_bf16
        self._classifier_onnx: Path | None = None
        self.classifier_source = ""

    @property
    def onnx(self) -> Path:
        return self.model.folder / modelio.ONNX_FILE

    def classifier_onnx(self) -> Path:
        """The bare classifier's graph: the folder's classifier.onnx (written by `atop export`, weights read from
        classifier.safetensors) where both exist, else an export of the loaded classifier into the work folder."""
        if self._classifier_onnx is None:
            shipped = self.model.folder / CLASSIFIER_ONNX_FILE
            if shipped.exists() and self.model.weights == FOLDER_WEIGHTS:
                import onnx

                # its weights are external data in classifier.safetensors: a self-contained copy, from which the
                # quantised / offline-optimised variants can be derived in the work folder
                self._classifier_onnx = self.work / "classifier.onnx"
                onnx.save(onnx.load(str(shipped)), str(self._classifier_onnx))
                self.classifier_source = f"{CLASSIFIER_ONNX_FILE} from the folder"
            else:
                from export.onnx_export import export_classifier

                t = time.perf_counter()
                weights = self.work / modelio.CLASSIFIER_FILE  # as `atop export` does it, into the work folder
                modelio.save_weights(self.model.pipeline.classifier, weights)
                self._classifier_onnx, _ = export_classifier(self.model.pipeline.classifier,
                                                             self.work / "classifier.onnx", weights, self.model.size)
                self.classifier_source = "exported from the PyTorch classifier by the benchmark"
                self.log(f"  bare classifier exported to ONNX in {time.perf_counter() - t:.1f} s")
        return self._classifier_onnx


def _ort_pipeline_call(sess):
    from atop_serve.engine import feed_for

    names = [i.name for i in sess.get_inputs()]

    def pipeline(x, d):
        return sess.run(["probs"], feed_for(names, x, d))[0]

    return pipeline


def _ort_classifier_call(sess):
    name = sess.get_inputs()[0].name

    def classifier(x):
        return sess.run(None, {name: x})[0]

    return classifier


def _torch_calls(pipeline, device: str, autocast_dtype=None):
    import contextlib

    import torch

    from atop_serve.transforms import RTInputs

    dev = torch.device(device)

    def ctx():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=autocast_dtype)

    def t(a):
        return torch.from_numpy(a).to(dev, non_blocking=False)

    def run_pipeline(x, d):
        with torch.inference_mode(), ctx():
            out = pipeline.run(t(x), RTInputs(t(d["u_mask"]), t(d["z"]), t(d["u_mix"])))
        return out["probs"].float().cpu().numpy()

    def run_classifier(x):
        with torch.inference_mode(), ctx():
            return pipeline.classifier(t(x)).float().cpu().numpy()

    return run_pipeline, run_classifier


def opt_variant(model: Model) -> str | None:
    """Which faster CPU variant pipeline.opt.onnx is: the card's record, else read from the graph."""
    path = model.folder / modelio.OPT_ONNX_FILE
    if not path.exists():
        return None
    shipped = (model.card.get("export", {}).get("cpu_variant") or {}).get("shipped")
    if shipped:
        return shipped
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return "int8" if {"QuantizeLinear", "DequantizeLinear", "QLinearConv"} & ops else "ort-offline"


def setup_backend(name: str, ctx: Context) -> Backend:
    """Build one backend or raise Skip(reason)."""
    import torch

    m = ctx.model
    cuda = torch.cuda.is_available()
    if name in ("torch-fp32", "torch-bf16"):
        torch.set_num_threads(ctx.threads)
        bf16 = name == "torch-bf16"
        if bf16 and ctx.skip_emulated_bf16 and bf16_native() is False:
            raise Skip("this CPU has no bf16 instructions (avx512_bf16, amx_bf16): PyTorch would emulate them, tens "
                       "of times slower than fp32, and eat the time budget; `--backends torch-bf16` times it anyway")
        pipe, clf = _torch_calls(m.pipeline, "cpu", torch.bfloat16 if bf16 else None)
        return Backend(name, "cpu", "bf16 autocast" if bf16 else "fp32", "cpu-bf16" if bf16 else "cpu-fp32", pipe, clf,
                       f"PyTorch {torch.__version__} eager, {ctx.threads} threads")
    if name in ("ort-fp32", "ort-opt"):
        from atop_serve.engine import make_session

        if not ctx.onnx.exists():
            raise Skip(f"no {modelio.ONNX_FILE} in {m.folder} (make it with `atop export`)")
        variant = None
        if name == "ort-fp32":
            pipe_path, precision, peak = ctx.onnx, "fp32", "cpu-fp32"
        else:
            from atop_serve.engine import int8_unsafe_here

            variant = opt_variant(m)
            if variant is None:
                raise Skip(f"no {modelio.OPT_ONNX_FILE} in the folder: the export shipped no faster CPU variant "
                           "(card: export.cpu_variant)")
            unsafe = int8_unsafe_here(m.card)
            if unsafe:  # its sums are wrong here, and the service runs the fp32 graph instead: nothing to time
                raise Skip(f"the service does not run {modelio.OPT_ONNX_FILE} on this CPU: {unsafe}")
            pipe_path = m.folder / modelio.OPT_ONNX_FILE
            precision, peak = (("int8 (QDQ: int8 weights, uint8 activations)", "cpu-int8") if variant.startswith("int8")
                               else (f"fp32 ({variant})", "cpu-fp32"))
        import onnxruntime as ort

        pipe_session = make_session(pipe_path, ctx.threads, ("CPUExecutionProvider",))
        clf, note = None, ""
        try:
            clf_path = ctx.classifier_onnx()
            if variant and variant.startswith("int8"):
                import logging

                from export.optimize import build_int8

                root = logging.getLogger()
                level, _ = root.level, root.setLevel(logging.ERROR)  # the quantiser's advice goes to the root logger
                try:
                    clf_path = build_int8(clf_path, ctx.work / "classifier.int8.onnx", ctx.pool[:128], m.rt)
                finally:
                    root.setLevel(level)
            elif variant:
                from export.optimize import build_ort_offline

                clf_path = build_ort_offline(clf_path, ctx.work / "classifier.offline.onnx")
            clf = _ort_classifier_call(make_session(clf_path, ctx.threads, ("CPUExecutionProvider",)))
        except Exception as e:  # noqa: BLE001  (the pipeline is still timed; the classifier cells say why not)
            note = f"bare classifier graph unavailable: {type(e).__name__}: {e}"[:300]
        detail = (f"ONNX Runtime {ort.__version__} CPU, {pipe_path.name}, service session options, {ctx.threads} threads; "
                  f"bare classifier: {ctx.classifier_source or 'none'}"
                  + (", with the same recipe applied" if variant else ""))
        return Backend(name, "cpu", precision, peak, _ort_pipeline_call(pipe_session), clf, detail, classifier_note=note,
                       variant=variant)
    if not cuda:
        raise Skip("no CUDA GPU on this machine (torch.cuda.is_available() is False)")
    if name in ("ort-cuda-fp32", "ort-trt-fp16"):
        import onnxruntime as ort

        want = "CUDAExecutionProvider" if name == "ort-cuda-fp32" else "TensorrtExecutionProvider"
        if want not in ort.get_available_providers():
            raise Skip(f"onnxruntime has no {want} (install onnxruntime-gpu{' with TensorRT' if 'Tensorrt' in want else ''})")
        if not ctx.onnx.exists():
            raise Skip(f"no {modelio.ONNX_FILE} in {m.folder}")
        pipe_s = _gpu_session(ctx, ctx.onnx, name, pipeline=True)
        pipe = _ort_pipeline_call(pipe_s)
        clf = _ort_classifier_call(_gpu_session(ctx, ctx.classifier_onnx(), name, pipeline=False))
        return Backend(name, "cuda", "fp32 (TF32 off)" if name == "ort-cuda-fp32" else "fp16",
                       "cuda-fp32" if name == "ort-cuda-fp32" else "cuda-fp16", pipe, clf,
                       f"ONNX Runtime {ort.__version__}, providers {pipe_s.get_providers()}", warmup=3)
    if name == "torch-trt-fp16":
        from export import tensorrt as trt_export

        reason = trt_export.unavailable_reason()
        if reason:
            raise Skip(reason)
        path = m.folder / modelio.TRT_FILE
        if not path.exists():
            raise Skip(f"no {modelio.TRT_FILE} in the folder (atop export --format all)")
        import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops the saved program uses)

        module = torch.export.load(str(path)).module()
        dev = torch.device("cuda")

        def pipe(x, d):
            with torch.no_grad():
                out = module(torch.from_numpy(x).to(dev), *(torch.from_numpy(d[k]).to(dev) for k in ("u_mask", "z", "u_mix")))
            return out[0].float().cpu().numpy()

        clf_module = _trt_classifier(ctx)

        def clf(x):
            with torch.no_grad():
                return clf_module(torch.from_numpy(x).to(dev)).float().cpu().numpy()

        return Backend(name, "cuda", "fp16 autocast", "cuda-fp16", pipe, clf,
                       f"Torch-TensorRT {trt_export.version()}, {path.name}; bare classifier compiled the same way", warmup=3)
    raise Skip(f"unknown backend {name}")


def _gpu_session(ctx: Context, path: Path, name: str, pipeline: bool):
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if name == "ort-cuda-fp32":
        try:
            return ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", {"use_tf32": "0"})])
        except Exception:  # noqa: BLE001  (older onnxruntime-gpu without the option)
            return ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider"])
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    s = ctx.model.size

    def shapes(n, k):
        rt = ctx.model.rt.input_shapes(n, k)
        dims = {nm: (n, 3, s, s) if nm == "images" else rt[nm] for nm in names}
        return ",".join(f"{nm}:{'x'.join(map(str, dims[nm]))}" for nm in names)

    hi_k = ctx.max_k if pipeline else 1
    opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(ctx.work / "trt"),
            "trt_profile_min_shapes": shapes(1, 1), "trt_profile_opt_shapes": shapes(min(64, ctx.max_batch), 1),
            "trt_profile_max_shapes": shapes(ctx.max_batch, hi_k)}
    return ort.InferenceSession(str(path), so, providers=[("TensorrtExecutionProvider", opts), "CUDAExecutionProvider"])


def _trt_classifier(ctx: Context):
    import copy

    import torch
    import torch_tensorrt

    from export.tensorrt import _precision_kwargs

    s, hi = ctx.model.size, max(2, ctx.max_batch)
    clf = copy.deepcopy(ctx.model.pipeline.classifier).cuda().eval()
    example = torch.rand(2, 3, s, s, device="cuda")
    program = torch.export.export(clf, (example,), dynamic_shapes=({0: torch.export.Dim("N", min=1, max=hi)},))
    spec = torch_tensorrt.Input(min_shape=(1, 3, s, s), opt_shape=(min(64, hi), 3, s, s), max_shape=(hi, 3, s, s),
                                dtype=torch.float32)
    compile_fn = torch_tensorrt.dynamo.compile
    return compile_fn(program, arg_inputs=[spec], min_block_size=1, **_precision_kwargs(compile_fn))


# ------------------------------------------------------------------------------------------ timing
def time_cell(call: Callable, make: Callable[[], tuple], preset: Preset, deadline: float, warmup: int = 2) -> dict:
    """Latencies of ``call`` on fresh inputs: ``warmup`` untimed calls, then enough repeats to fill ``target_s``
    (at least ``min_reps``, or 5 for calls over 0.5 s; at most ``max_reps``); past ``deadline`` it stops after 3."""
    est = 0.0
    for i in range(max(1, warmup)):
        if i and est > 1.0:  # a long call is its own warm-up
            break
        args = make()
        t = time.perf_counter()
        call(*args)
        est = time.perf_counter() - t
    min_reps = preset.min_reps if est < 0.5 else min(preset.min_reps, 5)
    reps = int(min(preset.max_reps, max(min_reps, math.ceil(preset.target_s / max(est, 1e-6)))))
    lat = []
    for i in range(reps):
        if i >= 3 and time.perf_counter() > deadline:
            break
        args = make()
        t = time.perf_counter()
        call(*args)
        lat.append(time.perf_counter() - t)
    return {"reps": len(lat), "warmup": max(1, warmup), **loadgen.latency_summary(lat)}


def model_level(ctx: Context, names, preset: Preset, flops: dict, inputs: Inputs, deadline: float,
                log: Callable) -> dict:
    """Every backend x part x K x batch, batch-major (a budget cut drops the largest batches of every backend):
    backend name -> status, precision, detail and cells (latency summary, images/s, rows/s, GFLOP/s)."""
    backends: dict[str, dict] = {}
    ready: dict[str, Backend] = {}
    for name in names:
        t = time.perf_counter()
        try:
            b = setup_backend(name, ctx)
        except Skip as e:
            backends[name] = {"status": "skipped", "reason": str(e)}
            log(f"  {name}: skipped: {e}")
            continue
        except Exception as e:  # noqa: BLE001  (one backend failing must not end the benchmark)
            backends[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:300]}
            log(f"  {name}: failed: {type(e).__name__}: {e}"[:300])
            continue
        ready[name] = b
        backends[name] = {"status": "ok", "device": b.device, "precision": b.precision, "peak": b.peak,
                          "detail": b.detail, **({"variant": b.variant} if b.variant else {}),
                          "setup_seconds": round(time.perf_counter() - t, 2), "cells": []}
        if b.classifier_note:
            backends[name]["classifier_note"] = b.classifier_note
    plan = [(batch, part, k) for batch in preset.batch_sizes
            for part, k in [("classifier", 1)] + [("pipeline", k) for k in preset.samples]]
    for batch, part, k in plan:
        for name, b in ready.items():
            cell = {"part": part, "k": k, "batch": batch}
            if time.perf_counter() > deadline:
                cell["skipped"] = "time budget"
                backends[name]["cells"].append(cell)
                continue
            fn = b.pipeline if part == "pipeline" else b.classifier
            if fn is None:
                cell["skipped"] = b.classifier_note or "not available"
                backends[name]["cells"].append(cell)
                continue
            try:
                cell.update(time_cell(fn, lambda: inputs(part, batch, k), preset, deadline, b.warmup))
            except Exception as e:  # noqa: BLE001  (e.g. a shape beyond a TensorRT profile)
                cell["error"] = f"{type(e).__name__}: {e}"[:300]
                backends[name]["cells"].append(cell)
                log(f"  {name} {part} K={k} batch {batch}: error {cell['error'][:120]}")
                continue
            p50 = cell["p50_ms"] / 1000
            cell["images_per_s"] = round(batch / p50, 1)
            cell["rows_per_s"] = round(batch * k / p50, 1)
            cell["gflops_per_s"] = round(cell["images_per_s"] * flops_of(flops, part, k) / 1e9, 2)
            backends[name]["cells"].append(cell)
            log(f"  {name:>14} {part:>10} K={k} batch {batch:>3}: p50 {cell['p50_ms']:8.2f} ms  p99 "
                f"{cell['p99_ms']:8.2f} ms  {cell['images_per_s']:8.1f} img/s  ({cell['reps']} reps)")
    return backends


def apply_peaks(backends: dict, peaks: dict) -> None:
    """Each measured cell's GFLOP/s as a fraction of the matmul peak in its backend's precision."""
    for b in backends.values():
        peak = (peaks.get(b.get("peak")) or {}).get("gflops_per_s")
        for c in b.get("cells", []):
            if "gflops_per_s" in c:
                c["peak_fraction"] = round(c["gflops_per_s"] / peak, 4) if peak else None


def best_peaks(first: dict, second: dict) -> dict:
    """Peaks measured before and after the model level: the better of the two per kind (a busy moment only lowers
    a measurement), both recorded."""
    out = {}
    for kind in first.keys() | second.keys():
        a, b = first.get(kind) or {}, second.get(kind) or {}
        best = max((a, b), key=lambda v: v.get("gflops_per_s") or 0)
        out[kind] = {**best, "measurements": [a.get("gflops_per_s"), b.get("gflops_per_s")]}
    return out


def _cells(backend: dict, part: str, k: int | None = None) -> list[dict]:
    return [c for c in backend.get("cells", []) if c["part"] == part and (k is None or c["k"] == k) and "p50_ms" in c]


def summarize_model_level(backends: dict) -> dict:
    """Best throughput per backend (pipeline, K = 1), the best CPU and overall, and the purification overhead."""
    best_per: dict[str, dict] = {}
    overhead: dict[str, dict] = {}
    for name, b in backends.items():
        pipe = _cells(b, "pipeline", 1)
        if pipe:
            c = max(pipe, key=lambda c: c["images_per_s"])
            best_per[name] = {"backend": name, "device": b["device"], "batch": c["batch"],
                              "images_per_s": c["images_per_s"], "p50_ms": c["p50_ms"], "peak_fraction": c["peak_fraction"]}
        clf = {c["batch"]: c for c in _cells(b, "classifier")}
        rows = {}
        for c in _cells(b, "pipeline"):
            if c["batch"] in clf:
                rows.setdefault(str(c["batch"]), {})[f"k{c['k']}"] = round(c["p50_ms"] / clf[c["batch"]]["p50_ms"], 3)
        if rows:
            overhead[name] = rows
    cpu = [v for v in best_per.values() if v["device"] == "cpu"]
    return {"best_per_backend": best_per, "best_cpu": max(cpu, key=lambda v: v["images_per_s"]) if cpu else None,
            "best": max(best_per.values(), key=lambda v: v["images_per_s"]) if best_per else None,
            "overhead": overhead,
            "overhead_definition": "p50 latency of the purified pipeline / p50 latency of the bare classifier (same "
                                   "backend, same batch of images; K samples = K purifications and K classifications)"}


def rt_draw_cost(rt: RTConfig, rows: int = 64, reps: int = 5) -> dict:
    """What drawing the RT inputs costs, outside the timed model calls: one batched draw, and the service's per-row
    draws (a 128-bit seed per row from OS entropy, then one generator per row)."""
    from atop_serve.engine import row_seeds, rows_draws

    def best(fn):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    batched = best(lambda: draw_rt_inputs_numpy(rt, rows, 1))
    per_row = best(lambda: rows_draws(rt, row_seeds(None, rows)))
    return {"rows": rows, "batched_us_per_row": round(1e6 * batched / rows, 2),
            "service_us_per_row": round(1e6 * per_row / rows, 2)}


# ------------------------------------------------------------------------------------------ profiles
LAYOUT = "layout conversions (inserted by ONNX Runtime)"
UNATTRIBUTED = "unattributed"


def graph_components(path: Path, known: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Node name -> component (purifier, classifier, RT and glue) and tensor name -> the component of the node
    producing it, from the exporter's module-scope metadata (``namespace``). A node without it (the exporter's own
    decompositions, every node of a quantised copy) takes the component of its first input tensor that has one,
    looked up in ``known`` (another graph's tensors) too, so components propagate along the graph."""
    import onnx

    nodes, tensors = {}, dict(known or {})
    for node in onnx.load(str(path), load_external_data=False).graph.node:  # topologically sorted
        ns = next((p.value for p in node.metadata_props if p.key == "namespace"), None)
        if ns is not None:
            scope = ns.split("/")[1].split(":")[0] if "/" in ns else ""
            comp = ("purifier" if scope.endswith("purifier") else "classifier" if scope.endswith("classifier")
                    else "RT and glue")
        else:
            comp = next((c for c in (_lookup(t, tensors) for t in node.input if t) if c), None)
        if comp is None:
            continue
        nodes[node.name] = comp
        for t in node.output:
            tensors.setdefault(t, comp)
    return nodes, tensors


_SUFFIX = re.compile(r"(_token_\d+|/duplicated|_nchwc|_QuantizeLinear|_DequantizeLinear|_Output|_quantized|_q|_dq)$")


def _lookup(name: str, table: dict[str, str]) -> str | None:
    """``table[name]``, else after removing the suffixes ONNX Runtime's rewrites and the quantiser add one by one."""
    while True:
        if name in table:
            return table[name]
        stripped = _SUFFIX.sub("", name)
        if stripped == name:
            return None
        name = stripped


def _component(name: str, nodes: dict[str, str], tensors: dict[str, str]) -> str:
    """The component of a node ONNX Runtime profiled: by its name (as a node, or as the tensor it was made for,
    once rewrite suffixes are removed); fused constants keep the module path in their names."""
    comp = _lookup(name, nodes) or _lookup(name, tensors)
    if comp:
        return comp
    for part in ("purifier", "classifier"):
        if f"pipeline.{part}" in name:
            return part
    if name.startswith(("Reorder", "Transpose")):
        return LAYOUT
    return UNATTRIBUTED


def ort_profile(path: Path, inputs: Inputs, batch: int, threads: int, work: Path, reps: int = 5) -> dict:
    """ONNX Runtime's own profile of the pipeline graph at ``batch`` (K = 1): kernel time per operator type and per
    model component (purifier, classifier, RT and glue), as shares of the summed kernel time."""
    import onnxruntime as ort

    from atop_serve.engine import feed_for

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(work / f"ort-profile-{path.stem}")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    x, d = inputs("pipeline", batch, 1)
    sess.run(["probs"], feed_for(names, x, d))
    wall = []
    for _ in range(reps):
        x, d = inputs("pipeline", batch, 1)
        t = time.perf_counter()
        sess.run(["probs"], feed_for(names, x, d))
        wall.append(time.perf_counter() - t)
    events = json.loads(Path(sess.end_profiling()).read_text())
    fp32 = path.parent / modelio.ONNX_FILE  # a quantised copy lost the metadata: map its nodes through the fp32 graph
    nodes, tensors = graph_components(fp32) if fp32.exists() else ({}, {})
    own_nodes, own_tensors = graph_components(path, tensors)
    nodes, tensors = {**own_nodes, **nodes}, {**own_tensors, **tensors}
    by_op: dict[str, float] = {}
    by_comp: dict[str, float] = {}
    total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        dur = float(e.get("dur", 0))
        op = e.get("args", {}).get("op_name", "?")
        node = e["name"][: -len("_kernel_time")]
        by_op[op] = by_op.get(op, 0.0) + dur
        comp = _component(node, nodes, tensors)
        by_comp[comp] = by_comp.get(comp, 0.0) + dur
        total += dur
    runs = reps + 1
    share = lambda d: [{"name": k, "share": round(v / total, 4), "ms_per_call": round(v / 1000 / runs, 3)}  # noqa: E731
                       for k, v in sorted(d.items(), key=lambda kv: -kv[1])] if total else []
    return {"tool": f"onnxruntime {ort.__version__} profiler (enable_profiling)", "graph": path.name, "batch": batch,
            "k": 1, "calls": runs, "wall_ms_p50": round(1000 * loadgen.percentile(wall, 50), 3),
            "kernel_ms_per_call": round(total / 1000 / runs, 3), "by_op_type": share(by_op)[:12],
            "by_component": share(by_comp)}


def torch_profile(backend: Backend, inputs: Inputs, batch: int, reps: int = 3) -> dict:
    """torch.profiler: self CPU time per aten operator for the eager pipeline at ``batch`` (K = 1)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    x, d = inputs("pipeline", batch, 1)
    backend.pipeline(x, d)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            x, d = inputs("pipeline", batch, 1)
            backend.pipeline(x, d)
    avgs = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in avgs)
    top = sorted(avgs, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"tool": f"torch.profiler ({torch.__version__})", "backend": backend.name, "batch": batch, "k": 1,
            "calls": reps, "by_op_type": [{"name": e.key, "share": round(e.self_cpu_time_total / total, 4),
                                           "ms_per_call": round(e.self_cpu_time_total / 1000 / reps, 3)} for e in top]}


# ------------------------------------------------------------------------------------------ HTTP level
def http_level(cfg: BenchConfig, preset: Preset, folder: Path, work: Path, deadline: float, model_rows_per_s: dict,
               log: Callable) -> dict:
    """Start a server per batching candidate (or use ``cfg.url``), drive it at each concurrency, choose the batching."""
    from atop_serve import settings as settings_mod

    extra = cfg.server_env()
    defaults = settings_mod.Settings.from_env(extra)
    payloads, source = loadgen.load_images(cfg.data, n=preset.http_images, seed=cfg.seed)
    out: dict = {"images": source, "endpoint": "/classify", "samples": 1, "client": "training.loadgen (aiohttp.ClientSession, "
                 "one task per in-flight request, on this machine: it shares the CPU with the server)", "runs": [],
                 "settings": extra}
    candidates = [None] if cfg.url else list(preset.batching or (defaults.max_batch_size,))
    latency_ms = defaults.max_latency_ms
    levels = list(preset.concurrency)
    for i, mbs in enumerate(candidates):
        left = deadline - time.perf_counter()
        need = 10 + 3 * len(levels)
        if left < need:
            out["runs"].append({"max_batch_size": mbs, "skipped": f"time budget ({left:.0f} s left, about {need} s needed)"})
            continue
        run: dict = {"max_batch_size": mbs, "max_latency_ms": latency_ms if mbs else None, "levels": []}
        env = {"ATOP_MAX_LATENCY_MS": str(latency_ms), **extra, "ATOP_MAX_BATCH_SIZE": str(mbs)} if mbs else {}
        try:
            if cfg.url:
                run["server"] = _server_info(cfg.url)
                run["levels"] = _drive_levels(cfg.url, payloads, levels, preset, deadline, len(candidates) - i, log,
                                              _workers(run["server"]))
                run["max_batch_size"] = run["server"].get("batching", {}).get("max_batch_size")
                run["max_latency_ms"] = run["server"].get("batching", {}).get("max_latency_ms")
            else:
                log_path = work / f"serve-batch{mbs}.log"
                with loadgen.serve(folder, env, log=log_path, ready_timeout_s=120) as server:
                    run["startup_s"] = round(server.startup_s, 2)
                    run["server"] = _server_info(server.url)
                    log(f"  server up in {server.startup_s:.1f} s (ATOP_MAX_BATCH_SIZE={mbs}, "
                        f"ATOP_MAX_LATENCY_MS={latency_ms})")
                    run["levels"] = _drive_levels(server.url, payloads, levels, preset, deadline,
                                                  len(candidates) - i, log, _workers(run["server"]), server.pid)
                run["server_log_tracebacks"] = log_path.read_text(errors="replace").count("Traceback")
        except AtopError as e:
            run["error"] = str(e)[-1500:]
            log(f"  server with max_batch_size {mbs}: {str(e).splitlines()[0]}")
        out["runs"].append(run)
    card = json.loads((folder / modelio.CARD).read_text()) if (folder / modelio.CARD).exists() else {}
    k_default = defaults.default_samples or min(modelio.default_samples(card), defaults.max_samples)
    out["choice"] = choose_batching(out["runs"], defaults, model_rows_per_s, k_default)
    return out


def _server_info(url: str) -> dict:
    import httpx

    try:
        meta = httpx.get(url + "/metadata", timeout=30, trust_env=False).json()["serving"]
        return {k: meta.get(k) for k in ("backend", "providers", "batching", "limits", "versions", "fast_path")}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def _workers(info: dict) -> int:
    """The serving processes a server reports in /metadata (serving.batching.workers; 1 if it does not say)."""
    return int((info.get("batching") or {}).get("workers") or 1)


def _drive_levels(url, payloads, levels, preset: Preset, deadline: float, runs_left: int, log,
                  workers: int = 1, server_pid: int | None = None) -> list[dict]:
    """Warm up, then each concurrency level in turn; with the server's own account of each level (/metrics) and,
    for a server this run started, the CPU its processes used (cores busy)."""
    warm = loadgen.run_load(url, payloads, min(8, max(levels)), 16, 10.0, seed=1)  # first requests start lazily
    log(f"    warm-up: {warm.ok}/{warm.sent} ok")
    out = []
    for j, c in enumerate(levels):
        left = deadline - time.perf_counter()
        share = left / max(1, (len(levels) - j) + (runs_left - 1) * len(levels))
        secs = max(1.0, min(preset.level_seconds, share - 1.0))
        if left < 2:
            out.append({"concurrency": c, "skipped": "time budget"})
            continue
        before = loadgen.server_metrics(url)
        t0 = time.perf_counter()
        cpu0 = loadgen.tree_cpu_seconds(server_pid) if server_pid else None
        r = loadgen.run_load(url, payloads, c, max(preset.requests, c), secs, seed=c).to_dict()
        cpu1 = loadgen.tree_cpu_seconds(server_pid) if server_pid else None
        span = time.perf_counter() - t0  # the CPU readings' own span: the load's wall_s leaves out its start and end
        r["server"] = _server_side(loadgen.metrics_delta(before, loadgen.server_metrics(url)), r["wall_s"], workers)
        if r["server"] is not None and cpu0 is not None and cpu1 is not None and span > 0:
            r["server"]["server_cpu"] = round((cpu1 - cpu0) / span, 3)
        out.append(r)
        lat = r["latency_ok"]
        log(f"    concurrency {c:>3}: {r['requests_per_s']:7.1f} req/s  p50 {lat['p50_ms'] or 0:8.1f} ms  p99 "
            f"{lat['p99_ms'] or 0:8.1f} ms  errors {r['errors']}/{r['sent']}"
            + (f" {r['error_kinds']}" if r["errors"] else ""))
    return out


def _server_side(delta: dict | None, wall_s: float, workers: int) -> dict | None:
    """The server's account of a level plus how busy the model was: the time its workers' model threads spent in
    model calls over the level's wall time, per worker (1.0: every worker's model never idle)."""
    if not delta:
        return None
    delta["workers"] = workers
    if wall_s > 0:
        delta["model_busy_share"] = round(delta["model_seconds"] / wall_s / workers, 3)
    return delta


def _interpolate_log(by_batch: dict, batch: float) -> float:
    """A rate measured at some batch sizes, at another: linear in log(batch) between the nearest two, clamped."""
    xs = sorted(by_batch)
    if batch <= xs[0] or len(xs) == 1:
        return by_batch[xs[0]]
    if batch >= xs[-1]:
        return by_batch[xs[-1]]
    hi = next(i for i, x in enumerate(xs) if x >= batch)
    x0, x1 = xs[hi - 1], xs[hi]
    w = (math.log(batch) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return by_batch[x0] + w * (by_batch[x1] - by_batch[x0])


def _level(run: dict, c: int) -> dict | None:
    done = [lv for lv in run.get("levels", []) if "requests_per_s" in lv]
    if not done:
        return None
    exact = [lv for lv in done if lv["concurrency"] == c]
    return exact[0] if exact else min(done, key=lambda lv: abs(lv["concurrency"] - c))


TIE = 0.05  # request rates within 5 % of the best count as equal (level-to-level noise on a shared machine)


def choose_batching(runs: list[dict], defaults, model_rows_per_s: dict, k_default: int = 1) -> dict:
    """The batching setting to ship, from the runs. max_batch_size: among the candidates with the fewest errors, those
    within ``TIE`` of the highest requests/s at concurrency 32 are equal, and the largest of them wins (a request
    at the service's default K brings K rows: larger batches serve it better). max_latency_ms: from the measured
    tail, scaled from the measured K = 1 requests to the default K's, and the largest legal request."""
    c = BARS["http_concurrency"]
    scored = []
    for run in runs:
        lv = _level(run, c)
        if lv is None:
            continue
        errors = sum(level.get("errors", 0) for level in run["levels"])
        scored.append((errors, lv["requests_per_s"], run, lv))
    if not scored:
        return {"max_batch_size": None, "max_latency_ms": None, "why": "no HTTP run finished"}
    fewest = min(t[0] for t in scored)
    best_rps = max(t[1] for t in scored if t[0] == fewest)
    tied = [t for t in scored if t[0] == fewest and t[1] >= (1 - TIE) * best_rps]
    errors, rps, run, lv = max(tied, key=lambda t: t[2]["max_batch_size"] or 0)
    mbs = run["max_batch_size"]
    worst_p99 = max((level["latency_ok"]["p99_ms"] or 0) for level in run["levels"] if "latency_ok" in level)
    rows = defaults.max_images * defaults.max_samples
    rows_per_s = (_interpolate_log(model_rows_per_s, mbs or max(model_rows_per_s)) if model_rows_per_s
                  else lv["requests_per_s"])  # model calls of max_batch_size rows, at the model-level fp32 rate
    biggest_ms = 1000.0 * rows / rows_per_s if rows_per_s else 0.0
    latency = int(math.ceil(max(2 * worst_p99 * k_default, 1.5 * biggest_ms, 1000) / 100.0) * 100)
    others = ", ".join(f"{t[2]['max_batch_size']}: {t[1]:.0f} req/s" + (f" ({t[0]} errors)" if t[0] else "")
                       for t in scored if t[2] is not run)
    if len(scored) == 1:
        how = "requests/s"
    elif len(tied) > 1:
        how = (f"the largest of the candidates within {100 * TIE:.0f} % of the most requests/s (larger batches serve "
               f"requests of K = {k_default} samples, the default, better)")
    else:
        how = "the most requests/s"
    why = (f"max_batch_size {mbs}: {how} at concurrency {lv['concurrency']} ({rps:.0f} req/s, {errors} errors)"
           + (f" against {others}" if others else " (the only candidate run)")
           + f". max_latency_ms {latency}: it is the batcher's queueing deadline (503 beyond), so it is set to the "
           f"largest of 2 x the worst p99 seen in these runs ({worst_p99:.0f} ms) x {k_default} (the runs post K = 1 "
           f"requests; the default is K = {k_default}), 1.5 x the time of the largest legal request "
           f"({defaults.max_images} images x {defaults.max_samples} samples = {rows} rows at about {rows_per_s:.0f} "
           f"rows/s = {biggest_ms:.0f} ms) and 1 s.")
    return {"max_batch_size": mbs, "max_latency_ms": latency, "why": why, "errors": errors,
            "requests_per_s_at_32": rps, "worst_p99_ms": worst_p99, "default_samples": k_default,
            "largest_request_ms": round(biggest_ms, 1)}


# ------------------------------------------------------------------------------------------ bars, advice
def evaluate_bars(report: dict) -> list[dict]:
    ml, http = report.get("model_level") or {}, report.get("http") or {}
    cores = report["machine"].get("cores")
    note = "" if cores == BARS["cores"] else f" (bars are set for {BARS['cores']} cores; this machine has {cores})"
    bars = []
    best_cpu = ml.get("best_cpu")
    bars.append({"bar": "purified classification, best CPU backend, best batch (K = 1)",
                 "target": f">= {BARS['throughput_images_per_s']:.0f} images/s",
                 "value": best_cpu["images_per_s"] if best_cpu else None,
                 "detail": (f"{best_cpu['backend']} at batch {best_cpu['batch']}" if best_cpu else "not measured") + note,
                 "passed": None if not best_cpu else best_cpu["images_per_s"] >= BARS["throughput_images_per_s"]})
    ratio, detail = None, "not measured"
    if best_cpu:
        rows = ml.get("overhead", {}).get(best_cpu["backend"], {})
        if rows:
            b = min((int(k) for k in rows), key=lambda v: abs(v - BARS["overhead_at_batch"]))
            ratio = rows[str(b)].get("k1")
            detail = f"{best_cpu['backend']}, batch {b}, K = 1" + ("" if b == BARS["overhead_at_batch"] else " (nearest batch measured)")
    bars.append({"bar": f"purification overhead at batch {BARS['overhead_at_batch']}", "target": f"<= {BARS['overhead_max']}",
                 "value": ratio, "detail": detail + note, "passed": None if ratio is None else ratio <= BARS["overhead_max"]})
    share, value, detail = None, None, "not measured"
    choice = http.get("choice") or {}
    best = ml.get("best")
    run = next((r for r in http.get("runs", []) if r.get("max_batch_size") == choice.get("max_batch_size")), None)
    lv = _level(run, BARS["http_concurrency"]) if run else None
    if lv and best:
        share = lv["requests_per_s"] / best["images_per_s"]
        value = round(share, 3)
        detail = (f"{lv['requests_per_s']:.0f} req/s at concurrency {lv['concurrency']} (max_batch_size "
                  f"{run['max_batch_size']}) vs {best['images_per_s']:.0f} images/s ({best['backend']}, batch "
                  f"{best['batch']}); {lv['errors']} errors of {lv['sent']}")
    bars.append({"bar": f"HTTP at concurrency {BARS['http_concurrency']}",
                 "target": f">= {100 * BARS['http_share_min']:.0f} % of the best model-level throughput, 0 errors",
                 "value": value, "detail": detail + note,
                 "passed": None if share is None else (share >= BARS["http_share_min"] and lv["errors"] == 0)})
    return bars


def suggestions(report: dict) -> list[str]:
    """Where the time goes and what would help, for each missed bar, from this run's numbers."""
    out = []
    bars = {b["bar"].split(",")[0].split(" at ")[0]: b for b in report["bars"]}
    ref, ml = report["reference"], report.get("model_level") or {}
    flops, peaks = ref["flops"], ref["peaks"]
    prof = report.get("profile") or {}
    share = lambda items, n=None: ", ".join(f"{o['name']} {100 * o['share']:.0f} %" for o in items[:n])  # noqa: E731
    where = ""
    if prof.get("by_op_type"):
        where = (f"Profile of {prof.get('backend')} at batch {prof.get('batch')} ({prof.get('tool', '')}): "
                 + (f"by component {share(prof['by_component'])}; " if prof.get("by_component") else "")
                 + f"by operator {share(prof['by_op_type'], 5)}.")
    thr = bars.get("purified classification")
    if thr and thr["passed"] is False:
        best = ml["best_cpu"]
        per_image = flops["pipeline"] / 1e9
        need = BARS["throughput_images_per_s"] * per_image
        floors = []
        for key in ("cpu-fp32", "cpu-bf16", "cpu-int8"):
            pk = (peaks.get(key) or {}).get("gflops_per_s")
            if pk:
                floors.append(f"{key} {pk / per_image:,.0f} images/s" + (" (below the bar)" if pk < need else ""))
        text = [f"Throughput: {best['images_per_s']:,.0f} images/s ({best['backend']}, batch {best['batch']}) uses "
                f"{100 * (best['peak_fraction'] or 0):.0f} % of this machine's matmul peak in its precision; "
                f"{BARS['throughput_images_per_s']:.0f} images/s needs {need:,.0f} GFLOP/s ({per_image:.3f} GFLOPs per "
                f"image). Compute floors (every FLOP at peak): {'; '.join(floors)}."]
        if where:
            text.append(where)
        passes = flops.get("tta_passes") or 1
        if passes > 1:
            text.append(f"The classifier's {passes} test-time-augmentation passes ({flops['tta']}) are "
                        f"{100 * flops['classifier'] / flops['pipeline']:.0f} % of the FLOPs: tta 'none' in the card "
                        f"divides that part by {passes} (re-check robust accuracy with atop eval).")
        fixes = []
        if not ml["backends"].get(best["backend"], {}).get("precision", "").startswith("int8"):
            fixes.append("ship the int8 variant (atop export builds it; its accuracy gate decides; the int8 peak is "
                         "the highest on AVX-512 VNNI / AMX CPUs)")
        fixes += ["serve at the best batch size measured here (max_batch_size)",
                  "let ONNX Runtime apply ORT_ENABLE_ALL (NCHWc layouts; machine-specific, so online at session start)",
                  "a narrower purifier or classifier (retrain) where the floor itself is below the bar"]
        text.append("To try, cheapest first: " + "; ".join(fixes) + ".")
        out.append(" ".join(text))
    ovh = bars.get("purification overhead")
    if ovh and ovh["passed"] is False:
        best_name = (ml.get("best_cpu") or {}).get("backend", "")
        best = ml["backends"].get(best_name, {})
        is_int8, variant = best.get("precision", "").startswith("int8"), best.get("variant") or ""
        tries = [] if is_int8 else ["int8 for the purifier's convolutions"]
        if not variant.startswith("int8-full"):
            tries.append("the gating on uint8 too (the export's int8-full variants, with a LeakyReLU purifier: ELU has "
                         "no quantised kernel)")
        tries += ["a purifier without full-resolution layers (its 32x32 layers have few channels, and its 3-channel "
                  "output convolution fills a sixteenth of the CPU's 16-channel blocks in fp32 and runs no faster in "
                  "int8: the `gated-unet-s2d` design of docs/model.md, \"Toward the overhead bar\", retrained or distilled)",
                  "fewer or narrower dilated layers",
                  "a larger batch (small batches leave the cores idle between layers)"]
        out.append(
            f"Purification overhead {ovh['value']:.2f} ({ovh['detail']}): the purifier is "
            f"{100 * flops['purifier'] / flops['pipeline']:.0f} % of the pipeline's FLOPs, so an overhead above "
            f"{flops['pipeline'] / flops['classifier']:.2f} means its kernels run less efficiently than the "
            "classifier's: gated convolutions (activation x sigmoid on twice the channels), dilated convolutions and small "
            "channel counts at 32x32. " + (where + " " if where else "")
            + (f"The graph measured is the export's `{variant}` variant. " if variant else "")
            + "To try: " + "; ".join(tries) + ".")
    http_bar = bars.get("HTTP")
    if http_bar and http_bar["passed"] is False:
        draw = ref.get("rt_draws") or {}
        name = served_backend(ml)
        served = (ml.get("best_per_backend") or {}).get(name)
        graph = "pipeline.opt.onnx (the shipped faster variant)" if name == "ort-opt" else "pipeline.onnx (fp32)"
        out.append(
            f"HTTP: {http_bar['detail']}."
            + (f" The service runs {graph}, whose model-level best is {served['images_per_s']:,.0f} "
               f"images/s (batch {served['batch']})." if served else "")
            + _server_split(report)
            + " Per request the server runs BentoML's middleware (metrics, tracing, access log, limits) and API layer, "
              "parses a multipart body, decodes a JPEG, draws 128-bit seeds and RT inputs per row "
              f"({draw.get('service_us_per_row', '?')} us per row, vs {draw.get('batched_us_per_row', '?')} us drawn "
              "batched) and waits for its worker's batcher; the load generator runs on the same cores. To try: the "
              "load generator on another machine, ATOP_ACCESS_LOG=0, per-call instead of per-row draws, and "
              "/classify_batch for clients with several images.")
    return out


def _server_split(report: dict) -> str:
    """One sentence on where an HTTP request's time went at the bar's concurrency, from the server's /metrics."""
    http = report.get("http") or {}
    choice = http.get("choice") or {}
    run = next((r for r in http.get("runs", []) if r.get("max_batch_size") == choice.get("max_batch_size")), None)
    lv = _level(run, BARS["http_concurrency"]) if run else None
    sv = (lv or {}).get("server")
    if not sv or not sv.get("request_mean_ms"):
        return ""
    busy = sv.get("model_busy_share")
    text = (f" At concurrency {lv['concurrency']} the client saw p50 {lv['latency_ok']['p50_ms']:.0f} ms; inside the "
            f"server a request took {sv['request_mean_ms']:.0f} ms on average; the {sv.get('workers', 1)} worker(s) made "
            f"{sv['model_calls']} model calls of {sv['rows_per_call']} rows, {_f(sv.get('call_mean_ms'))} ms each, after "
            f"{_f(sv.get('queue_mean_ms'))} ms of queueing.")
    if busy is not None:
        text += f" The model threads were busy {100 * busy:.0f} % of the time: " + (
            "the bottleneck is outside the model (request handling, transport, the client)." if busy < 0.5 else
            "they were rarely idle, and their calls share the cores with the request handling (a call's time includes "
            "waiting for a core), so both count." if busy > 0.8 else
            "both the model and the request handling around it count.")
    if sv.get("server_cpu") is not None:
        text += (f" The server's processes used {100 * sv['server_cpu']:.0f} % of a core in all (the machine has "
                 f"{os.cpu_count()} cores)")
        text += (f" and the load generator {100 * lv['client_cpu']:.0f} %." if lv.get("client_cpu") is not None else ".")
    elif lv.get("client_cpu") is not None:
        text += f" The load generator itself used {100 * lv['client_cpu']:.0f} % of a core."
    return text


# ------------------------------------------------------------------------------------------ entry point
def run_bench(cfg: BenchConfig, log: Callable = print) -> dict:
    cfg.validate()
    preset = cfg.preset()
    clock = Clock(preset.budget_s)
    folder = modelio.resolve(None if cfg.model in ("", "default") else cfg.model)
    import torch

    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    machine = machine_info()
    meter = CpuMeter()
    log(f"atop bench ({'quick' if cfg.quick else 'full'}): {folder} on {machine['cpu']}, {machine['cores']} cores, "
        f"budget {preset.budget_s:.0f} s")
    model = load_model(folder)
    report: dict = {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": cfg.command, "mode": "quick" if cfg.quick else "full", "machine": machine}
    report["model"] = {"folder": str(folder), "name": model.card.get("name"), "classes": len(model.card["classes"]),
                       "classifier": model.card["classifier"].get("arch"), "tta": model.tta,
                       "purifier": model.card["purifier"].get("arch"), "rt": model.rt.to_dict(), "weights": model.weights,
                       "files": sorted(p.name for p in folder.iterdir() if p.suffix in (".onnx", ".ep", ".safetensors"))}
    report["config"] = {**{k: v for k, v in asdict(preset).items()}, "threads": threads, "seed": cfg.seed,
                        "backends_requested": list(cfg.backends) or "all", "url": cfg.url, "http": cfg.http}
    with tempfile.TemporaryDirectory(prefix="atop-bench-") as tmp:
        work = Path(tmp)
        pool, pool_source = image_pool(cfg.data, preset.pool, model.size, cfg.seed)
        inputs = Inputs(pool, model.rt, cfg.seed)
        log("reference: FLOPs, matmul peaks, RT draw cost")
        flops = count_flops(model, preset.samples)
        names = list(cfg.backends) or list(BACKENDS)
        skip_bf16 = "torch-bf16" not in cfg.backends and bf16_native() is False  # see setup_backend
        kinds = ["cpu-fp32"] + ([] if skip_bf16 else ["cpu-bf16"]) + ["cpu-int8"] \
            + (["cuda-fp32", "cuda-fp16"] if torch.cuda.is_available() else [])
        peak_s = 0.5 if cfg.quick else 1.5
        peaks_before = matmul_peaks(kinds, preset.peak_n, threads, peak_s)
        report["reference"] = {
            "flops": flops, "rt_draws": rt_draw_cost(model.rt),
            "floor_definition": "peak / pipeline FLOPs per image (K = 1): the images/s if every FLOP ran at the matmul peak",
            "diffpure": {**DIFFPURE, "ratio_to_atop": round(DIFFPURE["gflops_per_image"] * 1e9 / flops["pipeline"], 1)}}
        report["inputs"] = {"pool": pool_source, "per_repeat": "a random choice of pool images and fresh RT draws "
                            "(draw_rt_inputs_numpy) for every timed call; draws made outside the timer"}
        ctx = Context(model, work, threads, max(preset.batch_sizes), max(preset.samples), pool, log, skip_bf16)
        log(f"model level: {', '.join(names)}; batch {list(preset.batch_sizes)}, K {list(preset.samples)}")
        model_deadline = clock.at(preset.model_share if cfg.http else 0.9)
        backends = model_level(ctx, names, preset, flops, inputs, model_deadline, log)
        peaks = best_peaks(peaks_before, matmul_peaks(kinds, preset.peak_n, threads, peak_s))
        apply_peaks(backends, peaks)
        report["reference"]["peaks"] = peaks
        report["reference"]["floor"] = {
            k: {"images_per_s": round(v["gflops_per_s"] * 1e9 / flops["pipeline"], 1),
                "ms_per_image": round(1000 * flops["pipeline"] / (v["gflops_per_s"] * 1e9), 4)}
            for k, v in peaks.items() if v.get("gflops_per_s")}
        report["model_level"] = {"backends": backends, **summarize_model_level(backends)}
        if any((c.get("peak_fraction") or 0) > 1 for b in backends.values() for c in b.get("cells", [])):
            report.setdefault("notes", []).append(
                "some cells exceed the measured matmul peak of their precision: a peak measurement was disturbed "
                "(busy machine) or the model's kernels beat the plain matmul used as reference; read the fractions "
                "of peak with care")
        report["profile"] = _profile(report, ctx, inputs, preset, log)
        report["http"] = None
        if cfg.http:
            log("HTTP level")
            rows_per_s = _ort_rows_per_s(report["model_level"])
            report["http"] = http_level(cfg, preset, folder, work, clock.at(0.95), rows_per_s, log)
            best = report["model_level"].get("best")
            for run in report["http"]["runs"]:
                for lv in run.get("levels", []):
                    if "requests_per_s" in lv and best:
                        lv["share_of_best_model_level"] = round(lv["requests_per_s"] / best["images_per_s"], 4)
        machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        machine["cpu_during_run"] = meter.result()
        report["busy"] = busy_note(machine)
        report["bars"] = evaluate_bars(report)
        report["suggestions"] = suggestions(report)
        report["wall_seconds"] = round(clock.elapsed(), 1)
    return report


def served_backend(ml: dict) -> str:
    """The backend the service runs on this CPU machine: the shipped faster variant (ATOP_GRAPH=auto picks
    pipeline.opt.onnx on the CPU provider) when it was measured, else pipeline.onnx (fp32)."""
    return "ort-opt" if ml["backends"].get("ort-opt", {}).get("status") == "ok" else "ort-fp32"


def _ort_rows_per_s(ml: dict) -> dict:
    """The served backend's pipeline K = 1 rows/s by batch size: sizes the largest-request estimate behind the
    batching deadline."""
    b = ml["backends"].get(served_backend(ml), {})
    return {c["batch"]: c["rows_per_s"] for c in _cells(b, "pipeline", 1)}


def _profile(report: dict, ctx: Context, inputs: Inputs, preset: Preset, log: Callable) -> dict | None:
    """Where the time goes, for the best CPU backend at the overhead bar's batch size (or the nearest measured)."""
    best = report["model_level"].get("best_cpu")
    if not best:
        return None
    batch = min(preset.batch_sizes, key=lambda v: abs(v - BARS["overhead_at_batch"]))
    name = best["backend"]
    try:
        if name.startswith("ort"):
            path = ctx.model.folder / (modelio.ONNX_FILE if name == "ort-fp32" else modelio.OPT_ONNX_FILE)
            prof = ort_profile(path, inputs, batch, ctx.threads, ctx.work)
        else:
            prof = torch_profile(setup_backend(name, ctx), inputs, batch)
        prof["backend"] = name
        log(f"profile of {name} at batch {batch}: " + ", ".join(f"{o['name']} {100 * o['share']:.0f} %"
                                                               for o in prof["by_op_type"][:5]))
        return prof
    except Exception as e:  # noqa: BLE001
        return {"backend": name, "error": f"{type(e).__name__}: {e}"[:300], "by_op_type": []}


# ------------------------------------------------------------------------------------------ report files
def write_report(report: dict, out: Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if plot_latency(report, out / "latency_vs_batch.png"):
        images.append("latency_vs_batch.png")
    if plot_http(report, out / "throughput_vs_concurrency.png"):
        images.append("throughput_vs_concurrency.png")
    report["files"] = ["report.json", "report.md", *images]
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(markdown(report, images))  # links relative to report.md itself
    return {"out": str(out), "files": report["files"]}


def _f(v, digits: int = 1, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    return f"{v}{unit}"


def markdown(r: dict, images: list[str]) -> str:
    m, ref, ml = r["machine"], r["reference"], r.get("model_level") or {}
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of " + ", ".join(CPU_FLAGS)
    v = m.get("versions", {})
    L = [f"## Benchmark results: `{r['model']['name']}` on {m['cpu']} ({r['mode']} run, {r['created'][:10]})", ""]
    if r["mode"] == "quick":
        L += ["> **Quick run** (`--quick`): small sizes and few repeats, a smoke test; not numbers to publish.", ""]
    if r.get("busy"):
        L += [f"> **Warning:** {r['busy']}.", ""]
    for note in r.get("notes", []):
        L += [f"> **Note:** {note}.", ""]
    L += ["### Machine", "", "| | |", "|---|---|",
          f"| CPU | {m['cpu']}, {m['cores']} cores ({m.get('usable_cores')} usable), {m.get('memory_gib', '?')} GiB |",
          f"| CPU features | {flags} |",
          f"| GPU | {m.get('gpu') or 'none'} |",
          f"| load average (1 min) | {m['load_average_start'][0]} at start, {m.get('load_average_end', ['?'])[0]} at end "
          f"(the end includes this run) |",
          f"| CPU used by other processes during the run | "
          f"{_f(100 * (m.get('cpu_during_run') or {}).get('other_processes_cpu_share', float('nan')), 0, ' %')} "
          f"of all cores (hypervisor steal {_f(100 * (m.get('cpu_during_run') or {}).get('steal_share', float('nan')), 0, ' %')}) |",
          f"| software | Python {m['python']}; " + ", ".join(f"{k} {val}" for k, val in v.items()) + " |",
          f"| ONNX Runtime providers | {', '.join(m.get('onnxruntime_providers', []))} |",
          f"| model | `{r['model']['folder']}`: {r['model']['purifier']} purifier + {r['model']['classifier']} classifier "
          f"(TTA {r['model']['tta']}), RT {r['model']['rt']['kind']}; weights: {r['model']['weights']} |",
          f"| command | `{r['command']}`; {r['wall_seconds']} s |", ""]
    L += ["### Bars", "", "| bar | target | measured | | detail |", "|---|---|---:|---|---|"]
    for b in r["bars"]:
        verdict = {True: "pass", False: "**MISSED**", None: "not measured"}[b["passed"]]
        val = b["value"]
        shown = "-" if val is None else (f"{100 * val:.0f} %" if "HTTP" in b["bar"] else f"{val:,.2f}" if val < 100 else f"{val:,.0f}")
        L.append(f"| {b['bar']} | {b['target']} | {shown} | {verdict} | {b['detail']} |")
    fl = ref["flops"]
    L += ["", "### Reference: compute per image and this machine's floor", "",
          f"FLOPs per image ({fl['counter']}): purifier **{fl['purifier'] / 1e9:.3f} G**, classifier with TTA "
          f"{fl['tta']} ({fl['tta_passes']} passes) **{fl['classifier'] / 1e9:.3f} G**, purified pipeline "
          + ", ".join(f"K = {k}: **{n / 1e9:.3f} G**" for k, n in fl["pipeline_per_k"].items()) + ".", "",
          "| matmul peak | GFLOP/s | how (best of a measurement before and one after the model level) | "
          "floor: images/s (K = 1) | floor: ms per image |", "|---|---:|---|---:|---:|"]
    for k, p in sorted(ref["peaks"].items()):
        fv = ref["floor"].get(k, {})
        L.append(f"| {k} | {_f(p.get('gflops_per_s'))} | {p.get('how', p.get('error', ''))} | "
                 f"{_f(fv.get('images_per_s'), 0)} | {_f(fv.get('ms_per_image'), 4)} |")
    dp = ref["diffpure"]
    draws = ref["rt_draws"]
    L += ["", f"RT draws (outside the timed calls): {draws['batched_us_per_row']} us per row batched, "
              f"{draws['service_us_per_row']} us per row as the service draws them (a seed and a generator per row).", "",
          f"DiffPure (CIFAR-10, t* = 0.1): **{dp['gflops_per_image']:,.0f} GFLOPs per image** = {dp['reverse_steps']} "
          f"x {dp['score_gflops_per_forward']} (score network) + {dp['classifier_gflops']} (WRN-28-10), "
          f"**{dp['ratio_to_atop']:,.0f}x** this pipeline's {fl['pipeline'] / 1e9:.3f} GFLOPs (K = 1); derivation in "
          "docs/benchmarks.md.", ""]
    L += ["### Model level", "", f"Inputs: {r['inputs']['pool']}; {r['inputs']['per_repeat']}.", "",
          "| backend | device | precision | status |", "|---|---|---|---|"]
    for name, b in ml.get("backends", {}).items():
        L.append(f"| {name} | {b.get('device', '-')} | {b.get('precision', '-')} | "
                 + (f"ok: {b['detail']}" if b["status"] == "ok" else f"{b['status']}: {b['reason']}") + " |")
    L += ["", "| backend | part | K | batch | p50 ms | p95 ms | p99 ms | images/s | GFLOP/s | % of peak | reps |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, b in ml.get("backends", {}).items():
        for c in sorted(b.get("cells", []), key=lambda c: (c["part"], c["k"], c["batch"])):
            if "p50_ms" not in c:
                L.append(f"| {name} | {c['part']} | {c['k']} | {c['batch']} | {c.get('skipped') or c.get('error', '')[:60]} "
                         "| | | | | | |")
                continue
            pf = c.get("peak_fraction")
            L.append(f"| {name} | {c['part']} | {c['k']} | {c['batch']} | {c['p50_ms']:.2f} | {c['p95_ms']:.2f} | "
                     f"{c['p99_ms']:.2f} | {c['images_per_s']:,.0f} | {c['gflops_per_s']:,.1f} | "
                     f"{'-' if pf is None else f'{100 * pf:.1f}'} | {c['reps']} |")
    if ml.get("overhead"):
        batches = sorted({int(b) for rows in ml["overhead"].values() for b in rows})
        L += ["", f"Purification overhead ({ml['overhead_definition']}):", "",
              "| backend | K | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|---:|" + "---:|" * len(batches)]
        for name, rows in ml["overhead"].items():
            for k in sorted({kk for row in rows.values() for kk in row}):
                L.append(f"| {name} | {k[1:]} | " + " | ".join(_f(rows.get(str(b), {}).get(k), 2) for b in batches) + " |")
    prof = r.get("profile")
    if prof and prof.get("by_op_type"):
        kernel = (f", {prof['kernel_ms_per_call']} ms of kernel time per call (wall p50 {prof['wall_ms_p50']} ms)"
                  if "kernel_ms_per_call" in prof else "")
        L += ["", f"### Where the time goes: {prof['backend']}, batch {prof['batch']}, K = 1", "",
              f"{prof['tool']}, {prof['calls']} calls{kernel}.", ""]
        if prof.get("by_component"):
            L += ["| component | share | ms per call |", "|---|---:|---:|"]
            L += [f"| {o['name']} | {100 * o['share']:.1f} % | {o['ms_per_call']} |" for o in prof["by_component"]]
            L.append("")
        L += ["| operator | share | ms per call |", "|---|---:|---:|"]
        L += [f"| {o['name']} | {100 * o['share']:.1f} % | {o['ms_per_call']} |" for o in prof["by_op_type"]]
    elif prof and prof.get("error"):
        L += ["", f"Profile failed: {prof['error']}"]
    http = r.get("http")
    if http:
        L += ["", "### HTTP level", "", f"`bentoml serve` on 127.0.0.1, `{http['endpoint']}` with one image per request "
              f"(K = {http['samples']}); images: {http['images']}; client: {http['client']}. Each level stops at its "
              f"request count or time limit. Client CPU: the share of one core the load generator itself used."
              + (f" Server settings besides the batching: {', '.join(f'`{k}={v}`' for k, v in http['settings'].items())}."
                 if http.get("settings") else ""), "",
              "| max_batch_size | concurrency | requests/s | p50 ms | p95 ms | p99 ms | errors | sent | accuracy "
              "| share of best model level | client CPU |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for run in http["runs"]:
            if run.get("skipped") or run.get("error"):
                why = run.get("skipped") or run["error"].splitlines()[0][:80]
                L.append(f"| {run.get('max_batch_size')} | | {why} | | | | | | | | |")
                continue
            for lv in run["levels"]:
                if "requests_per_s" not in lv:
                    L.append(f"| {run['max_batch_size']} | {lv['concurrency']} | {lv.get('skipped')} | | | | | | | | |")
                    continue
                lat = lv["latency_ok"]
                kinds = f" ({', '.join(f'{k}: {n}' for k, n in lv['error_kinds'].items())})" if lv["errors"] else ""
                acc, share = lv["accuracy"], lv.get("share_of_best_model_level")
                L.append(f"| {run['max_batch_size']} | {lv['concurrency']} | {lv['requests_per_s']:,.1f} | "
                         f"{_f(lat['p50_ms'])} | {_f(lat['p95_ms'])} | {_f(lat['p99_ms'])} | {lv['errors']}{kinds} | "
                         f"{lv['sent']} | {_f(None if acc is None else 100 * acc, 1, ' %')} | "
                         f"{_f(None if share is None else 100 * share, 0, ' %')} | "
                         f"{_f(100 * lv['client_cpu'] if 'client_cpu' in lv else None, 0, ' %')} |")
        sides = [(run["max_batch_size"], lv["concurrency"], lv["server"]) for run in http["runs"]
                 for lv in run.get("levels", []) if lv.get("server")]
        if sides:
            L += ["", "Server side, from its /metrics (per level, summed over its workers): mean time of a request, model "
                      "calls of the workers' batchers, rows per call, mean time of a call and of the queueing before it "
                      "(its oldest row), how busy the model threads were (time in model calls / wall time / workers), "
                      "and the CPU the server's processes used, in % of one core (100 % per core of the machine at "
                      "most).", "",
                  "| max_batch_size | concurrency | request mean ms | model calls | rows per call | call mean ms | "
                  "queue mean ms | model busy | server CPU |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for mbs, c, sv in sides:
                busy, cpu = sv.get("model_busy_share"), sv.get("server_cpu")
                L.append(f"| {mbs} | {c} | {_f(sv['request_mean_ms'])} | {sv['model_calls']} | "
                         f"{_f(sv['rows_per_call'], 2)} | {_f(sv.get('call_mean_ms'))} | {_f(sv.get('queue_mean_ms'))} | "
                         f"{_f(None if busy is None else 100 * busy, 0, ' %')} | "
                         f"{_f(None if cpu is None else 100 * cpu, 0, ' %')} |")
        ch = http.get("choice") or {}
        L += ["", f"**Batching choice:** `ATOP_MAX_BATCH_SIZE={ch.get('max_batch_size')}`, "
                  f"`ATOP_MAX_LATENCY_MS={ch.get('max_latency_ms')}`. {ch.get('why', '')}"]
    if r.get("suggestions"):
        L += ["", "### Missed bars: where the time goes and what to try", ""] + [f"- {s}" for s in r["suggestions"]]
    if images:
        L += [""] + [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(L) + "\n"


def plot_latency(r: dict, path: Path) -> bool:
    """p50 latency and images/s vs batch size, a line per backend and part (K = 1 solid pipeline, dashed classifier)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = (r.get("model_level") or {}).get("backends", {})
    series = []
    for name, b in backends.items():
        ks = sorted({c["k"] for c in _cells(b, "pipeline")})
        for part, k, style in [("pipeline", kk, "-" if kk == 1 else ":") for kk in ks] + [("classifier", 1, "--")]:
            pts = sorted((c["batch"], c["p50_ms"], c["p95_ms"], c["images_per_s"]) for c in _cells(b, part, k))
            if pts:
                series.append((f"{name} {part}" + (f" K={k}" if part == "pipeline" else ""), name, style, pts))
    if not series:
        return False
    colors = {n: f"C{i}" for i, n in enumerate(backends)}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for label, name, style, pts in series:
        bs, p50, p95, ips = zip(*pts)
        a1.errorbar(bs, p50, yerr=[[0] * len(p50), [hi - lo for lo, hi in zip(p50, p95)]], ls=style, marker="o", ms=3,
                    capsize=2, color=colors[name], label=label)
        a2.plot(bs, ips, ls=style, marker="o", ms=3, color=colors[name], label=label)
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (images)")
        ax.grid(alpha=0.3, which="both")
    a1.set_ylabel("latency per batch, p50 (bar to p95), ms")
    a2.set_ylabel("images/s (at p50)")
    a2.axhline(BARS["throughput_images_per_s"], color="gray", ls="-.", lw=1, label="bar: 1000 images/s")
    a2.legend(fontsize=6, loc="best")
    fig.suptitle(f"{r['model']['name']} on {r['machine']['cpu']} ({r['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_http(r: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    http = r.get("http") or {}
    runs = [run for run in http.get("runs", []) if any("requests_per_s" in lv for lv in run.get("levels", []))]
    if not runs:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for i, run in enumerate(runs):
        done = [level for level in run["levels"] if "requests_per_s" in level]
        cs = [level["concurrency"] for level in done]
        label = f"max_batch_size {run['max_batch_size']}"
        a1.plot(cs, [level["requests_per_s"] for level in done], marker="o", color=f"C{i}", label=label)
        for q, marker, ls in (("p50", "o", "-"), ("p99", "x", "--")):
            a2.plot(cs, [level["latency_ok"][f"{q}_ms"] or float("nan") for level in done], marker=marker, ls=ls,
                    color=f"C{i}", label=f"{label} {q}")
    best = (r.get("model_level") or {}).get("best")
    if best:
        a1.axhline(best["images_per_s"], color="gray", ls="-.", lw=1,
                   label=f"best model level ({best['backend']}, batch {best['batch']})")
        a1.axhline(BARS["http_share_min"] * best["images_per_s"], color="gray", ls=":", lw=1, label="bar: 50 % of it")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3, which="both")
    a1.set_ylabel("requests/s (1 image, K = 1)")
    a2.set_ylabel("latency, ms")
    a2.set_yscale("log")
    a1.legend(fontsize=7)
    a2.legend(fontsize=6)
    fig.suptitle(f"HTTP: bentoml serve on {r['machine']['cpu']} ({r['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
