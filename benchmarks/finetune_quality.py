#!/usr/bin/env python
"""Does SimMIM pretraining pay off downstream? Pretrained vs random init on real photographs, few labels.

Protocol (the same for every arm; nothing in it is tuned per arm):

* Data: the 20 photographs embedded in the scikit-image / scikit-learn wheels (`simmim_hf.sample_data`). Each
  photo is one class. Its left 75 % (columns) is the *train region*, its right 25 % the *test region*: no test
  pixel is ever seen in pretraining or fine-tuning. A sample is a square crop whose side is 15-25 % of the
  photo's shorter side, resized to the model size (32 px): the task is "which photo is this patch from", read
  from texture, structure and colour of an unseen part of the photo.
* Pretraining (unlabelled): fresh random crops from the train regions every step (the processor's SimMIM
  augmentation and masks on top), AdamW, warmup + cosine, identical loop and settings for our model and for
  transformers' `ViTForMaskedImageModeling` (the reference arm, converted with `simmim_hf.convert` and then
  fine-tuned by the same script).
* Fine-tuning: `examples/run_finetune.py` with its defaults (the official SimMIM recipe: layer decay, drop
  path, label smoothing, mixup/cutmix, RandAugment, random erasing, the padded-crop recipe below 32 px,
  `fc_norm` mean pooling), `--labels_per_class` labelled train crops per photo, drawn per seed; the same
  budget, lr and labelled set for every arm within a seed. Reported: top-1 on the test crops at the *last*
  epoch (no selection on the test set).
* Frozen features of each encoder before any fine-tuning (the mean of its final-normalised patch tokens, the
  same definition for every arm): weighted k-NN (k=20) and a linear probe (`simmim_hf.evaluation`), trained on
  the same labelled crops, tested on the same test crops.
* Seeds: each seed draws its own labelled subset and fine-tuning randomness; pretraining runs once per arm
  (`--pretrain_seed`), so the spread is the fine-tuning spread. Mean, std and the paired gain (pretrained minus
  scratch, same seed) are reported.

Usage (on 2 CPU cores: about 15 minutes for the paper ViT's pretraining, 4-6 for the plain ones, then about 1
minute per seed and arm):
    python benchmarks/finetune_quality.py --output_dir bench_out
    python benchmarks/finetune_quality.py --output_dir bench_out --arms paper --seeds 0  # one arm, one seed

Writes `results.json`, `results.md` (the table), `<arm>/pretrain_loss.png` and `<arm>/reconstruction.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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

TRAIN_FRACTION = 0.75  # of each photo's width; the rest is the test region
CROP_SIDE = (0.15, 0.25)  # of the photo's shorter side, so a crop always fits the test region
PRESET = "vit-nano-p4-32"
# transformers' plain ViT (absolute positions, q/k/v biases, no LayerScale) in the same size.
PLAIN = dict(use_absolute_position_embeddings=True, use_shared_relative_position_bias=False, use_key_bias=True,
             layer_scale_init_value=0.0, layer_norm_eps=1e-12, init_recipe="transformers")
# arm -> (pretraining source, config overrides). Each arm is compared with random init of the same architecture.
ARMS = {
    "paper": ("simmim_hf", {}),
    "plain": ("simmim_hf", PLAIN),
    "transformers": ("transformers", PLAIN),
}


# ============================================================================================== data
def load_regions() -> list[tuple[np.ndarray, np.ndarray]]:
    """(train region, test region) uint8 RGB arrays per photo, in `SAMPLE_IMAGES` order."""
    files = sample_image_files()
    if len(files) != len(SAMPLE_IMAGES):
        raise RuntimeError(f"Found {len(files)} of the {len(SAMPLE_IMAGES)} embedded photos; install scikit-image and "
                           "scikit-learn (pip install simmim_hf[examples]).")
    regions = []
    for path in files:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        cut = int(pixels.shape[1] * TRAIN_FRACTION)
        regions.append((pixels[:, :cut], pixels[:, cut:]))
    return regions


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


def labelled_crops(regions, split: int, per_class: int, size: int, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, (train, test) in enumerate(regions):
        shorter = min(train.shape[0], train.shape[1] + test.shape[1])
        images += random_crops((train, test)[split], shorter, per_class, size, rng)
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


def pretrain(arm: str, args, regions, out: Path):
    """Pretrain one arm on fresh train-region crops; returns (SimMIM model, info). Saves curve and grid."""
    source, overrides = ARMS[arm]
    model, config = build_mim_model(source, overrides, args.pretrain_seed)
    model.train()
    processor = SimMIMImageProcessor.from_config(config)
    optimizer = build_optimizer(model, lr=args.pretrain_lr, weight_decay=0.05)
    scheduler = LayerDecayLRScheduler(optimizer, args.pretrain_steps, num_warmup_steps=args.pretrain_steps // 20,
                                      min_lr=args.pretrain_lr * 0.01)
    rng = np.random.default_rng(args.pretrain_seed)
    shorter = [min(t.shape[0], t.shape[1] + v.shape[1]) for t, v in regions]
    losses, start = [], time.time()
    for step in range(args.pretrain_steps):
        photos = rng.integers(len(regions), size=args.pretrain_batch_size)
        images = [random_crops(regions[p][0], shorter[p], 1, config.image_size, rng)[0] for p in photos]
        batch = processor(images, return_tensors="pt", do_train=True, return_mask=True,
                          seed=int(rng.integers(2**31 - 1)))
        loss = model(pixel_values=batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.detach())
        if (step + 1) % 100 == 0:
            print(f"[{arm}] pretrain step {step + 1}/{args.pretrain_steps} "
                  f"loss {torch.stack(losses[-100:]).mean():.4f} ({time.time() - start:.0f} s)", flush=True)
    curve = torch.stack(losses).tolist()
    model.eval()
    if source == "transformers":
        from simmim_hf.convert import convert_transformers_checkpoint

        model = convert_transformers_checkpoint(model).eval()
    model.save_pretrained(out / "pretrained")
    draw_curve(curve, out / "pretrain_loss.png", title=f"{arm}: SimMIM pretraining loss")
    test_images, _ = labelled_crops(regions, 1, 1, config.image_size, seed=12345)
    batch = processor(test_images[:8], return_tensors="pt", do_train=False, return_mask=True, seed=0)
    with torch.no_grad():
        reconstruction = model(**batch).reconstruction
    save_reconstruction_grid(out / "reconstruction.png", batch["pixel_values"], reconstruction,
                             batch["bool_masked_pos"], config.patch_size)
    window = max(1, len(curve) // 20)
    return model, {"steps": args.pretrain_steps, "batch_size": args.pretrain_batch_size, "lr": args.pretrain_lr,
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


def finetune_arguments(model_dir, train_dir, test_dir, output_dir, args, seed: int) -> list[str]:
    """The fine-tuning job's arguments of this protocol: its defaults (the official recipe) at this data size,
    evaluated once, after the last epoch."""
    return ["--model_name_or_path", str(model_dir), "--train_dir", str(train_dir), "--validation_dir", str(test_dir),
            "--output_dir", str(output_dir), "--overwrite_output_dir", "--num_train_epochs", str(args.epochs),
            "--warmup_epochs", str(max(1, args.epochs // 10)), "--per_device_train_batch_size", str(args.batch_size),
            "--learning_rate", str(args.learning_rate), "--seed", str(seed), "--eval_every_epochs", str(args.epochs),
            "--logging_steps", "100000", "--checkpoints_total_limit", "1", "--report_to", "none"]


def load_finetune_script():
    """The fine-tuning job, run in-process (one Accelerate state per run)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from simmim_hf import run_finetune

    def run(argv):
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
        GradientState._reset_state()
        return run_finetune.run(argv)

    return SimpleNamespace(run=run)


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "values": values}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--arms", nargs="+", default=["paper", "plain", "transformers"], choices=sorted(ARMS),
                   help="transformers needs plain (its random-init reference is the plain arm's).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--pretrain_seed", type=int, default=0)
    p.add_argument("--pretrain_steps", type=int, default=3000)
    p.add_argument("--pretrain_batch_size", type=int, default=64)
    p.add_argument("--pretrain_lr", type=float, default=1e-3)
    p.add_argument("--labels_per_class", type=int, default=10)
    p.add_argument("--test_per_class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3, help="Fine-tuning peak lr, every arm.")
    p.add_argument("--finetune_args", type=str, default="", help="Extra run_finetune.py arguments, every arm.")
    p.add_argument("--reuse_pretraining", action="store_true",
                   help="Reuse the pretrained checkpoints already in --output_dir (fine-tuning ablations).")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    regions = load_regions()
    size = SimMIMConfig.from_preset(PRESET).image_size
    test = labelled_crops(regions, 1, args.test_per_class, size, seed=10_000)
    write_image_folder(out / "data" / "test", *test)
    run_finetune = load_finetune_script()

    results = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "settings": vars(args),
               "test_samples": len(test[1]), "pretraining": {}, "runs": {}}
    for arm in args.arms:
        arm_dir = out / arm
        arm_dir.mkdir(exist_ok=True)
        if args.reuse_pretraining and (arm_dir / "pretrain_info.json").exists():
            model = SimMIMForMaskedImageModeling.from_pretrained(arm_dir / "pretrained").eval()
            info = json.loads((arm_dir / "pretrain_info.json").read_text())
        else:
            model, info = pretrain(arm, args, regions, arm_dir)
            (arm_dir / "pretrain_info.json").write_text(json.dumps(info))
        results["pretraining"][arm] = info
        print(f"[{arm}] pretraining: loss {info['loss_first']:.4f} -> {info['loss_last']:.4f} in {info['seconds']} s",
              flush=True)
        # The scratch arm: the classifier's own encoder init (the official `VisionTransformer` init, not the
        # pretraining one), saved so that both arms go through the same loading path of the same script.
        torch.manual_seed(args.pretrain_seed)
        scratch = SimMIMModel(SimMIMConfig.from_preset(PRESET, **ARMS[arm][1])).eval()
        scratch_dir = out / f"scratch-{arm}"
        scratch.save_pretrained(scratch_dir / "init")
        for seed in args.seeds:
            train = labelled_crops(regions, 0, args.labels_per_class, size, seed=seed)
            train_dir = out / "data" / f"train-seed{seed}"
            if not train_dir.exists():
                write_image_folder(train_dir, *train)
            for name, encoder, folder in ((arm, model, arm_dir / "pretrained"),
                                          (f"scratch-{arm}", scratch, scratch_dir / "init")):
                if arm == "transformers" and name.startswith("scratch"):
                    continue  # the same architecture as the plain arm's scratch: not repeated
                row = results["runs"].setdefault(name, {"finetune": [], "knn": [], "linear_probe": []})
                scores = frozen_feature_scores(encoder, encoder.config, train, test)
                final, _ = run_finetune.run([
                    *finetune_arguments(folder, train_dir, out / "data" / "test", out / "ft" / f"{name}-{seed}",
                                        args, seed), *args.finetune_args.split()])
                if final["preempted"]:  # stopped by a signal: a partial run's accuracy is no result
                    raise SystemExit(final["stop_status"])
                row["finetune"].append(final["last"]["accuracy"])
                row["knn"].append(scores["knn"])
                row["linear_probe"].append(scores["linear_probe"])
                print(f"[{name}] seed {seed}: fine-tune {final['last']['accuracy']:.4f}, k-NN {scores['knn']:.4f}, "
                      f"linear probe {scores['linear_probe']:.4f}", flush=True)
                (out / "results.json").write_text(json.dumps(results, indent=2))

    summary = {name: {metric: summarize(values) for metric, values in row.items()}
               for name, row in results["runs"].items()}
    for arm in args.arms:
        reference = "scratch-plain" if arm == "transformers" else f"scratch-{arm}"
        if arm in summary and reference in summary:
            summary[arm]["gain"] = {metric: summarize([a - b for a, b in zip(results["runs"][arm][metric],
                                                                            results["runs"][reference][metric])])
                                    for metric in ("finetune", "knn", "linear_probe")}
    results["summary"] = summary
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    print(markdown_table(results))


def markdown_table(results) -> str:
    def cell(stats):
        return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"

    lines = [f"Test crops: {results['test_samples']}; seeds: {results['settings']['seeds']}; "
             f"command: `{results['command']}`", "",
             "| arm | fine-tune top-1 | k-NN top-1 | linear probe top-1 | fine-tune gain (paired) | probe gain | k-NN gain |",
             "|---|---|---|---|---|---|---|"]
    for name, stats in results["summary"].items():
        gain = stats.get("gain")
        gains = [f"{100 * gain[m]['mean']:+.1f} ± {100 * gain[m]['std']:.1f}" for m in ("finetune", "linear_probe", "knn")] \
            if gain else ["–"] * 3
        lines.append(f"| {name} | {cell(stats['finetune'])} | {cell(stats['knn'])} | {cell(stats['linear_probe'])} | "
                     + " | ".join(gains) + " |")
    for arm, info in results["pretraining"].items():
        lines.append(f"\n{arm} pretraining: {info['steps']} steps x {info['batch_size']}, loss {info['loss_first']:.4f} "
                     f"-> {info['loss_last']:.4f}, {info['seconds']} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
