#!/usr/bin/env python
"""Does SimMIM pretraining pay off downstream? Pretrained vs random init on real photographs, few labels, with the
fine-tuning recipe tuned per arm on a validation split and several pretraining seeds.

Protocol (the same for every arm; the only per-arm choice is the fine-tuning recipe, picked on validation crops):

* Data: the 20 photographs embedded in the scikit-image / scikit-learn wheels (`simmim_hf.sample_data`). Each
  photo is one class, cut by columns into three bands: the left half is the *train band* (pretraining crops and
  the labelled crops come from it), the next quarter the *validation band* (recipe selection only) and the right
  quarter the *test band* (reported accuracy only). Pretraining never sees a validation or test pixel. A sample
  is a square crop whose side is 15-25 % of the photo's shorter side (so it fits a quarter band), resized to the
  model size (32 px): the task is "which photo is this patch from", read from texture, structure and colour of an
  unseen part of the photo.
* Pretraining (unlabelled): fresh random crops from the train bands every step (the processor's SimMIM
  augmentation and masks on top), AdamW, warmup + cosine, identical loop and settings for our model and for
  transformers' `ViTForMaskedImageModeling` (the reference arm, converted with `simmim_hf.convert` and then
  fine-tuned by the same script). Once per `--pretrain_seeds` entry; the random-init arms use the same seeds
  for their init, so every spread below includes the pretraining/init seed.
* Fine-tuning: `examples/run_finetune.py`, the same budget for every arm (`--epochs`, batch, one evaluation after
  the last epoch) on `--labels_per_class` labelled train-band crops per photo, drawn per seed.
  - Recipe selection: every arm runs every recipe of the grid (`--grid`: the official recipe's augmentation or
    none of it, x peak lr, x the official layer decay or none) on `--tuning_seeds` labelled subsets, scored on
    the validation crops; each arm keeps the recipe with the best mean validation accuracy.
  - Test: every arm runs its selected recipe and the official recipe (the package defaults) on each of
    `--seeds` labelled subsets (seed s uses pretraining seed `pretrain_seeds[s % n]`), scored on the test
    crops at the *last* epoch.
* Frozen features of each encoder before any fine-tuning (the mean of its final-normalised patch tokens, the
  same definition for every arm): weighted k-NN (k=20) and a linear probe (`simmim_hf.evaluation`), trained on
  the same labelled crops, tested on the same test crops.
* Gains are paired per seed (same labelled subset and seed): each pretrained arm against its own architecture's
  random init, and against the best random-init arm (the one with the highest mean tuned test accuracy).

Runs go to a pool of `--workers` processes of one thread each (on tiny models one thread per process is ~1.5x
more work per core than two threads in one). Every finished run is stored under `--output_dir` and reused when
the same command is run again, so an interrupted benchmark resumes where it stopped.

Usage (2 CPU cores: about 25 minutes of pretraining, then about 1,200 fine-tuning runs' worth... see README):
    python benchmarks/finetune_quality.py --output_dir bench_out
    python benchmarks/finetune_quality.py --output_dir bench_out --quick   # smoke run, a few minutes

Writes `results.json`, `results.md` (the tables), `<arm>/seed<k>/pretrain_loss.png` and `reconstruction.png`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMModel  # noqa: E402
from simmim_hf.evaluation import knn_evaluate, linear_probe_evaluate, pool_tokens  # noqa: E402
from simmim_hf.image_processing_simmim import SimMIMImageProcessor  # noqa: E402
from simmim_hf.optimization import LayerDecayLRScheduler, build_optimizer  # noqa: E402
from simmim_hf.sample_data import SAMPLE_IMAGES, sample_image_files  # noqa: E402
from simmim_hf.visualization import save_reconstruction_grid  # noqa: E402

# Column bands of each photo, as fractions of its width.
BANDS = {"train": (0.0, 0.5), "validation": (0.5, 0.75), "test": (0.75, 1.0)}
CROP_SIDE = (0.15, 0.25)  # of the photo's shorter side, so a crop always fits a quarter band
PRESET = "vit-nano-p4-32"
# transformers' plain ViT (absolute positions, q/k/v biases, no LayerScale) in the same size.
PLAIN = dict(use_absolute_position_embeddings=True, use_shared_relative_position_bias=False, use_key_bias=True,
             layer_scale_init_value=0.0, layer_norm_eps=1e-12, init_recipe="transformers")
# arm -> (pretraining source, config overrides, random-init reference). Each pretrained arm is compared with the
# random init of its own architecture; transformers' plain ViT is the plain arm's architecture.
ARMS = {
    "paper": ("simmim_hf", {}, "scratch-paper"),
    "plain": ("simmim_hf", PLAIN, "scratch-plain"),
    "transformers": ("transformers", PLAIN, "scratch-plain"),
}
# The fine-tuning recipes of the selection grid: the official augmentation (RandAugment, random erasing, mixup,
# cutmix: the package defaults) or none of it; the official layer decay (the default) or none.
AUGMENTATION = {"official-aug": [], "no-aug": ["--rand_augment", "none", "--random_erasing", "0", "--mixup", "0",
                                                "--cutmix", "0"]}
LAYER_DECAY = {"official-ld": [], "no-ld": ["--layer_decay", "1.0"]}
OFFICIAL = "official-aug/official-ld/lr1e-3"  # the package's defaults at the protocol's lr


# ============================================================================================== data
def load_photos(bands: dict = BANDS) -> list[dict]:
    """Per photo, in `SAMPLE_IMAGES` order: {band name: uint8 RGB array of that column band, "shorter": the
    whole photo's shorter side}."""
    files = sample_image_files()
    if len(files) != len(SAMPLE_IMAGES):
        raise RuntimeError(f"Found {len(files)} of the {len(SAMPLE_IMAGES)} embedded photos; install scikit-image and "
                           "scikit-learn (pip install simmim_hf[examples]).")
    photos = []
    for path in files:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        width = pixels.shape[1]
        photo = {name: pixels[:, int(width * low):int(width * high)] for name, (low, high) in bands.items()}
        photo["shorter"] = min(pixels.shape[:2])
        photos.append(photo)
    return photos


def random_crops(region: np.ndarray, shorter_side: int, count: int, size: int, rng: np.random.Generator) -> list:
    """`count` random square crops of `region`, side CROP_SIDE x the photo's shorter side, resized to `size`."""
    height, width = region.shape[:2]
    crops = []
    for _ in range(count):
        side = int(min(rng.uniform(*CROP_SIDE) * shorter_side, height, width))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        patch = Image.fromarray(region[top:top + side, left:left + side])
        crops.append(patch.resize((size, size), Image.Resampling.BICUBIC))
    return crops


def labelled_crops(photos, band: str, per_class: int, size: int, seed: int) -> tuple[list, list]:
    """`per_class` crops of `band` of every photo, labelled by photo."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, photo in enumerate(photos):
        images += random_crops(photo[band], photo["shorter"], per_class, size, rng)
        labels += [label] * per_class
    return images, labels


def write_image_folder(folder: Path, images, labels) -> None:
    for index, (image, label) in enumerate(zip(images, labels)):
        target = folder / f"{label:02d}_{SAMPLE_IMAGES[label][1].split('/')[-1].split('.')[0]}"
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{index:05d}.png")


# ============================================================================================== pretraining
def build_mim_model(source: str, overrides: dict, seed: int):
    torch.manual_seed(seed)
    config = SimMIMConfig.from_preset(PRESET, **overrides)
    if source == "simmim_hf":
        return SimMIMForMaskedImageModeling(config), config
    from transformers import ViTConfig, ViTForMaskedImageModeling

    hf_config = ViTConfig(image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
                          num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                          intermediate_size=config.intermediate_size, encoder_stride=config.patch_size, qkv_bias=True)
    return ViTForMaskedImageModeling(hf_config), config


def pretrain(arm: str, seed: int, settings: dict, photos, out: Path) -> dict:
    """Pretrain one arm on fresh train-band crops; saves `out/pretrained`, the loss curve and a reconstruction
    grid of test-band crops; returns the run's summary."""
    source, overrides, _ = ARMS[arm]
    steps, batch_size, lr = settings["pretrain_steps"], settings["pretrain_batch_size"], settings["pretrain_lr"]
    model, config = build_mim_model(source, overrides, seed)
    model.train()
    processor = SimMIMImageProcessor.from_config(config)
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.05)
    scheduler = LayerDecayLRScheduler(optimizer, steps, num_warmup_steps=steps // 20, min_lr=lr * 0.01)
    rng = np.random.default_rng(seed)
    losses, start = [], time.time()
    for step in range(steps):
        chosen = rng.integers(len(photos), size=batch_size)
        images = [random_crops(photos[p]["train"], photos[p]["shorter"], 1, config.image_size, rng)[0]
                  for p in chosen]
        batch = processor(images, return_tensors="pt", do_train=True, return_mask=True,
                          seed=int(rng.integers(2**31 - 1)))
        loss = model(pixel_values=batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.detach())
        if (step + 1) % 500 == 0:
            print(f"[{arm} seed {seed}] pretrain step {step + 1}/{steps} "
                  f"loss {torch.stack(losses[-500:]).mean():.4f} ({time.time() - start:.0f} s)", flush=True)
    curve = torch.stack(losses).tolist()
    model.eval()
    if source == "transformers":
        from simmim_hf.convert import convert_transformers_checkpoint

        model = convert_transformers_checkpoint(model).eval()
    model.save_pretrained(out / "pretrained")
    draw_curve(curve, out / "pretrain_loss.png", title=f"{arm} (seed {seed}): SimMIM pretraining loss")
    test_images, _ = labelled_crops(photos, "test", 1, config.image_size, seed=12345)
    batch = processor(test_images[:8], return_tensors="pt", do_train=False, return_mask=True, seed=0)
    with torch.no_grad():
        reconstruction = model(**batch).reconstruction
    save_reconstruction_grid(out / "reconstruction.png", batch["pixel_values"], reconstruction,
                             batch["bool_masked_pos"], config.patch_size)
    window = max(1, len(curve) // 20)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "loss_first": statistics.mean(curve[:window]), "loss_last": statistics.mean(curve[-window:]),
            "seconds": round(time.time() - start, 1), "loss_curve_every_10": curve[::10]}


def draw_curve(values, path: Path, title: str, size=(480, 300), margin=40) -> None:
    """A plain line plot with PIL (no matplotlib dependency): the per-step loss, smoothed over 1 % of the run."""
    window = max(1, len(values) // 100)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    low, high = float(smooth.min()), float(smooth.max())
    span_x, span_y = size[0] - 2 * margin, size[1] - 2 * margin
    points = [(margin + span_x * i / max(1, len(smooth) - 1),
               size[1] - margin - span_y * (v - low) / max(high - low, 1e-9)) for i, v in enumerate(smooth)]
    draw.rectangle([margin, margin, size[0] - margin, size[1] - margin], outline="black")
    draw.line(points, fill=(31, 119, 180), width=2)
    draw.text((margin, 10), title, fill="black")
    draw.text((2, margin - 5), f"{high:.3f}", fill="black")
    draw.text((2, size[1] - margin - 5), f"{low:.3f}", fill="black")
    draw.text((size[0] - margin - 60, size[1] - margin + 8), f"{len(values)} steps", fill="black")
    image.save(path)



# ============================================================================================== evaluation
def frozen_feature_scores(model, config, train, test) -> dict:
    """k-NN and linear-probe accuracy of the frozen encoder's features, defined the same way for every arm
    (whatever pooling its config names): the mean of the final-normalised patch tokens."""
    processor = SimMIMImageProcessor.from_config(config)
    encoder = getattr(model, "simmim", model).eval()

    @torch.no_grad()
    def features(images, labels):
        pooled = []
        for start in range(0, len(images), 256):
            pixel_values = processor(images[start:start + 256], return_tensors="pt", do_train=False,
                                     crop_pct=1.0)["pixel_values"]
            tokens = encoder(pixel_values).last_hidden_state
            pooled.append(pool_tokens(tokens, has_cls_token=config.encoder_type == "vit"))
        return torch.cat(pooled), torch.tensor(labels)

    train_x, train_y = features(*train)
    test_x, test_y = features(*test)
    knn = knn_evaluate(train_x, train_y, test_x, test_y, k=20)
    probe = linear_probe_evaluate(train_x, train_y, test_x, test_y)
    return {"knn": knn["accuracy"], "linear_probe": probe["accuracy"]}


# ============================================================================================== runs
TEST_SEED, VALIDATION_SEED = 10_000, 20_000  # the fixed evaluation crops
SCRATCH = {"scratch-paper": ARMS["paper"][1], "scratch-plain": PLAIN}


def finetune_arguments(model_dir, train_dir, eval_dir, output_dir, args, seed: int) -> list[str]:
    """The fine-tuning job's arguments of this protocol: its defaults (the official recipe) at this data size,
    evaluated once, after the last epoch, in the calling process (no loader workers)."""
    return ["--model_name_or_path", str(model_dir), "--train_dir", str(train_dir), "--validation_dir", str(eval_dir),
            "--output_dir", str(output_dir), "--overwrite_output_dir", "--num_train_epochs", str(args.epochs),
            "--warmup_epochs", str(max(1, args.epochs // 10)), "--per_device_train_batch_size", str(args.batch_size),
            "--learning_rate", str(args.learning_rate), "--seed", str(seed), "--eval_every_epochs", str(args.epochs),
            "--logging_steps", "100000", "--checkpoints_total_limit", "1", "--report_to", "none",
            "--dataloader_num_workers", "0"]


def recipe_grid(args) -> dict[str, list[str]]:
    """Recipe name -> its run_finetune.py arguments; the official recipe first (it wins ties)."""
    grid = {}
    for lr in sorted(set(args.grid_lrs) | {args.learning_rate}, key=lambda v: (v != args.learning_rate, v)):
        for aug, aug_args in AUGMENTATION.items():
            for ld, ld_args in LAYER_DECAY.items():
                grid[f"{aug}/{ld}/lr{lr:g}"] = [*aug_args, *ld_args, "--learning_rate", f"{lr:g}"]
    return grid


def official_recipe(args) -> str:
    return f"official-aug/official-ld/lr{args.learning_rate:g}"


_PHOTOS = None


def _worker_setup(log_dir: str) -> None:
    """One thread per worker process; the runs' own output goes to a log file per worker."""
    torch.set_num_threads(1)
    log = open(Path(log_dir) / f"worker-{os.getpid()}.log", "a")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)


def run_task(task: dict) -> dict:
    """One unit of work, in a worker: a pretraining, a frozen-feature evaluation or a fine-tuning run."""
    global _PHOTOS
    if _PHOTOS is None:
        _PHOTOS = load_photos()
    started = time.time()
    if task["kind"] == "pretrain":
        result = pretrain(task["arm"], task["seed"], task["settings"], _PHOTOS, Path(task["dir"]))
    elif task["kind"] == "frozen":
        cls = SimMIMModel if task["scratch"] else SimMIMForMaskedImageModeling
        model = cls.from_pretrained(task["model"]).eval()
        size = model.config.image_size
        train = labelled_crops(_PHOTOS, "train", task["labels_per_class"], size, seed=task["subset"])
        test = labelled_crops(_PHOTOS, "test", task["test_per_class"], size, seed=TEST_SEED)
        result = frozen_feature_scores(model, model.config, train, test)
    else:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        from simmim_hf import run_finetune

        AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerate state per run in this process
        PartialState._reset_state()
        GradientState._reset_state()
        final, _ = run_finetune.run(task["argv"])
        if final["preempted"]:  # stopped by a signal: a partial run's accuracy is no result
            raise SystemExit(final["stop_status"])
        shutil.rmtree(task["output_dir"], ignore_errors=True)  # the weights are not needed, the accuracy is
        result = {"accuracy": final["last"]["accuracy"]}
    result["seconds"] = round(time.time() - started, 1)
    return result


class Runs:
    """Runs tasks in a worker pool; each result is stored as `runs/<id>.json` beside the task that made it, and a
    stored result of the same task is reused (an interrupted benchmark resumes)."""

    def __init__(self, out: Path, workers: int):
        self.folder = out / "runs"
        self.folder.mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)
        context = multiprocessing.get_context("spawn")
        self.pool = context.Pool(workers, initializer=_worker_setup, initargs=(str(out / "logs"),),
                                 maxtasksperchild=20)
        self.results: dict[str, dict] = {}

    def _stored(self, task: dict):
        path = self.folder / f"{task['id']}.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if stored["task"] == task and all(Path(p).exists() for p in task.get("needs", [])):
                return stored["result"]
        return None

    def run(self, phase: str, tasks: list[dict]) -> dict[str, dict]:
        unique = {task["id"]: task for task in tasks}
        pending = []
        for task in unique.values():
            stored = self._stored(task)
            if stored is None:
                pending.append(task)
            else:
                self.results[task["id"]] = stored
        print(f"== {phase}: {len(unique)} runs, {len(unique) - len(pending)} stored, {len(pending)} to run", flush=True)
        started = time.time()
        for done, (task, result) in enumerate(self.pool.imap_unordered(_run_pair, pending), 1):
            self.results[task["id"]] = result
            path = self.folder / f"{task['id']}.json"
            path.with_suffix(".tmp").write_text(json.dumps({"task": task, "result": result}))
            path.with_suffix(".tmp").replace(path)
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()
                     if k not in ("loss_curve_every_10",)}
            print(f"[{phase} {done}/{len(pending)}, {time.time() - started:.0f} s] {task['id']}: {shown}", flush=True)
        return self.results

    def close(self):
        self.pool.close()
        self.pool.join()


def _run_pair(task: dict) -> tuple[dict, dict]:
    return task, run_task(task)


def task_id(*parts) -> str:
    return "--".join(str(part).replace("/", "_") for part in parts)


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "values": values}


