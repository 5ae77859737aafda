"""Core model tests on the tiny presets: forward/backward, the SimMIM loss, attention paths, gradient
checkpointing, other resolutions, save/load (also through `trust_remote_code` without simmim_hf), and every
ValueError of the config and of the input validation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_without_simmim_hf
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedImageModeling

from simmim_hf import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMModel, masked_l1_loss

PRESETS = {"vit": "vit-nano-p4-32", "swin": "swin-nano-w4-32", "swinv2": "swinv2-nano-w4-32"}
AUTO_CLASSES = {"AutoConfig", "AutoModel", "AutoModelForMaskedImageModeling", "AutoModelForImageClassification"}


def make_model(kind: str, **overrides) -> SimMIMForMaskedImageModeling:
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(PRESETS[kind], **overrides))
    # Perturb everything (biases and the ViT relative bias start at zero) so no path is trivially inactive.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def make_inputs(config: SimMIMConfig, batch: int = 2, size: int | None = None, seed: int = 0):
    """Images and a mask drawn the SimMIM way: whole `mask_patch_size` units, upsampled to model patches."""
    generator = torch.Generator().manual_seed(seed)
    size = size or config.image_size
    pixel_values = torch.randn(batch, config.num_channels, size, size, generator=generator)
    units = size // config.mask_patch_size
    unit_mask = torch.rand(batch, units, units, generator=generator) < config.mask_ratio
    unit_mask[:, 0, 0], unit_mask[:, -1, -1] = True, False  # at least one masked and one visible unit
    scale = config.mask_patch_size // config.patch_size
    bool_masked_pos = unit_mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).flatten(1)
    return pixel_values, bool_masked_pos


def reference_loss(pixel_values, reconstruction, bool_masked_pos, patch_size):
    """DESIGN.md: loss = (|x - x_rec| * m).sum() / (m.sum() + 1e-5) / num_channels, m the pixel mask (B, 1, H, W)."""
    b, c, h, w = pixel_values.shape
    m = bool_masked_pos.reshape(b, h // patch_size, w // patch_size).float()
    m = m.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2).unsqueeze(1)
    return ((pixel_values - reconstruction).abs() * m).sum() / (m.sum() + 1e-5) / c


def pixel_mask(bool_masked_pos, patch_size, size):
    b = bool_masked_pos.shape[0]
    grid = size // patch_size
    m = bool_masked_pos.reshape(b, grid, grid)
    return m.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)


kinds = pytest.mark.parametrize("kind", ["vit", "swin"])


# ---------------------------------------------------------------------------------------------- training signal
@kinds
def test_forward_backward_and_loss_formula(kind):
    model = make_model(kind).train()
    pixel_values, bool_masked_pos = make_inputs(model.config)
    output = model(pixel_values, bool_masked_pos=bool_masked_pos)
    assert output.reconstruction.shape == pixel_values.shape
    expected = reference_loss(pixel_values, output.reconstruction, bool_masked_pos, model.config.patch_size)
    torch.testing.assert_close(output.loss, expected, rtol=1e-6, atol=1e-7)

    output.reconstruction.retain_grad()
    output.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"
    # The gradient reaches the learnable mask token.
    assert model.simmim.embeddings.mask_token.grad.abs().sum() > 0
    # Only masked pixels contribute: d loss / d reconstruction vanishes exactly on visible pixels.
    visible = ~pixel_mask(bool_masked_pos, model.config.patch_size, pixel_values.shape[-1]).expand_as(pixel_values)
    assert output.reconstruction.grad[visible].abs().max() == 0
    assert output.reconstruction.grad[~visible].abs().min() > 0


@kinds
def test_unmasked_target_pixels_do_not_change_the_loss(kind):
    """Input and target are the same tensor in the model, so hold the reconstruction fixed and vary the target."""
    model = make_model(kind).eval()
    pixel_values, bool_masked_pos = make_inputs(model.config)
    with torch.no_grad():
        reconstruction = model(pixel_values, bool_masked_pos=bool_masked_pos).reconstruction
    visible = ~pixel_mask(bool_masked_pos, model.config.patch_size, pixel_values.shape[-1]).expand_as(pixel_values)
    changed = torch.where(visible, pixel_values + 10.0 * torch.randn_like(pixel_values), pixel_values)
    patch = model.config.patch_size
    assert masked_l1_loss(changed, reconstruction, bool_masked_pos, patch) == \
        masked_l1_loss(pixel_values, reconstruction, bool_masked_pos, patch)
    assert reference_loss(changed, reconstruction, bool_masked_pos, patch) == \
        reference_loss(pixel_values, reconstruction, bool_masked_pos, patch)
    # ...while a masked pixel does change it.
    masked_changed = pixel_values.clone()
    masked_changed[~visible] += 1.0
    assert masked_l1_loss(masked_changed, reconstruction, bool_masked_pos, patch) != \
        masked_l1_loss(pixel_values, reconstruction, bool_masked_pos, patch)


@kinds
def test_sdpa_and_eager_attention_agree(kind):
    model = make_model(kind).eval()
    assert model.config._attn_implementation == "sdpa"
    pixel_values, bool_masked_pos = make_inputs(model.config)
    with torch.no_grad():
        sdpa = model(pixel_values, bool_masked_pos=bool_masked_pos)
        eager = model(pixel_values, bool_masked_pos=bool_masked_pos, output_attentions=True)
    torch.testing.assert_close(eager.reconstruction, sdpa.reconstruction, rtol=0, atol=1e-5)
    torch.testing.assert_close(eager.loss, sdpa.loss, rtol=0, atol=1e-6)
    num_blocks = model.config.num_layers_for_decay
    assert len(eager.attentions) == num_blocks
    for weights in eager.attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


@kinds
def test_cpu_training_with_a_learned_bias_takes_the_eager_path_with_sdpa_gradients(kind, monkeypatch):
    """On CPU, SDPA would run its math path for a bias that needs a gradient; the model uses its eager function
    there instead, which must give what SDPA gives, gradients included. Without a gradient SDPA stays in use."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from simmim_hf.modeling_simmim import SimMIMAttention, eager_attention_forward

    model = make_model(kind).train()  # both tiny presets learn relative position biases
    pixel_values, bool_masked_pos = make_inputs(model.config)
    attention = next(m for m in model.modules() if isinstance(m, SimMIMAttention))
    table = next(p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table"))
    assert attention.attention_function(table[:1, :1].expand(3, 3), output_attentions=False) is eager_attention_forward
    with torch.no_grad():
        assert attention.attention_function(table[:1, :1].expand(3, 3), output_attentions=False) \
            is ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert attention.attention_function(None, output_attentions=False) is ALL_ATTENTION_FUNCTIONS["sdpa"]

    def loss_and_gradients():
        model.zero_grad()
        loss = model(pixel_values, bool_masked_pos=bool_masked_pos).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, gradients = loss_and_gradients()
    monkeypatch.setattr(SimMIMAttention, "attention_function", lambda self, *a: ALL_ATTENTION_FUNCTIONS["sdpa"])
    sdpa_loss, sdpa_gradients = loss_and_gradients()
    torch.testing.assert_close(loss, sdpa_loss, rtol=0, atol=1e-6)
    assert gradients.keys() == sdpa_gradients.keys()
    assert any("relative_position_bias_table" in name for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, sdpa_gradients[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["vit", "swin", "swinv2"])
def test_gradient_checkpointing_gives_the_same_gradients(kind, reentrant):
    """Both checkpointing kinds. Reentrant checkpointing fails in backward on a layer output that needs a gradient
    and gets none: the attention weights, which eager attention (the CPU training path with a learned bias) made
    whether asked for or not."""
    pixel_values, bool_masked_pos = make_inputs(make_model(kind).config)

    def gradients(checkpointing: bool):
        model = make_model(kind).train()
        calls = []
        if checkpointing:
            # transformers 5.x renamed the method (the old name still works, with a FutureWarning).
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            for layer in model.modules():
                if getattr(layer, "gradient_checkpointing", False):
                    inner = layer._gradient_checkpointing_func
                    layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
        model(pixel_values, bool_masked_pos=bool_masked_pos).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}, len(calls)

    plain, _ = gradients(False)
    checkpointed, calls = gradients(True)
    assert calls == make_model(kind).config.num_layers_for_decay, "every block must be checkpointed"
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_swin_accepts_a_resolution_other_than_the_config():
    model = make_model("swin").eval()
    pixel_values, bool_masked_pos = make_inputs(model.config, size=64)
    with torch.no_grad():
        output = model(pixel_values, bool_masked_pos=bool_masked_pos)
    assert output.reconstruction.shape == (2, 3, 64, 64)
    assert torch.isfinite(output.loss)
    torch.testing.assert_close(
        output.loss, reference_loss(pixel_values, output.reconstruction, bool_masked_pos, model.config.patch_size)
    )


@kinds
def test_loss_is_float32_under_bf16_autocast(kind):
    model = make_model(kind)
    pixel_values, bool_masked_pos = make_inputs(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(pixel_values, bool_masked_pos=bool_masked_pos)
    assert output.reconstruction.dtype == torch.bfloat16
    assert output.loss.dtype == torch.float32
    expected = reference_loss(pixel_values, output.reconstruction.float(), bool_masked_pos, model.config.patch_size)
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    assert model.simmim.embeddings.mask_token.grad is not None


# ---------------------------------------------------------------------------------------------- save / load
@kinds
def test_save_pretrained_round_trip(kind, tmp_path):
    model = make_model(kind).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) >= AUTO_CLASSES
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = SimMIMForMaskedImageModeling.from_pretrained(tmp_path).eval()
    pixel_values, bool_masked_pos = make_inputs(model.config)
    with torch.no_grad():
        before = model(pixel_values, bool_masked_pos=bool_masked_pos)
        after = reloaded(pixel_values, bool_masked_pos=bool_masked_pos)
    assert torch.equal(before.reconstruction, after.reconstruction) and torch.equal(before.loss, after.loss)
    # The registered Auto classes resolve to simmim_hf in this process too.
    assert type(AutoModelForMaskedImageModeling.from_pretrained(tmp_path)) is SimMIMForMaskedImageModeling
    assert type(AutoModel.from_pretrained(tmp_path)) is SimMIMModel
    assert type(AutoConfig.from_pretrained(tmp_path)) is SimMIMConfig


def test_a_loaded_classifier_keeps_its_mask_token_frozen(tmp_path):
    """Classification never masks, so the mask token is frozen (a trainable parameter without a gradient stops DDP
    with `find_unused_parameters=False` at its second step); loading replaces the parameters and used to make it
    trainable again."""
    from transformers import AutoModelForImageClassification

    SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("vit-nano-p4-32")).save_pretrained(tmp_path)
    assert not SimMIMForImageClassification(SimMIMConfig.from_preset("vit-nano-p4-32")) \
        .simmim.embeddings.mask_token.requires_grad
    direct = SimMIMForImageClassification.from_pretrained(tmp_path, num_labels=3)
    auto, info = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=3, output_loading_info=True)
    for model in (direct, auto):
        assert not model.simmim.embeddings.mask_token.requires_grad
        assert all(p.requires_grad for n, p in model.named_parameters() if "mask_token" not in n)


