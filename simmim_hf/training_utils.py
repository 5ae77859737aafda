"""Reusable pieces of the accelerate training scripts (pretraining and fine-tuning).

* `sample_seed`: a per-sample seed from (seed, epoch, index), so a sample's crop, flip and mask never depend
  on resume, dataloader worker count or world size.
* `CheckpointManager`: atomic checkpoints through `Accelerator.save_state` (a kill mid-save never breaks
  `latest`), `checkpoints_total_limit`, and `resume_from_checkpoint="latest"|PATH` that skips half-written
  checkpoints with a warning.
* `PreemptionHandler`: SIGTERM/SIGUSR1 set a flag; all ranks agree on it through a host-side all-reduce, so
  every rank saves at the same step and the script exits cleanly.
* `NonFiniteGuard`: skips optimizer steps whose gradients are not finite, without a host sync per step,
  and stops after N in a row.
* `HubPusher`: background uploads with retries; failures are logged, never raised, never delete anything
  local; the token is never logged or written.
* `write_model_card`: renders a `model_cards/*.md` template with `huggingface_hub.ModelCard`.

This module is not Hub-facing (it is not copied next to the weights), so it may import `accelerate`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "checkpoint_complete.json"  # written last: its presence is what makes a checkpoint valid
LATEST_FILE = "latest"
_TMP_PREFIX = ".tmp-"


# --------------------------------------------------------------------------------------------------- seeds
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, sample index).

    A cryptographic hash (not `seed + epoch * N + index`) so that neighbouring samples and epochs get
    unrelated random streams and no two (epoch, index) pairs collide for any dataset size."""
    digest = hashlib.blake2b(struct.pack("<qqq", int(seed), int(epoch), int(index)), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def content_key(data: bytes | str) -> int:
    """A stable integer key for a sample without an index (streaming data): a hash of its bytes or path.
    Used in place of the index in `sample_seed`, so shard order and worker count still do not matter."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 62) - 1)


# ------------------------------------------------------------------------------------------ small helpers
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old or the new content, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem


def _fsync_dir(path: str | os.PathLike) -> None:
    # Make a rename durable (otherwise a power loss can undo it); best effort where unsupported.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- checkpoints
def _step_of(name: str) -> int | None:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def read_checkpoint_state(path: str | os.PathLike) -> dict:
    """The training position stored with a checkpoint (step, epoch, step_in_epoch, ...)."""
    return json.loads((Path(path) / COMPLETE_MARKER).read_text(encoding="utf-8"))


class CheckpointManager:
    """Checkpoints under `<output_dir>/checkpoints/checkpoint-<step>`, written atomically.

    Every rank calls `save`; Accelerate writes its state (model, optimizer, scheduler, scaler, RNG of every
    rank, registered objects) into a hidden temporary folder; after a barrier the main process writes the
    completion marker with the training position, renames the folder into place (atomic) and then
    atomically replaces the `latest` pointer. A kill at any moment leaves either the previous checkpoint
    as latest or the new one, never a torn folder under a valid name. Multi-node runs need `output_dir`
    on a filesystem shared by all nodes (as Accelerate's own checkpointing does).
    """

    def __init__(self, accelerator, output_dir: str | os.PathLike, total_limit: int | None = None):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"`checkpoints_total_limit` must be >= 1 or unset; got {total_limit}.")
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit
        self.protected: set[str] = set()  # folders being uploaded in the background: never rotated away

    # -------------------------------------------------------------- listing
    def list_checkpoints(self, complete_only: bool = True) -> list[Path]:
        """Checkpoint folders sorted by step (oldest first)."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            step = _step_of(child.name)
            if step is not None and child.is_dir() and (not complete_only or is_complete_checkpoint(child)):
                found.append((step, child))
        return [path for _, path in sorted(found)]

    # -------------------------------------------------------------- saving
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Save the Accelerate state plus `state` (JSON: epoch, step_in_epoch, ...) as checkpoint-<step>.
        Collective: call on every rank. Returns the final folder."""
        acc = self.accelerator
        final = self.root / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.root / f"{_TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over by a run killed mid-save
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()  # every rank's files (its RNG state at least) are written
        if acc.is_main_process:
            marker = {"step": int(step), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **state}
            atomic_write_text(tmp / COMPLETE_MARKER, json.dumps(marker, indent=2, sort_keys=True))
            if final.exists():  # same step saved twice (e.g. SIGTERM right at a checkpointing step)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / LATEST_FILE, final.name + "\n")
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        # Stale temporary folders from killed runs are garbage; complete ones beyond the limit are deleted
        # oldest first, except folders still being pushed to the Hub (they go at a later rotation).
        for child in self.root.iterdir():
            if child.name.startswith(_TMP_PREFIX + CHECKPOINT_PREFIX):
                shutil.rmtree(child, ignore_errors=True)
        if self.total_limit is None:
            return
        complete = self.list_checkpoints()
        for path in complete[: max(0, len(complete) - self.total_limit)]:
            if str(path) in self.protected:
                continue
            logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", path, self.total_limit)
            shutil.rmtree(path, ignore_errors=True)

    # -------------------------------------------------------------- resuming
    def resolve(self, resume_from_checkpoint: str | None) -> Path | None:
        """`None` -> no resume. `"latest"` -> the newest *complete* checkpoint under output_dir (half-written
        ones are skipped with a warning; none at all -> a warning and a fresh start). A path -> that
        checkpoint, which must be complete (a clear error otherwise)."""
        if not resume_from_checkpoint:
            return None
        if resume_from_checkpoint == "latest":
            candidates = self.list_checkpoints(complete_only=False)
            for path in reversed(candidates):
                if is_complete_checkpoint(path):
                    return path
                logger.warning(
                    "Skipping half-written checkpoint %s (no %s: the run was killed while saving it).",
                    path, COMPLETE_MARKER,
                )
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint under %s; starting "
                           "from scratch.", self.root)
            return None
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a directory.")
        if not is_complete_checkpoint(path):
            raise ValueError(
                f"--resume_from_checkpoint: {path} is not a complete checkpoint (no {COMPLETE_MARKER}); it was "
                "probably written by a run killed mid-save. Pass an earlier checkpoint or `latest`."
            )
        return path

    def load(self, path: str | os.PathLike) -> dict:
        """Restore the Accelerate state (collective) and return the stored training position."""
        self.accelerator.load_state(str(path))
        return read_checkpoint_state(path)


# -------------------------------------------------------------------------------------------- preemption
class PreemptionHandler:
    """Turns SIGTERM (preemption, `scancel`, Kubernetes eviction) and SIGUSR1 (SLURM `--signal`) into a
    flag that the training loop polls between optimizer steps.

    Ranks may receive the signal at different steps, and saving a checkpoint is collective, so
    `should_stop()` takes the max of the flag over all ranks. It does so over a CPU (gloo) group: a host-side
    all-reduce of one integer, which never waits for the GPU stream (no device sync), every `check_every`
    calls."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1), check_every: int = 1):
        self.received: int | None = None
        self.check_every = max(1, int(check_every))
        self._calls = 0
        self._previous = {}
        self._group = None
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. some notebook runners): no preemption support
                logger.warning("Cannot install a handler for %s outside the main thread.", sig)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "gloo":
                self._group = torch.distributed.group.WORLD
            else:
                self._group = torch.distributed.new_group(backend="gloo")

    def _handle(self, signum, frame) -> None:
        # Only set a flag: saving from inside a signal handler could interrupt a collective half-way.
        self.received = signum

    def should_stop(self) -> bool:
        self._calls += 1
        if self._group is None:
            return self.received is not None
        if self._calls % self.check_every:
            return False
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


# ------------------------------------------------------------------------------------- non-finite guard
class NonFiniteGuard:
    """Skip optimizer steps whose gradient norm is not finite, without a host sync per step.

    `update(grad_norm)` returns a device tensor `found_inf` (1.0 = skip). With an optimizer that accepts it
    (torch's fused AdamW/Adam: `_step_supports_amp_scaling`), `attach(optimizer, found_inf)` hands it to the
    fused kernel, which leaves parameters, moments *and* the step count untouched for that step, exactly
    like GradScaler's skipped steps. The counters (total skipped, longest run of consecutive skips) stay
    on the device and are read only by `check()`, which the loop calls at its logging interval: it warns
    about skipped steps and says whether `max_consecutive` was reached (then the run should stop; the
    skipped steps did not corrupt the weights, so stopping a few steps late is harmless).

    The gradient norm is taken after the gradient all-reduce, so every rank makes the same decision."""

    def __init__(self, max_consecutive: int, device: torch.device | str = "cpu"):
        self.max_consecutive = int(max_consecutive)
        self.device = torch.device(device)
        self.consecutive = torch.zeros((), device=self.device)
        self.longest = torch.zeros((), device=self.device)
        self.skipped = torch.zeros((), device=self.device)
        self.total_skipped = 0

    def update(self, grad_norm: torch.Tensor) -> torch.Tensor:
        found_inf = (~torch.isfinite(grad_norm.detach().float())).float().reshape(()).to(self.device)
        self.consecutive = (self.consecutive + 1.0) * found_inf  # reset to 0 on a finite step
        self.longest = torch.maximum(self.longest, self.consecutive)
        self.skipped = self.skipped + found_inf
        return found_inf

    @staticmethod
    def supports(optimizer) -> bool:
        inner = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps the torch one
        return bool(getattr(inner, "_step_supports_amp_scaling", False))

    @staticmethod
    def attach(optimizer, found_inf: torch.Tensor) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.found_inf = found_inf
        inner.grad_scale = None

    @staticmethod
    def detach(optimizer) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)
        for name in ("found_inf", "grad_scale"):
            if hasattr(inner, name):
                delattr(inner, name)

    def check(self) -> bool:
        """Host sync (call at the logging interval): warn about skipped steps since the last check and
        return True if `max_consecutive` non-finite steps happened in a row."""
        skipped = int(self.skipped.item())
        longest = int(self.longest.item())
        if skipped:
            self.total_skipped += skipped
            logger.warning(
                "Skipped %d optimizer step(s) with a non-finite loss/gradient since the last log "
                "(longest run %d, %d in total; stopping after %d in a row).",
                skipped, longest, self.total_skipped, self.max_consecutive,
            )
        self.skipped = torch.zeros((), device=self.device)
        self.longest = self.consecutive.clone()  # a run may continue across the boundary
        return self.max_consecutive > 0 and longest >= self.max_consecutive


