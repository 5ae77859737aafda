"""Property-based tests (hypothesis): for random images, settings, configs and model inputs, the image processor,
the mask generators, the config and the model either produce valid output (exact masked counts
`ceil(units * mask_ratio)` per image, the right shapes and dtypes) or raise a ValueError that names the offending
argument; never any other exception.

Most properties draw a valid setting and, half of the time, corrupt exactly one argument with a wrong value or type:
the valid draws must succeed (with checked invariants), the corrupted ones must fail with a ValueError naming that
argument. Deterministic (`derandomize=True`) and without an example database, so runs are reproducible and leave
no files; tiny images and few examples keep the whole file to seconds."""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import PIL.Image
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling
from simmim_hf.image_processing_simmim import SimMIMImageProcessor
from simmim_hf.masking import MASK_STRATEGIES, SimMIMMaskGenerator

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None, report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NAN, INF = float("nan"), float("inf")
# Values that are wrong for almost any argument.
JUNK = st.sampled_from(["16", "0.5", "", None, True, False, NAN, INF, -INF, [], [1], {}, 2**70, -1, 0, 1.5, object()])


def named_argument(error: ValueError) -> str:
    """The argument a ValueError names (house style: "`name` must ...; got name=...")."""
    found = re.search(r"`(\w+)`", str(error))
    assert found, f"ValueError does not name the argument: {error}"
    event(f"ValueError naming {found.group(1)}")
    return found.group(1)


def corrupt(valid: dict, corruptions: dict):
    """Strategy: `(arguments, corrupted name or None)`: the valid arguments, half of the time with one of them
    replaced by a value from `corruptions[name]`."""
    names = sorted(corruptions)
    return st.one_of(
        st.just((valid, None)),
        st.sampled_from(names).flatmap(
            lambda name: corruptions[name].map(lambda value: ({**valid, name: value}, name))),
    )


# ---------------------------------------------------------------------------------------------- images
PIL_MODES = ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F"]


@st.composite
def images(draw):
    """One image: PIL (any mode), numpy or torch, 2-d or 3-d (channels first or last, 1-5 channels), sides 0-9,
    integer or float dtypes, values in range or not."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    height, width = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    kind = draw(st.sampled_from(["pil", "numpy", "torch"]))
    if kind == "pil":
        mode = draw(st.sampled_from(PIL_MODES))
        if mode == "I;16":
            return PIL.Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
        if mode == "I":
            return PIL.Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32))
        if mode == "F":
            return PIL.Image.fromarray(rng.random((height, width), dtype=np.float32))
        return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    layout = draw(st.sampled_from(["hw", "hwc", "chw"]))
    channels = draw(st.sampled_from([1, 3, 4, 3, 2, 5]))
    shape = {"hw": (height, width), "hwc": (height, width, channels), "chw": (channels, height, width)}[layout]
    dtypes = ["uint8", "uint16", "float32", "float64", "float16", "int32", "bool"]
    if kind == "torch":
        dtypes = ["uint8", "float32", "float64", "float16", "bfloat16", "int64", "bool"]
    dtype = draw(st.sampled_from(dtypes))
    if dtype in ("uint8", "uint16", "int32", "int64"):
        array = rng.integers(0, 256 if dtype == "uint8" else 65536, shape).astype("int64")
    elif dtype == "bool":
        array = rng.random(shape) < 0.5
    else:
        array = rng.random(shape) * draw(st.sampled_from([1.0, 1.0, 1.0, 1.0005, 255.0]))
        if array.size and draw(st.booleans()) and draw(st.booleans()):
            array.flat[0] = draw(st.sampled_from([NAN, INF, -0.5]))
    if kind == "numpy":
        return array.astype(dtype)
    return torch.from_numpy(np.asarray(array)).to(getattr(torch, dtype))


@st.composite
def valid_images(draw):
    """A small valid image: uint8 RGB (PIL or numpy HWC) or float in [0, 1] (torch CHW, any float dtype)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    height, width = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["pil", "numpy", "torch"]))
    if kind == "torch":
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
        return torch.rand(3, height, width, generator=torch.Generator().manual_seed(int(rng.integers(2**31)))).to(dtype)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(array) if kind == "pil" else array


