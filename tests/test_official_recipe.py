"""The official SimMIM initialisation and fine-tuning layout (microsoft/SimMIM `models/`), checked by
statistics and by structure:

* pretraining ViT (`VisionTransformerForSimMIM`): every truncated-normal draw is cut at +-1 std (its
  `_trunc_normal_` override, `a=-std, b=std`): linear layers, the patch-projection conv (zero bias), CLS and
  mask tokens; then block l's `attn.proj` / `mlp.fc2` are divided by sqrt(2l);
* classification ViT (`VisionTransformer`): timm's default bounds (+-2, i.e. untruncated at std 0.02), the
  patch conv drawn the same way, classifier x `init_scale` 1e-3, and with mean pooling no final norm but a
  LayerNorm on the pooled patch tokens (`fc_norm`);
* Swin: PyTorch's default conv init for the patch projection, classifier at std 0.02, final norm -> mean.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from simmim_hf import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMModel

STD = 0.02
# std of a standard normal truncated at +-1: sqrt(1 - 2 phi(1) / (2 Phi(1) - 1))
ONE_STD_TRUNCATED = math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))


def vit_config(**overrides) -> SimMIMConfig:
    # Wide enough that per-tensor statistics are tight.
    return SimMIMConfig.from_preset("vit-nano-p4-32", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                    **overrides)


def assert_truncated(weight: torch.Tensor, bound: float, std: float, name: str) -> None:
    assert weight.abs().max().item() <= bound + 1e-7, f"{name}: |w| reaches {weight.abs().max().item()} > {bound}"
    assert abs(weight.std().item() - std) < 0.08 * std, f"{name}: std {weight.std().item():.5f}, expected {std:.5f}"


def test_pretraining_vit_draws_every_weight_within_one_std():
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(vit_config())
    encoder = model.simmim
    trunc_std = STD * ONE_STD_TRUNCATED
    assert_truncated(encoder.embeddings.projection.weight, STD, trunc_std, "patch projection")
    assert torch.all(encoder.embeddings.projection.bias == 0)
    for name in ("cls_token", "mask_token"):
        token = getattr(encoder.embeddings, name)
        assert token.abs().max().item() <= STD and token.abs().max().item() > 0.5 * STD, name
    for index, layer in enumerate(encoder.encoder.layers):
        scale = 1 / math.sqrt(2 * (index + 1))
        assert_truncated(layer.attention.qkv.weight, STD, trunc_std, f"block {index} qkv")
        assert_truncated(layer.mlp.fc1.weight, STD, trunc_std, f"block {index} fc1")
        for part, weight in (("proj", layer.attention.proj.weight), ("fc2", layer.mlp.fc2.weight)):
            assert_truncated(weight, STD * scale, trunc_std * scale, f"block {index} {part}")
        assert torch.all(layer.lambda_1 == 0.1) and torch.all(layer.lambda_2 == 0.1)
    # The SimMIM head keeps PyTorch's default conv init, as the official code (built after the encoder's init).
    head = model.decoder[0]
    bound = 1 / math.sqrt(head.weight[0].numel())
    assert head.weight.abs().max().item() <= bound and head.weight.abs().max().item() > 0.9 * bound
    assert head.weight.std().item() > 3 * STD * ONE_STD_TRUNCATED  # not drawn like the encoder


def test_classification_vit_uses_timm_default_bounds_and_a_tiny_head():
    torch.manual_seed(0)
    config = vit_config(num_labels=10, use_fc_norm=True)
    model = SimMIMForImageClassification(config)
    encoder = model.simmim
    for name, weight in (("patch projection", encoder.embeddings.projection.weight),
                         ("qkv", encoder.encoder.layers[0].attention.qkv.weight)):
        # Untruncated normal(0, 0.02): values past 1 std occur, and the std is the full 0.02.
        assert weight.abs().max().item() > 2 * STD, name
        assert abs(weight.std().item() - STD) < 0.08 * STD, name
    assert torch.all(encoder.embeddings.projection.bias == 0)
    # trunc_normal(0.02) x 1e-3, bias zero.
    assert abs(model.classifier.weight.std().item() - STD * 1e-3) < 0.1 * STD * 1e-3
    assert torch.all(model.classifier.bias == 0)


def test_swin_keeps_default_conv_init_and_a_plain_classifier():
    torch.manual_seed(0)
    model = SimMIMForImageClassification(SimMIMConfig.from_preset("swin-nano-w4-32", embed_dim=64, num_labels=64))
    projection = model.simmim.embeddings.projection.weight
    bound = 1 / math.sqrt(projection[0].numel())
    assert projection.abs().max().item() <= bound and projection.abs().max().item() > 0.9 * bound
    assert abs(model.classifier.weight.std().item() - STD) < 0.1 * STD
    assert model.simmim.layernorm is not None and model.simmim.pooler is None


def test_fc_norm_layout_has_no_final_norm_and_normalises_the_pooled_tokens():
    torch.manual_seed(0)
    config = vit_config(num_labels=5, use_fc_norm=True)
    model = SimMIMForImageClassification(config).eval()
    assert model.simmim.layernorm is None
    norms = [name for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)
             and "layers." not in name]
    assert norms == ["simmim.pooler.layernorm"]  # one norm after the blocks, and no second `fc_norm`
    with torch.no_grad():
        model.simmim.pooler.layernorm.weight.uniform_(0.5, 1.5)
        model.simmim.pooler.layernorm.bias.normal_()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.simmim(pixel_values, output_hidden_states=True)
        logits = model(pixel_values).logits
    last_block = out.hidden_states[-1]
    torch.testing.assert_close(out.last_hidden_state, last_block)  # no final norm on the tokens
    expected = model.simmim.pooler.layernorm(last_block[:, 1:].mean(dim=1))
    torch.testing.assert_close(out.pooler_output, expected)
    torch.testing.assert_close(logits, model.classifier(expected))


@pytest.mark.parametrize("use_fc_norm", [False, True])
def test_fine_tuning_from_a_pretraining_checkpoint(tmp_path, use_fc_norm):
    """The pretrained final norm is kept (default layout) or dropped on purpose (official layout: the
    checkpoint's `layernorm` is not reported as a problem, `pooler.layernorm` starts fresh)."""
    torch.manual_seed(0)
    pretrained = SimMIMForMaskedImageModeling(vit_config())
    with torch.no_grad():
        pretrained.simmim.layernorm.weight.fill_(2.0)
    pretrained.save_pretrained(tmp_path)
    model, info = SimMIMForImageClassification.from_pretrained(tmp_path, num_labels=3, use_fc_norm=use_fc_norm,
                                                               output_loading_info=True)
    torch.testing.assert_close(model.simmim.encoder.layers[0].mlp.fc1.weight,
                               pretrained.simmim.encoder.layers[0].mlp.fc1.weight)
    assert info["unexpected_keys"] == [] or all(k.startswith(("decoder.", "simmim.layernorm."))
                                                for k in info["unexpected_keys"])
    if use_fc_norm:
        assert model.simmim.layernorm is None
        assert torch.all(model.simmim.pooler.layernorm.weight == 1)
        assert sorted(info["missing_keys"]) == sorted(["classifier.weight", "classifier.bias",
                                                       "simmim.pooler.layernorm.weight",
                                                       "simmim.pooler.layernorm.bias"])
    else:
        assert torch.all(model.simmim.layernorm.weight == 2.0)
    # A fine-tuned classifier reloads as a bare encoder with the same features (AutoModel, feature pipelines).
    model.save_pretrained(tmp_path / "ft")
    encoder = SimMIMModel.from_pretrained(tmp_path / "ft").eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values).pooler_output, model.eval().simmim(pixel_values).pooler_output)


