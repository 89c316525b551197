"""Robustness evaluation of a model folder under named threat models, with resumable report folders.

    atop eval --model runs/atop --threat pipeline --attacks clean,fgsm,pgd-20,apgd-ce --out reports/atop-pipe
    atop eval --model runs/atop --threat transfer --source runs/clf --attacks pgd-20 --out reports/transfer
    atop eval --model runs/atop --threat classifier --sanity --eps-sweep 0,2,4,8,16/255 --out reports/sanity
    atop eval --preset table7 --model runs/rt1,runs/rt2,runs/rt3 --out reports/table7

Threat models (named in every report; ``THREATS`` below says exactly what each one does).

Attacks are written as ``name[@key=value...]``, e.g. ``pgd-20``, ``pgd-20@eps=4/255@restarts=5``,
``apgd-ce@steps=50``, ``square@queries=1000``; see ``FAMILIES``. Every gradient attack on the pipeline
averages its gradients over ``eot`` fresh draws of RT (EOT); ``--quantize`` rounds adversarial images to
8 bits, as the service decodes them, with BPDA (straight-through) gradients through the rounding.

Each finished attack is stored in ``<out>/attacks/<attack>.json`` with a fingerprint of everything that
determines its result (model files, threat, data subset, seed, batch size, RT, attack parameters); a rerun
with the same fingerprint reuses it, so a killed run resumes without recomputing finished attacks. Every
attack draws from its own generators seeded from ``seed``, so a resumed run gives what an uninterrupted one
would. Accuracies carry a 95 % Wilson interval; attack gradients run under bf16 autocast when ``bf16`` (by
default where bf16 is the faster choice: CUDA, a CPU with AMX, or an AMD CPU with AVX-512 BF16), every accuracy is measured in fp32.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from atop_serve import modelio
from atop_serve.config import RT_KINDS, RTConfig
from atop_serve.cpu import CPU_FLAGS, cpu_flags
from atop_serve.errors import AtopError
from atop_serve.pipeline import TTA_MODES
from atop_serve.transforms import RTInputs, draw_rt_inputs

from . import common
from .attacks import APGD, BPDA, FAB, FGSM, PGD, AutoAttack, Quantize8, Square, StAdv
from .data import Dataset, default_data_root, load_split

THREATS = {
    "classifier": "crafted on the classifier alone (with its test-time augmentation), then purified by the "
                  "pipeline with fresh randomness (the AToP paper's Table 7 setting)",
    "pipeline": "full white-box on f(g(RT(x))): exact gradients through g, each gradient averaged over `eot` "
                "fresh RT draws (EOT); evaluated with fresh randomness",
    "pipeline-fixed": "white-box on f(g(RT(x))) with RT's randomness fixed per batch and shared by attack and "
                      "evaluation (tells stochasticity from real robustness)",
    "transfer": "crafted on the classifier of another model folder (--source), then purified by the pipeline "
                "with fresh randomness",
    "bare": "the classifier alone, no purifier (the undefended baseline)",
}

# family -> (parameters a user may set with @key=value, description)
FAMILIES = {
    "clean": ((), "no attack"),
    "fgsm": (("eps",), "FGSM, l_inf (Goodfellow et al. 2015)"),
    "pgd": (("eps", "alpha", "restarts", "eot"), "pgd-<steps>: PGD l_inf, random start (Madry et al. 2018)"),
    "pgd-l2": (("eps", "alpha", "restarts", "eot"), "pgd-l2-<steps>: PGD l_2, random start"),
    "apgd-ce": (("eps", "steps", "restarts", "eot"), "APGD-CE, l_inf (Croce & Hein 2020)"),
    "apgd-dlr": (("eps", "steps", "restarts", "eot"), "APGD-DLR, l_inf"),
    "apgd-t": (("eps", "steps", "restarts", "eot", "targets"), "APGD-T (targeted DLR), l_inf"),
    "square": (("eps", "queries"), "Square, l_inf black-box (Andriushchenko et al. 2020)"),
    "stadv": (("eps", "steps", "alpha", "tau", "eot"), "StAdv spatial flow, budget 0.05 (Xiao et al. 2018)"),
    "fab-t": (("eps", "steps", "targets", "eot"), "FAB-T, targeted minimal-l_inf boundary attack (Croce & Hein 2020)"),
    "autoattack": (("eps", "steps", "queries", "targets"), "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square"),
    "autoattack-rand": (("eps", "steps", "eot"), "AutoAttack rand: APGD-CE + APGD-DLR with EOT 20"),
}
GRADIENT_LINF = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t")
LINF = GRADIENT_LINF + ("square", "autoattack", "autoattack-rand")
TABLE7_ATTACKS = ("clean", "fgsm", "pgd-10", "pgd-20", "pgd-1000")
# Table 1: clean, the attack AToP trains on (FGSM l_inf 8/255), and unseen ones (l_2 PGD, StAdv)
TABLE1_ATTACKS = ("clean", "fgsm", "pgd-20", "pgd-l2-20", "stadv")


def parse_number(text: str) -> float:
    """``0.03``, ``8/255``."""
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise AtopError(f"not a number: {text!r} (use e.g. 0.03 or 8/255)") from None


def parse_eps_list(text: str) -> tuple[float, ...]:
    """``0,2,4,8,16/255`` (whole numbers and a trailing /D: every value is divided by D) or ``0,0.01,8/255``
    (otherwise each value stands alone)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        return ()
    m = re.fullmatch(r"(.*)/(\d+(?:\.\d+)?)", parts[-1])
    if m and all(p.isdigit() for p in parts[:-1]) and m.group(1).isdigit():
        d = float(m.group(2))
        return tuple(parse_number(p) / d for p in parts[:-1]) + (parse_number(m.group(1)) / d,)
    return tuple(parse_number(p) for p in parts)


