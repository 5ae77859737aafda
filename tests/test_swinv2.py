"""SwinV2 (`encoder_type="swinv2"`): the official SwinV2 SimMIM fixture and transformers' Swinv2 reproduced after
conversion, the zoo's Hub references (download patched), window transfer, low-precision numerics, gradient
checkpointing, save/load with and without simmim_hf installed, layer-decay ids, weight decay, init and validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_without_simmim_hf
from safetensors.torch import load_file, save_file
from transformers import Swinv2Config, Swinv2ForMaskedImageModeling, Swinv2Model

from simmim_hf import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMModel
from simmim_hf import convert as convert_module
from simmim_hf.convert import convert_official_checkpoint, convert_transformers_checkpoint, load_checkpoint_file, main
from simmim_hf.modeling_simmim import SimMIMSwinV2Attention, swinv2_relative_coords_table
from simmim_hf.optimization import build_param_groups
from simmim_hf.transfer import load_pretrained_for_transfer, swinv2_pretrained_window_sizes

FIXTURES = Path(__file__).parent / "fixtures"
SPEC = json.loads((FIXTURES / "swinv2_tiny.json").read_text())
TOLERANCE = 1e-5
PRESET = "swinv2-nano-w4-32"
ZOO_FILE = "simmim_swinv2_pretrain_models/swinv2_base_1k_500k.pth"


# ---------------------------------------------------------------------------------------------- helpers
def make_model(cls=SimMIMForMaskedImageModeling, seed: int = 0, **overrides):
    """A tiny SwinV2 with every parameter perturbed: the zero-initialised post-norms, biases and mask token would
    otherwise leave whole paths inactive (each block starts as the identity)."""
    torch.manual_seed(seed)
    model = cls(SimMIMConfig.from_preset(PRESET, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def make_inputs(batch: int = 2, size: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    bool_masked_pos = torch.rand(batch, (size // 2) ** 2, generator=generator) < 0.6
    return pixel_values, bool_masked_pos


def fixture_io():
    io = load_file(FIXTURES / "swinv2_tiny.io.safetensors")
    return io["pixel_values"], io["mask"].flatten(1).bool(), io


def fixture_differences(model) -> dict[str, float]:
    """Max abs differences to the official outputs: encoder feature map, reconstruction, loss."""
    pixel_values, bool_masked_pos, io = fixture_io()
    model.eval()
    with torch.no_grad():
        features = model.simmim(pixel_values, bool_masked_pos=bool_masked_pos).feature_map
        output = model(pixel_values, bool_masked_pos=bool_masked_pos)
    return {
        "encoder": (features - io["encoder_output"]).abs().max().item(),
        "reconstruction": (output.reconstruction - io["reconstruction"]).abs().max().item(),
        "loss": abs(output.loss.item() - io["loss"].item()),
    }


def assert_reproduces_fixture(model) -> None:
    differences = fixture_differences(model)
    assert max(differences.values()) <= TOLERANCE, differences


def official_state_dict() -> dict[str, torch.Tensor]:
    return load_checkpoint_file(FIXTURES / "swinv2_tiny.pth")["model"]


def tiny_transformers_swinv2(cls, pretrained_window_sizes=(0, 0, 0)):
    torch.manual_seed(0)
    config = Swinv2Config(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 4, 8],
                          window_size=4, encoder_stride=8, pretrained_window_sizes=list(pretrained_window_sizes))
    model = cls(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


# ---------------------------------------------------------------------------------------------- official fixture
def test_official_fixture_is_reproduced_with_the_architecture_inferred():
    model = convert_official_checkpoint(FIXTURES / "swinv2_tiny.pth",
                                        norm_target_patch_size=SPEC["norm_target_patch_size"])
    config = model.config
    assert config.encoder_type == "swinv2"
    assert (config.image_size, config.patch_size, config.embed_dim) == (SPEC["img"], SPEC["patch_size"],
                                                                        SPEC["embed_dim"])
    assert (config.depths, config.num_heads, config.window_size) == (SPEC["depths"], SPEC["num_heads"],
                                                                     SPEC["window_size"])
    assert config.encoder_stride == SPEC["encoder_stride"] and config.mask_patch_size == SPEC["mask_patch"]
    assert config.norm_target_patch_size == SPEC["norm_target_patch_size"] and not config.use_key_bias
    assert not config.pretrained_window_sizes  # a pretraining checkpoint: coordinates normalised by its own windows
    assert_reproduces_fixture(model)
    # The target normalisation matters: without it the loss is a different number.
    model.config.norm_target_patch_size = None
    assert fixture_differences(model)["loss"] > 1e-2


def test_official_checkpoint_recipe_settings_come_from_its_config_or_the_swinv2_recipe(tmp_path):
    checkpoint = load_checkpoint_file(FIXTURES / "swinv2_tiny.pth")
    # The fixture's pickled config has no MODEL.SIMMIM node: the official SwinV2 recipe's k = 47 applies.
    assert convert_official_checkpoint(FIXTURES / "swinv2_tiny.pth").config.norm_target_patch_size == 47
    for enable, expected in ((True, SPEC["norm_target_patch_size"]), (False, None)):
        config = dict(checkpoint["config"])
        config["MODEL"] = {**config["MODEL"],
                           "SIMMIM": {"NORM_TARGET": {"ENABLE": enable, "PATCH_SIZE": SPEC["norm_target_patch_size"]}}}
        path = tmp_path / f"norm_target_{enable}.pth"
        torch.save({"model": checkpoint["model"], "config": config}, path)
        model = convert_official_checkpoint(path)
        assert model.config.norm_target_patch_size == expected
        if enable:
            assert_reproduces_fixture(model)
    # 0 switches it off explicitly.
    assert convert_official_checkpoint(FIXTURES / "swinv2_tiny.pth",
                                       norm_target_patch_size=0).config.norm_target_patch_size is None


def test_a_half_precision_release_converts(tmp_path):
    """A checkpoint cast to fp16 (to halve a release's size) stores its coordinate tables rounded: they are
    checked at that precision, and the converted model computes what the fp16 weights say."""
    checkpoint = load_checkpoint_file(FIXTURES / "swinv2_tiny.pth")
    half = {key: value.half() if value.is_floating_point() else value for key, value in checkpoint["model"].items()}
    torch.save({**checkpoint, "model": half}, tmp_path / "half.pth")
    model = convert_official_checkpoint(tmp_path / "half.pth", norm_target_patch_size=SPEC["norm_target_patch_size"])
    assert model.config.window_size == SPEC["window_size"]
    assert torch.equal(model.simmim.embeddings.projection.weight, half["encoder.patch_embed.proj.weight"].float())


def test_older_rpe_mlp_naming_and_stripped_buffers(tmp_path):
    state_dict = {key.replace("cpb_mlp", "rpe_mlp"): value for key, value in official_state_dict().items()}
    assert any("rpe_mlp" in key for key in state_dict)
    path = tmp_path / "rpe_mlp.safetensors"
    save_file(state_dict, path)
    assert_reproduces_fixture(convert_official_checkpoint(path, mask_patch_size=8, norm_target_patch_size=7))

    # Without any stored buffer (and no config) nothing reveals the window or image size: the official recipe's
    # 192 px / window 12 are assumed, and flags give the real ones.
    stripped = {key: value for key, value in state_dict.items()
                if not key.endswith(("relative_coords_table", "relative_position_index", "attn_mask"))}
    path = tmp_path / "stripped.safetensors"
    save_file(stripped, path)
    assumed = convert_official_checkpoint(path).config
    assert (assumed.image_size, assumed.window_size, assumed.norm_target_patch_size) == (192, 12, 47)
    assert_reproduces_fixture(convert_official_checkpoint(path, image_size=32, window_size=4, mask_patch_size=8,
                                                          norm_target_patch_size=7))


def test_tampered_coordinate_table_is_detected(tmp_path):
    state_dict = official_state_dict()
    key = "encoder.layers.1.blocks.0.attn.relative_coords_table"
    state_dict[key] = (state_dict[key] * 0.5).contiguous()
    path = tmp_path / "tampered.safetensors"
    save_file(state_dict, path)
    with pytest.raises(ValueError, match="relative_coords_table.*does not match"):
        convert_official_checkpoint(path, mask_patch_size=8)


@pytest.mark.parametrize("reference", [
    f"hf://zdaxie/SimMIM/{ZOO_FILE}",
    f"https://huggingface.co/zdaxie/SimMIM/resolve/main/{ZOO_FILE}?download=true",
])
def test_zoo_hub_reference_is_downloaded_then_converted(tmp_path, monkeypatch, reference):
    """The released zoo lives on the Hub; the download is patched (tests never touch the network) to hand over the
    official-format fixture, which then goes through the CLI like a downloaded zoo file."""
    calls = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(FIXTURES / "swinv2_tiny.pth")

    monkeypatch.setattr(convert_module, "hf_hub_download", fake_download)
    main(["--source", "official", "--checkpoint", reference, "--output", str(tmp_path / "out"),
          "--norm_target_patch_size", "7"])
    assert calls == [("zdaxie/SimMIM", ZOO_FILE, None if reference.startswith("hf://") else "main")]
    folder = tmp_path / "out"
    assert (folder / "model.safetensors").is_file() and (folder / "modeling_simmim.py").is_file()
    assert_reproduces_fixture(SimMIMForMaskedImageModeling.from_pretrained(folder))


# ---------------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("pretrained_window_sizes", [(0, 0, 0), (3, 3, 2)])
def test_transformers_swinv2_mim_is_converted_exactly(pretrained_window_sizes):
    reference = tiny_transformers_swinv2(Swinv2ForMaskedImageModeling, pretrained_window_sizes)
    converted = convert_transformers_checkpoint(reference)
    assert converted.config.encoder_type == "swinv2" and not converted.config.use_key_bias
    assert (converted.config.pretrained_window_sizes or [0, 0, 0]) == list(pretrained_window_sizes)
    pixel_values, bool_masked_pos = make_inputs()
    with torch.no_grad():
        expected = reference(pixel_values, bool_masked_pos=bool_masked_pos, output_hidden_states=True)
        actual = converted(pixel_values, bool_masked_pos=bool_masked_pos)
    assert (expected.reconstruction - actual.reconstruction).abs().max().item() <= TOLERANCE
    assert abs(expected.loss.item() - actual.loss.item()) <= TOLERANCE


def test_transformers_swinv2_encoder_and_cli_folder(tmp_path):
    reference = tiny_transformers_swinv2(Swinv2Model)
    converted = convert_transformers_checkpoint(reference)
    assert isinstance(converted, SimMIMModel)
    pixel_values, _ = make_inputs()
    with torch.no_grad():
        expected, actual = reference(pixel_values), converted(pixel_values)
    assert (expected.last_hidden_state - actual.last_hidden_state).abs().max().item() <= TOLERANCE
    assert (expected.pooler_output - actual.pooler_output).abs().max().item() <= TOLERANCE

    mim = tiny_transformers_swinv2(Swinv2ForMaskedImageModeling)
    mim.save_pretrained(tmp_path / "hf")
    main(["--source", "transformers", "--checkpoint", str(tmp_path / "hf"), "--output", str(tmp_path / "out")])
    loaded = SimMIMForMaskedImageModeling.from_pretrained(tmp_path / "out").eval()
    pixel_values, bool_masked_pos = make_inputs()
    with torch.no_grad():
        expected = mim(pixel_values, bool_masked_pos=bool_masked_pos)
        actual = loaded(pixel_values, bool_masked_pos=bool_masked_pos)
    assert (expected.reconstruction - actual.reconstruction).abs().max().item() <= TOLERANCE
    # Saved in half precision (as many Hub uploads are): converted at float32, its rebuilt tables still agree.
    mim.half().save_pretrained(tmp_path / "hf16")
    half = convert_transformers_checkpoint(tmp_path / "hf16")
    stem = mim.swinv2.embeddings.patch_embeddings.projection.weight
    assert torch.equal(half.simmim.embeddings.projection.weight, stem.float())


def test_transformers_swinv2_that_cannot_convert_exactly():
    config = Swinv2Config(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 4, 8],
                          window_size=4, encoder_stride=8, use_absolute_embeddings=True)
    with pytest.raises(ValueError, match="use_absolute_embeddings"):
        convert_transformers_checkpoint(Swinv2ForMaskedImageModeling(config))


# ---------------------------------------------------------------------------------------------- window transfer
def test_window_transfer_keeps_the_pretrained_coordinates(tmp_path):
    source = make_model()
    source.save_pretrained(tmp_path / "pretrained")
    config = SimMIMConfig.from_preset(PRESET, image_size=48, window_size=6, num_labels=3)
    model = SimMIMForImageClassification(config).eval()
    report = load_pretrained_for_transfer(model, str(tmp_path / "pretrained"), strict=True)
    assert not report.interpolated and not report.mismatched
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    assert report.pretrained_window_sizes == model.config.pretrained_window_sizes == [4, 4, 4]

    # The CPB MLP is copied, its coordinate table rebuilt for the 6x6 window but normalised by the pretrained 4:
    # every offset the pretrained window had keeps its coordinate, hence its bias.
    src_attention = source.simmim.encoder.stages[1].blocks[0].attention
    dst_attention = model.simmim.encoder.stages[1].blocks[0].attention
    torch.testing.assert_close(dst_attention.cpb_mlp[0].weight, src_attention.cpb_mlp[0].weight)
    src_table = src_attention.relative_coords_table.view(7, 7, 2)
    dst_table = dst_attention.relative_coords_table.view(11, 11, 2)
    torch.testing.assert_close(dst_table[2:9, 2:9], src_table, rtol=0, atol=0)
    assert dst_table.abs().max() > src_table.abs().max()  # the larger window reaches further out
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).logits.shape == (2, 3)

    # The paper's fine-tuning (192 px / window 12 -> window 14) asks for the official [12, 12, 12, 6].
    assert swinv2_pretrained_window_sizes(SimMIMConfig.from_preset("swinv2-base-w12-192")) == [12, 12, 12, 6]


def test_window_transfer_at_the_same_size_is_the_identity(tmp_path):
    source = make_model().eval()
    same = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(PRESET)).eval()
    report = load_pretrained_for_transfer(same, source.state_dict(), strict=True, pretrained_config=source.config)
    assert report.pretrained_window_sizes is None and not same.config.pretrained_window_sizes
    pixel_values, bool_masked_pos = make_inputs()
    with torch.no_grad():
        assert torch.equal(same(pixel_values, bool_masked_pos=bool_masked_pos).reconstruction,
                           source(pixel_values, bool_masked_pos=bool_masked_pos).reconstruction)


# ---------------------------------------------------------------------------------------------- numerics
def test_attention_core_runs_in_float32_under_bf16_autocast(monkeypatch):
    model = make_model().train()
    pixel_values, bool_masked_pos = make_inputs()
    seen = []
    original = SimMIMSwinV2Attention.attention_function

    def recording(self, bias, output_attentions):
        function = original(self, bias, output_attentions)

        def wrapped(module, query, key, value, mask, **kwargs):
            seen.append((query.dtype, key.dtype, mask.dtype, kwargs["scaling"]))
            return function(module, query, key, value, mask, **kwargs)
        return wrapped

    monkeypatch.setattr(SimMIMSwinV2Attention, "attention_function", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(pixel_values, bool_masked_pos=bool_masked_pos)
    assert output.reconstruction.dtype == torch.bfloat16  # the rest of the network does run in bf16
    assert len(seen) == model.config.num_layers_for_decay
    assert set(seen) == {(torch.float32, torch.float32, torch.float32, 1.0)}
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        reference = model(pixel_values, bool_masked_pos=bool_masked_pos).loss
    assert abs(output.loss.item() - reference.item()) < 0.05 * reference.item()


def test_fp16_autocast_stays_finite_with_large_queries():
    """Half-precision norms of large q / k overflow (|q|^2 > 65504); the normalisation runs in float32."""
    model = make_model().train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SimMIMSwinV2Attention):
                module.qkv.weight.mul_(300.0)
    pixel_values, bool_masked_pos = make_inputs()
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            output = model(pixel_values, bool_masked_pos=bool_masked_pos)
    except RuntimeError as error:  # a CPU build without fp16 autocast
        pytest.skip(f"fp16 autocast unavailable on this CPU: {error}")
    with torch.no_grad():  # the first block's queries: their squared norms per head exceed fp16's range
        attention = model.simmim.encoder.stages[0].blocks[0].attention
        query = attention.qkv(model.simmim.embeddings(pixel_values, bool_masked_pos))[..., :16]
    assert query.view(*query.shape[:-1], 2, 8).pow(2).sum(-1).max() > torch.finfo(torch.float16).max
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sdpa_and_eager_attention_agree_and_cpu_training_uses_eager():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from simmim_hf.modeling_simmim import eager_attention_forward

    model = make_model().eval()
    pixel_values, bool_masked_pos = make_inputs()
    with torch.no_grad():
        sdpa = model(pixel_values, bool_masked_pos=bool_masked_pos)
        eager = model(pixel_values, bool_masked_pos=bool_masked_pos, output_attentions=True)
    torch.testing.assert_close(eager.reconstruction, sdpa.reconstruction, rtol=0, atol=1e-5)
    assert len(eager.attentions) == model.config.num_layers_for_decay
    attention = model.simmim.encoder.stages[0].blocks[0].attention
    bias = attention.position_bias()
    assert bias.requires_grad and attention.attention_function(bias, False) is eager_attention_forward
    with torch.no_grad():
        assert attention.attention_function(attention.position_bias(), False) is ALL_ATTENTION_FUNCTIONS["sdpa"]


def test_position_bias_and_logit_scale_definitions():
    """Against the formulas written out here: log-spaced coordinates, 16 * sigmoid(MLP), clamp at log(100)."""
    table = swinv2_relative_coords_table(4).view(7, 7, 2)
    offsets = torch.arange(-3, 4, dtype=torch.float32) / 3 * 8
    expected = torch.sign(offsets) * torch.log2(offsets.abs() + 1) / 3
    torch.testing.assert_close(table[:, 3, 0], expected)
    torch.testing.assert_close(table[3, :, 1], expected)
    # The window's own largest offset, stretched to 8, maps to log2(9) / log2(8).
    assert table.abs().max().item() == pytest.approx(math.log2(9) / 3)
    assert swinv2_relative_coords_table(1).abs().max() == 0  # 1x1: nothing to normalise, no NaN

    attention = make_model().simmim.encoder.stages[0].blocks[1].attention
    with torch.no_grad():
        attention.logit_scale[0] = 10.0
        hidden = torch.relu(attention.relative_coords_table @ attention.cpb_mlp[0].weight.T + attention.cpb_mlp[0].bias)
        expected_table = 16 * torch.sigmoid(hidden @ attention.cpb_mlp[2].weight.T)
    assert attention.logit_scales()[0].item() == pytest.approx(100.0)
    assert attention.logit_scales()[1].item() == pytest.approx(math.exp(attention.logit_scale[1].item()))
    bias = attention.position_bias().detach()
    index = attention.relative_position_index
    torch.testing.assert_close(bias, expected_table[index].permute(2, 0, 1))


# ---------------------------------------------------------------------------------------------- model API
def test_all_three_model_classes_and_other_resolutions():
    pixel_values, bool_masked_pos = make_inputs()
    encoder = make_model(SimMIMModel).eval()
    with torch.no_grad():
        out = encoder(pixel_values, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 16, 64) and out.feature_map.shape == (2, 64, 4, 4)
    assert len(out.hidden_states) == 4

    classifier = make_model(SimMIMForImageClassification, num_labels=5).train()
    result = classifier(pixel_values, labels=torch.tensor([1, 4]))
    result.loss.backward()
    assert result.logits.shape == (2, 5) and torch.isfinite(result.loss)

    mim = make_model().eval()
    large, large_mask = make_inputs(size=64)
    with torch.no_grad():
        output = mim(large, bool_masked_pos=large_mask)
    assert output.reconstruction.shape == (2, 3, 64, 64) and torch.isfinite(output.loss)


def test_official_initialisation():
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(PRESET)).eval()
    block = model.simmim.encoder.stages[0].blocks[0]
    for norm in (block.attention_output_norm, block.mlp_output_norm):
        assert norm.weight.abs().sum() == 0 and norm.bias.abs().sum() == 0
    torch.testing.assert_close(block.attention.logit_scale, torch.full_like(block.attention.logit_scale, math.log(10)))
    # Zero post-norms: every block starts as the identity, so a stage passes its input through unchanged.
    pixel_values, _ = make_inputs()
    with torch.no_grad():
        hidden = model.simmim(pixel_values, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[1], hidden[0], rtol=0, atol=0)
    # transformers' recipe (what converted models use for fresh tensors) keeps the norms at ones.
    fresh = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(PRESET, init_recipe="transformers"))
    assert fresh.simmim.encoder.stages[0].blocks[0].mlp_output_norm.weight.eq(1).all()


def test_save_load_round_trip(tmp_path):
    model = make_model(pretrained_window_sizes=[3, 3, 3]).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["encoder_type"] == "swinv2" and saved["pretrained_window_sizes"] == [3, 3, 3]
    assert not any("relative_coords_table" in k or "relative_position_index" in k
                   for k in load_file(tmp_path / "model.safetensors"))  # rebuilt buffers are not stored
    loaded = SimMIMForMaskedImageModeling.from_pretrained(tmp_path).eval()
    pixel_values, bool_masked_pos = make_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values, bool_masked_pos=bool_masked_pos).reconstruction,
                           model(pixel_values, bool_masked_pos=bool_masked_pos).reconstruction)
    torch.testing.assert_close(loaded.simmim.encoder.stages[0].blocks[0].attention.relative_coords_table,
                               swinv2_relative_coords_table(4, 3))


def test_trust_remote_code_load_without_simmim_hf(tmp_path):
    model = make_model(pretrained_window_sizes=[3, 3, 3]).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    pixel_values, bool_masked_pos = make_inputs()
    with torch.no_grad():
        output = model(pixel_values, bool_masked_pos=bool_masked_pos)
        features = model.simmim(pixel_values).last_hidden_state
    expected = {"pixel_values": pixel_values, "bool_masked_pos": bool_masked_pos, "features": features,
                "reconstruction": output.reconstruction, "loss": output.loss.reshape(1)}
    save_file({k: v.contiguous() for k, v in expected.items()}, tmp_path / "expected.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_without_simmim_hf(f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForMaskedImageModeling
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        mim = AutoModelForMaskedImageModeling.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        encoder = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert mim.config.encoder_type == "swinv2" and not type(mim).__module__.startswith("simmim_hf")
        with torch.no_grad():
            out = mim(expected["pixel_values"], bool_masked_pos=expected["bool_masked_pos"])
            features = encoder(expected["pixel_values"]).last_hidden_state
        assert torch.equal(out.reconstruction, expected["reconstruction"])
        assert torch.equal(out.loss.reshape(1), expected["loss"])
        assert torch.equal(features, expected["features"])
    """, cwd=elsewhere)


