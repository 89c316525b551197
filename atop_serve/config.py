"""Plain-data configuration shared by training, export and serving (no torch import here)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

RT_KINDS = ("rt1", "rt2", "rt3")


@dataclass(frozen=True)
class RTConfig:
    """The random transform RT applied before the purifier.

    Every ``block`` x ``block`` block of the image is missing independently with probability ``rate``
    (defaults: 4x4 blocks on 32x32, an 8x8 grid, 25 % missing on average); visible pixels get Gaussian noise
    of standard deviation ``sigma`` (clipped to [0, 1]); missing pixels are set to 0 and flagged in a mask
    channel.

    - ``rt1``: masking only (sigma = 0).
    - ``rt2``: masking + noise.
    - ``rt3``: ``views`` independent RT2 draws mixed with random convex weights: w ~ Dirichlet(1, ..., 1),
      drawn per image as normalised Exp(1) variables; image = sum_v w_v view_v and mask = sum_v w_v mask_v (a
      soft mask: the share of the mix in which the pixel was missing).

    All randomness enters as explicit standard draws, so the same numbers give the same transform in PyTorch,
    in the exported ONNX graph and in tests:
      u_mask (N, K, V, 1, G, G) ~ U[0, 1)   -> block missing where u_mask < rate
      z      (N, K, V, 3, H, W) ~ N(0, 1)   -> noise sigma * z
      u_mix  (N, K, V)          ~ U(0, 1)   -> mixing weights (rt3 only)
    with N images, K purification samples per image and V views.
    """

    kind: str = "rt2"
    block: int = 4
    rate: float = 0.25
    sigma: float = 0.1
    views: int = 1
    image_size: int = 32

    def __post_init__(self):
        if self.kind not in RT_KINDS:
            raise ValueError(f"unknown random transform {self.kind!r}; valid: {', '.join(RT_KINDS)}")
        if not (isinstance(self.block, int) and isinstance(self.image_size, int) and 1 <= self.block <= self.image_size):
            raise ValueError(f"block and image_size must be integers with 1 <= block <= image_size, got {self.block} "
                             f"and {self.image_size}")
        if self.image_size % self.block:
            raise ValueError(f"block {self.block} does not divide image size {self.image_size}")
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {self.rate}")
        if not 0 <= self.sigma < float("inf"):
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma}")
        if self.kind == "rt1" and self.sigma != 0:
            object.__setattr__(self, "sigma", 0.0)
        if self.kind != "rt3" and self.views != 1:
            object.__setattr__(self, "views", 1)
        if self.kind == "rt3" and self.views < 2:
            raise ValueError("rt3 mixes at least 2 views")

    @classmethod
    def named(cls, kind: str, sigma: float = 0.1, views: int = 3, **kw) -> "RTConfig":
        return cls(kind=kind, sigma=0.0 if kind == "rt1" else sigma, views=views if kind == "rt3" else 1, **kw)

    @property
    def grid(self) -> int:
        return self.image_size // self.block

    def input_shapes(self, n: int, k: int = 1) -> dict[str, tuple[int, ...]]:
        """Shapes of the standard draws for n images and k samples (names as in the exported graph)."""
        s, g, v = self.image_size, self.grid, self.views
        shapes = {"u_mask": (n, k, v, 1, g, g), "z": (n, k, v, 3, s, s), "u_mix": (n, k, v)}
        return shapes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RTConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown RT config keys {sorted(unknown)}")
        return cls(**d)


def draw_rt_inputs_numpy(cfg: RTConfig, n: int, k: int = 1, rng=None) -> dict:
    """The standard draws for the exported graph, in numpy (serving draws them without torch).

    ``rng`` is a ``numpy.random.Generator``; by default one seeded from the OS entropy pool, so every
    call gets fresh, unpredictable randomness.
    """
    import numpy as np

    rng = rng if rng is not None else np.random.default_rng()
    shp = cfg.input_shapes(n, k)
    return {
        "u_mask": rng.random(shp["u_mask"], dtype=np.float32),
        "z": rng.standard_normal(shp["z"], dtype=np.float32),
        "u_mix": (1.0 - rng.random(shp["u_mix"], dtype=np.float32)),  # (0, 1]: log() is finite
    }
