"""Export to transformers' own classes (`simmim_hf.export`): outputs equal to simmim_hf's for all four encoder kinds,
round trips back to identical weights, loading without remote code (and without simmim_hf), refusals of what
cannot be represented, and the point of it: exported backbones inside transformers' segmentation models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_without_simmim_hf
from transformers import (
    AutoModel,
    BeitForSemanticSegmentation,
    SwinBackbone,
    SwinConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from simmim_hf import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMModel
from simmim_hf.convert import convert_transformers_checkpoint
from simmim_hf.export import export_model, main, plan_export

TOLERANCE = 1e-5
PLAIN_VIT = dict(use_absolute_position_embeddings=True, use_shared_relative_position_bias=False, use_key_bias=True,
                 layer_scale_init_value=0.0, pooling="cls", layer_norm_eps=1e-12)
KINDS = {  # name -> (preset, overrides, the transformers family it exports to)
    "swinv2": ("swinv2-nano-w4-32", {}, "Swinv2"),
    "swin": ("swin-nano-w4-32", {}, "Swin"),
    "vit": ("vit-nano-p4-32", PLAIN_VIT, "ViT"),
    "beit": ("vit-nano-p4-32", {}, "Beit"),  # the paper's ViT: shared relative bias, LayerScale, q/v biases
    "beit-finetune": ("vit-nano-p4-32", dict(use_shared_relative_position_bias=False, use_relative_position_bias=True,
                                             use_fc_norm=True), "Beit"),
}


def make(kind: str, cls=SimMIMForMaskedImageModeling, **extra):
    preset, overrides, _ = KINDS[kind]
    torch.manual_seed(0)
    model = cls(SimMIMConfig.from_preset(preset, **{**overrides, **extra}))
    with torch.no_grad():  # zero-initialised biases, tables and post-norms would hide mapping mistakes
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def inputs(config):
    generator = torch.Generator().manual_seed(1)
    grid = config.image_size // config.patch_size
    return (torch.randn(2, 3, config.image_size, config.image_size, generator=generator),
            torch.rand(2, grid * grid, generator=generator) < 0.5)


def max_difference(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", list(KINDS))
def test_pretraining_model_exports_exactly(kind):
    ours = make(kind)
    theirs = export_model(ours)
    assert type(theirs).__name__.startswith(KINDS[kind][2])
    pixel_values, bool_masked_pos = inputs(ours.config)
    with torch.no_grad():
        if kind.startswith("beit"):  # BEiT's own MIM head predicts VQ-VAE tokens: the encoder is exported
            expected = ours.simmim(pixel_values, bool_masked_pos=bool_masked_pos, output_hidden_states=True)
            actual = theirs(pixel_values, bool_masked_pos=bool_masked_pos, output_hidden_states=True)
            assert len(actual.hidden_states) == len(expected.hidden_states)
            for mine, other in zip(expected.hidden_states, actual.hidden_states):
                assert max_difference(mine, other) <= TOLERANCE
            assert max_difference(expected.last_hidden_state, actual.last_hidden_state) <= TOLERANCE
        else:
            expected = ours(pixel_values, bool_masked_pos=bool_masked_pos)
            actual = theirs(pixel_values, bool_masked_pos=bool_masked_pos)
            assert max_difference(expected.reconstruction, actual.reconstruction) <= TOLERANCE
            assert abs(expected.loss.item() - actual.loss.item()) <= TOLERANCE


@pytest.mark.parametrize("kind", ["swinv2", "swin", "vit", "beit-finetune"])
def test_classifier_and_encoder_export_exactly(kind):
    classifier = make(kind, SimMIMForImageClassification, num_labels=3)
    encoder = make(kind, SimMIMModel)
    pixel_values, _ = inputs(encoder.config)
    with torch.no_grad():
        logits = classifier(pixel_values).logits
        assert max_difference(logits, export_model(classifier)(pixel_values).logits) <= TOLERANCE
        expected, actual = encoder(pixel_values), export_model(encoder)(pixel_values)
    assert max_difference(expected.last_hidden_state, actual.last_hidden_state) <= TOLERANCE
    if kind != "vit":  # a bare transformers ViT pools with its own tanh layer, not part of SimMIM
        assert max_difference(expected.pooler_output, actual.pooler_output) <= TOLERANCE


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["swinv2", "swin", "vit"])
def test_round_trip_through_the_converter_returns_identical_weights(kind):
    ours = make(kind)
    back = convert_transformers_checkpoint(export_model(ours))
    mine, returned = ours.state_dict(), back.state_dict()
    assert mine.keys() == returned.keys()
    for name, tensor in mine.items():
        assert torch.equal(tensor, returned[name]), name


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_of_the_tensor_mapping_is_the_identity(kind):
    for cls, extra in ((SimMIMForMaskedImageModeling, {}), (SimMIMForImageClassification, dict(num_labels=3))):
        if kind == "beit" and cls is SimMIMForImageClassification:
            continue  # refused (see test_refusals)
        ours = make(kind, cls, **extra)
        head = "mim" if cls is SimMIMForMaskedImageModeling else "classification"
        plan = plan_export(ours.config, head)
        mine = ours.state_dict()
        back = plan.import_state_dict(export_model(ours).state_dict(), set(mine))
        assert set(back) == set(mine) - set(plan.dropped)
        for name, tensor in back.items():
            assert torch.equal(tensor, mine[name]), name


# ---------------------------------------------------------------------------------------------- CLI, no remote code
def test_cli_folders_load_without_remote_code_or_simmim_hf(tmp_path):
    expected = {}
    for kind in ("swinv2", "swin", "vit", "beit"):
        model = make(kind)
        model.save_pretrained(tmp_path / f"simmim_{kind}")
        main(["--checkpoint", str(tmp_path / f"simmim_{kind}"), "--output", str(tmp_path / kind)])
        config = json.loads((tmp_path / kind / "config.json").read_text())
        assert "auto_map" not in config and config["model_type"] == KINDS[kind][2].lower()
        assert not list((tmp_path / kind).glob("*.py"))
        pixel_values, _ = inputs(model.config)
        with torch.no_grad():
            expected[kind] = model.simmim(pixel_values).last_hidden_state
        torch.save({"pixel_values": pixel_values, "features": expected[kind]}, tmp_path / f"{kind}.pt")
        loaded = AutoModel.from_pretrained(tmp_path / kind).eval()
        with torch.no_grad():
            assert max_difference(loaded(pixel_values).last_hidden_state, expected[kind]) <= TOLERANCE
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_without_simmim_hf(f"""
        import torch
        from transformers import AutoModel
        for kind in ("swinv2", "swin", "vit", "beit"):
            data = torch.load({str(tmp_path)!r} + f"/{{kind}}.pt")
            model = AutoModel.from_pretrained({str(tmp_path)!r} + f"/{{kind}}").eval()
            assert type(model).__module__.startswith("transformers."), type(model).__module__
            with torch.no_grad():
                features = model(data["pixel_values"]).last_hidden_state
            assert (features - data["features"]).abs().max() <= 1e-5, kind
    """, cwd=elsewhere)


def test_the_exported_folder_has_a_transformers_processor_doing_our_evaluation_transform(tmp_path):
    """AutoImageProcessor and pipelines need one: without it the exported classifier did not run in
    `pipeline("image-classification")`."""
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    from simmim_hf import SimMIMImageProcessor
    from simmim_hf.image_processing_simmim import eval_resize_shape

    model = make("swin", SimMIMForImageClassification, num_labels=3)
    processor = SimMIMImageProcessor.from_config(model.config)
    model.save_pretrained(tmp_path / "ours")
    processor.save_pretrained(tmp_path / "ours")
    main(["--checkpoint", str(tmp_path / "ours"), "--output", str(tmp_path / "exported")])
    exported = AutoImageProcessor.from_pretrained(tmp_path / "exported")
    assert type(exported).__module__.startswith("transformers.")
    rng = np.random.default_rng(0)
    size = model.config.image_size
    # Landscape and portrait, smaller and larger than the model, with crop margins of even width (an odd one
    # shifts transformers' crop by a pixel: it floors the offset, torchvision's CenterCrop rounds it).
    for shape in ((size + 10, 2 * size + 20), (3 * size, size + 6), (size // 2, size)):
        resized = eval_resize_shape(*shape, (size, size), processor.crop_pct)
        assert all((side - size) % 2 == 0 for side in resized), (shape, resized)
        image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
        ours = processor(image, return_tensors="pt", do_train=False)["pixel_values"]
        theirs = exported(image, return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= 1e-5, shape
    predictions = pipeline("image-classification", model=str(tmp_path / "exported"))(image)
    assert len(predictions) == 3 and abs(sum(p["score"] for p in predictions) - 1) < 1e-4
    # The checkpoint folder itself, or any non-empty folder, is never written into by accident.
    with pytest.raises(ValueError, match="is the checkpoint folder itself"):
        main(["--checkpoint", str(tmp_path / "ours"), "--output", str(tmp_path / "ours"), "--overwrite"])
    with pytest.raises(ValueError, match="exists and is not empty"):
        main(["--checkpoint", str(tmp_path / "ours"), "--output", str(tmp_path / "exported")])
    main(["--checkpoint", str(tmp_path / "ours"), "--output", str(tmp_path / "exported"), "--overwrite"])
    # A one-channel model saved without a processor exports without one (no RGB processor fits it).
    make("vit", num_channels=1).save_pretrained(tmp_path / "grey")
    main(["--checkpoint", str(tmp_path / "grey"), "--output", str(tmp_path / "grey-exported")])
    assert (tmp_path / "grey-exported" / "config.json").is_file()
    assert not (tmp_path / "grey-exported" / "preprocessor_config.json").exists()


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kind, cls, overrides, message", [
    ("beit", SimMIMForImageClassification, dict(num_labels=3), "pooling='mean' and use_fc_norm=False"),
    ("vit", SimMIMForImageClassification, dict(num_labels=3, pooling="mean"), "pooling='mean'"),
    ("swin", SimMIMForMaskedImageModeling, dict(layer_norm_eps=1e-6), "layer_norm_eps"),
    # The paper's Swin-L (window 12 at 192 px) has a last stage of 6x6 tokens; transformers' tables are all 12x12.
    ("swin", SimMIMForMaskedImageModeling, dict(window_size=8), r"window_size=8 with stage windows \[8, 8, 4\]"),
    ("swinv2", SimMIMForMaskedImageModeling, dict(use_absolute_position_embeddings=True), "absolute position"),
    ("swinv2", SimMIMForMaskedImageModeling, dict(head_type="mlp"), "head_type='mlp'"),
])
def test_refusals(kind, cls, overrides, message):
    with pytest.raises(ValueError, match=message):
        export_model(make(kind, cls, **overrides))


# ---------------------------------------------------------------------------------------------- downstream
def test_exported_swin_is_an_upernet_backbone(tmp_path):
    """A SimMIM-pretrained Swin, exported, feeds transformers' UperNet: its stage features are simmim_hf's stage
    outputs (through the backbone's own fresh LayerNorms), and a segmentation step trains it. At 64 px every stage is
    larger than the window: transformers' SwinBackbone shifts windows even in a stage no larger than the window
    (`always_partition`), unlike SwinModel and simmim_hf, so such a stage would differ by design."""
    ours = make("swin", image_size=64)
    export_model(ours).save_pretrained(tmp_path / "swin")
    stages = ["stage1", "stage2", "stage3"]
    backbone = SwinBackbone.from_pretrained(tmp_path / "swin", out_features=stages).eval()
    pixel_values, _ = inputs(ours.config)
    with torch.no_grad():
        hidden = ours.simmim(pixel_values, output_hidden_states=True).hidden_states[1:]
        maps = backbone(pixel_values).feature_maps
    for ours_stage, feature_map in zip(hidden, maps):
        b, c, h, w = feature_map.shape
        normed = F.layer_norm(ours_stage, (c,), eps=1e-5).transpose(1, 2).reshape(b, c, h, w)
        assert max_difference(normed, feature_map) <= TOLERANCE

    backbone_config = SwinConfig.from_pretrained(tmp_path / "swin", out_features=stages)
    config = UperNetConfig(backbone_config=backbone_config, num_labels=3, hidden_size=32, auxiliary_channels=16,
                           auxiliary_in_channels=backbone.channels[2])  # its auxiliary head reads the third map
    segmenter = UperNetForSemanticSegmentation(config)
    segmenter.backbone.load_state_dict(backbone.state_dict())
    segmenter.train()
    labels = torch.randint(0, 3, (2, 64, 64))
    output = segmenter(pixel_values, labels=labels)
    assert output.logits.shape == (2, 3, 64, 64) and torch.isfinite(output.loss)
    output.loss.backward()
    patch_grad = segmenter.backbone.swin.embeddings.patch_embeddings.projection.weight.grad
    assert patch_grad is not None and patch_grad.abs().sum() > 0


def test_exported_paper_vit_is_a_beit_segmentation_backbone(tmp_path):
    ours = make("beit", SimMIMModel, num_hidden_layers=4)
    export_model(ours).save_pretrained(tmp_path / "beit")
    segmenter = BeitForSemanticSegmentation.from_pretrained(tmp_path / "beit", num_labels=3, out_indices=[1, 2, 3, 4])
    pixel_values, _ = inputs(ours.config)
    with torch.no_grad():  # the encoder inside the segmenter is the exported one
        expected = ours(pixel_values, output_hidden_states=True).hidden_states
        actual = segmenter.eval().beit(pixel_values, output_hidden_states=True).hidden_states
    for mine, other in zip(expected, actual):
        assert max_difference(mine, other) <= TOLERANCE
    segmenter.train()
    output = segmenter(pixel_values, labels=torch.randint(0, 3, (2, 32, 32)))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert segmenter.beit.layers[0].attention.q_proj.weight.grad.abs().sum() > 0
