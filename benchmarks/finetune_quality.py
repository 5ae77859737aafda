#!/usr/bin/env python
"""Does a short SimMIM pretraining help fine-tuning with few labels? (issue: fine-tuning quality)

On the embedded labelled data (scikit-learn's digits upsampled to the model size, the fine-tuning
script's default), with 10 % of the training labels:

1. pretrain SimMIM on the *unlabelled* training images (all of the training split, labels ignored;
   the evaluation split is never seen), a short run on CPU;
2. fine-tune from that checkpoint and from random init with the same script, recipe, budget, data
   and seeds (`examples/run_finetune.py`, the paper's recipe incl. layer decay for both);
3. report top-1 accuracy on the held-out split: at the last epoch (the honest number) and the best epoch
   (selected on the same split, hence optimistic), mean and std over seeds.

Usage:
    python benchmarks/finetune_quality.py --output_dir bench_out [--pretrain_steps 600] [--seeds 0 1 2]

Whatever it shows is reported as is: with a ~100 K-parameter model, 32 px digits and minutes of CPU
pretraining, the effect may be small or absent; this measures the pipeline, not the paper's claim.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling  # noqa: E402
from simmim_hf.image_processing_simmim import SimMIMImageProcessor  # noqa: E402
from simmim_hf.optimization import LayerDecayLRScheduler, build_optimizer  # noqa: E402


def load_script():
    spec = importlib.util.spec_from_file_location("run_finetune", ROOT / "examples" / "run_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pretrain(run_finetune, args, out: Path) -> dict:
    """A short SimMIM pretraining on the unlabelled training images (the script's own split)."""
    torch.manual_seed(args.pretrain_seed)
    config = SimMIMConfig.from_preset(args.preset)
    data = run_finetune._split(run_finetune.load_digits_dataset(config.image_size), 0.2, args.data_seed)["train"]
    images = data["image"]  # labels are not used
    processor = SimMIMImageProcessor.from_config(config, flip_prob=0.0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = SimMIMForMaskedImageModeling(config).to(device).train()
    optimizer = build_optimizer(model, lr=args.pretrain_lr, weight_decay=0.05)
    scheduler = LayerDecayLRScheduler(optimizer, args.pretrain_steps, num_warmup_steps=args.pretrain_steps // 10)
    generator = torch.Generator().manual_seed(args.pretrain_seed)
    start, losses = time.time(), []
    for step in range(args.pretrain_steps):
        index = torch.randint(len(images), (args.pretrain_batch_size,), generator=generator).tolist()
        batch = processor([images[i] for i in index], return_tensors="pt", do_train=True,
                          seed=int(torch.randint(2**31 - 1, (), generator=generator)))
        loss = model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.detach())
        if (step + 1) % 100 == 0:
            print(f"pretrain step {step + 1}/{args.pretrain_steps} loss {torch.stack(losses[-100:]).mean():.4f}",
                  flush=True)
    model.save_pretrained(out)
    first = torch.stack(losses[:50]).mean().item()
    last = torch.stack(losses[-50:]).mean().item()
    return {"device": str(device), "steps": args.pretrain_steps, "images": len(images), "loss_first_50": first, "loss_last_50": last,
            "seconds": time.time() - start}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--preset", default="vit-nano-p4-32")
    p.add_argument("--pretrain_steps", type=int, default=600)
    p.add_argument("--pretrain_batch_size", type=int, default=64)
    p.add_argument("--pretrain_lr", type=float, default=1e-3)
    p.add_argument("--pretrain_seed", type=int, default=0)
    p.add_argument("--label_fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data_seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_finetune = load_script()

    pretrained = out / "pretrained"
    pretrain_info = pretrain(run_finetune, args, pretrained)
    print("pretraining:", json.dumps(pretrain_info), flush=True)

    common = ["--train_label_fraction", str(args.label_fraction), "--num_train_epochs", str(args.epochs),
              "--warmup_epochs", str(max(1, args.epochs // 10)), "--per_device_train_batch_size", str(args.batch_size),
              "--learning_rate", str(args.learning_rate), "--flip_prob", "0", "--crop_scale_min", "0.5",
              "--data_seed", str(args.data_seed), "--logging_steps", "1000", "--checkpoints_total_limit", "1"]
    results = {"simmim_pretrained": [], "random_init": []}
    for seed in args.seeds:
        for name, source in (("simmim_pretrained", ["--model_name_or_path", str(pretrained)]),
                             ("random_init", ["--preset", args.preset])):
            final, _ = run_finetune.run([*source, *common, "--seed", str(seed),
                                         "--output_dir", str(out / f"{name}_seed{seed}")])
            results[name].append({"seed": seed, "last": final["last"]["accuracy"], "best": final["best"]["accuracy"],
                                  "train_samples": final["train_samples"], "eval_samples": final["eval_samples"]})
            print(name, results[name][-1], flush=True)

    def stats(values):
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else math.nan}

    summary = {name: {"last": stats([r["last"] for r in runs]), "best": stats([r["best"] for r in runs])}
               for name, runs in results.items()}
    report = {"command": " ".join(sys.argv), "pretraining": pretrain_info, "runs": results, "summary": summary,
              "settings": vars(args)}
    (out / "finetune_quality.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