def test_saved_folder_loads_with_trust_remote_code_without_simmim_hf(tmp_path_factory):
    """A fresh process that cannot import simmim_hf loads both encoders through `auto_map` alone."""
    root = tmp_path_factory.mktemp("hub")
    elsewhere = tmp_path_factory.mktemp("cwd")
    for kind in ("vit", "swin"):
        model = make_model(kind).eval()
        model.save_pretrained(root / kind)
        pixel_values, bool_masked_pos = make_inputs(model.config)
        with torch.no_grad():
            output = model(pixel_values, bool_masked_pos=bool_masked_pos)
            features = model.simmim(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        expected = {"pixel_values": pixel_values, "bool_masked_pos": bool_masked_pos,
                    "reconstruction": output.reconstruction, "loss": output.loss.reshape(1), "features": features}
        save_file({k: v.contiguous() for k, v in expected.items()}, root / f"{kind}.expected.safetensors")

    run_without_simmim_hf(f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoModelForMaskedImageModeling
        try:
            import simmim_hf
        except ImportError:
            pass
        else:
            raise AssertionError("simmim_hf must not be importable here")
        root = {str(root)!r}
        for kind in ("vit", "swin"):
            folder, expected = f"{{root}}/{{kind}}", load_file(f"{{root}}/{{kind}}.expected.safetensors")
            config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
            assert type(config).__name__ == "SimMIMConfig" and config.encoder_type == kind
            mim = AutoModelForMaskedImageModeling.from_pretrained(folder, trust_remote_code=True).eval()
            encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(mim).__name__ == "SimMIMForMaskedImageModeling" and type(encoder).__name__ == "SimMIMModel"
            assert not type(mim).__module__.startswith("simmim_hf")
            with torch.no_grad():
                out = mim(expected["pixel_values"], bool_masked_pos=expected["bool_masked_pos"])
                features = encoder(expected["pixel_values"], bool_masked_pos=expected["bool_masked_pos"])
            assert torch.equal(out.reconstruction, expected["reconstruction"]), kind
            assert torch.equal(out.loss.reshape(1), expected["loss"]), kind
            assert torch.equal(features.last_hidden_state, expected["features"]), kind
        print("loaded without simmim_hf")
    """, cwd=elsewhere)


# ---------------------------------------------------------------------------------------------- config errors
VIT = dict(encoder_type="vit", image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
           num_attention_heads=2, mask_patch_size=8)
SWIN = dict(encoder_type="swin", image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 4, 8],
            window_size=4, mask_patch_size=8)

CONFIG_ERRORS = [
    (dict(image_size=32, patch_size=4, mask_patch_size=8), dict(encoder_type="resnet"), r"`encoder_type` must be one of \('vit', 'swin', 'swinv2'\); got encoder_type='resnet'"),
    (VIT, dict(patch_size=0), r"`patch_size` must be a positive integer"),
    (VIT, dict(image_size=32.0), r"`image_size` must be a positive integer"),
    (VIT, dict(num_channels=True), r"`num_channels` must be a positive integer"),
    (VIT, dict(image_size=30, mask_patch_size=2, patch_size=2, hidden_size=64), None),  # valid: control case
    (VIT, dict(image_size=30), r"`image_size` must be divisible by patch_size=4; got image_size=30"),
    (VIT, dict(image_size=48, mask_patch_size=32), r"`image_size` must be divisible by mask_patch_size=32"),
    (VIT, dict(image_size=48, mask_patch_size=6), r"`mask_patch_size` must be a multiple of patch_size=4; got mask_patch_size=6"),
    (VIT, dict(mask_ratio=0.0), r"`mask_ratio` must lie strictly between 0 and 1; got mask_ratio=0.0"),
    (VIT, dict(mask_ratio=1.0), r"`mask_ratio` must lie strictly between 0 and 1"),
    (VIT, dict(mask_ratio=-0.2), r"`mask_ratio` must lie strictly between 0 and 1"),
    (VIT, dict(drop_path_rate=1.0), r"`drop_path_rate` must lie in \[0, 1\)"),
    (VIT, dict(pooling="max"), r"`pooling` must be one of \('mean', 'cls'\)"),
    (VIT, dict(num_hidden_layers=0), r"must be positive"),
    (VIT, dict(num_attention_heads=3), r"`num_attention_heads` must divide hidden_size=64; got num_attention_heads=3"),
    (VIT, dict(use_shared_relative_position_bias=True, use_relative_position_bias=True),
     r"`use_relative_position_bias` cannot be combined with use_shared_relative_position_bias=True"),
    (VIT, dict(encoder_stride=16), r"`encoder_stride` must equal the encoder's total downsampling \(4 .*got encoder_stride=16"),
    (SWIN, dict(depths=[]), r"`depths` must be a non-empty list"),
    (SWIN, dict(depths=[2, 0, 2]), r"`depths` must be a non-empty list of positive integers"),
    (SWIN, dict(num_heads=[2, 4]), r"`num_heads` must have one entry per stage \(3 stages\)"),
    (SWIN, dict(window_size=0), r"`window_size` must be a positive integer"),
    (SWIN, dict(pooling="cls"), r"`pooling` must be 'mean' for Swin"),
    (SWIN, dict(image_size=36, mask_patch_size=4), r"`image_size` must fit the stages \(height and width must be divisible by patch_size \* 2\*\*\(stages-1\) = 8"),
    (SWIN, dict(num_heads=[3, 4, 8]), r"`num_heads` must divide the width of stage 0 \(16\)"),
    (SWIN, dict(image_size=48, window_size=5), r"`window_size` must fit the stages \(stage 0 has a 24x24 token grid, but its blocks attend in 5x5 windows"),
    (SWIN, dict(encoder_stride=4), r"`encoder_stride` must equal the encoder's total downsampling \(8 .*got encoder_stride=4"),
    (SWIN, dict(hidden_size=100), r"`hidden_size` is derived for Swin as embed_dim \* 2\*\*\(len\(depths\)-1\) = 64; got hidden_size=100"),
]


@pytest.mark.parametrize("base, change, message", CONFIG_ERRORS)
def test_config_errors(base, change, message):
    kwargs = {**base, **change}
    if message is None:
        SimMIMConfig(**kwargs)
        return
    with pytest.raises(ValueError, match=message):
        SimMIMConfig(**kwargs)


def test_valid_config_consistency():
    assert SimMIMConfig(**SWIN, hidden_size=64).hidden_size == 64  # a matching hidden_size is accepted
    assert SimMIMConfig(**SWIN).encoder_stride == 8 and SimMIMConfig(**VIT).encoder_stride == 4
    with pytest.raises(ValueError, match=r"Unknown preset name='vit-huge'"):
        SimMIMConfig.from_preset("vit-huge")


# ---------------------------------------------------------------------------------------------- input errors
@pytest.fixture(scope="module")
def tiny_models():
    return {kind: make_model(kind).eval() for kind in ("vit", "swin")}


@pytest.mark.parametrize("preset", ["swin-nano-w4-32", "swinv2-nano-w4-32"])
def test_a_swin_at_another_input_size_computes_what_a_model_built_at_that_size_does(preset):
    """Built at 64 px, the last stage is 8x8 tokens and shifts its 4x4 windows; at 32 px it is one 4x4 window,
    where Swin does not shift (as a model built at 32 px, and transformers' Swin, decide at run time). And the
    other way round: a model built at 32 px shifts that stage at 64 px (it used to keep it unshifted)."""
    torch.manual_seed(0)
    big = SimMIMModel(SimMIMConfig.from_preset(preset, image_size=64, mask_patch_size=16)).eval()
    small = SimMIMModel(SimMIMConfig.from_preset(preset)).eval()
    with torch.no_grad():
        for param in big.parameters():
            param.add_(torch.randn_like(param) * 0.05)  # away from the zero-initialised post-norms and biases
    small.load_state_dict(big.state_dict())
    for size in (32, 64):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(big(x).last_hidden_state, small(x).last_hidden_state, rtol=0, atol=1e-5,
                                       msg=f"{size} px")


def test_swin_grids_one_window_high_are_accepted_and_absolute_positions_need_the_built_size():
    model = SimMIMModel(SimMIMConfig.from_preset("swin-nano-w4-32")).eval()
    # 32x64: the last stage is 4x8 tokens, one window high: windows tile it exactly (it was refused).
    assert model(torch.randn(1, 3, 32, 64)).last_hidden_state.shape == (1, 4 * 8, model.config.hidden_size)
    absolute = SimMIMModel(SimMIMConfig.from_preset("swin-nano-w4-32", use_absolute_position_embeddings=True))
    with pytest.raises(ValueError, match=r"must be 32x32 for this Swin: its absolute position embeddings"):
        absolute(torch.randn(1, 3, 64, 64))


INPUT_ERRORS = [
    ("vit", None, None, r"`pixel_values` is required"),
    ("vit", (2, 1, 32, 32), None, r"`pixel_values` must have shape \(batch, 3, height, width\); got \(2, 1, 32, 32\)"),
    ("vit", (3, 32, 32), None, r"`pixel_values` must have shape \(batch, 3, height, width\); got \(3, 32, 32\)"),
    ("vit", (2, 3, 30, 32), None, r"divisible by patch_size=4; got 30x32"),
    ("vit", (2, 3, 64, 64), None, r"sized for 32x32 images; got pixel_values of 64x64"),
    ("swin", (2, 3, 36, 32), None, r"divisible by patch_size=2; got 36x32|patch_size \* 2\*\*\(stages-1\) = 8; got 36x32"),
    ("swin", (2, 3, 40, 40), None, r"stage 1 has a 10x10 token grid, but its blocks attend in 4x4 windows"),
    ("swin", (2, 3, 64, 16), None, r"stage 2 has a non-square 8x2 token grid smaller than the window"),
    ("vit", (2, 3, 32, 32), (2, 63), r"`bool_masked_pos` must have shape \(batch, \(H/p\)\*\(W/p\)\) = \(2, 64\).*got \(2, 63\)"),
    ("swin", (2, 3, 32, 32), (2, 16, 16), r"= \(2, 256\).*got \(2, 16, 16\)"),
    ("vit", (2, 3, 32, 32), "float", r"`bool_masked_pos` must be boolean \(or 0/1 integers\); got torch.float32"),
    ("vit", (2, 3, 32, 32), "two", r"`bool_masked_pos` must contain only 0 and 1"),
]


@pytest.mark.parametrize("kind, shape, mask, message", INPUT_ERRORS)
def test_input_errors(tiny_models, kind, shape, mask, message):
    model = tiny_models[kind]
    pixel_values = torch.zeros(shape) if shape is not None else None
    grid = (32 // model.config.patch_size) ** 2
    if mask == "float":
        mask = torch.zeros(2, grid)
    elif mask == "two":
        mask = torch.zeros(2, grid, dtype=torch.long)
        mask[0, 0] = 2
    elif mask is not None:
        mask = torch.zeros(mask, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        model(pixel_values, bool_masked_pos=mask)


def test_integer_masks_are_accepted(tiny_models):
    model = tiny_models["vit"]
    pixel_values, bool_masked_pos = make_inputs(model.config)
    with torch.no_grad():
        as_bool = model(pixel_values, bool_masked_pos=bool_masked_pos)
        as_long = model(pixel_values, bool_masked_pos=bool_masked_pos.long())
    assert torch.equal(as_bool.loss, as_long.loss)


@kinds
def test_return_dict_false_gives_the_output_fields_as_a_tuple(kind):

    model = make_model(kind).eval()
    pixel_values, bool_masked_pos = make_inputs(model.config)
    with torch.no_grad():
        output = model(pixel_values, bool_masked_pos=bool_masked_pos, output_hidden_states=True)
        loss, reconstruction, hidden_states = model(pixel_values, bool_masked_pos=bool_masked_pos,
                                                    output_hidden_states=True, return_dict=False)
        features = model.simmim(pixel_values, return_dict=False)
    torch.testing.assert_close(loss, output.loss)
    torch.testing.assert_close(reconstruction, output.reconstruction)
    assert len(hidden_states) == len(output.hidden_states)
    # SimMIMModel: (last_hidden_state, pooler_output, feature_map) without the optional fields
    assert len(features) == 3 and features[2].dim() == 4

    classifier = SimMIMForImageClassification(SimMIMConfig.from_preset(PRESETS[kind], num_labels=3,
                                                                       return_dict=False)).eval()
    with torch.no_grad():
        loss, logits = classifier(pixel_values, labels=torch.tensor([0, 2]))
    assert logits.shape == (2, 3) and loss.dim() == 0
