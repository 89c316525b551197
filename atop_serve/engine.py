"""Run a serving folder's purified classifier f(g(RT(x))) for the service, without torch.

The exported graph (``pipeline.onnx``, see export/onnx_export.py) takes images plus the RT's standard draws;
this module draws them and runs the graph with ONNX Runtime, or, for a folder without the graph, the eager
PyTorch pipeline when torch is installed.

Rows. The service's unit of work is a row: one image with one purification sample. A request for K samples of
an image becomes K rows whose class probabilities are averaged, exactly what the graph computes for (N=1, K),
so rows of requests with different K batch into one call. Where the card sets ``pipeline.mirror``, the
odd-numbered rows of a request hold the mirrored image (``sample_rows``), as the graph's own (N, K) layout does.
Each row draws its RT inputs from its own seed:
``draw_rt_inputs_numpy(rt, 1, 1, default_rng(row_seed))``; the K row seeds of a request come from
``row_seeds(seed, K)``: from OS entropy when ``seed`` is None (fresh, unpredictable draws: the default),
reproducibly from ``seed`` otherwise (``request_draws`` gives the same draws in graph layout (1, K, ...)).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, Sequence, get_args

import numpy as np

from .config import RTConfig, draw_rt_inputs_numpy
from .cpu import int8_saturates
from .errors import ModelError
from .modelio import ONNX_FILE, OPT_ONNX_FILE, check_external_data, mirrored, read_card

OUTPUTS = ("probs", "logits", "purified", "transformed", "mask")
View = Literal["purified", "transformed", "mask"]  # the output images a row can return
VIEWS = get_args(View)
AUTO_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ randomness
def row_seeds(seed: int | None, k: int) -> list[int]:
    """The K per-sample seeds of one request (128-bit): from OS entropy, or reproducibly from ``seed``."""
    if seed is None:  # the service's default: 128 bits from the OS per sample
        raw = os.urandom(16 * k)
        return [int.from_bytes(raw[16 * i:16 * i + 16], "little") for i in range(k)]
    words = np.random.SeedSequence(seed).generate_state(4 * k, np.uint32).reshape(k, 4)
    return [int.from_bytes(w.tobytes(), "little") for w in words]


def images_row_seeds(seeds: Sequence[int | None], samples: int) -> list[int]:
    """The row seeds of N images with K samples each (one request seed or None per image), image-major: image i
    owns rows i*K .. i*K + K - 1."""
    return [s for seed in seeds for s in row_seeds(seed, samples)]


def mean_over_samples(row_probs: np.ndarray, samples: int) -> np.ndarray:
    """Image-major row probabilities (N*K, C) -> each image's mean over its K samples (N, C)."""
    return np.asarray(row_probs, dtype=np.float64).reshape(-1, samples, row_probs.shape[-1]).mean(1)


def sample_rows(images: np.ndarray, samples: int, mirror: bool = False) -> np.ndarray:
    """Images uint8 (N, S, S, 3) -> their K samples' rows (N*K, S, S, 3), image-major. With ``mirror`` (the card's
    ``pipeline.mirror``) the odd-numbered samples (k = 1, 3, ...) get the image mirrored left-right: what
    ``PurifiedClassifier.views`` does inside the graph for (N, K) inputs, done here because a row is a K = 1 call."""
    rows = np.repeat(images, samples, axis=0)
    if mirror and samples > 1:
        odd = np.arange(len(rows)) % samples % 2 == 1
        rows[odd] = rows[odd][:, :, ::-1]
    return rows


def rows_draws(rt: RTConfig, seeds: Sequence[int]) -> dict[str, np.ndarray]:
    """The draws of rows (one sample each), stacked: leading dims (len(seeds), 1, V)."""
    per_row = [draw_rt_inputs_numpy(rt, 1, 1, np.random.default_rng(s)) for s in seeds]
    return {name: np.concatenate([d[name] for d in per_row]) for name in per_row[0]}


def request_draws(rt: RTConfig, seed: int | None, k: int) -> dict[str, np.ndarray]:
    """One request's draws in the graph's layout (1, K, V, ...): what the service feeds for this seed."""
    return {name: a.reshape(1, k, *a.shape[2:]) for name, a in rows_draws(rt, row_seeds(seed, k)).items()}


def feed_for(input_names: Sequence[str], images: np.ndarray, draws: dict) -> dict:
    """The feed dict for an ONNX Runtime session: images plus the draws the graph uses (it drops unused ones)."""
    feed = {"images": images}
    feed.update({name: draws[name] for name in input_names if name != "images"})
    return feed


