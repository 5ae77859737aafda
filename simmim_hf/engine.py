"""The training loop both scripts run, and the set-up around it.

`TrainingLoop` owns what every SimMIM run needs and no script should rewrite: gradient accumulation and
clipping through Accelerate, skipping non-finite steps without a host sync (`NonFiniteGuard`), the lr
schedule stepped once per optimizer update, loss / lr / grad-norm / images-per-second logging with one host
sync per logging interval, a progress bar, atomic resumable checkpoints at a fixed step interval, at the end
and on SIGTERM (`CheckpointManager`, `PreemptionHandler`), and exact resumption mid-epoch. What differs between
pretraining and fine-tuning comes in as a `compute_loss(model, batch, state)` function and `LoopCallback`s
(evaluation, reconstruction grids, best-model saving), so tests drive the loop directly and read the state it
returns.

Position: `state.epoch` and `state.batches_in_epoch` say where the data stream is; the training DataLoader
orders each epoch as a pure function of (seed, epoch) (`data.EpochShuffleSampler`), so a resumed run replays
the epoch and skips the batches already trained on.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .distributed import check_cpu_strategy, use_fsdp_on_cpu, wrap_present_layers_only
from .optimization import LearningRatePlan
from .training_utils import CheckpointManager, NonFiniteGuard, PreemptionHandler, training_setup

logger = logging.getLogger(__name__)


def create_accelerator(args, output_dir: str | os.PathLike, **kwargs):
    """The Accelerator both scripts use, from the `OptimizationArguments` / `OutputArguments` fields.

    CPU when asked or when there is no accelerator at all: without `cpu=True`, `accelerate launch --multi_gpu`
    on a GPU-less machine would try NCCL; with it, the processes form a gloo group."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()
    on_cpu = args.cpu or not has_accelerator
    if on_cpu:
        check_cpu_strategy(has_accelerator)  # before any process group exists
    trackers = args.trackers()
    check_trackers(trackers)  # before anything is trained: a missing package would mean no logs at all
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        # The schedule counts optimizer updates; by default Accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
        # `prepare` compiles the model; saving and unwrapping see the original module.
        dynamo_backend=args.torch_compile_backend.upper() if getattr(args, "torch_compile", False) else None,
        **kwargs,
    )
    if on_cpu:
        use_fsdp_on_cpu(accelerator)
    wrap_present_layers_only(accelerator)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO)
    import datasets
    import transformers

    verbosity = "warning" if accelerator.is_local_main_process else "error"
    getattr(datasets.utils.logging, f"set_verbosity_{verbosity}")()
    getattr(transformers.utils.logging, f"set_verbosity_{verbosity}")()
    return accelerator


def start_run(args):
    """What both jobs do first, in this order: the Accelerator; the Hub repo, created before anything is written
    (a deterministic failure, e.g. offline mode, no or a read-only token or a bad --hub_model_id, stops the run
    here rather than after hours of training; transient ones are retried in the background); the output folder and
    the checkpoint to resume; the seed. Returns (accelerator, pusher or None, checkpoint manager, resume path)."""
    from accelerate.utils import set_seed

    from .training_utils import HubPusher

    output_dir = Path(args.output_dir)
    accelerator = create_accelerator(args, output_dir)
    logger.info(accelerator.state)
    pusher = None
    if args.push_to_hub and accelerator.is_main_process:
        pusher = HubPusher.for_training_run(args.hub_model_id or output_dir.resolve().name,
                                            private=args.hub_private_repo or None)
    checkpoints, resume_path = prepare_output_dir(accelerator, args)
    set_seed(args.seed)
    return accelerator, pusher, checkpoints, resume_path


def resume_settings(args, accelerator, plan, warmup_prefix: bool, config, processor) -> dict[str, Any]:
    """The `CheckpointManager.settings` both jobs store with every checkpoint, to refuse a resume under others: what
    the saved position and lr schedule mean, what the restored optimizer and scheduler state hold, which images
    are trained on and evaluated, and what the model and its transform are. Each job adds its own."""
    return {
        "per_device_train_batch_size": args.per_device_train_batch_size, "num_processes": accelerator.num_processes,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
        "max_train_steps": plan.max_train_steps, "peak_lr": plan.peak_lr, "warmup_steps": plan.warmup_steps,
        "lr_scheduler_type": args.lr_scheduler_type, "warmup_prefix": warmup_prefix,
        # Restored from the checkpoint with the scheduler and optimizer state, whatever the flags now say.
        "milestones": list(plan.milestones), "warmup_lr": plan.warmup_lr, "min_lr": plan.min_lr,
        "lr_gamma": args.lr_gamma, "weight_decay": args.weight_decay,
        "adam": [args.adam_beta1, args.adam_beta2, args.adam_epsilon],
        # Which images are trained on and which are held out (another split would evaluate on trained images).
        "validation_split": args.validation_split, "validation_split_percentage": args.validation_split_percentage,
        "max_train_samples": args.max_train_samples,
        **training_setup(config, processor),
    }