def test_use_fc_norm_is_validated():
    with pytest.raises(ValueError, match="use_fc_norm"):
        SimMIMConfig.from_preset("vit-nano-p4-32", use_fc_norm=True, pooling="cls")
    with pytest.raises(ValueError, match="use_fc_norm"):
        SimMIMConfig.from_preset("swin-nano-w4-32", use_fc_norm=True)


def test_loading_does_not_rescale_or_reinitialise(tmp_path):
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(vit_config())
    model.save_pretrained(tmp_path / "mim")
    reloaded = SimMIMForMaskedImageModeling.from_pretrained(tmp_path / "mim")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    classifier = SimMIMForImageClassification(vit_config(num_labels=4, use_fc_norm=True))
    with torch.no_grad():
        classifier.classifier.weight.normal_(std=0.3)
    classifier.save_pretrained(tmp_path / "cls")
    again = SimMIMForImageClassification.from_pretrained(tmp_path / "cls")
    torch.testing.assert_close(again.classifier.weight, classifier.classifier.weight, rtol=0, atol=0)


def test_transformers_init_recipe_matches_transformers_vit_init():
    """`init_recipe="transformers"` (the plain-ViT preset): every linear and conv layer, the SimMIM head
    included, drawn from trunc-normal(0.02) with zero bias, a zero mask token, no residual rescale, no 1e-3
    classifier scale."""
    torch.manual_seed(0)
    plain = dict(use_absolute_position_embeddings=True, use_shared_relative_position_bias=False, use_key_bias=True,
                 layer_scale_init_value=0.0, init_recipe="transformers")
    model = SimMIMForMaskedImageModeling(vit_config(**plain))
    weights = {"head": model.decoder[0].weight, "patch": model.simmim.embeddings.projection.weight,
               **{f"fc2 {i}": layer.mlp.fc2.weight for i, layer in enumerate(model.simmim.encoder.layers)}}
    for name, weight in weights.items():
        assert abs(weight.std().item() - STD) < 0.08 * STD, name
        assert weight.abs().max().item() > 2 * STD, name  # not cut at one std
    assert torch.all(model.decoder[0].bias == 0) and torch.all(model.simmim.embeddings.mask_token == 0)
    classifier = SimMIMForImageClassification(vit_config(**plain, num_labels=64))
    assert abs(classifier.classifier.weight.std().item() - STD) < 0.1 * STD
    assert SimMIMConfig.from_preset("vit-base-p16-224-plain").init_recipe == "transformers"
    with pytest.raises(ValueError, match="init_recipe"):
        vit_config(init_recipe="timm")


