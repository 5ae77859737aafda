"""No silent data loss around checkpoints (issue: reliability): crash-safe same-step re-saves, rotation that
never deletes the newest checkpoint, `--overwrite_output_dir` that really starts over, the non-empty output
guard under `--resume_from_checkpoint latest`, and resuming with changed settings refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jobs import Recorder, pretrain
from test_pretraining import COMMON, REPO, SCRIPT, _max_diff, _weights

from simmim_hf import training_utils
from simmim_hf.training_utils import COMPLETE_MARKER, CheckpointManager


class FakeAccelerator:
    """The part of `Accelerator` the manager uses: `save_state` writes a weights file tagged with `tag`."""

    is_main_process = True

    def __init__(self):
        self.tag = ""
        self.loaded = None

    def wait_for_everyone(self):
        pass

    def save_state(self, folder, safe_serialization=True):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_text(self.tag)

    def load_state(self, folder):
        self.loaded = (Path(folder) / "model.safetensors").read_text()


def save(manager: CheckpointManager, step: int, tag: str) -> Path:
    manager.accelerator.tag = tag
    return manager.save(step, {"epoch": 0})


@pytest.mark.parametrize("total_limit", [None, 1])
def test_a_kill_during_a_same_step_resave_leaves_the_complete_copy_resolvable(tmp_path, monkeypatch, total_limit):
    manager = CheckpointManager(FakeAccelerator(), tmp_path, total_limit=total_limit)
    save(manager, 4, "first")
    real_replace = training_utils.os.replace
    calls = []

    def killed_after_moving_aside(src, dst):
        calls.append(Path(src).name)
        if Path(src).name.startswith(".tmp-checkpoint-4"):  # the new copy is never put in place
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(training_utils.os, "replace", killed_after_moving_aside)
    with pytest.raises(KeyboardInterrupt):
        save(manager, 4, "second")
    monkeypatch.setattr(training_utils.os, "replace", real_replace)
    assert "checkpoint-4" in calls  # the old copy was moved aside before the kill
    latest = CheckpointManager(FakeAccelerator(), tmp_path, total_limit=total_limit).resolve("latest")
    assert latest is not None and (latest / COMPLETE_MARKER).is_file()
    assert (latest / "model.safetensors").read_text() == "first"  # weights present, not a torn folder
    # The run resumes, saves again, and the set-aside copy is gone.
    manager = CheckpointManager(FakeAccelerator(), tmp_path, total_limit=total_limit)
    manager.load(latest)
    assert manager.accelerator.loaded == "first"
    final = save(manager, 4, "third")
    assert (final / "model.safetensors").read_text() == "third"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-4", "latest"]


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    manager = CheckpointManager(FakeAccelerator(), tmp_path, total_limit=1)
    save(manager, 6, "old run")  # a higher step from an earlier run in the same folder
    newest = save(manager, 2, "this run")
    assert newest.is_dir() and (newest / "model.safetensors").read_text() == "this run"
    assert [p.name for p in manager.list_checkpoints()] == ["checkpoint-2"]
    manager = CheckpointManager(FakeAccelerator(), tmp_path, total_limit=2)
    for step in (3, 4, 5):
        save(manager, step, f"step {step}")
    assert [p.name for p in manager.list_checkpoints()] == ["checkpoint-4", "checkpoint-5"]


def test_a_start_over_whose_first_save_fails_keeps_the_previous_run(tmp_path):
    """--overwrite_output_dir with a full disk at the first save: the previous run's checkpoints come back and stay
    resolvable; once a first save succeeds they are gone."""
    previous = CheckpointManager(FakeAccelerator(), tmp_path)
    for step in (4, 6):
        save(previous, step, f"previous {step}")

    class FullDisk(FakeAccelerator):
        def save_state(self, folder, safe_serialization=True):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "model.safetensors").write_text("torn")
            raise OSError(28, "No space left on device")

    manager = CheckpointManager(FullDisk(), tmp_path)
    manager.start_over()
    with pytest.raises(OSError, match="No space"):
        save(manager, 2, "new")
    resumable = CheckpointManager(FakeAccelerator(), tmp_path)
    assert [p.name for p in resumable.list_checkpoints()] == ["checkpoint-4", "checkpoint-6"]
    assert (resumable.resolve("latest") / "model.safetensors").read_text() == "previous 6"
    for name in ("logs", "reconstructions"):  # the previous run's tracker logs and pictures go with it
        (tmp_path / name).mkdir()
        (tmp_path / name / "old").write_text("previous")
    manager = CheckpointManager(FakeAccelerator(), tmp_path)
    manager.start_over()
    assert not (tmp_path / "logs").exists()  # held before this run's trackers write there
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "new").write_text("this run")
    save(manager, 2, "new")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2", "latest"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "logs"]
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["new"]
    # Two start-overs that never save: the records held are still those of the run that has checkpoints.
    for attempt in ("first", "second"):
        CheckpointManager(FakeAccelerator(), tmp_path).start_over()
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / attempt).write_text("aborted")
    assert [p.name for p in (tmp_path / ".previous-run-logs").iterdir()] == ["new"]


def test_checkpoint_files_are_durable_before_the_marker_calls_it_complete(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(training_utils.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    real_write = training_utils.atomic_write_text
    order = []

    def write(path, text, *args, **kwargs):
        if Path(path).name == COMPLETE_MARKER:
            order.append(list(synced))
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(training_utils, "atomic_write_text", write)
    save(CheckpointManager(FakeAccelerator(), tmp_path), 3, "x")
    assert any(name.endswith("model.safetensors") for name in order[0]), order


def test_resuming_with_changed_settings_is_refused_by_name(tmp_path):
    settings = {"per_device_train_batch_size": 4, "num_processes": 1, "peak_lr": 1e-3}
    manager = CheckpointManager(FakeAccelerator(), tmp_path, settings=settings)
    path = save(manager, 3, "x")
    same = CheckpointManager(FakeAccelerator(), tmp_path, settings=dict(settings))
    assert same.load(path)["step"] == 3
    changed = CheckpointManager(FakeAccelerator(), tmp_path, settings={**settings, "per_device_train_batch_size": 8})
    with pytest.raises(ValueError, match=r"per_device_train_batch_size: 4 in the checkpoint, 8 now") as err:
        changed.load(path)
    assert "peak_lr" not in str(err.value) and changed.accelerator.loaded is None  # nothing was restored


# ------------------------------------------------------------------------------------------- the script
TINY = [*COMMON, "--max_train_steps", "4", "--checkpointing_steps", "2", "--dataloader_num_workers", "0"]


def test_overwrite_output_dir_starts_over_and_latest_never_resumes_the_old_run(tmp_path, capsys):
    out = tmp_path / "out"
    assert pretrain(["--output_dir", out, *TINY, "--max_train_steps", "6", "--checkpointing_steps", "3",
                     "--seed", "1"]) == 0
    assert (out / "checkpoints" / "checkpoint-6").is_dir()
    assert pretrain(["--output_dir", out, *TINY, "--seed", "2", "--overwrite_output_dir",
                     "--checkpoints_total_limit", "1"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4"]
    b_weights = _weights(out)
    # A later resume finds run B's finished state (nothing left to train), never run A's checkpoint-6.
    recorder = Recorder()
    assert pretrain(["--output_dir", out, *TINY, "--seed", "2", "--checkpoints_total_limit", "1",
                     "--resume_from_checkpoint", "latest"], callbacks=[recorder]) == 0
    assert recorder.steps == []
    after = _weights(out)
    assert all((after[k] == b_weights[k]).all() for k in after)
    assert json.loads((out / "training_args.json").read_text())["seed"] == 2
    # Contradictory flags are refused up front, with argparse's usage error.
    with pytest.raises(SystemExit) as exit_info:
        pretrain(["--output_dir", out, *TINY, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"])
    assert exit_info.value.code == 2 and "contradict" in capsys.readouterr().err


def test_an_overwrite_run_that_fails_before_saving_destroys_nothing(tmp_path):
    out = tmp_path / "out"
    assert pretrain(["--output_dir", out, *TINY, "--max_train_steps", "3"]) == 0
    with pytest.raises(FileNotFoundError, match="train_dir"):  # a mistyped folder, found after the output checks
        pretrain(["--output_dir", out, *TINY, "--overwrite_output_dir", "--train_dir", tmp_path / "typo"])
    assert (out / "checkpoints" / "checkpoint-3" / COMPLETE_MARKER).is_file()


def test_resume_latest_does_not_take_over_a_foreign_non_empty_folder(tmp_path):
    out = tmp_path / "user"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match="not empty.*--overwrite_output_dir"):
        pretrain(["--output_dir", out, *TINY, "--resume_from_checkpoint", "latest"])
    assert (out / "README.md").read_text() == "my notes" and json.loads((out / "config.json").read_text()) == {"mine": True}


def test_resuming_another_folders_checkpoint_never_takes_over_a_non_empty_folder(tmp_path):
    """--resume_from_checkpoint <run A's checkpoint> --output_dir <run B>: B's models and checkpoints (which
    rotation would delete) were overwritten; now refused, and a new folder continues run A exactly."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert pretrain(["--output_dir", a, *TINY]) == 0
    assert pretrain(["--output_dir", b, *TINY, "--seed", "3"]) == 0
    before = {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"holds checkpoints of its own \(latest: checkpoint-4\).*"
                                         "--resume_from_checkpoint latest"):
        pretrain(["--output_dir", b, *TINY, "--resume_from_checkpoint", a / "checkpoints" / "checkpoint-2"])
    assert {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()} == before
    notes = tmp_path / "notes"  # another folder's files, no checkpoints
    notes.mkdir()
    (notes / "README.md").write_text("mine")
    with pytest.raises(ValueError, match=r"not one of --output_dir .* checkpoints, and that folder holds other "
                                         r"files \(README.md\)"):
        pretrain(["--output_dir", notes, *TINY, "--resume_from_checkpoint", a / "checkpoints" / "checkpoint-2"])
    # A folder with only what an attempt that stopped before its first checkpoint leaves is this run's own.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "training_args.json").write_text("{}")
    recorder = Recorder()
    assert pretrain(["--output_dir", tmp_path / "c", *TINY, "--resume_from_checkpoint",
                     a / "checkpoints" / "checkpoint-2"], callbacks=[recorder]) == 0
    assert recorder.steps == [3, 4] and _max_diff(_weights(a), _weights(tmp_path / "c")) == 0
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(latest: checkpoint-4\)\. Pass "
                                         "--resume_from_checkpoint latest"):
        pretrain(["--output_dir", b, *TINY])  # the same command again
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--output_dir .*file is a file"):
        pretrain(["--output_dir", tmp_path / "file", *TINY])