@FAST
@given(batch=st.lists(images(), min_size=1, max_size=2))
def test_any_image_is_processed_or_rejected_by_name(batch):
    """Default settings, any input image: a (B, 3, 16, 16) float batch or a ValueError naming `images`."""
    processor = SimMIMImageProcessor(size=16, patch_size=4, mask_patch_size=8)
    try:
        out = processor(batch, return_tensors="pt", seed=0)
    except ValueError as error:
        assert named_argument(error) == "images", error
        return
    event("processed")
    assert out["pixel_values"].shape == (len(batch), 3, 16, 16) and out["pixel_values"].dtype == torch.float32
    assert torch.isfinite(out["pixel_values"]).all()
    assert (out["bool_masked_pos"].sum(1) == math.ceil(4 * 0.6) * 4).all()


# ---------------------------------------------------------------------------------------------- processor settings
@st.composite
def valid_processor_settings(draw):
    p = draw(st.sampled_from([1, 2, 4]))
    mps = p * draw(st.sampled_from([1, 2, 4]))
    height, width = mps * draw(st.integers(1, max(1, 24 // mps))), mps * draw(st.integers(1, max(1, 24 // mps)))
    size = height if height == width and draw(st.booleans()) else {"height": height, "width": width}
    optional = dict(
        mask_ratio=st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
        mask_strategy=st.sampled_from(MASK_STRATEGIES),
        do_train=st.booleans(),
        return_mask=st.one_of(st.none(), st.booleans()),
        crop_pct=st.floats(0.1, 1.0),
        crop_scale=st.tuples(st.floats(0.05, 0.5), st.floats(0.5, 1.0)),
        crop_ratio=st.tuples(st.floats(0.5, 1.0), st.floats(1.0, 2.0)),
        flip_prob=st.floats(0.0, 1.0),
        image_mean=st.one_of(st.floats(-1, 1), st.lists(st.floats(-1, 1), min_size=3, max_size=3)),
        image_std=st.one_of(st.floats(0.01, 2), st.lists(st.floats(0.01, 2), min_size=3, max_size=3)),
        do_normalize=st.booleans(),
    )
    chosen = draw(st.fixed_dictionaries({}, optional=optional))
    return {"size": size, "patch_size": p, "mask_patch_size": mps, **chosen}


# Wrong values per argument, and the names an error about each may carry (a bad patch_size can surface as "the
# mask_patch_size is not a multiple of patch_size", a bad mask_patch_size as "size is not divisible by it").
PROCESSOR_CORRUPTIONS = {
    "size": (st.sampled_from([0, -8, "16", 16.0, True, [16], {"height": 16}, {"height": 16, "width": 0}]), {"size"}),
    "patch_size": (st.sampled_from([0, -4, "4", 2.0, True, 1000]), {"patch_size", "mask_patch_size"}),
    "mask_patch_size": (st.sampled_from([0, -8, "8", 8.0, True, 1000]), {"mask_patch_size", "size"}),
    "mask_ratio": (st.sampled_from([0, 1, 0.0, 1.0, -0.1, 1.5, NAN, INF, "0.5", True, [0.5]]), {"mask_ratio"}),
    "mask_strategy": (st.sampled_from(["checkerboard", "", 1, ("random",)]), {"mask_strategy"}),
    "crop_pct": (st.sampled_from([0.0, 1e-9, 0.05, 1.01, NAN, -INF, "0.9", True]), {"crop_pct"}),
    "crop_scale": (st.sampled_from([(0.9, 0.5), (0.5, 1.5), (0, 1), "x", (0.5,), (NAN, 1.0)]), {"crop_scale"}),
    "crop_ratio": (st.sampled_from([(2.0, 1.0), (0.0, 1.0), "x", (1.0, INF)]), {"crop_ratio"}),
    "flip_prob": (st.sampled_from([-0.1, 1.5, NAN, "0.5"]), {"flip_prob"}),
    "image_mean": (st.sampled_from([[0.5, 0.5], [0.1, 0.2, 0.3, 0.4], [NAN, 0.0, 0.0], "0.5"]), {"image_mean"}),
    "image_std": (st.sampled_from([[0.5, 0.0, 0.5], [1, -1, 1], [0.5, 0.5], 0.0, "1"]), {"image_std"}),
    "seed": (st.sampled_from([2**70, 2**64, -1, -(2**63), 1.5, "3", True, [2**64]]), {"seed"}),
}


@st.composite
def processor_cases(draw):
    valid = draw(valid_processor_settings())
    valid["seed"] = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    settings_, corrupted = draw(corrupt(valid, {k: v[0] for k, v in PROCESSOR_CORRUPTIONS.items()}))
    if corrupted in ("image_mean", "image_std"):
        settings_["do_normalize"] = True  # only read when normalising
    return settings_, corrupted


@FAST
@given(batch=st.lists(valid_images(), min_size=1, max_size=3), case=processor_cases(),
       at_construction=st.booleans())
def test_processor_output_or_named_value_error(batch, case, at_construction):
    settings_, corrupted = case
    note(f"settings={settings_!r} corrupted={corrupted!r} at_construction={at_construction}")
    seed = settings_.pop("seed")
    if corrupted != "seed" and seed is not None and seed % 2 and seed + len(batch) < 2**64:
        seed = [seed + i for i in range(len(batch))]  # per-image seeds for odd seeds
    try:
        if at_construction:
            out = SimMIMImageProcessor(**settings_)(batch, return_tensors="pt", seed=seed)
        else:
            base = {k: settings_[k] for k in ("size", "patch_size", "mask_patch_size")} if corrupted not in (
                "size", "patch_size", "mask_patch_size") else {"size": 16, "patch_size": 4, "mask_patch_size": 8}
            out = SimMIMImageProcessor(**base)(batch, return_tensors="pt", seed=seed, **settings_)
    except ValueError as error:
        assert corrupted is not None, f"valid settings rejected: {error}"
        assert named_argument(error) in PROCESSOR_CORRUPTIONS[corrupted][1], error
        return
    assert corrupted is None, f"accepted {corrupted}={settings_.get(corrupted, seed)!r}"
    event("processed")
    size = settings_["size"]
    height, width = (size, size) if isinstance(size, int) else (size["height"], size["width"])
    pixel_values = out["pixel_values"]
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (len(batch), 3, height, width)
    assert torch.isfinite(pixel_values).all()
    return_mask = settings_.get("return_mask")
    assert ("bool_masked_pos" in out) == (return_mask if return_mask is not None else settings_.get("do_train", True))
    if "bool_masked_pos" in out:
        mask, p, mps = out["bool_masked_pos"], settings_["patch_size"], settings_["mask_patch_size"]
        assert mask.dtype == torch.bool and mask.shape == (len(batch), (height // p) * (width // p))
        units = (height // mps) * (width // mps)
        assert (mask.sum(1) == math.ceil(units * settings_.get("mask_ratio", 0.6)) * (mps // p) ** 2).all()


# ---------------------------------------------------------------------------------------------- masking
@st.composite
def valid_mask_settings(draw):
    p = draw(st.sampled_from([1, 2, 4]))
    mps = p * draw(st.sampled_from([1, 2, 4]))
    units = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    return dict(
        size=(units[0] * mps, units[1] * mps), patch_size=p, mask_patch_size=mps,
        mask_ratio=draw(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)),
        strategy=draw(st.sampled_from(MASK_STRATEGIES)), block_min_units=draw(st.integers(1, 8)),
        block_aspect_ratio=draw(st.floats(0.05, 1.0)), batch_size=draw(st.integers(1, 4)),
        per_image=draw(st.booleans()), generator=None,
    )


MASK_CORRUPTIONS = {
    "size": (st.sampled_from([(33, 32), 0, -32, "32", 32.0, True, (32,)]), {"size"}),
    "patch_size": (st.sampled_from([0, -1, "4", 2.0, True]), {"patch_size"}),
    "mask_patch_size": (st.sampled_from([0, -4, "8", 8.0, True, 1000]), {"mask_patch_size", "size"}),
    "mask_ratio": (st.sampled_from([0, 1, 0.0, 1.0, -0.1, 1.5, NAN, INF, "0.5", True]), {"mask_ratio"}),
    "strategy": (st.sampled_from(["checkerboard", None, 1]), {"mask_strategy"}),
    "block_min_units": (st.sampled_from([0, -1, "4", 2.5, True, None]), {"block_min_units"}),
    "block_aspect_ratio": (st.sampled_from([0, 0.0, -0.5, 1.5, NAN, "0.3", True, None]), {"block_aspect_ratio"}),
    "batch_size": (st.sampled_from([0, -1, "2", 2.5, True, None]), {"batch_size", "generators"}),
    "generator": (st.sampled_from(["x", 5, np.random.default_rng(0)]), {"generator", "generators"}),
}


@FAST
@given(case=st.builds(lambda v: v, valid_mask_settings()).flatmap(
    lambda valid: corrupt(valid, {k: v[0] for k, v in MASK_CORRUPTIONS.items()})), seed=st.integers(0, 2**32))
def test_mask_generator_exact_counts_or_named_value_error(case, seed):
    args, corrupted = case
    note(f"args={args!r} corrupted={corrupted!r}")

    def sample():
        generator = SimMIMMaskGenerator(args["size"], args["patch_size"], args["mask_patch_size"], args["mask_ratio"],
                                        args["strategy"], block_min_units=args["block_min_units"],
                                        block_aspect_ratio=args["block_aspect_ratio"])
        if corrupted == "generator":
            return generator(1, generator=args["generator"])
        if args["per_image"]:
            count = args["batch_size"] if corrupted != "batch_size" else 0
            return generator(generators=[torch.Generator().manual_seed(seed + i) for i in range(count)])
        return generator(args["batch_size"], generator=torch.Generator().manual_seed(seed))

    try:
        mask = sample()
    except ValueError as error:
        assert corrupted is not None, f"valid settings rejected: {error}"
        assert named_argument(error) in MASK_CORRUPTIONS[corrupted][1], error
        return
    assert corrupted is None, f"accepted {corrupted}={args[corrupted]!r}"
    event("sampled")
    p, mps, batch = args["patch_size"], args["mask_patch_size"], args["batch_size"]
    gh, gw, scale = args["size"][0] // mps, args["size"][1] // mps, mps // p
    assert mask.dtype == torch.bool and mask.shape == (batch, gh * scale * gw * scale)
    assert (mask.sum(1) == math.ceil(gh * gw * args["mask_ratio"]) * scale**2).all()
    # Whole units: every scale x scale block of patches is all masked or all visible.
    blocks = mask.view(batch, gh, scale, gw, scale)
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    assert torch.equal(sample(), mask)  # the same generator state gives the same masks


# ---------------------------------------------------------------------------------------------- config
VIT = dict(encoder_type="vit", image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
           num_attention_heads=2, mask_patch_size=8)
SWIN = dict(encoder_type="swin", image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 4, 8],
            window_size=4, mask_patch_size=8)
CONFIG_FIELDS = {
    "image_size": st.sampled_from([16, 32, 48, 64, 30]),
    "patch_size": st.sampled_from([1, 2, 4, 8, 3]),
    "mask_patch_size": st.sampled_from([4, 8, 16, 32, 6]),
    "num_channels": st.sampled_from([1, 3]),
    "hidden_size": st.sampled_from([32, 64, 96]),
    "num_hidden_layers": st.integers(1, 3),
    "num_attention_heads": st.sampled_from([1, 2, 3, 4]),
    "intermediate_size": st.sampled_from([8, 128]),
    "embed_dim": st.sampled_from([8, 16, 24]),
    "depths": st.lists(st.integers(1, 2), min_size=1, max_size=4),
    "num_heads": st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=4),
    "window_size": st.sampled_from([2, 4, 7]),
    "mlp_ratio": st.one_of(st.floats(0.01, 8.0), st.just(4)),
    "hidden_act": st.sampled_from(["gelu", "relu", "silu", "swishy"]),
    "hidden_dropout_prob": st.floats(-0.5, 1.5),
    "attention_probs_dropout_prob": st.floats(0.0, 1.0),
    "drop_path_rate": st.floats(-0.5, 1.5),
    "layer_norm_eps": st.floats(-1e-3, 1e-3),
    "initializer_range": st.floats(-0.1, 0.1),
    "mask_ratio": st.floats(-0.5, 1.5),
    "layer_scale_init_value": st.floats(-1, 1),
    "qkv_bias": st.booleans(),
    "use_absolute_position_embeddings": st.booleans(),
    "use_relative_position_bias": st.booleans(),
    "use_fc_norm": st.booleans(),
    "pooling": st.sampled_from(["mean", "cls", "max"]),
    "encoder_stride": st.sampled_from([None, 4, 8]),
}
BOOL_FIELDS = {"qkv_bias", "use_absolute_position_embeddings", "use_relative_position_bias", "use_fc_norm",
               "patch_norm", "use_key_bias", "use_shared_relative_position_bias"}


INT_FIELDS = {"image_size", "patch_size", "mask_patch_size", "num_channels", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "intermediate_size", "embed_dim", "window_size"}


def wrong_type(field, value) -> bool:
    """A value of the wrong type for `field` (or not finite): the error must name exactly that field."""
    if field in ("encoder_stride", "pooling", "hidden_act"):
        return False  # compared by value; a wrong value may surface under another name
    if field in BOOL_FIELDS:
        return not isinstance(value, bool)
    if field in ("depths", "num_heads"):
        return not (isinstance(value, list) and all(type(v) is int for v in value))
    if value is None:
        return field not in ("hidden_size", "intermediate_size")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    if isinstance(value, float) and not math.isfinite(value):
        return True
    return field in INT_FIELDS and not isinstance(value, int)


@FAST
@given(
    base=st.sampled_from([VIT, SWIN]),
    changes=st.dictionaries(st.sampled_from(sorted(CONFIG_FIELDS)), st.just(None), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: st.one_of(CONFIG_FIELDS[k], JUNK) for k in keys})),
)
def test_config_valid_or_named_value_error(base, changes):
    note(f"changes={changes!r}")
    try:
        config = SimMIMConfig(**{**base, **changes})
    except ValueError as error:
        name = named_argument(error)
        assert name in set(CONFIG_FIELDS) | set(SWIN) | set(VIT) | BOOL_FIELDS, error
        # A wrong type is reported under the field's own name (checked before anything derived from it), unless
        # another changed field is wrong too.
        typed = [field for field, value in changes.items() if wrong_type(field, value)]
        if len(typed) == 1 and len(changes) == 1:
            assert name == typed[0], error
        return
    event("valid config")
    assert not any(wrong_type(field, value) for field, value in changes.items()), config
    # A valid config round-trips and gives a processor with the same mask settings.
    assert SimMIMConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    if config.num_channels == 3:
        processor = SimMIMImageProcessor.from_config(config)
        assert (processor.mask_ratio, processor.mask_patch_size, processor.patch_size) == (
            config.mask_ratio, config.mask_patch_size, config.patch_size)


@FAST
@given(
    image_size=st.one_of(st.sampled_from([16, 32, 48]), JUNK),
    patch_size=st.one_of(st.sampled_from([1, 2, 4, 8, 3]), JUNK),
    mask_patch_size=st.one_of(st.sampled_from([4, 8, 16, 32, 12]), JUNK),
    mask_ratio=st.one_of(st.floats(-0.5, 1.5), JUNK),
)
def test_config_and_processor_accept_the_same_mask_settings(image_size, patch_size, mask_patch_size, mask_ratio):
    """What a config accepts for the fields the processor takes from it, the processor accepts, and vice versa."""
    values = dict(image_size=image_size, patch_size=patch_size, mask_patch_size=mask_patch_size, mask_ratio=mask_ratio)
    base = dict(VIT, use_shared_relative_position_bias=False, hidden_size=8, num_attention_heads=1)
    try:
        SimMIMConfig(**{**base, **values})
        config_error = None
    except ValueError as error:
        config_error = error
    try:
        SimMIMImageProcessor(size={"height": image_size, "width": image_size}, patch_size=patch_size,
                             mask_patch_size=mask_patch_size, mask_ratio=mask_ratio)
        processor_error = None
    except ValueError as error:
        processor_error = error
    assert (config_error is None) == (processor_error is None), (config_error, processor_error)
    if config_error is not None:
        assert named_argument(config_error) in values and named_argument(processor_error) in {*values, "size"}


# ---------------------------------------------------------------------------------------------- model
@functools.lru_cache(maxsize=None)
def tiny_model(kind: str) -> SimMIMForMaskedImageModeling:
    torch.manual_seed(0)
    overrides = {"vit-free": dict(use_shared_relative_position_bias=False)}.get(kind, {})
    preset = "swin-nano-w4-32" if kind == "swin" else "vit-nano-p4-32"
    return SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset, **overrides)).eval()


VALID_SIZES = {  # vit: position biases fixed at 32x32; vit-free: any multiple of 4; swin: see test_validation.py
    "vit": [(32, 32)],
    "vit-free": [(h, w) for h in (4, 8, 20, 32) for w in (4, 12, 32)],
    "swin": [(32, 32), (64, 64)],
}
BAD_SIZES = {
    "vit": [(16, 32), (32, 64), (0, 32), (30, 32)],
    "vit-free": [(0, 8), (6, 8), (2, 4), (8, 0)],
    "swin": [(8, 8), (16, 16), (24, 24), (40, 40), (32, 64), (0, 32), (33, 32), (8, 64)],
}
MODEL_CORRUPTIONS = {
    "batch": (st.just(0), "pixel_values"),
    "channels": (st.sampled_from([1, 4]), "pixel_values"),
    "dtype": (st.sampled_from([torch.uint8, torch.int64, torch.bool]), "pixel_values"),
    "size": (st.just("bad"), "pixel_values"),
    "container": (st.sampled_from(["numpy", "list"]), "pixel_values"),
    "mask": (st.sampled_from(["float", "short", "two", "numpy", "batch"]), "bool_masked_pos"),
}


@st.composite
def model_cases(draw):
    kind = draw(st.sampled_from(sorted(VALID_SIZES)))
    valid = dict(kind=kind, batch=draw(st.integers(1, 2)), channels=3, size=draw(st.sampled_from(VALID_SIZES[kind])),
                 dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
                 container="tensor", mask=draw(st.sampled_from([None, "bool", "long"])))
    args, corrupted = draw(corrupt(valid, {k: v[0] for k, v in MODEL_CORRUPTIONS.items()}))
    if corrupted == "size":
        args["size"] = draw(st.sampled_from(BAD_SIZES[kind]))
    return args, corrupted


@settings(max_examples=40, deadline=None, derandomize=True, database=None, report_multiple_bugs=False)
@given(case=model_cases())
def test_model_runs_or_named_value_error(case):
    args, corrupted = case
    note(f"args={args!r} corrupted={corrupted!r}")
    model = tiny_model(args["kind"])
    (height, width), batch, p = args["size"], args["batch"], model.config.patch_size
    pixel_values = torch.randn(batch, args["channels"], height, width).to(args["dtype"])
    if args["container"] != "tensor":
        pixel_values = pixel_values.float().numpy() if args["container"] == "numpy" else pixel_values.tolist()
    patches = (height // p) * (width // p)
    bool_masked_pos = {
        None: None,
        "bool": torch.rand(batch, patches) < 0.5,
        "long": (torch.rand(batch, patches) < 0.5).long(),
        "float": torch.rand(batch, patches),
        "short": torch.zeros(batch, max(patches - 1, 0), dtype=torch.bool),
        "two": torch.full((batch, patches), 2),
        "numpy": np.zeros((batch, patches), dtype=bool),
        "batch": torch.zeros(batch + 1, patches, dtype=torch.bool),
    }[args["mask"]]
    try:
        with torch.no_grad():
            out = model(pixel_values, bool_masked_pos=bool_masked_pos)
    except ValueError as error:
        assert corrupted is not None, f"valid input rejected: {error}"
        assert named_argument(error) == MODEL_CORRUPTIONS[corrupted][1], error
        return
    assert corrupted is None, f"accepted {corrupted}={args[corrupted]!r}"
    event("ran")
    assert out.reconstruction.shape == (batch, 3, height, width)
    assert (out.loss is None) == (bool_masked_pos is None)
    if out.loss is not None:
        assert out.loss.dim() == 0 and torch.isfinite(out.loss)
