"""torch.compile and mixed precision on a GPU: does the compiled SimMIM train step agree with eager, and how
much faster is it?

For each preset: one model, the same batch and mask; eager and `torch.compile`d forward+backward+AdamW step
are timed alternately (CUDA events, median of rounds) under bf16 autocast, and fp16 autocast with a grad
scaler is run for a few steps to show it trains (finite, decreasing loss). The compiled loss must match the
eager one (bf16 tolerance) on the first step.

    python benchmarks/compile_check.py --presets vit-base-p16-224 swin-base-w6-192 --batch_size 64
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling  # noqa: E402


def make_batch(config: SimMIMConfig, batch_size: int, device: str):
    generator = torch.Generator().manual_seed(0)
    size, p = config.image_size, config.patch_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    units = (size // config.mask_patch_size) ** 2
    scale = config.mask_patch_size // p
    keep = torch.rand(batch_size, units, generator=generator).argsort(1) < int(units * config.mask_ratio + 0.999)
    grid = size // config.mask_patch_size
    mask = keep.view(batch_size, grid, 1, grid, 1).expand(-1, -1, scale, -1, scale).reshape(batch_size, -1)
    return pixel_values.to(device), mask.to(device)


def train_step(model, optimizer, pixel_values, mask, dtype, scaler=None):
    with torch.autocast("cuda", dtype=dtype):
        loss = model(pixel_values=pixel_values, bool_masked_pos=mask).loss
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def time_steps(step, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["vit-base-p16-224", "swin-base-w6-192"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("compile_check.py needs a CUDA device.")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")

    # Rows print as each preset finishes, so a run cut short by a time limit still reports what it measured.
    print(f"\nbf16 autocast, batch {args.batch_size}, fwd+bwd+AdamW, median of {args.rounds} rounds x {args.iters} steps")
    print(f"{'preset':<20} {'loss eager':>10} {'loss comp.':>10} {'agree':>6} {'eager img/s':>12} "
          f"{'compiled img/s':>15} {'speed-up':>9}  fp16 loss first->last ok", flush=True)
    for preset in args.presets:
        config = SimMIMConfig.from_preset(preset, drop_path_rate=0.0)
        pixel_values, mask = make_batch(config, args.batch_size, "cuda")
        torch.manual_seed(0)
        eager = SimMIMForMaskedImageModeling(config).cuda().train()
        compiled_model = copy.deepcopy(eager)
        compiled = torch.compile(compiled_model)
        opt_eager = torch.optim.AdamW(eager.parameters(), lr=1e-4, fused=True)
        opt_compiled = torch.optim.AdamW(compiled_model.parameters(), lr=1e-4, fused=True)

        loss_eager = train_step(eager, opt_eager, pixel_values, mask, torch.bfloat16).item()
        loss_compiled = train_step(compiled, opt_compiled, pixel_values, mask, torch.bfloat16).item()
        agree = abs(loss_eager - loss_compiled) <= 2e-2 * abs(loss_eager)
        for _ in range(3):  # warm-up (compilation of the remaining graphs, allocator)
            train_step(eager, opt_eager, pixel_values, mask, torch.bfloat16)
            train_step(compiled, opt_compiled, pixel_values, mask, torch.bfloat16)
        times = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            times["eager"].append(time_steps(lambda: train_step(eager, opt_eager, pixel_values, mask, torch.bfloat16), args.iters))
            times["compiled"].append(time_steps(lambda: train_step(compiled, opt_compiled, pixel_values, mask, torch.bfloat16), args.iters))
        eager_ips = args.batch_size / statistics.median(times["eager"])
        compiled_ips = args.batch_size / statistics.median(times["compiled"])

        # fp16 with loss scaling: a few steps on the fixed batch must give finite, decreasing losses.
        torch.manual_seed(0)
        fp16_model = SimMIMForMaskedImageModeling(config).cuda().train()
        fp16_opt = torch.optim.AdamW(fp16_model.parameters(), lr=5e-4)
        scaler = torch.amp.GradScaler("cuda")
        fp16_losses = [train_step(fp16_model, fp16_opt, pixel_values, mask, torch.float16, scaler).item() for _ in range(8)]
        fp16_ok = all(torch.isfinite(torch.tensor(fp16_losses))) and fp16_losses[-1] < fp16_losses[0]

        print(f"{preset:<20} {loss_eager:>10.4f} {loss_compiled:>10.4f} {str(agree):>6} {eager_ips:>12.1f} "
              f"{compiled_ips:>15.1f} {compiled_ips / eager_ips:>8.2f}x  {fp16_losses[0]:.4f}->{fp16_losses[-1]:.4f} {fp16_ok}",
              flush=True)
        del eager, compiled, compiled_model, fp16_model, opt_eager, opt_compiled, fp16_opt
        torch.cuda.empty_cache()



if __name__ == "__main__":
    main()
