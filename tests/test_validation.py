"""Regression tests for input validation (issue 10): config fields (at construction and when loaded from a
hand-edited config.json), image processor arguments and inputs, and the model's input checks. Every bad value is
a ValueError that names the argument; the good ones keep working."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor

from simmim_hf import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling
from simmim_hf.image_processing_simmim import SimMIMImageProcessor

VIT = dict(encoder_type="vit", image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
           num_attention_heads=2, mask_patch_size=8)
SWIN = dict(encoder_type="swin", image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 4, 8],
            window_size=4, mask_patch_size=8)
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------- A. config
# (base, field, bad value, regex; None = "`field` ... field=<value>")
BAD_CONFIG_FIELDS = [
    (SWIN, "embed_dim", "16", None),
    (VIT, "hidden_size", "64", None),
    (VIT, "mask_ratio", "0.5", r"`mask_ratio` must lie strictly between 0 and 1; got mask_ratio='0.5'"),
    (VIT, "num_hidden_layers", 2.5, None),
    (VIT, "num_hidden_layers", 2.0, r"`num_hidden_layers` must be a positive integer; got num_hidden_layers=2.0"),
    (VIT, "num_attention_heads", True, None),
    (VIT, "image_size", True, None),
    (SWIN, "window_size", 4.0, None),
    (SWIN, "depths", [2, 2.0, 2], None),
    (SWIN, "depths", None, None),
    (SWIN, "num_heads", ["2", 4, 8], None),
    (VIT, "hidden_act", "swishy", r"`hidden_act` must be one of transformers' activations \[.*'gelu'.*='swishy'"),
    (VIT, "hidden_act", None, None),
    (VIT, "intermediate_size", -1, None),
    (VIT, "intermediate_size", 0, None),
    (VIT, "intermediate_size", "256", None),
    (SWIN, "intermediate_size", 0, None),
    (VIT, "mlp_ratio", 0, None),
    (VIT, "mlp_ratio", -4.0, None),
    (SWIN, "mlp_ratio", "4", r"`mlp_ratio` must be a positive number; got mlp_ratio='4'"),  # once tried petabytes
    (SWIN, "mlp_ratio", 0.01, r"`mlp_ratio` must give an MLP width .*mlp_ratio=0.01"),
    (VIT, "hidden_dropout_prob", 1.0, r"`hidden_dropout_prob` must lie in \[0, 1\)"),
    (VIT, "hidden_dropout_prob", -0.1, None),
    (VIT, "attention_probs_dropout_prob", 1.5, None),
    (VIT, "attention_probs_dropout_prob", "0.1", None),
    (VIT, "drop_path_rate", 1.0, None),
    (VIT, "drop_path_rate", NAN, None),
    (VIT, "layer_norm_eps", 0.0, r"`layer_norm_eps` must be a positive number; got layer_norm_eps=0.0"),
    (VIT, "layer_norm_eps", -1e-6, None),
    (VIT, "layer_norm_eps", NAN, None),
    (VIT, "layer_norm_eps", INF, None),
    (VIT, "initializer_range", 0.0, None),
    (VIT, "initializer_range", -0.02, None),
    (VIT, "mask_ratio", 0.0, None),
    (VIT, "mask_ratio", 1.0, None),
    (VIT, "mask_ratio", NAN, None),
    (VIT, "mask_ratio", True, None),
    (VIT, "layer_scale_init_value", -0.1, None),
    (VIT, "qkv_bias", "false", r"`qkv_bias` must be true or false; got qkv_bias='false'"),
    (SWIN, "patch_norm", 1, None),
    (VIT, "use_fc_norm", None, None),
]


def _config_error(field, value, regex):
    return regex or rf"`{field}`.*; got {field}={re.escape(repr(value))}\."


def _bad_config_id(case):
    base, field, value, _ = case
    return f"{base['encoder_type']}-{field}={value!r}"


@pytest.mark.parametrize("case", BAD_CONFIG_FIELDS, ids=_bad_config_id)
def test_bad_config_field_raises_at_construction(case):
    base, field, value, regex = case
    with pytest.raises(ValueError, match=_config_error(field, value, regex)):
        SimMIMConfig(**{**base, field: value})


@pytest.mark.parametrize("case", BAD_CONFIG_FIELDS, ids=_bad_config_id)
def test_bad_config_field_raises_when_loaded(case, tmp_path):
    """A hand-edited config.json, a dict, and a keyword override at load time all go through the same checks."""
    base, field, value, regex = case
    match = rf"`{field}`" if regex is None else regex
    SimMIMConfig(**base).save_pretrained(tmp_path / "good")
    saved = json.loads((tmp_path / "good" / "config.json").read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**saved, field: value}))
    loaders = {
        "from_pretrained": lambda: SimMIMConfig.from_pretrained(tmp_path / "bad"),
        "AutoConfig": lambda: AutoConfig.from_pretrained(tmp_path / "bad"),
        "from_dict": lambda: SimMIMConfig.from_dict({**saved, field: value}),
        "override": lambda: SimMIMConfig.from_pretrained(tmp_path / "good", **{field: value}),
        "AutoConfig override": lambda: AutoConfig.from_pretrained(tmp_path / "good", **{field: value}),
    }
    for name, load in loaders.items():
        with pytest.raises(ValueError, match=match):
            load()
            pytest.fail(f"{name} accepted {field}={value!r}")


def test_vit_mlp_width_from_a_tiny_mlp_ratio():
    with pytest.raises(ValueError, match=r"`intermediate_size` must be positive .*int\(64 \* 0.001\)"):
        SimMIMConfig(**{**VIT, "mlp_ratio": 0.001})
    with pytest.raises(ValueError, match=r"`mlp_ratio` gives an infinite MLP width"):
        SimMIMConfig(**{**VIT, "mlp_ratio": 1e308, "hidden_size": 2**1030, "num_attention_heads": 1})
    assert SimMIMConfig(**{**VIT, "mlp_ratio": 0.001, "intermediate_size": 8}).intermediate_size == 8


@pytest.mark.parametrize("preset", SimMIMConfig.available_presets())
def test_valid_configs_round_trip(preset, tmp_path):
    config = SimMIMConfig.from_preset(preset)
    config.save_pretrained(tmp_path)
    for loaded in (SimMIMConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path),
                   SimMIMConfig.from_dict(config.to_dict())):
        assert type(loaded) is SimMIMConfig
        ignored = ("transformers_version", "_name_or_path")
        assert {k: v for k, v in loaded.to_dict().items() if k not in ignored} == \
            {k: v for k, v in config.to_dict().items() if k not in ignored}


def test_valid_overrides_at_load_time(tmp_path):
    SimMIMConfig.from_preset("swin-nano-w4-32").save_pretrained(tmp_path)
    config, unused = SimMIMConfig.from_pretrained(tmp_path, image_size=64, drop_path_rate=0.1, unknown_key=1,
                                                  return_unused_kwargs=True)
    assert (config.image_size, config.drop_path_rate, unused) == (64, 0.1, {"unknown_key": 1})
    assert AutoConfig.from_pretrained(tmp_path, mlp_ratio=2).mlp_ratio == 2
    # A valid config built from JSON numbers: ints where floats are meant are fine.
    assert SimMIMConfig(**{**VIT, "drop_path_rate": 0, "layer_norm_eps": 1, "mlp_ratio": 2}).intermediate_size == 128
    with pytest.raises(ValueError, match=r"`image_size` must be divisible by .*got image_size=36"):
        SimMIMConfig.from_pretrained(tmp_path, image_size=36)


@pytest.mark.parametrize("value", ["0.5", True, 0, 1, NAN, INF, 1.5, -0.1, None])
def test_processor_and_config_reject_the_same_mask_ratio(value):
    match = r"`mask_ratio`.*mask_ratio="
    with pytest.raises(ValueError, match=match):
        SimMIMConfig(**{**VIT, "mask_ratio": value})
    if value is not None:  # None means "the processor's default" for a processor argument
        with pytest.raises(ValueError, match=match):
            SimMIMImageProcessor(size=32, patch_size=4, mask_patch_size=8, mask_ratio=value)
    processor = SimMIMImageProcessor(size=32, patch_size=4, mask_patch_size=8)
    if value is not None:
        with pytest.raises(ValueError, match=match):
            processor(np.zeros((8, 8, 3), np.uint8), mask_ratio=value)


@pytest.mark.parametrize("value", [0.5, 0.25, 0.999])
def test_processor_and_config_accept_the_same_mask_ratio(value):
    processor = SimMIMImageProcessor.from_config(SimMIMConfig(**{**VIT, "mask_ratio": value}))
    out = processor(np.zeros((8, 8, 3), np.uint8), return_tensors="pt", seed=0)
    assert out["bool_masked_pos"].sum() == math.ceil(16 * value) * 4


# ---------------------------------------------------------------------------------------------- B. processor
def tiny_processor(**kwargs):
    return SimMIMImageProcessor(**{"size": 16, "patch_size": 4, "mask_patch_size": 8, **kwargs})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_float_tensors(dtype):
    image = torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(0)).to(dtype)
    for do_train in (False, True):
        processor = tiny_processor(do_train=do_train)
        out = processor(image, return_tensors="pt", seed=3)
        ref = processor(image.float(), return_tensors="pt", seed=3)
        assert out["pixel_values"].dtype == torch.float32
        torch.testing.assert_close(out["pixel_values"], ref["pixel_values"], rtol=0, atol=0)
    # Non-numpy dtypes that are not floats still fail with a named error.
    with pytest.raises(ValueError, match=r"`images`.*dtype"):
        tiny_processor()(torch.zeros(3, 8, 8, dtype=torch.complex64))


BAD_NORMALISATION = [
    (dict(image_mean=[0.5, 0.5]), r"`image_mean` must be 3 finite numbers.*image_mean=\(0.5, 0.5\)"),
    (dict(image_mean=[0.1, 0.2, 0.3, 0.4]), r"`image_mean`.*image_mean=\(0.1, 0.2, 0.3, 0.4\)"),
    (dict(image_mean=[0.1, NAN, 0.3]), r"`image_mean`"),
    (dict(image_std=[0.5, 0.0, 0.5]), r"`image_std` must be 3 positive numbers.*image_std=\(0.5, 0.0, 0.5\)"),
    (dict(image_std=[0.5, -0.2, 0.5]), r"`image_std` must be 3 positive numbers"),
    (dict(image_std=[0.5, 0, 0.5]), r"`image_std` must be 3 positive numbers"),
    (dict(image_std=[0.5, 0.5]), r"`image_std`"),
    (dict(image_std=0.0), r"`image_std`"),
]


@pytest.mark.parametrize("kwargs, match", BAD_NORMALISATION)
def test_bad_mean_std_raise_everywhere(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        tiny_processor(**kwargs)
    with pytest.raises(ValueError, match=match):
        tiny_processor()(np.zeros((8, 8, 3), np.uint8), **kwargs)
    # From a hand-edited preprocessor_config.json.
    tiny_processor().save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **kwargs}))
    for load in (SimMIMImageProcessor.from_pretrained, AutoImageProcessor.from_pretrained):
        with pytest.raises(ValueError, match=match):
            load(tmp_path)
    # Unused when do_normalize=False, so not an error there.
    tiny_processor(do_normalize=False, **kwargs)


def test_scalar_mean_std_stand_for_all_channels():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    scalar = tiny_processor(do_train=False, image_mean=0.5, image_std=0.25)
    assert scalar.image_mean == (0.5, 0.5, 0.5) and scalar.image_std == (0.25, 0.25, 0.25)
    listed = tiny_processor(do_train=False, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    torch.testing.assert_close(scalar(image, return_tensors="pt")["pixel_values"],
                               listed(image, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("crop_pct", [1e-9, 0.05, 0.0, -0.5, 1.5, NAN, INF, True, "0.9"])
def test_bad_crop_pct(crop_pct, tmp_path):
    match = r"`crop_pct` must lie in \[0.1, 1\]"
    with pytest.raises(ValueError, match=match):
        tiny_processor(crop_pct=crop_pct)
    with pytest.raises(ValueError, match=match):
        tiny_processor()(np.zeros((8, 8, 3), np.uint8), do_train=False, crop_pct=crop_pct)
    tiny_processor().save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "crop_pct": crop_pct}))
    with pytest.raises(ValueError, match=match):
        SimMIMImageProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("crop_pct", [0.1, 0.5, 1.0, 1])
def test_crop_pct_bounds_are_valid(crop_pct):
    out = tiny_processor(do_train=False, crop_pct=crop_pct)(np.zeros((9, 7, 3), np.uint8), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("seed", [2**70, 2**64, -1, -(2**70), 1.5, 2.0, "3", True, [0, 2**64], [-1, 0], [0, None]])
def test_bad_seeds(seed):
    images = [np.zeros((8, 8, 3), np.uint8)] * (len(seed) if isinstance(seed, list) else 1)
    with pytest.raises(ValueError, match=r"`seed` must be an integer in \[0, 2\*\*64 - 1\].*got seed="):
        tiny_processor()(images, seed=seed)


def test_valid_seed_range():
    processor = tiny_processor()
    image = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    for seed in (0, 2**63, 2**64 - 1, np.int64(7), np.uint64(2**64 - 1)):
        a, b = processor(image, return_tensors="pt", seed=seed), processor(image, return_tensors="pt", seed=seed)
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["bool_masked_pos"],
                                                                                 b["bool_masked_pos"])
    out = processor([image, image], return_tensors="pt", seed=[2**64 - 1, np.int64(3)])
    assert out["bool_masked_pos"].shape == (2, 16)


def _eval(image, **kwargs):
    return tiny_processor(do_train=False)(image, return_tensors="pt", **kwargs)["pixel_values"]


def test_small_arrays_channel_layout():
    """The channel axis is the first or last axis of size 1, 3 or 4; 3 beats 1 beats 4; equal sizes follow the
    container (numpy: channels-last, torch: channels-first)."""
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # a 4x4 RGB image, channels last
    ref = _eval(PIL.Image.fromarray(hwc))
    torch.testing.assert_close(_eval(hwc), ref)
    torch.testing.assert_close(_eval(torch.from_numpy(hwc)), ref)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))  # (3, 4, 4): the same image, channels first
    torch.testing.assert_close(_eval(chw), ref)
    torch.testing.assert_close(_eval(torch.from_numpy(chw)), ref)
    # Explicit layout wins: (4, 4, 3) read as 4 channels of 4x3.
    as_rgba = PIL.Image.fromarray(np.ascontiguousarray(hwc.transpose(1, 2, 0)))
    torch.testing.assert_close(_eval(hwc, input_data_format="channels_first"), _eval(as_rgba))
    # Ties.
    tie = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    torch.testing.assert_close(_eval(tie), _eval(PIL.Image.fromarray(tie)))  # numpy: 3x5 RGB
    torch.testing.assert_close(_eval(torch.from_numpy(tie)),
                               _eval(PIL.Image.fromarray(np.ascontiguousarray(tie.transpose(1, 2, 0)))))  # torch: 5x3
    # 3 beats 1: (3, 5, 1) is a 5x1 RGB image, (1, 5, 3) a 1x5 one.
    strip = rng.integers(0, 256, (1, 5, 3), dtype=np.uint8)
    torch.testing.assert_close(_eval(strip), _eval(PIL.Image.fromarray(strip)))
    # 1 beats 4: (4, 6, 1) is a grey 4x6 image, not a 6x1 RGBA one.
    grey = rng.integers(0, 256, (4, 6, 1), dtype=np.uint8)
    torch.testing.assert_close(_eval(grey), _eval(PIL.Image.fromarray(grey[..., 0]).convert("RGB")))


# ---------------------------------------------------------------------------------------------- C. model
PRESETS = {"vit": "vit-nano-p4-32", "swin": "swin-nano-w4-32"}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {kind: SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset)).eval()
            for kind, preset in PRESETS.items()}


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_empty_batch(models, kind):
    model = models[kind]
    match = r"`pixel_values` must hold at least one image; got batch size 0"
    for call in (lambda x: model(x), lambda x: model.simmim(x),
                 lambda x: model(x, bool_masked_pos=torch.zeros(0, 64 if kind == "vit" else 256, dtype=torch.bool))):
        with pytest.raises(ValueError, match=match):
            call(torch.zeros(0, 3, 32, 32))
    classifier = SimMIMForImageClassification(SimMIMConfig.from_preset(PRESETS[kind], num_labels=2)).eval()
    with pytest.raises(ValueError, match=match):
        classifier(torch.zeros(0, 3, 32, 32))


@pytest.mark.parametrize("kind", ["vit", "swin"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_non_float_pixel_values(models, kind, dtype):
    match = rf"`pixel_values` must be floating point: .*normalised float pixel values.*{dtype}"
    with pytest.raises(ValueError, match=match):
        models[kind](torch.zeros(2, 3, 32, 32, dtype=dtype))


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_other_bad_inputs(models, kind):
    model = models[kind]
    with pytest.raises(ValueError, match=r"`pixel_values` must be a torch.Tensor; got ndarray"):
        model(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"`pixel_values` height and width must be at least patch_size=\d; got 0x32"):
        model(torch.zeros(1, 3, 0, 32))
    grid = 64 if kind == "vit" else 256
    with pytest.raises(ValueError, match=r"`bool_masked_pos` must be a torch.Tensor; got ndarray"):
        model(torch.zeros(1, 3, 32, 32), bool_masked_pos=np.zeros((1, grid), bool))
    # Half-precision input is fine (cast to the weights' dtype).
    assert model(torch.zeros(1, 3, 32, 32, dtype=torch.float16)).reconstruction.dtype == torch.float32


SWIN_SIZES = [(8, 8), (16, 16), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64), (96, 96), (16, 32), (32, 16),
              (8, 64), (32, 64), (64, 32), (64, 16), (64, 128)]


@pytest.mark.parametrize("hw", SWIN_SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_swin_small_inputs_run_or_raise_value_error(models, hw):
    """swin-nano-w4-32 (patch 2, window 4, 3 stages): every stage's blocks use 4x4 windows, so each stage grid
    must be a multiple of 4 (inputs: multiples of 32 px). Smaller inputs used to pass the check and then fail in
    a reshape."""
    model = models["swin"]
    pixel_values = torch.randn(1, 3, *hw)
    try:
        with torch.no_grad():
            out = model(pixel_values)
    except ValueError as error:
        assert "pixel_values" in str(error) and f"{hw[0]}x{hw[1]}" in str(error)
        assert hw not in ((32, 32), (64, 64), (96, 96), (64, 128)), f"{hw} should run"
        if hw in ((8, 8), (16, 16)):
            assert "blocks attend in 4x4 windows" in str(error) and "multiples of 32 pixels" in str(error)
        return
    assert out.reconstruction.shape == (1, 3, *hw)
    assert hw[0] % 32 == 0 and hw[1] % 32 == 0
