"""Tests of the pretraining job (`simmim_hf.run_pretraining`, launched by examples/run_pretraining.py) and its
helpers (simmim_hf.training_utils, data, sample_data, visualization). CPU only, no network, tiny presets.

The job runs in-process (`tests/jobs.py`): failures are injected with callbacks and monkeypatching, and the
tests read the returned state and the files written. Each costly run is made once (module-scoped fixtures) and
shared by the asserts that read its output; only the two-process run needs a subprocess (`accelerate launch`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_SIMMIM_HF
from jobs import HubStandin, Recorder, pretrain
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "run_pretraining.py"
FAKE_TOKEN = "hf_pretrainTESTtoken0123456789abcdef"

# 20 embedded images, batch 4 -> 4 steps per epoch after a 20 % eval split (16 train images): 10 steps cross
# two epoch boundaries and the preemption at step 3 falls mid-epoch. drop_path exercises the RNG restore.
COMMON = [
    "--preset", "vit-nano-p4-32", "--config_overrides", "drop_path_rate=0.1",
    "--per_device_train_batch_size", "4", "--sample_data_repeats", "1", "--validation_split_percentage", "20",
    "--max_train_steps", "10", "--warmup_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "2",
    "--report_to", "none", "--dataloader_num_workers", "1",
]


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


class _LogText(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(self.format(record))


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The main job (shortened): 10 steps in one go, pushed to a local stand-in of the Hub whose first upload fails."""
    tmp = tmp_path_factory.mktemp("full")
    out, record = tmp / "out", tmp / "hub"
    recorder, logs = Recorder(), _LogText()
    logging.getLogger().addHandler(logs)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
        hub = HubStandin(record, monkeypatch, failures=1)
        rc = pretrain(["--output_dir", out, *COMMON, "--visualize_steps", "5", "--push_to_hub",
                       "--hub_model_id", "tester/simmim-nano"], callbacks=[recorder])
    logging.getLogger().removeHandler(logs)
    return {"rc": rc, "out": out, "record": record / "tester" / "simmim-nano", "record_root": record, "hub": hub,
            "recorder": recorder, "log": "\n".join(logs.records), "tmp": tmp}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """The same job preempted by a real SIGTERM after step 3, then resumed with `latest` past a half-written
    checkpoint."""
    tmp = tmp_path_factory.mktemp("resumed")
    out = tmp / "out"
    first = Recorder(at_step={3: lambda: os.kill(os.getpid(), signal.SIGTERM)})
    rc1 = pretrain(["--output_dir", out, *COMMON], callbacks=[first])
    listing = sorted(p.name for p in (out / "checkpoints").iterdir())
    # Simulate a kill in the middle of a later save: the folder exists, the completion marker does not.
    broken = out / "checkpoints" / "checkpoint-7"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"truncated")
    second = Recorder()
    rc2 = pretrain(["--output_dir", out, *COMMON, "--resume_from_checkpoint", "latest"], callbacks=[second])
    return {"out": out, "rc": (rc1, rc2), "first": first, "second": second, "listing_after_preemption": listing}


@pytest.fixture(scope="module")
def bf16_nan_run(tmp_path_factory):
    """bf16 autocast, with the loss of optimizer steps 2 and 3 turned into NaN."""
    from simmim_hf import run_pretraining

    tmp = tmp_path_factory.mktemp("bf16")
    out = tmp / "out"
    original = run_pretraining.masked_image_modeling_loss

    def nan_at_steps_2_and_3(model, batch, state):
        loss = original(model, batch, state)
        return loss * float("nan") if state.global_step + 1 in (2, 3) else loss

    recorder = Recorder()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(run_pretraining, "masked_image_modeling_loss", nan_at_steps_2_and_3)
        rc = pretrain(["--output_dir", out, *COMMON, "--max_train_steps", "6", "--mixed_precision", "bf16",
                       "--max_consecutive_nonfinite", "5"], callbacks=[recorder])
    return {"out": out, "rc": rc, "recorder": recorder}


