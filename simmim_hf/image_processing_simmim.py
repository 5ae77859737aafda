"""Image processor for SimMIM: augmentation, normalisation and mask generation in one object.

`SimMIMImageProcessor` turns raw images into exactly what `SimMIMForMaskedImageModeling` takes:
`pixel_values` (float, `(B, 3, H, W)`) and `bool_masked_pos` (bool, `(B, (H / p) * (W / p))`, True =
masked). It follows the official SimMIM data pipeline (microsoft/SimMIM, `data/data_simmim.py`):

    pretraining (do_train=True):  RGB -> RandomResizedCrop(size, scale=(0.67, 1), ratio=(3/4, 4/3), bilinear*)
                                  -> RandomHorizontalFlip -> to float -> Normalize(ImageNet) ; + mask
    evaluation (do_train=False):  RGB -> Resize(shorter side to size / crop_pct, bicubic) -> CenterCrop(size)
                                  -> to float -> Normalize(ImageNet) ; mask only if return_mask=True

(*) 8-bit images are resized with torch's antialiased uint8 bilinear kernel (PIL's filter, within one grey
level, 2-3x faster; 8-bit arrays are cropped as views, without a copy); float and 16-bit images, and the
evaluation resize, use PIL itself.

Hub-facing module (copied next to the weights for `trust_remote_code`): it imports its sibling
`masking` relatively and otherwise only torch, numpy, PIL and transformers (with its huggingface_hub).
"""

from __future__ import annotations

import math
import operator
import re
from functools import lru_cache

import numpy as np
import PIL.Image
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ImagesKwargs, Unpack

from .masking import SimMIMMaskGenerator, validate_mask_settings

# PIL modes that hold more than 8 bits per pixel. `Image.convert("RGB")` *clips* them to 0..255 (a 16-bit
# scan becomes almost white), so they are rescaled to [0, 1] floats instead.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_FLOAT_ATOL = 1e-3  # float inputs may overshoot [0, 1] by this much (resampling / compression noise)
# Evaluation resize: the shorter side goes to size / crop_pct, so crop_pct bounds how much it may upscale.
_MIN_CROP_PCT = 0.1
_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range (negative seeds would alias 2**64 + seed)


def _is_number(value) -> bool:
    """A finite int or float, not a bool (and no OverflowError for huge ints)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or math.isfinite(value)
    )


class SimMIMImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_train (`bool`, *optional*, defaults to `self.do_train`):
        Pretraining transform (random resized crop + flip + mask) if `True`, evaluation transform
        (resize + center crop, no flip, no mask unless `return_mask=True`) if `False`.
    return_mask (`bool`, *optional*):
        Whether to return `bool_masked_pos`. Defaults to `do_train`.
    crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.67, 1.0)`):
        Range of the crop area, as a fraction of the image area (RandomResizedCrop `scale`).
    crop_ratio (`tuple[float, float]`, *optional*, defaults to `(3/4, 4/3)`):
        Range of the crop aspect ratio, width / height (RandomResizedCrop `ratio`).
    flip_prob (`float`, *optional*, defaults to 0.5):
        Probability of a horizontal flip in the pretraining transform.
    crop_pct (`float`, *optional*, defaults to 0.875):
        Evaluation: the image is resized so that the crop covers `crop_pct` of it (224 -> 256 -> 224). In
        [0.1, 1]: the resized image is at least the crop and at most 10x its size.
    eval_resample (`PILImageResampling`, *optional*, defaults to `BICUBIC`):
        Resampling filter of the evaluation resize (`resample`, bilinear, is the pretraining crop's).
    patch_size (`int`, *optional*, defaults to 16):
        The model's patch size p; `bool_masked_pos` has `(H / p) * (W / p)` entries.
    mask_patch_size (`int`, *optional*, defaults to 32):
        Side of one mask unit in pixels; a multiple of `patch_size` dividing both sides of `size`.
    mask_ratio (`float`, *optional*, defaults to 0.6):
        Fraction of mask units masked, in (0, 1): exactly `ceil(num_units * mask_ratio)` per image.
    mask_strategy (`str`, *optional*, defaults to `"random"`):
        `"random"` (the paper), `"block"` (BEiT-style block-wise) or `"central"` (the paper's ablation).
    seed (`int` or `list[int]`, *optional*):
        An int seeds one generator for the whole call. A list (one seed per image) makes image i's crop,
        flip and mask a pure function of `seed[i]`, independent of the rest of the batch. Seeds are integers
        in [0, 2**64 - 1] (torch's generator range); others raise a `ValueError`.
    generator (`torch.Generator`, *optional*):
        Generator to draw from (and advance) when `seed` is not given; default: torch's global generator.
    return_uint8 (`bool`, *optional*, defaults to `False`):
        Return `pixel_values` as uint8 `(B, 3, H, W)` in 0..255, without rescaling or normalising: a quarter of
        the bytes to move from DataLoader workers to the accelerator, where `normalize_uint8` finishes the job
        (as timm's prefetch loader does). Images of more than 8 bits (16-bit PNG/TIFF, float arrays) are
        resized at their own depth, then rounded to 8 bits. Per call only, never saved.
    """

    do_train: bool | None
    return_mask: bool | None
    crop_scale: list[float] | tuple[float, ...] | None
    crop_ratio: list[float] | tuple[float, ...] | None
    flip_prob: float | None
    crop_pct: float | None
    eval_resample: PILImageResampling | int | None
    patch_size: int | None
    mask_patch_size: int | None
    mask_ratio: float | None
    mask_strategy: str | None
    seed: int | list[int] | None
    generator: torch.Generator | None
    return_uint8: bool | None


