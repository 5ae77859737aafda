"""FSDP on the CPU: `accelerate launch --config_file examples/accelerate_configs/fsdp.yaml` on a machine without a GPU
must shard (FSDP2 `fully_shard` over gloo), not silently become MULTI_CPU DDP; what cannot run there is refused.

Two real 2-process launches (a config written from fsdp.yaml, 2 processes, fp32, GPUs hidden): a 4-step run that
checkpoints at step 3 (mid-epoch) and at the end, and the same run resumed from its step-3 checkpoint. Then a
multi-node DDP launch over localhost (two "machines" of one process each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from jobs import pretrain
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "run_pretraining.py"
ARGS = ["--preset", "vit-nano-p4-32", "--sample_data_repeats", "1", "--max_train_steps", "4", "--learning_rate", "1e-3",
        "--warmup_steps", "1", "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0",
        "--validation_split_percentage", "15"]  # 17 training photos, 3 evaluation photos
FSDP_ARGS = [*ARGS, "--per_device_train_batch_size", "4", "--checkpointing_steps", "3"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "HF_TOKEN"))}
    # The CPU path even where a GPU is present.
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return env


def _launch(config: Path, output_dir: Path, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
         str(SCRIPT), "--output_dir", str(output_dir), *FSDP_ARGS, *extra], env=_env(), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    config = yaml.safe_load((REPO / "examples" / "accelerate_configs" / "fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    config.update(num_processes=2, mixed_precision="no")  # fp32: comparable with one process
    config.pop("gpu_ids", None)
    (tmp / "fsdp.yaml").write_text(yaml.safe_dump(config))
    full_log = _launch(tmp / "fsdp.yaml", tmp / "full")
    # A run killed after its step-3 checkpoint leaves exactly that checkpoint (and its own training_args.json).
    (tmp / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp / "full" / "checkpoints" / "checkpoint-3", tmp / "resumed" / "checkpoints" / "checkpoint-3")
    shutil.copy(tmp / "full" / "training_args.json", tmp / "resumed")
    resumed_log = _launch(tmp / "fsdp.yaml", tmp / "resumed", "--resume_from_checkpoint", "latest")
    return {"tmp": tmp, "full": tmp / "full", "resumed": tmp / "resumed", "full_log": full_log,
            "resumed_log": resumed_log}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp_config_shards_parameters_and_optimizer_state_on_cpu(fsdp_runs):
    from torch.distributed.checkpoint import FileSystemReader

    assert "DistributedType.FSDP" in fsdp_runs["full_log"] and "MULTI_CPU" not in fsdp_runs["full_log"]
    checkpoint = fsdp_runs["full"] / "checkpoints" / "checkpoint-3"
    for folder, prefix in (("pytorch_model_fsdp_0", "model."), ("optimizer_0", "optimizer.state.")):
        # SHARDED_STATE_DICT: each rank wrote its own shard (dim 0 split in halves) to its own file.
        metadata = FileSystemReader(str(checkpoint / folder)).read_metadata()
        files = {(index.fqn, tuple(index.offset)): info.relative_path
                 for index, info in metadata.storage_data.items() if index.offset is not None}
        sharded = 0
        for name, meta in metadata.state_dict_metadata.items():
            if not name.startswith(prefix) or not hasattr(meta, "chunks") or len(meta.size) < 2 or meta.size[0] % 2:
                continue  # (a [1, 1, 64] token: rank 0 holds it, rank 1 an empty shard)
            rows = meta.size[0]
            assert [(c.offsets[0], c.sizes[0]) for c in meta.chunks] == [(0, rows // 2), (rows // 2, rows // 2)], name
            assert [files[(name, tuple(c.offsets))] for c in meta.chunks] == ["__0_0.distcp", "__1_0.distcp"], name
            sharded += 1
        assert sharded >= 10, (folder, sharded)
    weight = metadata.state_dict_metadata["optimizer.state.simmim.encoder.layers.0.attention.qkv.weight.exp_avg"]
    assert tuple(weight.size) == (192, 64) and [tuple(c.sizes) for c in weight.chunks] == [(96, 64)] * 2


def test_fsdp_run_saves_a_loadable_model_that_trained_like_one_process(fsdp_runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from simmim_hf import SimMIMForMaskedImageModeling

    full = fsdp_runs["full"]
    # save_pretrained of the fully_shard-ed class: our remote code, not torch's FSDP sources.
    config = json.loads((full / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMaskedImageModeling"] == "modeling_simmim.SimMIMForMaskedImageModeling"
    assert (full / "modeling_simmim.py").is_file() and not list(full.glob("_fsdp*.py"))
    fsdp = load_file(str(full / "model.safetensors"))
    model = SimMIMForMaskedImageModeling.from_pretrained(full)
    assert _max_diff({k: v for k, v in model.state_dict().items() if k in fsdp}, fsdp) == 0.0
    # The final sharded checkpoint holds the same weights as the gathered model.
    dcp_to_torch_save(full / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp_0", tmp_path / "sharded.pt")
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)["model"]
    assert _max_diff({k: sharded[k] for k in fsdp}, fsdp) == 0.0
    # 2 ranks x batch 4 under FSDP train like 1 process x batch 8 (the same samples, crops and masks).
    assert pretrain(["--output_dir", tmp_path / "one", "--per_device_train_batch_size", "8", "--cpu", *ARGS]) == 0
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert _max_diff(fsdp, one) <= 2e-6, _max_diff(fsdp, one)
    # Evaluation counts each of the 3 images once, although 2 processes get a (padded) batch each.
    results = [json.loads((folder / "all_results.json").read_text())["eval_loss"] for folder in (full, tmp_path / "one")]
    assert abs(results[0] - results[1]) <= 1e-5, results


def test_fsdp_resume_from_a_sharded_checkpoint_is_exact(fsdp_runs):
    log = fsdp_runs["resumed_log"]
    assert "Loading FSDP model" in log and "Resumed from checkpoint" in log and "(step 3)" in log
    assert "step 1/4" not in log  # steps 1..3 came from the checkpoint
    assert "step 4/4" in log
    full = load_file(str(fsdp_runs["full"] / "model.safetensors"))
    resumed = load_file(str(fsdp_runs["resumed"] / "model.safetensors"))
    assert _max_diff(full, resumed) <= 1e-6, _max_diff(full, resumed)


def test_two_nodes_rendezvous_over_localhost_and_train_like_one_machine(fsdp_runs):
    """Multi-node DDP as the README launches it: two "machines" of one process each, the same command but
    --machine_rank, meeting at main_process_ip:main_process_port; the output folder is shared (one filesystem)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = fsdp_runs["tmp"] / "two_nodes"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes",
         "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), "--output_dir", str(out), *FSDP_ARGS],
        env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    for rank, log in enumerate(logs):  # one process per machine, two in the world
        assert f"Num processes: 2\nProcess index: {rank}\nLocal process index: 0" in log, log[-3000:]
    # DDP over the two nodes = FSDP on one machine = one process with the same total batch.
    nodes_weights = load_file(str(out / "model.safetensors"))
    fsdp = load_file(str(fsdp_runs["full"] / "model.safetensors"))
    assert _max_diff(nodes_weights, fsdp) <= 2e-6, _max_diff(nodes_weights, fsdp)


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "distributed_type FSDP with fsdp_version 1"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "distributed_type DEEPSPEED"),
])
def test_cpu_refuses_a_strategy_it_cannot_run(env, message, monkeypatch, tmp_path):
    """Accelerate would turn these into MULTI_CPU DDP (FSDP1: torch refuses it on the CPU): stop before training."""
    from simmim_hf.engine import create_accelerator

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message) as error:
        create_accelerator(SimpleNamespace(cpu=True), tmp_path)
    assert "MULTI_CPU" in str(error.value) and "fsdp_version: 2" in str(error.value)


