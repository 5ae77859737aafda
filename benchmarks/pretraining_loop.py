"""Images/s of the full pretraining loop (data loading + augmentation + masking + forward/backward/step):
simmim_hf's loop (the components of examples/run_pretraining.py) against a transformers `run_mim.py`-style
loop (ViTForMaskedImageModeling, ViTImageProcessor in a `set_transform`, run_mim's numpy MaskGenerator per
sample), for the same model size on the same data and the same number of dataloader workers.

    python benchmarks/pretraining_loop.py                       # vit-micro-p8-64, batch 64, CPU
    python benchmarks/pretraining_loop.py --preset vit-base-p16-224 --batch_size 32 --device cuda --bf16

One run each (after warmup steps), printed as a table. Not a test.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.data import DataLoader

# The run_mim.py baseline's mask generator lives beside the processor benchmark (`python benchmarks/...` puts
# this folder on sys.path).
from processor import MaskGenerator

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling
from simmim_hf.data import EpochShuffleSampler, ImageRows, SimMIMCollator, create_dataloader
from simmim_hf.image_processing_simmim import SimMIMImageProcessor
from simmim_hf.optimization import build_param_groups
from simmim_hf.sample_data import load_sample_dataset


def timed_loop(loader, step_fn, warmup: int, steps: int, batch_size: int) -> float:
    it = iter(loader)
    for _ in range(warmup):
        step_fn(next(it))
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(next(it))
    return steps * batch_size / (time.perf_counter() - start)


def make_step(model, optimizer, device, bf16: bool, fused_guard: bool):
    def step(batch):
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        mask = batch["bool_masked_pos"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=pixel_values, bool_masked_pos=mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # no .item(): no host sync per step, as in the script

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit-micro-p8-64", help="simmim_hf ViT preset (the baseline copies its size).")
    p.add_argument("--batch_size", type=int, default=64, help="Batch size of both loops.")
    p.add_argument("--steps", type=int, default=30, help="Timed steps per loop.")
    p.add_argument("--warmup", type=int, default=5, help="Untimed steps first (worker start, allocator).")
    p.add_argument("--num_workers", type=int, default=None, help="Dataloader workers (default: as the script).")
    p.add_argument("--device", default="cpu", help="cpu or cuda.")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both.")
    args = p.parse_args()

    from transformers import ViTConfig, ViTForMaskedImageModeling, ViTImageProcessor

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = SimMIMConfig.from_preset(args.preset)
    if cfg.encoder_type != "vit":
        raise SystemExit("--preset must be a ViT preset (the baseline is ViTForMaskedImageModeling).")
    cores = len(os.sched_getaffinity(0))
    workers = args.num_workers if args.num_workers is not None else max(1, min(8, cores - 1))
    total = (args.warmup + args.steps + 2) * args.batch_size
    hf_ds = load_sample_dataset(repeats=max(1, -(-total // 20)))

    # ---- simmim_hf: raw images in workers, one processor call per batch with per-sample seeds
    processor = SimMIMImageProcessor.from_config(cfg)
    ours_rows = ImageRows(hf_ds, "image")
    ours_loader = create_dataloader(ours_rows, args.batch_size, SimMIMCollator(processor, seed=0, do_train=True,
                                                                               return_mask=True),
                                    sampler=EpochShuffleSampler(len(ours_rows), seed=0), drop_last=True,
                                    num_workers=workers, pin_memory=device.type == "cuda")
    ours_model = SimMIMForMaskedImageModeling(cfg).to(device).train()
    ours_opt = torch.optim.AdamW(build_param_groups(ours_model, 0.05), lr=1e-4, fused=True)
    for g in ours_opt.param_groups:
        g.pop("param_names", None)
    ours = timed_loop(ours_loader, make_step(ours_model, ours_opt, device, args.bf16, True), args.warmup,
                      args.steps, args.batch_size)

    # ---- run_mim.py style: set_transform with the image processor, numpy MaskGenerator per sample
    vit_cfg = ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                        intermediate_size=cfg.intermediate_size, encoder_stride=cfg.patch_size,
                        qkv_bias=True)
    vit_proc = ViTImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size})
    mask_gen = MaskGenerator(cfg.image_size, cfg.mask_patch_size, cfg.patch_size, cfg.mask_ratio)

    def preprocess_images(examples):  # as run_mim.py (its torchvision crop/flip replaced by the processor)
        examples["pixel_values"] = list(vit_proc([im.convert("RGB") for im in examples["image"]],
                                                 return_tensors="pt")["pixel_values"])
        examples["mask"] = [mask_gen() for _ in range(len(examples["image"]))]
        return examples

    def collate_fn(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "bool_masked_pos": torch.stack([e["mask"] for e in examples]).bool()}

    base_ds = hf_ds.with_transform(preprocess_images)
    base_loader = DataLoader(base_ds, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                             collate_fn=collate_fn, prefetch_factor=4, pin_memory=device.type == "cuda")
    base_model = ViTForMaskedImageModeling(vit_cfg).to(device).train()
    base_opt = torch.optim.AdamW(base_model.parameters(), lr=1e-4)  # Trainer's default AdamW (foreach)
    base = timed_loop(base_loader, make_step(base_model, base_opt, device, args.bf16, False), args.warmup,
                      args.steps, args.batch_size)

    n_ours = sum(p.numel() for p in ours_model.parameters())
    n_base = sum(p.numel() for p in base_model.parameters())
    print(f"preset={args.preset} batch={args.batch_size} steps={args.steps} workers={workers} device={device} "
          f"bf16={args.bf16} torch_threads={torch.get_num_threads()}")
    print(f"{'loop':<44}{'params':>10}{'images/s':>12}")
    print(f"{'simmim_hf (ImageRows + SimMIMCollator)':<44}{n_ours:>10,}{ours:>12.1f}")
    print(f"{'run_mim.py-style (ViTForMaskedImageModeling)':<44}{n_base:>10,}{base:>12.1f}")
    print(f"ratio simmim_hf / run_mim-style: {ours / base:.2f}x")


if __name__ == "__main__":
    main()
