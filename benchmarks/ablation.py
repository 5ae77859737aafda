#!/usr/bin/env python
"""The paper's component study, small: one short pretraining per option, then frozen-feature and fine-tuning
accuracy, printed as the paper's ablation tables (SimMIM, Xie et al. 2022, tables 1-4 and the prediction-area
comparison).

Each arm changes one component of the baseline (the tiny `vit-nano-p4-32` preset with the paper's defaults:
linear head, L1 on raw normalised pixels, full-resolution target, loss on the masked pixels, random masking of
8-px units at ratio 0.6) through `examples/run_pretraining.py --config_overrides ...`:

    head                    mlp (2-layer head)
    loss / target           smooth_l1, l2, color_ce with 8 bins (256 bins: `--arms loss:color_ce-256`, opt-in:
                            its 786k-parameter head makes a step ~14x slower than the baseline's)
    target resolution       16 x 16 and 8 x 8 (area-averaged), from 32 x 32
    prediction area         all pixels
    target normalisation    local, 7 x 7 windows (the official SwinV2 recipe, scaled to 32 px)
    masking                 unit 4 / 16 px at ratio 0.6, ratio 0.3 / 0.8 at 8 px (AvgDist shows the change)

Protocol: that of `benchmarks/finetune_quality.py`, whose functions are reused. The 20 embedded photographs,
each one class; pretraining sees crops of the left 75 % of each photo only (written to an image folder for
`--train_dir`), evaluation uses crops of the unseen right 25 %. After pretraining, the frozen encoder's features
(mean of the final-normalised patch tokens) are scored by a linear probe and k-NN on `--labels_per_class` labelled
crops per photo, and the encoder is fine-tuned with `examples/run_finetune.py` and its defaults (the official
recipe); the accuracy at the last epoch is reported. Pretraining is shorter than finetune_quality's (1000 steps of
64 instead of 3000) so that 13 arms fit the time budget. A random-init row gives the floor. Both scripts are driven
through their command lines only.

Columns: AvgDist (mean distance of masked pixels to the nearest visible one, px, expected value of the arm's mask
recipe), pretraining loss (mean over the last 10 % of steps; comparable only within a group that keeps the loss
and target), linear probe / k-NN / fine-tune top-1 (%), pretraining time relative to the baseline (from the
training throughput the script logs, so process start-up is not counted). One pretraining and `--seeds`
fine-tuning seeds per arm: on this data the seed-to-seed spread of fine-tuning is about 4-7 points and of the
probe 2-5 (see `benchmarks/results/finetune_quality`), so smaller differences are noise.

Usage (2 CPU cores):
    python benchmarks/ablation.py                 # 13 arms + random init, about 32 minutes on 2 idle cores
    python benchmarks/ablation.py --quick         # smoke run: one arm per group, a few steps, a few minutes
    python benchmarks/ablation.py --arms head:mlp loss:color_ce-256   # some arms (the baseline always runs)

Writes `results.json` and `results.md` (`results_quick.*` with `--quick`) to `--results_dir`
(default `benchmarks/results/ablation/`); the runs themselves go to `--work_dir` (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# `python benchmarks/ablation.py` puts this folder on sys.path: the quality benchmark's protocol is imported.
from finetune_quality import (
    PRESET,
    finetune_arguments,
    frozen_feature_scores,
    labelled_crops,
    load_photos,
    random_crops,
    write_image_folder,
)
from simmim_hf import SimMIMConfig, SimMIMModel
from simmim_hf.masking import expected_average_masked_distance

ROOT = Path(__file__).resolve().parents[1]
# Two column bands per photo (this study selects nothing, so it has no validation band): the left 75 % trains,
# the right 25 % tests.
REGIONS = {"train": (0.0, 0.75), "test": (0.75, 1.0)}

# name -> (group, option, config overrides). The baseline is the paper's setting of every component.
ARMS = {
    "baseline": ("baseline", "linear head, l1, 32x32, masked", {}),
    "head:mlp": ("head", "mlp", {"head_type": "mlp"}),
    "loss:smooth_l1": ("loss", "smooth_l1", {"loss_type": "smooth_l1"}),
    "loss:l2": ("loss", "l2", {"loss_type": "l2"}),
    "loss:color_ce-8": ("loss", "color_ce, 8 bins", {"loss_type": "color_ce", "num_color_bins": 8}),
    "loss:color_ce-256": ("loss", "color_ce, 256 bins", {"loss_type": "color_ce"}),
    "resolution:16": ("target resolution", "16x16", {"prediction_resolution": 16}),
    "resolution:8": ("target resolution", "8x8", {"prediction_resolution": 8}),
    "area:all": ("prediction area", "all pixels", {"loss_area": "all"}),
    "norm:7": ("target normalisation", "local, 7x7", {"norm_target_patch_size": 7}),
    "mask:4-0.6": ("masking", "unit 4 px, ratio 0.6", {"mask_patch_size": 4}),
    "mask:16-0.6": ("masking", "unit 16 px, ratio 0.6", {"mask_patch_size": 16}),
    "mask:8-0.3": ("masking", "unit 8 px, ratio 0.3", {"mask_ratio": 0.3}),
    "mask:8-0.8": ("masking", "unit 8 px, ratio 0.8", {"mask_ratio": 0.8}),
}
DEFAULT_ARMS = [name for name in ARMS if name != "loss:color_ce-256"]
QUICK_ARMS = ["baseline", "head:mlp", "loss:color_ce-8", "resolution:16", "area:all", "norm:7", "mask:16-0.6"]
# Options naming folders of this machine: kept out of the recorded command and settings.
PRIVATE_OPTIONS = ("work_dir", "results_dir")
PRETRAIN_CROP_SIZE = 48  # crops are stored a little larger than the model; the processor's random crop resizes


# ============================================================================================== running the scripts
def run_script(script: str, args: list[str], log: Path) -> float:
    """Run an example script as a user would, output to `log`; returns the wall time. Raises with the log's tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(log.parent / "datasets_cache")}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], stdout=handle,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{script} failed (exit {result.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - start


