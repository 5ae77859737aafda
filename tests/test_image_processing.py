"""Tests of SimMIMImageProcessor, the mask generators and the datasets helpers (tiny sizes, CPU, offline)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import BLOCK_SIMMIM_HF

from simmim_hf import SimMIMConfig
from simmim_hf.data import SimMIMTransform, sample_seed, seed_worker, simmim_collate_fn
from simmim_hf.image_processing_simmim import SimMIMImageProcessor
from simmim_hf.masking import SimMIMMaskGenerator

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def rgb(height, width, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def tiny_processor(**kwargs):
    settings = dict(size=32, patch_size=4, mask_patch_size=8)
    settings.update(kwargs)
    return SimMIMImageProcessor(**settings)


# ---------------------------------------------------------------------------------------------- inputs
PIL_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"]


def make_pil(mode, height=30, width=41):
    rng = np.random.default_rng(1)
    if mode == "F":
        return PIL.Image.fromarray(rng.random((height, width), dtype=np.float32))
    if mode == "I;16":
        return PIL.Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return PIL.Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32))
    return rgb(height, width).convert(mode)


@pytest.mark.parametrize("mode", PIL_MODES)
def test_every_pil_mode_gives_rgb_batch(mode):
    image = make_pil(mode)
    assert image.mode == mode
    out = tiny_processor()(image, return_tensors="pt", seed=0)
    assert out["pixel_values"].shape == (1, 3, 32, 32) and out["pixel_values"].dtype == torch.float32
    assert out["bool_masked_pos"].shape == (1, 64) and out["bool_masked_pos"].dtype == torch.bool
    assert torch.isfinite(out["pixel_values"]).all()


def to_unit(pixel_values):
    """Undo the normalisation: (B, 3, H, W) -> values in [0, 1]."""
    return pixel_values.numpy() * STD[:, None, None] + MEAN[:, None, None]


@pytest.mark.parametrize(
    "image, expected",
    [
        (PIL.Image.new("L", (20, 20), 51), (0.2, 0.2, 0.2)),
        (PIL.Image.new("RGBA", (20, 20), (255, 0, 0, 0)), (1.0, 1.0, 1.0)),  # transparent -> white
        (PIL.Image.new("RGBA", (20, 20), (255, 0, 0, 255)), (1.0, 0.0, 0.0)),
        (PIL.Image.new("CMYK", (20, 20), (0, 255, 255, 0)), (1.0, 0.0, 0.0)),
        (PIL.Image.fromarray(np.full((20, 20), 32768, np.uint16)), (0.5, 0.5, 0.5)),  # I;16: /65535, not clipped
        (PIL.Image.fromarray(np.full((20, 20), 0.25, np.float32)), (0.25, 0.25, 0.25)),  # F
        (np.full((20, 20, 4), [0.0, 1.0, 0.0, 0.5]), (0.5, 1.0, 0.5)),  # float RGBA over white
        (np.full((20, 20), 65535, np.uint16), (1.0, 1.0, 1.0)),
    ],
    ids=["L", "RGBA-transparent", "RGBA-opaque", "CMYK", "I;16", "F", "float-RGBA", "uint16-gray"],
)
def test_colour_conversion_values(image, expected):
    out = tiny_processor(do_train=False)(image, return_tensors="pt")
    values = to_unit(out["pixel_values"])[0]
    np.testing.assert_allclose(values.mean(axis=(1, 2)), expected, atol=2e-3)
    assert values.std(axis=(1, 2)).max() < 1e-4  # a flat image stays flat


def test_array_layouts_and_dtypes_agree():
    """HWC / CHW / HW, uint8 / float / tensor inputs of the same picture give the same pixels."""
    # A smooth picture: on pixel noise PIL's 8-bit resampler clips between its two passes, float does not.
    hwc = np.array(rgb(6, 9).resize((45, 30), PIL.Image.BILINEAR))
    gray = hwc[..., 0]
    processor = tiny_processor(do_train=False)
    ref = processor(PIL.Image.fromarray(hwc), return_tensors="pt")["pixel_values"]
    for variant in (hwc, hwc.transpose(2, 0, 1), torch.from_numpy(hwc), torch.from_numpy(hwc).permute(2, 0, 1)):
        torch.testing.assert_close(processor(variant, return_tensors="pt")["pixel_values"], ref)
    # Float data is resampled in float: equal to the uint8 result up to uint8 rounding (1/255 / std).
    for variant in (hwc / 255.0, (hwc / 255.0).astype(np.float32).transpose(2, 0, 1), torch.from_numpy(hwc / 255.0)):
        torch.testing.assert_close(processor(variant, return_tensors="pt")["pixel_values"], ref, atol=0.03, rtol=0)
    gray_ref = processor(PIL.Image.fromarray(gray).convert("RGB"), return_tensors="pt")["pixel_values"]
    for variant in (gray, gray[None], gray[..., None], torch.from_numpy(gray)):
        torch.testing.assert_close(processor(variant, return_tensors="pt")["pixel_values"], gray_ref)
    # Training crops of 8-bit arrays are views of the input, resized by the same kernel as PIL inputs: identical.
    train = tiny_processor(do_train=True)
    photo = np.array(rgb(6, 9).resize((70, 50), PIL.Image.BILINEAR))
    ref = train(PIL.Image.fromarray(photo), return_tensors="pt", seed=3)["pixel_values"]
    for variant in (photo, photo.transpose(2, 0, 1), torch.from_numpy(photo).permute(2, 0, 1)):
        assert torch.equal(train(variant, return_tensors="pt", seed=3)["pixel_values"], ref)
    read_only = photo.copy()
    read_only.flags.writeable = False  # e.g. np.asarray of a PIL image: shared, never written to
    assert torch.equal(train(read_only, return_tensors="pt", seed=3)["pixel_values"], ref)
    bgr = np.ascontiguousarray(photo[..., ::-1])
    assert torch.equal(train(bgr[..., ::-1], return_tensors="pt", seed=3)["pixel_values"], ref)  # OpenCV's BGR->RGB view


def test_batched_mixed_sizes_and_types():
    images = [rgb(50, 70), np.random.rand(3, 40, 33), torch.rand(21, 64), make_pil("P", 100, 30),
              np.random.randint(0, 256, (17, 19, 4), dtype=np.uint8)]
    processor = tiny_processor()
    out = processor(images, return_tensors="pt")
    assert out["pixel_values"].shape == (5, 3, 32, 32)
    assert out["bool_masked_pos"].shape == (5, 64)
    # A (B, H, W, C) array is a batch, as is a nested list.
    assert processor(np.zeros((3, 20, 20, 3), np.uint8), return_tensors="pt")["pixel_values"].shape[0] == 3
    nested = processor([[rgb(20, 20)], [rgb(30, 20), rgb(20, 30)]], return_tensors="pt")
    assert nested["bool_masked_pos"].shape == (3, 64)


def test_return_tensors_conventions():
    processor = tiny_processor()
    as_lists = processor([rgb(20, 20), rgb(30, 20)], seed=3)
    assert isinstance(as_lists["pixel_values"], list) and as_lists["pixel_values"][0].shape == (3, 32, 32)
    as_np = processor([rgb(20, 20), rgb(30, 20)], seed=3, return_tensors="np")
    assert isinstance(as_np["pixel_values"], np.ndarray) and as_np["bool_masked_pos"].dtype == bool
    np.testing.assert_array_equal(as_np["pixel_values"][1], as_lists["pixel_values"][1])


def test_non_square_output():
    processor = SimMIMImageProcessor(size={"height": 32, "width": 48}, patch_size=4, mask_patch_size=16)
    out = processor([rgb(40, 30), rgb(30, 80)], return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 32, 48)
    assert out["bool_masked_pos"].shape == (2, 8 * 12)
    assert (out["bool_masked_pos"].sum(1) == math.ceil(6 * 0.6) * 16).all()


# ---------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("strategy", ["random", "block", "central"])
@pytest.mark.parametrize("mask_ratio", [0.1, 0.6, 0.9])
@pytest.mark.parametrize("size, patch_size, mask_patch_size", [
    ((32, 32), 4, 8), ((64, 96), 8, 16), ((192, 192), 4, 32), ((224, 160), 16, 32), ((48, 48), 16, 16),
])
def test_exact_masked_count(strategy, mask_ratio, size, patch_size, mask_patch_size):
    processor = SimMIMImageProcessor(size={"height": size[0], "width": size[1]}, patch_size=patch_size,
                                     mask_patch_size=mask_patch_size, mask_ratio=mask_ratio, mask_strategy=strategy)
    masks = processor([rgb(8, 8)] * 6, return_tensors="pt")["bool_masked_pos"]
    grid = (size[0] // patch_size, size[1] // patch_size)
    scale = mask_patch_size // patch_size
    units = (size[0] // mask_patch_size) * (size[1] // mask_patch_size)
    assert masks.shape == (6, grid[0] * grid[1]) and masks.dtype == torch.bool
    assert (masks.sum(1) == math.ceil(units * mask_ratio) * scale**2).all()
    # Row-major patch mask, constant on every mask unit (scale x scale patches).
    blocks = masks.view(6, grid[0] // scale, scale, grid[1] // scale, scale)
    assert (blocks == blocks[:, :, :1, :, :1]).all()


def test_random_mask_matches_official_recipe_statistically():
    """Every unit is equally likely to be masked (the official `np.random.permutation(n)[:k]`)."""
    gen = SimMIMMaskGenerator(64, patch_size=8, mask_patch_size=16, mask_ratio=0.6)
    units = gen.unit_mask(4000, generator=torch.Generator().manual_seed(0)).float().mean(0)
    assert gen.num_masked == 10
    assert torch.allclose(units, torch.full_like(units, 10 / 16), atol=0.03)


def components(mask: np.ndarray) -> int:
    """Number of 4-connected components of a 2-d bool array."""
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count, stack = count + 1, [start]
        seen[start] = True
        while stack:
            r, c = stack.pop()
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
    return count


def test_block_masks_are_blockwise():
    """BEiT-style: few large connected blobs, unlike random masks at the same ratio."""
    g = torch.Generator().manual_seed(0)
    block = SimMIMMaskGenerator(256, 16, 16, 0.4, "block").unit_mask(50, generator=g).numpy()
    random = SimMIMMaskGenerator(256, 16, 16, 0.4, "random").unit_mask(50, generator=g).numpy()
    block_components = np.mean([components(m) for m in block])
    random_components = np.mean([components(m) for m in random])
    assert block_components * 3 < random_components, (block_components, random_components)
    # Most masked units have a masked 4-neighbour (inside a block), far fewer for random masks.
    def neighboured(m):
        padded = np.pad(m, 1)
        n = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        return (n & m).sum() / m.sum()
    assert np.mean([neighboured(m) for m in block]) > 0.95
    # Different images get different blocks.
    assert len({m.tobytes() for m in block}) == 50


@pytest.mark.parametrize("size, mask_ratio, rows, cols", [
    ((256, 256), 0.25, slice(2, 6), slice(2, 6)),  # 8x8 grid, 16 units: the central 4x4
    ((224, 224), 0.18, slice(2, 5), slice(2, 5)),  # 7x7 grid, 9 units: the central 3x3
    ((128, 256), 0.25, slice(1, 3), slice(2, 6)),  # 4x8 grid, 8 units: a central 2x4, the grid's aspect
])
def test_central_mask_is_centred_rectangle(size, mask_ratio, rows, cols):
    gen = SimMIMMaskGenerator(size, patch_size=16, mask_patch_size=32, mask_ratio=mask_ratio, strategy="central")
    expected = np.zeros(gen.grid_size, dtype=bool)
    expected[rows, cols] = True
    units = gen.unit_mask(3).numpy()
    assert (units == expected).all()
    # And the patch mask is that rectangle upsampled.
    patches = gen(1)[0].view(size[0] // 16, size[1] // 16).numpy()
    assert (patches == expected.repeat(2, 0).repeat(2, 1)).all()


def test_central_mask_partial_ring_is_centred():
    gen = SimMIMMaskGenerator(256, 32, 32, 0.3, "central")  # 8x8 grid, 20 units: 4x4 + 4 ring units
    mask = gen.unit_mask(1)[0].numpy()
    assert mask.sum() == 20 and mask[2:6, 2:6].all()
    rows, cols = np.nonzero(mask)
    assert abs(rows.mean() - 3.5) <= 0.5 and abs(cols.mean() - 3.5) <= 0.5


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_output_and_different_without():
    processor = tiny_processor()
    images = [rgb(60, 40, 1), rgb(45, 45, 2), rgb(33, 70, 3)]
    a = processor(images, return_tensors="pt", seed=123)
    b = processor(images, return_tensors="pt", seed=123)
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
    assert torch.equal(a["bool_masked_pos"], b["bool_masked_pos"])
    c = processor(images, return_tensors="pt", seed=124)
    assert not torch.equal(a["bool_masked_pos"], c["bool_masked_pos"])
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    d, e = processor(images, return_tensors="pt"), processor(images, return_tensors="pt")
    assert not torch.equal(d["bool_masked_pos"], e["bool_masked_pos"])
    assert not torch.equal(d["pixel_values"], e["pixel_values"])


def test_generator_is_used_and_advanced():
    processor = tiny_processor()
    images = [rgb(60, 40), rgb(45, 45)]
    g = torch.Generator().manual_seed(7)
    first = processor(images, return_tensors="pt", generator=g)
    second = processor(images, return_tensors="pt", generator=g)
    assert not torch.equal(first["bool_masked_pos"], second["bool_masked_pos"])
    again = processor(images, return_tensors="pt", generator=torch.Generator().manual_seed(7))
    assert torch.equal(first["bool_masked_pos"], again["bool_masked_pos"])
    # seed=int is shorthand for a freshly seeded generator.
    assert torch.equal(processor(images, return_tensors="pt", seed=7)["pixel_values"], first["pixel_values"])


@pytest.mark.parametrize("strategy", ["random", "block"])
def test_per_image_seeds_independent_of_batch(strategy):
    processor = tiny_processor(mask_strategy=strategy, mask_ratio=0.4)
    a, b, c = rgb(60, 40, 1), rgb(45, 45, 2), rgb(33, 70, 3)
    batch = processor([a, b, c], return_tensors="pt", seed=[10, 11, 12])
    other = processor([c, b], return_tensors="pt", seed=[99, 11])
    alone = processor(b, return_tensors="pt", seed=[11])
    single = processor(b, return_tensors="pt", seed=11)  # an int seed on one image is the same stream
    for out, i in ((other, 1), (alone, 0), (single, 0)):
        assert torch.equal(out["pixel_values"][i], batch["pixel_values"][1])
        assert torch.equal(out["bool_masked_pos"][i], batch["bool_masked_pos"][1])
    # Flips happen (flip_prob=0.5) and are seeded: over 40 seeds both outcomes occur.
    flat = rgb(30, 30, 5)
    outs = processor([flat] * 40, return_tensors="pt", seed=list(range(40)), crop_scale=(1.0, 1.0),
                     crop_ratio=(1.0, 1.0))["pixel_values"]
    flipped = [torch.equal(o, outs[0].flip(-1)) for o in outs]
    same = [torch.equal(o, outs[0]) for o in outs]
    assert all(f or s for f, s in zip(flipped, same)) and 5 < sum(flipped) < 35


# ---------------------------------------------------------------------------------------------- transforms
def reference_eval(image: PIL.Image.Image, size: int, crop_pct: float = 0.875) -> np.ndarray:
    """torchvision's Resize(int(size / crop_pct), bicubic) + CenterCrop(size) + ToTensor + Normalize."""
    width, height = image.size
    short = int(size / crop_pct)
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    resized = np.asarray(image.convert("RGB").resize((new_w, new_h), PIL.Image.BICUBIC), dtype=np.float64) / 255.0
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    crop = resized[top : top + size, left : left + size]
    return ((crop - MEAN) / STD).transpose(2, 0, 1)


