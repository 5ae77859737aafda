"""Tests of the pretraining job (examples/run_pretraining.py) and its helpers (simmim_hf.training_utils,
sample_data, visualization). CPU only, no network, tiny presets.

The subprocess runs are the costly part; each is made once (module-scoped fixtures) and shared by the
asserts that read its output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_SIMMIM_HF
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "run_pretraining.py"
STANDIN = REPO / "tests" / "pretrain_hub_standin.py"
FAKE_TOKEN = "hf_pretrainTESTtoken0123456789abcdef"

# 20 embedded images, batch 4 -> 4 steps per epoch after a 20 % eval split (16 train images): 10 steps cross
# two epoch boundaries and the preemption at step 3 falls mid-epoch. drop_path exercises the RNG restore.
COMMON = [
    "--preset", "vit-nano-p4-32", "--config_overrides", "drop_path_rate=0.1",
    "--per_device_train_batch_size", "4", "--sample_data_repeats", "1", "--validation_split_percentage", "20",
    "--max_train_steps", "10", "--warmup_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "2",
    "--report_to", "none", "--dataloader_num_workers", "1",
]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_TOKEN"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _run(cmd, log: Path, expect_rc: int = 0, **env) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    log.write_text(proc.stdout)
    assert proc.returncode == expect_rc, f"exit {proc.returncode}:\n{proc.stdout[-4000:]}"
    return proc.stdout


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The main job (shortened): 10 steps in one go, pushed to a local stand-in of the Hub."""
    tmp = tmp_path_factory.mktemp("full")
    out, record = tmp / "out", tmp / "hub"
    log = _run([sys.executable, str(STANDIN), str(record), "--output_dir", str(out), *COMMON,
                "--visualize_steps", "5", "--push_to_hub", "--hub_model_id", "tester/simmim-nano"],
               tmp / "log.txt", HF_TOKEN=FAKE_TOKEN)
    return {"out": out, "record": record / "tester" / "simmim-nano", "record_root": record, "log": log, "tmp": tmp}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """The same job preempted (real SIGTERM) after step 3, then resumed with `latest` past a half-written
    checkpoint."""
    tmp = tmp_path_factory.mktemp("resumed")
    out = tmp / "out"
    log1 = _run([sys.executable, str(SCRIPT), "--output_dir", str(out), *COMMON, "--debug_sigterm_at_step", "3"],
                tmp / "log1.txt")
    listing = sorted(p.name for p in (out / "checkpoints").iterdir())
    # Simulate a kill in the middle of a later save: the folder exists, the completion marker does not.
    broken = out / "checkpoints" / "checkpoint-7"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"truncated")
    log2 = _run([sys.executable, str(SCRIPT), "--output_dir", str(out), *COMMON, "--resume_from_checkpoint", "latest"],
                tmp / "log2.txt")
    return {"out": out, "log1": log1, "log2": log2, "listing_after_preemption": listing}


@pytest.fixture(scope="module")
def bf16_nan_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    out = tmp / "out"
    log = _run([sys.executable, str(SCRIPT), "--output_dir", str(out), *COMMON, "--max_train_steps", "6",
                "--mixed_precision", "bf16", "--debug_nonfinite_steps", "2,3", "--max_consecutive_nonfinite", "5"],
               tmp / "log.txt")
    return {"out": out, "log": log}


# ----------------------------------------------------------------------------------------- main job
def test_main_job_writes_loadable_model_and_reconstruction_png(full_run):
    from PIL import Image

    from simmim_hf import SimMIMForMaskedImageModeling
    from simmim_hf.image_processing_simmim import SimMIMImageProcessor

    out = full_run["out"]
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
    # The loss is logged with lr and images/s; it goes down on this data even in 10 steps at lr 1e-3.
    losses = [float(x) for x in re.findall(r"step \d+/10 epoch \d+ loss ([0-9.]+) lr", full_run["log"])]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert "images/s" in full_run["log"]


def test_resume_is_exact_and_skips_half_written_checkpoint(full_run, resumed_run):
    assert "Received signal 15; saving a checkpoint at step 3" in resumed_run["log1"]
    assert "checkpoint-3" in resumed_run["listing_after_preemption"]
    assert "Skipping half-written checkpoint" in resumed_run["log2"] and "checkpoint-7" in resumed_run["log2"]
    assert re.search(r"Resuming from checkpoint \S*checkpoint-3", resumed_run["log2"])
    diff = _max_diff(_weights(full_run["out"]), _weights(resumed_run["out"]))
    assert diff <= 1e-6, diff
    # The resumed run really trained 7 more steps from step 3 (not from scratch, not a no-op).
    assert "step 10/10" in resumed_run["log2"] and "step 2/10" not in resumed_run["log2"]


def test_preempted_run_leaves_complete_latest(resumed_run):
    from simmim_hf.training_utils import read_checkpoint_state

    latest = (resumed_run["out"] / "checkpoints" / "latest").read_text().strip()
    assert latest == "checkpoint-10"  # the final checkpoint of the resumed run, not the broken one
    state = read_checkpoint_state(resumed_run["out"] / "checkpoints" / latest)
    assert state["step"] == 10
    assert not any(p.name.startswith(".tmp-") for p in (resumed_run["out"] / "checkpoints").iterdir())


def test_bf16_runs_and_nonfinite_steps_are_skipped(bf16_nan_run):
    log = bf16_nan_run["log"]
    assert "Mixed precision type: bf16" in log
    # Steps 2 and 3 are split by the logging interval (2): one warning each, the second sees the run of 2.
    assert log.count("optimizer step(s) with a non-finite loss/gradient") == 2
    assert "(longest run 2, 2 in total; stopping after 5 in a row)" in log
    results = json.loads((bf16_nan_run["out"] / "all_results.json").read_text())
    assert results["skipped_nonfinite_steps"] == 2 and not results["stopped_early"]
    weights = _weights(bf16_nan_run["out"])
    assert all(torch.isfinite(t).all() for t in weights.values())


