"""The fine-tuning job end to end on the embedded digits: `accelerate launch`, evaluate metrics,
resolution transfer inside the job, exact resume (at an epoch boundary and mid-epoch after SIGTERM), and a
linear probe that leaves the encoder untouched."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from jobs import Recorder, finetune
from safetensors.torch import load_file

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling
from simmim_hf.arguments import FinetuningArguments, parse_args
from simmim_hf.augmentation import FinetuneAugmentation, mix_batch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_finetune.py"
TINY = ["--num_train_epochs", "2", "--warmup_epochs", "1", "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "32", "--max_train_samples", "48", "--max_eval_samples", "32",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def run_finetune():
    """The job in-process (a fresh Accelerate state per run) and its argument parser."""
    return SimpleNamespace(run=finetune, parse_args=lambda argv: parse_args(FinetuningArguments, argv))


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory):
    """Tiny SimMIM pretraining checkpoints (random weights stand in for a pretraining run)."""
    root = tmp_path_factory.mktemp("pretrained")
    dirs = {}
    for preset in ("vit-nano-p4-32", "swin-nano-w4-32"):
        torch.manual_seed(0)
        model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset))
        model.save_pretrained(root / preset)
        dirs[preset] = root / preset
    return dirs


def test_accelerate_launch_end_to_end_with_resolution_transfer(pretrained_dirs, tmp_path):
    # Swin pretrained at 32 px / window 4, fine-tuned at 48 px / window 6 through `accelerate launch`.
    out = tmp_path / "swin"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
           "--model_name_or_path", str(pretrained_dirs["swin-nano-w4-32"]), "--image_size", "48", "--window_size", "6",
           "--output_dir", str(out), "--cpu", *TINY, "--num_train_epochs", "1", "--mixup", "0.8", "--cutmix", "1.0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    final = json.loads((out / "all_results.json").read_text())
    best = final["best"]
    assert set(best) >= {"accuracy", "top5_accuracy", "loss", "epoch"}  # evaluate's top-k metric, 10 classes
    assert 0.0 <= best["accuracy"] <= best["top5_accuracy"] <= 1.0
    report = final["transfer_report"]
    assert len(report["interpolated"]) == 6 and report["mismatched"] == []
    assert sorted(report["unexpected"]) == ["decoder.0.bias", "decoder.0.weight"]
    # best/ is a loadable classifier with the fine-tuning card and its results table.
    card = (out / "best" / "README.md").read_text()
    assert "Base model:" in card and "| Epoch | Accuracy (%)" in card and f"{best['accuracy'] * 100:.2f}" in card
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out / "best")
    assert (model.config.image_size, model.config.window_size, model.config.num_labels) == (48, 6, 10)
    assert model(torch.zeros(1, 3, 48, 48)).logits.shape == (1, 10)


def test_two_process_ddp_fine_tuning_runs(pretrained_dirs, tmp_path):
    """DDP stops at the second step if a trainable parameter gets no gradient (the mask token, unused when
    classifying, did): 2 gloo processes run 3 steps and evaluate."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
           "--model_name_or_path", str(pretrained_dirs["vit-nano-p4-32"]), "--output_dir", str(out), "--cpu", *TINY,
           "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    final = json.loads((out / "all_results.json").read_text())
    assert len(final["history"]) == 1 and final["eval_samples"] == 32 and 0.0 <= final["best"]["accuracy"] <= 1.0


