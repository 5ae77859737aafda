"""Resolution / window transfer of checkpoints: bicubic relative-position tables, shared -> per-block,
position embeddings, identity at the original size, and unmappable tensors reported by name."""

import pytest
import torch

from simmim_hf import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMModel
from simmim_hf.transfer import (
    load_pretrained_for_transfer,
    resize_position_embeddings,
    resize_relative_position_bias_table,
    transfer_state_dict,
)

TABLE = "relative_position_bias.relative_position_bias_table"


def pretrained(preset, seed=0, **overrides):
    torch.manual_seed(seed)
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset, **overrides)).eval()
    with torch.no_grad():  # non-trivial tables: the BEiT-style ViT initialises its table at zero
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_(0, 1)
    return model


@pytest.fixture(scope="module")
def swin_src():
    return pretrained("swin-nano-w4-32")


@pytest.fixture(scope="module")
def vit_src():
    return pretrained("vit-nano-p4-32")


def test_swin_32_w4_into_48_w6(swin_src):
    model = SimMIMForImageClassification(
        SimMIMConfig.from_preset("swin-nano-w4-32", image_size=48, window_size=6, num_labels=3)).eval()
    report = load_pretrained_for_transfer(model, swin_src.state_dict(), strict=True)
    assert len(report.interpolated) == 6 and not report.mismatched  # every block's table: 7x7 -> 11x11
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    assert sorted(report.unexpected) == ["decoder.0.bias", "decoder.0.weight"]
    name = f"simmim.encoder.stages.1.blocks.0.attention.{TABLE}"
    src_table = swin_src.state_dict()[name]
    dst_table = model.state_dict()[name]
    assert dst_table.shape == (121, src_table.shape[1])
    torch.testing.assert_close(dst_table, official_resize(src_table, 7, 11))
    # Everything that does not depend on the grid is copied exactly.
    torch.testing.assert_close(model.state_dict()["simmim.encoder.stages.2.blocks.1.mlp.fc1.weight"],
                               swin_src.state_dict()["simmim.encoder.stages.2.blocks.1.mlp.fc1.weight"])
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).logits.shape == (2, 3)


def official_resize(table: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    """The official SimMIM / BEiT fine-tuning resize, written from its description with SciPy as the spline:
    source offsets on a geometric sequence reaching the target's extent, a cubic spline read at integer offsets."""
    import numpy as np
    from scipy.interpolate import RectBivariateSpline

    n, m = src // 2, dst // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2
        left, right = (left, q) if (1 - q**n) / (1 - q) > m else (q, right)
    distances = np.cumsum([q**i for i in range(n)])
    x = np.concatenate([-distances[::-1], [0.0], distances])
    offsets = np.arange(-m, m + 0.1)
    planes = [RectBivariateSpline(x, x, table[:, h].view(src, src).double().numpy(), kx=3, ky=3, s=0)(offsets, offsets)
              for h in range(table.shape[1])]
    return torch.from_numpy(np.stack([p.reshape(-1) for p in planes], axis=1)).to(table.dtype)


@pytest.mark.parametrize("src, dst", [(7, 11), (11, 13), (15, 23), (13, 11)])
def test_relative_position_tables_resize_as_the_official_fine_tuning_code(src, dst):
    """Swin 192 px w6 -> 224 px w7 is 11 -> 13 offsets a side; ViT 32 -> 48 px at patch 4 is 15 -> 23."""
    torch.manual_seed(0)
    table = torch.randn(src * src + 3, 2)
    resized = resize_relative_position_bias_table(table, dst * dst + 3, num_extra_rows=3)
    torch.testing.assert_close(resized[:-3], official_resize(table[:-3], src, dst))
    assert torch.equal(resized[-3:], table[-3:])  # the CLS rows
    if dst > src:  # the near offsets keep their pretrained biases (a plain bicubic resize shifts every offset)
        grid, source = resized[:-3].view(dst, dst, 2), table[:-3].view(src, src, 2)
        for offset in (-1, 0, 1):
            torch.testing.assert_close(grid[dst // 2 + offset, dst // 2], source[src // 2 + offset, src // 2])


def test_resize_keeps_constants_and_cls_rows():
    # Hand-checkable: bicubic interpolation of a constant grid is that constant; CLS rows pass through.
    table = torch.cat([torch.full((15 * 15, 2), 0.25), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])])
    out = resize_relative_position_bias_table(table, 23 * 23 + 3, num_extra_rows=3)
    assert out.shape == (532, 2)
    torch.testing.assert_close(out[:-3], torch.full((529, 2), 0.25))
    torch.testing.assert_close(out[-3:], table[-3:])
    pos = torch.cat([torch.full((1, 1, 4), 7.0), torch.full((1, 64, 4), -1.0)], dim=1)
    out = resize_position_embeddings(pos, 1 + 144)
    assert out.shape == (1, 145, 4) and out[0, 0].eq(7.0).all() and torch.allclose(out[0, 1:], torch.tensor(-1.0))


def test_vit_new_grid_shared_to_per_block_with_absolute_positions(vit_src):
    src_sd = dict(vit_src.state_dict())
    # A checkpoint that also has absolute positions (plain-ViT style) exercises the pos-emb interpolation.
    src_sd["simmim.embeddings.position_embeddings"] = torch.randn(1, 65, 64)
    config = SimMIMConfig.from_preset("vit-nano-p4-32", image_size=48, use_relative_position_bias=True,
                                      use_absolute_position_embeddings=True, num_labels=4)
    model = SimMIMForImageClassification(config).eval()
    new_sd, report = transfer_state_dict(src_sd, model)
    shared = src_sd[f"simmim.encoder.{TABLE}"]
    assert sorted(report.expanded_shared) == [f"simmim.encoder.layers.{i}.attention.{TABLE}" for i in range(2)]
    for i in range(2):
        table = new_sd[f"simmim.encoder.layers.{i}.attention.{TABLE}"]
        assert table.shape == ((2 * 12 - 1) ** 2 + 3, 2)
        torch.testing.assert_close(table, resize_relative_position_bias_table(shared, table.shape[0], 3))
        torch.testing.assert_close(table[-3:], shared[-3:])  # cls->token, token->cls, cls->cls kept
    assert new_sd["simmim.embeddings.position_embeddings"].shape == (1, 145, 64)
    torch.testing.assert_close(new_sd["simmim.embeddings.position_embeddings"][:, 0],
                               src_sd["simmim.embeddings.position_embeddings"][:, 0])
    assert not report.mismatched and f"simmim.encoder.{TABLE}" not in report.unexpected
    model.load_state_dict(new_sd, strict=False)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).logits.shape == (2, 4)