class SimMIMImageProcessor(PilBackend):
    r"""
    Constructs a SimMIM image processor (PIL/numpy backend, CPU).

    Accepts a PIL image (any mode: RGB, L, LA, P, RGBA, CMYK, I;16, I, F, ...), a numpy array or torch
    tensor (`(H, W)`, `(H, W, C)` or `(C, H, W)` with C in {1, 3, 4}; uint8, uint16, other integer types by
    their values (0..255 as 8-bit, up to 65535 as 16-bit), or float in [0, 1], any float dtype, bfloat16 and
    float16 included; unlike transformers' processors, float data in 0..255 is refused rather than guessed), or a
    list of them, of any sizes. The channel axis of a
    3-d array is the first or last axis of size 1, 3 or 4; when both qualify, size 3 (RGB) wins over 1
    (grey) over 4 (RGBA), and equal sizes follow the container's convention: numpy arrays are channels-last
    (PIL, OpenCV), torch tensors channels-first (torchvision). So `(4, 4, 3)` is a 4x4 RGB image and
    `(3, 4, 4)` one too; pass `input_data_format` to override. Returns a [`BatchFeature`] with

    - `pixel_values`: float32 `(B, 3, H, W)`, normalised with `image_mean` / `image_std`;
    - `bool_masked_pos`: bool `(B, (H / patch_size) * (W / patch_size))`, row-major, True = masked
      (pretraining transform, or `return_mask=True`).

    See [`SimMIMImageProcessorKwargs`] for the SimMIM-specific arguments; every argument can be given at
    construction (saved in `preprocessor_config.json`) or per call, except `seed` and `generator` (per call
    only). The geometry is set by `do_train` (see the module docstring); the generic `do_resize`,
    `do_center_crop`, `crop_size` and `do_pad` switches of transformers' processors are not used.
    `do_rescale` / `rescale_factor` / `do_normalize` / `image_mean` / `image_std` behave as usual.

    Example:
        ```python
        >>> processor = SimMIMImageProcessor.from_config(SimMIMConfig.from_preset("swin-base-w6-192"))
        >>> batch = processor(images, return_tensors="pt", seed=[17, 18])   # per-image seeds
        >>> batch["pixel_values"].shape, batch["bool_masked_pos"].shape
        (torch.Size([2, 3, 192, 192]), torch.Size([2, 2304]))
        ```
    """

    valid_kwargs = SimMIMImageProcessorKwargs
    model_input_names = ["pixel_values", "bool_masked_pos"]

    do_convert_rgb = True
    size = {"height": 224, "width": 224}
    resample = PILImageResampling.BILINEAR  # torchvision RandomResizedCrop's default, as in the official code
    eval_resample = PILImageResampling.BICUBIC
    do_resize = True
    do_rescale = True
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_train = True
    return_mask = None
    crop_scale = (0.67, 1.0)
    crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    flip_prob = 0.5
    crop_pct = 0.875
    patch_size = 16
    mask_patch_size = 32
    mask_ratio = 0.6
    mask_strategy = "random"
    return_uint8 = False

    def __init__(self, **kwargs: Unpack[SimMIMImageProcessorKwargs]):
        for name in ("seed", "generator"):
            if kwargs.get(name) is not None:
                raise ValueError(f"`{name}` is a per-call argument (processor(images, {name}=...)); it cannot be "
                                 f"stored in the processor. Got {name}={kwargs[name]!r} at construction.")
        super().__init__(**kwargs)
        self._validate_simmim_kwargs(
            size=self.size, crop_scale=self.crop_scale, crop_ratio=self.crop_ratio, flip_prob=self.flip_prob,
            crop_pct=self.crop_pct, patch_size=self.patch_size, mask_patch_size=self.mask_patch_size,
            mask_ratio=self.mask_ratio, mask_strategy=self.mask_strategy, do_normalize=self.do_normalize,
            image_mean=self.image_mean, image_std=self.image_std,
        )

    @classmethod
    def from_config(cls, config, **kwargs) -> "SimMIMImageProcessor":
        """Build the processor matching a `SimMIMConfig`: `size` from `image_size`, `patch_size`,
        `mask_patch_size`, `mask_ratio` and (when set) `image_mean` / `image_std` from the config; `kwargs` override
        any argument."""
        if getattr(config, "num_channels", 3) != 3:
            raise ValueError(
                f"SimMIMImageProcessor produces RGB images; got config.num_channels={config.num_channels}."
            )
        settings = dict(
            size={"height": config.image_size, "width": config.image_size},
            patch_size=config.patch_size,
            mask_patch_size=config.mask_patch_size,
            mask_ratio=config.mask_ratio,
        )
        # The normalisation the model was configured with (its colour-classification loss un-normalises with it).
        for name in ("image_mean", "image_std"):
            if getattr(config, name, None) is not None:
                settings[name] = tuple(getattr(config, name))
        settings.update(kwargs)
        return cls(**settings)

    # ------------------------------------------------------------------ saving and loading
    # `do_train` / `return_mask` pick a mode for the pretraining data pipeline; they are not saved. A saved or
    # Hub processor therefore loads in evaluation mode (deterministic resize + center crop, no mask), so
    # `AutoImageProcessor` and `pipeline(...)` give the same output for the same image; pretraining code asks
    # for the training transform and the mask explicitly (`do_train=True`).
    _MODE_KEYS = ("do_train", "return_mask", "return_uint8")

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in self._MODE_KEYS:
            out.pop(key, None)
        return out

    @classmethod
    def from_dict(cls, image_processor_dict: dict, **kwargs):
        # Files written before the mode keys were dropped may still hold them: evaluation mode wins unless the
        # caller asks otherwise.
        image_processor_dict = {k: v for k, v in image_processor_dict.items() if k not in cls._MODE_KEYS}
        kwargs.setdefault("do_train", False)
        return super().from_dict(image_processor_dict, **kwargs)

    # ------------------------------------------------------------------ validation
    def _standardize_kwargs(self, crop_scale=None, crop_ratio=None, **kwargs) -> dict:
        for name in ("image_mean", "image_std"):  # one number stands for all three channels, as in transformers
            if _is_number(kwargs.get(name)):
                kwargs[name] = (float(kwargs[name]),) * 3
        try:  # transformers' `get_size_dict` fails on some sizes with IndexError or an unnamed message
            kwargs = super()._standardize_kwargs(**kwargs)
        except (ValueError, TypeError, IndexError):
            size = kwargs.get("size")
            if size is None or isinstance(size, SizeDict):
                raise  # not about `size`
            raise ValueError(f"`size` must be an int, a (height, width) pair or a dict with keys 'height' and "
                             f"'width', all positive ints; got size={size!r}.") from None
        # JSON turns the (min, max) pairs into lists; keep tuples so saved and loaded processors compare equal.
        kwargs["crop_scale"] = tuple(crop_scale) if isinstance(crop_scale, list) else crop_scale
        kwargs["crop_ratio"] = tuple(crop_ratio) if isinstance(crop_ratio, list) else crop_ratio
        return kwargs

    def preprocess(self, images, *args, **kwargs) -> BatchFeature:
        # transformers checks the types of its own arguments first (`validate_typed_dict`) and raises
        # huggingface_hub's StrictDataclassError; report it as the named ValueError every other bad argument gives.
        for name in ("image_mean", "image_std"):  # ints are fine here, as at construction (range checked later)
            value = kwargs.get(name)
            if _is_number(value) or (isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)):
                kwargs[name] = float(value) if _is_number(value) else [float(v) for v in value]
        try:
            return super().preprocess(images, *args, **kwargs)
        except StrictDataclassError as error:
            field = re.search(r"field '(\w+)'", str(error))
            name = field.group(1) if field else "an argument"
            raise ValueError(f"`{name}` has an unsupported type: {str(error).splitlines()[-1].strip()}") from None

    def _validate_preprocess_kwargs(self, **kwargs):
        super()._validate_preprocess_kwargs(**kwargs)
        self._validate_simmim_kwargs(**kwargs)

    @staticmethod
    def _validate_simmim_kwargs(
        size=None, crop_scale=None, crop_ratio=None, flip_prob=None, crop_pct=None, patch_size=None,
        mask_patch_size=None, mask_ratio=None, mask_strategy=None, do_normalize=None, image_mean=None,
        image_std=None, seed=None, **kwargs,
    ) -> None:
        if size is None or size.height is None or size.width is None:
            raise ValueError(f"`size` must give the output height and width, e.g. 192 or "
                             f"{{'height': 192, 'width': 256}}; got size={dict(size) if size else size!r}.")
        # Checks size % mask_patch_size, mask_patch_size % patch_size, mask_ratio and mask_strategy.
        validate_mask_settings((size.height, size.width), patch_size, mask_patch_size, mask_ratio, mask_strategy)
        for name, value in (("crop_scale", crop_scale), ("crop_ratio", crop_ratio)):
            if (
                not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(_is_number(v) and v > 0 for v in value)
                or value[0] > value[1]
            ):
                raise ValueError(f"`{name}` must be a (min, max) pair of positive numbers with min <= max; "
                                 f"got {name}={value!r}.")
        if crop_scale[1] > 1:
            raise ValueError(f"`crop_scale` is a fraction of the image area, at most 1; got crop_scale={crop_scale!r}.")
        if not isinstance(flip_prob, (int, float)) or not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"`flip_prob` must lie in [0, 1]; got flip_prob={flip_prob!r}.")
        if not _is_number(crop_pct) or not _MIN_CROP_PCT <= crop_pct <= 1.0:
            raise ValueError(f"`crop_pct` must lie in [{_MIN_CROP_PCT}, 1] (the evaluation resize takes the shorter "
                             f"side to size / crop_pct: at least the crop, at most 10x it); got crop_pct={crop_pct!r}.")
        if do_normalize:
            for name, value in (("image_mean", image_mean), ("image_std", image_std)):
                positive = name == "image_std"
                if (
                    not isinstance(value, (list, tuple)) or len(value) != 3
                    or not all(_is_number(v) and (v > 0 or not positive) for v in value)
                ):
                    raise ValueError(f"`{name}` must be 3 {'positive' if positive else 'finite'} numbers, one per RGB "
                                     f"channel (or one number for all three); got {name}={value!r}.")
        if seed is not None:
            for value in seed if isinstance(seed, (list, tuple)) else (seed,):
                try:
                    valid = not isinstance(value, (bool, float)) and 0 <= operator.index(value) <= _MAX_SEED
                except TypeError:
                    valid = False
                if not valid:
                    raise ValueError(f"`seed` must be an integer in [0, 2**64 - 1] or a list of them (one per image); "
                                     f"got seed={seed!r}.")

    # ------------------------------------------------------------------ input preparation
    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        """Flatten the input into a list of single images: one image, a list (or a list of lists) of images,
        or a 4-d array/tensor `(B, ...)`. transformers' `make_flat_list_of_images` rejects 2-d (grayscale)
        arrays, hence this version."""

        def flatten(item, depth):
            if isinstance(item, str):  # a local path or URL, loaded by transformers' `load_image`
                item = self.fetch_images(item)
            if isinstance(item, PIL.Image.Image):
                return [item]
            if isinstance(item, (np.ndarray, torch.Tensor)):
                return list(item) if item.ndim == 4 else [item]
            if isinstance(item, (list, tuple)) and depth < 2:
                return [image for sub in item for image in flatten(sub, depth + 1)]
            raise ValueError(f"`images` must be a PIL image, numpy array, torch tensor or a list of them; "
                             f"got an element of type {type(item).__name__}.")

        flat = flatten(images, 0)
        if not flat:
            raise ValueError(f"`images` is empty; got images={images!r}. Pass at least one image.")
        return flat

    def process_image(self, image, do_convert_rgb: bool | None = None, input_data_format=None, **kwargs):
        """Bring one input to the working format: 8-bit data as a PIL RGB image (PIL inputs) or a uint8
        `(3, H, W)` tensor (arrays and tensors; a view of the input where it is RGB already), both cropped and
        resized in uint8, the fast path; or a float32 `(3, H, W)` array in [0, 1] (float and 16-bit data,
        resampled per channel in PIL's float mode so no precision is lost)."""
        if isinstance(image, PIL.Image.Image):
            return _pil_to_working(image)
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu()
            if image.is_floating_point() and image.dtype not in (torch.float32, torch.float64):
                image = image.float()  # bfloat16, float16, float8: numpy has no (or a lossy) equivalent
            try:
                image = image.numpy()
            except TypeError:
                raise ValueError(
                    f"`images` tensors must be uint8, uint16 or floating point; got dtype={image.dtype}."
                ) from None
            return _array_to_working(image, input_data_format, channels_first_on_tie=True)
        if not isinstance(image, np.ndarray):
            raise ValueError(
                f"`images` must hold PIL images, numpy arrays or torch tensors; got {type(image).__name__}."
            )
        return _array_to_working(image, input_data_format)

    # ------------------------------------------------------------------ the transform
    def _preprocess(
        self,
        images: list,
        size: SizeDict,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        return_tensors=None,
        do_train: bool = True,
        return_mask: bool | None = None,
        crop_scale=(0.67, 1.0),
        crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
        flip_prob: float = 0.5,
        crop_pct: float = 0.875,
        eval_resample=PILImageResampling.BICUBIC,
        patch_size: int = 16,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        mask_strategy: str = "random",
        seed: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        return_uint8: bool = False,
        **kwargs,
    ) -> BatchFeature:
        batch_size, out_hw = len(images), (size.height, size.width)
        generators = None
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch_size:
                raise ValueError(f"`seed` as a list needs one seed per image ({batch_size} images); "
                                 f"got {len(seed)} seeds.")
            generators = [torch.Generator().manual_seed(int(s)) for s in seed]
        elif seed is not None:
            generator = torch.Generator().manual_seed(int(seed))

        pixel_values = torch.empty(batch_size, 3, *out_hw, dtype=torch.uint8 if return_uint8 else torch.float32)
        is_8bit = torch.empty(batch_size, dtype=torch.bool)
        for i, image in enumerate(images):
            g = generators[i] if generators is not None else generator
            if do_train:
                pixels = _random_resized_crop_flip(image, out_hw, crop_scale, crop_ratio, flip_prob, resample, g)
            else:
                pixels = _resize_center_crop(image, out_hw, crop_pct, eval_resample)
            is_8bit[i] = pixels.dtype == torch.uint8
            if return_uint8 and not is_8bit[i]:  # [0, 1] floats from a deeper image: what 8 bits can hold
                pixels = pixels.mul(255.0).round_().clamp_(0, 255)
            pixel_values[i].copy_(pixels)  # uint8 (any strides) -> float32 CHW, conversion and layout in one pass

        if not return_uint8:
            self._rescale_and_normalize(pixel_values, is_8bit, do_rescale, rescale_factor, do_normalize, image_mean,
                                        image_std)
        data = {"pixel_values": pixel_values}

        if return_mask if return_mask is not None else do_train:
            mask_generator = _mask_generator(out_hw, patch_size, mask_patch_size, mask_ratio, mask_strategy)
            data["bool_masked_pos"] = mask_generator(batch_size, generator=generator, generators=generators)

        if return_tensors is None:  # transformers' convention: lists of numpy arrays
            data = {key: list(value.numpy()) for key, value in data.items()}
        elif str(return_tensors) in ("np", "TensorType.NUMPY"):
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)


    @staticmethod
    def _rescale_and_normalize(pixel_values, is_8bit, do_rescale, rescale_factor, do_normalize, image_mean,
                               image_std) -> torch.Tensor:
        """In place: x * (rescale / std) - mean / std, rescaling and normalisation fused into two passes. 8-bit
        data is rescaled unless do_rescale=False, which (as in transformers, whose warning suggests it for inputs
        already in [0, 1]) leaves values as they are. Float images (from deeper data) hold the 8-bit value / 255,
        so with do_rescale they are scaled by 255 * rescale_factor: the same picture gives the same pixel values
        at any bit depth, also with a factor other than 1/255 (e.g. 1/127.5 with mean = std = 1 for [-1, 1])."""
        mean = tuple(image_mean) if do_normalize else (0.0, 0.0, 0.0)
        std = tuple(image_std) if do_normalize else (1.0, 1.0, 1.0)
        device = pixel_values.device
        factor, offset = _uint8_normalization(device, float(rescale_factor) if do_rescale else 1.0, mean, std)
        if not bool(is_8bit.all()):
            deep, _ = _uint8_normalization(device, 255.0 * float(rescale_factor) if do_rescale else 1.0, mean, std)
            factor = torch.where(is_8bit.to(device).view(-1, 1, 1, 1), factor, deep)
        pixel_values.mul_(factor)
        if do_normalize:
            pixel_values.sub_(offset)
        return pixel_values

    def normalize_uint8(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Finish a `return_uint8=True` batch where it lives (e.g. on the GPU): uint8 `(B, 3, H, W)` -> float32,
        rescaled and normalised exactly as the processor would have done it on the CPU."""
        if pixel_values.dtype != torch.uint8 or pixel_values.ndim != 4:
            raise ValueError(f"`pixel_values` must be a uint8 (batch, 3, height, width) tensor from "
                             f"`return_uint8=True`; got dtype={pixel_values.dtype}, shape={tuple(pixel_values.shape)}.")
        is_8bit = torch.ones(pixel_values.shape[0], dtype=torch.bool)
        return self._rescale_and_normalize(pixel_values.float(), is_8bit, self.do_rescale, self.rescale_factor,
                                           self.do_normalize, self.image_mean, self.image_std)


@lru_cache(maxsize=16)
def _uint8_normalization(device: torch.device, rescale: float, mean: tuple, std: tuple):
    """(rescale / std, mean / std) as (1, 3, 1, 1) float32 tensors on `device`, made once per device and setting:
    building them every step would copy from the host and wait for the accelerator (a sync per training step of
    `normalize_uint8`). The CPU path uses the same constants, so both give bit-identical results."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    factor = torch.tensor(rescale, dtype=torch.float32) / std_t
    return factor.to(device), (mean_t / std_t).to(device)


# ---------------------------------------------------------------------- helpers
@lru_cache(maxsize=16)
def _mask_generator(size, patch_size, mask_patch_size, mask_ratio, strategy) -> SimMIMMaskGenerator:
    # Module-level cache: the processor's __dict__ is serialised to JSON, so it must not hold the generator.
    return SimMIMMaskGenerator(size, patch_size, mask_patch_size, mask_ratio, strategy)


def _pil_to_working(image: PIL.Image.Image):
    if image.width == 0 or image.height == 0:
        raise ValueError(f"`images` contains an empty image of size {image.size}.")
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return np.repeat(gray[None], 3, axis=0)
    if image.mode == "F":
        return _array_to_working(np.asarray(image, dtype=np.float32), ChannelDimension.LAST)
    # Every other mode (L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...): transformers' conversion, which composites
    # transparency onto white rather than exposing whatever colour the transparent pixels happen to hold.
    return PIL.Image.fromarray(convert_to_rgb(image, return_numpy=True))


def _channel_axis_format(shape, channels_first_on_tie: bool) -> ChannelDimension:
    """Where the channels of a 3-d array are: the first or last axis of size 1, 3 or 4. When both qualify, 3
    (RGB) beats 1 (grey) beats 4 (RGBA); equal sizes go by `channels_first_on_tie` (torch tensors: first, as
    torchvision; numpy arrays: last, as PIL/OpenCV). transformers' `infer_channel_dimension_format` always picks
    the first axis, which reads a small (4, 4, 3) RGB image as a 4-channel 4x3 one."""
    first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
    if not (first or last):
        raise ValueError(f"`images` arrays must have 1, 3 or 4 channels, first or last; got an array of "
                         f"shape {tuple(shape)}.")
    if first and last:
        rank = {3: 0, 1: 1, 4: 2}
        if shape[0] == shape[-1]:
            first = channels_first_on_tie
        else:
            first = rank[shape[0]] < rank[shape[-1]]
    return ChannelDimension.FIRST if first else ChannelDimension.LAST


def _array_to_working(array: np.ndarray, input_data_format=None, channels_first_on_tie: bool = False):
    if array.ndim == 2:
        array = array[..., None]
        input_data_format = ChannelDimension.LAST
    if array.ndim != 3:
        raise ValueError(f"`images` arrays must have shape (H, W), (H, W, C) or (C, H, W) with C in (1, 3, 4); "
                         f"got an array of shape {tuple(array.shape)}.")
    if input_data_format is None:
        input_data_format = _channel_axis_format(array.shape, channels_first_on_tie)
    hwc = np.moveaxis(array, 0, -1) if ChannelDimension(input_data_format) == ChannelDimension.FIRST else array
    height, width, channels = hwc.shape
    if channels not in (1, 3, 4) or height == 0 or width == 0:
        raise ValueError(f"`images` arrays must be non-empty with 1, 3 or 4 channels; got shape {tuple(array.shape)}.")

    if hwc.dtype.kind in "iu" and hwc.dtype not in (np.uint8, np.uint16):
        # Other integer types (e.g. the int64 of np.random.randint / torch.randint), read by their values as
        # transformers' processors read them: 8-bit when they fit 0..255, 16-bit when they fit 0..65535.
        low, high = (int(hwc.min()), int(hwc.max())) if hwc.size else (0, 0)
        if low < 0 or high > 65535:
            raise ValueError(f"`images` integer arrays must hold values in 0..255 (8-bit) or 0..65535 (16-bit); got "
                             f"dtype={hwc.dtype} with values in [{low}, {high}].")
        hwc = hwc.astype(np.uint8 if high <= 255 else np.uint16)
    if hwc.dtype == np.uint8:
        if channels != 3:
            hwc = convert_to_rgb(hwc, return_numpy=True, input_data_format=ChannelDimension.LAST)
        elif not hwc.flags.writeable or min(hwc.strides) < 0:  # torch.from_numpy takes neither (e.g. img[..., ::-1])
            hwc = hwc.copy()
        return torch.from_numpy(hwc).permute(2, 0, 1)  # (3, H, W), channels-last strides: torch's fast uint8 path
    if hwc.dtype == np.uint16:
        hwc = hwc.astype(np.float32) / 65535.0
    elif hwc.dtype.kind == "f":
        hwc = hwc.astype(np.float32, copy=False)
        if not np.isfinite(hwc).all():
            raise ValueError(
                "`images` contains NaN or infinite pixel values; got a float array with non-finite entries."
            )
        low, high = float(hwc.min()), float(hwc.max())
        if low < -_FLOAT_ATOL or high > 1.0 + _FLOAT_ATOL:
            raise ValueError(f"`images` float arrays must hold values in [0, 1]; got values in [{low:g}, {high:g}]. "
                             f"Pass uint8 data for 0..255 images.")
        hwc = np.clip(hwc, 0.0, 1.0)
    else:
        raise ValueError(f"`images` arrays must be uint8, uint16 or floating point; got dtype={hwc.dtype}.")

    if channels == 1:
        hwc = np.repeat(hwc, 3, axis=-1)
    elif channels == 4:  # composite onto white, as for PIL images with transparency
        alpha = hwc[..., 3:]
        hwc = hwc[..., :3] * alpha + (1.0 - alpha)
    return np.ascontiguousarray(np.moveaxis(hwc, -1, 0), dtype=np.float32)


def _image_hw(image) -> tuple[int, int]:
    return (image.height, image.width) if isinstance(image, PIL.Image.Image) else tuple(image.shape[1:])


def _is_8bit(image) -> bool:
    return isinstance(image, (PIL.Image.Image, torch.Tensor))  # float data is a numpy array


def _as_pil(image):
    """A uint8 `(3, H, W)` working tensor as a PIL RGB image, for the resizes PIL does (other filters, evaluation)."""
    return PIL.Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())) if isinstance(
        image, torch.Tensor) else image


