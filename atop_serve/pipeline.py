"""The purify-then-classify pipeline f(g(RT(x))), and test-time augmentation for classifiers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import RTConfig
from .transforms import RTInputs, draw_rt_inputs, random_transform

TTA_MODES = ("none", "flip", "flip-translate")


class TTAClassifier(nn.Module):
    """Average logits over test-time views: ``flip`` (2 passes) or ``flip-translate`` (6: airbench's
    mirror + 1-px shifts, weighted 1/2 centre, 1/4 each shift)."""

    def __init__(self, classifier: nn.Module, mode: str = "flip"):
        super().__init__()
        if mode not in TTA_MODES:
            raise ValueError(f"unknown TTA mode {mode!r}; valid: {', '.join(TTA_MODES)}")
        self.classifier, self.mode = classifier, mode

    def _mirror(self, x):
        return 0.5 * (self.classifier(x) + self.classifier(x.flip(-1)))

    def forward(self, x):
        if self.mode == "none":
            return self.classifier(x)
        if self.mode == "flip":
            return self._mirror(x)
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifts = [padded[..., 0:h, 0:w], padded[..., 2 : h + 2, 2 : w + 2]]
        return 0.5 * self._mirror(x) + 0.25 * sum(self._mirror(s) for s in shifts)


class PurifiedClassifier(nn.Module):
    """Images in [0, 1] (N, 3, H, W) -> logits of f(g(RT(x))).

    Each call draws fresh randomness unless given a ``generator`` or explicit ``rt_inputs`` (leading dims
    (N, K, V), see ``RTConfig``). ``samples=K`` averages K independent purifications: ``forward``
    returns the mean of their logits, ``run`` also returns the mean of their class probabilities (the
    prediction the service reports).
    ``mirror=True`` feeds the odd-numbered samples (k = 1, 3, ...) the horizontally mirrored image: flip
    test-time augmentation folded into the K purifications, at no extra cost (K = 1 is unchanged).
    Differentiable end to end, so any PyTorch attack can target it.
    """

    def __init__(self, purifier: nn.Module, classifier: nn.Module, transform: RTConfig, samples: int = 1,
                 mirror: bool = False):
        super().__init__()
        self.purifier, self.classifier, self.transform, self.samples = purifier, classifier, transform, samples
        self.mirror = mirror

    def views(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """x (N, 3, H, W) -> the K samples' input images (N*K, 3, H, W), sample-major within each image."""
        xs = x.unsqueeze(1).expand(x.size(0), k, *x.shape[1:])
        if self.mirror:
            odd = (torch.arange(k, device=x.device) % 2 == 1).view(1, k, 1, 1, 1)
            xs = torch.where(odd, xs.flip(-1), xs)
        return xs.reshape(-1, *x.shape[1:])

    def purify(self, x: torch.Tensor, inputs: RTInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) with flat draws (leading dims (B, V)) -> (purified, transformed, mask)."""
        x_t, mask = random_transform(x, self.transform, inputs)
        return self.purifier(x_t, mask), x_t, mask

    def run(self, x: torch.Tensor, rt_inputs: RTInputs) -> dict[str, torch.Tensor]:
        """Everything the service shows: logits, probabilities, and the first sample's images."""
        n, k = x.size(0), rt_inputs.u_mask.size(1)
        purified, x_t, mask = self.purify(self.views(x, k), rt_inputs.flat())
        logits = self.classifier(purified).view(n, k, -1)
        # Branch-free in K, so one exported graph serves every K: the prediction is the argmax of the mean
        # class probabilities; "logits" is the mean of the K samples' logits (exactly the logits for K = 1).
        probs, out_logits = logits.softmax(-1).mean(1), logits.mean(1)
        first = lambda t: t.view(n, k, *t.shape[1:])[:, 0]  # noqa: E731
        return {"logits": out_logits, "probs": probs, "purified": first(purified),
                "transformed": first(x_t), "mask": first(mask)}

    def forward(self, x, samples: int | None = None, generator: torch.Generator | None = None,
                rt_inputs: RTInputs | None = None) -> torch.Tensor:
        if rt_inputs is None:
            rt_inputs = draw_rt_inputs(self.transform, x.size(0), samples or self.samples, generator, x.device)
        return self.run(x, rt_inputs)["logits"]


class PipelineGraph(nn.Module):
    """The exported function: (images, u_mask, z, u_mix) -> (probs, logits, purified, transformed, mask)."""

    OUTPUTS = ("probs", "logits", "purified", "transformed", "mask")

    def __init__(self, pipeline: PurifiedClassifier):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, images, u_mask, z, u_mix):
        out = self.pipeline.run(images, RTInputs(u_mask, z, u_mix))
        return tuple(out[k] for k in self.OUTPUTS)