def public_argv(argv: list[str]) -> list[str]:
    """The command line without the options that name local folders (`--work_dir X`, `--results_dir=X`)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item.lstrip("-").split("=")[0] in PRIVATE_OPTIONS:
            skip = "=" not in item
        else:
            out.append(item)
    return out


def overrides_text(overrides: dict) -> str:
    return ",".join(f"{key}={json.dumps(value)}" for key, value in overrides.items())


def pretrain(overrides: dict, data_dir: Path, out: Path, args) -> dict:
    steps = args.pretrain_steps
    command = ["--preset", PRESET, "--train_dir", str(data_dir), "--output_dir", str(out), "--overwrite_output_dir",
               "--max_train_steps", str(steps), "--per_device_train_batch_size", str(args.pretrain_batch_size),
               # finetune_quality's pretraining: absolute peak lr, warmup 5 %, cosine down to 1 % of the peak.
               "--learning_rate", str(args.pretrain_lr), "--warmup_steps", str(max(1, steps // 20)),
               "--min_lr", "1e-6", "--seed", str(args.pretrain_seed), "--logging_steps", str(max(1, steps // 10)),
               "--report_to", "none", "--checkpoints_total_limit", "1"]
    if overrides:
        command += ["--config_overrides", overrides_text(overrides)]
    log = out.parent / f"{out.name}.pretrain.log"
    wall = run_script("run_pretraining.py", command, log)
    results = json.loads((out / "all_results.json").read_text())
    # Training throughput from the script's log lines ("... images/s 123.4"); the first interval includes warm-up.
    rates = [float(m) for m in re.findall(r"images/s ([0-9.]+)", log.read_text())]
    rate = statistics.mean(rates[1:] if len(rates) > 1 else rates) if rates else None
    return {"loss": results["train_loss"], "images_per_sec": rate, "wall_seconds": round(wall, 1)}


def finetune(model_dir: Path, train_dir: Path, test_dir: Path, out: Path, seed: int, args) -> float:
    command = finetune_arguments(model_dir, train_dir, test_dir, out, args, seed)  # finetune_quality's protocol
    run_script("run_finetune.py", command, out.parent / f"{out.name}.finetune.log")
    return json.loads((out / "all_results.json").read_text())["last"]["accuracy"]


# ============================================================================================== the study
def write_pretraining_crops(photos, folder: Path, per_photo: int, seed: int) -> None:
    """Unlabelled crops of the train regions (never the test regions), finetune_quality's crop recipe."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index, photo in enumerate(photos):
        for n, crop in enumerate(random_crops(photo["train"], photo["shorter"], per_photo, PRETRAIN_CROP_SIZE, rng)):
            crop.save(folder / f"{index:02d}_{n:04d}.png")