def _resample(image, box, out_hw, resample) -> torch.Tensor:
    """Resize the region `box` = (left, top, right, bottom) of `image` (all of it if `None`) to `out_hw` with
    PIL; returns a `(3, H, W)` tensor, uint8 for a PIL RGB image, float32 for a float working image.

    transformers' `image_transforms.resize` is bypassed: it round-trips numpy -> PIL -> numpy per call.
    """
    size = (out_hw[1], out_hw[0])
    image = _as_pil(image)
    # Crop, then resize (as torchvision's RandomResizedCrop and the uint8 path do): PIL's `resize(box=...)` would
    # let the filter reach pixels outside the box.
    if isinstance(image, PIL.Image.Image):
        region = image.crop(box) if box is not None else image
        # np.array, not np.asarray: torch.from_numpy warns on the read-only view.
        return torch.from_numpy(np.array(region.resize(size, resample=resample))).permute(2, 0, 1)
    if box is not None:
        left, top, right, bottom = box
        image = image[:, top:bottom, left:right]
    planes = [np.asarray(PIL.Image.fromarray(np.ascontiguousarray(plane)).resize(size, resample=resample))
              for plane in image]
    # Bicubic overshoots; clip like the uint8 path (which PIL saturates) so both stay in [0, 1].
    return torch.from_numpy(np.clip(np.stack(planes), 0.0, 1.0))