# ------------------------------------------------------------------------------------------ engines
class Engine:
    """A loaded pipeline. Subclasses implement ``run``; everything else is shared."""

    backend = "?"
    providers: list[str] = []

    def __init__(self, folder: Path, card: dict, rt: RTConfig):
        self.folder, self.card, self.rt, self.classes = folder, card, rt, list(card["classes"])
        self.mirror = mirrored(card)  # odd-numbered samples see the mirrored image (sample_rows)

    def run(self, images: np.ndarray, draws: dict, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """images float32 (N, 3, S, S) in [0, 1] and draws (N, K, V, ...) -> the named graph outputs."""
        raise NotImplementedError

    def predict_rows(self, images: np.ndarray, seeds: Sequence[int], views: Sequence[str | None] = ()):
        """Rows -> (probs (R, C) float32, per row the uint8 (S, S, 3) image of its requested view or None).

        ``images`` uint8 (R, S, S, 3), one seed per row; ``views`` (optional) names, per row, an output image
        to return: purified, transformed or mask.
        """
        views = list(views) or [None] * len(seeds)
        wanted = sorted({v for v in views if v})
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
        out = self.run(x, rows_draws(self.rt, seeds), ["probs", *wanted])
        pictures = [None if v is None else to_uint8(out[v][i]) for i, v in enumerate(views)]
        return out["probs"].astype(np.float32, copy=False), pictures

    def classify(self, images: np.ndarray, samples: int = 1, seeds: Sequence[int | None] | None = None) -> np.ndarray:
        """In-process classification as the service does it: uint8 (N, S, S, 3) -> mean class probabilities (N, C)."""
        seeds = seeds if seeds is not None else [None] * len(images)
        probs, _ = self.predict_rows(sample_rows(images, samples, self.mirror), images_row_seeds(seeds, samples))
        return mean_over_samples(probs, samples)

    def describe(self) -> dict:
        return {"backend": self.backend, "providers": list(self.providers), "versions": {}}


class OnnxEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, folder: Path, card: dict, rt: RTConfig, threads: int = 0, providers: Sequence[str] = (),
                 file: str = ONNX_FILE):
        super().__init__(folder, card, rt)
        self.file = file
        # the shipped faster variant this CPU must not run (set when choose_graph fell back to fp32 for it)
        self.variant_not_served = (int8_unsafe_here(card) if file == ONNX_FILE and (folder / OPT_ONNX_FILE).exists()
                                   else None)
        self.session = make_session(folder / file, threads, providers)
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, images, draws, outputs):
        values = self.session.run(list(outputs), feed_for(self.input_names, images, draws))
        return dict(zip(outputs, values))

    def describe(self) -> dict:
        import onnxruntime as ort

        return {**super().describe(), "graph": self.file, "variant": shipped_variant(self.card) if self.file == OPT_ONNX_FILE
                else "fp32", "versions": {"onnxruntime": ort.__version__},
                **({"variant_not_served": self.variant_not_served} if self.variant_not_served else {})}


class TorchEngine(Engine):
    """Eager PyTorch fallback for a folder without pipeline.onnx (needs torch; never used when the graph exists)."""

    backend = "pytorch"

    def __init__(self, folder: Path, card: dict, rt: RTConfig, threads: int = 0):
        import torch

        from .modelio import load_pipeline

        super().__init__(folder, card, rt)
        if threads > 0:
            torch.set_num_threads(threads)
        self.pipeline = load_pipeline(folder)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipeline.to(self.device)
        self.providers = [self.device]

    def run(self, images, draws, outputs):
        import torch

        from .transforms import RTInputs

        t = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        with torch.inference_mode():
            out = self.pipeline.run(t(images), RTInputs(t(draws["u_mask"]), t(draws["z"]), t(draws["u_mix"])))
        return {k: out[k].float().cpu().numpy() for k in outputs}

    def describe(self) -> dict:
        import torch

        return {**super().describe(), "versions": {"torch": torch.__version__}}


def make_session(path: Path, threads: int = 0, providers: Sequence[str] = ()):
    """An ONNX Runtime session as the service runs one: ``threads`` intra-op threads (0: one per core) that sleep
    when idle instead of spinning, full graph optimisation, providers from ``choose_providers``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(0, threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chosen = choose_providers(providers)
    try:
        return ort.InferenceSession(str(path), opts, providers=chosen)
    except Exception as e:  # noqa: BLE001  (onnxruntime raises its own untyped errors for bad files)
        raise ModelError(f"cannot load {path}: {e}") from None


def choose_providers(requested: Sequence[str] = ()) -> list[str]:
    """ONNX Runtime providers: the requested ones (all must be available), else CUDA when present, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ModelError(f"ATOP_PROVIDERS names unavailable providers {missing}; available: {available}")
        return list(requested)
    return [p for p in AUTO_PROVIDERS if p in available]