# ---------------------------------------------------------------------------------------------- optimisation
def test_layer_decay_ids_follow_the_official_get_swin_layer():
    model = make_model(SimMIMForImageClassification, num_labels=3)  # depths [2, 2, 2]: 6 blocks, head = 7
    expected = {
        "simmim.embeddings.mask_token": 0,
        "simmim.embeddings.projection.weight": 0,
        "simmim.embeddings.norm.weight": 0,
        "simmim.encoder.stages.0.blocks.0.attention.cpb_mlp.0.weight": 1,
        "simmim.encoder.stages.0.blocks.1.attention.logit_scale": 2,
        "simmim.encoder.stages.0.downsample.reduction.weight": 2,  # with the last block of its stage
        "simmim.encoder.stages.1.blocks.1.attention.q_bias": 4,
        "simmim.encoder.stages.1.downsample.norm.bias": 4,
        "simmim.encoder.stages.2.blocks.1.mlp_output_norm.weight": 6,
        "simmim.layernorm.weight": 7,
        "classifier.weight": 7,
    }
    assert {name: model.get_layer_id_for_lr_decay(name) for name in expected} == expected
    assert model.config.num_layers_for_decay == 6
    # `get_swin_layer` sends only the patch embedding and the mask token to 0: absolute positions train at full lr.
    absolute = make_model(SimMIMForImageClassification, num_labels=3, use_absolute_position_embeddings=True)
    assert absolute.get_layer_id_for_lr_decay("simmim.embeddings.position_embeddings") == 7


