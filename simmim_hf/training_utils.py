"""Reusable pieces of the accelerate training scripts (pretraining and fine-tuning).

* `sample_seed`: a per-sample seed from (seed, epoch, index), so a sample's crop, flip and mask never depend
  on resume, dataloader worker count or world size.
* `CheckpointManager`: atomic checkpoints through `Accelerator.save_state` (a kill at any point, also during
  a same-step re-save, leaves a complete checkpoint to resume), `checkpoints_total_limit` (never deleting the
  newest), `resume_from_checkpoint="latest"|PATH` that skips half-written checkpoints with a warning, and a
  refusal to resume with settings that change the meaning of the saved position.
* `PreemptionHandler`: SIGTERM/SIGUSR1 set a flag; all ranks agree on it through a host-side all-reduce, so
  every rank saves at the same step and the script exits cleanly.
* `NonFiniteGuard`: skips optimizer steps whose gradients are not finite, without a host sync per step,
  and stops after N in a row.
* `HubPusher`: creates the repo up front (a deterministic failure such as offline mode, a bad repo id or a
  missing/read-only token raises `HubPusher.PushError` before any training), then uploads in the background,
  retrying only transient errors (connection, timeout, 408/429/5xx); upload failures are recorded in `errors`
  (the scripts exit 1 after saving everything locally), never delete anything local; the token is never
  logged or written.
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
# A complete checkpoint moved aside while a same-step re-save replaces it; restored if the kill came between.
_REPLACED_PREFIX = ".replaced-"
_PREVIOUS_PREFIX = ".previous-run-"  # a run started over holds the previous run's checkpoints under this prefix
_RUN_RECORDS = ("logs", "reconstructions")  # a run's tracker logs and pictures in its output_dir
# Resume settings added after checkpoints already existed, with the value those older checkpoints ran with.
_SETTING_DEFAULTS = {"warmup_prefix": False}
SUPERSEDED_PREFIX = "superseded-"  # checkpoints beyond the one a run resumed from, once that run saves


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


def staging_folder(final: str | os.PathLike) -> Path:
    """Where a complete copy of the folder `final` is written before `publish_folder` swaps it in."""
    final = Path(final)
    return final.with_name(f"{_TMP_PREFIX}{final.name}")


def publish_folder(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the complete folder `staging` the folder `final`, replacing any previous one: a failure before this
    (a full disk, a kill mid-save) leaves the previous `final` whole; the swap itself is two renames."""
    staging, final = Path(staging), Path(final)
    previous = final.with_name(f"{_TMP_PREFIX}previous-{final.name}")
    if previous.exists():
        shutil.rmtree(previous)
    if final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    _fsync(final.parent)
    shutil.rmtree(previous, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders that list them, then `folder`."""
    for path in sorted(folder.rglob("*"), reverse=True):  # deeper entries first
        _fsync(path)
    _fsync(folder)


def _fsync(path: str | os.PathLike) -> None:
    # A file's data, or a folder's entries (which makes a rename durable: a power loss could undo it otherwise);
    # best effort where unsupported.
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
    as latest or the new one, never a torn folder under a valid name; a same-step re-save moves the old
    complete copy aside first and `resolve` falls back to it if the kill came before the new one was in place.
    Multi-node runs need `output_dir` on a filesystem shared by all nodes (as Accelerate's own checkpointing).

    `settings` (JSON values) are stored with every checkpoint; `load` refuses a checkpoint whose stored settings
    differ, naming each changed setting (e.g. another batch size would re-read the saved in-epoch position at
    the wrong granularity and follow another lr schedule).
    """

    def __init__(self, accelerator, output_dir: str | os.PathLike, total_limit: int | None = None,
                 settings: dict[str, Any] | None = None):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"`checkpoints_total_limit` must be >= 1 or unset; got {total_limit}.")
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit
        self.settings = dict(settings or {})
        self.protected: set[str] = set()  # folders being uploaded in the background: never rotated away
        self.resumed_step: int | None = None  # set by `load`: later checkpoints are another branch of the run
        self._start_over = False  # set by `start_over`

    # -------------------------------------------------------------- listing
    def list_checkpoints(self, complete_only: bool = True) -> list[Path]:
        """Checkpoint folders sorted by step (oldest first). A complete copy moved aside by an interrupted
        same-step re-save stands in for its step while the new copy is not in place."""
        if not self.root.is_dir():
            return []
        found: dict[int, Path] = {}
        replaced: dict[int, Path] = {}
        for child in self.root.iterdir():
            if not child.is_dir():
                continue
            step = _step_of(child.name)
            if step is not None:
                if not complete_only or is_complete_checkpoint(child):
                    found[step] = child
            elif child.name.startswith(_REPLACED_PREFIX) and is_complete_checkpoint(child):
                step = _step_of(child.name.removeprefix(_REPLACED_PREFIX))
                if step is not None:
                    replaced[step] = child
        for step, path in replaced.items():
            if step not in found or not is_complete_checkpoint(found[step]):
                found[step] = path
        return [found[step] for step in sorted(found)]

    def start_over(self) -> None:
        """`--overwrite_output_dir`: the previous run's checkpoints are deleted once this run's first checkpoint is
        complete, so a later `--resume_from_checkpoint latest` never picks up the previous run, and a run that fails
        before or while saving its first checkpoint (a mistyped dataset, a full disk) has not destroyed them."""
        self._start_over = self.root.exists()
        if self._start_over:
            logger.warning("--overwrite_output_dir: the previous run's checkpoints in %s will be deleted when this "
                           "run has saved its first checkpoint.", self.root)
        if getattr(self.accelerator, "is_main_process", True):
            # Its tracker logs and pictures go too (TensorBoard would draw both runs' curves over the same steps):
            # held aside now, before this run's trackers start, and deleted with the checkpoints.
            for name in _RUN_RECORDS:
                folder = self.root.parent / name
                if folder.is_dir():
                    target = self.root.parent / f"{_PREVIOUS_PREFIX}{name}"
                    if target.exists():  # held by an earlier start-over that never saved: the records of a run
                        shutil.rmtree(folder)  # with checkpoints are those, not that attempt's
                    else:
                        os.replace(folder, target)
                    self._start_over = True

    def _hold_previous_run(self) -> list[tuple[Path, Path]]:
        """Main process, at the first save of a run started over: rename everything the previous run left in
        `checkpoints/` to `.previous-run-<name>`, which nothing resolves or rotates, and return the (original,
        held) pairs. Deleted once the new checkpoint is published; put back if the save fails (after a kill they
        stay, and renaming them back restores them)."""
        held = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(_PREVIOUS_PREFIX):
                continue  # held by an earlier start-over that was killed mid-save: goes with this hold
            target = self.root / f"{_PREVIOUS_PREFIX}{child.name}"
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(child, target)
            held.append((child, target))
        logger.warning("--overwrite_output_dir: the previous run's checkpoints are held as %s* until this "
                       "run's first checkpoint is complete.", self.root / _PREVIOUS_PREFIX)
        return held

    def _delete_held(self) -> None:
        logger.warning("Deleting the previous run's checkpoints in %s (--overwrite_output_dir).", self.root)
        for child in [*self.root.iterdir(), *(self.root.parent / f"{_PREVIOUS_PREFIX}{n}" for n in _RUN_RECORDS)]:
            if child.name.startswith(_PREVIOUS_PREFIX) and child.exists():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)

    # -------------------------------------------------------------- saving
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Save the Accelerate state plus `state` (JSON: epoch, step_in_epoch, ...) as checkpoint-<step>.
        Collective: call on every rank. Returns the final folder."""
        acc = self.accelerator
        final = self.root / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.root / f"{_TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"
        replaced = self.root / f"{_REPLACED_PREFIX}{CHECKPOINT_PREFIX}{step}"
        start_over, self._start_over = self._start_over, False
        held, published = [], False
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if start_over:
                held = self._hold_previous_run()
            if tmp.exists():  # left over by a run killed mid-save
                shutil.rmtree(tmp)
        try:
            acc.wait_for_everyone()
            acc.save_state(str(tmp), safe_serialization=True)
            # Every rank makes its files durable before the marker calls the checkpoint complete: otherwise a
            # power loss can keep the marker and lose the weights, after rotation deleted the older copy.
            _fsync_tree(tmp)
            acc.wait_for_everyone()  # every rank's files (its RNG state at least) are written
            if acc.is_main_process:
                marker = {"step": int(step), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **state,
                          "settings": self.settings}
                atomic_write_text(tmp / COMPLETE_MARKER, json.dumps(marker, indent=2, sort_keys=True))
                self._set_aside_abandoned_branch()
                if final.exists():
                    # Same step saved twice (e.g. SIGTERM right at a checkpointing step). The complete copy is
                    # moved aside, not deleted, until the new one is in place: a kill in between leaves it
                    # resolvable.
                    if replaced.exists():
                        shutil.rmtree(replaced)
                    os.replace(final, replaced)
                os.replace(tmp, final)
                published = True
                _fsync(self.root)
                atomic_write_text(self.root / LATEST_FILE, final.name + "\n")
        except BaseException:
            if held and not published:  # the previous run's checkpoints are all there is: put them back
                for original, target in reversed(held):
                    os.replace(target, original)
                logger.error("The first checkpoint of this run failed; the previous run's checkpoints in %s are "
                             "kept.", self.root)
            raise
        if acc.is_main_process:
            if replaced.exists():
                shutil.rmtree(replaced)
            if start_over:
                self._delete_held()
            self._rotate(keep=final)
        acc.wait_for_everyone()
        return final

    def _set_aside_abandoned_branch(self) -> None:
        """A run resumed from checkpoint-s that saves again has abandoned the checkpoints after s (e.g. resumed before
        a divergence). They are renamed `superseded-checkpoint-<step>` (`superseded-<n>-checkpoint-<step>` for the
        n-th branch abandoned at that step; kept, never resolved, rotated or deleted), so
        `latest` and rotation follow the branch being trained rather than the higher, stale step numbers."""
        resumed, self.resumed_step = self.resumed_step, None
        if resumed is None:
            return
        for path in self.list_checkpoints(complete_only=False):
            step = _step_of(path.name.removeprefix(_REPLACED_PREFIX))
            if step is not None and step > resumed:
                name = path.name.removeprefix(_REPLACED_PREFIX)
                target, branch = self.root / f"{SUPERSEDED_PREFIX}{name}", 2
                while target.exists():  # an earlier abandoned branch kept this name: both are kept
                    target, branch = self.root / f"{SUPERSEDED_PREFIX}{branch}-{name}", branch + 1
                os.replace(path, target)
                logger.warning("%s is from after checkpoint-%d, which this run resumed from; kept as %s and no "
                               "longer resumed or rotated.", path.name, resumed, target.name)

    def _rotate(self, keep: Path) -> None:
        # Stale temporary folders from killed runs are garbage; complete ones beyond the limit are deleted
        # oldest first, except the one just written (whatever its step) and folders still being pushed to the
        # Hub (they go at a later rotation).
        for child in self.root.iterdir():
            if child.name.startswith(_TMP_PREFIX + CHECKPOINT_PREFIX):
                shutil.rmtree(child, ignore_errors=True)
        if self.total_limit is None:
            return
        complete = [path for path in self.list_checkpoints() if path != keep]
        for path in complete[: max(0, len(complete) + 1 - self.total_limit)]:
            if str(path) in self.protected:
                continue
            logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", path, self.total_limit)
            shutil.rmtree(path, ignore_errors=True)

    # -------------------------------------------------------------- resuming
    def resolve(self, resume_from_checkpoint: str | None) -> Path | None:
        """`None` -> no resume. `"latest"` -> the newest *complete* checkpoint under output_dir (half-written
        ones are skipped with a warning; none at all -> a warning and a fresh start). A path -> that
        checkpoint, which must be complete (a clear error otherwise)."""
        self._refresh_latest_pointer()
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

    def _refresh_latest_pointer(self) -> None:
        # The `latest` file is for people and tools (resolution lists the folders): a kill between the rename
        # and the pointer update leaves it one checkpoint behind, so it is brought up to date here.
        if not getattr(self.accelerator, "is_main_process", True):
            return
        complete = self.list_checkpoints()
        pointer = self.root / LATEST_FILE
        if complete and complete[-1].name.startswith(CHECKPOINT_PREFIX) and (
                not pointer.is_file() or pointer.read_text(encoding="utf-8").strip() != complete[-1].name):
            atomic_write_text(pointer, complete[-1].name + "\n")

    def check_settings(self, path: str | os.PathLike) -> None:
        """Raise a ValueError naming every setting that differs from the one `path` was saved with."""
        stored = read_checkpoint_state(path).get("settings") or {}
        if stored:  # what a setting added later was in checkpoints saved before it existed
            stored = {**{k: v for k, v in _SETTING_DEFAULTS.items() if k in self.settings}, **stored}
        current = json.loads(json.dumps(self.settings))  # as stored: tuples are lists, keys strings
        changed = []
        for key in sorted(set(stored) & set(current)):
            old, new = stored[key], current[key]
            if isinstance(old, dict) and isinstance(new, dict):  # e.g. the model config: name the fields
                changed += [f"{key}.{field}: {old.get(field, '(unset)')!r} in the checkpoint, "
                            f"{new.get(field, '(unset)')!r} now"
                            for field in sorted(set(old) | set(new)) if old.get(field) != new.get(field)]
            elif old != new:
                changed.append(f"{key}: {old!r} in the checkpoint, {new!r} now")
        if changed:
            raise ValueError(
                f"Cannot resume from {path}: these settings differ from the run that saved it, and the saved "
                "position and schedule mean something else under them:\n  " + "\n  ".join(changed)
                + "\nResume with the original settings, or start a new run in another --output_dir."
            )

    def load(self, path: str | os.PathLike) -> dict:
        """Check the settings, restore the Accelerate state (collective) and return the stored position."""
        self.check_settings(path)
        self.accelerator.load_state(str(path))
        stored = read_checkpoint_state(path)
        self.resumed_step = int(stored["step"])
        return stored


def training_setup(config, processor) -> dict[str, dict]:
    """What a checkpoint's weights and data position were trained for, as `CheckpointManager.settings` entries:
    the model config and the processor's transform (masking, crops, normalisation), without the fields that only
    record where they came from. Resuming under another loss, mask ratio or architecture would continue the run
    as something else and label all of it with the new values."""
    volatile = {"transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "image_processor_type"}

    def stable(values: dict) -> dict:
        return {k: v for k, v in values.items() if k not in volatile and not k.startswith("_")}

    return {"model": stable(json.loads(config.to_json_string(use_diff=True))),
            "processor": stable(json.loads(processor.to_json_string()))}


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

    def resume(self, total_skipped: int, consecutive: int) -> None:
        """Continue a resumed run's counts: its total of skipped steps, and the run of non-finite steps in a row
        it ended on (the stop rule counts on from there)."""
        self.total_skipped = int(total_skipped)
        self.consecutive = torch.full((), float(consecutive), device=self.device)
        self.longest = self.consecutive.clone()

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
    """Uploads folders to a Hub model repo from one background thread, with retries of transient errors.

    Errors are sorted into two kinds (`is_transient`). Transient ones (connection errors, timeouts, HTTP 408,
    429 and 5xx) are retried with exponential back-off in the background thread. Deterministic ones (offline
    mode `HF_HUB_OFFLINE=1`, missing token, HTTP 401/403 and other 4xx, unknown or invalid repo id, a missing
    local folder) fail at once: retrying cannot fix them.

    * `create_repo` is tried once in the constructor. A deterministic failure raises `HubPusher.PushError`
      (the caller should stop before training: finding out after hours of training that nothing can be pushed
      is worse); a transient one is retried in the background, ahead of the uploads, and training goes on.
    * Upload failures are logged and recorded in `errors` (never raised into the training loop); `wait`
      returns False when any upload failed, so the caller can exit non-zero after saving locally.

    Nothing local is ever deleted or modified. The token comes from `HF_TOKEN` or the cached `hf auth login`
    (resolved by huggingface_hub itself): it is never passed through arguments, logged or written anywhere by
    this class (messages carry only the exception type and text, never request headers)."""

    class PushError(RuntimeError):
        """A Hub operation failed for a reason that retrying cannot fix."""

    # huggingface_hub.errors classes that are deterministic whatever their HTTP status (looked up by name, so a
    # class missing from some huggingface_hub version is simply skipped).
    _DETERMINISTIC_HUB_ERRORS = ("OfflineModeIsEnabled", "HFValidationError", "LocalTokenNotFoundError")
    _DETERMINISTIC_WITHOUT_STATUS = ("RepositoryNotFoundError", "RevisionNotFoundError", "DisabledRepoError",
                                     "BadRequestError")

    @classmethod
    def for_training_run(cls, repo_id: str, private: bool | None = None) -> "HubPusher":
        """The scripts' start-up: create the repo before anything else, and on a deterministic failure stop the
        run with a message naming the flags (nothing has been trained or written yet)."""
        try:
            return cls(repo_id, private=private)
        except cls.PushError as err:
            raise SystemExit(f"--push_to_hub: {err}\nFix --hub_model_id / the login, or run without --push_to_hub "
                             "(the output folder can be pushed later with `hf upload`). Nothing was trained.") from None

    def __init__(self, repo_id: str, private: bool | None = None, max_retries: int = 5,
                 backoff_seconds: float = 2.0, api=None):
        from huggingface_hub import HfApi

        self.api = api if api is not None else HfApi()
        self.private = private
        self.max_retries = max(1, int(max_retries))
        self.backoff_seconds = backoff_seconds
        self._futures: list[Future] = []
        self._setup: Future | None = None  # a background create_repo retry, when the first attempt was transient
        self._lock = threading.Lock()
        self.failed: list[str] = []  # what failed ("upload of <folder>", ...)
        self.errors: list[str] = []  # why: "<what>: <ExceptionType>: <message>"
        self.repo_id = repo_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")

        def create():
            url = self.api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            # The Hub's full id ("user/name" for a bare "name"), which every later upload uses; also when a
            # background retry is what succeeds (the single worker runs it before any upload).
            self.repo_id = getattr(url, "repo_id", None) or repo_id
            return url

        try:
            create()
        except Exception as err:  # noqa: BLE001 - network errors come in many types
            msg = self._describe(err)
            if not self.is_transient(err):
                reason = f"Cannot create the Hub repo {repo_id!r}: {msg.rstrip('.')}. {self._hint(err)}"
                raise HubPusher.PushError(reason.rstrip()) from None
            logger.warning("Hub create_repo of %s failed (%s); retrying in the background while training goes on.",
                           repo_id, msg)
            self._setup = self._executor.submit(self._retry, f"create_repo of {repo_id}", create, None, 2, False)

    # -------------------------------------------------------------- error kinds
    @staticmethod
    def is_transient(err: BaseException) -> bool:
        """True for errors worth retrying (network down, timeouts, rate limit, server errors), False for
        deterministic ones (offline mode, authentication / permission, bad or unknown repo id, other 4xx,
        local problems)."""
        from huggingface_hub import errors as hub_errors

        def classes(names):
            return tuple(getattr(hub_errors, name) for name in names if hasattr(hub_errors, name))

        # Before the ConnectionError test: OfflineModeIsEnabled is a ConnectionError but will never pass.
        if isinstance(err, classes(HubPusher._DETERMINISTIC_HUB_ERRORS)):
            return False
        status = getattr(getattr(err, "response", None), "status_code", None)
        if isinstance(status, int):
            return status in (408, 429) or status >= 500
        if isinstance(err, classes(HubPusher._DETERMINISTIC_WITHOUT_STATUS)):
            return False
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
                            TypeError, AttributeError, KeyError, NotImplementedError)):
            return False
        # Anything else (e.g. the HTTP client's own transport errors) is assumed to be the network's fault.
        return True

    @staticmethod
    def _describe(err: BaseException) -> str:
        # Only the exception type and message: never the request headers (they carry the token).
        status = getattr(getattr(err, "response", None), "status_code", None)
        return f"{type(err).__name__}{f' (HTTP {status})' if isinstance(status, int) else ''}: {err}"

    @staticmethod
    def _hint(err: BaseException) -> str:
        """What to do about a deterministic error."""
        name = type(err).__name__
        status = getattr(getattr(err, "response", None), "status_code", None)
        if name == "OfflineModeIsEnabled":
            return "HF_HUB_OFFLINE is set: unset it to push to the Hub."
        if name == "LocalTokenNotFoundError" or status == 401:
            return "Log in with `hf auth login` or set HF_TOKEN (a token with write access)."
        if status == 403:
            return "The token may not write to this namespace: check the repo id's owner and the token's permissions."
        if name in ("HFValidationError", "RepositoryNotFoundError") or status == 404:
            return "Check the repo id ('name' or 'namespace/name', a namespace you can write to)."
        return ""

    # -------------------------------------------------------------- retries
    def _retry(self, what: str, fn, fallback=None, first_attempt: int = 1, record: bool = True):
        for attempt in range(first_attempt, self.max_retries + 1):
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - network errors come in many types
                msg = self._describe(err)
                transient = self.is_transient(err)
                if not transient or attempt >= self.max_retries:
                    how = f"after {attempt} attempts" if transient else "with an error that retrying cannot fix"
                    hint = "" if transient else self._hint(err)
                    logger.error("Hub %s failed %s (%s). %sLocal files are kept.", what, how, msg,
                                 f"{hint} " if hint else "")
                    if record:
                        with self._lock:
                            self.failed.append(what)
                            self.errors.append(f"{what}: {msg}")
                    return fallback
                delay = self.backoff_seconds * 2 ** (attempt - first_attempt)
                logger.warning("Hub %s failed (attempt %d/%d: %s); retrying in %.0fs.", what, attempt,
                               self.max_retries, msg, delay)
                time.sleep(delay)
        return fallback

    def push(self, folder: str | os.PathLike, commit_message: str, path_in_repo: str | None = None,
             ignore_patterns: list[str] | None = None, on_done=None,
             delete_patterns: list[str] | None = None) -> Future:
        """Queue an upload of `folder`; returns a Future (True on success). `on_done` runs afterwards in the
        background thread, whatever the outcome (used to release a checkpoint for rotation). `delete_patterns`:
        remote files under `path_in_repo` to delete in the same commit (`["*"]` replaces the folder whole)."""
        folder = str(folder)

        def task():
            try:
                result = self._retry(
                    f"upload of {folder}",
                    lambda: self.api.upload_folder(
                        repo_id=self.repo_id, folder_path=folder, path_in_repo=path_in_repo,
                        commit_message=commit_message, ignore_patterns=ignore_patterns,
                        delete_patterns=delete_patterns, repo_type="model"),
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
        """Wait for all queued uploads; True if all succeeded (False also when one did not finish in time)."""
        ok = True
        deadline = None if timeout is None else time.monotonic() + timeout
        for future in ([self._setup] if self._setup is not None else []) + self._futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                result = future.result(timeout=remaining)
            except Exception as err:  # noqa: BLE001
                logger.error("Hub upload did not finish: %s: %s", type(err).__name__, err)
                with self._lock:
                    self.errors.append(f"did not finish: {type(err).__name__}: {err}")
                ok = False
                continue
            # The background create_repo's outcome does not count by itself: the uploads after it decide
            # (the repo may exist already).
            if future is not self._setup:
                ok = bool(result) and ok
        self._executor.shutdown(wait=False)
        return ok

    def push_and_wait(self, folder: str | os.PathLike, commit_message: str,
                      ignore_patterns: list[str] | None = None) -> bool:
        """Push a finished model folder, wait for every queued upload and say how to push by hand if one failed
        (the local folder is complete either way). Returns True when everything reached the Hub."""
        self.push(folder, commit_message, ignore_patterns=ignore_patterns)
        if self.wait():
            return True
        logger.error(
            "Push to the Hub failed (%s). The local folder %s is complete (weights, config, processor, model code, "
            "model card); nothing was lost. Push it by hand once the problem is fixed:\n  %s",
            "; ".join(self.errors), folder, self.manual_push_command(folder, ignore_patterns))
        return False

    def manual_push_command(self, folder: str | os.PathLike, ignore_patterns: list[str] | None = None) -> str:
        """The `hf upload` command that pushes `folder` by hand (for the log after a failed push)."""
        import shlex

        excludes = "".join(f" --exclude {shlex.quote(pattern)}" for pattern in ignore_patterns or [])
        private = " --private" if self.private else ""
        return f"hf upload {shlex.quote(self.repo_id)} {shlex.quote(str(folder))}{excludes}{private}"


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


def to_json(value) -> str:
    """Indented JSON with every non-finite float (a diverged loss, at any depth) written as null: a bare NaN is
    not JSON, and `allow_nan=False` makes sure none slips through."""

    def safe(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: safe(x) for k, x in v.items()}
        return [safe(x) for x in v] if isinstance(v, (list, tuple)) else v

    return json.dumps(safe(value), indent=2, allow_nan=False)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass; transformers >= 5.24 renamed the switch (the old name still
    works there, with a FutureWarning)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


__all__ = [
    "CHECKPOINT_PREFIX",
    "COMPLETE_MARKER",
    "CheckpointManager",
    "HubPusher",
    "NonFiniteGuard",
    "PreemptionHandler",
    "training_setup",
    "publish_folder",
    "staging_folder",
    "atomic_write_text",
    "content_key",
    "format_count",
    "is_complete_checkpoint",
    "read_checkpoint_state",
    "sample_seed",
    "write_model_card",
]