@pytest.mark.parametrize("hw", [(37, 50), (50, 37), (33, 33), (120, 61)])
def test_eval_transform_equals_independent_computation(hw):
    image = rgb(*hw, seed=hw[0])
    out = tiny_processor()(image, do_train=False, return_tensors="pt")
    assert set(out) == {"pixel_values"}  # no mask in eval mode unless asked
    np.testing.assert_allclose(out["pixel_values"][0].numpy(), reference_eval(image, 32), atol=1e-5, rtol=0)


def test_eval_mask_on_request_and_float_input():
    image = rgb(6, 8).resize((50, 37), PIL.Image.BILINEAR)  # smooth: see test_array_layouts_and_dtypes_agree
    out = tiny_processor(do_train=False)(image, return_mask=True, return_tensors="pt", seed=0)
    assert out["bool_masked_pos"].shape == (1, 64) and out["bool_masked_pos"].sum() == math.ceil(16 * 0.6) * 4
    float_out = tiny_processor(do_train=False)(np.asarray(image) / 255.0, return_tensors="pt")
    np.testing.assert_allclose(float_out["pixel_values"][0].numpy(), reference_eval(image, 32), atol=0.03, rtol=0)


def test_train_transform_full_crop_equals_resize_and_flip():
    """With the crop pinned to the whole image, the pretraining transform is a bilinear resize (+ flip).
    8-bit images are resized by torch's antialiased uint8 kernel: PIL's filter, at most one grey level off."""
    image = rgb(40, 60)
    processor = tiny_processor(crop_scale=(1.0, 1.0), crop_ratio=(1.5, 1.5))
    expected = (np.asarray(image.resize((32, 32), PIL.Image.BILINEAR), dtype=np.float64) / 255.0 - MEAN) / STD
    expected = expected.transpose(2, 0, 1)
    one_level = (1 / 255.0) / STD[:, None, None] + 1e-5
    for flip_prob, reference in ((0.0, expected), (1.0, expected[:, :, ::-1])):
        got = processor(image, flip_prob=flip_prob, return_tensors="pt")["pixel_values"][0].numpy()
        diff = np.abs(got - reference)
        assert (diff <= one_level).all() and (diff > 1e-5).mean() < 0.1  # pixel noise: worst case for rounding
    # Float images take PIL's float path: equal to PIL's float resize.
    planes = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    resized = np.stack([np.asarray(PIL.Image.fromarray(p).resize((32, 32), PIL.Image.BILINEAR)) for p in planes])
    got = processor(planes, flip_prob=0.0, return_tensors="pt")["pixel_values"][0].numpy()
    np.testing.assert_allclose(got, (resized - MEAN[:, None, None]) / STD[:, None, None], atol=1e-5, rtol=0)