# ------------------------------------------------------------------------------------------ attack specs
@dataclass
class AttackSpec:
    key: str  # as written, e.g. "pgd-20@eps=4/255"
    family: str
    params: dict  # every parameter, resolved

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.=-]+", "_", self.key)


def parse_attack(text: str, cfg: "EvalConfig") -> AttackSpec:
    """``name[@key=value...]`` -> a spec with every parameter resolved from the config's defaults."""
    key = text.strip().lower().replace(" ", "")
    base, *opts = key.split("@")
    steps = None
    m = re.fullmatch(r"(pgd-l2|pgd|apgd-ce|apgd-dlr|apgd-t|fab-t|square|stadv)-(\d+)", base)
    family = base
    if m:
        family, steps = m.group(1), int(m.group(2))
    if family not in FAMILIES or (family in ("pgd", "pgd-l2") and steps is None):
        raise AtopError(f"unknown attack {text!r}; valid: clean, fgsm, pgd-<steps>, pgd-l2-<steps>, apgd-ce, "
                        "apgd-dlr, apgd-t, fab-t, square, stadv, autoattack, autoattack-rand (options as name@key=value)")
    allowed, _ = FAMILIES[family]
    over = {}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep or k not in allowed:
            raise AtopError(f"bad option {o!r} in attack {text!r}; {family} takes {', '.join(allowed) or 'none'}")
        over[k] = parse_number(v)
    stochastic = cfg.threat == "pipeline"
    l2 = family == "pgd-l2"
    eps = over.get("eps", cfg.eps if cfg.eps is not None else (0.5 if l2 else 8 / 255))
    eot = int(over.get("eot", (20 if family == "autoattack-rand" else cfg.eot) if stochastic else 1))
    p: dict = {}
    if family == "clean":
        pass
    elif family == "fgsm":
        p = {"eps": eps, "norm": "linf", "eot": eot}
    elif family in ("pgd", "pgd-l2"):
        alpha = over.get("alpha", cfg.alpha if cfg.alpha is not None else eps / 4)
        p = {"eps": eps, "norm": "l2" if l2 else "linf", "steps": steps, "alpha": alpha,
             "restarts": int(over.get("restarts", cfg.restarts)), "random_start": True, "eot": eot}
    elif family.startswith("apgd"):
        p = {"eps": eps, "norm": "linf", "steps": int(over.get("steps", steps or 100)),
             "restarts": int(over.get("restarts", cfg.restarts)), "loss": {"apgd-ce": "ce", "apgd-dlr": "dlr",
                                                                         "apgd-t": "dlr-targeted"}[family],
             "rho": 0.75, "eot": eot}
        if family == "apgd-t":
            p["targets"] = int(over.get("targets", 9))
    elif family == "fab-t":
        p = {"eps": eps, "norm": "linf", "steps": int(over.get("steps", steps or 100)),
             "targets": int(over.get("targets", 9)), "alpha_max": 0.1, "eta": 1.05, "beta": 0.9, "eot": eot}
    elif family == "square":
        p = {"eps": eps, "norm": "linf", "queries": int(over.get("queries", steps or 5000)), "p_init": 0.8}
    elif family == "stadv":
        p = {"budget": over.get("eps", 0.05), "steps": int(over.get("steps", steps or 100)),
             "alpha": over.get("alpha", 0.01), "tau": over.get("tau", 0.05), "eot": eot}
    elif family == "autoattack":
        p = {"eps": eps, "norm": "linf", "version": "standard", "steps": int(over.get("steps", 100)),
             "queries": int(over.get("queries", 5000)), "targets": int(over.get("targets", 9)), "eot": eot,
             "components": ["apgd-ce", "apgd-t", "fab-t", "square"]}
    else:
        p = {"eps": eps, "norm": "linf", "version": "rand", "steps": int(over.get("steps", 100)), "eot": eot,
             "components": ["apgd-ce", "apgd-dlr"]}
    for name in ("eps", "budget"):
        if name in p and not l2 and not 0 <= p[name] <= 1 + 1e-9:
            raise AtopError(f"attack {text!r}: {name} {p[name]} outside [0, 1] (images are in [0, 1])")
        if name in p and l2 and not 0 <= p[name] < math.inf:
            raise AtopError(f"attack {text!r}: {name} {p[name]} must be a finite number >= 0")
    if "alpha" in p and not 0 <= p["alpha"] < math.inf:
        raise AtopError(f"attack {text!r}: step size alpha {p['alpha']} must be a finite number >= 0")
    for name in ("eot", "restarts", "targets", "queries"):
        if name in p and p[name] < 1:
            raise AtopError(f"attack {text!r}: {name} must be at least 1, got {p[name]}"
                            + (f" (--{name} or @{name}=)" if name in ("eot", "restarts") else f" (@{name}=)"))
    return AttackSpec(key, family, p)


