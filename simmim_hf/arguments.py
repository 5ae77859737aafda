"""Command-line arguments of the pretraining and fine-tuning scripts.

Each group is a dataclass defined once and parsed with transformers' `HfArgumentParser`, so a flag both
scripts take means the same thing, has the same default and is validated by the same code. A script's
arguments are the union of the groups (`PretrainingArguments`, `FinetuningArguments`); where the paper's two
recipes differ (learning rate, warmup, schedule end) the script's class changes only the default.

Validation runs when the dataclass is built: a bad value raises a `ValueError` naming the flag, what was
expected and what was given; `parse_args` turns it into the usual argparse usage error (exit status 2).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, TypeVar

from transformers import HfArgumentParser

from .configuration_simmim import HEAD_TYPES, LOSS_AREAS, LOSS_TYPES, PRESETS
from .masking import MASK_STRATEGIES
from .optimization import SCHEDULES, parse_milestones

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _arg(default: Any = None, help: str = "", **extra) -> Any:  # noqa: A002 - argparse's name
    return field(default=default, metadata={"help": help, **extra})


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_positive(args, names: tuple[str, ...], optional: bool = False) -> None:
    for name in names:
        value = getattr(args, name)
        if optional and value is None:
            continue
        _require(value >= 1, f"--{name} must be >= 1{' (or unset)' if optional else ''}; got {value}.")


class _Validated:
    """Cooperative `__post_init__`: every group in a script's class checks its own fields."""

    def __post_init__(self) -> None:
        pass


# ================================================================================================== groups
@dataclass
class ModelArguments(_Validated):
    preset: str | None = _arg(help="Named architecture to train from random init (see `SimMIMConfig.available_presets()`).",
                              choices=sorted(PRESETS))
    model_name_or_path: str | None = _arg(help="SimMIM checkpoint (folder or Hub id) to start from.")
    config_overrides: str | None = _arg(
        help="Config changes in transformers' update_from_string syntax, lists allowed, e.g. "
             "'drop_path_rate=0.1,depths=[2,2,6,2]' (values parsed as JSON when possible).")
    trust_remote_code: bool = _arg(False, "Allow the model code stored with a Hub checkpoint to run.")
    gradient_checkpointing: bool = _arg(False, "Recompute activations in the backward pass (less memory, ~30%% slower).")
    cache_dir: str | None = _arg(help="Cache folder for datasets and models.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.preset is None or self.model_name_or_path is None,
                 f"--preset and --model_name_or_path are exclusive: pass one model source; got {self.preset!r} "
                 f"and {self.model_name_or_path!r}.")


@dataclass
class DataArguments(_Validated):
    dataset_name: str | None = _arg(help="Hub dataset id. Without --dataset_name and --train_dir the embedded data is used.")
    dataset_config_name: str | None = _arg(help="Config name of the Hub dataset.")
    train_split: str = _arg("train", "Split of --dataset_name to train on.")
    validation_split: str | None = _arg(help="Split to evaluate on (default: 'validation' if the dataset has one).")
    train_dir: str | None = _arg(help="Local folder of training images (read by datasets' imagefolder).")
    validation_dir: str | None = _arg(help="Local folder of validation images.")
    validation_split_percentage: float = _arg(
        0.0, "Hold out this percentage of the training set for evaluation when there is no validation split/folder.")
    image_column_name: str | None = _arg(help="Image column (default: 'image', 'img' or the first Image column).")
    max_train_samples: int | None = _arg(help="Truncate the training set (debugging).")
    max_eval_samples: int | None = _arg(help="Truncate the evaluation set (debugging).")
    dataloader_num_workers: int | None = _arg(
        help="DataLoader worker processes per training process; they persist across epochs (default: this "
             "process's share of the CPU cores minus one, at most 8; 0 loads in the training process).")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(not (self.dataset_name and self.train_dir),
                 "--dataset_name and --train_dir are exclusive: pass one source of training images.")
        _require(self.validation_dir is None or self.train_dir is not None,
                 f"--validation_dir {self.validation_dir!r} goes with --train_dir (a local image folder); a Hub "
                 "dataset's evaluation split is --validation_split, and the embedded data holds out "
                 "--validation_split_percentage.")
        _require(0.0 <= self.validation_split_percentage < 100.0,
                 f"--validation_split_percentage must lie in [0, 100); got {self.validation_split_percentage}.")
        has_splits = self.dataset_name is not None or self.train_dir is not None
        _require(has_splits or (self.validation_split is None and self.train_split == "train"),
                 f"--train_split {self.train_split!r} / --validation_split {self.validation_split!r} name splits of "
                 "--dataset_name (or of --train_dir / --validation_dir); the embedded data has none: its held-out "
                 "share is --validation_split_percentage.")
        _require_positive(self, ("max_train_samples", "max_eval_samples"), optional=True)
        _require(self.dataloader_num_workers is None or self.dataloader_num_workers >= 0,
                 f"--dataloader_num_workers must be >= 0; got {self.dataloader_num_workers}.")