def test_resume_latest_never_retrains_a_finished_run_whose_checkpoints_are_gone(tmp_path):
    """A requeued job on a finished run after someone removed checkpoints/: refused, its models kept."""
    import shutil

    out = tmp_path / "out"
    assert pretrain(["--output_dir", out, *TINY]) == 0
    shutil.rmtree(out / "checkpoints")
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="finished run.*no checkpoint to resume.*--overwrite_output_dir"):
        pretrain(["--output_dir", out, *TINY, "--resume_from_checkpoint", "latest"])
    assert (out / "model.safetensors").read_bytes() == weights


def test_resume_refuses_schedule_and_optimizer_flags_the_checkpoint_would_override(tmp_path):
    """The scheduler's and AdamW's saved state (milestones, gamma, warmup/min lr, weight decay, betas) comes back
    with the checkpoint: new values for them would be logged and carded but never used."""
    out = tmp_path / "out"
    assert pretrain(["--output_dir", out, *TINY]) == 0
    with pytest.raises(ValueError) as err:
        pretrain(["--output_dir", out, *TINY, "--weight_decay", "0.1", "--lr_gamma", "0.5",
                  "--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-2")])
    assert "weight_decay: 0.05 in the checkpoint, 0.1 now" in str(err.value)
    assert "lr_gamma: 0.1 in the checkpoint, 0.5 now" in str(err.value)


