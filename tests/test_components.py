"""The paper's component study as config options: prediction head, loss, prediction resolution, loss area, local
target normalisation, and the AvgDist masking diagnostic.

Every loss is checked against a computation written here from the definitions (reshapes, loops and explicit
formulas, not the library's helpers); the heads by shape and parameter count; the options by their validation
errors, a save/load round trip and loading through `trust_remote_code` alone; AvgDist against a brute-force
distance computation and the paper's ~15 px figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_without_simmim_hf
from safetensors.torch import load_file, save_file

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling, masked_l1_loss
from simmim_hf.masking import SimMIMMaskGenerator, average_masked_distance, expected_average_masked_distance
from simmim_hf.modeling_simmim import (
    color_classes,
    expected_color,
    normalize_targets,
    pixel_mask,
    reconstruction_loss,
    target_mask,
)

VIT, SWIN = "vit-nano-p4-32", "swin-nano-w4-32"  # ViT: patch 4, stride 4; Swin: patch 2, stride 8; 32 px
FIXTURES = Path(__file__).parent / "fixtures"
NEW_FIELDS = ("head_type", "head_hidden_size", "loss_type", "smooth_l1_beta", "num_color_bins",
              "prediction_resolution", "loss_area", "norm_target_patch_size", "image_mean", "image_std")


def make_model(preset: str = VIT, **options) -> SimMIMForMaskedImageModeling:
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset, **options))
    with torch.no_grad():  # perturb everything so no path is trivially zero
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def make_batch(config: SimMIMConfig, batch: int = 2, seed: int = 0):
    """8-bit images (B, C, H, W) uint8, their normalised pixel values, and a SimMIM mask."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (batch, 3, config.image_size, config.image_size), generator=generator)
    mean, std = torch.tensor(config.image_mean).view(1, 3, 1, 1), torch.tensor(config.image_std).view(1, 3, 1, 1)
    pixel_values = (raw / 255.0 - mean) / std
    mask = SimMIMMaskGenerator(config.image_size, config.patch_size, config.mask_patch_size, config.mask_ratio)(
        batch, generator=generator)
    return raw, pixel_values, mask


def head_output(model, pixel_values, mask):
    """The head's raw output (before `reconstruction`), which the loss compares with the target."""
    features = model.simmim(pixel_values, bool_masked_pos=mask).feature_map
    return model.decoder(features)