def paired(a: list[float], b: list[float]) -> dict:
    return summarize([x - y for x, y in zip(a, b)])


# ============================================================================================== the benchmark
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                   help="Pretrained arms; each brings its random-init reference.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="Test seeds (labelled subsets).")
    p.add_argument("--tuning_seeds", type=int, nargs="+", default=[100, 101],
                   help="Labelled subsets for recipe selection, scored on the validation band.")
    p.add_argument("--pretrain_seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="One pretraining (and random init) per seed; seed s uses pretrain_seeds[s % n].")
    p.add_argument("--pretrain_steps", type=int, default=3000)
    p.add_argument("--pretrain_batch_size", type=int, default=64)
    p.add_argument("--pretrain_lr", type=float, default=1e-3)
    p.add_argument("--labels_per_class", type=int, default=10)
    p.add_argument("--validation_per_class", type=int, default=50)
    p.add_argument("--test_per_class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3,
                   help="Fine-tuning peak lr of the official-recipe runs (the grid adds --grid_lrs).")
    p.add_argument("--grid_lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    p.add_argument("--finetune_args", type=str, default="", help="Extra run_finetune.py arguments, every run.")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Worker processes, one thread each.")
    p.add_argument("--quick", action="store_true", help="Smoke run: tiny budgets everywhere, a few minutes.")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.pretrain_batch_size, args.epochs = 30, 16, 2
        args.labels_per_class, args.validation_per_class, args.test_per_class = 3, 5, 10
        args.seeds, args.tuning_seeds, args.pretrain_seeds, args.grid_lrs = [0, 1], [100], [0, 1], [2e-3]
    for name in ("seeds", "tuning_seeds", "pretrain_seeds"):
        if len(set(getattr(args, name))) != len(getattr(args, name)):
            p.error(f"--{name} must be distinct; got {getattr(args, name)}")
    if set(args.seeds) & set(args.tuning_seeds):
        p.error(f"--seeds and --tuning_seeds must draw different labelled subsets; both have "
                f"{sorted(set(args.seeds) & set(args.tuning_seeds))}")
    return args


def write_data(out: Path, photos, args, size: int) -> None:
    """The image folders the fine-tuning job reads: one labelled train-band subset per seed, the validation and
    test crops. Written once (a folder appears only when complete)."""
    folders = {f"train-seed{s}": ("train", args.labels_per_class, s) for s in [*args.tuning_seeds, *args.seeds]}
    folders["validation"] = ("validation", args.validation_per_class, VALIDATION_SEED)
    folders["test"] = ("test", args.test_per_class, TEST_SEED)
    for name, (band, per_class, seed) in folders.items():
        target = out / "data" / name
        if target.exists():
            continue
        partial = target.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_image_folder(partial, *labelled_crops(photos, band, per_class, size, seed))
        partial.rename(target)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    size = SimMIMConfig.from_preset(PRESET).image_size
    write_data(out, photos, args, size)
    settings = {k: getattr(args, k) for k in ("pretrain_steps", "pretrain_batch_size", "pretrain_lr")}
    variants = list(dict.fromkeys(v for arm in args.arms for v in (arm, ARMS[arm][2])))
    pretrain_seed = {s: args.pretrain_seeds[i % len(args.pretrain_seeds)]
                     for seeds in (args.tuning_seeds, args.seeds) for i, s in enumerate(seeds)}

    def model_dir(variant: str, seed: int) -> Path:
        return out / variant / f"seed{seed}" / ("init" if variant in SCRATCH else "pretrained")

    # The random inits: the classifier's own encoder init (not the pretraining one), saved so that every arm
    # goes through the same loading path of the same script.
    for variant in (v for v in variants if v in SCRATCH):
        for seed in args.pretrain_seeds:
            if not model_dir(variant, seed).exists():
                torch.manual_seed(seed)
                SimMIMModel(SimMIMConfig.from_preset(PRESET, **SCRATCH[variant])).save_pretrained(
                    model_dir(variant, seed))

    runs = Runs(out, args.workers)
    try:
        done = runs.run("pretraining", [
            {"id": task_id("pretrain", arm, seed), "kind": "pretrain", "arm": arm, "seed": seed, "settings": settings,
             "dir": str(out / arm / f"seed{seed}"), "needs": [str(model_dir(arm, seed))]}
            for arm in args.arms for seed in args.pretrain_seeds])

        grid, official = recipe_grid(args), official_recipe(args)

        def finetune_task(variant, recipe, seed, split):
            run = task_id("ft", variant, recipe, split, seed)
            argv = [*finetune_arguments(model_dir(variant, pretrain_seed[seed]), out / "data" / f"train-seed{seed}",
                                        out / "data" / split, out / "ft" / run, args, seed),
                    *grid[recipe], *args.finetune_args.split()]
            return {"id": run, "kind": "finetune", "argv": argv, "output_dir": str(out / "ft" / run)}

        frozen = [{"id": task_id("frozen", variant, seed), "kind": "frozen", "scratch": variant in SCRATCH,
                   "model": str(model_dir(variant, pretrain_seed[seed])), "subset": seed,
                   "labels_per_class": args.labels_per_class, "test_per_class": args.test_per_class}
                  for variant in variants for seed in args.seeds]
        tuning = [finetune_task(variant, recipe, seed, "validation")
                  for variant in variants for recipe in grid for seed in args.tuning_seeds]
        done = runs.run("selection", tuning + frozen)
        validation = {variant: {recipe: [done[task_id("ft", variant, recipe, "validation", seed)]["accuracy"]
                                         for seed in args.tuning_seeds] for recipe in grid} for variant in variants}
        # The best mean validation accuracy; ties go to the earlier recipe (the official one first).
        selected = {variant: max(grid, key=lambda r: (statistics.mean(validation[variant][r]), -list(grid).index(r)))
                    for variant in variants}
        done = runs.run("test", [finetune_task(variant, recipe, seed, "test") for variant in variants
                                 for recipe in dict.fromkeys([selected[variant], official]) for seed in args.seeds])
    finally:
        runs.close()

    test = {variant: {"official": [done[task_id("ft", variant, official, "test", s)]["accuracy"] for s in args.seeds],
                      "tuned": [done[task_id("ft", variant, selected[variant], "test", s)]["accuracy"]
                                for s in args.seeds],
                      "knn": [done[task_id("frozen", variant, s)]["knn"] for s in args.seeds],
                      "linear_probe": [done[task_id("frozen", variant, s)]["linear_probe"] for s in args.seeds]}
            for variant in variants}
    best_scratch = max((v for v in variants if v in SCRATCH), key=lambda v: statistics.mean(test[v]["tuned"]))
    summary = {variant: {metric: summarize(values) for metric, values in rows.items()} for variant, rows in test.items()}
    for arm in args.arms:
        own = ARMS[arm][2]
        summary[arm]["gain"] = {metric: paired(test[arm][metric], test[own][metric]) for metric in test[arm]}
        summary[arm]["gain_over_best_scratch"] = paired(test[arm]["tuned"], test[best_scratch]["tuned"])
    results = {"command": "python benchmarks/finetune_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": vars(args), "bands": BANDS, "pretrain_seed_of": pretrain_seed,
               "pretraining": {arm: [done[task_id("pretrain", arm, s)] for s in args.pretrain_seeds]
                               for arm in args.arms},
               "validation": validation, "selected": selected, "best_scratch": best_scratch, "test": test,
               "summary": summary}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_tables(results))
    print(markdown_tables(results))
    return results


