"""Flags both scripts share mean the same thing: config overrides in transformers' syntax with lists,
fractional lr milestones, --gradient_checkpointing and --max_train_steps in fine-tuning too."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from simmim_hf import SimMIMConfig
from simmim_hf.configuration_simmim import parse_config_overrides
from simmim_hf.optimization import parse_milestones

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretraining():
    return _load("run_pretraining")


@pytest.fixture(scope="module")
def finetune():
    return _load("run_finetune")


def test_override_syntax_takes_lists_and_recomputes_derived_fields():
    config = SimMIMConfig.from_preset("swin-nano-w4-32")
    assert parse_config_overrides("depths=[2,2,6],num_heads=[2,4,8],drop_path_rate=0.1,hidden_act=gelu", config) == {
        "depths": [2, 2, 6], "num_heads": [2, 4, 8], "drop_path_rate": 0.1, "hidden_act": "gelu"}
    wider = config.with_overrides("embed_dim=32,depths=[2,2,6]")
    assert wider.depths == [2, 2, 6] and wider.hidden_size == 128 and wider.encoder_stride == config.encoder_stride
    config.update_from_string("patch_norm=false,mask_ratio=0.5")
    assert config.patch_norm is False and config.mask_ratio == 0.5
    with pytest.raises(ValueError, match="key=value"):
        parse_config_overrides("depths")
    with pytest.raises(ValueError, match="nope"):
        config.with_overrides("nope=1")
    with pytest.raises(ValueError, match="embed_dim"):
        config.with_overrides("embed_dim=abc")


def test_pretraining_config_overrides_with_a_list(pretraining, tmp_path):
    args = pretraining.parse_args(["--preset", "swin-nano-w4-32", "--output_dir", str(tmp_path),
                                   "--config_overrides", "depths=[2,2,4],drop_path_rate=0.2"])
    model, processor, source = pretraining.build_model_and_processor(args)
    assert model.config.depths == [2, 2, 4] and model.config.drop_path_rate == 0.2
    assert len(model.simmim.encoder.stages[2].blocks) == 4 and "depths=[2,2,4]" in source


def test_milestones_are_epochs_with_fractions_in_both_scripts(pretraining, finetune, tmp_path):
    assert parse_milestones("1.5,3", steps_per_epoch=10) == [15, 30]
    for script, base in ((pretraining, ["--preset", "vit-nano-p4-32"]), (finetune, ["--preset", "vit-nano-p4-32"])):
        script.parse_args([*base, "--output_dir", str(tmp_path), "--lr_milestones", "1.5"])
        with pytest.raises(SystemExit):
            script.parse_args([*base, "--output_dir", str(tmp_path), "--lr_milestones", "one"])


def test_finetune_takes_max_train_steps_milestones_overrides_and_checkpointing(finetune, tmp_path, monkeypatch):
    enabled = []
    from simmim_hf import SimMIMForImageClassification

    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        if hasattr(SimMIMForImageClassification, name):
            original = getattr(SimMIMForImageClassification, name)

            def spy(self, *args, _original=original, **kwargs):
                enabled.append(True)
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(SimMIMForImageClassification, name, spy)
            break
    results, model = finetune.run([
        "--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path / "o"), "--max_train_samples", "48",
        "--max_eval_samples", "32", "--per_device_train_batch_size", "16", "--max_train_steps", "4",
        "--warmup_epochs", "0.3", "--lr_scheduler_type", "multistep", "--lr_milestones", "0.7",
        "--config_overrides", "hidden_dropout_prob=0.1", "--gradient_checkpointing", "--learning_rate", "1e-3"])
    assert enabled and model.config.hidden_dropout_prob == 0.1
    # 3 steps per epoch: 4 steps end inside epoch 1, which is evaluated as the last one.
    assert [r["epoch"] for r in results["history"]] == [0, 1] and results["epochs"] == 2
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "o" / "checkpoints").glob("checkpoint-*"))
    assert steps[-1] == 4
