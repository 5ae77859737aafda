#!/usr/bin/env python
"""Fine-tune (or linearly probe) a SimMIM encoder for image classification with 🤗 Accelerate.

The official SimMIM fine-tuning recipe is the default: AdamW, layer-wise lr decay (ViT 0.65, Swin 0.9),
linear lr scaling with the batch size (1.25e-3 per 512 images), warmup + cosine (timm's, over all steps), drop
path 0.1, weight decay 0.05 on matrices only; augmentation: bicubic RandomResizedCrop + flip (per image, in
the processor), then RandAugment `rand-m9-mstd0.5-inc1` and random erasing (p 0.25, pixel mode) batched on
the training device (`simmim_hf.augmentation`), mixup 0.8 / cutmix 1.0 with label smoothing 0.1. At 32 px and
below the crop is the official padded random crop (4 px) instead. ViT classifies `fc_norm(mean of the patch
tokens)` without the final norm (`--pooling fc_norm`), as the official model. Each epoch the model is evaluated with
`evaluate` (accuracy, and top-5 accuracy when there are at least 5 classes); the best and the last model are
saved with `save_pretrained` (plus the image processor and a model card), and full training state is
checkpointed atomically so `--resume_from_checkpoint latest` continues a killed run exactly.

Checkpoints pretrained at another resolution / window size load through `simmim_hf.transfer` (relative
position tables and position embeddings are interpolated; a shared ViT bias becomes per-block); everything
that cannot be mapped is logged by name.

Data (one of):
  * `--dataset_name` a Hub dataset with an image and a label column;
  * `--train_dir` (and optionally `--validation_dir`): image folders with one sub-folder per class;
  * nothing: the embedded labelled default, scikit-learn's handwritten digits (1,797 8x8 images, 10
    classes, shipped inside the scikit-learn wheel, no download), upsampled to the model's image size
    and split 80/20 (stratified, fixed split seed).

Examples:
    accelerate launch examples/run_finetune.py --preset vit-nano-p4-32 --output_dir out/digits
    accelerate launch --multi_gpu --num_processes 8 examples/run_finetune.py \
        --model_name_or_path out/pretrain --dataset_name <imagenet-like> --mixed_precision bf16 \
        --per_device_train_batch_size 128 --num_train_epochs 100 --warmup_epochs 20 --mixup 0.8 --cutmix 1.0
    python examples/run_finetune.py --model_name_or_path out/pretrain --linear_probe --probe_layer 8 ...
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if (_REPO_ROOT / "simmim_hf").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoConfig  # noqa: E402
from transformers.image_utils import PILImageResampling  # noqa: E402

from simmim_hf import SimMIMConfig, SimMIMForImageClassification  # noqa: E402
from simmim_hf.configuration_simmim import PRESETS  # noqa: E402
from simmim_hf.augmentation import FinetuneAugmentation, parse_rand_augment  # noqa: E402
from simmim_hf.data import SimMIMCollator  # noqa: E402
from simmim_hf.evaluation import LinearProbe  # noqa: E402
from simmim_hf.image_processing_simmim import SimMIMImageProcessor  # noqa: E402
from simmim_hf.metrics import load_metric  # noqa: E402
from simmim_hf.optimization import SCHEDULES, LayerDecayLRScheduler, build_param_groups, parse_milestones  # noqa: E402
from simmim_hf.training_utils import (  # noqa: E402
    CheckpointManager,
    HubPusher,
    PreemptionHandler,
    enable_gradient_checkpointing,
    to_json,
    write_model_card,
)
from simmim_hf.transfer import load_pretrained_for_transfer  # noqa: E402

logger = get_logger(__name__)

MODEL_CARD_TEMPLATE = _REPO_ROOT / "model_cards" / "finetuning.md"
# The paper's layer decay per encoder (Swin-B at 100 epochs; use 0.8 for 800-epoch Swin-B, 0.7 for Swin-L).
DEFAULT_LAYER_DECAY = {"vit": 0.65, "swin": 0.9}
DIGITS_DESCRIPTION = ("scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10 classes, shipped in the "
                      "scikit-learn wheel), upsampled bicubically to RGB at the model size; stratified 80/20 split")


# ============================================================================================== arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None, help="Hub dataset with images and labels.")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config name of the Hub dataset.")
    g.add_argument("--train_split", type=str, default="train", help="Split to train on.")
    g.add_argument("--validation_split", type=str, default=None,
                   help="Split to evaluate on (default: 'validation' or 'test' if present, else a held-out part).")
    g.add_argument("--train_dir", type=str, default=None, help="Image folder with one sub-folder per class.")
    g.add_argument("--validation_dir", type=str, default=None, help="Validation image folder (same classes).")
    g.add_argument("--validation_split_percentage", type=float, default=20.0,
                   help="Held-out percentage when there is no validation split (stratified).")
    g.add_argument("--image_column_name", type=str, default="image", help="Image column.")
    g.add_argument("--label_column_name", type=str, default="label", help="Label column (class indices).")
    g.add_argument("--train_label_fraction", type=float, default=1.0,
                   help="Train on this stratified fraction of the labelled training set (few-label studies).")
    g.add_argument("--data_seed", type=int, default=0,
                   help="Seed of the held-out split and of --train_label_fraction (independent of --seed, so "
                        "runs with different training seeds see the same data).")
    g.add_argument("--max_train_samples", type=int, default=None, help="Truncate the training set (debugging).")
    g.add_argument("--max_eval_samples", type=int, default=None, help="Truncate the eval set (debugging).")
    g.add_argument("--crop_scale_min", type=float, default=0.08,
                   help="RandomResizedCrop minimum area fraction (0.08 as in the paper's fine-tuning).")
    g.add_argument("--rand_augment", type=str, default="rand-m9-mstd0.5-inc1",
                   help="timm-style RandAugment policy ('none' disables).")
    g.add_argument("--random_erasing", type=float, default=0.25, help="Random erasing probability (0 disables).")
    g.add_argument("--random_erasing_mode", choices=["pixel", "const"], default="pixel",
                   help="Fill erased boxes with per-pixel normal noise (timm 'pixel') or zeros.")
    g.add_argument("--padded_crop", type=int, default=None,
                   help="Random crop with this zero padding instead of RandomResizedCrop (default: 4 at <= 32 px, "
                        "as the official code; else off).")
    g.add_argument("--flip_prob", type=float, default=0.5, help="Horizontal flip probability (0 for digits/text).")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    g.add_argument("--cache_dir", type=str, default=None, help="Cache folder for datasets and models.")

    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", type=str, default=None,
                   help="SimMIM checkpoint (local folder or Hub id) to fine-tune; any SimMIM class.")
    g.add_argument("--preset", type=str, default=None, choices=sorted(PRESETS),
                   help="Train from random init with this preset (when no --model_name_or_path).")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="Allow the config / model code stored with a Hub checkpoint to run.")
    g.add_argument("--image_size", type=int, default=None, help="Fine-tuning resolution (default: the checkpoint's).")
    g.add_argument("--window_size", type=int, default=None, help="Swin window at fine-tuning (e.g. 7 for 224 px).")
    g.add_argument("--vit_relative_position_bias", choices=["per_block", "keep"], default="per_block",
                   help="ViT pretrained with a shared relative bias: fine-tune per-block copies (paper) or keep it.")
    g.add_argument("--pooling", choices=["fc_norm", "mean", "cls", "checkpoint"], default="fc_norm",
                   help="ViT classification features: fc_norm = LayerNorm(mean of the patch tokens) without the final "
                        "norm (official); mean = mean of the final-normed tokens; cls; checkpoint = as saved. Swin "
                        "always averages its final-normed tokens; --linear_probe keeps the checkpoint's.")
    g.add_argument("--drop_path_rate", type=float, default=0.1, help="Stochastic depth (0.1 in the paper).")
    g.add_argument("--config_overrides", type=str, default=None,
                   help="Config changes in transformers' update_from_string syntax, lists allowed, e.g. "
                        "'hidden_dropout_prob=0.1' (applied after the checkpoint's config and the flags above).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations in the backward pass (less memory, ~30%% slower).")
    g.add_argument("--linear_probe", action="store_true",
                   help="Freeze the encoder; train a BatchNorm-free linear head on pooled features of --probe_layer.")
    g.add_argument("--probe_layer", type=int, default=None,
                   help="Hidden state for --linear_probe (ViT: block index, 1-based; Swin: stage). Default: final.")

    g = p.add_argument_group("optimisation (defaults: the SimMIM paper's fine-tuning)")
    g.add_argument("--per_device_train_batch_size", type=int, default=64, help="Batch size per process.")
    g.add_argument("--per_device_eval_batch_size", type=int, default=128, help="Eval batch size per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument("--base_learning_rate", type=float, default=1.25e-3,
                   help="Peak lr for a total batch of 512; scaled linearly with the actual total batch.")
    g.add_argument("--learning_rate", type=float, default=None, help="Absolute peak lr (overrides the scaling).")
    g.add_argument("--warmup_lr", type=float, default=2.5e-7, help="Warmup start lr for batch 512 (scaled alike).")
    g.add_argument("--min_lr", type=float, default=2.5e-7, help="Final cosine lr for batch 512 (scaled alike).")
    g.add_argument("--layer_decay", type=float, default=None,
                   help="Layer-wise lr decay (default ViT 0.65, Swin 0.9; 1.0 disables).")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay on matrices.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--lr_scheduler_type", type=str, default="cosine", choices=SCHEDULES, help="Schedule after warmup.")
    g.add_argument("--lr_milestones", type=str, default=None,
                   help="multistep: comma-separated epochs (fractions allowed), e.g. 30,60.")
    g.add_argument("--lr_gamma", type=float, default=0.1, help="multistep decay factor.")
    g.add_argument("--num_train_epochs", type=int, default=100, help="Training epochs.")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Total optimizer steps; overrides --num_train_epochs (the last epoch may be partial).")
    g.add_argument("--warmup_epochs", type=float, default=20, help="Linear warmup in epochs.")
    g.add_argument("--max_grad_norm", type=float, default=5.0, help="Gradient clipping (0 disables).")
    g.add_argument("--label_smoothing", type=float, default=None, help="Default 0.1 (fine-tuning), 0 (linear probe).")
    g.add_argument("--mixup", type=float, default=None, help="Mixup Beta alpha (default 0.8, the official recipe; 0 = off).")
    g.add_argument("--cutmix", type=float, default=None, help="CutMix Beta alpha (default 1.0, the official recipe; 0 = off).")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="With both on: probability of CutMix.")
    g.add_argument("--seed", type=int, default=42, help="Seed of the head init, shuffling, augmentation.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Overrides the accelerate config.")
    g.add_argument("--cpu", action="store_true", help="Train on CPU even when a GPU is present.")

    g = p.add_argument_group("checkpoints, logging, output")
    g.add_argument("--output_dir", type=str, required=True, help="Where models, checkpoints and results go.")
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep at most this many resume checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder.")
    g.add_argument("--logging_steps", type=int, default=20, help="Log the training loss every N optimizer steps.")
    g.add_argument("--eval_every_epochs", type=int, default=1,
                   help="Evaluate, save the last/best model and checkpoint every N epochs (and after the last).")
    g.add_argument("--report_to", type=str, default=None, help="Accelerate tracker (tensorboard, wandb, ...).")

    g = p.add_argument_group("Hub")
    g.add_argument("--push_to_hub", action="store_true", help="Push the best model with its model card.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Repo id (default: the --output_dir name).")
    g.add_argument("--hub_private_repo", action="store_true", help="Create the repo private.")
    args = p.parse_args(argv)
    _validate_args(p, args)
    return args


def _validate_args(parser, args) -> None:
    def fail(msg):
        parser.error(msg)

    if args.model_name_or_path is None and args.preset is None:
        fail("give --model_name_or_path (a SimMIM checkpoint) or --preset (random init).")
    if args.model_name_or_path is not None and args.preset is not None:
        fail(f"--model_name_or_path and --preset are exclusive; got {args.model_name_or_path!r} and {args.preset!r}.")
    if args.dataset_name and args.train_dir:
        fail("--dataset_name and --train_dir are exclusive.")
    if not 0.0 < args.train_label_fraction <= 1.0:
        fail(f"--train_label_fraction must lie in (0, 1]; got {args.train_label_fraction}.")
    if not 0.0 < args.validation_split_percentage < 100.0:
        fail(f"--validation_split_percentage must lie in (0, 100); got {args.validation_split_percentage}.")
    if args.linear_probe and (args.mixup or args.cutmix):
        fail("--linear_probe trains on clean features; --mixup/--cutmix are not supported with it.")
    # The official recipe's regularisation is for fine-tuning; a linear probe trains on crop + flip only.
    for name, default in (("mixup", 0.8), ("cutmix", 1.0)):
        if getattr(args, name) is None:
            setattr(args, name, 0.0 if args.linear_probe else default)
    if args.linear_probe:
        args.rand_augment, args.random_erasing = "none", 0.0
    if args.mixup < 0 or args.cutmix < 0:
        fail(f"--mixup / --cutmix are Beta alphas >= 0; got {args.mixup} / {args.cutmix}.")
    if not 0.0 <= args.random_erasing <= 1.0:
        fail(f"--random_erasing is a probability in [0, 1]; got {args.random_erasing}.")
    if args.padded_crop is not None and args.padded_crop < 0:
        fail(f"--padded_crop is a padding in pixels >= 0; got {args.padded_crop}.")
    if args.eval_every_epochs < 1:
        fail(f"--eval_every_epochs must be >= 1; got {args.eval_every_epochs}.")
    try:
        parse_rand_augment(args.rand_augment)
    except ValueError as err:
        fail(f"--rand_augment: {err}")
    if args.lr_scheduler_type == "multistep" and not args.lr_milestones:
        fail("--lr_scheduler_type multistep needs --lr_milestones (epochs), e.g. --lr_milestones 30,60.")
    try:
        parse_milestones(args.lr_milestones)
    except ValueError as err:
        fail(f"--lr_milestones: {err}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        fail(f"--max_train_steps must be >= 1 (or unset); got {args.max_train_steps}.")
    if args.num_train_epochs < 1:
        fail(f"--num_train_epochs must be >= 1; got {args.num_train_epochs}.")
    if args.label_smoothing is None:
        args.label_smoothing = 0.0 if args.linear_probe else 0.1
    if not 0.0 <= args.label_smoothing < 1.0:
        fail(f"--label_smoothing must lie in [0, 1); got {args.label_smoothing}.")


# ============================================================================================== data
def load_digits_dataset(image_size: int) -> datasets.Dataset:
    """The embedded labelled default: scikit-learn's digits as RGB PIL images at `image_size`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - examples extra
        raise RuntimeError("The embedded digits data needs scikit-learn: pip install simmim_hf[examples], or pass "
                           "--dataset_name / --train_dir.") from err
    from PIL import Image

    digits = load_digits()
    # 17 grey levels (0..16) -> 0..255; bicubic upsampling gives smooth strokes instead of 8x8 blocks.
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = [Image.fromarray(a, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")
              for a in pixels]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


def _split(ds: datasets.Dataset, test_fraction: float, seed: int):
    stratify = "label" if isinstance(ds.features.get("label"), datasets.ClassLabel) else None
    return ds.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column=stratify)