# ----------------------------------------------------------------------------------------- main job
def test_main_job_writes_loadable_model_and_reconstruction_png(full_run):
    from PIL import Image

    from simmim_hf import SimMIMForMaskedImageModeling
    from simmim_hf.image_processing_simmim import SimMIMImageProcessor

    out = full_run["out"]
    assert full_run["rc"] == 0
    png = Image.open(out / "reconstruction.png")
    assert png.format == "PNG" and png.size == (4 * 132 + 4, 8 * 132 + 4)  # 4 columns x 8 rows of 128 px cells
    assert (out / "reconstructions" / "step_0000005.png").is_file()
    model = SimMIMForMaskedImageModeling.from_pretrained(out)
    processor = SimMIMImageProcessor.from_pretrained(out)
    images = [Image.new("RGB", (40, 48), (200, 30, 30))]
    assert "bool_masked_pos" not in processor(images, return_tensors="pt")  # saved: evaluation mode
    batch = processor(images, do_train=True, return_tensors="pt", seed=[0])
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 10 and results["skipped_nonfinite_steps"] == 0
    assert results["eval_loss"] is not None and 0 < results["eval_loss"] < 2
    # Logged every 2 steps with lr and images/s; the loss goes down on this data even in 10 steps at lr 1e-3.
    logs = full_run["recorder"].logs
    assert [entry["step"] for entry in logs] == [2, 4, 6, 8, 10]
    assert logs[-1]["train/loss"] < logs[0]["train/loss"] and all(e["train/images_per_sec"] > 0 for e in logs)
    assert results["train_loss"] == pytest.approx(logs[-1]["train/loss"])
    # 16 training images / batch 4 = 4 steps per epoch: the epochs end after steps 4 and 8, and the run at 10.
    assert full_run["recorder"].epoch_ends == [(0, 4), (1, 8), (2, 10)]


def test_resume_is_exact_and_skips_half_written_checkpoint(full_run, resumed_run):
    # 143 = 128 + SIGTERM: the preempted run exits as unfinished (schedulers retry it); the resumed one as done.
    assert resumed_run["rc"] == (143, 0)
    assert resumed_run["first"].steps == [1, 2, 3]  # stopped by the signal right after step 3
    assert "checkpoint-3" in resumed_run["listing_after_preemption"]
    # The resumed run skipped the broken checkpoint-7, continued from 3 and trained steps 4..10 only.
    assert resumed_run["second"].steps == list(range(4, 11))
    diff = _max_diff(_weights(full_run["out"]), _weights(resumed_run["out"]))
    assert diff <= 1e-6, diff


def test_preempted_run_leaves_complete_latest(resumed_run):
    from simmim_hf.training_utils import read_checkpoint_state

    latest = (resumed_run["out"] / "checkpoints" / "latest").read_text().strip()
    assert latest == "checkpoint-10"  # the final checkpoint of the resumed run, not the broken one
    state = read_checkpoint_state(resumed_run["out"] / "checkpoints" / latest)
    assert state["step"] == 10 and (state["epoch"], state["batches_in_epoch"]) == (2, 2)
    assert not any(p.name.startswith(".tmp-") for p in (resumed_run["out"] / "checkpoints").iterdir())


def test_bf16_runs_and_nonfinite_steps_are_skipped(bf16_nan_run):
    recorder = bf16_nan_run["recorder"]
    assert bf16_nan_run["rc"] == 0 and recorder.mixed_precision == "bf16"
    # Steps 2 and 3 are split by the logging interval (2): the count reaches 1 at step 2's log, 2 at step 4's.
    assert [entry["train/skipped_steps"] for entry in recorder.logs] == [1, 2, 2]
    results = json.loads((bf16_nan_run["out"] / "all_results.json").read_text())
    assert results["skipped_nonfinite_steps"] == 2 and not results["stopped_early"]
    weights = _weights(bf16_nan_run["out"])
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_too_many_nonfinite_steps_stop_the_run_with_status_1(tmp_path, monkeypatch):
    from simmim_hf import run_pretraining

    original = run_pretraining.masked_image_modeling_loss
    monkeypatch.setattr(run_pretraining, "masked_image_modeling_loss",
                        lambda model, batch, state: original(model, batch, state) * float("nan"))
    recorder = Recorder()
    rc = pretrain(["--output_dir", tmp_path / "o", *COMMON, "--max_consecutive_nonfinite", "3"], callbacks=[recorder])
    results = json.loads((tmp_path / "o" / "all_results.json").read_text())
    # The guard is read at the logging interval (every 2 steps): 3 in a row are seen at step 4.
    assert rc == 1 and results["stopped_early"] and results["global_step"] == 4 and recorder.steps == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------- Hub