# ---------------------------------------------------------------------------------------------- references
def ref_counted(config, mask, height, width):
    """(B, H/f, W/f) bool: the target pixels the loss counts, from the definition."""
    b, p = mask.shape[0], config.patch_size
    f = 1 if config.prediction_resolution is None else config.image_size // config.prediction_resolution
    pixels = mask.reshape(b, height // p, width // p).repeat_interleave(p, 1).repeat_interleave(p, 2)
    if config.loss_area == "all":
        return torch.ones(b, height // f, width // f, dtype=torch.bool)
    # A low-resolution pixel is masked when every pixel of the square it averages is masked.
    return pixels.reshape(b, height // f, f, width // f, f).all(dim=4).all(dim=2)


def ref_area_mean(x, f):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // f, f, w // f, f).mean(dim=(3, 5))


def ref_local_norm(x: np.ndarray, k: int) -> np.ndarray:
    """Loop version of the official SwinV2 `norm_targets`: per pixel and channel, the k x k window clipped to the
    image, unbiased variance (clamped at 0), (x - mean) / sqrt(var + 1e-6)."""
    out = np.empty_like(x, dtype=np.float64)
    b, c, h, w = x.shape
    r = k // 2
    for i in range(b):
        for ch in range(c):
            for y in range(h):
                for z in range(w):
                    window = x[i, ch, max(0, y - r):y + r + 1, max(0, z - r):z + r + 1].astype(np.float64)
                    var = max(window.var(ddof=1), 0.0)
                    out[i, ch, y, z] = (x[i, ch, y, z] - window.mean()) / math.sqrt(var + 1e-6)
    return out


def ref_loss(config, prediction, pixel_values, raw, mask):
    """The SimMIM loss from the definitions: sum(error * m) / (sum(m) + 1e-5) / C over the counted pixels."""
    b, c, h, w = pixel_values.shape
    f = 1 if config.prediction_resolution is None else config.image_size // config.prediction_resolution
    counted = ref_counted(config, mask, h, w).unsqueeze(1).float()
    if config.loss_type == "color_ce":
        width = 256 // config.num_color_bins
        bins = torch.floor(ref_area_mean(raw.double(), f).round() / width).long()  # (B, C, h, w)
        log_probs = prediction.double().reshape(b, c, config.num_color_bins, h // f, w // f).log_softmax(dim=2)
        error = -log_probs.gather(2, bins.unsqueeze(2)).squeeze(2)
    else:
        target = ref_area_mean(pixel_values.double(), f)
        if config.norm_target_patch_size is not None:
            target = torch.from_numpy(ref_local_norm(target.numpy(), config.norm_target_patch_size))
        d = prediction.double() - target
        beta = config.smooth_l1_beta
        error = {"l1": d.abs(), "l2": d**2,
                 "smooth_l1": torch.where(d.abs() < beta, 0.5 * d**2 / beta, d.abs() - 0.5 * beta)}[config.loss_type]
    return float((error * counted).sum() / (counted.sum() + 1e-5) / c)


def round_trip_safe(raw, f):
    """Nudge 8-bit images so no f x f mean ends in exactly .5 (where rounding float noise could pick either bin)."""
    raw = raw.clone()
    b, c, h, w = raw.shape
    sums = raw.reshape(b, c, h // f, f, w // f, f).sum(dim=(3, 5))
    tie = (sums % (f * f)) * 2 == f * f
    corner = raw[:, :, ::f, ::f]
    corner += torch.where(tie, torch.where(corner < 255, 1, -1), 0)
    return raw


# ---------------------------------------------------------------------------------------------- defaults, config
def test_defaults_are_the_paper_and_old_config_files_load(tmp_path):
    config = SimMIMConfig.from_preset(VIT)
    assert (config.head_type, config.loss_type, config.loss_area) == ("linear", "l1", "masked")
    assert config.prediction_resolution is None and config.norm_target_patch_size is None
    assert config.head_hidden_size is None and config.smooth_l1_beta == 1.0 and config.num_color_bins == 256
    assert config.image_mean == [0.485, 0.456, 0.406] and config.image_std == [0.229, 0.224, 0.225]
    # A config.json written before these fields existed loads with the paper's settings.
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k not in NEW_FIELDS}))
    old = SimMIMConfig.from_pretrained(tmp_path)
    assert {f: getattr(old, f) for f in NEW_FIELDS} == {f: getattr(config, f) for f in NEW_FIELDS}
    # The default model computes the paper's loss: L1 over the masked pixels.
    model = make_model(VIT)
    raw, pixel_values, mask = make_batch(model.config)
    out = model(pixel_values, bool_masked_pos=mask)
    b, c, h, w = pixel_values.shape
    m = mask.reshape(b, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    expected = ((out.reconstruction - pixel_values).abs() * m).sum() / (m.sum() + 1e-5) / c
    assert torch.allclose(out.loss, expected, rtol=1e-6)
    assert [k for k in model.state_dict() if k.startswith("decoder.")] == ["decoder.0.weight", "decoder.0.bias"]


def test_non_rgb_configs_keep_working():
    config = SimMIMConfig(num_channels=1)
    assert config.image_mean == [0.5] and config.image_std == [0.5]


BAD = [
    (VIT, dict(head_type="conv"), "head_type", r"must be one of \('linear', 'mlp'\)"),
    (VIT, dict(head_hidden_size=0), "head_hidden_size", "positive integer"),
    (VIT, dict(head_hidden_size="64"), "head_hidden_size", "positive integer"),
    (VIT, dict(loss_type="l3"), "loss_type", r"must be one of \('l1', 'smooth_l1', 'l2', 'color_ce'\)"),
    (VIT, dict(smooth_l1_beta=0.0), "smooth_l1_beta", "positive number"),
    (VIT, dict(smooth_l1_beta="1"), "smooth_l1_beta", "positive number"),
    (VIT, dict(num_color_bins=7), "num_color_bins", "must divide 256"),
    (VIT, dict(num_color_bins=1), "num_color_bins", "must divide 256 and be at least 2"),
    (VIT, dict(num_color_bins=512), "num_color_bins", "must divide 256"),
    (VIT, dict(num_color_bins=8.0), "num_color_bins", "positive integer"),
    (VIT, dict(num_color_bins=True), "num_color_bins", "positive integer"),
    (VIT, dict(prediction_resolution=5), "prediction_resolution", "divisor of image_size=32"),
    (VIT, dict(prediction_resolution=0), "prediction_resolution", "divisor of image_size=32"),
    (VIT, dict(prediction_resolution=64), "prediction_resolution", "divisor of image_size=32"),
    # ViT stride 4: an 8-pixel average (r = 4) is coarser than one head output block.
    (VIT, dict(prediction_resolution=4), "prediction_resolution", r"multiple of image_size / encoder_stride = 8"),
    (SWIN, dict(prediction_resolution=2), "prediction_resolution", r"multiple of image_size / encoder_stride = 4"),
    (VIT, dict(prediction_resolution="16"), "prediction_resolution", "positive integer"),
    (VIT, dict(loss_area="visible"), "loss_area", r"must be one of \('masked', 'all'\)"),
    (VIT, dict(norm_target_patch_size=4), "norm_target_patch_size", "odd window size >= 3"),
    (VIT, dict(norm_target_patch_size=1), "norm_target_patch_size", "odd window size >= 3"),
    (VIT, dict(norm_target_patch_size=-3), "norm_target_patch_size", "odd window size >= 3"),
    (VIT, dict(norm_target_patch_size=7.0), "norm_target_patch_size", "positive integer"),
    (VIT, dict(norm_target_patch_size=7, loss_type="color_ce"), "norm_target_patch_size", "color_ce"),
    (VIT, dict(image_mean=[0.5, 0.5]), "image_mean", "list of 3 numbers"),
    (VIT, dict(image_std=[0.2, 0.0, 0.2]), "image_std", "each > 0"),
    (VIT, dict(image_std="0.5"), "image_std", "list of 3 numbers"),
]


@pytest.mark.parametrize("preset, options, field, expected", BAD, ids=[f"{c[2]}={list(c[1].values())[0]!r}"
                                                                       for c in BAD])
def test_bad_options_name_the_field_the_rule_and_the_value(preset, options, field, expected, tmp_path):
    given = repr(options[field]).replace("[", r"\[").replace("(", r"\(").replace(".", r"\.")
    pattern = rf"`{field}` .*{expected}.*; got {field}={given}"
    with pytest.raises(ValueError, match=pattern):
        SimMIMConfig.from_preset(preset, **options)
    # The same checks guard a hand-edited config.json.
    SimMIMConfig.from_preset(preset).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, **options}))
    with pytest.raises(ValueError, match=rf"`{field}`"):
        SimMIMConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("preset, options", [
    (VIT, dict(prediction_resolution=8)), (VIT, dict(prediction_resolution=32)),
    (SWIN, dict(prediction_resolution=4)), (SWIN, dict(prediction_resolution=16)),
    (VIT, dict(num_color_bins=8, loss_type="color_ce")), (VIT, dict(num_color_bins=2)),
    (VIT, dict(norm_target_patch_size=3)), (VIT, dict(norm_target_patch_size=47)),  # wider than the image
    (VIT, dict(head_type="mlp", head_hidden_size=16)),
])
def test_valid_options(preset, options):
    config = SimMIMConfig.from_preset(preset, **options)
    assert all(getattr(config, k) == v for k, v in options.items())