def test_resume_refuses_another_objective_architecture_or_data(tmp_path):
    """A resume under another loss, mask ratio, architecture or data split continued the run as something else and
    labelled all of it with the new values (or failed inside load_state with a raw size mismatch)."""
    out = tmp_path / "out"
    assert pretrain(["--output_dir", out, *TINY]) == 0
    resume = ["--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-2")]
    with pytest.raises(ValueError) as err:
        pretrain(["--output_dir", out, *TINY, "--loss_type", "l2", "--mask_ratio", "0.2", *resume])
    message = str(err.value)
    assert "model.loss_type: 'l1' in the checkpoint, 'l2' now" in message
    assert "processor.mask_ratio: 0.6 in the checkpoint, 0.2 now" in message
    with pytest.raises(ValueError, match="model.encoder_type: 'vit' in the checkpoint, 'swin' now"):
        pretrain(["--output_dir", out, *TINY, "--preset", "swin-nano-w4-32", *resume])
    with pytest.raises(ValueError, match="validation_split_percentage: 20.0 in the checkpoint, 30.0 now"):
        pretrain(["--output_dir", out, *TINY, "--validation_split_percentage", "30", *resume])
    assert pretrain(["--output_dir", out, *TINY, *resume]) == 0  # the same settings resume


def test_a_setting_added_later_is_compared_with_what_older_checkpoints_ran_with(tmp_path):
    """Checkpoints saved before `warmup_prefix` existed ran without it: resuming one under the SwinV2 default
    (on) is refused by name instead of silently bending the lr curve mid-run."""
    old = CheckpointManager(FakeAccelerator(), tmp_path, settings={"per_device_train_batch_size": 4})
    path = save(old, 3, "x")
    newer = CheckpointManager(FakeAccelerator(), tmp_path, settings={"per_device_train_batch_size": 4,
                                                                     "warmup_prefix": True})
    with pytest.raises(ValueError, match="warmup_prefix: False in the checkpoint, True now"):
        newer.load(path)
    same = CheckpointManager(FakeAccelerator(), tmp_path, settings={"per_device_train_batch_size": 4,
                                                                    "warmup_prefix": False})
    assert same.load(path)["step"] == 3


