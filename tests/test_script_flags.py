"""Flags both jobs share mean the same thing (one dataclass per group, `simmim_hf.arguments`): config overrides
in transformers' syntax with lists, fractional lr milestones, --gradient_checkpointing and --max_train_steps in
fine-tuning too; the learning-rate arithmetic is one definition (`LearningRatePlan`)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
from jobs import finetune as run_finetune_job

from simmim_hf import SimMIMConfig
from simmim_hf.arguments import (
    DataArguments,
    FinetuningArguments,
    ModelArguments,
    OptimizationArguments,
    OutputArguments,
    PretrainingArguments,
    parse_args,
)
from simmim_hf.configuration_simmim import parse_config_overrides
from simmim_hf.optimization import LearningRatePlan, parse_milestones


@pytest.fixture(scope="module")
def pretraining():
    from simmim_hf import run_pretraining

    return SimpleNamespace(parse_args=lambda argv: parse_args(PretrainingArguments, argv),
                           build_model_and_processor=run_pretraining.build_model_and_processor)


@pytest.fixture(scope="module")
def finetune():
    return SimpleNamespace(parse_args=lambda argv: parse_args(FinetuningArguments, argv), run=run_finetune_job)


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
        script.parse_args([*base, "--output_dir", str(tmp_path), "--lr_milestones", "1.5", "--lr_scheduler_type",
                           "multistep"])
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


def test_shared_flags_have_one_definition_and_the_same_defaults():
    shared = [ModelArguments, DataArguments, OptimizationArguments, OutputArguments]
    recipe = {"base_learning_rate", "warmup_lr", "min_lr", "warmup_epochs", "validation_split_percentage"}
    pre = {f.name: f for f in dataclasses.fields(PretrainingArguments)}
    fine = {f.name: f for f in dataclasses.fields(FinetuningArguments)}
    for group in shared:
        for field in dataclasses.fields(group):
            assert field.name in pre and field.name in fine, field.name
            if field.name not in recipe:
                assert pre[field.name].default == fine[field.name].default, field.name
                assert pre[field.name].metadata["help"] == fine[field.name].metadata["help"], field.name
    # Where the paper's recipes differ, only the default does.
    assert (pre["base_learning_rate"].default, fine["base_learning_rate"].default) == (2e-4, 1.25e-3)
    assert (pre["warmup_epochs"].default, fine["warmup_epochs"].default) == (10.0, 20.0)


@pytest.mark.parametrize("argv, message", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1; got 0"),
    (["--lr_scheduler_type", "multistep"], "--lr_milestones"),
    # Without multistep the milestones were silently ignored (a cosine schedule, the 800-epoch recipe lost).
    (["--lr_milestones", "700"], "--lr_milestones (700) only applies to --lr_scheduler_type multistep; got 'cosine'"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0; got -1.0"),
    (["--dataset_name", "a/b", "--train_dir", "x"], "exclusive"),
    (["--validation_dir", "v"], "--validation_dir 'v' goes with --train_dir"),  # else silently no evaluation
    (["--hub_model_id", "u/r"], "only used with --push_to_hub"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
])
def test_bad_shared_flags_are_refused_by_name_in_both_jobs(argv, message, tmp_path, capsys):
    for arguments in (PretrainingArguments, FinetuningArguments):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(arguments, ["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unknown_flags_and_a_missing_output_dir_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(PretrainingArguments, ["--output_dir", str(tmp_path), "--debug_sigterm_at_step", "3"])
    assert "unrecognized arguments: --debug_sigterm_at_step" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(FinetuningArguments, ["--preset", "vit-nano-p4-32"])
    assert "--output_dir" in capsys.readouterr().err


def test_learning_rate_plan_scales_and_keeps_warmup_and_final_ratios(tmp_path):
    args = parse_args(PretrainingArguments, ["--output_dir", str(tmp_path), "--per_device_train_batch_size", "32",
                                             "--gradient_accumulation_steps", "2", "--warmup_epochs", "1.5",
                                             "--num_train_epochs", "4", "--lr_milestones", "2.5",
                                             "--lr_scheduler_type", "multistep"])
    plan = LearningRatePlan.from_args(args, num_processes=4, batches_per_epoch=21)
    assert plan.total_batch_size == 256 and plan.steps_per_epoch == 11  # ceil(21 / 2): the last step is partial
    assert plan.peak_lr == pytest.approx(2e-4 * 256 / 512)  # the official 100-epoch recipe, per 512 images
    assert (plan.warmup_lr, plan.min_lr) == (pytest.approx(1e-6 * 0.5), pytest.approx(1e-5 * 0.5))
    assert (plan.max_train_steps, plan.warmup_steps, plan.milestones, plan.num_epochs) == (44, 16, (27,), 4)
    given = LearningRatePlan.from_args(dataclasses.replace(args, learning_rate=1e-3), 4, 21)
    assert given.peak_lr == 1e-3 and given.min_lr == pytest.approx(1e-5 * 5)  # the same ratio to the peak
    stream = LearningRatePlan.from_args(dataclasses.replace(args, max_train_steps=7, warmup_steps=100), 4, None)
    assert (stream.steps_per_epoch, stream.num_epochs, stream.max_train_steps, stream.warmup_steps) == (None, None, 7, 7)
    # Without --warmup_steps a stream warms up for the recipe's share of the run (1.5 of 4 epochs), not for 0 steps.
    stream = LearningRatePlan.from_args(dataclasses.replace(args, max_train_steps=1000), 4, None)
    assert stream.warmup_steps == 375
    with pytest.raises(ValueError, match="max_train_steps"):
        LearningRatePlan.from_args(args, 4, None)


@pytest.mark.parametrize("command, target, flag", [
    ("simmim-pretrain", "simmim_hf.run_pretraining:main", "--sample_data_repeats"),
    ("simmim-finetune", "simmim_hf.run_finetune:main", "--linear_probe"),
    ("simmim-convert", "simmim_hf.convert:main", "--source"),
])
def test_console_entry_points_are_installed_with_the_package(command, target, flag):
    """`pip install simmim_hf` provides the three commands (setup.py entry points), usable without the repo."""
    import shutil
    import subprocess
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == command]
    assert entry.value == target
    executable = shutil.which(command)
    if executable is not None:  # on PATH where the package is installed into the running environment
        result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and flag in result.stdout, result.stderr[-2000:]


def test_derived_fields_are_computed_not_stored(tmp_path):
    """config.json holds no derived value (`encoder_stride`, Swin `hidden_size`), so editing a saved config cannot
    leave a stale one that loading would reject; an explicit conflicting value is still an error naming it."""
    config = SimMIMConfig.from_preset("swin-nano-w4-32")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "encoder_stride" not in saved and "hidden_size" not in saved
    saved["embed_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(saved))
    edited = SimMIMConfig.from_pretrained(tmp_path)
    assert (edited.hidden_size, edited.encoder_stride) == (128, config.encoder_stride)
    assert "hidden_size" in SimMIMConfig.from_preset("vit-nano-p4-32").to_dict()  # a real field for ViT
    with pytest.raises(ValueError, match="hidden_size"):
        SimMIMConfig(**{**saved, "hidden_size": 64})


def test_component_flags_set_the_objective_and_are_refused_on_a_pretrained_model(pretraining, tmp_path):
    from simmim_hf import SimMIMForMaskedImageModeling

    args = pretraining.parse_args(["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path), "--head_type", "mlp",
                                   "--loss_type", "smooth_l1", "--smooth_l1_beta", "0.5", "--loss_area", "all",
                                   "--mask_ratio", "0.4", "--mask_strategy", "block", "--norm_target_patch_size", "5"])
    model, processor, source = pretraining.build_model_and_processor(args)
    config = model.config
    assert (config.head_type, config.loss_type, config.smooth_l1_beta, config.loss_area, config.mask_ratio,
            config.norm_target_patch_size) == ("mlp", "smooth_l1", 0.5, "all", 0.4, 5)
    assert processor.mask_strategy == "block" and processor.mask_ratio == 0.4 and "head_type=mlp" in source
    with pytest.raises(SystemExit):
        pretraining.parse_args(["--output_dir", str(tmp_path), "--loss_type", "l3"])
    bad = pretraining.parse_args(["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path),
                                  "--norm_target_patch_size", "4"])
    with pytest.raises(ValueError, match="--norm_target_patch_size.*norm_target_patch_size"):
        pretraining.build_model_and_processor(bad)
    SimMIMForMaskedImageModeling(config).save_pretrained(tmp_path / "m")
    again = pretraining.parse_args(["--model_name_or_path", str(tmp_path / "m"), "--output_dir", str(tmp_path / "o"),
                                    "--loss_type", "l2"])
    with pytest.raises(ValueError, match="--loss_type cannot change a pretrained model"):
        pretraining.build_model_and_processor(again)


def test_a_named_tracker_must_exist_and_be_installed(monkeypatch, tmp_path):
    """Accelerate only warns about a tracker that is not installed and then trains without any logs."""
    import accelerate.utils

    from simmim_hf.engine import check_trackers

    with pytest.raises(ValueError, match="--report_to: unknown tracker 'tensorbord'"):
        check_trackers(["tensorbord"])
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ValueError, match="--report_to wandb: the 'wandb' package is not installed"):
        check_trackers(["wandb"])
    check_trackers(None), check_trackers("all")  # nothing named, nothing to check
    # The default: tensorboard where installed, else no tracker (and a warning), never an error.
    args = parse_args(PretrainingArguments, ["--output_dir", str(tmp_path)])
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    assert args.report_to is None and args.trackers() is None
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    assert args.trackers() == ["tensorboard"]


def test_the_embedded_digits_hold_out_validation_split_percentage_and_have_no_named_splits(tmp_path, capsys):
    from simmim_hf.data import load_classification_data

    args = parse_args(FinetuningArguments, ["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path),
                                            "--validation_split_percentage", "50"])
    train, evaluation, names, description = load_classification_data(args, 8)
    assert len(names) == 10 and abs(len(train) - len(evaluation)) <= 1 and "50/50" in description
    for flag in (["--validation_split", "test"], ["--train_split", "validation"]):
        for arguments in (PretrainingArguments, FinetuningArguments):
            with pytest.raises(SystemExit):
                parse_args(arguments, ["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path), *flag])
            assert "the embedded data has none" in capsys.readouterr().err