def test_options_round_trip_through_save_pretrained_and_overrides(tmp_path):
    options = dict(head_type="mlp", head_hidden_size=24, loss_type="color_ce", num_color_bins=8,
                   prediction_resolution=16, loss_area="all", image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0])
    config = SimMIMConfig.from_preset(VIT, **options)
    config.save_pretrained(tmp_path)
    loaded = SimMIMConfig.from_pretrained(tmp_path)
    assert {k: getattr(loaded, k) for k in NEW_FIELDS} == {k: getattr(config, k) for k in NEW_FIELDS}
    text = "head_type=mlp,loss_type=smooth_l1,smooth_l1_beta=0.5,prediction_resolution=8,norm_target_patch_size=5"
    overridden = SimMIMConfig.from_preset(VIT).with_overrides(text)
    assert (overridden.head_type, overridden.loss_type, overridden.smooth_l1_beta, overridden.prediction_resolution,
            overridden.norm_target_patch_size) == ("mlp", "smooth_l1", 0.5, 8, 5)
    assert overridden.with_overrides("prediction_resolution=null").prediction_resolution is None
    with pytest.raises(ValueError, match="`loss_area`"):
        SimMIMConfig.from_preset(VIT).with_overrides("loss_area=everything")
    with pytest.raises(ValueError, match="`norm_target_patch_size`"):  # a load-time override is checked too
        SimMIMConfig.from_pretrained(tmp_path, norm_target_patch_size=6)
    # ... and recomputes the fields derived from the overridden ones, so the model built from it fits together.
    assert SimMIMConfig.from_pretrained(tmp_path, patch_size=8).encoder_stride == 8
    SimMIMConfig.from_preset("swin-nano-w4-32").save_pretrained(tmp_path / "swin")
    wider = SimMIMConfig.from_pretrained(tmp_path / "swin", embed_dim=32)
    assert wider.hidden_size == 32 * 2 ** (len(wider.depths) - 1)
    assert SimMIMForMaskedImageModeling(wider)(torch.randn(1, 3, 32, 32)).reconstruction.shape == (1, 3, 32, 32)



