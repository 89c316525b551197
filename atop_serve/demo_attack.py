"""The attack demo's attack: Square attack (Andriushchenko et al., "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020), l_inf, against the bare classifier f. numpy only, no torch.

Threat model: untargeted, l_inf ball of radius ``eps`` (default 8/255) around the image, score-based black box:
the attack sees f's logits, never its gradients, so it runs on ONNX Runtime in the torch-free service. The loss
is f's margin ``logit[y] - max_{j != y} logit[j]`` for the label ``y`` it must move f away from (the service
passes f's own clean prediction, the true class of an upload being unknown). Random search: start from vertical
stripes of +-eps, then, per query, set one random square window (side shrinking on the paper's schedule) to
+-eps per channel and keep the change if the margin drops. It stops as soon as the margin is negative (f
fooled), or when the query or the time budget runs out: a bounded demo, not a robustness evaluation.

It works on uint8 pixels: every perturbation is +-eps (eps in 1/255 steps) clipped to [0, 255], so the
adversarial image is an exact 8-bit image: what the page shows and the purified pipeline classifies is what
fooled f.

    bare = BareClassifier(folder)                              # the serving folder's classifier.onnx
    y = int(bare.logits(pixels[None])[0].argmax())
    result = square_attack(bare.logits, pixels, y, eps=8, max_queries=2000, time_limit=3.0)
    result.adversarial, result.fooled, result.queries
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from .errors import ModelError
from .modelio import CLASSIFIER_ONNX_FILE, check_external_data

EPS_255 = 8  # the demo's budget: l_inf 8/255, the usual CIFAR-10 threat model
P_INIT = 0.05  # the paper's initial share of pixels a square changes (l_inf)
# (last iteration, divisor of P_INIT up to it): the paper's halving schedule for 10,000 queries. Kept as is for the
# demo's small budgets: rescaled to a 600-query budget, fewer attacks succeeded (see square_side).
P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256),
              (10000, 512))
Stop = Literal["fooled", "time", "queries"]
LogitsFn = Callable[[np.ndarray], np.ndarray]  # uint8 (N, S, S, 3) -> logits (N, C)


@dataclass
class AttackResult:
    adversarial: np.ndarray  # uint8 (S, S, 3), within eps of the image in l_inf
    label: int  # the class f was moved away from
    logits: np.ndarray  # f's logits on ``adversarial``
    margin: float  # logits[label] - max of the others: negative = fooled
    queries: int  # calls of f, one image each
    seconds: float
    stopped: Stop

    @property
    def fooled(self) -> bool:
        return self.margin < 0


def margin(logits: np.ndarray, label: int) -> float:
    """logit[label] - max_{j != label} logit[j]: negative when f does not predict ``label``."""
    z = np.asarray(logits, dtype=np.float64)
    return float(z[label] - np.delete(z, label).max())


def square_side(i: int, pixels: int, side: int, p_init: float = P_INIT) -> int:
    """The window side of iteration ``i``: sqrt of a share p of the ``pixels``, p halved on the paper's schedule.

    Not rescaled to the query budget (the paper's code rescales it to its n_iters): against the trained airnet
    classifier (flip-translate TTA) on 19 test images it classified right, 79 % were fooled within 600 queries
    (median 103) with this schedule, 53 % with it rescaled to 600 queries, 68 % with p_init 0.1. Past 10,000
    iterations the smallest share stays (the paper's code goes back to p_init there).
    """
    p = p_init / next((div for bound, div in P_SCHEDULE if i <= bound), P_SCHEDULE[-1][1])
    return int(min(max(round(np.sqrt(p * pixels)), 1), side - 1))


def square_attack(logits_fn: LogitsFn, image: np.ndarray, label: int, eps: int = EPS_255, max_queries: int = 2000,
                  time_limit: float = 3.0, rng: np.random.Generator | None = None, p_init: float = P_INIT,
                  clock: Callable[[], float] = time.monotonic) -> AttackResult:
    """Untargeted l_inf Square attack on one uint8 image (S, S, 3) against ``logits_fn``; see the module docstring.

    ``eps`` in 1/255 steps; at most ``max_queries`` calls of ``logits_fn`` (>= 1) and no new query after
    ``time_limit`` seconds (a query already running finishes). ``rng``: the random search's draws (default: fresh
    from OS entropy).
    """
    if max_queries < 1 or not eps >= 1 or not time_limit > 0:
        raise ValueError(f"need max_queries >= 1, eps >= 1 and time_limit > 0; got {max_queries}, {eps}, {time_limit}")
    rng = rng if rng is not None else np.random.default_rng()
    start = clock()
    x = np.asarray(image, dtype=np.int16).transpose(2, 0, 1)  # (C, H, W), room for +-eps before clipping
    c, h, w = x.shape
    signs = np.array([-eps, eps], dtype=np.int16)

    def query(candidate: np.ndarray) -> np.ndarray:
        return np.asarray(logits_fn(candidate.transpose(1, 2, 0).astype(np.uint8)[None]))[0]

    best = np.clip(x + rng.choice(signs, size=(c, 1, w)), 0, 255)  # vertical stripes
    best_logits = query(best)
    best_margin, queries = margin(best_logits, label), 1
    stopped: Stop = "fooled"
    while best_margin >= 0:
        if queries >= max_queries:
            stopped = "queries"
            break
        if clock() - start >= time_limit:
            stopped = "time"
            break
        s = square_side(queries - 1, h * w, min(h, w), p_init)
        r, q = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        window = (slice(None), slice(r, r + s), slice(q, q + s))
        current = best[window]
        for _ in range(16):  # a window that would not change wastes a query: draw again (the paper does too)
            proposal = np.clip(x[window] + rng.choice(signs, size=(c, 1, 1)), 0, 255)
            if not np.array_equal(proposal, current):
                break
        candidate = best.copy()
        candidate[window] = proposal
        logits = query(candidate)
        queries += 1
        m = margin(logits, label)
        if m < best_margin:
            best, best_logits, best_margin = candidate, logits, m
    return AttackResult(adversarial=best.transpose(1, 2, 0).astype(np.uint8), label=int(label),
                        logits=np.asarray(best_logits, dtype=np.float32), margin=best_margin, queries=queries,
                        seconds=clock() - start, stopped=stopped)


def perturbation_picture(image: np.ndarray, adversarial: np.ndarray, eps: int = EPS_255) -> np.ndarray:
    """The perturbation made visible: uint8 (S, S, 3), grey 128 = unchanged, -eps -> 0 and +eps -> 255
    (magnified 255 / (2 eps), about 16x for 8/255)."""
    delta = adversarial.astype(np.float32) - image.astype(np.float32)
    return np.clip(np.rint(127.5 + delta * (127.5 / eps)), 0, 255).astype(np.uint8)


class BareClassifier:
    """The bare classifier f of a serving folder (``classifier.onnx``, with the card's test-time augmentation):
    uint8 images (N, S, S, 3) -> logits (N, C). The graph reads its weights from the folder's
    classifier.safetensors; ``check`` compares that file with the sha256 the export recorded."""

    def __init__(self, folder: Path, card: dict, threads: int = 0, providers: Sequence[str] = (), check: bool = True):
        from .engine import make_session

        path = Path(folder) / CLASSIFIER_ONNX_FILE
        if not path.exists():
            raise ModelError(f"the model folder has no {CLASSIFIER_ONNX_FILE} (re-export it with `atop export`)")
        if check:
            check_external_data(folder, card, CLASSIFIER_ONNX_FILE)
        self.session = make_session(path, threads, providers)
        self.classes = list(card["classes"])

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(pixels).transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
        return self.session.run(["logits"], {"images": x})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
