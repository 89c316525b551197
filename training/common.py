"""Shared training plumbing: device/autocast, torchrun (DDP) setup, safetensors checkpoints, progress."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from atop_serve.errors import AtopError


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self, enabled: bool = True):
        if not enabled:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t


def setup_runtime(device: str = "auto") -> Runtime:
    """Settle device and process group once. Under torchrun: gloo on CPU, nccl on CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise AtopError("--device cuda requested but no CUDA GPU is available")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    dev = torch.device(device, int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    return Runtime(dev, rank, world)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is the faster choice here: on CUDA where the GPU supports it; on a CPU with AMX
    (``amx_bf16``); on an AMD CPU with AVX-512 BF16 (Zen 4 and later), not on an Intel one without AMX.
    Measured, airnet training steps (batch 256, channels_last): an Intel Xeon with avx512_bf16 and no AMX
    ran 230 images/s in bf16 against 349 in fp32; an AMD EPYC (Zen 4: family 25, model 17) 435 against 252; one
    with no bf16 instructions at all (Zen 3, AVX2 only: ``atop_serve.cpu.bf16_native``) 8 against 130."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from atop_serve.cpu import cpu_flags, cpu_vendor

    flags = cpu_flags() or frozenset()
    return "amx_bf16" in flags or ("avx512_bf16" in flags and cpu_vendor() == "AuthenticAMD")


def sync_buffers(model: torch.nn.Module, rt: Runtime) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics are updated from each rank's own
    shard after DDP's per-forward broadcast, so they drift apart on the last step)."""
    if rt.world > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


def rank_hashes(model: torch.nn.Module, rt: Runtime) -> list[str]:
    """sha256 of the model's parameters and buffers on every rank (all equal after a correct DDP run)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    mine = h.hexdigest()
    if rt.world == 1:
        return [mine]
    out: list = [None] * rt.world
    dist.all_gather_object(out, mine)
    return out


def teardown(rt: Runtime) -> None:
    """Leave the process group together: a rank that tore down while rank 0 still evaluated and wrote the
    card could leave gloo's peer connection closing under rank 0."""
    if rt.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator fixed by (seed, epoch, stream): a resumed run draws exactly what an uninterrupted one did."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + stream)


# ------------------------------------------------------------------------------------ arguments and --out
def check_run(out: Path, resume: bool, *, epochs: int, batch_size: int, lr: float, limit: int, eval_n: int,
              stop_after: int = 0) -> None:
    """Fail before any work on a training run's arguments a user can fix: counts out of range, and an ``--out``
    that is a file, the shipped model folder, or (without --resume) a folder already holding a model or a
    checkpoint, whose weights and card the run would replace."""
    from atop_serve.modelio import CARD, DEFAULT_MODEL_DIR

    for name, value, least in (("epochs", epochs, 1), ("batch-size", batch_size, 1), ("limit", limit, 0),
                               ("eval-n", eval_n, 0), ("stop-after", stop_after, 0)):
        if value < least:
            raise AtopError(f"--{name} must be at least {least}, got {value}")
    if not 0 < lr < math.inf:
        raise AtopError(f"--lr must be a finite number > 0, got {lr}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AtopError(f"--out {out} is a file; name a folder for the model")
    if out.resolve() == DEFAULT_MODEL_DIR.resolve():
        raise AtopError(f"--out {out} is the shipped model folder; train into a folder of its own (e.g. runs/name)")
    if not resume and ((out / CARD).exists() or (out / "checkpoint").exists()):
        raise AtopError(f"--out {out} already holds a model or a checkpoint: name a new folder, or add --resume to "
                        "continue its checkpoint")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise AtopError(f"--out {out}: cannot write under {parent}")


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``module.load_state_dict(state)`` from the checkpoint in ``path``; one of another configuration (another
    architecture or width) is an AtopError, not a traceback."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise AtopError(f"the checkpoint in {path} does not fit this run's {type(module).__name__}: it was written "
                        "with other options (architecture, width); resume with those, or start a new --out") from None


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Tensors to safetensors and metadata to JSON, each written atomically (no pickle anywhere)."""
    path.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(flat, str(path / "state.safetensors.tmp"))
    (path / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(path / "state.safetensors.tmp", path / "state.safetensors")
    os.replace(path / "meta.json.tmp", path / "meta.json")


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        return load_file(str(path / "state.safetensors")), json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise AtopError(f"no checkpoint to resume in {path}") from None
    except Exception as e:  # noqa: BLE001
        raise AtopError(f"corrupt checkpoint in {path}: {e}") from None


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    out[f"opt.{gi}.{pi}.{k}"] = v
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, gi, pi, k = key.split(".", 3)
            p = opt.param_groups[int(gi)]["params"][int(pi)]
            opt.state.setdefault(p, {})[k] = v.clone()


def prefixed(prefix: str, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in d.items()}


def unprefixed(prefix: str, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in d.items() if k.startswith(prefix + ".")}


# -------------------------------------------------------------------------------------------- provenance
def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, stderr=subprocess.DEVNULL, text=True
        ).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def command_line() -> str:
    return " ".join(["atop", *sys.argv[1:]]) if Path(sys.argv[0]).name == "atop" else " ".join(sys.argv)


def progress(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, mininterval=2.0, dynamic_ncols=True)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.seconds = time.perf_counter() - self.t0


def config_dict(cfg) -> dict:
    return asdict(cfg)