def test_train_crops_cover_scale_range():
    """Crops of a horizontal ramp: the visible range of the ramp is the crop width / image width, which
    must lie within what crop_scale and crop_ratio allow (area 0.67..1, aspect 3/4..4/3)."""
    ramp = PIL.Image.fromarray(np.tile(np.linspace(0, 255, 200).astype(np.uint8)[None, :, None], (200, 1, 3)))
    out = tiny_processor(flip_prob=0.0)([ramp] * 30, return_tensors="pt", seed=list(range(30)))["pixel_values"]
    red = to_unit(out)[:, 0]
    span = red[:, :, -1].mean(1) - red[:, :, 0].mean(1)  # fraction of the width covered, roughly
    max_w = math.sqrt(1.0 * 4 / 3)  # widest crop: all of the area at aspect 4/3 (clipped at the image width)
    min_w = math.sqrt(0.67 * 3 / 4)
    assert span.min() > min_w - 0.1 and span.max() <= min(1.0, max_w) + 0.02
    assert span.max() - span.min() > 0.05  # crops vary


def test_normalisation_switches():
    image = PIL.Image.new("RGB", (16, 16), (255, 128, 0))
    raw = tiny_processor(do_train=False, do_normalize=False)(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(raw[0, :, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]))
    unscaled = tiny_processor(do_train=False, do_normalize=False, do_rescale=False)(image, return_tensors="pt")
    torch.testing.assert_close(unscaled["pixel_values"][0, :, 0, 0], torch.tensor([255.0, 128.0, 0.0]))