def test_resume_with_another_batch_size_is_refused(tmp_path):
    out = tmp_path / "out"
    assert pretrain(["--output_dir", out, *TINY]) == 0
    with pytest.raises(ValueError) as err:
        pretrain(["--output_dir", out, *TINY, "--max_train_steps", "6", "--per_device_train_batch_size", "2",
                  "--resume_from_checkpoint", "latest"])
    assert "per_device_train_batch_size: 4 in the checkpoint, 2 now" in str(err.value)
    assert "max_train_steps: 4 in the checkpoint, 6 now" in str(err.value)


# ------------------------------------------------------------------------------------------- kills everywhere
class Killed(BaseException):
    """A stand-in for SIGKILL: not an Exception, so no cleanup code of the manager can catch it."""


def _kill_at(monkeypatch, k: int) -> list[str]:
    """Make the k-th filesystem mutation of a save raise `Killed`; returns the log of operations seen."""
    log: list[str] = []

    def wrap(name, real):
        def op(*args, **kwargs):
            log.append(f"{name} {Path(args[0]).name}")
            if len(log) == k + 1:
                raise Killed(log[-1])
            return real(*args, **kwargs)
        return op

    monkeypatch.setattr(training_utils.os, "replace", wrap("replace", training_utils.os.replace))
    monkeypatch.setattr(training_utils.shutil, "rmtree", wrap("rmtree", training_utils.shutil.rmtree))
    monkeypatch.setattr(training_utils, "atomic_write_text", wrap("write", training_utils.atomic_write_text))

    def save_state(self, folder, safe_serialization=True):
        log.append(f"save_state {Path(folder).name}")
        Path(folder).mkdir(parents=True, exist_ok=True)
        if len(log) == k + 1:
            (Path(folder) / "model.safetensors").write_text("torn")  # half-written weights
            raise Killed(log[-1])
        (Path(folder) / "model.safetensors").write_text(self.tag)

    monkeypatch.setattr(FakeAccelerator, "save_state", save_state)
    return log


@pytest.mark.parametrize("same_step", [False, True], ids=["new-step", "same-step"])
@pytest.mark.parametrize("total_limit", [None, 1])
def test_a_kill_at_every_filesystem_step_of_a_save_leaves_a_complete_resumable_checkpoint(
        tmp_path, monkeypatch, same_step, total_limit):
    """Enumerate every mutation a save makes (state write, marker, renames, pointer, deletions) and kill there:
    `latest` must always resolve to a complete checkpoint whose weights are those of its step, and the next
    save must succeed."""
    new_step = 2 if same_step else 4
    k = 0
    while True:
        root = tmp_path / f"{k}"
        manager = CheckpointManager(FakeAccelerator(), root, total_limit=total_limit)
        save(manager, 2, "step 2")
        with monkeypatch.context() as patch:
            log = _kill_at(patch, k)
            try:
                save(manager, new_step, f"step {new_step}")
                finished = True
            except Killed:
                finished = False
        fresh = CheckpointManager(FakeAccelerator(), root, total_limit=total_limit)
        latest = fresh.resolve("latest")
        assert latest is not None, f"kill at {log[-1]!r}: nothing to resume"
        step = json.loads((latest / COMPLETE_MARKER).read_text())["step"]
        assert (latest / "model.safetensors").read_text() == f"step {step}", f"kill at {log[-1]!r}"
        fresh.load(latest)
        again = save(fresh, 6, "step 6")  # the resumed run checkpoints normally afterwards
        assert fresh.resolve("latest") == again and (again / "model.safetensors").read_text() == "step 6"
        if finished:
            break
        k += 1
    assert k >= 4  # the sequence really had several kill points


