"""The training loop (`simmim_hf.engine.TrainingLoop`) on a toy regression, driven directly: step counting with
gradient accumulation, epoch hooks, non-finite steps skipped without touching the weights, and an exact resume
after a SIGTERM in the middle of an epoch."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from jobs import Recorder, reset_accelerate
from torch.utils.data import Dataset

from simmim_hf.data import EpochShuffleSampler, create_dataloader
from simmim_hf.engine import TrainingLoop
from simmim_hf.optimization import LearningRatePlan, create_optimizer_and_scheduler
from simmim_hf.training_utils import CheckpointManager


class Points(Dataset):
    """y = x @ w_true for 24 fixed points; items are (epoch, index) pairs from `EpochShuffleSampler`."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(24, 4, generator=generator)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, item):
        _, index = item
        return {"pixel_values": self.x[index], "target": self.y[index]}


def squared_error(model, batch, state):
    return torch.nn.functional.mse_loss(model(batch["pixel_values"]), batch["target"])


def train(tmp_path, *, accumulation=1, steps=12, callbacks=(), compute_loss=squared_error, resume=False, fused=True,
          checkpointing_steps=None):
    from accelerate import Accelerator

    reset_accelerate()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation, step_scheduler_with_optimizer=False)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
                           base_learning_rate=0.05 * 512 / 4, learning_rate=None, warmup_lr=0.0, min_lr=0.0,
                           warmup_steps=1, warmup_epochs=0, max_train_steps=steps, num_train_epochs=1,
                           lr_milestones=None, lr_scheduler_type="cosine", lr_warmup_prefix=None, lr_gamma=0.1,
                           weight_decay=0.0,
                           adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    dataset = Points()
    loader = create_dataloader(dataset, 4, None, sampler=EpochShuffleSampler(len(dataset), seed=3), drop_last=True)
    loader.collate_fn = torch.utils.data.default_collate
    plan = LearningRatePlan.from_args(args, accelerator.num_processes, len(loader))
    optimizer, scheduler = create_optimizer_and_scheduler(model, args, plan, fused=fused)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    checkpoints = CheckpointManager(accelerator, tmp_path, total_limit=3)
    loop = TrainingLoop(accelerator, model, optimizer, scheduler, loader, compute_loss, plan, checkpoints,
                        logging_steps=2, max_consecutive_nonfinite=3, callbacks=callbacks,
                        checkpointing_steps=checkpointing_steps)
    state = loop.resume(checkpoints.resolve("latest" if resume is True else resume)) if resume else None
    return loop.run(state), accelerator.unwrap_model(model)