def load_data(args, image_size: int) -> tuple[datasets.Dataset, datasets.Dataset, list[str], str]:
    """(train, eval, label names, description) with columns `image` and `label`."""
    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
        description = f"[{args.dataset_name}](https://huggingface.co/datasets/{args.dataset_name})"
    elif args.train_dir:
        files = {"train": os.path.join(args.train_dir, "**")}
        if args.validation_dir:
            files["validation"] = os.path.join(args.validation_dir, "**")
        raw = datasets.load_dataset("imagefolder", data_files=files, cache_dir=args.cache_dir)
        description = "local image folder"
    else:
        raw = None
        description = DIGITS_DESCRIPTION

    if raw is None:
        split = _split(load_digits_dataset(image_size), 0.2, args.data_seed)
        train, evaluation = split["train"], split["test"]
    else:
        for column in (args.image_column_name, args.label_column_name):
            if column not in raw[args.train_split].column_names:
                raise ValueError(f"Column {column!r} not in the dataset; it has {raw[args.train_split].column_names}. "
                                 "Set --image_column_name / --label_column_name.")
        raw = raw.rename_columns({k: v for k, v in ((args.image_column_name, "image"), (args.label_column_name, "label"))
                                  if k != v})
        val_name = args.validation_split or next((s for s in ("validation", "test") if s in raw and s != args.train_split), None)
        if val_name is not None:
            if val_name not in raw:
                raise ValueError(f"--validation_split {val_name!r} not found; the dataset has {list(raw)}.")
            train, evaluation = raw[args.train_split], raw[val_name]
        else:
            split = _split(raw[args.train_split], args.validation_split_percentage / 100.0, args.data_seed)
            train, evaluation = split["train"], split["test"]
    train = train.select_columns(["image", "label"])
    evaluation = evaluation.select_columns(["image", "label"])

    label_feature = train.features["label"]
    if isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
    else:
        names = [str(i) for i in range(int(max(train["label"])) + 1)]
    if args.train_label_fraction < 1.0:
        stratify = "label" if isinstance(label_feature, datasets.ClassLabel) else None
        train = train.train_test_split(train_size=args.train_label_fraction, seed=args.data_seed,
                                       stratify_by_column=stratify)["train"]
    if args.max_train_samples is not None:
        train = train.shuffle(seed=args.data_seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation, names, description


# ============================================================================================== model
def build_model(args, num_labels: int, label_names: list[str]):
    """(model, config, report): a classifier (or linear probe) with the pretrained encoder loaded."""
    id2label = dict(enumerate(label_names))
    label2id = {v: k for k, v in id2label.items()}
    if args.model_name_or_path is None:
        config = SimMIMConfig.from_preset(args.preset)
    else:
        config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code,
                                            cache_dir=args.cache_dir)
        if config.model_type != "simmim":
            raise ValueError(f"--model_name_or_path must be a SimMIM checkpoint (model_type 'simmim'); got "
                             f"model_type={config.model_type!r}. Convert it with simmim_hf.convert first.")
    overrides = dict(num_labels=num_labels, id2label=id2label, label2id=label2id,
                     drop_path_rate=0.0 if args.linear_probe else args.drop_path_rate)
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.window_size is not None:
        overrides["window_size"] = args.window_size
    if config.encoder_type == "vit" and not args.linear_probe and args.pooling != "checkpoint":
        overrides.update(pooling="cls" if args.pooling == "cls" else "mean", use_fc_norm=args.pooling == "fc_norm")
    if (config.encoder_type == "vit" and config.use_shared_relative_position_bias and not args.linear_probe
            and args.vit_relative_position_bias == "per_block"):
        # The paper fine-tunes ViT with one relative bias table per block, each initialised from the shared one.
        overrides.update(use_shared_relative_position_bias=False, use_relative_position_bias=True)
    # The local SimMIMConfig class (the checkpoint's may be remote code), with the overrides validated as a whole.
    config = SimMIMConfig.from_dict(config.to_dict()).with_overrides(overrides)
    if args.config_overrides:
        try:
            config = config.with_overrides(args.config_overrides)
        except ValueError as err:
            raise ValueError(f"--config_overrides: {err}") from None

    model = SimMIMForImageClassification(config)
    report = None
    if args.model_name_or_path is not None:
        report = load_pretrained_for_transfer(model, args.model_name_or_path, cache_dir=args.cache_dir)
    if args.linear_probe:
        return LinearProbe(model.simmim, num_labels, layer=args.probe_layer), config, report
    return model, config, report