@pytest.mark.parametrize("preset", ["vit-nano-p4-32", "swin-nano-w4-32"])
def test_identity_at_original_size(preset, vit_src, swin_src, tmp_path):
    src = vit_src if preset.startswith("vit") else swin_src
    # Through a saved folder and a bare-encoder checkpoint too (names gain the `simmim.` prefix).
    src.simmim.save_pretrained(tmp_path)
    model = SimMIMForImageClassification(SimMIMConfig.from_preset(preset, num_labels=2)).eval()
    report = load_pretrained_for_transfer(model, str(tmp_path), strict=True)
    assert not report.interpolated and not report.mismatched and not report.unexpected
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = src.simmim(x).last_hidden_state
        torch.testing.assert_close(model.simmim(x).last_hidden_state, expected, rtol=0, atol=0)
    # The resize helpers are the identity at the same size.
    for name, tensor in src.state_dict().items():
        if name.endswith("relative_position_bias_table"):
            assert resize_relative_position_bias_table(tensor, tensor.shape[0], 3 if preset.startswith("vit") else 0) is tensor


def test_unmappable_tensors_are_reported_by_name(vit_src):
    # 4 heads instead of 2: the relative tables cannot be mapped; a different patch size neither.
    config = SimMIMConfig.from_preset("vit-nano-p4-32", num_attention_heads=4, patch_size=8, mask_patch_size=8,
                                      num_labels=2)
    model = SimMIMForImageClassification(config)
    before = model.state_dict()[f"simmim.encoder.{TABLE}"].clone()
    with pytest.raises(ValueError, match="could NOT be mapped"):
        load_pretrained_for_transfer(model, vit_src.state_dict(), strict=True)
    report = load_pretrained_for_transfer(model, vit_src.state_dict())
    bad = " ".join(report.mismatched)
    assert f"simmim.encoder.{TABLE}" in bad and "different number of heads" in bad
    assert "simmim.embeddings.projection.weight" in bad
    torch.testing.assert_close(model.state_dict()[f"simmim.encoder.{TABLE}"], before)  # left as initialised
    # Per-block tables cannot become one shared table: reported, not averaged.
    per_block = pretrained("vit-nano-p4-32", use_relative_position_bias=True)
    shared_model = SimMIMModel(SimMIMConfig.from_preset("vit-nano-p4-32"))
    _, report = transfer_state_dict(per_block.state_dict(), shared_model)
    assert f"encoder.{TABLE}" in report.missing
    assert f"encoder.layers.0.attention.{TABLE}" in report.unexpected


def test_official_vit_fine_tuning_layout_drops_the_final_norm_under_strict(vit_src):
    """`use_fc_norm` (official ViT fine-tuning): the pretrained final norm has no place and is reported as
    unexpected, the fresh `pooler.layernorm` is a head tensor, so strict loading still succeeds."""
    model = SimMIMForImageClassification(SimMIMConfig.from_preset("vit-nano-p4-32", num_labels=2, use_fc_norm=True))
    report = load_pretrained_for_transfer(model, vit_src.state_dict(), strict=True)
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight", "simmim.pooler.layernorm.bias",
                                      "simmim.pooler.layernorm.weight"]
    assert {"simmim.layernorm.weight", "simmim.layernorm.bias"} <= set(report.unexpected)
    torch.testing.assert_close(model.simmim.encoder.layers[1].mlp.fc2.weight,
                               vit_src.simmim.encoder.layers[1].mlp.fc2.weight)


def test_swin_absolute_position_embeddings_are_resized_without_a_cls_row():
    source = pretrained("swin-nano-w4-32", use_absolute_position_embeddings=True)
    model = SimMIMModel(SimMIMConfig.from_preset("swin-nano-w4-32", use_absolute_position_embeddings=True,
                                                 image_size=64, mask_patch_size=16))
    _, report = transfer_state_dict(source.state_dict(), model)
    assert not report.mismatched and any("position_embeddings" in name for name in report.interpolated)
