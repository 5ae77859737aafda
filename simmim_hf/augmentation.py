"""SimMIM's fine-tuning augmentation as batched kornia/torch ops on the collated, normalised batch.

The official fine-tuning recipe is timm's `create_transform(is_training=True, auto_augment=
'rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel', re_count=1, interpolation='bicubic')`, a per-image
PIL pipeline: RandomResizedCrop -> horizontal flip -> RandAugment -> ToTensor -> Normalize -> RandomErasing
(for images of at most 32 px the official code swaps the RandomResizedCrop for `RandomCrop(size, padding=4)`).
Here the work is split in two:

1. the image processor (CPU, PIL) does the RandomResizedCrop, the flip and the normalisation per image;
2. `FinetuneAugmentation` runs on the collated `pixel_values` `(B, 3, H, W)`, on whatever device they are:
   un-normalise to [0, 1] (clamped, since the colour ops and the 8-bit histogram ops need that range)
   -> optional zero-padded `RandomCrop` (`padded_crop`) -> RandAugment -> re-normalise -> random erasing.

RandAugment follows timm's sampling, not kornia's `kornia.augmentation.auto.RandAugment` container: for each
of the `n` layers every image draws its own op (uniformly, with replacement across layers, as timm's
`np.random.choice(ops, n)`), its own apply coin (p = 0.5), its own magnitude `N(m, mstd)` clipped to
[0, 10] and its own sign. The images that drew the same op form a group and the op runs once per group
on the gathered rows (all geometric ops of a layer share one `warp_affine` call), so the cost is about a
dozen batched calls per layer whatever the batch size, and every image gets timm's per-image choices. The
image operations are kornia's (`kornia.enhance`, `kornia.geometry.transform.warp_affine`), picked where
kornia has a PIL-equivalent; the op set and magnitude mapping are timm's (`_RAND_TRANSFORMS` /
`_RAND_INCREASING_TRANSFORMS` and their `*_level_to_arg`). kornia's container was not used because its
policy is not timm's: it picks the ops once per batch, applies each picked op with probability 1, has a
fixed magnitude on a 0-30 scale with no noise and no increasing variants, translates by at most 10 % of
the image (timm: 45 %), and its `color` / `contrast` / `brightness` are HSV saturation, a plain product
and an additive shift rather than PIL's blends.

Remaining differences from timm (PIL on uint8 images):

- Values are float, not 8-bit: Posterize and Equalize work on the 8-bit levels `floor(255 x)` and
  Solarize compares with `threshold / 255`, but every op keeps fractional values where PIL rounds to
  8 bits after each op (the colour ops agree with PIL within 2/255 on 8-bit inputs).
- Geometric ops use torch's bicubic `grid_sample` (a = -0.75; PIL's bicubic uses a = -0.5) and fill the
  uncovered area as kornia's "fill" padding does (the fill weighted by the warped coverage), so border
  pixels mix image and fill where PIL decides in or out per pixel. The fill colour is the processor's
  `mean` (timm: the same mean rounded to 8 bits, (124, 116, 104) for ImageNet); the padded crop fills
  with black, as torchvision's `RandomCrop(padding=4)` does.
- Rotate turns about the image centre and ShearX/Y shear about the top-left corner, as PIL does;
  the sub-pixel offset between PIL's corner-based and kornia's centre-based pixel grid is accounted for.
- AutoContrast is kornia's `normalize_min_max` (eps 1e-6 in the denominator); a constant channel is
  left unchanged, as PIL leaves it (kornia alone would zero it).
- SolarizeAdd (add to the pixels below 128, no inversion) has no kornia counterpart (kornia's
  `solarize(additions=...)` adds everywhere and then inverts), so it is one `torch.where`.
- `mstd` > 100 means a magnitude uniform in [0, m], as in timm; `inc0` means the plain op set (timm
  tests `bool('0')`, which is true, so there `inc0` selects the increasing set too).
- Random erasing uses kornia's `RandomErasing` boxes: area fraction in (0.02, 1/3) as timm, but the aspect
  ratio is drawn by a fair coin between [0.3, 1] and [1, 3.3] (timm: log-uniform on [0.3, 1/0.3]) and
  a box that would not fit is clamped to the image (timm retries 10 times and otherwise erases nothing).
  One box per image (timm's `re_count=1`). The fill is N(0, 1) per pixel and channel ("pixel"), one
  N(0, 1) colour per image ("rand") or 0 ("const"), in normalised space as in timm.
- Randomness comes from torch's global generators (as kornia's), drawn per batch instead of from
  Python's `random`/numpy per image, so `torch.manual_seed` makes a run reproducible; the streams are
  not timm's.

Not Hub-facing: imports freely from the package and needs kornia.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import kornia.augmentation as KA
import kornia.enhance as KE
import torch
from kornia.geometry.bbox import bbox_generator, bbox_to_mask
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine
from torch import nn

# timm's `_RAND_TRANSFORMS` order; the "Rel" translations are the ones RandAugment uses.
RAND_AUGMENT_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
ERASING_MODES = ("pixel", "rand", "const")
_LEVEL_DENOM = 10.0  # timm: magnitude m maps to level m / 10 of each op's range
_SPEC_EXAMPLE = "a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' (keys m, n, mstd, mmax, inc, p) or 'none'"


@dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed timm RandAugment spec; defaults are timm's (`rand` alone = m10, n2, p0.5)."""

    magnitude: float = 10.0  # m, on timm's 0..10 scale
    num_ops: int = 2  # n, ops drawn per image
    magnitude_std: float = 0.0  # mstd; inf = uniform in [0, m]
    magnitude_max: float = 10.0  # mmax, the clip of the noisy magnitude
    increasing: bool = False  # inc1: severity grows with m for every op
    prob: float = 0.5  # p, per-op apply probability