# ============================================================================================== mixup
def mix_batch(pixel_values, labels, num_classes, args, rng: np.random.Generator):
    """Batch-wise Mixup / CutMix (as timm's `Mixup(mode="batch")`) with label smoothing.

    All random draws (the choice, lambda, the box) come from a host-side numpy generator, so nothing waits
    on the device. Returns (mixed pixel values, soft targets (B, num_classes))."""
    off = args.label_smoothing / num_classes
    targets = F.one_hot(labels, num_classes).to(torch.float32) * (1.0 - args.label_smoothing) + off
    use_cutmix = args.cutmix > 0 and (args.mixup <= 0 or rng.random() < args.mixup_switch_prob)
    alpha = args.cutmix if use_cutmix else args.mixup
    lam = float(rng.beta(alpha, alpha))
    flipped = pixel_values.flip(0)  # pair each image with its mirror in the batch, as timm does
    if use_cutmix:
        h, w = pixel_values.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        pixel_values = pixel_values.clone()
        pixel_values[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the label weight follows the area actually pasted
    else:
        pixel_values = pixel_values * lam + flipped * (1.0 - lam)
    return pixel_values, targets * lam + targets.flip(0) * (1.0 - lam)


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch that depends only on (seed, epoch): a resumed run, which starts at a
    later epoch, shuffles exactly like the uninterrupted one (a stateful generator would not)."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


# ============================================================================================== evaluation
@torch.no_grad()
def evaluate_model(model, dataloader, accelerator, num_classes: int) -> dict:
    metric = load_metric("top_k_accuracy", num_process=1)
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    unreadable = torch.zeros((), device=accelerator.device, dtype=torch.long)
    for batch in dataloader:
        unreadable += batch["num_unreadable"]
        logits = model(pixel_values=batch["pixel_values"]).logits
        labels = batch["labels"]
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        # gather_for_metrics drops the samples the sampler repeated to even out the last batch across
        # processes, so neither the metrics nor the loss count them twice.
        logits, labels, losses = accelerator.gather_for_metrics((logits, labels, losses))
        loss_sum += losses.sum()
        count += losses.numel()
        metric.add_batch(predictions=logits.float().cpu().numpy(), references=labels.cpu().numpy())
    results = metric.compute(top_k=(1, 5) if num_classes >= 5 else (1,))
    results["loss"] = (loss_sum / count.clamp(min=1)).item()
    results["unreadable_images"] = int(accelerator.reduce(unreadable, "sum").item())
    if results["unreadable_images"]:
        logger.warning(f"{results['unreadable_images']} unreadable eval image(s) were replaced by other images of "
                       "their batch; the metrics count those duplicates.")
    model.train()
    return results


# ============================================================================================== saving
def save_model(accelerator, model, processor, folder: Path, args, extra: dict) -> None:
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(unwrapped, LinearProbe):
            # The encoder is the unchanged pretrained one: save only the probe, and say where the encoder is.
            save_file({k: v.contiguous().cpu() for k, v in unwrapped.head.state_dict().items()},
                      str(folder / "linear_probe_head.safetensors"))
            (folder / "linear_probe_config.json").write_text(json.dumps(
                {"base_model": args.model_name_or_path, "probe_layer": args.probe_layer,
                 "normalize": "layernorm_without_affine", "num_labels": unwrapped.head.out_features}, indent=2))
        else:
            unwrapped.save_pretrained(folder, state_dict=accelerator.get_state_dict(model), safe_serialization=True)
            processor.save_pretrained(folder)
        (folder / "eval_results.json").write_text(json.dumps(extra, indent=2, sort_keys=True))
    accelerator.wait_for_everyone()


# ============================================================================================== main
def run(argv=None) -> tuple[dict, torch.nn.Module]:
    """Train and evaluate; returns (results, the unwrapped model). `main` is the CLI entry point."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        cpu=args.cpu, log_with=args.report_to, project_dir=str(output_dir),
        step_scheduler_with_optimizer=False,  # the scheduler is stepped once per optimizer update, below
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)

    # The Hub repo is created before anything else: a deterministic failure (offline mode, no / read-only token,
    # bad --hub_model_id) stops the run here instead of after training. Transient failures are retried in the
    # background; the best model is pushed at the end.
    pusher = None
    if args.push_to_hub and accelerator.is_main_process:
        pusher = HubPusher.for_training_run(args.hub_model_id or output_dir.resolve().name,
                                            private=args.hub_private_repo or None)

    # The image size is needed before the data (the digits are upsampled to it).
    probe_config = (SimMIMConfig.from_preset(args.preset) if args.preset else
                    AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code,
                                               cache_dir=args.cache_dir))
    image_size = args.image_size or probe_config.image_size
    with accelerator.main_process_first():
        train_ds, eval_ds, label_names, data_description = load_data(args, image_size)
    num_classes = len(label_names)

    model, config, report = build_model(args, num_classes, label_names)
    if args.gradient_checkpointing and not args.linear_probe:
        enable_gradient_checkpointing(model)
    # The official code replaces RandomResizedCrop with a 4-px padded random crop at 32 px and below (CIFAR style),
    # and evaluates such images without the resize / center crop.
    small = config.image_size <= 32
    padded_crop = args.padded_crop if args.padded_crop is not None else (4 if small and not args.linear_probe else 0)
    crop = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)) if padded_crop else \
        dict(crop_scale=(args.crop_scale_min, 1.0))
    processor = SimMIMImageProcessor.from_config(config, **crop, flip_prob=args.flip_prob, do_train=False,
                                                 resample=PILImageResampling.BICUBIC,
                                                 **(dict(crop_pct=1.0) if small else {}))
    augment = FinetuneAugmentation.from_image_processor(
        processor, rand_augment=args.rand_augment, random_erasing_prob=args.random_erasing,
        random_erasing_mode=args.random_erasing_mode, padded_crop=padded_crop)
    augment_description = ", ".join([
        f"random crop of the {padded_crop}-px padded image" if padded_crop else
        f"bicubic RandomResizedCrop (area {args.crop_scale_min}-1)", f"flip p {args.flip_prob}",
        f"RandAugment {args.rand_augment}", f"random erasing p {args.random_erasing} ({args.random_erasing_mode})"])
    # Images are decoded in the collator: an unreadable file (truncated, corrupt) is replaced by another sample of
    # its batch and counted, as in pretraining, instead of crashing a worker inside `datasets`.
    train_ds = train_ds.add_column("index", list(range(len(train_ds)))).cast_column("image", datasets.Image(decode=False))
    eval_ds = eval_ds.cast_column("image", datasets.Image(decode=False))
    # Per-sample seeds: a sample's crop / flip depends only on (seed, epoch, index), so resuming mid-run
    # and any number of workers or processes reproduce the same stream.
    train_collator = SimMIMCollator(processor, seed=args.seed, keep_columns=("label",), do_train=True, return_mask=False)
    eval_collator = SimMIMCollator(processor, keep_columns=("label",), do_train=False, return_mask=False)

    train_sampler = EpochShuffleSampler(len(train_ds), args.seed)
    train_loader = DataLoader(train_ds, batch_size=args.per_device_train_batch_size, sampler=train_sampler,
                              collate_fn=train_collator, num_workers=args.dataloader_num_workers)
    eval_loader = DataLoader(eval_ds, batch_size=args.per_device_eval_batch_size, collate_fn=eval_collator,
                             num_workers=args.dataloader_num_workers)

    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    lr_ratio = total_batch / 512.0
    peak_lr = args.learning_rate if args.learning_rate is not None else args.base_learning_rate * lr_ratio
    layer_decay = None if args.linear_probe else (
        args.layer_decay if args.layer_decay is not None else DEFAULT_LAYER_DECAY[config.encoder_type])
    groups = build_param_groups(model, args.weight_decay, layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    steps_per_epoch = math.ceil(math.ceil(len(train_ds) / args.per_device_train_batch_size / accelerator.num_processes)
                                / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or steps_per_epoch * args.num_train_epochs
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    warmup_steps = min(max_steps, int(round(args.warmup_epochs * steps_per_epoch)))
    milestones = parse_milestones(args.lr_milestones, steps_per_epoch)
    lr_scheduler = LayerDecayLRScheduler(
        optimizer, num_training_steps=max_steps, num_warmup_steps=warmup_steps, schedule=args.lr_scheduler_type,
        base_lr=peak_lr, warmup_lr=args.warmup_lr * lr_ratio if args.learning_rate is None else 0.0,
        min_lr=args.min_lr * lr_ratio if args.learning_rate is None else 0.0,
        milestones=milestones, gamma=args.lr_gamma,
    )
    model, optimizer, train_loader, eval_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, lr_scheduler)
    augment = augment.to(accelerator.device)

    # What an epoch-granular checkpoint's position and schedule mean; resuming under other values is refused.
    manager = CheckpointManager(accelerator, output_dir, total_limit=args.checkpoints_total_limit, settings={
        "per_device_train_batch_size": args.per_device_train_batch_size, "num_processes": accelerator.num_processes,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "max_train_steps": max_steps,
        "train_samples": len(train_ds), "peak_lr": peak_lr, "warmup_steps": warmup_steps, "seed": args.seed,
        "lr_scheduler_type": args.lr_scheduler_type, "linear_probe": args.linear_probe})
    start_epoch, best, history = 0, {"accuracy": -1.0, "epoch": None}, []
    resume = manager.resolve(args.resume_from_checkpoint)
    if resume is not None:
        state = manager.load(resume)
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        logger.info(f"Resumed from {resume} (after epoch {state['epoch']}, best accuracy {best['accuracy']:.4f})")
    if args.report_to:
        accelerator.init_trackers("simmim_finetune", config={k: v for k, v in vars(args).items()
                                                             if isinstance(v, (int, float, str, bool))})

    trainable = sum(p.numel() for g in groups for p in g["params"])
    logger.info(f"{'Linear probe' if args.linear_probe else 'Fine-tuning'} {config.encoder_type} "
                f"({trainable:,} trainable parameters) on {len(train_ds)} train / {len(eval_ds)} eval images, "
                f"{num_classes} classes; total batch {total_batch}, peak lr {peak_lr:.3g}, layer decay {layer_decay}, "
                f"{max_steps} steps ({warmup_steps} warmup)")
    preemption = PreemptionHandler()
    global_step = start_epoch * steps_per_epoch
    use_mix = args.mixup > 0 or args.cutmix > 0
    running = torch.zeros((), device=accelerator.device)
    unreadable = torch.zeros((), device=accelerator.device, dtype=torch.long)
    preempted = False
    model.train()
    for epoch in range(start_epoch, num_epochs):
        train_collator.set_epoch(epoch)
        # accelerate's DataLoaderShard re-applies its own epoch counter to the sampler at every `iter()`; a
        # resumed run must set it, or the counter restarts at 0 and the resumed epochs replay epoch 0's order.
        train_loader.set_epoch(epoch)
        train_sampler.set_epoch(epoch)
        # Per (seed, process, epoch): a resumed run draws the same mixup/cutmix parameters.
        mix_rng = np.random.default_rng([args.seed, accelerator.process_index, epoch])
        for batch in train_loader:
            with accelerator.accumulate(model):
                pixel_values, labels = augment(batch["pixel_values"]), batch["labels"]
                if use_mix:
                    pixel_values, targets = mix_batch(pixel_values, labels, num_classes, args, mix_rng)
                logits = model(pixel_values=pixel_values).logits.float()
                if use_mix:
                    loss = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
                else:
                    loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.detach()  # stays on the device: no host sync per step
            unreadable += batch["num_unreadable"]
            if accelerator.sync_gradients:
                lr_scheduler.step()
                global_step += 1
                if global_step % args.logging_steps == 0:
                    avg = accelerator.reduce(running, "mean").item() / (args.logging_steps * args.gradient_accumulation_steps)
                    running.zero_()
                    logger.info(f"epoch {epoch} step {global_step}/{max_steps} loss {avg:.4f} "
                                f"lr {lr_scheduler.get_last_lr()[-1]:.3g}")
                    if args.report_to:
                        accelerator.log({"train/loss": avg, "train/lr": lr_scheduler.get_last_lr()[-1]}, step=global_step)
            if preemption.should_stop():
                preempted = True
                break
            if global_step >= max_steps:
                break  # --max_train_steps reached inside the last epoch
        if preempted:
            # Mid-epoch state cannot be resumed at epoch granularity: the last epoch checkpoint stays latest.
            logger.warning(f"Received signal {preemption.received} during epoch {epoch}; stopping. Resume with "
                           "--resume_from_checkpoint latest (restarts this epoch from its beginning).")
            break

        if (epoch + 1) % args.eval_every_epochs and epoch + 1 < num_epochs:
            continue  # evaluation, saving and the resume checkpoint happen together, every N epochs
        results = evaluate_model(model, eval_loader, accelerator, num_classes)
        results["epoch"] = epoch
        history.append(results)
        logger.info(f"epoch {epoch}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "epoch"))
        if args.report_to:
            accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=global_step)
        save_model(accelerator, model, processor, output_dir / "last", args, results)
        if results["accuracy"] > best["accuracy"]:
            best = dict(results)
            save_model(accelerator, model, processor, output_dir / "best", args, results)
        manager.save(global_step, {"epoch": epoch, "best": best, "history": history})
    preemption.restore()

    final = {"best": best, "last": history[-1] if history else None, "history": history, "epochs": num_epochs,
             "unreadable_train_images": int(accelerator.reduce(unreadable, "sum").item()),
             "train_samples": len(train_ds), "eval_samples": len(eval_ds), "num_classes": num_classes,
             "linear_probe": args.linear_probe, "preempted": preempted,
             "transfer_report": None if report is None else {
                 "interpolated": report.interpolated, "expanded_shared": report.expanded_shared,
                 "missing": report.missing, "unexpected": report.unexpected, "mismatched": report.mismatched}}
    if final["unreadable_train_images"]:
        logger.warning(f"{final['unreadable_train_images']} unreadable training image(s) were replaced by other "
                       "images of their batch (unreadable_train_images in all_results.json).")
    if accelerator.is_main_process:
        (output_dir / "all_results.json").write_text(to_json(final))
        if not preempted and history and (output_dir / "best").is_dir():
            write_card(args, config, output_dir / "best", final, data_description, total_batch, peak_lr,
                       layer_decay, max_steps, warmup_steps, accelerator, augment_description)
    if pusher is not None and not preempted:
        pusher.push(output_dir / "best", commit_message=f"Fine-tuned: best eval accuracy {best['accuracy']:.4f}")
        if not pusher.wait():
            # Returned to the caller (not in all_results.json, written before the push): `main` exits with 1.
            final["hub_push_failed"] = True
            logger.error(
                f"Push to the Hub failed ({'; '.join(pusher.errors)}). The local folder {output_dir / 'best'} is "
                "complete (weights, config, processor, model card); nothing was lost. Push it by hand once the "
                f"problem is fixed:\n  {pusher.manual_push_command(output_dir / 'best')}\nExiting with status 1.")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final, accelerator.unwrap_model(model)


def write_card(args, config, folder, final, data_description, total_batch, peak_lr, layer_decay, max_steps,
               warmup_steps, accelerator, augmentation):
    base = args.model_name_or_path
    is_hub_id = base is not None and not os.path.isdir(base) and base.count("/") == 1
    rows = [f"| {r['epoch']} | {r['accuracy'] * 100:.2f} | " +
            (f"{r['top5_accuracy'] * 100:.2f}" if "top5_accuracy" in r else "–") + f" | {r['loss']:.4f} |"
            for r in final["history"]]
    card_data = {"license": "apache-2.0", "library_name": "transformers", "pipeline_tag": "image-classification",
                 "tags": ["simmim", "image-classification", "vision"] + (["linear-probe"] if args.linear_probe else [])}
    if is_hub_id:
        card_data["base_model"] = base
    if args.dataset_name:
        card_data["datasets"] = [args.dataset_name]
    best = final["best"]
    write_model_card(
        MODEL_CARD_TEMPLATE, folder, card_data,
        model_name=args.hub_model_id or Path(args.output_dir).resolve().name,
        repo_id=args.hub_model_id or Path(args.output_dir).resolve().name,
        mode="linear probe" if args.linear_probe else "fine-tuning",
        linear_probe=args.linear_probe, probe_layer=args.probe_layer,
        base_model=base or f"none (random init, preset `{args.preset}`)",
        base_model_link=(f"[{base}](https://huggingface.co/{base})" if is_hub_id else
                         (f"`{base}` (local)" if base else f"none: random init from preset `{args.preset}`")),
        architecture=f"{config.encoder_type.upper()} ({'depths ' + str(config.depths) if config.encoder_type == 'swin' else str(config.num_hidden_layers) + ' blocks'}, width {config.hidden_size})",
        image_size=config.image_size, dataset_description=data_description,
        train_samples=final["train_samples"], eval_samples=final["eval_samples"], num_classes=final["num_classes"],
        label_fraction=args.train_label_fraction, epochs=final["epochs"], steps=max_steps,
        warmup_steps=warmup_steps, total_batch_size=total_batch, num_processes=accelerator.num_processes,
        learning_rate=f"{peak_lr:.3g}", layer_decay=layer_decay if layer_decay is not None else "none",
        weight_decay=args.weight_decay, drop_path_rate=config.drop_path_rate, label_smoothing=args.label_smoothing,
        mixup=args.mixup, cutmix=args.cutmix, mixed_precision=accelerator.mixed_precision,
        augmentation=augmentation, pooling=(
            "LayerNorm of the mean patch token (fc_norm, no final norm)" if config.use_fc_norm else
            "the normalised CLS token" if config.encoder_type == "vit" and config.pooling == "cls" else
            "mean of the final-normalised tokens"),
        best_epoch=best["epoch"], best_accuracy=f"{best['accuracy'] * 100:.2f}",
        best_top5=f"{best['top5_accuracy'] * 100:.2f}" if "top5_accuracy" in best else None,
        results_rows="\n".join(rows), seed=args.seed,
    )


def main(argv=None) -> int:
    results, _ = run(argv)
    best = results["best"]
    print(json.dumps({"best_accuracy": best["accuracy"], "best_epoch": best["epoch"],
                      **({"best_top5_accuracy": best["top5_accuracy"]} if "top5_accuracy" in best else {})}))
    return 1 if results.get("hub_push_failed") else 0  # the model is saved locally either way


if __name__ == "__main__":
    sys.exit(main())