def check_trackers(trackers) -> None:
    """Refuse a `--report_to` tracker that is unknown or not installed: Accelerate only warns and trains with no
    tracking at all."""
    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if trackers is None or trackers == "all":
        return
    for name in trackers:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"--report_to: unknown tracker {name!r}; expected 'none', 'all' or a comma-separated "
                             f"list of {sorted(LOGGER_TYPE_TO_CLASS)}.")
        available = getattr(accelerate.utils, f"is_{name}_available", None)
        if available is not None and not available():
            raise ValueError(f"--report_to {name}: the {name!r} package is not installed (pip install {name}), or "
                             "pass --report_to none.")


def prepare_output_dir(accelerator, args) -> tuple[CheckpointManager, Path | None]:
    """Check `--output_dir` against `--overwrite_output_dir` / `--resume_from_checkpoint` and return the checkpoint
    manager and the checkpoint to resume (or None).

    Checked on every rank (same filesystem), so no rank waits forever for one that raised. A non-empty folder with
    nothing to resume is only taken over when it is this script's own run stopped before its first checkpoint
    (it wrote training_args.json); anything else needs --overwrite_output_dir, which deletes its checkpoints
    at this run's first save."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} is a file; expected a folder (new or empty, or this "
                                 "script's own run).")
    checkpoints = CheckpointManager(accelerator, output_dir, args.checkpoints_total_limit)
    if args.overwrite_output_dir:
        checkpoints.start_over()
    resume_path = checkpoints.resolve(args.resume_from_checkpoint)
    own_unfinished_run = args.resume_from_checkpoint == "latest" and (output_dir / "training_args.json").is_file()
    if own_unfinished_run and resume_path is None and (output_dir / "all_results.json").is_file() \
            and not args.overwrite_output_dir:
        raise ValueError(f"--output_dir {output_dir} holds a finished run (all_results.json) but no checkpoint to "
                         "resume (its checkpoints/ was removed?): training again would overwrite its models. Pass "
                         "--overwrite_output_dir to train again, or choose another folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and resume_path is None \
            and not args.overwrite_output_dir and not own_unfinished_run:
        earlier = checkpoints.list_checkpoints()
        if earlier:  # the likeliest case: the same command run again after an interruption
            raise ValueError(f"--output_dir {output_dir} holds checkpoints of an earlier run (latest: "
                             f"{earlier[-1].name}). Pass --resume_from_checkpoint latest to continue it, or "
                             "--overwrite_output_dir to start over (its checkpoints are then deleted).")
        raise ValueError(f"--output_dir {output_dir} is not empty and holds no checkpoint to resume. Pass "
                         "--overwrite_output_dir to start over in it (its files may be overwritten), or choose "
                         "another folder.")
    # A checkpoint of another folder continues that run here: only into a new or empty folder, whose own files
    # (another run's models, checkpoints that rotation would delete) it would otherwise overwrite.
    foreign_resume = resume_path is not None and checkpoints.root.resolve() not in resume_path.resolve().parents
    if foreign_resume and output_dir.is_dir():
        own = checkpoints.list_checkpoints()
        if own:  # e.g. the same command again after a preemption: the run's progress is in its own checkpoints
            raise ValueError(f"--output_dir {output_dir} holds checkpoints of its own (latest: {own[-1].name}), "
                             f"which resuming from {resume_path} again would supersede. Pass "
                             "--resume_from_checkpoint latest to continue this run, or resume into a new or empty "
                             "--output_dir.")
        # What an attempt that stopped before its first checkpoint leaves (its arguments, its tracker logs).
        foreign_files = [p.name for p in output_dir.iterdir() if p.name not in ("training_args.json", "logs",
                                                                                "checkpoints")]
        if foreign_files:
            raise ValueError(f"--resume_from_checkpoint {resume_path} is not one of --output_dir {output_dir}'s "
                             f"checkpoints, and that folder holds other files ({', '.join(sorted(foreign_files)[:5])}): "
                             "continuing there would overwrite them. Resume into a new or empty --output_dir.")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return checkpoints, resume_path


@dataclass
class TrainState:
    """Where a run is. `extra` holds the callbacks' resumable state (JSON values, saved with every checkpoint)."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    last_loss: float = float("nan")
    skipped_steps: int = 0
    unreadable_images: int = 0
    stopped_early: bool = False
    preempted: bool = False
    # The exit status a preempted job ends with: 128 + the signal (143 for SIGTERM), as a shell reports a
    # process the signal killed, so a scheduler, a retry wrapper or `pretrain && finetune` sees an unfinished run.
    stop_status: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class LoopCallback:
    """Hooks of `TrainingLoop`; every method is optional. Collective work (evaluation, saving) is fine: every
    rank calls every hook at the same point."""

    def on_step_end(self, loop: "TrainingLoop", state: TrainState) -> None:
        """After each optimizer step (and its logging)."""

    def on_epoch_end(self, loop: "TrainingLoop", state: TrainState) -> None:
        """After an epoch's last step, and once when training ends (step budget, early stop) mid-epoch."""

    def on_log(self, loop: "TrainingLoop", state: TrainState, logs: dict[str, float]) -> None:
        """With the values just logged (host floats)."""