def test_a_new_image_size_keeps_the_prediction_resolution_factor(tmp_path):
    """The paper's sweep pretrains Swin-B at 192 px and fine-tunes at 224: r follows the size (factor 4 stays 4),
    and a checkpoint reloaded at another size keeps its head's shape."""
    config = SimMIMConfig.from_preset("swin-base-w6-192", prediction_resolution=48)
    assert config.with_overrides(dict(image_size=224, window_size=7)).prediction_resolution == 56
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin-nano-w4-32", prediction_resolution=16))
    model.save_pretrained(tmp_path)
    reloaded = SimMIMForMaskedImageModeling.from_pretrained(tmp_path, image_size=64)
    assert reloaded.config.prediction_resolution == 32
    assert torch.equal(reloaded.state_dict()["decoder.0.weight"], model.state_dict()["decoder.0.weight"])
    with pytest.raises(ValueError, match="averaging factor 2 must divide the new image_size"):
        SimMIMConfig.from_preset("swin-nano-w4-32", prediction_resolution=16).with_overrides(dict(image_size=33))


# ---------------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("options, out_channels, upscale", [
    ({}, 4 * 4 * 3, 4),
    (dict(prediction_resolution=16), 2 * 2 * 3, 2),
    (dict(prediction_resolution=8), 3, 1),
    (dict(loss_type="color_ce"), 4 * 4 * 3 * 256, 4),
    (dict(loss_type="color_ce", num_color_bins=8, prediction_resolution=16), 2 * 2 * 3 * 8, 2),
])
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_head_shapes_and_parameter_counts(options, out_channels, upscale, head):
    model = make_model(VIT, head_type=head, **options)
    width = model.config.hidden_size  # 64
    if head == "linear":
        expected = width * out_channels + out_channels
        assert [type(m).__name__ for m in model.decoder] == ["Conv2d", "PixelShuffle"]
    else:
        expected = (width * width + width) + (width * out_channels + out_channels)  # hidden = encoder width
        assert [type(m).__name__ for m in model.decoder] == ["Conv2d", "GELU", "Conv2d", "PixelShuffle"]
    assert sum(p.numel() for p in model.decoder.parameters()) == expected
    assert model.decoder[-1].upscale_factor == upscale
    _, pixel_values, mask = make_batch(model.config)
    r = 32 // model.config.prediction_downsample
    assert head_output(model, pixel_values, mask).shape == (2, out_channels // upscale**2, r, r)
    assert model(pixel_values, bool_masked_pos=mask).reconstruction.shape == pixel_values.shape


def test_mlp_head_hidden_size_and_swin_width():
    model = make_model(VIT, head_type="mlp", head_hidden_size=10)
    assert model.decoder[0].out_channels == 10 and model.decoder[2].in_channels == 10
    swin = make_model(SWIN, head_type="mlp")
    assert swin.decoder[0].in_channels == swin.decoder[0].out_channels == 64  # Swin's derived last-stage width


# ---------------------------------------------------------------------------------------------- losses
LOSS_CASES = {
    "l1": (VIT, {}),
    "smooth_l1": (VIT, dict(loss_type="smooth_l1", smooth_l1_beta=0.05)),  # both branches of the Huber-like loss
    "l2": (VIT, dict(loss_type="l2")),
    "color_ce": (VIT, dict(loss_type="color_ce")),
    "color_ce-8bins-res16": (VIT, dict(loss_type="color_ce", num_color_bins=8, prediction_resolution=16)),
    "res8": (VIT, dict(prediction_resolution=8)),
    "res16-all": (VIT, dict(prediction_resolution=16, loss_area="all")),
    "all": (VIT, dict(loss_area="all")),
    "mlp-l2": (VIT, dict(head_type="mlp", loss_type="l2")),
    "swin-res8": (SWIN, dict(prediction_resolution=8)),  # 4-pixel squares over 2-pixel patches
    "swin-res4-smooth": (SWIN, dict(prediction_resolution=4, loss_type="smooth_l1")),
}


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_loss_matches_an_independent_computation(case):
    preset, options = LOSS_CASES[case]
    model = make_model(preset, **options).eval()
    raw, _, mask = make_batch(model.config)
    raw = round_trip_safe(raw, model.config.prediction_downsample)
    mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
    pixel_values = (raw / 255.0 - mean) / torch.tensor(model.config.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        loss = model(pixel_values, bool_masked_pos=mask).loss
        prediction = head_output(model, pixel_values, mask)
    expected = ref_loss(model.config, prediction, pixel_values, raw, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    if options.get("loss_type") == "smooth_l1":  # the test really covers both branches
        target = ref_area_mean(pixel_values, model.config.prediction_downsample)
        d = (prediction - target).abs()
        assert (d < model.config.smooth_l1_beta).any() and (d > model.config.smooth_l1_beta).any()


def test_loss_types_differ_as_their_formulas_say():
    """Hand-sized errors: l1 |d|, l2 d**2, smooth_l1 0.5 d**2 / beta below beta and |d| - beta / 2 above."""
    target = torch.zeros(1, 1, 1, 4)
    prediction = torch.tensor([[[[0.5, -2.0, 0.0, 3.0]]]])
    mask = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])  # only the first two count
    assert reconstruction_loss(prediction, target, mask, "l1").item() == pytest.approx(2.5 / (2 + 1e-5))
    assert reconstruction_loss(prediction, target, mask, "l2").item() == pytest.approx(4.25 / (2 + 1e-5))
    smooth = 0.5 * 0.25 / 1.0 + (2.0 - 0.5)
    assert reconstruction_loss(prediction, target, mask, "smooth_l1", 1.0).item() == pytest.approx(smooth / (2 + 1e-5))
    everything = torch.ones_like(mask)
    assert reconstruction_loss(prediction, target, everything, "l1").item() == pytest.approx(5.5 / (4 + 1e-5))


def test_loss_area_all_counts_visible_pixels():
    masked, everything = make_model(VIT).eval(), make_model(VIT, loss_area="all").eval()
    _, pixel_values, mask = make_batch(masked.config)
    visible = ~pixel_mask(mask, 32, 32, 4).bool().expand_as(pixel_values)
    changed = pixel_values + 3.0 * visible  # only the visible pixels of the *target* change
    with torch.no_grad():
        reconstruction = masked(pixel_values, bool_masked_pos=mask).reconstruction
    # The masked loss ignores visible pixels, the "all" loss does not.
    assert masked_l1_loss(changed, reconstruction, mask, 4) == masked_l1_loss(pixel_values, reconstruction, mask, 4)
    with torch.no_grad():
        loss = everything(pixel_values, bool_masked_pos=mask).loss
        rec = everything(pixel_values, bool_masked_pos=mask).reconstruction
    assert loss.item() == pytest.approx(float((rec - pixel_values).abs().sum() / (2 * 32 * 32 + 1e-5) / 3), rel=1e-5)


# ---------------------------------------------------------------------------------------------- colour classes
def test_color_bins_and_expected_color_round_trip():
    stats = dict(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    mean, std = torch.tensor(stats["image_mean"]).view(1, 3, 1, 1), torch.tensor(stats["image_std"]).view(1, 3, 1, 1)
    raw = torch.arange(256).view(1, 1, 16, 16).expand(1, 3, 16, 16)  # every 8-bit value
    x = (raw / 255.0 - mean) / std
    for bins in (256, 8):
        config = SimMIMConfig.from_preset(VIT, loss_type="color_ce", num_color_bins=bins, **stats)
        width = 256 // bins
        classes = color_classes(x, config)
        assert torch.equal(classes, raw // width)  # 8 bins: 0..31 -> 0, 32..63 -> 1, ...
        # Logits certain of the true bin give back that bin's mean colour, normalised like the input.
        logits = 60.0 * F.one_hot(classes, bins).permute(0, 1, 4, 2, 3).reshape(1, 3 * bins, 16, 16)
        centre = (raw // width) * width + (width - 1) / 2  # 256 bins: the value itself
        assert torch.allclose(expected_color(logits, config), (centre / 255.0 - mean) / std, atol=1e-5)
        if bins == 256:
            assert torch.allclose(expected_color(logits, config), x, atol=1e-5)
        # Uniform logits: the mean of all bin centres, 127.5, for any bin count.
        uniform = expected_color(torch.zeros(1, 3 * bins, 1, 1), config)
        assert torch.allclose(uniform * std + mean, torch.full((1, 3, 1, 1), 127.5 / 255))


def test_color_ce_reconstruction_is_the_expected_colour():
    model = make_model(VIT, loss_type="color_ce", num_color_bins=8, prediction_resolution=16).eval()
    _, pixel_values, mask = make_batch(model.config)
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos=mask)
        logits = head_output(model, pixel_values, mask).reshape(2, 3, 8, 16, 16).double()
    centres = torch.arange(8, dtype=torch.float64) * 32 + 15.5
    colour = (logits.softmax(dim=2) * centres.view(1, 1, 8, 1, 1)).sum(dim=2) / 255.0
    colour = (colour - torch.tensor(model.config.image_mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(model.config.image_std, dtype=torch.float64).view(1, 3, 1, 1)
    upsampled = colour.repeat_interleave(2, 2).repeat_interleave(2, 3)  # each 2x2 square shows its prediction
    assert torch.allclose(out.reconstruction.double(), upsampled, atol=1e-5)


# ---------------------------------------------------------------------------------------------- prediction resolution
def test_low_resolution_mask_counts_only_fully_masked_squares():
    """Hand-made: a 8x8 image, 2-pixel patches (4x4 patch grid), 4-pixel squares (2x2 target grid)."""
    patches = torch.zeros(4, 4, dtype=torch.bool)
    patches[0:2, 0:2] = True  # the whole top-left square
    patches[0, 3] = True  # one patch of the top-right square
    patches[2:4, 2:4] = True
    patches[3, 3] = True
    got = target_mask(patches.view(1, 16), 8, 8, patch_size=2, downsample=4)
    assert got.shape == (1, 1, 2, 2)
    assert got[0, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert torch.equal(target_mask(patches.view(1, 16), 8, 8, 2, 1), pixel_mask(patches.view(1, 16), 8, 8, 2))


def test_low_resolution_reconstruction_repeats_each_prediction():
    model = make_model(VIT, prediction_resolution=8).eval()
    _, pixel_values, mask = make_batch(model.config)
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos=mask)
        prediction = head_output(model, pixel_values, mask)
    assert prediction.shape == (2, 3, 8, 8)
    assert torch.equal(out.reconstruction, prediction[:, :, :, None, :, None].expand(-1, -1, -1, 4, -1, 4)
                       .reshape(2, 3, 32, 32))


def test_low_resolution_at_another_input_size_keeps_the_factor():
    model = make_model(SWIN, prediction_resolution=16).eval()  # averages 2x2 squares
    pixel_values = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 32 * 32, dtype=torch.bool)
    mask[0, :300] = True
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos=mask)
    assert head_output(model, pixel_values, mask).shape == (1, 3, 32, 32) and out.reconstruction.shape == (1, 3, 64, 64)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------- normalised target
@pytest.mark.parametrize("k", [3, 5, 9])
def test_local_normalisation_matches_a_loop(k):
    x = torch.randn(2, 2, 6, 7, generator=torch.Generator().manual_seed(k))
    x[0, 0, :3, :3] = 0.25  # a flat corner: zero variance, so the clamp and the 1e-6 matter
    assert np.allclose(normalize_targets(x, k).numpy(), ref_local_norm(x.numpy(), k), atol=2e-4)


def test_local_normalisation_of_a_flat_image_is_finite():
    """E[x^2] - E[x]^2 of a flat float32 image can round below zero (-1e-4 at this value): the clamp at 0 keeps
    the square root real."""
    flat = torch.full((1, 3, 8, 8), 24.812829971313477)
    normalised = normalize_targets(flat, 3)
    assert torch.isfinite(normalised).all() and normalised.abs().max() < 1.0


def test_normalised_target_loss_matches_a_loop():
    model = make_model(VIT, norm_target_patch_size=7, loss_type="l2").eval()
    raw, pixel_values, mask = make_batch(model.config, batch=1)
    with torch.no_grad():
        loss = model(pixel_values, bool_masked_pos=mask).loss
        prediction = head_output(model, pixel_values, mask)
    assert loss.item() == pytest.approx(ref_loss(model.config, prediction, pixel_values, raw, mask), rel=1e-5)


def test_normalised_target_reproduces_the_official_swinv2_loss():
    """The official SwinV2 SimMIM (k = 7) loss from its own input, mask and decoder output."""
    path = FIXTURES / "swinv2_tiny.io.safetensors"
    if not path.exists():
        pytest.skip("tests/fixtures/swinv2_tiny.io.safetensors is copied in with the SwinV2 encoder")
    io = load_file(path)
    meta = json.loads((FIXTURES / "swinv2_tiny.json").read_text())
    x, patch = io["pixel_values"], meta["patch_size"]
    mask = pixel_mask(io["mask"].flatten(1), x.shape[2], x.shape[3], patch)
    target = normalize_targets(x, meta["norm_target_patch_size"])
    loss = reconstruction_loss(io["reconstruction"], target, mask, "l1")
    assert loss.item() == pytest.approx(io["loss"].item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------- training, loading
BACKWARD = {
    "mlp": (VIT, dict(head_type="mlp")), "smooth_l1": (VIT, dict(loss_type="smooth_l1")),
    "l2": (VIT, dict(loss_type="l2")), "color_ce": (VIT, dict(loss_type="color_ce")),
    "res16": (VIT, dict(prediction_resolution=16)), "all": (VIT, dict(loss_area="all")),
    "norm7": (VIT, dict(norm_target_patch_size=7)),
    "swin-everything": (SWIN, dict(head_type="mlp", loss_type="color_ce", num_color_bins=8, prediction_resolution=8,
                                   loss_area="all")),
    "swin-norm": (SWIN, dict(norm_target_patch_size=5, prediction_resolution=16, loss_type="smooth_l1")),
}


@pytest.mark.parametrize("case", sorted(BACKWARD))
def test_backward_is_finite_and_reaches_every_parameter(case):
    preset, options = BACKWARD[case]
    model = make_model(preset, **options).train()
    _, pixel_values, mask = make_batch(model.config)
    model(pixel_values, bool_masked_pos=mask).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(grads[n].abs().sum() > 0 for n in grads if n.startswith("decoder."))


def test_models_with_options_load_through_trust_remote_code_alone(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    cases = {"colour": (VIT, dict(head_type="mlp", loss_type="color_ce", num_color_bins=8, prediction_resolution=16,
                                  loss_area="all")),
             "norm": (SWIN, dict(norm_target_patch_size=5, loss_type="smooth_l1", smooth_l1_beta=0.5))}
    for name, (preset, options) in cases.items():
        model = make_model(preset, **options).eval()
        model.save_pretrained(root / name)
        reloaded = SimMIMForMaskedImageModeling.from_pretrained(root / name).eval()
        _, pixel_values, mask = make_batch(model.config)
        with torch.no_grad():
            out, again = model(pixel_values, bool_masked_pos=mask), reloaded(pixel_values, bool_masked_pos=mask)
        assert torch.equal(out.loss, again.loss) and torch.equal(out.reconstruction, again.reconstruction)
        save_file({"pixel_values": pixel_values, "mask": mask, "loss": out.loss.reshape(1),
                   "reconstruction": out.reconstruction.contiguous()}, root / f"{name}.safetensors")
    run_without_simmim_hf(f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForMaskedImageModeling
        for name in ("colour", "norm"):
            expected = load_file(f"{str(root)}/{{name}}.safetensors")
            model = AutoModelForMaskedImageModeling.from_pretrained(f"{str(root)}/{{name}}", trust_remote_code=True)
            assert not type(model).__module__.startswith("simmim_hf")
            with torch.no_grad():
                out = model.eval()(expected["pixel_values"], bool_masked_pos=expected["mask"])
            assert torch.equal(out.loss.reshape(1), expected["loss"]), name
            assert torch.equal(out.reconstruction, expected["reconstruction"]), name
    """, cwd=tmp_path_factory.mktemp("cwd"))


# ---------------------------------------------------------------------------------------------- AvgDist
def brute_force_avgdist(unit: np.ndarray, p: int) -> float:
    """Mean over masked pixels of the distance to the nearest visible pixel, by comparing every pair."""
    pixels = unit.repeat(p, 0).repeat(p, 1)
    masked, visible = np.argwhere(pixels), np.argwhere(~pixels)
    distances = np.sqrt(((masked[:, None, :] - visible[None, :, :]) ** 2).sum(-1)).min(axis=1)
    return float(distances.mean())


def test_avgdist_by_hand():
    one = torch.zeros(1, 16, dtype=torch.bool)
    one[0, 5] = True  # one 4x4 patch: 12 border pixels at 1, 4 inner pixels at 2
    assert average_masked_distance(one, 4, 16, 16).tolist() == [pytest.approx(20 / 16)]
    column = torch.zeros(1, 4, 4, dtype=torch.bool)
    column[0, :, 0] = True  # the left 3-pixel column of a 12x12 image: distances 3, 2, 1
    assert average_masked_distance(column.view(1, 16), 3, 12, 12).tolist() == [pytest.approx(2.0)]


def test_avgdist_matches_brute_force():
    rng = np.random.default_rng(0)
    for gh, gw, p in ((5, 7, 3), (6, 6, 2), (4, 9, 4)):
        units = rng.random((3, gh, gw)) < rng.uniform(0.3, 0.9)
        units[:, 0, 0], units[:, -1, -1] = True, False
        got = average_masked_distance(torch.from_numpy(units).view(3, -1), p, gh * p, gw * p)
        assert got.dtype == torch.float32 and got.shape == (3,)
        expected = [brute_force_avgdist(u, p) for u in units]
        assert np.allclose(got.numpy(), expected, rtol=1e-5)


def test_avgdist_errors():
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] .*every pixel is masked"):
        average_masked_distance(torch.tensor([[True, False, True, True], [True] * 4]), 2, 4, 4)
    with pytest.raises(ValueError, match="no pixel is masked"):
        average_masked_distance(torch.zeros(1, 4, dtype=torch.bool), 2, 4, 4)
    with pytest.raises(ValueError, match=r"`bool_masked_pos` must have shape \(batch, \(H/p\)\*\(W/p\)\)"):
        average_masked_distance(torch.ones(1, 5, dtype=torch.bool), 2, 4, 4)
    with pytest.raises(ValueError, match="divisible by patch_size=3"):
        average_masked_distance(torch.ones(1, 4, dtype=torch.bool), 3, 4, 4)
    with pytest.raises(ValueError, match=r"image\(s\) \[0, 1, 2, 3, 4, 5, 6, 7\] and 12 more"):
        average_masked_distance(torch.ones(20, 4, dtype=torch.bool), 2, 4, 4)
    # 64-px units at 192 px: ceil(9 * 0.9) = 9, every unit masked.
    full = SimMIMConfig.from_preset("swin-base-w6-192", mask_patch_size=64, mask_ratio=0.9)
    with pytest.raises(ValueError, match=r"`mask_ratio` masks every unit \(ceil\(9 \* 0.9\) = 9 of 9\)"):
        expected_average_masked_distance(full)


def test_expected_avgdist_reproduces_the_paper_and_its_trends():
    """Random masking, 32-px units, ratio 0.6 at 192 px: about 15 px (the paper); smaller units or a lower
    ratio bring the visible pixels closer."""
    paper = SimMIMConfig.from_preset("swin-base-w6-192")
    avgdist = expected_average_masked_distance(paper, num_samples=32, seed=0)
    assert 14.0 < avgdist < 16.5
    assert expected_average_masked_distance(paper, num_samples=32, seed=0) == avgdist  # seeded
    smaller_units = SimMIMConfig.from_preset("swin-base-w6-192", mask_patch_size=8)
    lower_ratio = SimMIMConfig.from_preset("swin-base-w6-192", mask_ratio=0.3)
    assert expected_average_masked_distance(smaller_units, num_samples=8) < avgdist / 2
    assert expected_average_masked_distance(lower_ratio, num_samples=8) < avgdist
    # The central strategy masks one block (5x5 units minus 3): farther from the visible pixels than random.
    assert expected_average_masked_distance(paper, num_samples=1, strategy="central") > 1.3 * avgdist


@pytest.mark.parametrize("options", [dict(norm_target_patch_size=7), dict(norm_target_patch_size=5,
                                                                          prediction_resolution=16), {}])
def test_a_perfect_prediction_maps_back_to_the_image_it_predicts(options):
    """The reconstruction grid shows the prediction as an image: a perfect prediction of a locally normalised
    target, mapped back, is the (area-averaged) input itself; without that option nothing changes."""
    from simmim_hf.modeling_simmim import area_average

    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(VIT, **options))
    pixel_values = torch.randn(2, 3, 32, 32)
    perfect = model.prediction_to_image(model.targets(pixel_values))
    shown = model.reconstruction_in_input_space(perfect, pixel_values)
    f = model.config.prediction_downsample
    expected = area_average(pixel_values, f).repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
    torch.testing.assert_close(shown, expected, rtol=0, atol=1e-4)