def evaluate_seeds(folder, config, train_sets, test, work, name, args) -> dict:
    """Probe and k-NN on the first seed's labelled crops; fine-tuning once per seed on that seed's crops."""
    first = args.seeds[0]
    model = SimMIMModel.from_pretrained(folder).eval()
    scores = frozen_feature_scores(model, config, train_sets[first], test)
    finetuned = [finetune(folder, work / "data" / f"train-seed{seed}", work / "data" / "test",
                          work / "ft" / f"{name}-seed{seed}", seed, args) for seed in args.seeds]
    return {"linear_probe": scores["linear_probe"], "knn": scores["knn"], "finetune": finetuned}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=None, choices=list(ARMS),
                   help="Arms to run (default: all but loss:color_ce-256; with --quick one per group). The "
                        "baseline always runs.")
    p.add_argument("--quick", action="store_true", help="Smoke run: one arm per group, few steps and epochs.")
    p.add_argument("--work_dir", default=None, help="Where the runs go (default: a temporary folder, removed).")
    p.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "ablation"))
    p.add_argument("--pretrain_steps", type=int, default=1000)
    p.add_argument("--pretrain_batch_size", type=int, default=64)
    p.add_argument("--pretrain_lr", type=float, default=1e-3)
    p.add_argument("--pretrain_seed", type=int, default=0)
    p.add_argument("--pretrain_crops_per_photo", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="Fine-tuning / labelled-subset seeds.")
    p.add_argument("--labels_per_class", type=int, default=10)
    p.add_argument("--test_per_class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=50, help="Fine-tuning epochs.")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3, help="Fine-tuning peak lr, every arm.")
    p.add_argument("--avgdist_samples", type=int, default=256)
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.pretrain_batch_size, args.pretrain_crops_per_photo = 30, 32, 20
        args.epochs, args.labels_per_class, args.test_per_class, args.seeds = 2, 5, 20, [0]
        args.avgdist_samples = 64
    names = args.arms or (QUICK_ARMS if args.quick else DEFAULT_ARMS)
    names = ["baseline"] + [n for n in names if n != "baseline"]
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="simmim_ablation_"))
    work.mkdir(parents=True, exist_ok=True)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = "results_quick" if args.quick else "results"
    command = "python benchmarks/ablation.py " + " ".join(public_argv(argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()

    photos = load_photos(REGIONS)
    size = SimMIMConfig.from_preset(PRESET).image_size
    write_pretraining_crops(photos, work / "data" / "pretrain", args.pretrain_crops_per_photo, seed=args.pretrain_seed)
    test = labelled_crops(photos, "test", args.test_per_class, size, seed=10_000)
    write_image_folder(work / "data" / "test", *test)
    # One labelled subset per seed; the probe uses the first seed's (the probe is deterministic given the data).
    train_sets = {seed: labelled_crops(photos, "train", args.labels_per_class, size, seed=seed) for seed in args.seeds}
    for seed, train in train_sets.items():
        write_image_folder(work / "data" / f"train-seed{seed}", *train)

    settings = {k: v for k, v in vars(args).items() if k not in PRIVATE_OPTIONS}
    results = {"command": command, "settings": settings, "rows": []}

    # The floor: the classifier's own random init, through the same loading path.
    torch.manual_seed(args.pretrain_seed)
    scratch_dir = work / "scratch"
    SimMIMModel(SimMIMConfig.from_preset(PRESET)).save_pretrained(scratch_dir)
    row = {"group": "random init", "option": "no pretraining", "overrides": {}}
    row.update(evaluate_seeds(scratch_dir, SimMIMConfig.from_preset(PRESET), train_sets, test, work, "scratch", args))
    results["rows"].append(row)
    print(format_row(row), flush=True)

    for name in names:
        group, label, overrides = ARMS[name]
        config = SimMIMConfig.from_preset(PRESET, **overrides)
        out = work / "pretrain" / name.replace(":", "_")
        out.parent.mkdir(parents=True, exist_ok=True)
        row = {"group": group, "option": label, "overrides": overrides,
               "avgdist": expected_average_masked_distance(config, num_samples=args.avgdist_samples, seed=0)}
        row.update(pretrain(overrides, work / "data" / "pretrain", out, args))
        row.update(evaluate_seeds(out, config, train_sets, test, work, out.name, args))
        results["rows"].append(row)
        print(format_row(row), flush=True)
        (results_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))

    baseline = next(r for r in results["rows"] if r["group"] == "baseline")
    for row in results["rows"]:
        if row.get("images_per_sec") and baseline.get("images_per_sec"):
            row["relative_time"] = baseline["images_per_sec"] / row["images_per_sec"]
        elif row.get("wall_seconds"):
            row["relative_time"] = row["wall_seconds"] / baseline["wall_seconds"]
    results["total_minutes"] = round((time.perf_counter() - started) / 60, 1)
    (results_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results)
    (results_dir / f"{stem}.md").write_text(table)
    print(table)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ============================================================================================== output
def format_row(row: dict) -> str:
    ft = statistics.mean(row["finetune"])
    extra = f", pretrain loss {row['loss']:.4f} in {row['wall_seconds']} s" if "loss" in row else ""
    return (f"[{row['group']}: {row['option']}] probe {100 * row['linear_probe']:.1f}, k-NN {100 * row['knn']:.1f}, "
            f"fine-tune {100 * ft:.1f}{extra}")


def markdown_table(results: dict) -> str:
    settings = results["settings"]
    lines = [f"Command: `{results['command']}` ({results.get('total_minutes', '?')} min). Preset `{PRESET}`, "
             f"{settings['pretrain_steps']} pretraining steps x {settings['pretrain_batch_size']}, "
             f"{settings['labels_per_class']} labels per class, {settings['test_per_class']} test crops per class, "
             f"{settings['epochs']} fine-tuning epochs, seeds {settings['seeds']}.", "",
             "| group | option | AvgDist (px) | pretrain loss | linear probe | k-NN | fine-tune | rel. pretrain time |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        ft = row["finetune"]
        ft_cell = f"{100 * statistics.mean(ft):.1f}" + (f" ± {100 * statistics.stdev(ft):.1f}" if len(ft) > 1 else "")
        lines.append(
            f"| {row['group']} | {row['option']} | "
            + (f"{row['avgdist']:.1f}" if "avgdist" in row else "–") + " | "
            + (f"{row['loss']:.4f}" if "loss" in row else "–") + " | "
            + f"{100 * row['linear_probe']:.1f} | {100 * row['knn']:.1f} | {ft_cell} | "
            + (f"{row['relative_time']:.2f}" if "relative_time" in row else "–") + " |")
    lines += ["", "Pretraining losses compare only within a group that keeps the loss and the target (masking, head); "
              "accuracies are top-1 in % on crops of unseen photo regions."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
