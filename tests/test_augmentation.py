"""FinetuneAugmentation: spec parsing, identity paths, timm/PIL fidelity of the ops, erasing, padded crop."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from simmim_hf.augmentation import (
    RAND_AUGMENT_OPS,
    FinetuneAugmentation,
    RandAugmentConfig,
    apply_rand_augment_op,
    parse_rand_augment,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def normalise(images):
    return (images - MEAN) / STD


def unnormalise(pixel_values):
    return pixel_values * STD + MEAN


def random_images(batch=8, size=16, seed=0):
    """8-bit levels in [0, 1], as the training batches hold (they come from uint8 images)."""
    levels = torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed))
    return levels.float() / 255


# ------------------------------------------------------------------------------------------ parsing
def test_parse_official_spec():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == RandAugmentConfig(
        magnitude=9.0, num_ops=2, magnitude_std=0.5, magnitude_max=10.0, increasing=True, prob=0.5)


def test_parse_defaults_and_other_keys():
    assert parse_rand_augment("rand") == RandAugmentConfig(10.0, 2, 0.0, 10.0, False, 0.5)
    assert parse_rand_augment("rand-p0.7-n3-mmax12-m5-inc0") == RandAugmentConfig(5.0, 3, 0.0, 12.0, False, 0.7)
    assert parse_rand_augment("rand-m7-mstd101").magnitude_std == math.inf  # timm: > 100 = uniform


@pytest.mark.parametrize("spec", [None, "", "none", "None", " none "])
def test_parse_disabled(spec):
    assert parse_rand_augment(spec) is None


@pytest.mark.parametrize(
    "spec", ["augmix-m3", "rand-m", "rand-x9", "rand-m9-m8", "rand-inc2", "rand-n1.5", "rand-p2", "rand-m9--n2",
             "rand-w0", "m9-n2", "rand-m9.5.1"])
def test_parse_malformed(spec):
    with pytest.raises(ValueError, match="rand_augment") as info:
        parse_rand_augment(spec)
    assert repr(spec) in str(info.value)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"mean": (0.5, 0.5)}, "mean"), ({"std": (0.2, 0.0, 0.2)}, "std"), ({"rand_augment": "rand-q1"}, "rand_augment"),
     ({"random_erasing_prob": 1.5}, "random_erasing_prob"), ({"random_erasing_mode": "noise"}, "random_erasing_mode"),
     ({"padded_crop": -1}, "padded_crop")])
def test_constructor_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FinetuneAugmentation(**kwargs)


def test_bad_input_shape_and_op_name():
    with pytest.raises(ValueError, match="pixel_values"):
        FinetuneAugmentation()(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="name"):
        apply_rand_augment_op(torch.zeros(1, 3, 8, 8), "Cutout", 5)


# ----------------------------------------------------------------------------------- identity paths
def test_eval_mode_and_disabled_return_the_input():
    x = normalise(random_images())
    assert FinetuneAugmentation().eval()(x) is x
    disabled = FinetuneAugmentation(rand_augment="none", random_erasing_prob=0.0, padded_crop=0).train()
    assert not disabled.enabled
    assert disabled(x) is x
    assert FinetuneAugmentation(rand_augment="rand-m9-p0", random_erasing_prob=0.0)(x) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_device_kept_and_input_untouched(dtype):
    torch.manual_seed(0)
    x = normalise(random_images()).to(dtype)
    before = x.clone()
    both = FinetuneAugmentation(random_erasing_prob=1.0)
    erasing_only = FinetuneAugmentation(rand_augment=None, random_erasing_prob=1.0)
    for aug in (both, erasing_only):
        out = aug(x)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert not torch.equal(out, x)
        assert torch.equal(x, before)  # never in place on the caller's batch


def test_seeded_reproducibility():
    x = normalise(random_images())
    aug = FinetuneAugmentation(padded_crop=2)
    torch.manual_seed(3)
    first = aug(x)
    torch.manual_seed(3)
    second = aug(x)
    torch.manual_seed(4)
    third = aug(x)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


# ------------------------------------------------------------------------------------ random erasing
def _erased_boxes(out, value):
    changed = out != value  # (B, 3, H, W)
    assert torch.equal(changed, changed[:, :1].expand_as(changed))  # all channels erased together
    return changed[:, 0]


def _assert_rectangles(masks):
    for mask in masks:
        rows, cols = mask.any(1), mask.any(0)
        assert torch.equal(mask, rows[:, None] & cols[None, :]), "erased region is not one axis-aligned box"


def test_random_erasing_pixel_mode_fills_one_box_with_standard_normal_noise():
    torch.manual_seed(0)
    x = torch.full((8, 3, 32, 32), 5.0)  # far from where N(0, 1) noise lands
    out = FinetuneAugmentation(rand_augment=None, random_erasing_prob=1.0, random_erasing_mode="pixel")(x)
    boxes = _erased_boxes(out, 5.0)
    _assert_rectangles(boxes)
    fraction = boxes.flatten(1).float().mean(1)
    assert bool((fraction > 0).all()) and bool((fraction < 0.45).all())
    noise = out.permute(1, 0, 2, 3)[:, boxes]
    assert noise.numel() > 500
    assert abs(noise.mean().item()) < 0.15 and abs(noise.std().item() - 1.0) < 0.15
    # per-pixel noise: not one colour per box
    assert noise.std(dim=1).min() > 0.5


def test_random_erasing_const_and_rand_modes():
    torch.manual_seed(1)
    x = torch.full((6, 3, 16, 16), 5.0)
    out = FinetuneAugmentation(rand_augment=None, random_erasing_prob=1.0, random_erasing_mode="const")(x)
    boxes = _erased_boxes(out, 5.0)
    _assert_rectangles(boxes)
    assert bool(boxes.flatten(1).any(1).all())
    assert bool((out.permute(1, 0, 2, 3)[:, boxes] == 0).all())

    out = FinetuneAugmentation(rand_augment=None, random_erasing_prob=1.0, random_erasing_mode="rand")(x)
    for image, box in zip(out, _erased_boxes(out, 5.0)):
        colours = image[:, box]  # (3, N): one colour per box
        assert torch.equal(colours, colours[:, :1].expand_as(colours))


def test_random_erasing_probability_is_per_image():
    x = normalise(random_images(batch=32, size=8))
    torch.manual_seed(0)
    out = FinetuneAugmentation(rand_augment=None, random_erasing_prob=0.5)(x)
    untouched = (out == x).flatten(1).all(1)
    assert 0 < int(untouched.sum()) < 32
    # p = 0 with RandAugment on: the erasing stage draws nothing, so the result is RandAugment's alone.
    aug_only = FinetuneAugmentation(random_erasing_prob=0.0)
    torch.manual_seed(5)
    expected = aug_only(x)
    torch.manual_seed(5)
    assert torch.equal(FinetuneAugmentation(random_erasing_prob=0.0, random_erasing_mode="const")(x), expected)


# -------------------------------------------------------------------------------------- RandAugment
def test_rand_augment_changes_images_and_stays_in_range():
    torch.manual_seed(0)
    x = normalise(random_images(batch=32, size=16))
    x[0:8:2], x[1:8:2] = 40.0, -40.0  # out of range after un-normalisation: clamped before the colour ops
    out = FinetuneAugmentation(random_erasing_prob=0.0)(x)
    images = unnormalise(out)
    assert images.min() >= -1e-5 and images.max() <= 1 + 1e-5
    changed = (out - x).flatten(1).abs().amax(1) > 1e-3
    # p = 0.5 per op and image, two ops: about 3/4 of the images change, and the rest only round-trip.
    assert 12 <= int(changed[8:].sum()) < 24


def test_rand_augment_choices_differ_per_image():
    # One op per image at a fixed magnitude, always applied: identical inputs can only come out different
    # if the op (or its sign) is drawn per image; a per-batch choice gives at most two distinct outputs.
    torch.manual_seed(0)
    x = normalise(random_images(batch=1, size=16)).expand(32, -1, -1, -1)
    out = FinetuneAugmentation(rand_augment="rand-m9-n1-p1", random_erasing_prob=0.0)(x)
    distinct = torch.unique(out.flatten(1).round(decimals=4), dim=0)
    assert distinct.shape[0] >= 8


def test_magnitude_noise_is_drawn_per_image():
    # On a flat grey image only a few ops act (Brightness, Solarize, Posterize, ...), each with a value that
    # depends on the magnitude alone: a fixed magnitude gives a handful of outcomes, mstd > 0 many more.
    def outcomes(spec):
        torch.manual_seed(0)
        x = normalise(torch.full((256, 3, 4, 4), 0.5))
        out = unnormalise(FinetuneAugmentation(rand_augment=spec, random_erasing_prob=0.0)(x))
        return torch.unique(out[:, 0, 2, 2].round(decimals=4)).numel()

    fixed, noisy = outcomes("rand-m5-n1-p1-inc1"), outcomes("rand-m5-n1-p1-mstd2-inc1")
    assert fixed <= 10 and noisy > 3 * fixed


# ---------------------------------------------------------------------------- fidelity to timm (PIL)
def _test_image(size=32, seed=0):
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (1, 3, size // 4, size // 4)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    array = smooth[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array), torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255


def _as_tensor(pil):
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255


M9 = 9 / 10  # timm level at magnitude 9
FILL = (124, 116, 104)


def _pil_reference(name, pil, increasing):
    enhance = max(0.1, 1 + 0.9 * M9) if increasing else M9 * 1.8 + 0.1
    warp = dict(fillcolor=FILL, resample=Image.BICUBIC)
    size = pil.size[0]
    return {
        "AutoContrast": lambda: ImageOps.autocontrast(pil),
        "Equalize": lambda: ImageOps.equalize(pil),
        "Invert": lambda: ImageOps.invert(pil),
        "Posterize": lambda: ImageOps.posterize(pil, 4 - int(M9 * 4) if increasing else int(M9 * 4)),
        "Solarize": lambda: ImageOps.solarize(pil, 256 - int(M9 * 256) if increasing else int(M9 * 256)),
        "SolarizeAdd": lambda: pil.point([min(255, i + int(M9 * 110)) if i < 128 else i for i in range(256)] * 3),
        "Color": lambda: ImageEnhance.Color(pil).enhance(enhance),
        "Contrast": lambda: ImageEnhance.Contrast(pil).enhance(enhance),
        "Brightness": lambda: ImageEnhance.Brightness(pil).enhance(enhance),
        "Sharpness": lambda: ImageEnhance.Sharpness(pil).enhance(enhance),
        "Rotate": lambda: pil.rotate(M9 * 30, **warp),
        "ShearX": lambda: pil.transform(pil.size, Image.AFFINE, (1, M9 * 0.3, 0, 0, 1, 0), **warp),
        "ShearY": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, 0, M9 * 0.3, 1, 0), **warp),
        "TranslateXRel": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, M9 * 0.45 * size, 0, 1, 0), **warp),
        "TranslateYRel": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, M9 * 0.45 * size), **warp),
    }[name]()


@pytest.mark.parametrize("increasing", [False, True])
@pytest.mark.parametrize("name", RAND_AUGMENT_OPS)
def test_ops_match_timm_pil(name, increasing):
    pil, images = _test_image()
    reference = _as_tensor(_pil_reference(name, pil, increasing))
    out = apply_rand_augment_op(images, name, 9.0, increasing=increasing, fill=[f / 255 for f in FILL])
    error = (out - reference).abs() * 255
    if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        # Bicubic kernels differ (a=-0.75 vs PIL's -0.5) and the border is blended with the fill.
        assert error.mean() < 3.0
    else:  # 8-bit ops exact, float colour ops within PIL's rounding
        assert error.max() <= 2.0
    if name not in ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd") and (
            increasing or name not in ("Color", "Contrast", "Brightness", "Sharpness")):
        # Signed ops: the negated draw is the mirror transform, far from the reference.
        negated = apply_rand_augment_op(images, name, 9.0, negate=True, increasing=increasing,
                                        fill=[f / 255 for f in FILL])
        assert ((negated - reference).abs() * 255).mean() > 2.0


def test_rand_augment_sees_the_exact_8bit_levels_of_a_normalised_batch(monkeypatch):
    """Undoing the normalisation left level v at v/255 - eps, which Posterize and Solarize read as v - 1 (16 and
    223 levels off timm's PIL ops at some levels); the policy now gets the 8-bit grid back."""
    mean = std = (0.5, 0.5, 0.5)
    levels = torch.arange(256, dtype=torch.float32).repeat(3, 1).view(1, 3, 16, 16)
    augment = FinetuneAugmentation(mean, std, rand_augment="rand-m9-n1-p1", random_erasing_prob=0.0)
    seen = []
    monkeypatch.setattr(augment, "_rand_augment", lambda images, fill: seen.append(images.clone()) or images)
    augment((levels / 255 - 0.5) / 0.5)
    assert torch.equal(seen[0] * 255, levels)


# ------------------------------------------------------------------------------------- padded crop
def test_padded_crop_shifts_content_into_black_padding():
    torch.manual_seed(0)
    size, pad = 8, 4
    original = (torch.arange(size * size, dtype=torch.float32).view(size, size) + 1) / (size * size + 1)
    images = original.expand(16, 3, size, size)
    aug = FinetuneAugmentation(rand_augment=None, random_erasing_prob=0.0, padded_crop=pad)
    out = unnormalise(aug(normalise(images)))
    assert out.shape == images.shape
    offsets = set()
    for image in out[:, 0]:
        content = image > 1e-4  # padding is black (0 before normalisation)
        rows, cols = content.any(1), content.any(0)
        assert torch.equal(content, rows[:, None] & cols[None, :])  # padding = whole border rows/columns
        top, left = int(rows.float().argmax()), int(cols.float().argmax())
        height, width = int(rows.sum()), int(cols.sum())
        # the visible window is a shifted copy of the original, shift at most `pad`
        dy = 0 if top > 0 else size - height  # content starts at `top` (shift down) or was cut at the top
        dx = 0 if left > 0 else size - width
        window = original[dy:dy + height, dx:dx + width]
        assert torch.allclose(image[top:top + height, left:left + width], window, atol=1e-5)
        assert size - height <= pad and size - width <= pad
        offsets.add((top - dy, left - dx))
    assert len(offsets) >= 5  # a random offset per image, not one per batch


def test_from_image_processor_uses_its_normalisation():
    from types import SimpleNamespace

    processor = SimpleNamespace(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0])
    aug = FinetuneAugmentation.from_image_processor(processor, rand_augment=None, random_erasing_prob=0.0,
                                                    padded_crop=2)
    assert torch.equal(aug.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert torch.equal(aug.std.flatten(), torch.tensor([0.25, 0.5, 1.0]))
    # black padding comes back as (0 - mean) / std in the processor's normalisation
    torch.manual_seed(0)
    out = aug(torch.zeros(8, 3, 8, 8))
    padding = torch.tensor([-2.0, -1.0, -0.5]).view(1, 3, 1, 1).expand_as(out)
    assert bool((out == padding).any()) and bool(((out == padding) | (out.abs() < 1e-6)).all())