def build_attack(spec: AttackSpec, model: nn.Module, gen: torch.Generator):
    p, f = spec.params, spec.family
    if f == "clean":
        return None
    if f == "fgsm":
        return FGSM(model, p["eps"], eot_iter=p["eot"])
    if f in ("pgd", "pgd-l2"):
        return PGD(model, p["eps"], p["alpha"], p["steps"], p["norm"], True, p["restarts"], gen, eot_iter=p["eot"])
    if f.startswith("apgd"):
        return APGD(model, p["eps"], p["steps"], p["loss"], p["restarts"], p["rho"], p.get("targets", 9), gen,
                    eot_iter=p["eot"])
    if f == "fab-t":
        return FAB(model, p["eps"], p["steps"], p["targets"], p["alpha_max"], p["eta"], p["beta"], gen,
                   eot_iter=p["eot"])
    if f == "square":
        return Square(model, p["eps"], p["queries"], p["p_init"], gen)
    if f == "stadv":
        return StAdv(model, p["budget"], p["steps"], p["alpha"], p["tau"], generator=gen, eot_iter=p["eot"])
    if f == "autoattack":
        return AutoAttack(model, p["eps"], "standard", p["steps"], p["queries"], p["targets"], gen, eot_iter=p["eot"])
    return AutoAttack(model, p["eps"], "rand", p["steps"], generator=gen, eot_iter=p["eot"])


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


# ------------------------------------------------------------------------------------------ model wrappers
class _Autocast(nn.Module):
    def __init__(self, model, enabled, device_type="cpu"):
        super().__init__()
        self.model, self.enabled, self.device_type = model, enabled, device_type

    def forward(self, x):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled):
            return self.model(x).float()


def _draws(pipeline, n, samples, gen, device) -> RTInputs:
    """RT draws from a CPU generator, moved to ``device`` (so GPU runs reproduce CPU runs' randomness)."""
    return RTInputs(*(t.to(device) for t in draw_rt_inputs(pipeline.transform, n, samples, gen)))


class _FixedDraws(nn.Module):
    """The pipeline with its randomness fixed to ``draws`` (the ``pipeline-fixed`` threat)."""

    def __init__(self, pipeline, draws):
        super().__init__()
        self.pipeline, self.draws = pipeline, draws

    def forward(self, x):
        return self.pipeline(x, rt_inputs=self.draws)


class _FreshDraws(nn.Module):
    """The pipeline drawing fresh randomness at every call from an explicit generator (EOT's draws), averaging
    ``samples`` purifications per call (default: the pipeline's K)."""

    def __init__(self, pipeline, gen, samples: int | None = None):
        super().__init__()
        self.pipeline, self.gen, self.samples = pipeline, gen, samples or pipeline.samples

    def forward(self, x):
        return self.pipeline(x, rt_inputs=_draws(self.pipeline, x.size(0), self.samples, self.gen, x.device))


# ------------------------------------------------------------------------------------------------ config
@dataclass
class EvalConfig:
    threat: str = "classifier"
    attacks: tuple = ("clean", "fgsm", "pgd-20")
    n: int = 1000  # class-balanced test images (fixed by seed)
    batch_size: int = 250
    samples: int | None = None  # K purifications averaged at prediction time (None: the card's recommended K)
    eot: int = 8  # gradient samples per step (pipeline threat)
    attack_samples: int | None = None  # pipeline threat: K inside the attack's passes (None: the evaluated K)
    eps: float | None = None  # default 8/255 (l_inf), 0.5 (l_2)
    alpha: float | None = None  # PGD step size, default eps/4
    restarts: int = 1
    sigma: float | None = None  # override the model's RT sigma
    rate: float | None = None  # override the model's RT mask rate (share of blocks missing)
    rt: str | None = None  # override the RT kind
    tta: str | None = None  # override the classifier's TTA
    mirror: bool | None = None  # override the card's pipeline.mirror
    source: str | None = None  # transfer threat: model folder whose classifier crafts the examples
    quantize: bool = False  # round adversarial images to 8 bits (BPDA through the rounding)
    seed: int = 0
    bf16: bool | None = None  # attack gradients under bf16 autocast; None: where it is faster (common.fast_bf16)
    device: str = "auto"
    data: str = ""
    sanity: bool = False
    eps_sweep: tuple = ()  # extra runs of `sweep_attack` at these eps (on by default with sanity)
    sweep_attack: str = "pgd-20"
    sanity_queries: int = 5000  # Square queries in the sanity check
    graph: str = "torch"  # what scores the (adversarial) images: torch, onnx (pipeline.onnx) or opt (pipeline.opt.onnx)
    url: str | None = None  # score with a running service of the same folder instead (ServiceScorer)
    grid: int = 8  # images in the clean/adversarial/purified grid
    grid_attack: str | None = None  # attack shown in the grid (default: the strongest)


# keys of EvalConfig that change no attack's result beyond what its resolved parameters record
_NOT_IN_FINGERPRINT = {"attacks", "eps", "alpha", "restarts", "eot", "sanity", "eps_sweep", "sweep_attack",
                       "sanity_queries", "grid", "grid_attack", "device", "source"}