def parse_rand_augment(spec: str | None) -> RandAugmentConfig | None:
    """Parse a timm RandAugment string such as `"rand-m9-mstd0.5-inc1"`; `None`, `""` or `"none"` -> `None`.

    Sections after `rand` are `<key><number>` with keys `m` (magnitude, 0..10 scale), `n` (ops per image),
    `mstd` (magnitude noise std; > 100 = uniform), `mmax` (magnitude clip), `inc` (0/1, increasing-severity
    variants) and `p` (per-op probability). Anything else raises a `ValueError`.
    """
    if spec is None or spec.strip().lower() in ("", "none"):
        return None

    def fail(reason: str) -> ValueError:
        return ValueError(f"`rand_augment` must be {_SPEC_EXAMPLE}; got rand_augment={spec!r} ({reason}).")

    sections = spec.strip().split("-")
    if sections[0] != "rand":
        raise fail("it must start with 'rand'")
    values: dict[str, float] = {}
    for section in sections[1:]:
        match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?|\.\d+)", section)
        if match is None:
            raise fail(f"section {section!r} is not <key><number>")
        key, value = match.group(1), float(match.group(2))
        if key not in ("m", "n", "mstd", "mmax", "inc", "p"):
            raise fail(f"unknown key {key!r}")
        if key in values:
            raise fail(f"key {key!r} given twice")
        values[key] = value
    for key in ("n", "inc"):
        if key in values and not values[key].is_integer():
            raise fail(f"{key} must be an integer")
    if values.get("inc", 0) not in (0, 1):
        raise fail("inc must be 0 or 1")
    if not 0.0 <= values.get("p", 0.5) <= 1.0:
        raise fail("p must lie in [0, 1]")
    mstd = values.get("mstd", 0.0)
    return RandAugmentConfig(
        magnitude=values.get("m", _LEVEL_DENOM),
        num_ops=int(values.get("n", 2)),
        magnitude_std=math.inf if mstd > 100 else mstd,
        magnitude_max=values.get("mmax", _LEVEL_DENOM),
        increasing=bool(values.get("inc", 0)),
        prob=values.get("p", 0.5),
    )


def _as_rgb(value, name: str) -> torch.Tensor:
    try:
        rgb = torch.as_tensor(value, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError):
        rgb = None
    if rgb is None or rgb.numel() != 3 or not bool(torch.isfinite(rgb).all()):
        raise ValueError(f"`{name}` must be 3 finite numbers (one per RGB channel); got {name}={value!r}.")
    return rgb