def markdown_tables(results) -> str:
    def cell(stats):
        return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"

    def gain(stats):
        return f"{100 * stats['mean']:+.1f} ± {100 * stats['std']:.1f}"

    settings, summary, selected = results["settings"], results["summary"], results["selected"]
    variants = list(results["validation"])
    recipes = list(next(iter(results["validation"].values())))
    lines = [f"Command: `{results['command']}`. Preset `{PRESET}`; test seeds {settings['seeds']} (pretraining / init "
             f"seeds {settings['pretrain_seeds']}, seed s uses pretraining seed s mod {len(settings['pretrain_seeds'])});"
             f" {settings['labels_per_class']} labels per class; {settings['test_per_class']} test and "
             f"{settings['validation_per_class']} validation crops per class; top-1 in %, mean ± std over seeds.", "",
             f"Recipe selection: mean validation top-1 over tuning seeds {settings['tuning_seeds']} (selected in bold).",
             "", "| recipe | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for recipe in recipes:
        row = []
        for variant in variants:
            value = f"{100 * statistics.mean(results['validation'][variant][recipe]):.1f}"
            row.append(f"**{value}**" if selected[variant] == recipe else value)
        lines.append(f"| {recipe} | " + " | ".join(row) + " |")
    lines += ["", "Test (fine-tune at the last epoch; k-NN and linear probe on the frozen encoder):", "",
              "| arm | tuned recipe | fine-tune, tuned | fine-tune, official recipe | k-NN | linear probe | "
              "tuned gain over own init | over best init | official-recipe gain | probe gain | k-NN gain |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        stats = summary[variant]
        gains = ([gain(stats["gain"]["tuned"]), gain(stats["gain_over_best_scratch"]), gain(stats["gain"]["official"]),
                  gain(stats["gain"]["linear_probe"]), gain(stats["gain"]["knn"])] if "gain" in stats else ["–"] * 5)
        lines.append(f"| {variant} | {selected[variant]} | {cell(stats['tuned'])} | {cell(stats['official'])} | "
                     f"{cell(stats['knn'])} | {cell(stats['linear_probe'])} | " + " | ".join(gains) + " |")
    lines.append(f"\nBest random init (by tuned test mean): {results['best_scratch']}.")
    for arm, infos in results["pretraining"].items():
        losses = ", ".join(f"{info['loss_last']:.4f}" for info in infos)
        lines.append(f"\n{arm} pretraining: {infos[0]['steps']} steps x {infos[0]['batch_size']}, final loss per seed "
                     f"{losses}; {statistics.mean(info['seconds'] for info in infos):.0f} s each")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
