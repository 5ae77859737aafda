"""Fine-tune (or linearly probe) a SimMIM encoder for image classification with 🤗 Accelerate.

The official SimMIM fine-tuning recipe is the default: AdamW, layer-wise lr decay (ViT 0.65, Swin 0.9),
linear lr scaling with the batch size (1.25e-3 per 512 images), warmup + cosine (timm's, over all steps), drop
path 0.1, weight decay 0.05 on matrices only; augmentation: bicubic RandomResizedCrop + flip (per image, in
the processor), then RandAugment `rand-m9-mstd0.5-inc1` and random erasing (p 0.25, pixel mode) batched on
the training device (`simmim_hf.augmentation`), mixup 0.8 / cutmix 1.0 with label smoothing 0.1. At 32 px and
below the crop is the official padded random crop (4 px) instead. ViT classifies `fc_norm(mean of the patch
tokens)` without the final norm (`--pooling fc_norm`), as the official model. Every `--eval_every_epochs` the
model is evaluated (accuracy, and top-5 accuracy with at least 5 classes), the best and the last model are saved
with `save_pretrained` (plus the image processor and a model card) and a resumable checkpoint is written.

Checkpoints pretrained at another resolution / window size load through `simmim_hf.transfer` (relative
position tables and position embeddings are interpolated; a shared ViT bias becomes per-block); everything
that cannot be mapped is logged by name.

Data (one of): `--dataset_name` (a Hub dataset with an image and a label column); `--train_dir` (and optionally
`--validation_dir`: one sub-folder per class); nothing: scikit-learn's handwritten digits (1,797 8x8 images,
10 classes, shipped in its wheel), upsampled to the model's image size and split 80/20 (--validation_split_percentage).

    accelerate launch examples/run_finetune.py --preset vit-nano-p4-32 --output_dir out/digits
    accelerate launch --multi_gpu --num_processes 8 examples/run_finetune.py --model_name_or_path out/pretrain \\
        --dataset_name <imagenet-like> --mixed_precision bf16 --per_device_train_batch_size 128
    simmim-finetune --model_name_or_path out/pretrain --linear_probe --probe_layer 8 --output_dir out/probe
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import DistributedType
from transformers import AutoConfig
from transformers.image_utils import PILImageResampling

from . import SimMIMConfig, SimMIMForImageClassification
from .arguments import FinetuningArguments, apply_config_overrides, parse_args, public_dict
from .augmentation import FinetuneAugmentation, mix_batch
from .cards import write_finetuning_card
from .data import EpochShuffleSampler, ImageRows, SimMIMCollator, create_dataloader, load_classification_data
from .engine import LoopCallback, TrainingLoop, default_num_workers, resume_settings, save_model, start_run
from .evaluation import LinearProbe, evaluate_classifier
from .image_processing_simmim import SimMIMImageProcessor
from .optimization import LearningRatePlan, create_optimizer_and_scheduler
from .training_utils import (
    atomic_write_text,
    enable_gradient_checkpointing,
    publish_folder,
    staging_folder,
    to_json,
)
from .transfer import load_pretrained_for_transfer

logger = logging.getLogger(__name__)

def official_finetune_defaults(config: SimMIMConfig) -> dict:
    """Layer decay and drop path of the official fine-tuning configs where the flags leave them unset: ViT-B
    0.65 / 0.1, Swin-B 0.9 / 0.1 (its 100-epoch recipe; the 800-epoch one uses 0.8), Swin-L 0.7 / 0.2, SwinV2-B
    0.75 / 0.1. Swin sizes are told apart by their width (Swin-L: embed_dim 192)."""
    if config.encoder_type == "swin" and config.embed_dim >= 192:
        return {"layer_decay": 0.7, "drop_path_rate": 0.2}
    return {"layer_decay": {"vit": 0.65, "swin": 0.9, "swinv2": 0.75}[config.encoder_type], "drop_path_rate": 0.1}


def load_base_config(args: FinetuningArguments) -> SimMIMConfig:
    if args.model_name_or_path is None:
        return SimMIMConfig.from_preset(args.preset)
    config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code,
                                        cache_dir=args.cache_dir)
    if config.model_type != "simmim":
        raise ValueError(f"--model_name_or_path must be a SimMIM checkpoint (model_type 'simmim'); got "
                         f"model_type={config.model_type!r}. Convert it with simmim-convert first.")
    # The local class (the checkpoint's may be remote code), validated as a whole.
    return SimMIMConfig.from_dict(config.to_dict())


def build_model(args: FinetuningArguments, base_config: SimMIMConfig, label_names: list[str]):
    """(model, config, transfer report): a classifier (or linear probe) with the pretrained encoder loaded."""
    id2label = dict(enumerate(label_names))
    overrides = dict(num_labels=len(label_names), id2label=id2label, label2id={v: k for k, v in id2label.items()},
                     drop_path_rate=0.0 if args.linear_probe else args.drop_path_rate if args.drop_path_rate is not None
                     else official_finetune_defaults(base_config)["drop_path_rate"])
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.window_size is not None:
        overrides["window_size"] = args.window_size
    is_vit = base_config.encoder_type == "vit"
    if is_vit and not args.linear_probe and args.pooling != "checkpoint":
        overrides.update(pooling="cls" if args.pooling == "cls" else "mean", use_fc_norm=args.pooling == "fc_norm")
    if (is_vit and base_config.use_shared_relative_position_bias and not args.linear_probe
            and args.vit_relative_position_bias == "per_block"):
        # The paper fine-tunes ViT with one relative bias table per block, each initialised from the shared one.
        overrides.update(use_shared_relative_position_bias=False, use_relative_position_bias=True)
    config = apply_config_overrides(base_config.with_overrides(overrides), args.config_overrides)
    model = SimMIMForImageClassification(config)
    report = None if args.model_name_or_path is None else \
        load_pretrained_for_transfer(model, args.model_name_or_path, cache_dir=args.cache_dir)
    if args.linear_probe:
        return LinearProbe(model.simmim, len(label_names), layer=args.probe_layer), config, report
    return model, config, report


def build_processing(args: FinetuningArguments, config: SimMIMConfig):
    """(processor, batch augmentation, description): the per-image crop and flip run in the processor, the rest
    of the recipe batched on the device. The official code replaces RandomResizedCrop with a 4-px padded random
    crop at 32 px and below (CIFAR style) and evaluates such images without resize / center crop."""
    small = config.image_size <= 32
    padded_crop = args.padded_crop if args.padded_crop is not None else (4 if small and not args.linear_probe else 0)
    crop = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)) if padded_crop else dict(crop_scale=(args.crop_scale_min, 1.0))
    processor = SimMIMImageProcessor.from_config(config, **crop, flip_prob=args.flip_prob, do_train=False,
                                                 resample=PILImageResampling.BICUBIC,
                                                 **(dict(crop_pct=1.0) if small else {}))
    augment = FinetuneAugmentation.from_image_processor(
        processor, rand_augment=args.rand_augment, random_erasing_prob=args.random_erasing,
        random_erasing_mode=args.random_erasing_mode, padded_crop=padded_crop)
    description = ", ".join([
        f"random crop of the {padded_crop}-px padded image" if padded_crop else
        f"bicubic RandomResizedCrop (area {args.crop_scale_min}-1)", f"flip p {args.flip_prob}",
        f"RandAugment {args.rand_augment}", f"random erasing p {args.random_erasing} ({args.random_erasing_mode})"])
    return processor, augment, description


class EvaluateAndSave(LoopCallback):
    """Every --eval_every_epochs epochs and at the end: evaluate, save `last/` (and `best/` when better) and a
    resumable checkpoint holding the best result and the history (in `state.extra`)."""

    def __init__(self, args, eval_dataloader, processor, num_classes, id2label=None):
        self.args, self.eval_dataloader, self.processor, self.num_classes = args, eval_dataloader, processor, num_classes
        self.id2label = id2label

    def _save(self, loop, folder: Path, results: dict) -> None:
        """Write the model and its results next to `folder`, then swap it in: a failed save (a full disk, a kill)
        leaves the previous best/ or last/ whole."""
        accelerator, model = loop.accelerator, loop.model
        staging = staging_folder(folder)
        if accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)  # left by a run killed mid-save
        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        if isinstance(unwrapped, LinearProbe):  # the encoder is the unchanged pretrained one: the head only
            head = unwrapped.full_head_state_dict()  # every process: under FSDP this gathers the shards
            if accelerator.is_main_process:  # with the class names and the input transform it was trained on
                unwrapped.save_head(staging, self.args.model_name_or_path, self.id2label, head)
                self.processor.save_pretrained(staging)
        else:
            save_model(accelerator, model, staging, self.processor)
        if accelerator.is_main_process:
            (staging / "eval_results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
            publish_folder(staging, folder)
        accelerator.wait_for_everyone()

    def on_epoch_end(self, loop, state):
        finished = state.global_step >= loop.plan.max_train_steps or state.stopped_early
        if (state.epoch + 1) % self.args.eval_every_epochs and not finished:
            return
        results = evaluate_classifier(loop.model, self.eval_dataloader, loop.accelerator, self.num_classes)
        if results["unreadable_images"]:
            logger.warning(f"{results['unreadable_images']} unreadable eval image(s) were replaced by other images "
                           "of their batch; the metrics count those duplicates.")
        results["epoch"] = state.epoch
        history = state.extra.setdefault("history", [])
        history.append(results)
        logger.info(f"epoch {state.epoch}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "epoch"))
        loop.accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=state.global_step)
        output_dir = Path(self.args.output_dir)
        self._save(loop, output_dir / "last", results)
        if results["accuracy"] > state.extra.get("best", {}).get("accuracy", -1.0):
            state.extra["best"] = dict(results)
            self._save(loop, output_dir / "best", results)
        loop.save_checkpoint(state)


def set_aside_later_results(accelerator, output_dir: Path, state) -> None:
    """After a resume: a `best/` or `last/` that is not the checkpoint's own best or last evaluation came after it
    (the checkpoint is older: resumed before a divergence, or killed between those saves and the checkpoint). It
    is renamed `superseded-best` / `superseded-last` (`-2`, ... when taken), never deleted, so that `best/` and
    its card always describe the branch being trained."""
    history = state.extra.get("history", [])
    expected = {"best": state.extra.get("best"), "last": history[-1] if history else None}
    if accelerator.is_main_process:
        for name, result in expected.items():
            folder = output_dir / name
            saved = folder / "eval_results.json"
            if not folder.is_dir() or (saved.is_file() and result is not None and _same_evaluation(
                    json.loads(saved.read_text()), result)):
                continue
            target, number = output_dir / f"superseded-{name}", 2
            while target.exists():
                target, number = output_dir / f"superseded-{name}-{number}", number + 1
            folder.rename(target)
            logger.warning(f"{folder} is not the result of the checkpoint resumed from (it came after it); kept as "
                           f"{target.name}, and {name}/ now follows this run.")
    accelerator.wait_for_everyone()


def _same_evaluation(a: dict, b: dict) -> bool:
    # By epoch and accuracy: other fields may hold a NaN loss, which never equals itself (or came back as null).
    return (a.get("epoch"), a.get("accuracy")) == (b.get("epoch"), b.get("accuracy"))


def run(argv=None, callbacks=()) -> tuple[dict, torch.nn.Module]:
    """Train and evaluate; returns (results, the unwrapped model). `main` is the command-line entry point."""
    args = parse_args(FinetuningArguments, argv, description=__doc__.split("\n\n")[0])
    output_dir = Path(args.output_dir)
    accelerator, pusher, checkpoints, resume_path = start_run(args)  # the Hub repo first: a bad one stops the run here

    # ---------------------------------------------------------------------------------------- data + model
    base_config = load_base_config(args)  # its image size is needed first: the digits are upsampled to it
    with accelerator.main_process_first():
        train_hf, eval_hf, label_names, data_description = load_classification_data(
            args, args.image_size or base_config.image_size)
    num_classes = len(label_names)
    model, config, report = build_model(args, base_config, label_names)
    if args.gradient_checkpointing and not args.linear_probe:
        enable_gradient_checkpointing(model)
    processor, augment, augment_description = build_processing(args, config)
    num_workers = args.dataloader_num_workers if args.dataloader_num_workers is not None \
        else default_num_workers(accelerator)
    train_rows, eval_rows = ImageRows(train_hf, "image", ("label",)), ImageRows(eval_hf, "image", ("label",))
    train_dataloader = create_dataloader(
        train_rows, args.per_device_train_batch_size, num_workers=num_workers,
        collate_fn=SimMIMCollator(processor, seed=args.seed, keep_columns=("label",), do_train=True, return_mask=False,
                                  return_uint8=True),
        sampler=EpochShuffleSampler(len(train_rows), args.seed))
    eval_dataloader = create_dataloader(
        eval_rows, args.per_device_eval_batch_size, num_workers=num_workers,
        collate_fn=SimMIMCollator(processor, keep_columns=("label",), do_train=False, return_mask=False))

    # Sharded first: the epoch length the schedule needs is one process's share of the batches.
    train_dataloader, eval_dataloader = accelerator.prepare(train_dataloader, eval_dataloader)

    # ---------------------------------------------------------------------------------------- optimisation
    plan = LearningRatePlan.from_args(args, accelerator.num_processes, len(train_dataloader))
    layer_decay = None if args.linear_probe else (
        args.layer_decay if args.layer_decay is not None else official_finetune_defaults(config)["layer_decay"])
    optimizer, lr_scheduler = create_optimizer_and_scheduler(
        model, args, plan, layer_decay, fused=accelerator.distributed_type != DistributedType.FSDP or None)
    warmup_prefix = lr_scheduler.warmup_prefix  # before `prepare` wraps the scheduler
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    augment = augment.to(accelerator.device)
    checkpoints.settings = {
        **resume_settings(args, accelerator, plan, warmup_prefix, config, processor),
        "train_samples": len(train_rows), "linear_probe": args.linear_probe, "layer_decay": layer_decay,
        # The rest of the split (which labelled images are drawn) and of the objective: augmentation and the mixed,
        # smoothed targets.
        "data_seed": args.data_seed, "train_label_fraction": args.train_label_fraction,
        "augmentation": augment_description,
        "targets": {"mixup": args.mixup, "cutmix": args.cutmix, "switch_prob": args.mixup_switch_prob,
                    "label_smoothing": args.label_smoothing}}
    if accelerator.is_main_process:
        accelerator.init_trackers(args.run_name or "simmim_finetune", config={
            k: v for k, v in public_dict(args).items() if isinstance(v, (int, float, str, bool))})
        atomic_write_text(output_dir / "training_args.json", json.dumps(public_dict(args), indent=2))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"{'Linear probe' if args.linear_probe else 'Fine-tuning'} {config.encoder_type} ({trainable:,} "
                f"trainable parameters) on {len(train_rows)} train / {len(eval_rows)} eval images, {num_classes} "
                f"classes; {plan.num_epochs} epochs of {plan.steps_per_epoch} steps, total batch "
                f"{plan.total_batch_size}, {plan.describe()}, layer decay {layer_decay}")

    # ---------------------------------------------------------------------------------------- training
    use_mix = args.mixup > 0 or args.cutmix > 0

    def classification_loss(model, batch, state):
        pixel_values, labels = augment(batch["pixel_values"]), batch["labels"]
        if not use_mix:
            logits = model(pixel_values=pixel_values).logits.float()
            return F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
        # Drawn per (seed, process, position): a resumed run mixes exactly as the uninterrupted one.
        rng = np.random.default_rng([args.seed, accelerator.process_index, state.epoch, state.batches_in_epoch])
        pixel_values, targets = mix_batch(pixel_values, labels, num_classes, mixup=args.mixup, cutmix=args.cutmix,
                                          switch_prob=args.mixup_switch_prob, label_smoothing=args.label_smoothing,
                                          rng=rng)
        logits = model(pixel_values=pixel_values).logits.float()
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()

    loop = TrainingLoop(
        accelerator, model, optimizer, lr_scheduler, train_dataloader, classification_loss, plan, checkpoints,
        logging_steps=args.logging_steps, checkpointing_steps=args.checkpointing_steps,
        max_grad_norm=args.max_grad_norm, max_consecutive_nonfinite=args.max_consecutive_nonfinite,
        callbacks=[EvaluateAndSave(args, eval_dataloader, processor, num_classes, config.id2label), *callbacks],
        prepare_batch=lambda batch: {**batch, "pixel_values": processor.normalize_uint8(batch["pixel_values"])},
        description="linear probe" if args.linear_probe else "fine-tuning")
    state = loop.resume(resume_path) if resume_path is not None else None
    if state is not None:
        set_aside_later_results(accelerator, output_dir, state)
    state = loop.run(state)

    # ---------------------------------------------------------------------------------------- results
    history = state.extra.get("history", [])
    best = state.extra.get("best", {"accuracy": -1.0, "epoch": None})
    results = {"best": best, "last": history[-1] if history else None, "history": history, "epochs": plan.num_epochs,
               "unreadable_train_images": state.unreadable_images, "train_samples": len(train_rows),
               "eval_samples": len(eval_rows), "num_classes": num_classes, "linear_probe": args.linear_probe,
               "preempted": state.preempted, "stop_status": state.stop_status, "stopped_early": state.stopped_early,
               "transfer_report": None if report is None else {
                   "interpolated": report.interpolated, "expanded_shared": report.expanded_shared,
                   "missing": report.missing, "unexpected": report.unexpected, "mismatched": report.mismatched}}
    if accelerator.is_main_process:
        atomic_write_text(output_dir / "all_results.json", to_json(results))
        if not state.preempted and history and (output_dir / "best").is_dir():
            write_finetuning_card(output_dir / "best", args, config, results, data_description, plan, layer_decay,
                                  accelerator, augment_description, repo_id=pusher.repo_id if pusher else None)
        if pusher is not None and not state.preempted:
            # Not in all_results.json (written before the push): `main` exits with status 1.
            results["hub_push_failed"] = not pusher.push_and_wait(
                output_dir / "best", f"Fine-tuned: best eval accuracy {best['accuracy']:.4f}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results, accelerator.unwrap_model(model, keep_torch_compile=False)


def main(argv=None) -> int:
    results, _ = run(argv)
    best = results["best"]
    print(json.dumps({"best_accuracy": best["accuracy"], "best_epoch": best["epoch"],
                      **({"best_top5_accuracy": best["top5_accuracy"]} if "top5_accuracy" in best else {})}))
    if results["preempted"]:  # checkpointed, not finished: 128 + the signal, as a shell reports a killed process
        return results["stop_status"]
    return 1 if results.get("hub_push_failed") or results["stopped_early"] else 0  # the model is saved locally either way


if __name__ == "__main__":
    sys.exit(main())