def test_an_epoch_is_one_process_share_of_the_batches(fsdp_runs):
    """The schedule's epoch is what each process steps through: 17 training photos in full batches of 4 are 4
    batches, of which each of 2 processes gets 2 (not 4, which made --num_train_epochs run twice as long)."""
    assert "2 epochs of 2 steps" in fsdp_runs["full_log"], fsdp_runs["full_log"][-3000:]
    assert "step 2/4 epoch 0 " in fsdp_runs["full_log"] and "step 3/4 epoch 1 " in fsdp_runs["full_log"]


def test_fsdp_linear_probe_saves_its_whole_head_and_counts_unreadable_eval_images_once(fsdp_runs, tmp_path):
    """Under FSDP the probe's head is sharded (DTensors): saving it from the main process alone crashed at the first
    evaluation, after an epoch of training. And an unreadable evaluation image that the sampler repeats to even out
    the last batch across the 2 processes was counted twice."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, counts in (("train", (4, 4)), ("validation", (3, 2))):
        for label, count in zip("ab", counts):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (tmp_path / "validation" / "a" / "000.png").write_bytes(b"not a png")  # the first image: repeated as padding
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(fsdp_runs["tmp"] / "fsdp.yaml"),
         "--num_processes", "2", str(REPO / "examples" / "run_finetune.py"), "--preset", "vit-nano-p4-32",
         "--linear_probe", "--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "validation"),
         "--output_dir", str(tmp_path / "probe"), "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
         "--per_device_eval_batch_size", "2", "--report_to", "none", "--dataloader_num_workers", "0"],
        env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "DistributedType.FSDP" in proc.stdout
    head = load_file(str(tmp_path / "probe" / "last" / "linear_probe_head.safetensors"))
    assert head["weight"].shape == (2, 64) and head["bias"].shape == (2,)
    results = json.loads((tmp_path / "probe" / "last" / "eval_results.json").read_text())
    assert results["unreadable_images"] == 1, results