def test_real_sigkills_at_several_points_resume_to_identical_weights(tmp_path):
    """kill -9 at several moments of a run that checkpoints every step (so kills land in and around saves);
    `--resume_from_checkpoint latest` must always finish with the uninterrupted run's weights."""
    import signal
    import time

    args = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    assert pretrain(["--output_dir", tmp_path / "full", *args]) == 0
    expected = _weights(tmp_path / "full")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_TOKEN"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for n, delay in enumerate((0.0, 0.03, 0.1)):
        out = tmp_path / f"killed{n}"
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--output_dir", str(out), *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        target = 2 + n  # kill shortly after checkpoint-(2+n) starts appearing
        while time.time() < deadline and proc.poll() is None and not any(
                (out / "checkpoints").glob(f"*checkpoint-{target}")):
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert pretrain(["--output_dir", out, *args, "--resume_from_checkpoint", "latest"]) == 0
        assert _max_diff(_weights(out), expected) <= 1e-6, f"kill {n} (after checkpoint-{target} + {delay} s)"


def test_the_latest_pointer_catches_up_with_the_newest_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(FakeAccelerator(), tmp_path)
    save(manager, 2, "step 2")
    real_write = training_utils.atomic_write_text

    def killed_before_the_pointer(path, text):
        if Path(path).name == "latest":
            raise Killed("pointer")
        return real_write(path, text)

    monkeypatch.setattr(training_utils, "atomic_write_text", killed_before_the_pointer)
    with pytest.raises(Killed):
        save(manager, 4, "step 4")
    monkeypatch.setattr(training_utils, "atomic_write_text", real_write)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "checkpoint-2"  # lagging
    assert CheckpointManager(FakeAccelerator(), tmp_path).resolve("latest").name == "checkpoint-4"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "checkpoint-4"


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside_at_the_first_save(tmp_path):
    """Resumed from checkpoint-4 while 6 and 8 exist (e.g. to go back before a divergence): once the new branch
    saves, `latest` and rotation follow it; the abandoned checkpoints are kept under another name."""
    manager = CheckpointManager(FakeAccelerator(), tmp_path)
    for step in (4, 6, 8):
        save(manager, step, f"first branch {step}")
    resumed = CheckpointManager(FakeAccelerator(), tmp_path, total_limit=2)
    resumed.load(tmp_path / "checkpoints" / "checkpoint-4")
    assert resumed.accelerator.loaded == "first branch 4"
    save(resumed, 5, "second branch 5")
    assert [p.name for p in resumed.list_checkpoints()] == ["checkpoint-4", "checkpoint-5"]
    assert resumed.resolve("latest").name == "checkpoint-5"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("superseded-*")) == [
        "superseded-checkpoint-6", "superseded-checkpoint-8"]
    save(resumed, 7, "second branch 7")  # rotation now works on this branch; nothing more is set aside
    assert [p.name for p in resumed.list_checkpoints()] == ["checkpoint-5", "checkpoint-7"]
    assert len(list((tmp_path / "checkpoints").glob("superseded-*"))) == 2
    third = CheckpointManager(FakeAccelerator(), tmp_path)  # back to 5 again: 7 is abandoned too
    third.load(tmp_path / "checkpoints" / "checkpoint-5")
    save(third, 6, "third branch 6")
    save(third, 8, "third branch 8")
    fourth = CheckpointManager(FakeAccelerator(), tmp_path)  # and back to 5 once more
    fourth.load(tmp_path / "checkpoints" / "checkpoint-5")
    save(fourth, 6, "fourth branch 6")
    kept = {p.name: (p / "model.safetensors").read_text() for p in (tmp_path / "checkpoints").glob("superseded-*")}
    assert kept == {"superseded-checkpoint-6": "first branch 6", "superseded-checkpoint-8": "first branch 8",
                    "superseded-checkpoint-7": "second branch 7", "superseded-2-checkpoint-6": "third branch 6",
                    "superseded-2-checkpoint-8": "third branch 8"}  # no abandoned branch is ever deleted