# ------------------------------------------------------------------------------------------------- Hub
def test_push_to_hub_standin_holds_a_loadable_model(full_run):
    record = full_run["record"]
    names = {p.relative_to(record).as_posix() for p in record.rglob("*") if p.is_file()}
    for required in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                     "configuration_simmim.py", "modeling_simmim.py", "image_processing_simmim.py"):
        assert required in names, names
    assert not any(n.startswith(("checkpoints/", "logs/")) for n in names)
    auto_map = json.loads((record / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForMaskedImageModeling"} <= set(auto_map)
    card = (record / "README.md").read_text()
    assert "vit-nano-p4-32" in card and "trust_remote_code=True" in card and "masked-image-modeling" in card
    assert "Hub upload of" in full_run["log"] and "retrying" in full_run["log"]  # the simulated failure

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
    env = _env()
    env.pop("PYTHONPATH")
    # BLOCK_SIMMIM_HF makes `import simmim_hf` fail even where the package is installed (e.g. editable).
    proc = subprocess.run([sys.executable, "-c", BLOCK_SIMMIM_HF + code], cwd=full_run["tmp"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0 and "LOADED transformers_modules" in proc.stdout, proc.stdout[-3000:]


def test_token_never_written_or_logged(full_run):
    assert FAKE_TOKEN not in full_run["log"]
    for root in (full_run["out"], full_run["record_root"]):
        for path in root.rglob("*"):
            if path.is_file():
                assert FAKE_TOKEN.encode() not in path.read_bytes(), path


# ----------------------------------------------------------------------------------- two processes
def test_two_process_gloo_ddp(tmp_path):
    out = tmp_path / "out"
    log = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
                "--output_dir", str(out), "--preset", "vit-nano-p4-32", "--per_device_train_batch_size", "4",
                "--sample_data_repeats", "1", "--max_train_steps", "3", "--logging_steps", "1",
                "--report_to", "none", "--dataloader_num_workers", "0"], tmp_path / "log.txt")
    assert log.count("Num processes: 2") == 2 and "Backend: gloo" in log
    firsts = dict(re.findall(r"\[RANK (\d)\] First batch sample indices: (\[[0-9, ]+\])", log))
    assert set(firsts) == {"0", "1"}
    shard0, shard1 = json.loads(firsts["0"]), json.loads(firsts["1"])
    assert len(shard0) == len(shard1) == 4 and not set(shard0) & set(shard1)  # different shards
    sums = dict(re.findall(r"\[RANK (\d)\] Final weights checksum: (\S+)", log))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"]  # identical weights on both ranks
    # Total batch 8 over 16 images... 20 images -> 2 batches per rank per epoch; lr scaled by 8 / 512.
    assert "total batch = 8" in log


# -------------------------------------------------------------------------------- in-process units
def _load_script():
    spec = importlib.util.spec_from_file_location("run_pretraining", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_augmentation_independent_of_batching_and_workers():
    from torch.utils.data import DataLoader

    from simmim_hf import SimMIMConfig
    from simmim_hf.image_processing_simmim import SimMIMImageProcessor
    from simmim_hf.sample_data import load_sample_dataset

    script = _load_script()
    processor = SimMIMImageProcessor.from_config(SimMIMConfig.from_preset("vit-nano-p4-32"))
    dataset = script.MIMDataset(load_sample_dataset(), "image")
    dataset.set_epoch(3)

    def per_sample(batch_size, workers):
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                            collate_fn=script.MIMCollator(processor, seed=7))
        result = {}
        for batch in loader:
            for key, x, m in zip(batch["sample_keys"].tolist(), batch["pixel_values"], batch["bool_masked_pos"]):
                result[key] = (x, m)
        return result

    a, b = per_sample(4, 0), per_sample(7, 2)
    assert a.keys() == b.keys() == set(range(len(dataset)))
    for key in a:
        assert torch.equal(a[key][0], b[key][0]) and torch.equal(a[key][1], b[key][1])
    dataset.set_epoch(4)  # a new epoch draws new crops/masks
    c = per_sample(4, 0)
    assert sum(not torch.equal(a[k][1], c[k][1]) for k in a) >= len(a) // 2


def test_unreadable_images_are_replaced_and_counted():
    from simmim_hf import SimMIMConfig
    from simmim_hf.image_processing_simmim import SimMIMImageProcessor
    from simmim_hf.sample_data import load_sample_images

    script = _load_script()
    assert script.decode_image({"bytes": b"\x89PNG not really", "path": None}) is None
    processor = SimMIMImageProcessor.from_config(SimMIMConfig.from_preset("vit-nano-p4-32"))
    image = load_sample_images()[0]
    batch = script.MIMCollator(processor, seed=0)(
        [{"image": image, "key": 0, "epoch": 0}, {"image": None, "key": 1, "epoch": 0}])
    assert batch["pixel_values"].shape[0] == 2 and int(batch["num_unreadable"]) == 1


def test_trainer_compatibility(tmp_path):
    from transformers import Trainer, TrainingArguments

    from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling
    from simmim_hf.image_processing_simmim import SimMIMImageProcessor
    from simmim_hf.sample_data import load_sample_dataset

    script = _load_script()
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
        train_dataset=script.MIMDataset(ds["train"], "image"),
        eval_dataset=script.MIMDataset(ds["test"], "image"),
        data_collator=script.MIMCollator(processor, seed=0, return_extras=False),
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