def test_resume_reproduces_the_uninterrupted_run(run_finetune, tmp_path):
    full = tmp_path / "full"
    results, _ = run_finetune.run(["--preset", "vit-nano-p4-32", "--output_dir", str(full), *TINY,
                                   "--checkpoints_total_limit", "5", "--mixup", "0.8"])
    assert [r["epoch"] for r in results["history"]] == [0, 1]
    # A run killed after epoch 0: only that checkpoint exists. Resuming must land on the same weights.
    first = sorted((full / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed / "checkpoints" / first.name)
    results2, _ = run_finetune.run(["--preset", "vit-nano-p4-32", "--output_dir", str(resumed), *TINY,
                                    "--mixup", "0.8", "--resume_from_checkpoint", "latest"])
    assert [r["epoch"] for r in results2["history"]] == [0, 1]  # epoch 0 restored from the checkpoint
    a, b = load_file(full / "last" / "model.safetensors"), load_file(resumed / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert results2["history"][1]["accuracy"] == results["history"][1]["accuracy"]


def test_sigterm_mid_epoch_saves_and_resumes_exactly(run_finetune, tmp_path):
    """A signal after step 2 of an epoch of 3: the job checkpoints at step 2 and stops; resuming replays the rest
    of the epoch (order, crops, RandAugment, mixup) exactly as the uninterrupted run."""
    args = ["--preset", "vit-nano-p4-32", *TINY, "--checkpoints_total_limit", "5", "--dataloader_num_workers", "1"]
    full, _ = run_finetune.run(["--output_dir", tmp_path / "full", *args])
    stopper = Recorder(at_step={2: lambda: os.kill(os.getpid(), signal.SIGTERM)})
    stopped, _ = run_finetune.run(["--output_dir", tmp_path / "cut", *args], callbacks=[stopper])
    assert stopped["preempted"] and stopper.steps == [1, 2] and stopped["history"] == []
    assert stopped["stop_status"] == 128 + signal.SIGTERM  # what `main` exits with
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    resumer = Recorder()
    resumed, _ = run_finetune.run(["--output_dir", tmp_path / "cut", *args, "--resume_from_checkpoint", "latest"],
                                  callbacks=[resumer])
    assert resumer.steps == [3, 4, 5, 6] and resumer.epoch_ends == [(0, 3), (1, 6)]
    a, b = load_file(tmp_path / "full" / "last" / "model.safetensors"), load_file(tmp_path / "cut" / "last" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert [r["accuracy"] for r in resumed["history"]] == [r["accuracy"] for r in full["history"]]


def test_linear_probe_leaves_encoder_unchanged(run_finetune, pretrained_dirs, tmp_path):
    path = pretrained_dirs["vit-nano-p4-32"]
    results, probe = run_finetune.run(["--model_name_or_path", str(path), "--linear_probe", "--probe_layer", "1",
                                       "--output_dir", str(tmp_path / "probe"), *TINY, "--learning_rate", "1e-2"])
    saved = load_file(path / "model.safetensors")
    encoder = probe.encoder.state_dict()
    for name, tensor in encoder.items():
        torch.testing.assert_close(tensor, saved[f"simmim.{name}"], rtol=0, atol=0, msg=name)
    assert all(not p.requires_grad for p in probe.encoder.parameters())
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    head = load_file(tmp_path / "probe" / "last" / "linear_probe_head.safetensors")
    assert head["weight"].shape == (10, 64) and head["weight"].abs().sum() > 0
    assert 0.0 <= results["best"]["accuracy"] <= 1.0


def test_mixup_cutmix_targets():
    x = torch.zeros(4, 3, 8, 8)
    x[1] = 1.0
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets = mix_batch(x, labels, 5, mixup=0.0, cutmix=1.0, label_smoothing=0.1, rng=np.random.default_rng(0))
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    # Image 2 is pasted from image 1 (the flipped batch): the pasted area fraction is its label weight.
    area = mixed[2, 0].mean().item()
    on, off = 1 - 0.1 + 0.1 / 5, 0.1 / 5
    assert targets[2, 1].item() == pytest.approx(area * on + (1 - area) * off, abs=1e-6)
    assert targets[2, 2].item() == pytest.approx((1 - area) * on + area * off, abs=1e-6)
    mixed, targets = mix_batch(x, labels, 5, mixup=0.8, cutmix=0.0, label_smoothing=0.1, rng=np.random.default_rng(1))
    lam = 1.0 - mixed[2, 0, 0, 0].item()  # image 2 (zeros) mixed with image 1 (ones) at weight 1 - lam
    assert targets[2, 2].item() == pytest.approx(lam * on + (1 - lam) * off, abs=1e-6)


def test_official_recipe_is_the_default(run_finetune, pretrained_dirs, tmp_path, monkeypatch):
    """Without flags: RandAugment, random erasing, mixup/cutmix, label smoothing, the padded crop at 32 px, the
    bicubic crop, and the official ViT fine-tuning layout (fc_norm, no final norm); a linear probe trains clean."""
    args = run_finetune.parse_args(["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path / "x")])
    assert (args.mixup, args.cutmix, args.label_smoothing) == (0.8, 1.0, 0.1)
    assert (args.rand_augment, args.random_erasing, args.random_erasing_mode) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel")
    probe = run_finetune.parse_args(["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path / "x"), "--linear_probe"])
    assert (probe.mixup, probe.cutmix, probe.label_smoothing, probe.rand_augment, probe.random_erasing) == \
        (0.0, 0.0, 0.0, "none", 0.0)

    seen = []
    original = FinetuneAugmentation.forward

    def spy(self, pixel_values):
        out = original(self, pixel_values)
        seen.append((self.training, self.padded_crop, self.config, self.random_erasing_prob,
                     bool((out != pixel_values).any())))
        return out

    monkeypatch.setattr(FinetuneAugmentation, "forward", spy)
    results, model = run_finetune.run(["--model_name_or_path", str(pretrained_dirs["vit-nano-p4-32"]),
                                       "--output_dir", str(tmp_path / "ft"), *TINY])
    assert len(seen) == 2 * 3  # every training batch: 48 samples / 16, 2 epochs
    training, padded_crop, rand_augment, erasing, changed = seen[0]
    assert training and padded_crop == 4 and rand_augment is not None and erasing == 0.25
    assert all(s[-1] for s in seen)  # the batches really were augmented
    assert model.config.use_fc_norm and model.simmim.layernorm is None and model.simmim.pooler is not None
    saved = json.loads((tmp_path / "ft" / "best" / "preprocessor_config.json").read_text())
    assert saved["resample"] == 3 and saved["crop_pct"] == 1.0  # bicubic; no eval resize at 32 px


def test_eval_every_epochs_evaluates_and_checkpoints_together(run_finetune, tmp_path):
    results, _ = run_finetune.run(["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path / "e"),
                                   *TINY[:1], "3", *TINY[2:], "--eval_every_epochs", "2"])
    assert [r["epoch"] for r in results["history"]] == [1, 2]  # every 2nd epoch and the last
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "e" / "checkpoints").glob("checkpoint-*"))
    assert steps == [6, 9]


def test_a_truncated_jpeg_is_replaced_and_counted_not_a_crash(run_finetune, tmp_path):
    """Same policy as pretraining: an unreadable image costs one sample (replaced within its batch, with its
    label) and is counted, instead of an OSError from inside `datasets`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                shade = 40 if label == "a" else 200
                pixels = np.clip(rng.normal(shade, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    good = (tmp_path / "train" / "a" / "0.jpg").read_bytes()
    (tmp_path / "train" / "a" / "0.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "val" / "b" / "0.jpg").write_bytes(good[: len(good) // 3])
    # A 16-bit greyscale PNG is readable: the uint8 training batch holds it rounded to 8 bits.
    Image.fromarray(rng.integers(40000, 60000, (40, 40)).astype(np.uint16)).save(tmp_path / "train" / "b" / "deep.png")
    results, _ = run_finetune.run(["--preset", "vit-nano-p4-32", "--train_dir", str(tmp_path / "train"),
                                   "--validation_dir", str(tmp_path / "val"), "--output_dir", str(tmp_path / "out"),
                                   "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--seed", "0",
                                   "--learning_rate", "1e-3", "--warmup_epochs", "1"])
    assert results["unreadable_train_images"] == 2  # the one bad file, seen once per epoch
    assert [r["unreadable_images"] for r in results["history"]] == [1, 1]
    assert results["train_samples"] == 13 and results["eval_samples"] == 6
    flat = tmp_path / "flat"  # images without class sub-folders: said so, not "no column 'label'"
    flat.mkdir()
    Image.fromarray(pixels).save(flat / "0.jpg")
    with pytest.raises(ValueError, match="has no class sub-folders"):
        run_finetune.run(["--preset", "vit-nano-p4-32", "--train_dir", str(flat), "--output_dir", str(tmp_path / "o2")])


def test_a_failed_save_leaves_the_previous_last_and_best_whole(run_finetune, tmp_path, monkeypatch):
    """A full disk while epoch 1's last/ is written: epoch 0's last/ (and best/) stay complete and loadable."""
    from transformers import AutoModelForImageClassification

    from simmim_hf import run_finetune as job

    real_save, calls = job.save_model, []

    def disk_full_on_the_third_save(accelerator, model, folder, processor=None):
        calls.append(Path(folder).name)
        real_save(accelerator, model, folder, processor)
        if len(calls) == 3:  # epoch 0: last, best; epoch 1: last
            (Path(folder) / "model.safetensors").write_bytes(b"torn")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(job, "save_model", disk_full_on_the_third_save)
    with pytest.raises(OSError, match="No space left"):
        run_finetune.run(["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path / "o"), *TINY])
    for name in ("last", "best"):
        folder = tmp_path / "o" / name
        assert json.loads((folder / "eval_results.json").read_text())["epoch"] == 0
        assert AutoModelForImageClassification.from_pretrained(folder).config.num_labels == 10


def test_collator_replaces_unreadable_rows_with_their_labels():
    from simmim_hf import SimMIMImageProcessor
    from simmim_hf.data import SimMIMCollator

    processor = SimMIMImageProcessor.from_config(SimMIMConfig.from_preset("vit-nano-p4-32"))
    from PIL import Image

    rows = [{"image": Image.new("RGB", (32, 32), (255, 0, 0)), "label": 0, "index": 0},
            {"image": {"bytes": b"not an image", "path": None}, "label": 1, "index": 1},
            {"image": Image.new("RGB", (32, 32), (0, 0, 255)), "label": 2, "index": 2}]
    batch = SimMIMCollator(processor, seed=0, keep_columns=("label",), do_train=False)(rows)
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and int(batch["unreadable"].sum()) == 1
    assert batch["labels"].tolist() == [0, 2, 2]  # the replacement carries its own label
    torch.testing.assert_close(batch["pixel_values"][1], batch["pixel_values"][2])
    with pytest.raises(RuntimeError, match="unreadable"):
        SimMIMCollator(processor)([rows[1]])
    # Training: the replacement is a fresh view of the image it borrows (its own position's crop, flip and mask),
    # not a copy of that image's sample; an image the processor rejects (float data outside [0, 1]) counts as
    # unreadable instead of failing the batch.
    rng = np.random.default_rng(0)
    rows = [{"image": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "label": i, "index": i}
            for i in range(3)]
    rows.append({"image": {"bytes": b"not an image", "path": None}, "label": 3, "index": 3})
    rows.append({"image": np.full((40, 40, 3), 300.0, dtype=np.float32), "label": 4, "index": 4})
    collator = SimMIMCollator(processor, seed=0, keep_columns=("label",), do_train=True, return_mask=True)
    batch = collator(rows)
    assert batch["labels"].tolist() == [0, 1, 2, 0, 1]
    assert batch["unreadable"].tolist() == [False, False, False, True, True]
    assert not torch.equal(batch["pixel_values"][3], batch["pixel_values"][0])
    assert not torch.equal(batch["bool_masked_pos"][3], batch["bool_masked_pos"][0])


def test_model_card_states_the_augmentation_and_the_features(run_finetune, tmp_path):
    run_finetune.run(["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path / "o"), *TINY])
    card = (tmp_path / "o" / "best" / "README.md").read_text()
    assert "RandAugment rand-m9-mstd0.5-inc1" in card and "4-px padded" in card and "pixel" in card
    assert "fc_norm" in card
    # Its snippet loads this folder (`best/` holds the model; the run's folder has no config.json).
    assert 'from_pretrained("path/to/this/folder"' in card
    run_finetune.run(["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path / "p"), *TINY, "--num_train_epochs",
                      "1", "--linear_probe", "--probe_layer", "1"])
    probe_card = next((tmp_path / "p").rglob("README.md")).read_text()
    assert "mean of hidden state 1's patch tokens, then a LayerNorm without affine weights" in probe_card
    # The probe's folder holds its head: with the class names and the processor, and no claim to be a
    # transformers model; pushing it is refused unless its encoder is on the Hub.
    probe_config = json.loads((tmp_path / "p" / "best" / "linear_probe_config.json").read_text())
    assert len(probe_config["id2label"]) == 10 and (tmp_path / "p" / "best" / "preprocessor_config.json").is_file()
    assert "library_name" not in probe_card.split("---")[1] and "pipeline_tag" not in probe_card.split("---")[1]
    with pytest.raises(SystemExit):
        run_finetune.parse_args(["--preset", "vit-nano-p4-32", "--output_dir", str(tmp_path / "q"), "--linear_probe",
                                 "--push_to_hub"])


def test_resume_refuses_another_data_split_or_recipe(run_finetune, tmp_path):
    """Another --data_seed draws another held-out split: most of its images were trained on, and the best model
    would be picked on them. Another mixup or augmentation changes the objective mid-run."""
    out = tmp_path / "out"
    args = ["--preset", "vit-nano-p4-32", "--output_dir", str(out), *TINY, "--num_train_epochs", "1"]
    run_finetune.run(args)
    resume = ["--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match="data_seed: 0 in the checkpoint, 7 now"):
        run_finetune.run([*args, "--data_seed", "7", *resume])
    with pytest.raises(ValueError, match=r"targets.mixup: 0.8 in the checkpoint, 0.2 now"):
        run_finetune.run([*args, "--mixup", "0.2", *resume])


def test_resuming_an_older_checkpoint_sets_aside_the_later_best_and_last(run_finetune, tmp_path):
    """best/ and last/ written after the checkpoint resumed from belong to the abandoned branch: kept aside, never
    left to describe (and be pushed as) the new branch's result."""
    out = tmp_path / "out"
    args = ["--preset", "vit-nano-p4-32", "--output_dir", str(out), *TINY, "--checkpoints_total_limit", "5"]
    first, _ = run_finetune.run(args)
    later_last = json.loads((out / "last" / "eval_results.json").read_text())
    assert later_last["epoch"] == 1
    later_best = json.loads((out / "best" / "eval_results.json").read_text())
    run_finetune.run([*args, "--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-3")])  # epoch 0's
    assert json.loads((out / "superseded-last" / "eval_results.json").read_text()) == later_last
    # best/ is set aside only if it came from epoch 1, i.e. after the checkpoint.
    assert (out / "superseded-best").is_dir() == (first["best"]["epoch"] == 1)
    if first["best"]["epoch"] == 1:
        assert json.loads((out / "superseded-best" / "eval_results.json").read_text()) == later_best
    # The resumed branch re-ran epoch 1; its best/ and last/ are its own, consistent with all_results.json.
    final = json.loads((out / "all_results.json").read_text())
    assert json.loads((out / "best" / "eval_results.json").read_text()) == final["best"]
    assert json.loads((out / "last" / "eval_results.json").read_text()) == final["last"]


def test_a_resume_keeps_its_own_best_even_with_a_nan_eval_loss(tmp_path):
    """The checkpoint's best result and best/eval_results.json are the same evaluation when their epoch and
    accuracy agree: a NaN loss (a diverged evaluation) never equals itself and must not move best/ aside."""
    from types import SimpleNamespace

    from simmim_hf.engine import TrainState
    from simmim_hf.run_finetune import set_aside_later_results

    result = {"epoch": 1, "accuracy": 0.5, "loss": float("nan")}
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "eval_results.json").write_text(json.dumps(result))
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    set_aside_later_results(accelerator, tmp_path, TrainState(extra={"best": {**result, "loss": None},
                                                                     "history": [result]}))
    assert (tmp_path / "best").is_dir() and not (tmp_path / "superseded-best").exists()
    set_aside_later_results(accelerator, tmp_path, TrainState(extra={"best": {**result, "epoch": 0}, "history": []}))
    assert (tmp_path / "superseded-best").is_dir() and not (tmp_path / "best").exists()