def test_no_weight_decay_on_the_position_bias_mlp_and_logit_scales():
    model = make_model()
    groups = build_param_groups(model, weight_decay=0.05)
    no_decay = {name for group in groups if group["weight_decay"] == 0 for name in group["param_names"]}
    decay = {name for group in groups if group["weight_decay"] > 0 for name in group["param_names"]}
    # The official rule: 1-D tensors, biases, the mask token and the keywords cpb_mlp / logit_scale.
    official = {name for name, p in model.named_parameters()
                if p.ndim == 1 or name.endswith(".bias") or "mask_token" in name
                or "cpb_mlp" in name or "logit_scale" in name}
    assert no_decay == official and decay == {name for name, _ in model.named_parameters()} - official
    assert any("cpb_mlp.2.weight" in name for name in no_decay) and any("logit_scale" in n for n in no_decay)
    assert any(name.endswith("attention.qkv.weight") for name in decay)


# ---------------------------------------------------------------------------------------------- config
def test_presets_match_the_zoo_sizes():
    from accelerate import init_empty_weights

    expected = {"small": 49e6, "base": 87e6, "large": 195e6, "huge": 655e6, "giant": 1.06e9}
    for size, count in expected.items():
        config = SimMIMConfig.from_preset(f"swinv2-{size}-w12-192")
        assert (config.image_size, config.window_size, config.norm_target_patch_size) == (192, 12, 47)
        with init_empty_weights():
            encoder = SimMIMModel(config)
        backbone = sum(p.numel() for n, p in encoder.named_parameters() if "mask_token" not in n)
        assert abs(backbone - count) / count < 0.01, (size, backbone)


@pytest.mark.parametrize("overrides, message", [
    (dict(pretrained_window_sizes=[4, 4]), r"`pretrained_window_sizes` must have one entry per stage \(3 stages\)"),
    (dict(pretrained_window_sizes=[4, 1, 4]), r"`pretrained_window_sizes` entries must be 0"),
    (dict(pretrained_window_sizes=[4, -1, 4]), r"`pretrained_window_sizes` must be None or a list of integers >= 0"),
    (dict(use_key_bias=True), r"`use_key_bias` must be False for SwinV2"),
    (dict(window_size=3), r"`window_size` must .*stage 0 has a 16x16 token grid"),  # Swin's stage rule applies
])
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        SimMIMConfig.from_preset(PRESET, **overrides)