@pytest.mark.parametrize("layer_scale", [0.1, 0.0])
def test_residual_rescale_holds_with_and_without_layer_scale(layer_scale):
    """Block l's attention and MLP output projections are drawn 1/sqrt(2l) smaller, also without LayerScale (where
    the block owns no parameters itself and transformers never calls the initialiser on it)."""
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset("vit-micro-p8-64", layer_scale_init_value=layer_scale, hidden_size=256,
                                      num_attention_heads=4)
    encoder = SimMIMForMaskedImageModeling(config).simmim.encoder
    for depth, layer in enumerate(encoder.layers, start=1):
        for linear in (layer.attention.proj, layer.mlp.fc2):
            # +-1 std truncation of N(0, 0.02) leaves std 0.538 x 0.02, then the rescale.
            expected = 0.02 * 0.538 / math.sqrt(2 * depth)
            assert linear.weight.std().item() == pytest.approx(expected, rel=0.05), (depth, linear)
        assert layer.attention.qkv.weight.std().item() == pytest.approx(0.02 * 0.538, rel=0.05)  # not rescaled


@pytest.mark.parametrize("preset, layer_decay, drop_path", [
    ("vit-base-p16-224", 0.65, 0.1), ("swin-base-w6-192", 0.9, 0.1), ("swin-large-w12-192", 0.7, 0.2),
    ("swinv2-base-w12-192", 0.75, 0.1),
])
def test_fine_tuning_defaults_follow_the_official_config_of_the_model_size(preset, layer_decay, drop_path):
    """Unset --layer_decay / --drop_path_rate take the official fine-tuning config's values; Swin-L's recipe (behind
    the paper's 85.4 %) differs from Swin-B's."""
    from simmim_hf.run_finetune import official_finetune_defaults

    assert official_finetune_defaults(SimMIMConfig.from_preset(preset)) == {"layer_decay": layer_decay,
                                                                           "drop_path_rate": drop_path}