@dataclass
class OptimizationArguments(_Validated):
    """Batch, learning-rate schedule (see `optimization.plan_learning_rate`), AdamW, clipping, precision."""

    per_device_train_batch_size: int = _arg(64, "Batch size per process.")
    per_device_eval_batch_size: int = _arg(64, "Evaluation batch size per process.")
    gradient_accumulation_steps: int = _arg(1, "Micro-batches per optimizer step.")
    base_learning_rate: float = _arg(1e-4, "Peak lr for a total batch of 512, scaled linearly with the real total batch.")
    learning_rate: float | None = _arg(help="Absolute peak lr (replaces the scaling; warmup and min lr keep their ratio to it).")
    warmup_lr: float = _arg(5e-7, "Warmup start lr for a total batch of 512 (scaled like the peak lr).")
    min_lr: float = _arg(5e-6, "Final lr of the schedule for a total batch of 512 (scaled like the peak lr).")
    warmup_epochs: float = _arg(10.0, "Linear warmup in epochs (fractions allowed).")
    warmup_steps: int | None = _arg(help="Linear warmup in optimizer steps (replaces --warmup_epochs).")
    lr_scheduler_type: str = _arg("cosine", "Schedule after the warmup.", choices=list(SCHEDULES))
    lr_warmup_prefix: bool | None = _arg(
        help="Cosine: start it after the warmup, over the remaining steps (the official SwinV2 SimMIM code); off, it "
             "spans all steps, warmup included (microsoft/SimMIM's ViT and Swin). Default: on for SwinV2 only.")
    lr_milestones: str | None = _arg(help="multistep: comma-separated epochs (fractions allowed) where the lr is multiplied by --lr_gamma.")
    lr_gamma: float = _arg(0.1, "multistep decay factor.")
    weight_decay: float = _arg(0.05, "AdamW weight decay (none on biases, norms, tokens, position tables, LayerScale).")
    adam_beta1: float = _arg(0.9, "AdamW beta1.")
    adam_beta2: float = _arg(0.999, "AdamW beta2.")
    adam_epsilon: float = _arg(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _arg(5.0, "Gradient clipping norm (0 disables clipping).")
    num_train_epochs: int = _arg(100, "Training epochs.")
    max_train_steps: int | None = _arg(help="Total optimizer steps (replaces --num_train_epochs; the last epoch may be partial).")
    max_consecutive_nonfinite: int = _arg(
        20, "Stop after this many optimizer steps in a row with a non-finite loss/gradient (each is skipped); 0 = never.")
    seed: int = _arg(42, "Seed of the initialisation, shuffling and every random transform.")
    mixed_precision: str | None = _arg(help="Mixed precision (default: the accelerate config's).", choices=["no", "fp16", "bf16"])
    cpu: bool = _arg(False, "Train on the CPU even when an accelerator is present.")
    torch_compile: bool = _arg(False, "Compile the model with torch.compile (through Accelerate's dynamo plugin).")
    torch_compile_backend: str = _arg("inductor", "torch.compile backend with --torch_compile.",
                                      choices=["inductor", "aot_eager", "eager", "cudagraphs"])

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_positive(self, ("per_device_train_batch_size", "per_device_eval_batch_size",
                                 "gradient_accumulation_steps", "num_train_epochs"))
        _require_positive(self, ("max_train_steps",), optional=True)
        _require(self.max_grad_norm >= 0, f"--max_grad_norm must be >= 0; got {self.max_grad_norm}.")
        _require(self.max_consecutive_nonfinite >= 0,
                 f"--max_consecutive_nonfinite must be >= 0; got {self.max_consecutive_nonfinite}.")
        _require(self.warmup_epochs >= 0, f"--warmup_epochs must be >= 0; got {self.warmup_epochs}.")
        _require(self.warmup_steps is None or self.warmup_steps >= 0,
                 f"--warmup_steps must be >= 0 (or unset); got {self.warmup_steps}.")
        for name in ("base_learning_rate", "warmup_lr", "min_lr", "weight_decay"):
            _require(getattr(self, name) >= 0, f"--{name} must be >= 0; got {getattr(self, name)}.")
        _require(self.learning_rate is None or self.learning_rate > 0,
                 f"--learning_rate must be > 0 (or unset); got {self.learning_rate}.")
        _require(self.lr_scheduler_type != "multistep" or bool(self.lr_milestones),
                 "--lr_scheduler_type multistep needs --lr_milestones (epochs), e.g. --lr_milestones 30,60.")
        _require(not self.lr_warmup_prefix or self.lr_scheduler_type == "cosine",
                 f"--lr_warmup_prefix only applies to --lr_scheduler_type cosine; got {self.lr_scheduler_type!r}.")
        _require(not self.lr_milestones or self.lr_scheduler_type == "multistep",
                 f"--lr_milestones ({self.lr_milestones}) only applies to --lr_scheduler_type multistep; got "
                 f"{self.lr_scheduler_type!r}.")
        try:
            parse_milestones(self.lr_milestones)
        except ValueError as err:
            raise ValueError(f"--lr_milestones: {err}") from None


@dataclass
class OutputArguments(_Validated):
    output_dir: str | None = _arg(help="Where the model, checkpoints and logs go.", required=True)
    overwrite_output_dir: bool = _arg(False, "Start over in a non-empty --output_dir: its earlier checkpoints are deleted first.")
    resume_from_checkpoint: str | None = _arg(help="'latest' (the newest complete checkpoint in --output_dir, if any) or a checkpoint folder.")
    checkpointing_steps: int | None = _arg(help="Save a resumable checkpoint every N optimizer steps (always at the end).")
    checkpoints_total_limit: int = _arg(2, "Keep at most this many checkpoints.")
    logging_steps: int = _arg(10, "Log loss, lr, grad norm and images/s every N optimizer steps (the loop's only host syncs).")
    report_to: str | None = _arg(help="Trackers: 'tensorboard', 'wandb', 'all', 'none' or a comma-separated list "
                                      "(a named one must be installed). Default: tensorboard where it is installed.")
    run_name: str | None = _arg(help="Tracker project name (default: the script's).")
    push_to_hub: bool = _arg(False, "Push the final model with its card. The token comes from HF_TOKEN or `hf auth login`; "
                                    "it is never logged or written.")
    hub_model_id: str | None = _arg(help="Repo id (default: the --output_dir name).")
    hub_private_repo: bool = _arg(False, "Create the repo private.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.output_dir is not None, "--output_dir is required.")
        _require(not (self.overwrite_output_dir and self.resume_from_checkpoint),
                 "--overwrite_output_dir (start over, deleting earlier checkpoints) and --resume_from_checkpoint "
                 f"({self.resume_from_checkpoint!r}) contradict each other: pass one.")
        _require_positive(self, ("logging_steps", "checkpoints_total_limit"))
        _require_positive(self, ("checkpointing_steps",), optional=True)
        _require(not self.hub_model_id or self.push_to_hub, "--hub_model_id is only used with --push_to_hub.")

    def trackers(self) -> list[str] | str | None:
        """`--report_to` in the form `Accelerator(log_with=...)` takes."""
        if self.report_to is None:  # the default: tensorboard where installed (an extra), else none, said once
            from accelerate.utils import is_tensorboard_available

            if is_tensorboard_available():
                return ["tensorboard"]
            logger.warning("tensorboard is not installed: no training logs (pip install tensorboard, or pass "
                           "--report_to with an installed tracker).")
            return None
        if self.report_to in ("", "none"):
            return None
        if self.report_to == "all":
            return "all"
        return [t.strip() for t in self.report_to.split(",") if t.strip()]


# ============================================================================================== scripts
@dataclass
class PretrainingArguments(OutputArguments, OptimizationArguments, DataArguments, ModelArguments):
    """`run_pretraining.py`: the shared groups with the paper's pretraining defaults, plus its own flags."""

    # The official 100-epoch recipe (Swin-B at 192 px: 8e-4 for a batch of 2048, cosine). Its 800-epoch runs use
    # 1e-4 / 5e-7 / 5e-6 with --num_train_epochs 800 --lr_scheduler_type multistep --lr_milestones 700.
    base_learning_rate: float = _arg(2e-4, "Peak lr for a total batch of 512, scaled linearly with the real total batch.")
    warmup_lr: float = _arg(1e-6, "Warmup start lr for a total batch of 512 (scaled like the peak lr).")
    min_lr: float = _arg(1e-5, "Final lr of the schedule for a total batch of 512 (scaled like the peak lr).")
    config_name: str | None = _arg(help="Path or Hub id of a SimMIMConfig to train from scratch.")
    streaming: bool = _arg(False, "Stream --dataset_name instead of downloading it (needs --max_train_steps).")
    shuffle_buffer_size: int = _arg(10_000, "Shuffle buffer for --streaming.")
    sample_data_repeats: int = _arg(4, "Embedded data only: copies of each of its 20 photos per epoch (each copy gets "
                                       "its own crop and mask).")
    eval_steps: int | None = _arg(help="Evaluation loss every N optimizer steps (and at the end).")
    visualize_steps: int | None = _arg(help="Write a reconstruction PNG grid every N steps (always at the end).")
    num_visualize_images: int = _arg(8, "Rows of the reconstruction grid.")
    hub_push_checkpoints: bool = _arg(False, "Also push each checkpoint (in the background) to last-checkpoint/ in the "
                                             "repo, replacing the one before.")
    # The paper's component study, one flag each (default: the preset's / config's value). See SimMIMConfig.
    mask_patch_size: int | None = _arg(help="Masking unit in pixels (the paper: 32).")
    mask_ratio: float | None = _arg(help="Fraction of masking units masked (the paper: 0.6).")
    mask_strategy: str | None = _arg(help="Masking strategy (default random, the paper's).", choices=list(MASK_STRATEGIES))
    head_type: str | None = _arg(help="Prediction head: linear (the paper's) or a two-layer mlp.", choices=list(HEAD_TYPES))
    head_hidden_size: int | None = _arg(help="Width of the mlp head (default: the encoder width).")
    loss_type: str | None = _arg(help="l1 (the paper's), smooth_l1, l2, or color_ce (classify 8-bit colours into bins).",
                                 choices=list(LOSS_TYPES))
    smooth_l1_beta: float | None = _arg(help="smooth_l1: where the loss turns from quadratic to linear.")
    num_color_bins: int | None = _arg(help="color_ce: bins per channel (a divisor of 256, e.g. 8 or 256).")
    prediction_resolution: int | None = _arg(help="Predict the image area-averaged to r x r instead of every pixel.")
    loss_area: str | None = _arg(help="Pixels the loss counts: masked (the paper's) or all.", choices=list(LOSS_AREAS))
    norm_target_patch_size: int | None = _arg(help="Regress a target normalised in k x k windows (odd k; SwinV2: 47).")

    COMPONENT_FIELDS = ("mask_patch_size", "mask_ratio", "head_type", "head_hidden_size", "loss_type", "smooth_l1_beta",
                        "num_color_bins", "prediction_resolution", "loss_area", "norm_target_patch_size")

    def component_overrides(self) -> dict:
        """The component flags that were given, as `SimMIMConfig` overrides (validated by the config)."""
        return {name: getattr(self, name) for name in self.COMPONENT_FIELDS if getattr(self, name) is not None}

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(sum(x is not None for x in (self.preset, self.config_name, self.model_name_or_path)) <= 1,
                 "--preset, --config_name and --model_name_or_path are exclusive: pass one model source.")
        _require(not self.streaming or bool(self.dataset_name),
                 "--streaming needs --dataset_name (a local --train_dir is read directly).")
        _require(not self.streaming or self.max_train_steps is not None,
                 "--streaming needs --max_train_steps (a stream has no known length for epochs).")
        _require(not (self.streaming and self.validation_split_percentage),
                 "--validation_split_percentage cannot split a stream; pass --validation_split.")
        _require_positive(self, ("sample_data_repeats", "num_visualize_images", "shuffle_buffer_size"))
        _require_positive(self, ("eval_steps", "visualize_steps"), optional=True)


@dataclass
class FinetuningArguments(OutputArguments, OptimizationArguments, DataArguments, ModelArguments):
    """`run_finetune.py`: the shared groups with the paper's fine-tuning defaults, plus its own flags."""

    # The official fine-tuning recipe's values where it differs from pretraining.
    base_learning_rate: float = _arg(1.25e-3, "Peak lr for a total batch of 512, scaled linearly with the real total batch.")
    warmup_lr: float = _arg(2.5e-7, "Warmup start lr for a total batch of 512 (scaled like the peak lr).")
    min_lr: float = _arg(2.5e-7, "Final lr of the schedule for a total batch of 512 (scaled like the peak lr).")
    warmup_epochs: float = _arg(20.0, "Linear warmup in epochs (fractions allowed).")
    validation_split_percentage: float = _arg(
        20.0, "Held-out percentage (stratified) of the training split when the dataset has no 'validation' split "
              "(a 'test' split is only used with --validation_split test).")

    label_column_name: str = _arg("label", "Label column (class indices).")
    train_label_fraction: float = _arg(1.0, "Train on this stratified fraction of the labelled training set.")
    data_seed: int = _arg(0, "Seed of the held-out split and of --train_label_fraction (independent of --seed).")
    image_size: int | None = _arg(help="Fine-tuning resolution (default: the checkpoint's).")
    window_size: int | None = _arg(help="Swin window at fine-tuning (e.g. 7 for 224 px).")
    vit_relative_position_bias: str = _arg(
        "per_block", "ViT pretrained with a shared relative bias: fine-tune per-block copies (paper) or keep it.",
        choices=["per_block", "keep"])
    pooling: str = _arg(
        "fc_norm", "ViT classification features: fc_norm = LayerNorm(mean of the patch tokens) without the final norm "
                   "(official); mean = mean of the final-normed tokens; cls; checkpoint = as saved. Swin always "
                   "averages its final-normed tokens; --linear_probe keeps the checkpoint's.",
        choices=["fc_norm", "mean", "cls", "checkpoint"])
    drop_path_rate: float | None = _arg(help="Stochastic depth (default: the official config's, 0.1; Swin-L 0.2).")
    layer_decay: float | None = _arg(help="Layer-wise lr decay (default: the official config's, ViT 0.65, Swin-B 0.9, "
                                          "Swin-L 0.7, SwinV2 0.75; 1.0 disables).")
    linear_probe: bool = _arg(False, "Freeze the encoder; train a linear head on pooled features of --probe_layer.")
    probe_layer: int | None = _arg(help="Hidden state for --linear_probe (ViT: block, 1-based; Swin: stage). Default: final.")
    crop_scale_min: float = _arg(0.08, "RandomResizedCrop minimum area fraction (0.08 as in the paper).")
    flip_prob: float = _arg(0.5, "Horizontal flip probability (0 for digits or text).")
    padded_crop: int | None = _arg(help="Random crop of the image padded by this many pixels instead of RandomResizedCrop "
                                        "(default: 4 at <= 32 px, as the official code; else off).")
    rand_augment: str | None = _arg(help="timm-style RandAugment policy, 'none' disables (default: "
                                         "rand-m9-mstd0.5-inc1; none with --linear_probe).")
    random_erasing: float | None = _arg(help="Random erasing probability (default 0.25; 0 with --linear_probe).")
    random_erasing_mode: str = _arg("pixel", "Fill erased boxes with per-pixel normal noise (timm 'pixel') or zeros.",
                                    choices=["pixel", "const"])
    mixup: float | None = _arg(help="Mixup Beta alpha (default 0.8, the official recipe; 0 with --linear_probe).")
    cutmix: float | None = _arg(help="CutMix Beta alpha (default 1.0, the official recipe; 0 with --linear_probe).")
    mixup_switch_prob: float = _arg(0.5, "With both on: probability of CutMix.")
    label_smoothing: float | None = _arg(help="Default 0.1 (fine-tuning), 0 (linear probe).")
    eval_every_epochs: int = _arg(1, "Evaluate, save the last/best model and checkpoint every N epochs (and after the last).")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.model_name_or_path is not None or self.preset is not None,
                 "give --model_name_or_path (a SimMIM checkpoint) or --preset (random init).")
        _require(not (self.linear_probe and (self.mixup or self.cutmix)),
                 "--linear_probe trains on clean features; --mixup/--cutmix are not supported with it.")
        # A probe saves its head only: on the Hub it is usable only on top of an encoder others can download.
        local_base = self.model_name_or_path is None or os.path.isdir(self.model_name_or_path)
        _require(not (self.push_to_hub and self.linear_probe and local_base),
                 "--push_to_hub with --linear_probe pushes the trained head only, which needs its encoder: pass a "
                 f"Hub model as --model_name_or_path (user/repo); got {self.model_name_or_path or self.preset!r}, "
                 "which others cannot download. Push the encoder first, or fine-tune instead.")
        # The official recipe's regularisation is for fine-tuning; a linear probe trains on crop + flip only.
        probe = self.linear_probe
        defaults = dict(mixup=0.0 if probe else 0.8, cutmix=0.0 if probe else 1.0, label_smoothing=0.0 if probe else 0.1,
                        rand_augment="none" if probe else "rand-m9-mstd0.5-inc1", random_erasing=0.0 if probe else 0.25)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _require(0.0 < self.train_label_fraction <= 1.0,
                 f"--train_label_fraction must lie in (0, 1]; got {self.train_label_fraction}.")
        _require(0.0 < self.validation_split_percentage < 100.0,
                 f"--validation_split_percentage must lie in (0, 100); got {self.validation_split_percentage}.")
        _require(self.mixup >= 0 and self.cutmix >= 0,
                 f"--mixup / --cutmix are Beta alphas >= 0; got {self.mixup} / {self.cutmix}.")
        _require(0.0 <= self.random_erasing <= 1.0, f"--random_erasing is a probability in [0, 1]; got {self.random_erasing}.")
        _require(0.0 <= self.flip_prob <= 1.0, f"--flip_prob is a probability in [0, 1]; got {self.flip_prob}.")
        _require(0.0 < self.crop_scale_min <= 1.0, f"--crop_scale_min must lie in (0, 1]; got {self.crop_scale_min}.")
        _require(self.padded_crop is None or self.padded_crop >= 0,
                 f"--padded_crop is a padding in pixels >= 0; got {self.padded_crop}.")
        _require(0.0 <= self.label_smoothing < 1.0, f"--label_smoothing must lie in [0, 1); got {self.label_smoothing}.")
        _require_positive(self, ("eval_every_epochs",))
        from .augmentation import parse_rand_augment  # kornia is only needed once fine-tuning is configured

        try:
            parse_rand_augment(self.rand_augment)
        except ValueError as err:
            raise ValueError(f"--rand_augment: {err}") from None


# ================================================================================================ parsing
def parse_args(dataclass_type: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse `argv` (default: `sys.argv[1:]`) into `dataclass_type`; an invalid value exits with argparse's
    usage message (status 2) naming the flag, as a hand-written argparse script would."""
    parser = HfArgumentParser(dataclass_type, description=description)
    argv = sys.argv[1:] if argv is None else list(argv)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return dataclass_type(**vars(namespace))
    except ValueError as err:
        parser.error(str(err))


def apply_config_overrides(config, overrides: str | None):
    """`config` with `--config_overrides` applied (`SimMIMConfig.with_overrides`: transformers' syntax, lists
    allowed, derived fields recomputed, validated as a whole); an error names the flag."""
    if not overrides:
        return config
    try:
        return config.with_overrides(overrides)
    except ValueError as err:
        raise ValueError(f"--config_overrides: {err}") from None


def public_dict(args) -> dict:
    """The arguments as JSON values, for logs, trackers and `training_args.json` (no secret is ever an
    argument: the Hub token only comes from the environment)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}


__all__ = [
    "DataArguments",
    "FinetuningArguments",
    "ModelArguments",
    "OptimizationArguments",
    "OutputArguments",
    "PretrainingArguments",
    "apply_config_overrides",
    "parse_args",
    "public_dict",
]