def test_push_to_hub_standin_holds_a_loadable_model(full_run):
    record = full_run["record"]
    names = {p.relative_to(record).as_posix() for p in record.rglob("*") if p.is_file()}
    for required in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                     "configuration_simmim.py", "modeling_simmim.py", "image_processing_simmim.py"):
        assert required in names, names
    assert not any(n.startswith(("checkpoints/", "logs/", "reconstructions/")) for n in names)
    auto_map = json.loads((record / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForMaskedImageModeling"} <= set(auto_map)
    card = (record / "README.md").read_text()
    assert "vit-nano-p4-32" in card and "trust_remote_code=True" in card and "masked-image-modeling" in card
    assert "AvgDist" in card and "linear head, normalised pixels, L1 on masked pixels" in card
    assert "skimage/data/README.txt" in card and "CC BY 2.0" in card  # the embedded photos' credits
    # What was trained on, after the held-out split (20 % of the 20 photos; COMMON repeats each once).
    assert "; 16 training samples, 4 held out for evaluation" in card
    assert full_run["hub"].uploads == 2 and len(full_run["hub"].commits) == 1  # the first attempt failed, retried

    # Fresh process, away from the repo, simmim_hf not importable.
    code = (
        "import importlib.util, sys, torch\n"
        "from transformers import AutoImageProcessor, AutoModelForMaskedImageModeling\n"
        f"path = {str(record)!r}\n"
        "model = AutoModelForMaskedImageModeling.from_pretrained(path, trust_remote_code=True)\n"
        "proc = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)\n"
        "from PIL import Image\n"
        "batch = proc([Image.new('RGB', (36, 36), (10, 200, 90))], do_train=True, return_tensors='pt', seed=[1])\n"
        "out = model(**batch)\n"
        "assert torch.isfinite(out.loss) and out.reconstruction.shape == (1, 3, 32, 32)\n"
        "assert 'simmim_hf' not in sys.modules\n"
        "print('LOADED', type(model).__module__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # BLOCK_SIMMIM_HF makes `import simmim_hf` fail even where the package is installed (e.g. editable).
    proc = subprocess.run([sys.executable, "-c", BLOCK_SIMMIM_HF + code], cwd=full_run["tmp"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0 and "LOADED transformers_modules" in proc.stdout, proc.stdout[-3000:]


def test_token_never_written_or_logged(full_run):
    assert full_run["log"] and FAKE_TOKEN not in full_run["log"]
    for root in (full_run["out"], full_run["record_root"]):
        for path in root.rglob("*"):
            if path.is_file():
                assert FAKE_TOKEN.encode() not in path.read_bytes(), path


# ----------------------------------------------------------------------------------- two processes
def test_two_process_ddp_equals_one_process_with_the_same_total_batch(tmp_path):
    """2 gloo processes x batch 4 train exactly like 1 process x batch 8: each rank gets its own half of every
    global batch (the same per-sample crops and masks) and DDP averages the gradients."""
    args = ["--preset", "vit-nano-p4-32", "--sample_data_repeats", "1", "--max_train_steps", "2", "--learning_rate", "1e-3", "--warmup_steps",
            "1", "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_TOKEN"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), "--output_dir", str(tmp_path / "ddp"),
         "--per_device_train_batch_size", "4", *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    recorder = Recorder()
    assert pretrain(["--output_dir", tmp_path / "one", "--per_device_train_batch_size", "8", *args],
                    callbacks=[recorder]) == 0
    ddp, one = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    start = _weights_at_init()
    assert _max_diff(ddp, start) > 1e-4  # both trained
    assert _max_diff(ddp, one) <= 2e-6, _max_diff(ddp, one)
    settings = json.loads((tmp_path / "ddp" / "checkpoints" / "checkpoint-2" / "checkpoint_complete.json").read_text())
    assert settings["settings"]["num_processes"] == 2 and recorder.num_processes == 1


def test_sigterm_to_the_whole_process_group_still_saves_a_checkpoint(tmp_path):
    """`scancel` / `kill -- -PGID` signal the DataLoader workers too; a worker killed by it used to make the
    training process raise in the middle of its preemption checkpoint, leaving nothing to resume from."""
    import time

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_TOKEN"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--preset", "vit-nano-p4-32", "--max_train_steps", "100000",
         "--per_device_train_batch_size", "4", "--dataloader_num_workers", "1", "--logging_steps", "1",
         "--report_to", "none", "--learning_rate", "1e-3", "--output_dir", str(out)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # wait until training is under way, workers running
            if "step 3/" in line or time.monotonic() > deadline:
                break
        os.killpg(proc.pid, signal.SIGTERM)
        log = line + proc.stdout.read()
        assert proc.wait(timeout=240) == 128 + signal.SIGTERM, log[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert saved and (saved[-1] / "checkpoint_complete.json").is_file(), log[-4000:]
    assert "Received signal" in log and "Traceback" not in log


def test_the_embedded_data_holds_out_whole_photos_and_evaluates_the_last_step_once(tmp_path, caplog):
    """--validation_split_percentage on the embedded photos holds out photos, not copies of training photos; an
    evaluation at the last step is not repeated by the final one; --eval_steps without an evaluation set warns."""
    from types import SimpleNamespace

    from simmim_hf.data import load_pretraining_data

    args = SimpleNamespace(dataset_name=None, train_dir=None, sample_data_repeats=4, validation_split_percentage=20,
                           seed=0, image_column_name=None, max_train_samples=None, max_eval_samples=None)
    train, evaluation, _, _ = load_pretraining_data(args)
    assert (len(train), len(evaluation)) == (64, 4) and not set(train["file_name"]) & set(evaluation["file_name"])

    recorder = Recorder()
    with caplog.at_level(logging.INFO):
        assert pretrain([*COMMON, "--max_train_steps", "4", "--eval_steps", "2", "--output_dir", tmp_path / "a"],
                        callbacks=[recorder]) == 0
    evaluations = [r.getMessage() for r in caplog.records if "eval loss" in r.getMessage()]
    assert len(evaluations) == 2 and "Final eval loss" not in " ".join(evaluations)  # steps 2 and 4, once each
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert pretrain([*COMMON, "--max_train_steps", "2", "--eval_steps", "1", "--validation_split_percentage", "0",
                         "--output_dir", tmp_path / "b"]) == 0
    assert any("there is no evaluation set" in r.getMessage() for r in caplog.records)


def _weights_at_init() -> dict:
    from transformers import set_seed

    from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling

    set_seed(42)
    return SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("vit-nano-p4-32")).state_dict()


# -------------------------------------------------------------------------------- in-process units
def test_sample_augmentation_independent_of_batching_and_workers():
    from torch.utils.data import DataLoader

    from simmim_hf import SimMIMConfig
    from simmim_hf.data import EpochShuffleSampler, ImageRows, SimMIMCollator
    from simmim_hf.image_processing_simmim import SimMIMImageProcessor
    from simmim_hf.sample_data import load_sample_dataset

    processor = SimMIMImageProcessor.from_config(SimMIMConfig.from_preset("vit-nano-p4-32"))
    rows = ImageRows(load_sample_dataset(), "image", keep_columns=())
    collator = SimMIMCollator(processor, seed=7, keep_columns=("index",), do_train=True, return_mask=True)

    def per_sample(batch_size, workers, epoch, seed=0):
        sampler = EpochShuffleSampler(len(rows), seed=seed)
        sampler.set_epoch(epoch)
        loader = DataLoader(rows, batch_size=batch_size, num_workers=workers, sampler=sampler, collate_fn=collator,
                            persistent_workers=workers > 0)
        return {key: (x, m) for batch in loader
                for key, x, m in zip(batch["index"].tolist(), batch["pixel_values"], batch["bool_masked_pos"])}

    # Another batch size, persistent workers and another shuffling order: the same crop and mask per sample.
    a, b = per_sample(4, 0, epoch=3), per_sample(7, 2, epoch=3, seed=5)
    assert a.keys() == b.keys() == set(range(len(rows)))
    for key in a:
        assert torch.equal(a[key][0], b[key][0]) and torch.equal(a[key][1], b[key][1])
    c = per_sample(4, 0, epoch=4)  # a new epoch draws new crops/masks
    assert sum(not torch.equal(a[k][1], c[k][1]) for k in a) >= len(a) // 2


def test_epoch_travels_with_the_index_into_persistent_workers():
    from torch.utils.data import DataLoader

    from simmim_hf.data import EpochShuffleSampler, ImageRows
    from simmim_hf.sample_data import load_sample_dataset

    rows = ImageRows(load_sample_dataset(), "image")
    sampler = EpochShuffleSampler(len(rows), seed=1)
    loader = DataLoader(rows, batch_size=5, sampler=sampler, num_workers=2, persistent_workers=True,
                        collate_fn=lambda batch: [(row["epoch"], row["index"]) for row in batch])
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = [pair for batch in loader for pair in batch]
        assert {e for e, _ in seen} == {epoch} and sorted(i for _, i in seen) == list(range(len(rows)))
        orders.append([i for _, i in seen])
    assert orders[0] != orders[1] != orders[2]
    sampler.set_epoch(1)
    assert [i for _, i in sampler] == orders[1]  # a pure function of (seed, epoch)


def test_unreadable_images_are_replaced_and_counted():
    from simmim_hf import SimMIMConfig
    from simmim_hf.data import SimMIMCollator, decode_image
    from simmim_hf.image_processing_simmim import SimMIMImageProcessor
    from simmim_hf.sample_data import load_sample_images

    assert decode_image({"bytes": b"\x89PNG not really", "path": None}) is None
    processor = SimMIMImageProcessor.from_config(SimMIMConfig.from_preset("vit-nano-p4-32"))
    image = load_sample_images()[0]
    batch = SimMIMCollator(processor, seed=0, do_train=True, return_mask=True)(
        [{"image": image, "index": 0, "epoch": 0}, {"image": {"bytes": b"junk", "path": None}, "index": 1, "epoch": 0}])
    assert batch["pixel_values"].shape[0] == 2 and int(batch["unreadable"].sum()) == 1
    # The readable image stands in, with the crop, flip and mask of the position it fills (not a copy of its own).
    from simmim_hf.training_utils import sample_seed

    own = processor([image], return_tensors="pt", do_train=True, return_mask=True, seed=[sample_seed(0, 0, 1)])
    assert torch.equal(batch["pixel_values"][1], own["pixel_values"][0])
    assert torch.equal(batch["bool_masked_pos"][1], own["bool_masked_pos"][0])
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])


def test_trainer_compatibility(tmp_path):
    from transformers import Trainer, TrainingArguments

    from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling
    from simmim_hf.data import ImageRows, SimMIMCollator
    from simmim_hf.image_processing_simmim import SimMIMImageProcessor
    from simmim_hf.sample_data import load_sample_dataset

    config = SimMIMConfig.from_preset("vit-nano-p4-32")
    ds = load_sample_dataset().train_test_split(test_size=4, seed=0)
    processor = SimMIMImageProcessor.from_config(config)
    trainer = Trainer(
        model=SimMIMForMaskedImageModeling(config),
        args=TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                               max_steps=3, remove_unused_columns=False, report_to=[], use_cpu=True,
                               logging_steps=1, save_strategy="no", dataloader_num_workers=0,
                               # The model computes its own loss from the mask; naming it as the "label"
                               # makes Trainer report eval_loss (the model has no `labels` argument).
                               label_names=["bool_masked_pos"]),
        train_dataset=ImageRows(ds["train"], "image"),
        eval_dataset=ImageRows(ds["test"], "image"),
        data_collator=SimMIMCollator(processor, seed=0, count_unreadable=False, do_train=True, return_mask=True),
    )
    train_result = trainer.train()
    metrics = trainer.evaluate()
    assert train_result.global_step == 3
    assert "eval_loss" in metrics and 0 < metrics["eval_loss"] < 3


def test_checkpoint_resolution(tmp_path, caplog):
    from simmim_hf.training_utils import COMPLETE_MARKER, CheckpointManager

    class _Acc:  # resolve() needs no accelerator
        pass

    mgr = CheckpointManager(_Acc(), tmp_path)
    assert mgr.resolve(None) is None
    assert mgr.resolve("latest") is None  # nothing yet: warning + fresh start
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    with caplog.at_level("WARNING"):
        assert mgr.resolve("latest").name == "checkpoint-4"
    assert "checkpoint-6" in caplog.text
    with pytest.raises(ValueError, match="--resume_from_checkpoint"):
        mgr.resolve(str(tmp_path / "checkpoints" / "checkpoint-6"))
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint"):
        mgr.resolve(str(tmp_path / "nope"))


def test_nonfinite_guard_skips_without_touching_weights_and_stops_after_n():
    from simmim_hf.training_utils import NonFiniteGuard

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    guard = NonFiniteGuard(max_consecutive=2)
    assert NonFiniteGuard.supports(opt)
    changed = []
    for bad in (False, True, True, False):
        before = layer.weight.detach().clone()
        loss = layer(torch.randn(4, 3)).sum() * (float("nan") if bad else 1.0)
        loss.backward()
        found_inf = guard.update(torch.nn.utils.clip_grad_norm_(layer.parameters(), 5.0))
        NonFiniteGuard.attach(opt, found_inf)
        opt.step()
        NonFiniteGuard.detach(opt)
        opt.zero_grad()
        changed.append(not torch.equal(before, layer.weight))
    assert changed == [True, False, False, True]
    assert opt.state[layer.weight]["step"].item() == 2  # skipped steps do not advance Adam's step
    assert guard.check() is True and guard.total_skipped == 2  # 2 in a row reached the limit
    assert guard.check() is False  # counters reset after a check


def test_hub_pusher_retries_and_never_raises(tmp_path):
    from simmim_hf.training_utils import HubPusher

    class FlakyApi:
        def __init__(self, failures):
            self.failures, self.uploads = failures, 0

        def create_repo(self, repo_id, **kwargs):
            return repo_id

        def upload_folder(self, **kwargs):
            self.uploads += 1
            if self.uploads <= self.failures:
                raise ConnectionError("down")
            return "ok"

    (tmp_path / "f.txt").write_text("x")
    ok = HubPusher("u/r", api=FlakyApi(2), max_retries=3, backoff_seconds=0.01)
    ok.push(tmp_path, "m")
    assert ok.wait() is True and ok.api.uploads == 3
    bad = HubPusher("u/r", api=FlakyApi(10), max_retries=2, backoff_seconds=0.01)
    bad.push(tmp_path, "m")
    assert bad.wait() is False and bad.failed and (tmp_path / "f.txt").read_text() == "x"


def test_sample_seed_is_a_pure_function():
    from simmim_hf.training_utils import sample_seed

    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)
    seeds = {sample_seed(0, e, i) for e in range(5) for i in range(1000)}
    assert len(seeds) == 5000 and all(0 <= s < 2**63 for s in seeds)


def test_embedded_sample_data_is_real_and_offline():
    from simmim_hf.sample_data import SAMPLE_IMAGES, load_sample_images

    images = load_sample_images(shortest_edge=None)
    assert len(images) == len(SAMPLE_IMAGES) == 20
    assert all(im.mode == "RGB" and min(im.size) >= 150 for im in images)


def test_reconstruction_grid_columns():
    from simmim_hf.visualization import reconstruction_grid

    x = torch.zeros(2, 3, 32, 32)
    rec = torch.ones(2, 3, 32, 32) * 2.0
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :8] = True  # the top 4 pixel rows (patch 4, 8x8 grid)
    grid = reconstruction_grid(x, rec, mask, patch_size=4, min_cell_size=32, padding=0)
    assert grid.size == (4 * 32, 2 * 32)
    px = grid.load()
    assert px[0, 0] == px[0, 10]  # original unaffected by the mask
    assert px[32, 0] == (127, 127, 127) and px[32, 10] == px[0, 10]  # masked input: gray only where masked
    assert px[96, 0] == px[64, 0] and px[96, 10] == px[0, 10]  # pasted: reconstruction only where masked


def test_torch_compile_trains_like_eager(tmp_path):
    """--torch_compile goes through Accelerate's dynamo plugin: the same losses and weights as eager (aot_eager
    here: the graph capture and autograd of compilation, without a C++ toolchain), and a normal saved model."""
    args = [*COMMON, "--max_train_steps", "3", "--logging_steps", "1", "--validation_split_percentage", "0",
            "--dataloader_num_workers", "0", "--config_overrides", "drop_path_rate=0.0"]
    eager, compiled = Recorder(), Recorder()
    assert pretrain(["--output_dir", tmp_path / "eager", *args], callbacks=[eager]) == 0
    assert pretrain(["--output_dir", tmp_path / "compiled", *args, "--torch_compile", "--torch_compile_backend",
                     "aot_eager"], callbacks=[compiled]) == 0
    assert [e["train/loss"] for e in compiled.logs] == pytest.approx([e["train/loss"] for e in eager.logs], abs=1e-5)
    assert _max_diff(_weights(tmp_path / "eager"), _weights(tmp_path / "compiled")) <= 1e-5
    assert not any(key.startswith("_orig_mod") for key in _weights(tmp_path / "compiled"))