# card entries that record what was measured of a model rather than define it (`atop record` writes them)
CARD_RECORDS = ("name", "evaluation", "evaluation_of_earlier_weights", "export", "flops")


def folder_fingerprint(folder: Path) -> dict:
    """What a model folder's predictions depend on: its weights' sha256 and its card less the records, so that
    recording an evaluation into the card (`atop record`) or copying the folder elsewhere keeps it."""
    card = modelio.read_card(folder)
    defining = json.dumps({k: v for k, v in card.items() if k not in CARD_RECORDS}, sort_keys=True)
    return {"card_sha256": hashlib.sha256(defining.encode()).hexdigest(),
            "weights": {p.name: modelio.sha256(p) for p in sorted(Path(folder).glob("*.safetensors"))}}


@dataclass
class Models:
    classifier: nn.Module  # the defended model's classifier (as served, with its TTA)
    pipeline: nn.Module | None  # f(g(RT(x))) or None for the bare threat
    source: nn.Module | None = None  # transfer source
    name: str = ""
    fingerprint: dict = field(default_factory=dict)
    served: object = None  # GraphScorer or ServiceScorer: scores instead of the eager pipeline


GRAPHS = {"torch": None, "onnx": modelio.ONNX_FILE, "opt": modelio.OPT_ONNX_FILE}


