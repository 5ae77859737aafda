"""Mask generators for SimMIM: which image regions the model has to reconstruct.

SimMIM masks square *mask units* of `mask_patch_size` pixels (32 in the paper) and feeds the encoder a
mask at its own *patch* resolution `patch_size` (16 for ViT-B, 4 for Swin), so every unit covers a
`scale x scale` block of patches with `scale = mask_patch_size // patch_size`. A generator therefore
works in two steps:

1. sample a boolean unit mask of shape `(batch_size, H / mask_patch_size, W / mask_patch_size)` with
   exactly `ceil(num_units * mask_ratio)` True entries per image (the formula of the official code);
2. upsample it to `bool_masked_pos` of shape `(batch_size, (H / patch_size) * (W / patch_size))`,
   row-major, True = masked, the tensor transformers' `*ForMaskedImageModeling` models take.

Strategies (`strategy=`):

- `"random"` (the paper's default): the masked units are a uniformly random subset.
- `"block"`: BEiT's block-wise masking (Bao et al., 2022) on the unit grid: rectangles of at least
  `block_min_units` units, aspect ratio in `[block_aspect_ratio, 1 / block_aspect_ratio]`, placed until
  the budget is spent. BEiT may stop short of the budget when no block fits; here the remainder is
  taken from the unmasked neighbours of the masked region, so the count is exact and the mask stays
  blob-shaped.
- `"central"` (the paper's ablation): deterministic; the units nearest the grid centre in the
  aspect-normalised max-norm, i.e. a centred rectangle with the grid's aspect ratio (for instance the
  central 4x4 units of an 8x8 grid at `mask_ratio=0.25`). When the count does not fill a whole
  rectangle, the outermost ring is partially filled, from the middle of its sides outwards.

Randomness comes only from `torch.Generator`s, never from global numpy/python state, so the same
generator state gives the same masks, and per-image generators make each image's mask independent of
the rest of the batch.

This module is Hub-facing (copied next to the weights for `trust_remote_code`): torch/numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

MASK_STRATEGIES = ("random", "block", "central")


def _as_hw(value, name: str) -> tuple[int, int]:
    given = value
    if isinstance(value, dict):
        if set(value) != {"height", "width"}:
            raise ValueError(f"`{name}` must be an int, a (height, width) pair or a dict with keys "
                             f"'height' and 'width'; got {name}={value!r}.")
        value = (value["height"], value["width"])
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 for v in value)
    ):
        raise ValueError(f"`{name}` must be a positive int or a (height, width) pair of positive ints; "
                         f"got {name}={given!r}.")
    return int(value[0]), int(value[1])


def validate_mask_settings(
    input_size, patch_size: int, mask_patch_size: int, mask_ratio: float, strategy: str = "random",
    size_name: str = "size",
) -> tuple[int, int]:
    """Check a masking recipe; returns `input_size` as `(height, width)`. The one rule for the mask generator, the
    processor and `SimMIMConfig` (which names the size `image_size`, via `size_name`).

    Raises a `ValueError` naming the offending argument and value when `mask_ratio` is not strictly
    between 0 and 1, `strategy` is unknown, `mask_patch_size` is not a multiple of `patch_size`, or the
    input size is not divisible by `mask_patch_size`.
    """
    height, width = _as_hw(input_size, size_name)
    for name, value in (("patch_size", patch_size), ("mask_patch_size", mask_patch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer; got {name}={value!r}.")
    if strategy not in MASK_STRATEGIES:
        raise ValueError(f"`mask_strategy` must be one of {MASK_STRATEGIES}; got mask_strategy={strategy!r}.")
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"`mask_ratio` must lie strictly between 0 and 1; got mask_ratio={mask_ratio!r}.")
    if mask_patch_size % patch_size:
        raise ValueError(
            f"`mask_patch_size` must be a multiple of patch_size={patch_size}; "
            f"got mask_patch_size={mask_patch_size}."
        )
    if height % mask_patch_size or width % mask_patch_size:
        raise ValueError(
            f"`{size_name}` must be divisible by mask_patch_size={mask_patch_size} in height and width; "
            f"got {size_name}=" + (f"{height}" if isinstance(input_size, int) else f"(height={height}, width={width})")
            + "."
        )
    return height, width


class SimMIMMaskGenerator:
    r"""
    Samples SimMIM masks for images of one size.

    Args:
        input_size (`int` or `(height, width)`): image size in pixels, divisible by `mask_patch_size`.
        patch_size (`int`): the model's patch size p; masks have `(H / p) * (W / p)` entries.
        mask_patch_size (`int`, defaults to 32): side of one mask unit in pixels, a multiple of `patch_size`.
        mask_ratio (`float`, defaults to 0.6): fraction of units to mask, in (0, 1); exactly
            `ceil(num_units * mask_ratio)` units are masked per image.
        strategy (`str`, defaults to `"random"`): `"random"`, `"block"` or `"central"` (see the module docs).
        block_min_units (`int`, defaults to 4): smallest block (in units) the `"block"` sampler proposes.
        block_aspect_ratio (`float`, defaults to 0.3): blocks have aspect ratio in `[r, 1/r]`.

    Example:
        ```python
        >>> gen = SimMIMMaskGenerator(192, patch_size=4, mask_patch_size=32, mask_ratio=0.6)
        >>> mask = gen(8, generator=torch.Generator().manual_seed(0))   # (8, 48 * 48) bool
        >>> int(gen.unit_mask(1).sum())                                   # ceil(36 * 0.6)
        22
        ```
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        patch_size: int,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        strategy: str = "random",
        block_min_units: int = 4,
        block_aspect_ratio: float = 0.3,
    ):
        self.input_size = validate_mask_settings(input_size, patch_size, mask_patch_size, mask_ratio, strategy)
        if (
            isinstance(block_aspect_ratio, bool) or not isinstance(block_aspect_ratio, (int, float))
            or not 0.0 < block_aspect_ratio <= 1.0
        ):
            raise ValueError(f"`block_aspect_ratio` must lie in (0, 1]; got block_aspect_ratio={block_aspect_ratio!r}.")
        if (
            isinstance(block_min_units, bool) or not isinstance(block_min_units, (int, np.integer))
            or block_min_units < 1
        ):
            raise ValueError(f"`block_min_units` must be a positive integer; got block_min_units={block_min_units!r}.")
        self.patch_size = patch_size
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        self.strategy = strategy
        self.block_min_units = block_min_units
        self.block_aspect_ratio = block_aspect_ratio

        self.grid_size = (self.input_size[0] // mask_patch_size, self.input_size[1] // mask_patch_size)
        self.num_units = self.grid_size[0] * self.grid_size[1]
        # As the official code (`int(np.ceil(token_count * mask_ratio))`), so the masks are bit-compatible.
        self.num_masked = math.ceil(self.num_units * mask_ratio)
        self.scale = mask_patch_size // patch_size
        self.num_patches = (self.input_size[0] // patch_size) * (self.input_size[1] // patch_size)
        self._central = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_size={self.input_size}, patch_size={self.patch_size}, "
                f"mask_patch_size={self.mask_patch_size}, mask_ratio={self.mask_ratio}, strategy={self.strategy!r})")

    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Sample `bool_masked_pos`, bool of shape `(batch_size, (H / p) * (W / p))`, True = masked.

        `generators` (one per image) makes image i's mask a function of `generators[i]` alone; otherwise
        the whole batch is drawn from `generator` (or torch's global generator when it is `None`).
        """
        return self.upsample(self.unit_mask(batch_size, generator=generator, generators=generators))

    def unit_mask(
        self,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Sample the unit-level mask, bool of shape `(batch_size, H / mask_patch_size, W / mask_patch_size)`."""
        if generators is not None:
            batch_size = len(generators)
            if batch_size == 0 or not all(isinstance(g, torch.Generator) for g in generators):
                raise ValueError(f"`generators` must be a non-empty sequence of torch.Generator (one per image); "
                                 f"got generators={generators!r}.")
        elif isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer; got batch_size={batch_size!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"`generator` must be a torch.Generator or None; got generator={generator!r}.")
        if self.strategy == "random":
            masks = self._random(batch_size, generator, generators)
        elif self.strategy == "block":
            gens = generators if generators is not None else [generator] * batch_size
            masks = torch.from_numpy(np.stack([self._block(g) for g in gens]))
        else:
            masks = self._central_mask().expand(batch_size, -1, -1).clone()
        return masks

    def upsample(self, unit_mask: torch.Tensor) -> torch.Tensor:
        """Unit mask `(B, gh, gw)` -> patch mask `(B, gh * scale * gw * scale)`, row-major."""
        batch, gh, gw = unit_mask.shape
        s = self.scale
        return unit_mask[:, :, None, :, None].expand(batch, gh, s, gw, s).reshape(batch, gh * s * gw * s)

    # ------------------------------------------------------------------ strategies
    def _random(self, batch_size, generator, generators) -> torch.Tensor:
        if generators is not None:
            noise = torch.stack([torch.rand(self.num_units, generator=g) for g in generators])
        else:
            noise = torch.rand(batch_size, self.num_units, generator=generator)
        # The `num_masked` smallest noise values are a uniformly random subset (argsort of i.i.d. noise
        # is a uniform permutation), the vectorised form of `np.random.permutation(n)[:k]`.
        masked = noise.topk(self.num_masked, dim=1, largest=False).indices
        masks = torch.zeros(batch_size, self.num_units, dtype=torch.bool)
        masks.scatter_(1, masked, True)
        return masks.view(batch_size, *self.grid_size)

    def _central_mask(self) -> torch.Tensor:
        if self._central is None:
            gh, gw = self.grid_size
            dy = (np.arange(gh) + 0.5 - gh / 2) / gh
            dx = (np.arange(gw) + 0.5 - gw / 2) / gw
            dy, dx = np.abs(dy)[:, None].repeat(gw, 1), np.abs(dx)[None, :].repeat(gh, 0)
            linf, l2 = np.maximum(dy, dx).ravel(), np.hypot(dy, dx).ravel()
            # Rounding makes the ties of a symmetric grid exact ties, so row-major order breaks them.
            order = np.lexsort((np.arange(gh * gw), np.round(l2, 9), np.round(linf, 9)))
            mask = np.zeros(gh * gw, dtype=bool)
            mask[order[: self.num_masked]] = True
            self._central = torch.from_numpy(mask.reshape(1, gh, gw))
        return self._central

    def _block(self, generator: torch.Generator | None) -> np.ndarray:
        """BEiT's `MaskingGenerator` on the unit grid, with an exact count (see the module docs)."""
        gh, gw = self.grid_size
        mask = np.zeros((gh, gw), dtype=bool)
        log_ratio = (math.log(self.block_aspect_ratio), -math.log(self.block_aspect_ratio))
        draws = _Uniforms(generator)
        count = 0
        while count < self.num_masked:
            budget = self.num_masked - count
            delta = 0
            for _attempt in range(10):  # BEiT: up to 10 proposals for one block
                u_area, u_ratio, u_top, u_left = draws.take(4)
                target_area = self.block_min_units + u_area * (budget - self.block_min_units)
                aspect = math.exp(log_ratio[0] + u_ratio * (log_ratio[1] - log_ratio[0]))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < gw and h < gh:
                    top = int(u_top * (gh - h + 1))
                    left = int(u_left * (gw - w + 1))
                    window = mask[top : top + h, left : left + w]
                    new = h * w - int(window.sum())
                    if 0 < new <= budget:
                        window[...] = True
                        delta = new
                        break
            if delta == 0:
                break
            count += delta
        # Top up from the masked region's 4-neighbourhood (or anywhere if nothing is masked yet).
        while count < self.num_masked:
            grown = mask.copy()
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(grown & ~mask)
            if candidates.size == 0:
                candidates = np.flatnonzero(~mask)
            take = min(self.num_masked - count, candidates.size)
            pick = torch.randperm(candidates.size, generator=generator)[:take].numpy()
            mask.ravel()[candidates[pick]] = True
            count += take
        return mask


# ---------------------------------------------------------------------------------------------- AvgDist
def average_masked_distance(bool_masked_pos: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """AvgDist, the paper's masking diagnostic: per image, the mean Euclidean distance in pixels from each masked
    pixel to the nearest visible pixel (distances between pixel centres: a masked pixel next to a visible one is
    at 1). The paper finds the best masks around 10-20 px.

    bool_masked_pos: (B, (H/p)*(W/p)) at the model's patch resolution p, row-major, True = masked (as the
    processor emits it). Returns (B,) float32. Raises a `ValueError` for an image with every pixel masked (no
    visible pixel to measure to) or none (no masked pixel to average over).

    Exact and loop-free over pixels: the mask is constant on p x p patches, so the squared distance transform is
    separable over patch intervals. Pass 1: for pixel row i and patch column b, the vertical distance to the
    nearest visible patch of column b; pass 2: D^2(i, j) = min_b [g^2(i, b) + (distance from column j to patch
    column b)^2]. Memory per image is H * W * (W/p) values.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size <= 0:
        raise ValueError(f"`patch_size` must be a positive integer; got patch_size={patch_size!r}.")
    height, width = _as_hw((height, width), "height, width")
    if height % patch_size or width % patch_size:
        raise ValueError(f"`height` and `width` must be divisible by patch_size={patch_size}; "
                         f"got height={height}, width={width}.")
    gh, gw = height // patch_size, width // patch_size
    mask = torch.as_tensor(bool_masked_pos)
    if mask.ndim != 2 or mask.shape[1] != gh * gw:
        raise ValueError(f"`bool_masked_pos` must have shape (batch, (H/p)*(W/p)) = (batch, {gh * gw}) for a "
                         f"{height}x{width} image and patch_size={patch_size}; got {tuple(mask.shape)}.")
    mask = mask.bool().view(-1, gh, gw).cpu()
    all_masked, none_masked = mask.flatten(1).all(1), ~mask.flatten(1).any(1)
    for name, bad in (("every pixel is masked (no visible pixel to measure to)", all_masked),
                      ("no pixel is masked (nothing to average over)", none_masked)):
        if bad.any():
            images = bad.nonzero().flatten().tolist()
            listed = f"{images[:8]}" + (f" and {len(images) - 8} more" if len(images) > 8 else "")
            raise ValueError(f"AvgDist is undefined for image(s) {listed} of `bool_masked_pos`: {name}.")

    def interval_distance(size: int, cells: int) -> torch.Tensor:
        """(size, cells): distance from pixel i to the nearest pixel of patch interval [c*p, c*p + p - 1]."""
        pixel = torch.arange(size, dtype=torch.float32)[:, None]
        start = torch.arange(cells, dtype=torch.float32)[None, :] * patch_size
        return torch.clamp(torch.maximum(start - pixel, pixel - (start + patch_size - 1)), min=0.0)

    # A masked patch is infinitely far (a column without visible patch stays at inf; pass 2 takes the minimum).
    rows_sq = interval_distance(height, gh) ** 2  # (H, gh)
    cols_sq = interval_distance(width, gw) ** 2  # (W, gw)
    result = torch.empty(mask.shape[0], dtype=torch.float32)
    for index, image in enumerate(mask):  # one image at a time bounds the (H, W, gw) intermediate
        blocked = torch.where(image, torch.inf, 0.0)  # (gh, gw)
        vertical_sq = (rows_sq[:, :, None] + blocked[None]).amin(dim=1)  # (H, gw)
        distance_sq = (vertical_sq[:, None, :] + cols_sq[None, :, :]).amin(dim=2)  # (H, W)
        masked_pixels = image.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
        result[index] = distance_sq[masked_pixels].sqrt().mean()
    return result


def expected_average_masked_distance(config, num_samples: int = 256, seed: int = 0, strategy: str | None = None
                                     ) -> float:
    """A masking recipe's expected AvgDist in pixels: the mean of `average_masked_distance` over `num_samples`
    masks drawn (seeded, so reproducible) from its generator at `config.image_size`.

    `config`: anything with `image_size`, `patch_size`, `mask_patch_size` and `mask_ratio` (a `SimMIMConfig`);
    `strategy` defaults to `config.mask_strategy` where it has one, else `"random"`. The paper's default (random,
    32 px units, ratio 0.6, 192 px) gives about 15 px.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer; got num_samples={num_samples!r}.")
    strategy = strategy if strategy is not None else getattr(config, "mask_strategy", "random")
    generator = SimMIMMaskGenerator(config.image_size, config.patch_size, config.mask_patch_size, config.mask_ratio,
                                    strategy)
    if generator.num_masked == generator.num_units:
        raise ValueError(f"`mask_ratio` masks every unit (ceil({generator.num_units} * {config.mask_ratio}) = "
                         f"{generator.num_masked} of {generator.num_units}), so AvgDist is undefined; got "
                         f"mask_ratio={config.mask_ratio!r}.")
    height, width = generator.input_size
    masks = generator(int(num_samples), generator=torch.Generator().manual_seed(seed))
    return float(average_masked_distance(masks, config.patch_size, height, width).mean())


class _Uniforms:
    """Uniform [0, 1) draws from a torch generator, fetched in chunks (one torch call per 256 draws)."""

    def __init__(self, generator: torch.Generator | None, chunk: int = 256):
        self.generator, self.chunk = generator, chunk
        self.values, self.pos = np.empty(0), 0

    def take(self, n: int) -> np.ndarray:
        if self.pos + n > self.values.size:
            self.values = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).numpy()
            self.pos = 0
        out = self.values[self.pos : self.pos + n]
        self.pos += n
        return out


__all__ = ["MASK_STRATEGIES", "SimMIMMaskGenerator", "average_masked_distance", "expected_average_masked_distance",
           "validate_mask_settings"]