def _crop_resize_8bit(image, box, out_hw) -> torch.Tensor:
    """Crop + antialiased bilinear resize of 8-bit RGB (a PIL image or a uint8 `(3, H, W)` tensor, cropped as a
    view) with torch's uint8 kernel (the one torchvision v2 uses). Same filter as PIL's: at most 1 grey level
    apart (on photos, on well under 1 % of the pixels), and 2-3x faster than `Image.resize` on one core.
    Returns uint8 `(3, H, W)`."""
    left, top, right, bottom = box
    if isinstance(image, torch.Tensor):
        # A dense channels-last copy of the crop: the kernel's vectorised uint8 path needs one (~25 % faster).
        region = image[None, :, top:bottom, left:right].contiguous(memory_format=torch.channels_last)
    else:
        region = torch.from_numpy(np.array(image.crop(box))).permute(2, 0, 1)[None]
    return torch.nn.functional.interpolate(region, size=out_hw, mode="bilinear", antialias=True, align_corners=False)[0]


def _crop_params(height: int, width: int, scale, ratio, u: np.ndarray) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` on pre-drawn uniforms `u` (10 attempts x 4):
    returns (top, left, crop_height, crop_width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for u_area, u_ratio, u_top, u_left in u.reshape(10, 4):
        target_area = area * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u_ratio * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    # Fallback, as torchvision: the largest central crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _random_resized_crop_flip(image, out_hw, scale, ratio, flip_prob, resample, generator) -> torch.Tensor:
    """RandomResizedCrop + RandomHorizontalFlip; returns `(3, H, W)`, uint8 or float32."""
    # One generator call per image: 40 uniforms for the crop attempts, 1 for the flip.
    u = torch.rand(41, generator=generator, dtype=torch.float64).numpy()
    top, left, h, w = _crop_params(*_image_hw(image), scale, ratio, u[:40])
    box = (left, top, left + w, top + h)
    if _is_8bit(image) and resample == PILImageResampling.BILINEAR:
        pixels = _crop_resize_8bit(image, box, out_hw)
    else:
        pixels = _resample(image, box, out_hw, resample)
    return pixels.flip(-1) if u[40] < flip_prob else pixels


def eval_resize_shape(height: int, width: int, out_hw, crop_pct: float) -> tuple[int, int]:
    """Size the evaluation resize produces before the center crop: the smallest aspect-preserving resize
    covering `out / crop_pct` in both sides (for a square output: shorter side to `int(size / crop_pct)`,
    the longer side truncated as torchvision's `Resize(int)` does)."""
    target_h, target_w = int(out_hw[0] / crop_pct), int(out_hw[1] / crop_pct)
    if target_h / height >= target_w / width:
        return target_h, max(target_w, int(width * target_h / height))
    return max(target_h, int(height * target_w / width)), target_w


def _resize_center_crop(image, out_hw, crop_pct, resample) -> torch.Tensor:
    """Resize (PIL, `eval_resample`) + CenterCrop; returns `(3, H, W)`, uint8 or float32."""
    new_h, new_w = eval_resize_shape(*_image_hw(image), out_hw, crop_pct)
    resized = _resample(image, None, (new_h, new_w), resample)
    # torchvision's CenterCrop offsets (round, not floor).
    top, left = int(round((new_h - out_hw[0]) / 2.0)), int(round((new_w - out_hw[1]) / 2.0))
    return resized[:, top : top + out_hw[0], left : left + out_hw[1]]


__all__ = ["SimMIMImageProcessor"]
