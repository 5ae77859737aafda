"""Helpers for tests that run the training jobs in-process: a fresh Accelerate state per run, a callback that
records what the loop did, and a local stand-in of the Hub."""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

from simmim_hf.engine import LoopCallback


def reset_accelerate() -> None:
    """Each job builds its own Accelerator (mixed precision, CPU, ...): forget the previous job's state."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


def pretrain(argv, callbacks=()) -> int:
    from simmim_hf import run_pretraining

    reset_accelerate()
    return run_pretraining.main([str(a) for a in argv], callbacks=callbacks)


def finetune(argv, callbacks=()):
    from simmim_hf import run_finetune

    reset_accelerate()
    return run_finetune.run([str(a) for a in argv], callbacks=callbacks)


class Recorder(LoopCallback):
    """Records every optimizer step, every logged dict and the epochs that ended; optionally acts at a step."""

    def __init__(self, at_step: dict | None = None):
        self.steps, self.logs, self.epoch_ends = [], [], []
        self.at_step = at_step or {}

    def on_step_end(self, loop, state):
        if not self.steps:
            self.mixed_precision = loop.accelerator.mixed_precision
            self.num_processes = loop.accelerator.num_processes
        self.steps.append(state.global_step)
        if state.global_step in self.at_step:
            self.at_step[state.global_step]()

    def on_epoch_end(self, loop, state):
        self.epoch_ends.append((state.epoch, state.global_step))

    def on_log(self, loop, state, logs):
        self.logs.append({"step": state.global_step, **logs})


class HubStandin:
    """Replaces `huggingface_hub.HfApi.create_repo` / `upload_folder` (through `monkeypatch`): `create_repo`
    records the repo; `upload_folder` fails `failures` times with a transient error (to exercise the retries),
    then deletes what `delete_patterns` names under `<record>/<repo_id>/<path_in_repo>` and copies the folder (minus
    `ignore_patterns`) there, as the Hub stores it."""

    def __init__(self, record: Path, monkeypatch, failures: int = 1, backoff_seconds: float | None = None):
        import huggingface_hub

        self.record, self.failures, self.uploads, self.commits = Path(record), failures, 0, []
        standin = self

        def create_repo(api, repo_id, private=None, exist_ok=False, repo_type=None, **kwargs):
            (standin.record / repo_id).mkdir(parents=True, exist_ok=True)
            standin.private = private
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, repo_id, folder_path, path_in_repo=None, commit_message=None, ignore_patterns=None,
                          repo_type=None, delete_patterns=None, **kwargs):
            standin.uploads += 1
            if standin.uploads <= standin.failures:
                raise ConnectionError("simulated network failure")
            target = standin.record / repo_id / (path_in_repo or "")
            if target.is_dir():  # the Hub matches delete_patterns against paths relative to path_in_repo
                for stored in [p for p in target.rglob("*") if p.is_file()]:
                    if any(fnmatch.fnmatch(stored.relative_to(target).as_posix(), pattern)
                           for pattern in delete_patterns or []):
                        stored.unlink()
            for root, _, files in os.walk(folder_path):
                for name in files:
                    src = Path(root) / name
                    rel = src.relative_to(folder_path).as_posix()
                    if not any(fnmatch.fnmatch(rel, pattern) for pattern in ignore_patterns or []):
                        (target / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, target / rel)
            standin.commits.append(commit_message)
            return f"https://huggingface.co/{repo_id}/commit/0"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        if backoff_seconds is not None:
            from simmim_hf.training_utils import HubPusher

            original = HubPusher.__init__

            def fast(self, *args, **kwargs):
                kwargs.setdefault("backoff_seconds", backoff_seconds)
                original(self, *args, **kwargs)

            monkeypatch.setattr(HubPusher, "__init__", fast)