class TrainingLoop:
    """Optimise `model` on `train_dataloader` for `plan.max_train_steps` optimizer steps.

    Args:
        accelerator: the run's `Accelerator`; `model`, `optimizer`, `lr_scheduler` and (unless `streaming`)
            `train_dataloader` already went through `accelerator.prepare`.
        compute_loss: `(model, batch, state) -> scalar loss` for one micro-batch.
        plan: the run's `LearningRatePlan` (step budget, steps per epoch).
        checkpoints: where resumable checkpoints go; `settings` should already hold what the saved position means.
        logging_steps / checkpointing_steps: intervals in optimizer steps (`None`: checkpoint only at the end).
        max_grad_norm: clipping norm (0 = no clipping; the norm is still computed for the non-finite guard).
        max_consecutive_nonfinite: stop after this many skipped steps in a row (0 = never).
        streaming: `train_dataloader` iterates a stream that never ends (`data.StreamingImageRows`); it is not
            prepared, so batches are moved to the device here.
        on_checkpoint: called with each saved checkpoint folder (e.g. to push it to the Hub).
        prepare_batch: applied to each batch on the device before `compute_loss` (e.g. the normalisation of
            uint8 pixels, `SimMIMImageProcessor.normalize_uint8`).
    """

    def __init__(self, accelerator, model, optimizer, lr_scheduler, train_dataloader,
                 compute_loss: Callable[[torch.nn.Module, dict, TrainState], torch.Tensor], plan: LearningRatePlan,
                 checkpoints: CheckpointManager, *, logging_steps: int = 10, checkpointing_steps: int | None = None,
                 max_grad_norm: float = 0.0, max_consecutive_nonfinite: int = 0, streaming: bool = False,
                 callbacks: Sequence[LoopCallback] = (), on_checkpoint: Callable[[Path], None] | None = None,
                 prepare_batch: Callable[[dict], dict] | None = None, description: str = "training"):
        self.accelerator = accelerator
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.train_dataloader = train_dataloader
        self.compute_loss = compute_loss
        self.plan = plan
        self.checkpoints = checkpoints
        self.logging_steps = logging_steps
        self.checkpointing_steps = checkpointing_steps
        self.max_grad_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        self.streaming = streaming
        self.callbacks = list(callbacks)
        self.on_checkpoint = on_checkpoint
        self.prepare_batch = prepare_batch
        self.description = description
        self.last_checkpoint_step: int | None = None
        self._epoch_end_step: int | None = None
        device = accelerator.device
        self.guard = NonFiniteGuard(max_consecutive_nonfinite, device)
        # The fused optimizer skips a non-finite step itself; a GradScaler (fp16) skips them its own way.
        self.guard_on_optimizer = NonFiniteGuard.supports(optimizer) and accelerator.scaler is None
        # Any other optimizer (FSDP's) is skipped from the host: one sync per optimizer step.
        self.guard_on_host = not self.guard_on_optimizer and accelerator.scaler is None
        if self.guard_on_host:
            logger.info("The optimizer cannot skip a non-finite step by itself (not fused); the gradient norm is "
                        "checked on the host before every optimizer step instead (one sync per step).")
        # Running sums on the device, read once per logging interval.
        self._loss_sum = torch.zeros((), device=device)
        self._loss_count = torch.zeros((), device=device)
        self._unreadable = torch.zeros((), device=device)
        self._grad_norm = torch.zeros((), device=device)
        self._images = 0
        self._steps_since_log = 0
        # images/s counts training time only: evaluation, pictures and checkpoints (step and epoch hooks) run
        # "aside", and the time aside is left out of the interval it falls in, also when a hook logs mid-way.
        self._log_time = time.perf_counter()
        self._aside_time = 0.0
        self._aside_since: float | None = None

    # ------------------------------------------------------------------------------------------ resuming
    def resume(self, path: str | os.PathLike) -> TrainState:
        """Restore the Accelerate state saved at `path` (collective) and return the position it stands for."""
        stored = self.checkpoints.load(path)
        logger.info(f"Resumed from checkpoint {path} (step {stored['step']})")
        stats = stored.get("stats") or {}
        state = TrainState(global_step=int(stored["step"]), epoch=int(stored.get("epoch", 0)),
                           batches_in_epoch=int(stored.get("batches_in_epoch", 0)),
                           last_loss=float("nan") if stats.get("last_loss") is None else float(stats["last_loss"]),
                           skipped_steps=int(stats.get("skipped_steps", 0)),
                           unreadable_images=int(stats.get("unreadable_images", 0)),
                           extra=dict(stored.get("extra") or {}))
        self.guard.resume(state.skipped_steps, stats.get("consecutive_nonfinite", 0))
        if stats.get("epoch_end_hooks_done"):
            self._epoch_end_step = state.global_step
        self.last_checkpoint_step = state.global_step  # what a save at this step would write is already there
        return state

    def save_checkpoint(self, state: TrainState) -> Path:
        """Save a resumable checkpoint at the current step (collective). An epoch whose end hooks have run is stored
        as the start of the next one; one whose last batch is done but whose hooks have not (a signal, or a
        `checkpointing_steps` save, on its last step) stays at its end, so a resumed run runs them."""
        if self._steps_since_log:  # the run's counts (skipped steps, unreadable images) up to this step go with it
            self._log(state, None)
        epoch, batches = state.epoch, state.batches_in_epoch
        if (self.plan.steps_per_epoch is not None and not self.streaming and batches >= len(self.train_dataloader)
                and self._epoch_end_step == state.global_step):
            epoch, batches = epoch + 1, 0
        stats = {"last_loss": state.last_loss if math.isfinite(state.last_loss) else None,
                 "skipped_steps": state.skipped_steps,
                 "unreadable_images": state.unreadable_images,
                 # A run of non-finite steps continues across a resume: the stop rule sees the same count.
                 "consecutive_nonfinite": int(self.guard.consecutive.item()),
                 # The last epoch's end hooks ran at this step: a resume must not run them again.
                 "epoch_end_hooks_done": self._epoch_end_step == state.global_step}
        path = self.checkpoints.save(state.global_step, {"epoch": epoch, "batches_in_epoch": batches,
                                                         "stats": stats, "extra": state.extra})
        self.last_checkpoint_step = state.global_step
        logger.info(f"Saved checkpoint {path}")
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)
        return path

    # ------------------------------------------------------------------------------------------ the loop
    def _epoch_batches(self, state: TrainState):
        if self.streaming:
            # A stream loops over its epochs itself; the position is the number of batches since `state.epoch` began.
            self.train_dataloader.dataset.set_position(state.epoch, state.batches_in_epoch
                                                       * self.train_dataloader.batch_size)
            device = self.accelerator.device
            return ({k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in self.train_dataloader)
        self.train_dataloader.set_epoch(state.epoch)
        if state.batches_in_epoch:
            # Replays the epoch's (seeded) order, dropping the batches already trained on.
            return self.accelerator.skip_first_batches(self.train_dataloader, state.batches_in_epoch)
        return self.train_dataloader

    def _train_on(self, batch: dict, state: TrainState) -> None:
        accelerator = self.accelerator
        if self.prepare_batch is not None:
            batch = self.prepare_batch(batch)
        with accelerator.accumulate(self.model):
            loss = self.compute_loss(self.model, batch, state)
            accelerator.backward(loss * self._window_scale(state))
            finite = torch.isfinite(loss.detach())
            self._loss_sum += torch.where(finite, loss.detach().float(), 0.0)
            self._loss_count += finite.float()
            if accelerator.sync_gradients:
                # After the gradient all-reduce: every rank gets the same norm, hence the same decision.
                grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                found_inf = self.guard.update(grad_norm)
                self._grad_norm = grad_norm.detach()
                if self.guard_on_optimizer:
                    NonFiniteGuard.attach(self.optimizer, found_inf)
                if not (self.guard_on_host and found_inf.item()):  # a skipped step leaves weights and moments alone
                    self.optimizer.step()
                if self.guard_on_optimizer:
                    NonFiniteGuard.detach(self.optimizer)
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        if "unreadable" in batch:
            self._unreadable += batch["unreadable"].sum().to(self._unreadable.device)
        self._images += batch["pixel_values"].shape[0] * accelerator.num_processes

    def _window_scale(self, state: TrainState) -> float:
        """Accelerate divides every micro-batch's loss by the accumulation count G and steps at the end of an epoch
        whatever the count: the k < G micro-batches of an epoch's last, short window would give a gradient k / G
        of the mean. Scaled by G / k, it is the mean over the micro-batches it has."""
        accumulation = self.accelerator.gradient_accumulation_steps
        if accumulation == 1 or self.streaming:
            return 1.0
        batches = len(self.train_dataloader)
        last_window = batches % accumulation
        return accumulation / last_window if last_window and state.batches_in_epoch >= batches - last_window else 1.0

    def _log(self, state: TrainState, progress) -> None:
        accelerator = self.accelerator
        stats = accelerator.reduce(torch.stack([self._loss_sum, self._loss_count, self._unreadable]), reduction="sum")
        loss_total, count, unreadable = stats.tolist()  # the host sync of this interval
        now = time.perf_counter()
        aside = self._aside_time + (now - self._aside_since if self._aside_since is not None else 0.0)
        images_per_sec = self._images / max(now - self._log_time - aside, 1e-9)
        state.last_loss = loss_total / count if count else float("nan")
        lr = self.lr_scheduler.get_last_lr()[-1]
        logs = {"train/loss": state.last_loss, "train/lr": lr, "train/grad_norm": self._grad_norm.float().item(),
                "train/images_per_sec": images_per_sec, "train/epoch": state.epoch}
        if unreadable:
            state.unreadable_images += int(unreadable)
            logger.warning(f"{int(unreadable)} unreadable image(s) replaced by other images of their batch in the "
                           f"last {self._steps_since_log} steps.")
            logs["train/unreadable_images"] = unreadable
        if self.guard.check():
            logger.error(f"{self.guard.max_consecutive} optimizer steps in a row had a non-finite loss/gradient; "
                         "stopping (the weights are those before the first skipped step).")
            state.stopped_early = True
        state.skipped_steps = self.guard.total_skipped
        logs["train/skipped_steps"] = state.skipped_steps
        accelerator.log(logs, step=state.global_step)
        if progress is not None:
            progress.set_postfix(loss=f"{state.last_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_sec:.0f}")
        logger.info(f"step {state.global_step}/{self.plan.max_train_steps} epoch {state.epoch} loss "
                    f"{state.last_loss:.4f} lr {lr:.3e} grad_norm {logs['train/grad_norm']:.3f} images/s "
                    f"{images_per_sec:.1f}")
        for callback in self.callbacks:
            callback.on_log(self, state, logs)
        for tensor in (self._loss_sum, self._loss_count, self._unreadable):
            tensor.zero_()
        self._images, self._steps_since_log, self._log_time, self._aside_time = 0, 0, now, 0.0
        if self._aside_since is not None:  # logged from inside a hook: the rest of it belongs to the next interval
            self._aside_since = now

    def _step_aside(self) -> None:
        self._aside_since = time.perf_counter()

    def _step_back(self) -> None:
        self._aside_time += time.perf_counter() - self._aside_since
        self._aside_since = None

    def _end_epoch(self, state: TrainState) -> None:
        if self._epoch_end_step == state.global_step:
            return  # training ended right where an epoch ended: the hooks ran already
        self._epoch_end_step = state.global_step
        self._step_aside()
        for callback in self.callbacks:
            callback.on_epoch_end(self, state)
        self._step_back()

    def run(self, state: TrainState | None = None) -> TrainState:
        """Train from `state` (default: the start) until the step budget, an early stop or a signal; returns the
        final state. A checkpoint is saved at the end (or on the signal) unless one was just saved."""
        state = state or TrainState()
        max_steps = self.plan.max_train_steps
        progress = None
        try:
            from tqdm.auto import tqdm

            progress = tqdm(total=max_steps, initial=state.global_step, desc=self.description, dynamic_ncols=True,
                            disable=not self.accelerator.is_local_main_process)
        except ImportError:
            pass
        preemption = PreemptionHandler()
        self.model.train()
        try:
            self._train_until_done(state, max_steps, progress, preemption)
            if self._steps_since_log:
                self._log(state, None)  # the counts of a last, partial interval are not lost
            if state.preempted:
                logger.warning(f"Received signal {preemption.received}; saving a checkpoint at step "
                               f"{state.global_step} and stopping. Resume with --resume_from_checkpoint latest.")
            else:
                self._end_epoch(state)
            if self.last_checkpoint_step != state.global_step:
                self.save_checkpoint(state)
        finally:
            # Only after the final save: a stop signal during the last epoch's hooks (fine-tuning's evaluation and
            # best/ / last/ saves) or the checkpoint itself waits for them instead of killing the run unsaved.
            preemption.restore()
        return state

    def _train_until_done(self, state: TrainState, max_steps: int, progress, preemption) -> None:
        """The step loop: until the step budget, an early stop or a stop signal (then `state.preempted`)."""
        try:
            while state.global_step < max_steps and not state.stopped_early:
                for batch in self._epoch_batches(state):
                    self._train_on(batch, state)
                    state.batches_in_epoch += 1
                    if not self.accelerator.sync_gradients:
                        continue
                    state.global_step += 1
                    self._steps_since_log += 1
                    if progress is not None:
                        progress.update(1)
                    if state.global_step % self.logging_steps == 0 or state.global_step == max_steps:
                        self._log(state, progress)
                    self._step_aside()  # evaluation, pictures and checkpoints are not training
                    for callback in self.callbacks:
                        callback.on_step_end(self, state)
                    if self.checkpointing_steps and state.global_step % self.checkpointing_steps == 0:
                        self.save_checkpoint(state)
                    self._step_back()
                    if preemption.should_stop():
                        state.preempted = True
                        # Another rank's signal stops this one too (the flag is all-reduced): report SIGTERM then.
                        state.stop_status = 128 + int(preemption.received or signal.SIGTERM)
                        break
                    if state.stopped_early or state.global_step >= max_steps:
                        break
                else:  # the epoch ran out
                    self._end_epoch(state)
                    state.epoch += 1
                    state.batches_in_epoch = 0
                    continue
                break
        finally:
            if progress is not None:
                progress.close()


def default_num_workers(accelerator) -> int:
    """DataLoader workers per training process: one core per process runs the model, the spare cores decode and
    augment. At least one worker: loading in the training process would stall every step."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return max(1, min(8, cores // max(1, local_processes) - 1))



def save_model(accelerator, model, folder: str | os.PathLike, processor=None) -> None:
    """`save_pretrained` of the unwrapped model (and `processor`) into `folder` (collective: under FSDP the state
    dict gathers the shards on every rank; only the main process writes)."""
    # Under --torch_compile the state dict comes from the compiled wrapper: its keys carry `_orig_mod.`.
    state_dict = {key.removeprefix("_orig_mod."): value for key, value in accelerator.get_state_dict(model).items()}
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if accelerator.is_main_process:
        Path(folder).mkdir(parents=True, exist_ok=True)
    # FSDP2's `fully_shard` changes the class in place (FSDP<Model>, defined in torch's _fsdp_init.py), and
    # `save_pretrained` would copy torch's FSDP sources as the remote code and point `auto_map` at them.
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type(unwrapped)
    plain_class = next(c for c in sharded_class.__mro__ if not issubclass(c, FSDPModule))
    try:
        unwrapped.__class__ = plain_class
        unwrapped.save_pretrained(folder, is_main_process=accelerator.is_main_process, state_dict=state_dict)
    finally:
        unwrapped.__class__ = sharded_class
    if processor is not None and accelerator.is_main_process:
        processor.save_pretrained(folder)
    accelerator.wait_for_everyone()


__all__ = ["LoopCallback", "TrainState", "TrainingLoop", "create_accelerator", "default_num_workers",
           "prepare_output_dir", "save_model", "start_run"]
