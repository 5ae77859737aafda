"""SimMIM masked-image-modeling pretraining with 🤗 Accelerate.

Runs anywhere Accelerate runs: plain `python` (one CPU or GPU), `accelerate launch` with DDP over GPUs and
nodes, mixed precision, FSDP (see `examples/accelerate_configs/`). With no data arguments it trains on a
small embedded set of real photos, so this works on a fresh machine without network:

    accelerate launch examples/run_pretraining.py --output_dir runs/demo

Real data: a local folder of images (`--train_dir`, read by `datasets`' imagefolder), or a Hub dataset
(`--dataset_name`, `--streaming` for sets too large to download first). The same job runs as
`accelerate launch -m simmim_hf.run_pretraining` or, installed, `simmim-pretrain`.

What it guarantees:
* Each sample's crop, flip and mask are a function of (seed, epoch, sample index) only, so resuming, the
  number of dataloader workers and the world size never change what a sample sees.
* Checkpoints (model, optimizer, scheduler, RNG, data position) are written atomically; resuming from
  step N gives the same weights as an uninterrupted run. SIGTERM (or SIGUSR1) saves a checkpoint and exits with status 128 + the signal (143),
  so a scheduler or a shell chain sees an unfinished run.
* Steps with a non-finite loss are skipped (warning), and the run stops after N in a row.
* The final model is a `save_pretrained` folder with the processor config, the model code (loadable with
  `trust_remote_code=True` without simmim_hf installed) and a model card; optionally pushed to the Hub.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from pathlib import Path

import torch
from accelerate import DistributedType

from . import SimMIMConfig, SimMIMForMaskedImageModeling
from .arguments import PretrainingArguments, apply_config_overrides, parse_args, public_dict
from .cards import write_pretraining_card
from .data import (
    EpochShuffleSampler,
    ImageRows,
    SimMIMCollator,
    StreamingImageRows,
    create_dataloader,
    load_pretraining_data,
)
from .engine import LoopCallback, TrainingLoop, default_num_workers, resume_settings, save_model, start_run
from .image_processing_simmim import SimMIMImageProcessor
from .masking import expected_average_masked_distance
from .optimization import LearningRatePlan, create_optimizer_and_scheduler
from .training_utils import atomic_write_text, enable_gradient_checkpointing, to_json
from .visualization import save_reconstruction_grid

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "vit-micro-p8-64"
# Output-folder entries that are not part of the model (never pushed as the model).
NOT_MODEL_PATTERNS = ["checkpoints/*", "logs/*", "reconstructions/*", "*.log"]


def build_model_and_processor(args: PretrainingArguments):
    """(model, processor, description of where it came from): continued pretraining of a checkpoint, or a new
    model from --config_name / --preset (+ --config_overrides)."""
    components = args.component_overrides()
    if args.model_name_or_path:
        if args.config_overrides or components:
            given = ", ".join(["--config_overrides"] * bool(args.config_overrides) + [f"--{k}" for k in components])
            raise ValueError(f"{given} cannot change a pretrained model's architecture or objective; use "
                             "--config_name or --preset to start from scratch.")
        model = SimMIMForMaskedImageModeling.from_pretrained(
            args.model_name_or_path, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)
        try:
            processor = SimMIMImageProcessor.from_pretrained(args.model_name_or_path, cache_dir=args.cache_dir)
        except (OSError, ValueError):
            processor = SimMIMImageProcessor.from_config(model.config)
        if args.mask_strategy:
            processor.mask_strategy = args.mask_strategy
        return model, processor, args.model_name_or_path
    if args.config_name:
        config, source = SimMIMConfig.from_pretrained(args.config_name, cache_dir=args.cache_dir), args.config_name
    else:
        source = args.preset or DEFAULT_PRESET
        config = SimMIMConfig.from_preset(source)
    if components:
        try:
            config = config.with_overrides(components)
        except ValueError as err:
            raise ValueError(f"The component flags ({', '.join(f'--{k}' for k in components)}): {err}") from None
        source += " (" + ", ".join(f"{k}={v}" for k, v in components.items()) + ")"
    config = apply_config_overrides(config, args.config_overrides)
    if args.config_overrides:
        source += f" ({args.config_overrides})"
    processor = SimMIMImageProcessor.from_config(
        config, **({"mask_strategy": args.mask_strategy} if args.mask_strategy else {}))
    return SimMIMForMaskedImageModeling(config), processor, source


def masked_image_modeling_loss(model, batch, state):
    return model(pixel_values=batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"]).loss


@torch.no_grad()
def evaluate(model, dataloader, accelerator) -> float:
    """Mean masked-pixel loss over the evaluation set (center crops, masks fixed by (seed, index)), each image
    once: in a multi-process run the samples Accelerate repeats to fill the last batches (`even_batches`) are
    masked out of the loss and not counted (with `loss_area="all"`, which ignores the mask, a batch mixing both
    still averages over its repeats)."""
    model.eval()
    totals = torch.zeros(2, device=accelerator.device)
    for batch in dataloader:
        # A streamed evaluation set's loader is not prepared by Accelerate: its batches are still on the host.
        batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
        mask, size = batch["bool_masked_pos"], batch["pixel_values"].shape[0]
        real = _real_samples(accelerator, size)
        if real < size:
            mask = mask.clone()
            mask[real:] = False
        loss = model(pixel_values=batch["pixel_values"], bool_masked_pos=mask).loss
        totals += torch.stack([loss.float() * real, torch.tensor(float(real), device=totals.device)])
    model.train()
    loss_sum, count = accelerator.reduce(totals, reduction="sum").tolist()
    return loss_sum / max(count, 1.0)


def _real_samples(accelerator, size: int) -> int:
    """How many of this process's `size` samples in the current batch are not padding: the last batches of a
    multi-process run are filled up with repeated samples, and `gather_for_metrics` keeps the first `remainder`
    of the gathered (process-ordered) last batch."""
    state = accelerator.gradient_state
    if accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
        return size
    return min(max(state.remainder - accelerator.process_index * size, 0), size)


@torch.no_grad()
def write_reconstructions(model, batch, processor, accelerator, path: Path) -> None:
    model.eval()
    out = model(pixel_values=batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"])
    model.train()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    # A locally normalised target's prediction is shown mapped back to the image's own normalisation.
    reconstruction = unwrapped.reconstruction_in_input_space(out.reconstruction, batch["pixel_values"])
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_reconstruction_grid(path, batch["pixel_values"], reconstruction.float(), batch["bool_masked_pos"],
                                 unwrapped.config.patch_size, image_mean=processor.image_mean,
                                 image_std=processor.image_std)


class EvaluateAndVisualize(LoopCallback):
    """The evaluation loss every --eval_steps and a reconstruction grid every --visualize_steps."""

    def __init__(self, args, eval_dataloader, vis_batch, processor):
        self.args, self.eval_dataloader, self.vis_batch, self.processor = args, eval_dataloader, vis_batch, processor
        self.eval_loss, self.eval_step = None, None
        if args.eval_steps and eval_dataloader is None:
            logger.warning(f"--eval_steps {args.eval_steps}: there is no evaluation set, so nothing is evaluated. Give "
                           "--validation_dir / --validation_split, or hold out --validation_split_percentage.")

    def on_step_end(self, loop, state):
        step, args = state.global_step, self.args
        if self.eval_dataloader is not None and args.eval_steps and step % args.eval_steps == 0:
            self.eval_step = step
            self.eval_loss = evaluate(loop.model, self.eval_dataloader, loop.accelerator)
            loop.accelerator.log({"eval/loss": self.eval_loss}, step=step)
            logger.info(f"step {step}: eval loss {self.eval_loss:.4f}")
        if self.vis_batch is not None and args.visualize_steps and step % args.visualize_steps == 0:
            write_reconstructions(loop.model, self.vis_batch, self.processor, loop.accelerator,
                                  Path(args.output_dir) / "reconstructions" / f"step_{step:07d}.png")


def main(argv=None, callbacks=()) -> int:
    args = parse_args(PretrainingArguments, argv, description=__doc__.split("\n\n")[0])
    output_dir = Path(args.output_dir)
    accelerator, pusher, checkpoints, resume_path = start_run(args)

    # ---------------------------------------------------------------------------------------- model + data
    model, processor, model_source = build_model_and_processor(args)
    config = model.config
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    with accelerator.main_process_first():  # one process downloads / prepares, the others reuse the cache
        train_hf, eval_hf, image_column, data_description = load_pretraining_data(args)
    if not args.streaming:  # what was trained on, after truncation and the held-out split
        held_out = f", {len(eval_hf)} held out for evaluation" if eval_hf is not None else ""
        embedded_repeats = args.sample_data_repeats if not (args.dataset_name or args.train_dir) else 1
        repeated = f", the photos {embedded_repeats}x per epoch" if embedded_repeats > 1 else ""
        data_description += f"; {len(train_hf)} training samples{repeated}{held_out}"
    num_workers = args.dataloader_num_workers if args.dataloader_num_workers is not None \
        else default_num_workers(accelerator)
    loader_kwargs = dict(num_workers=num_workers, pin_memory=accelerator.device.type == "cuda")
    # uint8 batches: a quarter of the bytes from the workers to the device, normalised there (`prepare_batch`).
    train_collator = SimMIMCollator(processor, seed=args.seed, do_train=True, return_mask=True, return_uint8=True)
    # Evaluation: center crops and masks fixed by (seed, index), so successive evaluations are comparable.
    eval_collator = SimMIMCollator(processor, seed=args.seed, do_train=False, return_mask=True)
    if args.streaming:
        from datasets.distributed import split_dataset_by_node

        shuffled = train_hf.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        train_rows = StreamingImageRows(split_dataset_by_node(
            shuffled, rank=accelerator.process_index, world_size=accelerator.num_processes), image_column)
        train_dataloader = create_dataloader(train_rows, args.per_device_train_batch_size, train_collator,
                                             **loader_kwargs)
    else:
        train_rows = ImageRows(train_hf, image_column)
        if len(train_rows) < args.per_device_train_batch_size * accelerator.num_processes:
            raise ValueError(f"The training set has {len(train_rows)} images, fewer than one total batch "
                             f"(--per_device_train_batch_size {args.per_device_train_batch_size} x "
                             f"{accelerator.num_processes} processes); lower the batch size.")
        # drop_last: full micro-batches on every rank (DDP in step). With accumulation an epoch's last window may
        # hold fewer of them; its gradient is still their mean (`TrainingLoop._window_scale`).
        train_dataloader = create_dataloader(train_rows, args.per_device_train_batch_size, train_collator,
                                             sampler=EpochShuffleSampler(len(train_rows), args.seed),
                                             drop_last=True, **loader_kwargs)
    eval_dataloader = None
    if eval_hf is not None:
        # One pass per evaluation (a training stream repeats forever).
        eval_rows = StreamingImageRows(eval_hf, image_column, repeat=False) if args.streaming else \
            ImageRows(eval_hf, image_column)
        eval_dataloader = create_dataloader(eval_rows, args.per_device_eval_batch_size, eval_collator,
                                            **loader_kwargs)
    # A fixed batch for the reconstruction grid: the first training images (of a stream: its first rows, read
    # once here), evaluation crops.
    if args.streaming:
        first_rows = list(itertools.islice(StreamingImageRows(train_hf, image_column, repeat=False),
                                           args.num_visualize_images))
    else:
        first_rows = [train_rows[i] for i in range(min(args.num_visualize_images, len(train_rows)))]
    vis_batch = {k: v.to(accelerator.device) for k, v in eval_collator(first_rows).items()} if first_rows else None

    if not args.streaming:  # a stream is already split per process
        # Sharded first: the epoch length the schedule needs is one process's share of the batches.
        train_dataloader = accelerator.prepare(train_dataloader)
        if eval_dataloader is not None:
            eval_dataloader = accelerator.prepare(eval_dataloader)

    # ---------------------------------------------------------------------------------------- optimisation
    plan = LearningRatePlan.from_args(args, accelerator.num_processes,
                                      None if args.streaming else len(train_dataloader))
    # The fused AdamW (one kernel; skips non-finite steps without a host sync) does not take FSDP's flat params.
    optimizer, lr_scheduler = create_optimizer_and_scheduler(
        model, args, plan, fused=accelerator.distributed_type != DistributedType.FSDP or None)
    warmup_prefix = lr_scheduler.warmup_prefix  # before `prepare` wraps the scheduler
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    # What the saved position and schedule mean: resuming under other values is refused, naming the setting.
    checkpoints.settings = {
        **resume_settings(args, accelerator, plan, warmup_prefix, config, processor),
        "train_samples": None if args.streaming else len(train_rows), "streaming": args.streaming,
        # Which DataLoader worker reads which shards, and the shuffle buffer, decide a stream's batches.
        "dataloader_num_workers": num_workers if args.streaming else None,
        "shuffle_buffer_size": args.shuffle_buffer_size if args.streaming else None}

    if accelerator.is_main_process:
        accelerator.init_trackers(args.run_name or "simmim_pretraining", config={
            k: v for k, v in public_dict(args).items() if isinstance(v, (int, float, str, bool))})
        atomic_write_text(output_dir / "training_args.json", json.dumps(public_dict(args), indent=2))
    num_params = sum(p.numel() for p in model.parameters())
    # The paper's explanation of masking: the mean distance from a masked pixel to the nearest visible one.
    avg_dist = expected_average_masked_distance(config, strategy=processor.mask_strategy)
    logger.info(f"Masking: {processor.mask_strategy}, {config.mask_patch_size} px units, ratio {config.mask_ratio}: "
                f"expected AvgDist {avg_dist:.1f} px (the paper finds 10-20 px best); head {config.head_type}, loss "
                f"{config.loss_type} over {config.loss_area} pixels, prediction resolution "
                f"{config.prediction_resolution or 'full'}, target normalisation window "
                f"{config.norm_target_patch_size or 'none'}")
    logger.info(f"SimMIM pretraining of {model_source} ({config.encoder_type}, {num_params:,} parameters, "
                f"{config.image_size} px, mask {config.mask_patch_size} px x {config.mask_ratio}) on {data_description}: "
                + (f"streamed training images, {plan.max_train_steps} steps" if args.streaming else
                   f"{len(train_rows)} training images, {plan.num_epochs} epochs of {plan.steps_per_epoch} steps")
                + f", total batch {plan.total_batch_size} ({accelerator.num_processes} "
                f"process(es)), {plan.describe()}, {num_workers} dataloader workers")

    # ---------------------------------------------------------------------------------------- training
    def push_checkpoint(path):
        # One rolling `last-checkpoint/` (transformers' hub_strategy="checkpoint"): each push replaces it whole, so
        # the repo never keeps a discarded run's or an abandoned branch's checkpoints, nor every step's optimizer.
        if pusher is not None and args.hub_push_checkpoints:
            checkpoints.protected.add(str(path))
            pusher.push(path, f"Checkpoint {path.name}", path_in_repo="last-checkpoint", delete_patterns=["*"],
                        on_done=lambda p=str(path): checkpoints.protected.discard(p))

    evaluation = EvaluateAndVisualize(args, eval_dataloader, vis_batch, processor)
    loop = TrainingLoop(
        accelerator, model, optimizer, lr_scheduler, train_dataloader, masked_image_modeling_loss, plan, checkpoints,
        logging_steps=args.logging_steps, checkpointing_steps=args.checkpointing_steps,
        max_grad_norm=args.max_grad_norm, max_consecutive_nonfinite=args.max_consecutive_nonfinite,
        streaming=args.streaming, callbacks=[evaluation, *callbacks], on_checkpoint=push_checkpoint,
        prepare_batch=lambda batch: {**batch, "pixel_values": processor.normalize_uint8(batch["pixel_values"])},
        description="pretraining")
    state = loop.resume(resume_path) if resume_path is not None else None
    state = loop.run(state)
    if state.preempted:  # checkpointed; not finished: no final model, and a non-zero status says so
        if pusher is not None:
            pusher.wait(timeout=60)
        accelerator.end_training()
        return state.stop_status

    # ---------------------------------------------------------------------------------------- saving
    if eval_dataloader is not None and evaluation.eval_step != state.global_step:  # not twice at the last step
        evaluation.eval_loss = evaluate(model, eval_dataloader, accelerator)
        accelerator.log({"eval/loss": evaluation.eval_loss}, step=state.global_step)
        logger.info(f"Final eval loss {evaluation.eval_loss:.4f}")
    if vis_batch is not None:
        write_reconstructions(model, vis_batch, processor, accelerator, output_dir / "reconstruction.png")
    save_model(accelerator, model, output_dir, processor)
    push_failed = False
    if accelerator.is_main_process:
        results = {"train_loss": state.last_loss, "eval_loss": evaluation.eval_loss, "global_step": state.global_step,
                   "skipped_nonfinite_steps": state.skipped_steps, "stopped_early": state.stopped_early,
                   "unreadable_images": state.unreadable_images}
        atomic_write_text(output_dir / "all_results.json", to_json(results))
        write_pretraining_card(output_dir, args, config, model_source, data_description, num_params, plan,
                               accelerator, state, evaluation.eval_loss, pusher.repo_id if pusher else None,
                               mask_strategy=processor.mask_strategy, avg_dist=avg_dist)
        logger.info(f"Saved the model to {output_dir}")
        if pusher is not None:
            push_failed = not pusher.push_and_wait(output_dir, f"SimMIM pretraining: {state.global_step} steps",
                                                   ignore_patterns=NOT_MODEL_PATTERNS)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 1 if state.stopped_early or push_failed else 0


if __name__ == "__main__":
    sys.exit(main())