# ---------------------------------------------------------------------------------------------- model / config / Hub
@pytest.mark.parametrize("preset", ["vit-nano-p4-32", "swin-nano-w4-32"])
def test_model_accepts_processor_output(preset):
    try:
        from simmim_hf import SimMIMForMaskedImageModeling
    except ImportError:
        pytest.skip("simmim_hf.SimMIMForMaskedImageModeling is not available yet")
    config = SimMIMConfig.from_preset(preset)
    processor = SimMIMImageProcessor.from_config(config)
    assert processor.size.height == processor.size.width == config.image_size
    assert processor.patch_size == config.patch_size and processor.mask_patch_size == config.mask_patch_size
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(config).eval()
    out = model(**processor([rgb(40, 50), np.random.rand(30, 30, 3)], return_tensors="pt", seed=0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss > 0
    assert out.reconstruction.shape == (2, 3, 32, 32)


def test_from_config_and_overrides():
    config = SimMIMConfig.from_preset("swin-base-w6-192")
    processor = SimMIMImageProcessor.from_config(config, mask_strategy="block")
    settings = (processor.size.height, processor.patch_size, processor.mask_patch_size, processor.mask_ratio)
    assert settings == (192, 4, 32, 0.6)
    out = processor(rgb(50, 60), return_tensors="pt", seed=0)
    assert out["bool_masked_pos"].shape == (1, 48 * 48) and out["bool_masked_pos"].sum() == 22 * 64
    with pytest.raises(ValueError, match="num_channels=1"):
        SimMIMImageProcessor.from_config(SimMIMConfig(num_channels=1))


def test_save_load_roundtrip(tmp_path):
    from transformers import AutoImageProcessor

    processor = tiny_processor(mask_strategy="block", mask_ratio=0.4, size={"height": 32, "width": 48})
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["mask_strategy"] == "block" and saved["size"] == {"height": 32, "width": 48}
    assert "seed" not in saved and "generator" not in saved
    for loaded in (SimMIMImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is SimMIMImageProcessor
        assert loaded.to_dict() == processor.to_dict()
        assert loaded.do_train is False  # a saved processor loads in evaluation mode; training is asked for
        a = loaded(rgb(40, 40), do_train=True, return_tensors="pt", seed=5)
        b = processor(rgb(40, 40), return_tensors="pt", seed=5)
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["bool_masked_pos"], b["bool_masked_pos"])


def test_trust_remote_code_in_fresh_process(tmp_path):
    """The saved folder loads with trust_remote_code where simmim_hf cannot be imported."""
    model_dir, work_dir = tmp_path / "checkpoint", tmp_path / "elsewhere"
    work_dir.mkdir()
    processor = SimMIMImageProcessor.from_config(SimMIMConfig.from_preset("vit-nano-p4-32"), mask_ratio=0.5)
    SimMIMImageProcessor.register_for_auto_class("AutoImageProcessor")
    processor.save_pretrained(model_dir)
    SimMIMConfig.from_preset("vit-nano-p4-32").save_pretrained(model_dir)
    assert (model_dir / "image_processing_simmim.py").exists() and (model_dir / "masking.py").exists()
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    np.save(work_dir / "image.npy", image)
    expected = processor(image, return_tensors="pt", seed=[3])

    script = textwrap.dedent(f"""
        import importlib.util, sys
        import numpy as np, torch
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "SimMIMImageProcessor", type(processor)
        assert "simmim_hf" not in sys.modules
        assert "bool_masked_pos" not in processor(np.load("image.npy"), return_tensors="pt")  # evaluation mode
        out = processor(np.load("image.npy"), do_train=True, return_tensors="pt", seed=[3])
        torch.save({{k: v for k, v in out.items()}}, "out.pt")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONNOUSERSITE="1")
    # BLOCK_SIMMIM_HF makes `import simmim_hf` fail even where the package is installed (e.g. editable).
    result = subprocess.run([sys.executable, "-c", BLOCK_SIMMIM_HF + script], cwd=work_dir, env=env,
                            capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(work_dir / "out.pt")
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert torch.equal(got["bool_masked_pos"], expected["bool_masked_pos"])


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(size=36), r"`size`.*mask_patch_size=8.*height=36, width=36"),
    (dict(size={"height": 32, "width": 40}, mask_patch_size=16), r"`size`.*mask_patch_size=16.*width=40"),
    (dict(mask_patch_size=6), r"`mask_patch_size`.*patch_size=4.*mask_patch_size=6"),
    (dict(mask_ratio=0.0), r"`mask_ratio`.*mask_ratio=0.0"),
    (dict(mask_ratio=1.0), r"`mask_ratio`.*mask_ratio=1.0"),
    (dict(mask_ratio=-0.2), r"`mask_ratio`.*mask_ratio=-0.2"),
    (dict(mask_ratio=1.5), r"`mask_ratio`.*mask_ratio=1.5"),
    (dict(mask_strategy="checkerboard"), r"`mask_strategy`.*'random'.*mask_strategy='checkerboard'"),
    (dict(crop_scale=(0.9, 0.5)), r"`crop_scale`.*crop_scale=\(0.9, 0.5\)"),
    (dict(crop_scale=(0.5, 1.5)), r"`crop_scale`.*at most 1.*crop_scale=\(0.5, 1.5\)"),
    (dict(crop_ratio=(0.0, 1.0)), r"`crop_ratio`.*crop_ratio=\(0.0, 1.0\)"),
    (dict(flip_prob=1.5), r"`flip_prob`.*flip_prob=1.5"),
    (dict(crop_pct=0.0), r"`crop_pct`.*crop_pct=0.0"),
])
def test_invalid_settings_raise_at_construction_and_call(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_processor(**kwargs)
    processor = tiny_processor()
    with pytest.raises(ValueError, match=match):
        processor(rgb(20, 20), **kwargs)


@pytest.mark.parametrize("images, match", [
    ([], r"`images` is empty"),
    (np.zeros((2, 3, 4, 5, 6), np.uint8), r"`images`.*shape \(2, 3, 4, 5, 6\)"),
    (np.zeros((7, 8, 5), np.uint8), r"`images`.*1, 3 or 4 channels.*\(7, 8, 5\)"),
    (np.zeros((0, 8, 3), np.uint8), r"`images`.*non-empty.*\(0, 8, 3\)"),
    (np.full((8, 8, 3), -1, np.int32), r"`images` integer arrays.*0\.\.255.*dtype=int32.*\[-1, -1\]"),
    (np.full((8, 8, 3), 70000, np.int64), r"`images` integer arrays.*dtype=int64.*\[70000, 70000\]"),
    (np.zeros((8, 8, 3), bool), r"`images`.*dtype=bool"),
    (np.full((8, 8, 3), np.nan, np.float32), r"`images`.*NaN or infinite"),
    (torch.full((3, 8, 8), float("inf")), r"`images`.*NaN or infinite"),
    (np.full((8, 8, 3), 255.0), r"`images`.*\[0, 1\].*\[255, 255\]"),
    (["not an image path.png"], r"not an image path"),
    ([{"pixels": 1}], r"`images`.*dict"),
])
def test_invalid_images_raise(images, match):
    with pytest.raises((ValueError, FileNotFoundError, OSError), match=match) as info:
        tiny_processor()(images)
    if not isinstance(images, list) or not images or not isinstance(images[0], str):
        assert info.type is ValueError


def test_seed_errors():
    processor = tiny_processor()
    with pytest.raises(ValueError, match=r"`seed`.*one seed per image \(2 images\); got 3 seeds"):
        processor([rgb(9, 9), rgb(9, 9)], seed=[1, 2, 3])
    for name, value in (("seed", 3), ("generator", torch.Generator())):
        with pytest.raises(ValueError, match=rf"`{name}` is a per-call argument.*{name}="):
            tiny_processor(**{name: value})


def test_mask_generator_errors():
    with pytest.raises(ValueError, match=r"`size`.*size=-3"):
        SimMIMMaskGenerator(-3, 4)
    with pytest.raises(ValueError, match=r"`patch_size`.*patch_size=0"):
        SimMIMMaskGenerator(32, 0)
    with pytest.raises(ValueError, match=r"`block_aspect_ratio`.*block_aspect_ratio=2"):
        SimMIMMaskGenerator(32, 4, 8, block_aspect_ratio=2)


# ---------------------------------------------------------------------------------------------- datasets helpers
def test_set_transform_fresh_masks_per_epoch_and_reproducible():
    datasets = pytest.importorskip("datasets")
    images = [rgb(30 + i, 40, seed=i) for i in range(6)]
    dataset = datasets.Dataset.from_dict({"image": images, "label": list(range(6)), "index": list(range(6))})
    dataset = dataset.cast_column("image", datasets.Image())
    transform = SimMIMTransform(tiny_processor(), seed=1234, index_column="index", keep_columns=("label",))
    dataset.set_transform(transform)

    epoch0 = dataset[0:6]
    assert epoch0["pixel_values"].shape == (6, 3, 32, 32) and epoch0["bool_masked_pos"].shape == (6, 64)
    assert epoch0["label"] == list(range(6))
    again = dataset[[4, 0, 2]]  # other batch composition, same epoch: the same samples
    assert torch.equal(again["bool_masked_pos"][0], epoch0["bool_masked_pos"][4])
    assert torch.equal(again["pixel_values"][1], epoch0["pixel_values"][0])
    transform.set_epoch(1)
    epoch1 = dataset[0:6]
    assert not torch.equal(epoch1["bool_masked_pos"], epoch0["bool_masked_pos"])  # fresh masks every epoch
    assert not torch.equal(epoch1["pixel_values"], epoch0["pixel_values"])

    batch = simmim_collate_fn([dataset[i] for i in range(3)])
    assert set(batch) == {"pixel_values", "bool_masked_pos", "labels"}
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["bool_masked_pos"].dtype == torch.bool
    assert torch.equal(batch["bool_masked_pos"], epoch1["bool_masked_pos"][:3])


def test_dataloader_workers_do_not_change_samples():
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"image": [rgb(30, 30, seed=i) for i in range(8)], "index": list(range(8))})
    dataset = dataset.cast_column("image", datasets.Image())
    dataset.set_transform(SimMIMTransform(tiny_processor(), seed=7, index_column="index"))

    def masks(num_workers, batch_size):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=simmim_collate_fn,
                                             num_workers=num_workers, worker_init_fn=seed_worker)
        return torch.cat([b["bool_masked_pos"] for b in loader])

    reference = masks(0, 8)
    assert torch.equal(masks(2, 3), reference)
    assert len({m.numpy().tobytes() for m in reference}) == 8


def test_set_epoch_reaches_persistent_dataloader_workers():
    """Persistent workers hold the copy of the transform they started with: the epoch is shared with them, so
    each epoch still gets its own crops and masks."""
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"image": [rgb(30, 30, seed=i) for i in range(4)], "index": list(range(4))})
    dataset = dataset.cast_column("image", datasets.Image())
    transform = SimMIMTransform(tiny_processor(), seed=7, index_column="index")
    dataset.set_transform(transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=simmim_collate_fn, num_workers=1,
                                         persistent_workers=True)
    per_epoch = []
    for epoch in range(2):
        transform.set_epoch(epoch)
        per_epoch.append(torch.cat([batch["bool_masked_pos"] for batch in loader]))
    assert torch.equal(per_epoch[1], dataset[0:4]["bool_masked_pos"])  # epoch 1's masks, computed here
    assert not torch.equal(per_epoch[0], per_epoch[1])


def test_seed_worker_differs_across_ranks_and_workers():
    def stream(rank, worker_id):
        torch.manual_seed(0)  # every rank's main process seeded identically, e.g. by set_seed(0)
        seed_worker(worker_id, rank=rank)
        return tuple(torch.rand(4).tolist()), float(np.random.rand())

    streams = {stream(rank, worker) for rank in range(3) for worker in range(3)}
    assert len(streams) == 9
    assert stream(1, 2) == stream(1, 2)


def test_sample_seed_and_transform_errors():
    assert sample_seed(1, 0, 5) == sample_seed(1, 0, 5) != sample_seed(1, 1, 5) != sample_seed(1, 0, 6)
    assert 0 <= sample_seed(2**40, 3, 10**9) < 2**63
    with pytest.raises(ValueError, match=r"`index_column` is required with seed=3"):
        SimMIMTransform(tiny_processor(), seed=3)
    with pytest.raises(ValueError, match=r"column 'index' is missing"):
        SimMIMTransform(tiny_processor(), seed=3, index_column="index")({"image": [rgb(9, 9)]})
    with pytest.raises(ValueError, match=r"`examples` is empty"):
        simmim_collate_fn([])


@pytest.mark.parametrize("do_rescale", [True, False])
def test_do_rescale_false_leaves_values_as_they_are(do_rescale):
    """As in transformers (whose warning suggests `do_rescale=False` for inputs already in [0, 1]): float inputs
    are never rescaled, and 8-bit ones are only with `do_rescale=True`."""
    processor = tiny_processor(do_rescale=do_rescale)
    mean, std = torch.tensor(processor.image_mean).view(3, 1, 1), torch.tensor(processor.image_std).view(3, 1, 1)
    floats = processor([np.full((40, 40, 3), 0.5, dtype=np.float32)], do_train=False, return_tensors="pt")
    torch.testing.assert_close(floats["pixel_values"][0], ((0.5 - mean) / std).expand(3, 32, 32))
    bytes_ = processor([np.full((40, 40, 3), 128, dtype=np.uint8)], do_train=False, return_tensors="pt")
    value = 128 / 255 if do_rescale else 128.0
    torch.testing.assert_close(bytes_["pixel_values"][0], ((value - mean) / std).expand(3, 32, 32))


@pytest.mark.parametrize("kind", ["float", "uint16", "bicubic"])
def test_a_training_crop_never_reads_pixels_outside_it(kind):
    """Crop, then resize (torchvision's RandomResizedCrop), on every path: the image is white inside the crop this
    seed draws and black outside, so every output pixel must be white."""
    from simmim_hf.image_processing_simmim import _crop_params

    seed, height, width = 3, 90, 120
    uniforms = torch.rand(41, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    processor = tiny_processor(do_normalize=False, flip_prob=0.0)
    top, left, h, w = _crop_params(height, width, processor.crop_scale, processor.crop_ratio, uniforms[:40])
    inside = np.zeros((height, width, 3), dtype=np.float32)
    inside[top:top + h, left:left + w] = 1.0
    image = {"float": inside, "uint16": (inside * 65535).astype(np.uint16),
             "bicubic": (inside * 255).astype(np.uint8)}[kind]
    resample = PIL.Image.BICUBIC if kind == "bicubic" else None
    out = processor([image], do_train=True, return_tensors="pt", seed=[seed],
                    **({"resample": resample} if resample is not None else {}))["pixel_values"]
    assert out.min() >= 1.0 - 1e-6, out.min()


def test_other_integer_types_read_as_8_or_16_bit_by_their_values():
    """np.random.randint / torch.randint give int64; transformers' processors take them, and so does this one:
    the same values as uint8 (or uint16) give the same pixels."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 24, 3))  # int64
    processor = tiny_processor(do_train=False)
    expected = processor(pixels.astype(np.uint8), return_tensors="pt")["pixel_values"]
    assert torch.equal(processor(pixels, return_tensors="pt")["pixel_values"], expected)
    assert torch.equal(processor(torch.from_numpy(pixels).permute(2, 0, 1), return_tensors="pt")["pixel_values"],
                       expected)
    deep = rng.integers(0, 65536, (20, 24, 3))
    assert torch.equal(processor(deep.astype(np.int32), return_tensors="pt")["pixel_values"],
                       processor(deep.astype(np.uint16), return_tensors="pt")["pixel_values"])


def test_a_custom_rescale_factor_applies_at_every_bit_depth():
    """rescale_factor = 1 / 127.5 with mean = std = 1 maps pixels to [-1, 1]: for 8-bit, 16-bit and float input of
    the same picture alike, and on the uint8 path finished on the accelerator (it used to leave deeper images in
    [-1, 0])."""
    ramp = np.linspace(0, 255, 32)
    pixels = np.stack([ramp[:, None] + 0 * ramp, 0 * ramp[:, None] + ramp, 255 - ramp[:, None] + 0 * ramp],
                      axis=-1).round().astype(np.uint8)  # smooth: uint8 and float resampling agree closely
    processor = tiny_processor(rescale_factor=1 / 127.5, image_mean=[1.0] * 3, image_std=[1.0] * 3, do_train=False)
    eight = processor(pixels, return_tensors="pt")["pixel_values"]
    sixteen = processor(pixels.astype(np.uint16) * 257, return_tensors="pt")["pixel_values"]
    floating = processor(pixels.astype(np.float32) / 255, return_tensors="pt")["pixel_values"]
    assert eight.min() < -0.8 and eight.max() > 0.8  # the ramp spans [-1, 1] before the center crop
    torch.testing.assert_close(sixteen, eight, atol=2e-2, rtol=0)  # resampled in float vs uint8
    torch.testing.assert_close(floating, eight, atol=2e-2, rtol=0)
    uint8_batch = processor(pixels, return_tensors="pt", return_uint8=True)["pixel_values"]
    torch.testing.assert_close(processor.normalize_uint8(uint8_batch), eight, atol=1e-6, rtol=0)
    unscaled = processor(pixels.astype(np.float32) / 255, return_tensors="pt", do_rescale=False)["pixel_values"]
    assert unscaled.min() >= -1.0 - 1e-6 and unscaled.max() <= 0.0 + 1e-6  # [0, 1] - 1: left as given
