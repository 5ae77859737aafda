"""Saved and Hub processors are inference-safe: `pipeline(...)` over a pretraining or fine-tuning folder gives the
same output for the same image every call (evaluation transform, no mask), through `trust_remote_code` too."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from simmim_hf import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMImageProcessor


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))


def _save(model, folder):
    model.save_pretrained(folder)
    # As the pretraining script saves it: built for training, saved as is.
    SimMIMImageProcessor.from_config(model.config).save_pretrained(folder)


def test_a_saved_processor_loads_in_evaluation_mode(tmp_path, image):
    processor = SimMIMImageProcessor.from_config(SimMIMConfig.from_preset("vit-nano-p4-32"))
    assert processor.do_train  # the pretraining pipeline's default in memory
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert "do_train" not in saved and "return_mask" not in saved
    loaded = SimMIMImageProcessor.from_pretrained(tmp_path)
    first, second = loaded(image, return_tensors="pt"), loaded(image, return_tensors="pt")
    assert set(first) == {"pixel_values"}
    torch.testing.assert_close(first["pixel_values"], second["pixel_values"], rtol=0, atol=0)
    # An older file that still stores do_train=True loads in evaluation mode as well; training is explicit.
    saved["do_train"] = True
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    assert SimMIMImageProcessor.from_pretrained(tmp_path).do_train is False
    assert "bool_masked_pos" in loaded(image, do_train=True, return_tensors="pt")


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_feature_extraction_pipeline_is_deterministic(tmp_path, image, trust_remote_code):
    torch.manual_seed(0)
    _save(SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("vit-nano-p4-32")), tmp_path)
    extractor = pipeline("image-feature-extraction", model=str(tmp_path), trust_remote_code=trust_remote_code)
    first, second = extractor(image, return_tensors=True), extractor(image, return_tensors=True)
    assert first.shape == (1, 1 + 64, 64)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_image_classification_pipeline_is_deterministic(tmp_path, image):
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset("vit-nano-p4-32", num_labels=3, use_fc_norm=True,
                                      id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    model = SimMIMForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.normal_()  # so that the scores differ per image
    _save(model, tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path), trust_remote_code=True)
    first, second = classifier(image), classifier(image)
    assert first == second and {r["label"] for r in first} == {"a", "b", "c"}