# ------------------------------------------------------------------------------------------------- Hub
class HubPusher:
    """Uploads folders to a Hub model repo from one background thread, with retries.

    Failures are logged (never raised into the training loop), and nothing local is ever deleted or
    modified; the caller keeps the output regardless of the network. The token comes from `HF_TOKEN` or the
    cached `hf auth login` (resolved by huggingface_hub itself): it is never passed through arguments,
    logged or written anywhere by this class."""

    def __init__(self, repo_id: str, private: bool | None = None, max_retries: int = 5,
                 backoff_seconds: float = 2.0, api=None):
        from huggingface_hub import HfApi

        self.api = api if api is not None else HfApi()
        self.private = private
        self.max_retries = max(1, int(max_retries))
        self.backoff_seconds = backoff_seconds
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        self.failed: list[str] = []
        self.repo_id = self._retry("create_repo", lambda: self.api.create_repo(
            repo_id, private=private, exist_ok=True, repo_type="model"), fallback=repo_id)
        self.repo_id = getattr(self.repo_id, "repo_id", None) or repo_id

    def _retry(self, what: str, fn, fallback=None):
        for attempt in range(1, self.max_retries + 1):
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - network errors come in many types
                # Only the exception type and message: never the request headers (they carry the token).
                msg = f"{type(err).__name__}: {err}"
                if attempt == self.max_retries:
                    logger.error("Hub %s failed after %d attempts (%s). Local files are kept.", what, attempt, msg)
                    with self._lock:
                        self.failed.append(what)
                    return fallback
                delay = self.backoff_seconds * 2 ** (attempt - 1)
                logger.warning("Hub %s failed (attempt %d/%d: %s); retrying in %.0fs.", what, attempt,
                               self.max_retries, msg, delay)
                time.sleep(delay)
        return fallback

    def push(self, folder: str | os.PathLike, commit_message: str, path_in_repo: str | None = None,
             ignore_patterns: list[str] | None = None, on_done=None) -> Future:
        """Queue an upload of `folder`; returns a Future (True on success). `on_done` runs afterwards in the
        background thread, whatever the outcome (used to release a checkpoint for rotation)."""
        folder = str(folder)

        def task():
            try:
                result = self._retry(
                    f"upload of {folder}",
                    lambda: self.api.upload_folder(
                        repo_id=self.repo_id, folder_path=folder, path_in_repo=path_in_repo,
                        commit_message=commit_message, ignore_patterns=ignore_patterns, repo_type="model"),
                    fallback=False,
                )
                if result is not False:
                    logger.info("Pushed %s to https://huggingface.co/%s", folder, self.repo_id)
                return result is not False
            finally:
                if on_done is not None:
                    on_done()

        future = self._executor.submit(task)
        self._futures.append(future)
        return future

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for all queued uploads; True if all succeeded."""
        ok = True
        deadline = None if timeout is None else time.monotonic() + timeout
        for future in self._futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ok = bool(future.result(timeout=remaining)) and ok
            except Exception as err:  # noqa: BLE001
                logger.error("Hub upload did not finish: %s: %s", type(err).__name__, err)
                ok = False
        self._executor.shutdown(wait=False)
        return ok


# ------------------------------------------------------------------------------------------- model card
def write_model_card(template_path: str | os.PathLike, output_dir: str | os.PathLike, card_data: dict,
                     **template_fields) -> Path:
    """Render a `model_cards/*.md` template (Jinja, with `{{ card_data }}` front matter) into
    `<output_dir>/README.md` through `huggingface_hub.ModelCard`."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**card_data)
    card = ModelCard.from_template(data, template_path=str(template_path), **template_fields)
    path = Path(output_dir) / "README.md"
    card.save(str(path))
    return path


# ---------------------------------------------------------------------------------------- misc helpers
def format_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000.0
    return f"{n:.1f}T"


def is_finite_number(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


__all__ = [
    "CHECKPOINT_PREFIX",
    "COMPLETE_MARKER",
    "CheckpointManager",
    "HubPusher",
    "NonFiniteGuard",
    "PreemptionHandler",
    "atomic_write_text",
    "content_key",
    "format_count",
    "is_complete_checkpoint",
    "read_checkpoint_state",
    "sample_seed",
    "write_model_card",
]