# ---------------------------------------------------------------------------------------------- ops
# Each colour op maps (images in [0, 1] (k, 3, H, W), per-image argument (k,)) -> images in [0, 1].


def _auto_contrast(x: torch.Tensor, _arg: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(2)
    constant = (flat.amax(-1) <= flat.amin(-1))[..., None, None]
    # PIL leaves a constant channel alone; normalize_min_max would send it to 0.
    return torch.where(constant, x, KE.normalize_min_max(x))


def _solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    # timm/PIL: pixels below 128 get `add` (saturating), the rest are kept; kornia has no such op.
    return torch.where(x < 128 / 255, (x + add.view(-1, 1, 1, 1)).clamp(max=1.0), x)


_COLOR_OPS = {
    "AutoContrast": _auto_contrast,
    "Equalize": lambda x, _arg: KE.equalize(x),
    "Invert": lambda x, _arg: KE.invert(x),
    "Posterize": lambda x, bits: KE.posterize(x, bits),
    "Solarize": lambda x, threshold: KE.solarize(x, threshold),
    "SolarizeAdd": _solarize_add,
    "Color": KE.adjust_saturation_with_gray_subtraction,  # PIL ImageEnhance.Color: blend with luma
    "Contrast": KE.adjust_contrast_with_mean_subtraction,  # PIL: blend with the mean luma
    "Brightness": KE.adjust_brightness_accumulative,  # PIL: blend with black = scale
    "Sharpness": KE.sharpness,  # PIL's 3x3 smoothing kernel, borders kept
}


def _op_argument(
    name: str, level: torch.Tensor, sign: torch.Tensor, increasing: bool, hw: tuple[int, int]
) -> torch.Tensor:
    """timm's `*_level_to_arg` for a (B,) level `m / 10` and random sign, in [0, 1] pixel units."""
    if name == "Rotate":
        return sign * level * 30.0  # degrees
    if name == "Posterize":  # bits kept: 0..4 (severity falls with m) or 4..0 (inc)
        bits = torch.floor(level * 4)
        return (4 - bits if increasing else bits).clamp(0, 8).long()
    if name == "Solarize":  # threshold on 8-bit levels: 0..256, or 256..0 (inc)
        threshold = torch.floor(level * 256)
        return (256 - threshold if increasing else threshold) / 255
    if name == "SolarizeAdd":
        return torch.floor(level * 110) / 255
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        if increasing:  # 1 -/+ 0.9 level: moves away from identity as m grows
            return (1.0 + sign * level * 0.9).clamp(min=0.1)
        return level * 1.8 + 0.1
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if name == "TranslateXRel":
        return sign * level * 0.45 * hw[1]  # pixels
    if name == "TranslateYRel":
        return sign * level * 0.45 * hw[0]
    return level  # AutoContrast, Equalize, Invert: no argument


def _affine_matrix(name: str, arg: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Source -> destination (k, 2, 3) pixel matrices (pixel centres at integers, kornia's convention)
    reproducing PIL's transforms, which map output to input in a grid with pixel corners at integers."""
    k = arg.shape[0]
    if name == "Rotate":
        center = torch.tensor([[(hw[1] - 1) / 2, (hw[0] - 1) / 2]]).expand(k, 2)
        return get_rotation_matrix2d(center, arg, torch.ones(k, 2))
    matrix = torch.eye(2, 3).repeat(k, 1, 1)
    if name == "ShearX":  # PIL: in = (x + f y, y) about the top-left corner; -f/2 is the half-pixel shift
        matrix[:, 0, 1], matrix[:, 0, 2] = -arg, -arg / 2
    elif name == "ShearY":  # PIL: in = (x, y + f x)
        matrix[:, 1, 0], matrix[:, 1, 2] = -arg, -arg / 2
    elif name == "TranslateXRel":  # PIL: in = (x + t, y), the content moves by -t
        matrix[:, 0, 2] = -arg
    else:  # TranslateYRel
        matrix[:, 1, 2] = -arg
    return matrix


def _warp(images: torch.Tensor, matrices: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Bicubic `warp_affine` of (k, 3, H, W) images in [0, 1], uncovered area = `fill` (3,)."""
    fill = fill.view(1, 3, 1, 1)
    # Warping (image - fill) with zero padding and adding fill back is kornia's "fill" padding (which
    # warps a ones mask in a second pass) in one pass, since the warp is linear in the image.
    warped = warp_affine(images - fill, matrices, images.shape[-2:], mode="bicubic", padding_mode="zeros",
                         align_corners=True)
    return warped.add_(fill).clamp_(0.0, 1.0)  # bicubic overshoots; PIL clips to 8 bits


def apply_rand_augment_op(
    images: torch.Tensor,
    name: str,
    magnitude: float | torch.Tensor,
    negate: bool | torch.Tensor = False,
    increasing: bool = False,
    fill: Sequence[float] | torch.Tensor = (0.485, 0.456, 0.406),
) -> torch.Tensor:
    """Apply RandAugment op `name` to every image of `images` (B, 3, H, W) in [0, 1] at timm magnitude
    `magnitude` (0..10, a float or (B,) tensor), negated where `negate`; returns a new tensor.

    The same code path `FinetuneAugmentation` runs per op group, exposed for visualisation and tests.
    """
    if name not in RAND_AUGMENT_OPS:
        raise ValueError(f"`name` must be one of {RAND_AUGMENT_OPS}; got name={name!r}.")
    batch, hw = images.shape[0], (images.shape[-2], images.shape[-1])
    level = torch.as_tensor(magnitude, dtype=torch.float32).expand(batch) / _LEVEL_DENOM
    sign = torch.where(torch.as_tensor(negate).expand(batch), -1.0, 1.0)
    arg = _op_argument(name, level, sign, increasing, hw)
    if name in GEOMETRIC_OPS:
        fill = _as_rgb(fill, "fill").to(images.device)
        return _warp(images, _affine_matrix(name, arg, hw).to(images.device), fill)
    return _COLOR_OPS[name](images, arg.to(images.device))


class FinetuneAugmentation(nn.Module):
    r"""
    SimMIM's fine-tuning augmentation (timm RandAugment + random erasing, optional padded crop) on a
    normalised batch; see the module docs for the data flow and the differences from timm.

    Args:
        mean (3 floats, defaults to ImageNet's): the normalisation mean the batch was made with.
        std (3 floats, defaults to ImageNet's): the normalisation std.
        rand_augment (`str` or `None`, defaults to `"rand-m9-mstd0.5-inc1"`): timm RandAugment spec
            (`parse_rand_augment`); `None` / `"none"` disables it.
        random_erasing_prob (`float`, defaults to 0.25): per-image probability of erasing one box.
        random_erasing_mode (`str`, defaults to `"pixel"`): box fill in normalised space: `"pixel"` per-pixel
            N(0, 1) noise, `"rand"` one N(0, 1) colour per image, `"const"` zeros (the mean colour).
        padded_crop (`int`, defaults to 0): if > 0, a random crop of the input size from the image padded by
            this many black pixels per side (the official recipe for images of at most 32 px, `padding=4`).

    `forward(pixel_values)` takes and returns `(B, 3, H, W)` with the same dtype and device. In eval mode,
    or with everything disabled, it returns the input itself. Randomness comes from torch's global RNG.

    Example:
        ```python
        >>> augment = FinetuneAugmentation(processor.image_mean, processor.image_std)
        >>> batch["pixel_values"] = augment(batch["pixel_values"].to(device))   # in train mode
        ```
    """

    def __init__(
        self,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        rand_augment: str | None = "rand-m9-mstd0.5-inc1",
        random_erasing_prob: float = 0.25,
        random_erasing_mode: str = "pixel",
        padded_crop: int = 0,
    ):
        super().__init__()
        mean_t, std_t = _as_rgb(mean, "mean"), _as_rgb(std, "std")
        if not bool((std_t > 0).all()):
            raise ValueError(f"`std` must be positive; got std={std!r}.")
        if isinstance(random_erasing_prob, bool) or not isinstance(random_erasing_prob, (int, float)) \
                or not 0.0 <= random_erasing_prob <= 1.0:
            raise ValueError(f"`random_erasing_prob` must lie in [0, 1]; "
                             f"got random_erasing_prob={random_erasing_prob!r}.")
        if random_erasing_mode not in ERASING_MODES:
            raise ValueError(f"`random_erasing_mode` must be one of {ERASING_MODES}; "
                             f"got random_erasing_mode={random_erasing_mode!r}.")
        if isinstance(padded_crop, bool) or not isinstance(padded_crop, int) or padded_crop < 0:
            raise ValueError(f"`padded_crop` must be a non-negative int; got padded_crop={padded_crop!r}.")
        self.config = parse_rand_augment(rand_augment)
        self.random_erasing_prob = float(random_erasing_prob)
        self.random_erasing_mode = random_erasing_mode
        self.padded_crop = padded_crop
        # Non-persistent: derived from the constructor arguments, so they stay out of checkpoints.
        self.register_buffer("mean", mean_t.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, 3, 1, 1), persistent=False)
        # timm's box: area fraction in (0.02, 1/3), aspect ratio in (0.3, 1/0.3).
        self.erasing = KA.RandomErasing(scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value=0.0,
                                        p=self.random_erasing_prob)
        self._crops: dict[tuple[int, int], KA.RandomCrop] = {}

    @classmethod
    def from_image_processor(cls, image_processor, **kwargs) -> "FinetuneAugmentation":
        """Build with the processor's `image_mean` / `image_std` (what its `pixel_values` are normalised with)."""
        return cls(mean=image_processor.image_mean, std=image_processor.image_std, **kwargs)

    @property
    def _uses_rand_augment(self) -> bool:
        return self.config is not None and self.config.num_ops > 0 and self.config.prob > 0

    @property
    def enabled(self) -> bool:
        return self._uses_rand_augment or self.random_erasing_prob > 0 or self.padded_crop > 0

    def extra_repr(self) -> str:
        return (f"rand_augment={self.config}, random_erasing_prob={self.random_erasing_prob}, "
                f"random_erasing_mode={self.random_erasing_mode!r}, padded_crop={self.padded_crop}")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.enabled:
            return pixel_values
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"`pixel_values` must have shape (B, 3, H, W); got shape {tuple(pixel_values.shape)}.")
        # float32 work copy: kornia's 8-bit ops and the histogram counts want at least that precision.
        x = pixel_values.float()
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        owned = x is not pixel_values  # in-place edits of the caller's tensor are not allowed
        if self.padded_crop > 0 or self._uses_rand_augment:
            # In place where possible: on the CPU a fresh full-batch buffer costs as much as the arithmetic.
            images = torch.addcmul(mean, x, std).clamp_(0.0, 1.0)
            if self._uses_rand_augment:
                # Back onto the 8-bit grid the policy is defined on (timm runs it on uint8 PIL images): undoing the
                # normalisation leaves level v at v/255 - eps, which Posterize and Solarize would read as v - 1.
                images.mul_(255.0).round_().div_(255.0)
            if self.padded_crop > 0:
                images = self._crop(images)
            if self._uses_rand_augment:
                images = self._rand_augment(images, mean.view(3))
            x, owned = images.sub_(mean).div_(std), True
        if self.random_erasing_prob > 0:
            x = self._erase(x, owned)
        return x.to(pixel_values.dtype)

    # ------------------------------------------------------------------------------------- stages
    def _crop(self, images: torch.Tensor) -> torch.Tensor:
        hw = (images.shape[-2], images.shape[-1])
        if hw not in self._crops:
            self._crops[hw] = KA.RandomCrop(hw, padding=self.padded_crop, fill=0.0, padding_mode="constant")
        return self._crops[hw](images)

    def _rand_augment(self, images: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """timm's RandAugment with per-image choices; `images` in [0, 1], modified in place and returned."""
        config = self.config
        batch, hw = images.shape[0], (images.shape[-2], images.shape[-1])
        for _ in range(config.num_ops):
            # Per-image draws on the CPU (tiny), so selecting the groups needs no device sync.
            op = torch.randint(len(RAND_AUGMENT_OPS), (batch,))
            applied = torch.rand(batch) < config.prob
            magnitude = torch.full((batch,), float(config.magnitude))
            if math.isinf(config.magnitude_std):
                magnitude = magnitude * torch.rand(batch)
            elif config.magnitude_std > 0:
                magnitude = magnitude + config.magnitude_std * torch.randn(batch)
            level = magnitude.clamp(0.0, config.magnitude_max) / _LEVEL_DENOM
            sign = torch.where(torch.rand(batch) > 0.5, -1.0, 1.0)  # timm's `_randomly_negate`

            warp_rows, warp_matrices = [], []
            for index, name in enumerate(RAND_AUGMENT_OPS):
                rows = torch.nonzero(applied & (op == index)).flatten()
                if rows.numel() == 0:
                    continue
                arg = _op_argument(name, level[rows], sign[rows], config.increasing, hw)
                if name in GEOMETRIC_OPS:
                    warp_rows.append(rows)
                    warp_matrices.append(_affine_matrix(name, arg, hw))
                    continue
                # The groups are disjoint, so each reads only its own rows before overwriting them.
                rows_device = rows.to(images.device, non_blocking=True)
                images[rows_device] = _COLOR_OPS[name](images[rows_device], arg.to(images.device, non_blocking=True))
            if warp_rows:
                rows_device = torch.cat(warp_rows).to(images.device, non_blocking=True)
                matrices = torch.cat(warp_matrices).to(images.device, non_blocking=True)
                images[rows_device] = _warp(images[rows_device], matrices, fill)
        return images

    def _erase(self, x: torch.Tensor, owned: bool) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # kornia's RandomErasing draws the boxes and its box -> mask helpers rasterise them, as in its own
        # apply_transform, but only for the erased rows, so the cost follows random_erasing_prob.
        params = self.erasing.forward_parameters(torch.Size((batch, 1, height, width)))
        rows = torch.nonzero(params["batch_prob"].cpu() > 0.5).flatten()
        if rows.numel() == 0:
            return x
        boxes = bbox_generator(params["xs"][rows], params["ys"][rows], params["widths"][rows], params["heights"][rows])
        box = bbox_to_mask(boxes.to(x.device, non_blocking=True), width, height)[:, None] > 0.5  # (k, 1, H, W)
        if self.random_erasing_mode == "pixel":
            fill = torch.randn(rows.numel(), channels, height, width, device=x.device, dtype=x.dtype)
        elif self.random_erasing_mode == "rand":
            fill = torch.randn(rows.numel(), channels, 1, 1, device=x.device, dtype=x.dtype)
        else:
            fill = torch.zeros((), device=x.device, dtype=x.dtype)
        if not owned:
            x = x.clone()
        rows = rows.to(x.device, non_blocking=True)
        x[rows] = torch.where(box, fill, x[rows])
        return x



def mix_batch(pixel_values: torch.Tensor, labels: torch.Tensor, num_classes: int, *, mixup: float, cutmix: float,
              switch_prob: float = 0.5, label_smoothing: float = 0.0, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-wise Mixup / CutMix (timm's `Mixup(mode="batch")`) with label smoothing.

    Each image is paired with its mirror in the batch (`flip(0)`), as timm does. With both on, CutMix is chosen
    with probability `switch_prob`; lambda ~ Beta(alpha, alpha); CutMix pastes a box of area (1 - lambda) and the
    label weight follows the area actually pasted after clipping. All draws come from the host-side numpy
    generator `rng`, so nothing waits on the device and a run seeded per step replays exactly.
    Returns (mixed pixel values, soft targets (B, num_classes))."""
    off = label_smoothing / num_classes
    targets = torch.nn.functional.one_hot(labels, num_classes).to(torch.float32) * (1.0 - label_smoothing) + off
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    flipped = pixel_values.flip(0)
    if use_cutmix:
        h, w = pixel_values.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        pixel_values = pixel_values.clone()
        pixel_values[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    else:
        pixel_values = pixel_values * lam + flipped * (1.0 - lam)
    return pixel_values, targets * lam + targets.flip(0) * (1.0 - lam)

__all__ = [
    "mix_batch",
    "ERASING_MODES",
    "FinetuneAugmentation",
    "GEOMETRIC_OPS",
    "RAND_AUGMENT_OPS",
    "RandAugmentConfig",
    "apply_rand_augment_op",
    "parse_rand_augment",
]