def test_steps_epochs_and_logging_with_gradient_accumulation(tmp_path):
    recorder = Recorder()
    state, model = train(tmp_path, accumulation=2, steps=7, callbacks=[recorder])
    # 6 batches per epoch, 2 per optimizer step: 3 steps an epoch; 7 steps end inside the third epoch.
    assert state.global_step == 7 and recorder.steps == list(range(1, 8))
    assert recorder.epoch_ends == [(0, 3), (1, 6), (2, 7)]
    assert [entry["step"] for entry in recorder.logs] == [2, 4, 6, 7]
    assert recorder.logs[-1]["train/loss"] < recorder.logs[0]["train/loss"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")) == ["checkpoint-7"]


def test_an_epochs_short_last_accumulation_window_steps_on_the_mean_of_its_micro_batches(tmp_path):
    """6 batches an epoch, 4 per optimizer step: the second step has 2. Accelerate divides every loss by 4, so that
    step's gradient was half the mean of its micro-batches; it is now their mean, as a full window's."""
    own, applied = [], []

    def recorded(model, batch, state):
        weight = model.weight.detach().requires_grad_()  # this micro-batch's own gradient, on a copy
        copy = torch.nn.functional.mse_loss(batch["pixel_values"] @ weight.T + model.bias.detach(), batch["target"])
        own.append(torch.autograd.grad(copy, weight)[0])
        loss = squared_error(model, batch, state)
        if not own[:-1]:  # the first micro-batch: record every gradient that reaches the weight from now on
            model.weight.register_hook(lambda grad: applied.append(grad.clone()))
        return loss

    state, _ = train(tmp_path, accumulation=4, steps=2, compute_loss=recorded)
    assert state.global_step == 2 and len(own) == 6 and len(applied) == 6
    full, short = sum(applied[:4]), sum(applied[4:])
    torch.testing.assert_close(full, torch.stack(own[:4]).mean(0))
    torch.testing.assert_close(short, torch.stack(own[4:]).mean(0))


def test_images_per_second_leaves_out_step_and_epoch_hooks(tmp_path):
    """Hooks (evaluation, pictures, checkpoints) are not training. A checkpoint on a step that is not a logging step
    logs from inside the hooks: its time used to be taken out twice (4e9 images/s in the next interval), and the
    epoch-end hooks (fine-tuning's evaluation and saves) were counted as training."""
    import time

    class Slow(Recorder):
        def on_epoch_end(self, loop, state):
            super().on_epoch_end(loop, state)
            time.sleep(0.5)

    slow = Slow(at_step={3: lambda: time.sleep(0.5), 7: lambda: time.sleep(0.5)})
    train(tmp_path, steps=10, callbacks=[slow], checkpointing_steps=3)  # logging every 2 steps
    rates = [entry["train/images_per_sec"] for entry in slow.logs]
    # 4 images a step of a 4-input linear model: far above 4 / 0.5 s, far below a clock gone wrong.
    assert len(rates) >= 5 and all(40 < rate < 1e7 for rate in rates), rates


@pytest.mark.parametrize("fused", [True, False])  # False: FSDP's optimizer, skipped from the host
def test_a_non_finite_step_is_skipped_without_touching_the_weights(tmp_path, fused):
    snapshots = {}

    def poisoned(model, batch, state):
        snapshots[state.global_step] = model.weight.detach().clone()
        loss = squared_error(model, batch, state)
        return loss * float("nan") if state.global_step == 4 else loss

    state, model = train(tmp_path, steps=6, compute_loss=poisoned, fused=fused)
    assert torch.isfinite(model.weight).all()
    # Snapshots are taken before each step's forward: step 5 (global_step 4 at its forward) was skipped.
    assert torch.equal(snapshots[4], snapshots[5])
    assert not torch.equal(snapshots[3], snapshots[4])  # the step before it did update
    assert state.skipped_steps == 1 and not state.stopped_early


def test_a_resumed_run_keeps_the_counts_and_loss_of_the_steps_before_it(tmp_path):
    """Skipped steps (and unreadable images, counted alike) up to a checkpoint between two logging steps are
    saved with it: the resumed run's totals equal the uninterrupted run's, and so does its last loss."""
    def poisoned(model, batch, state):
        loss = squared_error(model, batch, state)
        return loss * float("nan") if state.global_step == 2 else loss  # step 3, logged at 4 (every 2 steps)

    full, _ = train(tmp_path, steps=6, compute_loss=poisoned, checkpointing_steps=3)
    assert full.skipped_steps == 1
    resumed, _ = train(tmp_path, steps=6, compute_loss=poisoned, checkpointing_steps=3,
                       resume=str(tmp_path / "checkpoints" / "checkpoint-3"))
    assert resumed.skipped_steps == 1 and resumed.last_loss == pytest.approx(full.last_loss)
    finished, _ = train(tmp_path, steps=6, compute_loss=poisoned, resume=True)  # nothing left to train
    assert finished.global_step == 6 and finished.last_loss == pytest.approx(full.last_loss)


def test_a_run_of_non_finite_steps_continues_across_a_resume(tmp_path):
    """Steps 3-5 are non-finite and the run stops after 3 in a row; resumed from step 4 (two in a row so far), it
    stops at the same point instead of training on and reporting success."""
    def poisoned(model, batch, state):
        loss = squared_error(model, batch, state)
        return loss * float("nan") if state.global_step in (2, 3, 4) else loss

    full, _ = train(tmp_path, steps=12, compute_loss=poisoned, checkpointing_steps=4)
    assert full.stopped_early and full.global_step == 6
    resumed, _ = train(tmp_path, steps=12, compute_loss=poisoned, checkpointing_steps=4,
                       resume=str(tmp_path / "checkpoints" / "checkpoint-4"))
    assert resumed.stopped_early and resumed.global_step == 6 and resumed.skipped_steps == 3


@pytest.mark.parametrize("steps", [6, 5])  # the run ends at an epoch's end, or inside an epoch
def test_resuming_a_finished_run_does_not_run_its_last_epoch_hooks_again(tmp_path, steps):
    first = Recorder()
    train(tmp_path, steps=steps, callbacks=[first])
    assert first.epoch_ends == [(0, steps)]
    again = Recorder()
    state, _ = train(tmp_path, steps=steps, callbacks=[again], resume=True)
    assert state.global_step == steps and again.steps == [] and again.epoch_ends == []


def test_a_stop_signal_during_the_last_epoch_hooks_still_ends_with_a_checkpoint(tmp_path):
    """SIGTERM while the final epoch's hooks run (fine-tuning evaluates and saves best/ there): the handler is
    still installed, so the hooks finish and the final checkpoint is written instead of the process dying."""
    class SignalAtTheEnd(Recorder):
        def on_epoch_end(self, loop, state):
            os.kill(os.getpid(), signal.SIGTERM)
            super().on_epoch_end(loop, state)

    stopper = SignalAtTheEnd()
    state, _ = train(tmp_path, steps=6, callbacks=[stopper])
    assert stopper.epoch_ends == [(0, 6)] and state.global_step == 6
    assert (tmp_path / "checkpoints" / "checkpoint-6" / "checkpoint_complete.json").is_file()


def test_sigterm_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path):
    _, full = train(tmp_path / "full", steps=12)
    stopper = Recorder(at_step={5: lambda: os.kill(os.getpid(), signal.SIGTERM)})
    state, _ = train(tmp_path / "cut", steps=12, callbacks=[stopper])
    assert state.preempted and state.global_step == 5 and stopper.steps == [1, 2, 3, 4, 5]
    assert state.stop_status == 128 + signal.SIGTERM  # the scripts' exit status: unfinished, as a shell reports it
    assert (state.epoch, state.batches_in_epoch) == (0, 5)  # in the middle of the first epoch of 6 batches
    resumer = Recorder()
    state, resumed = train(tmp_path / "cut", steps=12, callbacks=[resumer], resume=True)
    assert resumer.steps == list(range(6, 13)) and state.global_step == 12
    assert torch.equal(full.weight, resumed.weight) and torch.equal(full.bias, resumed.bias)