def read_serving_card(folder: Path) -> tuple[dict, RTConfig]:
    """A servable folder's card and RT config (ModelError if the folder holds no purifier)."""
    card = read_card(folder)
    if "rt" not in card.get("purifier", {}):
        raise ModelError(f"model folder {folder} holds no purifier: the service serves f(g(RT(x))) only")
    try:
        return card, RTConfig.from_dict(card["purifier"]["rt"])
    except (TypeError, ValueError) as e:
        raise ModelError(f"model card in {folder} has a bad RT config: {e}") from None


def shipped_variant(card: dict) -> str | None:
    """The faster CPU variant the export shipped as pipeline.opt.onnx (e.g. "int8"), or None."""
    return ((card.get("export") or {}).get("cpu_variant") or {}).get("shipped") or None


def variant_weight_bits(card: dict) -> int | None:
    """The weight range of the shipped int8 variant: 7 (``reduce_range``, exact on every CPU) or 8 (exported before
    7-bit weights, or by hand: the card does not say); None when the variant is not int8."""
    cpu_variant = (card.get("export") or {}).get("cpu_variant") or {}
    if not str(cpu_variant.get("shipped") or "").startswith("int8"):
        return None
    return int(cpu_variant.get("weight_bits", 8))


def int8_unsafe_here(card: dict) -> str | None:
    """Why the shipped int8 variant must not run on this CPU (8-bit weights where ONNX Runtime's int8 kernels
    saturate: see atop_serve.cpu), or None."""
    if variant_weight_bits(card) == 8 and int8_saturates():
        return ("its int8 variant has 8-bit weights and this x86 CPU has no VNNI, where ONNX Runtime's int8 kernels "
                "saturate (wrong sums; re-export with this version for 7-bit weights)")
    return None


def choose_graph(folder: Path, card: dict, graph: str = "auto", providers: Sequence[str] = ()) -> str:
    """Which exported graph to run. ``auto``: the shipped faster CPU variant when the session will run on the
    CPU provider only (the variant is tuned and verified for it) and its arithmetic is exact on this CPU
    (``int8_unsafe_here``), else the fp32 graph; ``fp32``; ``opt`` (forced: a warning where it is not exact)."""
    has_opt = (folder / OPT_ONNX_FILE).exists() and shipped_variant(card) is not None
    unsafe = int8_unsafe_here(card) if has_opt else None
    if graph == "opt":
        if not has_opt:
            raise ModelError(f"ATOP_GRAPH=opt but {folder} ships no faster CPU variant ({OPT_ONNX_FILE} listed in "
                             "the card's export.cpu_variant.shipped); use ATOP_GRAPH=auto or fp32")
        if unsafe:
            log.warning("ATOP_GRAPH=opt: serving %s although %s", OPT_ONNX_FILE, unsafe)
        return OPT_ONNX_FILE
    if graph == "fp32" or not has_opt:
        return ONNX_FILE
    if choose_providers(providers) != ["CPUExecutionProvider"]:
        return ONNX_FILE
    if unsafe:
        log.warning("serving %s instead of %s: %s", ONNX_FILE, OPT_ONNX_FILE, unsafe)
        return ONNX_FILE
    return OPT_ONNX_FILE


def load_engine(folder: Path, threads: int = 0, providers: Sequence[str] = (), graph: str = "auto") -> Engine:
    """The engine for a serving folder: its ONNX graph (``choose_graph``), or the eager fallback when the graph
    is absent."""
    folder = Path(folder)
    card, rt = read_serving_card(folder)
    if (folder / ONNX_FILE).exists():
        file = choose_graph(folder, card, graph, providers)
        check_external_data(folder, card, file)
        engine: Engine = OnnxEngine(folder, card, rt, threads, providers, file)
    else:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ModelError(f"model folder {folder} has no {ONNX_FILE} (make it with `atop export`) and torch, "
                             "needed for the eager fallback, is not installed") from None
        log.warning("%s has no %s: serving the eager PyTorch pipeline (slower; export the graph)", folder, ONNX_FILE)
        engine = TorchEngine(folder, card, rt, threads)
    probs, _ = engine.predict_rows(np.zeros((1, rt.image_size, rt.image_size, 3), np.uint8), [0])  # warm-up + check
    if probs.shape != (1, len(engine.classes)):
        raise ModelError(f"{folder}: the pipeline gives {probs.shape[1]} class scores but the card names "
                         f"{len(engine.classes)} classes")
    return engine


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A (C, H, W) image in [0, 1] (C = 1 or 3) -> uint8 (H, W, 3)."""
    a = np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else np.ascontiguousarray(a)