class GraphScorer:
    """The folder's exported graph under ONNX Runtime (the service's session options), fed the same images and
    RT draws as the eager pipeline: what is served is what gets scored. Attacks still take their gradients in
    PyTorch (the graph has none), so examples are crafted on the eager models and transferred to the graph."""

    def __init__(self, path: Path, threads: int):
        from atop_serve.engine import make_session

        self.path = path
        self.session = make_session(path, threads, ["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, x: torch.Tensor, draws: RTInputs) -> torch.Tensor:
        from atop_serve.engine import feed_for

        d = {k: v.detach().cpu().float().numpy() for k, v in draws._asdict().items()}
        probs = self.session.run(["probs"], feed_for(self.names, x.detach().cpu().float().numpy(), d))[0]
        return torch.from_numpy(probs).to(x.device)


class ServiceScorer:
    """A running service of the same model folder (``--url``): each (adversarial) image is rounded to 8 bits (an
    attacker sends pixels; rounding stays inside an l_inf ball around 8-bit images), sent as PNG to
    /classify_batch with K samples, and scored by the service's answer, drawn with its own fresh randomness: the
    deployed service end to end, HTTP, decoding and batching included. Attacks take gradients in PyTorch on the
    local folder, which must hold the weights the server serves (checked against /metadata)."""

    def __init__(self, url: str, card: dict, samples: int, timeout_s: float = 120.0):
        import httpx

        self.url, self.samples, self.classes = url.rstrip("/"), samples, list(card["classes"])
        self.client = httpx.Client(timeout=timeout_s, trust_env=False)
        try:
            meta = self.client.get(self.url + "/metadata").json()
        except (httpx.HTTPError, ValueError) as e:
            raise AtopError(f"--url {url}: no atop service answers there ({type(e).__name__}: {e})") from None
        for part in ("classifier", "purifier"):
            want, got = card[part].get("sha256"), (meta.get(part) or {}).get("sha256")
            if want is None or want != got:
                raise AtopError(f"--url {url} serves other {part} weights than the model folder (sha256 {got} vs "
                                f"{want}): attack and score the same model")
        limits = (meta.get("serving") or {}).get("limits") or {}
        self.max_images = int(limits.get("max_images", 1))
        if samples > int(limits.get("max_samples", samples)):
            raise AtopError(f"--samples {samples}: the server allows at most {limits['max_samples']}")
        self.serving = {k: meta["serving"].get(k) for k in ("model", "backend", "graph", "variant")}

    def __call__(self, x: torch.Tensor, draws: RTInputs | None = None) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] -> the service's class probabilities (N, C); ``draws`` are not used."""
        import httpx

        from atop_serve.imageio import encode_png

        pixels = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        probs = []
        for start in range(0, len(pixels), self.max_images):
            files = [("images", (f"{start + i}.png", encode_png(p), "image/png"))
                     for i, p in enumerate(pixels[start:start + self.max_images])]
            try:
                r = self.client.post(self.url + "/classify_batch", files=files, data={"samples": str(self.samples)})
            except httpx.HTTPError as e:
                raise AtopError(f"--url {self.url}: /classify_batch failed ({type(e).__name__}: {e})") from None
            if r.status_code != 200:
                raise AtopError(f"--url {self.url}: /classify_batch answered {r.status_code}: {r.text[:300]}")
            probs += [[a["probabilities"][c] for c in self.classes] for a in r.json()]
        return torch.tensor(probs, device=x.device)


def load_models(folder, cfg: EvalConfig) -> Models:
    folder = modelio.resolve(folder)
    classifier = modelio.load_classifier(folder, cfg.tta)
    pipeline = None
    if cfg.threat != "bare":
        pipeline = modelio.load_pipeline(folder, samples=cfg.samples, tta=cfg.tta, mirror=cfg.mirror)
        if cfg.sigma is not None or cfg.rt is not None or cfg.rate is not None:
            d = pipeline.transform.to_dict()
            kind = cfg.rt or d["kind"]
            if kind not in RT_KINDS:
                raise AtopError(f"unknown --rt {kind!r}; valid: {', '.join(RT_KINDS)}")
            try:
                pipeline.transform = RTConfig.named(kind, sigma=d["sigma"] if cfg.sigma is None else cfg.sigma,
                                                    views=3 if kind == "rt3" else 1, block=d["block"],
                                                    rate=d["rate"] if cfg.rate is None else cfg.rate)
            except ValueError as e:
                raise AtopError(f"bad RT override: {e}") from None
    fp = {"model": folder_fingerprint(folder)}
    source = None
    if cfg.threat == "transfer":
        src = modelio.resolve(cfg.source)
        source = modelio.load_classifier(src)
        fp["source"] = folder_fingerprint(src)
    for m in (classifier, source):
        if m is not None:
            for p in m.parameters():
                p.requires_grad_(False)
    served = None
    overrides = (cfg.sigma, cfg.rt, cfg.rate, cfg.tta, cfg.mirror)
    if (cfg.graph != "torch" or cfg.url) and any(v is not None for v in overrides):
        what = "--url scores the service as it runs" if cfg.url else "--graph scores the exported graph as built"
        raise AtopError(f"{what}: --sigma, --rate, --rt, --tta and --mirror cannot change it")
    if cfg.graph != "torch":
        path = folder / GRAPHS[cfg.graph]
        if pipeline is None:
            raise AtopError("--graph needs a purified pipeline (not the bare threat)")
        if not path.exists():
            raise AtopError(f"--graph {cfg.graph}: {path} does not exist (make it with `atop export`"
                            + (" --variants int8)" if cfg.graph == "opt" else ")"))
        served = GraphScorer(path, torch.get_num_threads())
        fp["graph"] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if cfg.url:
        if pipeline is None:
            raise AtopError("--url needs a purified pipeline (not the bare threat)")
        served = ServiceScorer(cfg.url, modelio.read_card(folder), pipeline.samples)
        fp["service"] = {"url": cfg.url, **served.serving}
    return Models(classifier, pipeline, source, str(folder), fp, served)


def machine() -> dict:
    info = {"device": common.hardware(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    flags = cpu_flags()
    if flags is not None and not torch.cuda.is_available():
        info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise AtopError(f"unknown --device {name!r}; use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AtopError("--device cuda requested but no CUDA GPU is available")
    return torch.device(name)


# ---------------------------------------------------------------------------------------- sanity checks
def sanity_plan(cfg: EvalConfig) -> dict:
    """The extra attacks the sanity checks need, by role."""
    sweep = parse_attack(cfg.sweep_attack, cfg)
    if sweep.family != "pgd" or "@" in cfg.sweep_attack:
        raise AtopError(f"--sweep-attack must be a plain pgd-<steps>, got {cfg.sweep_attack!r}")
    k = sweep.params["steps"]
    eps_list = cfg.eps_sweep or (0, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
    plan = {"sweep": [f"pgd-{k}@eps={_fmt_eps(e)}" for e in eps_list],
            "base": f"pgd-{k}", "more_steps": f"pgd-{4 * k}",
            "unbounded": f"pgd-{k}@eps=1@alpha=0.1",
            "square": f"square@queries={cfg.sanity_queries}"}
    if cfg.threat == "pipeline":
        hi = cfg.eot if cfg.eot > 1 else 4
        plan["eot_low"], plan["eot_high"] = f"pgd-{k}@eot=1", f"pgd-{k}@eot={hi}"
    return plan


def _fmt_eps(e: float) -> str:
    k = e * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{e:.6g}"


def _tol(p1: float, p2: float, n: int) -> float:
    """Allowed increase between two accuracies on the same n images: ~2 standard errors of a difference."""
    p = (p1 + p2) / 2
    return 1.96 * math.sqrt(2 * p * (1 - p) / max(n, 1)) + 1 / max(n, 1)


def sanity_checks(acc: dict[str, float], specs: dict[str, AttackSpec], plan: dict, n: int) -> list[dict]:
    """Pass/fail of the standard checks from measured accuracies (``acc``: attack key -> accuracy)."""
    checks = []

    def add(name, passed, detail, values):
        checks.append({"check": name, "passed": bool(passed), "detail": detail, "values": values})

    sweep = sorted(((specs[k].params["eps"], acc[k]) for k in plan["sweep"] if k in acc), key=lambda t: t[0])
    bad = [(a, b) for a, b in zip(sweep, sweep[1:]) if b[1] > a[1] + _tol(a[1], b[1], n)]
    add("accuracy non-increasing in epsilon", not bad,
        "ok" if not bad else "accuracy rises from eps %.4f to %.4f" % (bad[0][0][0], bad[0][1][0]),
        {"eps": [e for e, _ in sweep], "accuracy": [a for _, a in sweep]})
    u = acc[plan["unbounded"]]
    limit = max(0.02, 1 / max(n, 1))
    add("unbounded attack reaches ~0 %", u <= limit,
        f"accuracy {u:.4f} under {plan['unbounded']} (limit {limit:.4f})", {"accuracy": u, "limit": limit})
    a, b = acc[plan["base"]], acc[plan["more_steps"]]
    add("more steps do not raise accuracy", b <= a + _tol(a, b, n),
        f"{plan['base']}: {a:.4f}, {plan['more_steps']}: {b:.4f}", {"fewer": a, "more": b})
    if "eot_low" in plan:
        a, b = acc[plan["eot_low"]], acc[plan["eot_high"]]
        add("more EOT samples do not raise accuracy", b <= a + _tol(a, b, n),
            f"{plan['eot_low']}: {a:.4f}, {plan['eot_high']}: {b:.4f}", {"fewer": a, "more": b})
    sq = specs[plan["square"]]
    grads = {k: acc[k] for k, s in specs.items() if k in acc and s.family in GRADIENT_LINF
             and abs(s.params["eps"] - sq.params["eps"]) < 1e-9}
    best_key = min(grads, key=grads.get)
    s, g = acc[plan["square"]], grads[best_key]
    add("black-box Square not stronger than gradient attacks", s >= g - _tol(s, g, n),
        f"square: {s:.4f}, best gradient attack {best_key}: {g:.4f}"
        + ("" if s >= g - _tol(s, g, n) else " (gradients look masked)"), {"square": s, "gradient": g})
    return checks


# -------------------------------------------------------------------------------------------- running
def classifier_key(models: Models, cfg: EvalConfig) -> str:
    """What the ``classifier`` threat's adversarial examples depend on besides the attack: the classifier's
    weights and TTA, the subset, seeds, dtype, batching and 8-bit rounding (not the purifier or RT)."""
    h = hashlib.sha256()
    for k, v in sorted(models.classifier.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([getattr(models.classifier, "mode", None), cfg.n, cfg.seed, cfg.bf16, cfg.batch_size,
                         cfg.quantize, cfg.data]).encode())
    return h.hexdigest()[:16]


def _run_attack(spec: AttackSpec, models: Models, test: Dataset, cfg: EvalConfig, device, show_progress, grid_n,
                adv_cache: dict | None = None):
    """One attack over ``test``. ``adv_cache`` (classifier threat only) shares crafted examples between model
    folders with the same classifier: the Table 7 grid crafts each attack once and purifies it per row."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # random starts, Square's proposals
    eval_gen = torch.Generator().manual_seed(cfg.seed + 2)  # RT draws at evaluation (and pipeline-fixed)
    eot_gen = torch.Generator().manual_seed(cfg.seed + 3)  # RT draws inside the attack (pipeline threat)
    pipeline = models.pipeline
    correct, t0, examples, attack, reused = [], time.perf_counter(), None, None, 0
    ckey = classifier_key(models, cfg) if adv_cache is not None and cfg.threat in ("classifier", "bare") else None
    bar = common.progress(len(test), f"{cfg.threat}/{spec.key}", show_progress)
    for i in range(0, len(test), cfg.batch_size):
        x = (test.images[i : i + cfg.batch_size].float() / 255).to(device)
        y = test.labels[i : i + cfg.batch_size].to(device)
        draws = None
        if cfg.threat in ("classifier", "bare"):
            target = models.classifier
        elif cfg.threat == "transfer":
            target = models.source
        elif cfg.threat == "pipeline":
            target = _FreshDraws(pipeline, eot_gen, cfg.attack_samples)
        else:
            draws = _draws(pipeline, len(x), pipeline.samples, eval_gen, device)
            target = _FixedDraws(pipeline, draws)
        if cfg.quantize:
            target = nn.Sequential(BPDA(Quantize8()), target)
        attack = build_attack(spec, _Autocast(target, cfg.bf16, device.type), gen)
        cached = adv_cache.get((ckey, json.dumps(spec.params, sort_keys=True), i)) if ckey else None
        if cached is not None:
            x_adv, reused = cached.to(device), reused + len(x)
        else:
            x_adv = attack(x, y) if attack is not None else x
            if cfg.quantize:
                x_adv = Quantize8()(x_adv)
            if ckey:
                adv_cache[(ckey, json.dumps(spec.params, sort_keys=True), i)] = x_adv.detach().cpu()
        with torch.no_grad():
            purified = None
            if pipeline is None:
                pred = models.classifier(x_adv).argmax(1)
            else:
                d = draws if draws is not None else _draws(pipeline, len(x), pipeline.samples, eval_gen, device)
                if models.served is not None:
                    pred = models.served(x_adv, d).argmax(1)
                else:
                    out = pipeline.run(x_adv, d)
                    pred, purified = out["probs"].argmax(1), out["purified"]
            if examples is None and grid_n > 0:
                g = min(grid_n, len(x))
                examples = {"clean": x[:g], "adversarial": x_adv[:g], "labels": y[:g], "pred": pred[:g],
                            "pred_classifier": models.classifier(x_adv[:g]).argmax(1)}
                if purified is not None:
                    examples["purified"] = purified[:g].float()
                examples = {k: v.detach().cpu().clone() for k, v in examples.items()}
        correct.append((pred == y).cpu())
        bar.update(len(x))
    bar.close()
    mask = torch.cat(correct)
    k, n = int(mask.sum()), len(mask)
    lo, hi = wilson(k, n)
    result = {"attack": spec.family, "params": dict(spec.params), "accuracy": k / n, "correct": k, "n": n, "ci95": [lo, hi],
              "seconds": round(time.perf_counter() - t0, 2), "correct_mask": mask.int().tolist()}
    if reused:
        result["examples_reused"] = reused  # crafted for an earlier row with the same classifier
    return result, examples


def _fingerprint(models: Models, cfg: EvalConfig, spec: AttackSpec, device) -> str:
    conf = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    conf["device_type"] = device.type
    blob = json.dumps({"models": models.fingerprint, "config": conf, "attack": spec.family,
                       "params": spec.params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_examples(path: Path, examples: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(examples, str(tmp))
    tmp.replace(path)


def load_examples(path: Path) -> dict | None:
    from safetensors.torch import load_file

    try:
        return load_file(str(path)) if path.exists() else None
    except Exception:  # noqa: BLE001  (a broken file only costs the image grid)
        return None


def run_eval(models: Models, test: Dataset, cfg: EvalConfig, out: Path | None = None,
             show_progress: bool = True, adv_cache: dict | None = None) -> dict:
    """Run every attack of ``cfg`` (plus the sanity plan) on ``test``; with ``out``, resume from and write
    per-attack results there. Returns the report (see ``write_report``)."""
    if cfg.threat not in THREATS:
        raise AtopError(f"unknown threat model {cfg.threat!r}; valid: {', '.join(THREATS)}")
    device = _device(cfg.device)
    if cfg.bf16 is None:
        cfg = replace(cfg, bf16=common.fast_bf16(device))
    keys = list(dict.fromkeys(a.strip().lower() for a in cfg.attacks if a.strip()))
    plan = None
    extra = [f"{cfg.sweep_attack}@eps={_fmt_eps(e)}" for e in cfg.eps_sweep] if cfg.eps_sweep and not cfg.sanity else []
    if cfg.sanity:
        plan = sanity_plan(cfg)
        extra = plan["sweep"] + [plan[r] for r in ("base", "more_steps", "unbounded", "square", "eot_low", "eot_high")
                                 if r in plan]
    keys += [k for k in extra if k not in keys]
    specs = {k: parse_attack(k, cfg) for k in keys}
    for m in (models.classifier, models.pipeline, models.source):
        if m is not None:
            m.to(device).eval()
    t_start, results, examples = time.perf_counter(), {}, {}
    adir = out / "attacks" if out is not None else None
    if adir is not None:
        adir.mkdir(parents=True, exist_ok=True)
    same: dict[str, str] = {}  # fingerprint -> first key: keys that resolve to the same attack run once
    for key, spec in specs.items():
        fp = _fingerprint(models, cfg, spec, device)
        if fp in same:
            results[key] = {**results[same[fp]], "same_as": same[fp]}
            if same[fp] in examples:
                examples[key] = examples[same[fp]]
            continue
        same[fp] = key
        path = adir / f"{spec.slug}.json" if adir is not None else None
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                saved = {}
            if saved.get("fingerprint") == fp:
                results[key] = {**saved["result"], "resumed": True}
                ex = load_examples(adir / f"{spec.slug}.examples.safetensors")
                if ex is not None:
                    examples[key] = ex
                _print_line(cfg.threat, key, results[key], resumed=True)
                continue
        res, ex = _run_attack(spec, models, test, cfg, device, show_progress, cfg.grid, adv_cache)
        results[key] = {**res, "resumed": False}
        if ex is not None:
            examples[key] = ex
        if path is not None:
            if ex is not None:
                _save_examples(adir / f"{spec.slug}.examples.safetensors", ex)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"fingerprint": fp, "key": key, "result": res}, indent=1))
            tmp.replace(path)  # written last and atomically: a killed run never leaves a half result
        _print_line(cfg.threat, key, results[key])
    checks = None
    if plan is not None:
        checks = sanity_checks({k: r["accuracy"] for k, r in results.items()}, specs, plan, len(test))
    rt = models.pipeline.transform.to_dict() if models.pipeline is not None else None
    report = {
        "model": models.name, "threat": cfg.threat, "threat_description": THREATS[cfg.threat],
        "source": cfg.source if cfg.threat == "transfer" else None,
        "n": len(test), "seed": cfg.seed, "config": asdict(cfg), "rt": rt,
        "tta": getattr(models.classifier, "mode", None), "attacks": keys,
        "samples": models.pipeline.samples if models.pipeline is not None else None,
        "mirror": models.pipeline.mirror if models.pipeline is not None else None,
        "results": results, "sanity": checks, "sanity_plan": plan,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "compute_seconds": round(sum(r["seconds"] for r in results.values()), 2),
        "machine": machine(), "command": common.command_line(), "git_commit": common.git_commit(),
        "fingerprint": models.fingerprint,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "classes": test.classes, "data": test.source,
    }
    if out is not None:
        from .eval_report import write_report

        write_report(report, out, examples)
    if checks is not None:
        for c in checks:
            print(f"sanity {'PASS' if c['passed'] else 'FAIL'}: {c['check']}: {c['detail']}", flush=True)
    report["_examples"] = examples
    return report


def _print_line(threat, key, r, resumed=False):
    lo, hi = r["ci95"]
    tail = "resumed" if resumed else f"{r['seconds']}s"
    print(f"{threat:>15} {key:>24}: {r['accuracy']:.4f}  [{lo:.3f}, {hi:.3f}]  ({tail})", flush=True)


def test_subset(cfg: EvalConfig) -> Dataset:
    return load_split(cfg.data or default_data_root(), "test").balanced_subset(cfg.n, seed=cfg.seed)


def validate(cfg: EvalConfig) -> None:
    """Fail fast, before loading anything, on arguments a user can fix."""
    if cfg.threat not in THREATS:
        raise AtopError(f"unknown threat model {cfg.threat!r}; valid: {', '.join(THREATS)}")
    if cfg.threat == "transfer" and not cfg.source:
        raise AtopError("--threat transfer needs --source <model folder> (the model the examples are crafted on)")
    if cfg.graph not in GRAPHS:
        raise AtopError(f"unknown --graph {cfg.graph!r}; valid: {', '.join(GRAPHS)}")
    if cfg.url is not None and cfg.graph != "torch":
        raise AtopError("--url and --graph each choose what scores the images: give one")
    if cfg.url is not None and not cfg.url.startswith(("http://", "https://")):
        raise AtopError(f"--url must be http://host:port or https://..., got {cfg.url!r}")
    for name in ("samples", "attack_samples"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise AtopError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.n < 1 or cfg.batch_size < 1:
        raise AtopError(f"--n and --batch-size must be positive, got {cfg.n} and {cfg.batch_size}")
    if cfg.tta is not None and cfg.tta not in TTA_MODES:
        raise AtopError(f"unknown --tta {cfg.tta!r}; valid: {', '.join(TTA_MODES)}")
    if cfg.sigma is not None and not 0 <= cfg.sigma < math.inf:
        raise AtopError(f"--sigma must be a finite number >= 0, got {cfg.sigma}")
    if cfg.rate is not None and not 0 <= cfg.rate < 1:
        raise AtopError(f"--rate must be in [0, 1), got {cfg.rate}")
    if not cfg.attacks and not cfg.sanity:
        raise AtopError("--attacks names no attack: give at least one, e.g. clean,fgsm,pgd-20")
    for a in cfg.attacks:
        parse_attack(a, cfg)
    if cfg.sanity:
        sanity_plan(cfg)
    _device(cfg.device)


def evaluate(folder, cfg: EvalConfig, show_progress: bool = True, out: Path | None = None,
             adv_cache: dict | None = None) -> dict:
    """Evaluate a model folder (``None``: the shipped one) under ``cfg``; with ``out``, write a report folder.
    ``adv_cache``: shared between calls, the ``classifier`` threat crafts each attack once per classifier."""
    validate(cfg)
    models = load_models(folder, cfg)
    return run_eval(models, test_subset(cfg), cfg, Path(out) if out is not None else None, show_progress, adv_cache)


def table7(folders: list[str], cfg: EvalConfig, out: Path, rts: list[str] | None = None,
           show_progress: bool = True) -> str:
    """The AToP paper's Table 7 grid: for each model folder (and each RT kind in ``rts``, default the folder's
    own), accuracy under the classifier threat for clean, FGSM, PGD-10, PGD-20, PGD-1000. Each cell is a
    resumable report folder under ``out``; returns (and writes to ``out/table7.md``) one Markdown table."""
    cfg = replace(cfg, threat="classifier", attacks=cfg.attacks or TABLE7_ATTACKS, sanity=False, eps_sweep=())
    validate(cfg)
    for r in rts or ():
        if r not in RT_KINDS:
            raise AtopError(f"unknown RT kind {r!r}; valid: {', '.join(RT_KINDS)}")
    for f in folders:
        modelio.read_card(modelio.resolve(f))  # all folders checked before the first long run
    test = test_subset(cfg)
    rows, adv_cache = [], {}  # rows sharing a classifier share its adversarial examples (classifier threat)
    for f in folders:
        for rt in rts or [None]:
            c = replace(cfg, rt=rt)
            models = load_models(f, c)
            kind = models.pipeline.transform.kind
            name = Path(models.name).name
            rep = run_eval(models, test, c, out / f"{name}-{kind}", show_progress, adv_cache)
            rows.append((name, kind, rep))
    from .eval_report import table7_markdown

    md = table7_markdown(rows, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table7.md").write_text(md)
    return md


def table1(folders: list[str], cfg: EvalConfig, out: Path, show_progress: bool = True) -> str:
    """The AToP paper's Table 1 comparison in one run: each model folder is a row; a folder without a purifier
    (vanilla or adversarially trained classifier) under the ``bare`` threat, one with a purifier (pre-trained or
    AToP) under the ``classifier`` threat: the same attacks on each row's classifier, examples shared between
    rows with the same classifier. Columns: clean, FGSM (the attack AToP trains on), unseen attacks."""
    cfg = replace(cfg, attacks=cfg.attacks or TABLE1_ATTACKS, sanity=False, eps_sweep=())
    for f in folders:
        modelio.read_card(modelio.resolve(f))
    test, rows, adv_cache = None, [], {}
    for f in folders:
        card = modelio.read_card(modelio.resolve(f))
        c = replace(cfg, threat="classifier" if "purifier" in card else "bare")
        validate(c)
        test = test if test is not None else test_subset(c)
        models = load_models(f, c)
        name = Path(models.name).name
        rows.append((name, c.threat, run_eval(models, test, c, out / name, show_progress, adv_cache)))
    from .eval_report import table1_markdown

    md = table1_markdown(rows, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.md").write_text(md)
    return md