def test_sigusr1_stops_with_its_own_status(tmp_path):
    """SLURM's `--signal=USR1@...` warning stops the run like SIGTERM; the status names the signal (138)."""
    stopper = Recorder(at_step={2: lambda: os.kill(os.getpid(), signal.SIGUSR1)})
    state, _ = train(tmp_path / "cut", steps=12, callbacks=[stopper])
    assert state.preempted and stopper.steps == [1, 2] and state.stop_status == 128 + signal.SIGUSR1
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-2" / "checkpoint_complete.json").is_file()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sigterm_on_an_epochs_last_step_still_runs_that_epochs_end_hooks(tmp_path, accumulation):
    """The end-of-epoch hooks (fine-tuning's evaluation, best/ and last/) of an epoch cut at its last step run
    after the resume, so the resumed run sees the epochs end exactly as the uninterrupted one."""
    steps_per_epoch = 6 // accumulation
    full = Recorder()
    train(tmp_path / "full", steps=2 * steps_per_epoch, accumulation=accumulation, callbacks=[full])
    stopper = Recorder(at_step={steps_per_epoch: lambda: os.kill(os.getpid(), signal.SIGTERM)})
    state, _ = train(tmp_path / "cut", steps=2 * steps_per_epoch, accumulation=accumulation, callbacks=[stopper])
    assert state.preempted and stopper.epoch_ends == []
    resumer = Recorder()
    train(tmp_path / "cut", steps=2 * steps_per_epoch, accumulation=accumulation, callbacks=[resumer], resume=True)
    assert full.epoch_ends == [(0, steps_per_epoch), (1, 2 * steps_per_epoch)]
    assert resumer.epoch_ends == full.epoch_ends and resumer.steps == list(range(steps_per_epoch + 1,
                                                                                  2 * steps_per_epoch + 1))


def test_plan_refuses_an_epoch_without_a_step():
    args = SimpleNamespace(per_device_train_batch_size=64, gradient_accumulation_steps=1, base_learning_rate=1e-4,
                           learning_rate=None, warmup_lr=0, min_lr=0, warmup_steps=None, warmup_epochs=1,
                           max_train_steps=None, num_train_epochs=1, lr_milestones=None)
    with pytest.raises(ValueError, match="smaller than one batch"):
        LearningRatePlan.from_args(args, 1, 0)
