"""Scale targets of the pretraining job: activation-checkpointing memory, model FLOPs utilisation (MFU) of the
train step, and the full pretraining loop against the bare step.

* ``memory``: peak memory of one training step (forward with a 60 % SimMIM mask, masked L1 loss, backward, AdamW
  step; the optimizer state already allocated) without and with activation checkpointing, per preset, and the
  largest batch per device. Peak memory grows linearly in the batch (parameters, gradients and AdamW state are
  fixed; activations are per image), so two batch sizes give the line ``fixed + per_image * batch``, solved for
  the device memory x ``--headroom`` (what the allocator's rounding, fragmentation and kernel workspaces leave).
  On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the same quantity without running anything, i.e. every
  tensor the step keeps alive, tracked on fake tensors (``torch.distributed._tools.mem_tracker.MemTracker`` under
  ``FakeTensorMode``); autocast then follows the CPU's op list, close to but not the same as CUDA's.
* ``mfu``: model FLOPs per image counted by ``torch.utils.flop_counter`` (every matmul and convolution of the forward
  and backward pass, attention through the math kernel so its two matmuls count; elementwise work and
  checkpointing's recomputation do not count, as the MFU convention has it), then the timed step (fused AdamW,
  optional ``torch.compile``) at each batch size: MFU = FLOPs per image x images/s / the device's peak
  (``--peak_tflops``; H100/H200 SXM dense bf16: 989.4).
* ``loop``: ``simmim_hf.run_pretraining`` itself (its default workers, pinned memory, uint8 batches) on an image
  folder of real-size JPEGs (500x375, quality 90, made from the embedded photos), its logged images/s over the
  steady-state intervals, against the bare step at the same preset, batch, precision and compile setting.

Usage:
    python benchmarks/scale.py memory                               # CPU, fake tensors: no compute, ~1 min/preset
    python benchmarks/scale.py memory --device cuda --dtype bf16
    python benchmarks/scale.py mfu --device cuda --dtype bf16 --compile --batch_sizes 64 128 256
    python benchmarks/scale.py loop --device cuda --dtype bf16 --compile
    python benchmarks/scale.py all --quick                          # a CPU smoke run of every part, tiny preset
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling
from simmim_hf.training_utils import enable_gradient_checkpointing

GIB = 2**30
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16/fp16 tensor-core peaks (SXM)


def build(preset: str, checkpointing: bool = False) -> SimMIMForMaskedImageModeling:
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset))
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def make_batch(config: SimMIMConfig, batch_size: int, device) -> dict:
    """Random pixels and a fixed 60 % mask pattern (data-independent, so it also works on fake tensors)."""
    side = config.image_size // config.patch_size
    mask = (torch.arange(side * side, device=device) % 10 < 6).expand(batch_size, -1).contiguous()
    return {"pixel_values": torch.randn(batch_size, 3, config.image_size, config.image_size, device=device),
            "bool_masked_pos": mask}


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def train_step(model, optimizer, batch, device, dtype) -> torch.Tensor:
    with autocast(device, dtype):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ------------------------------------------------------------------------------------------------ memory
def peak_memory(preset: str, batch_size: int, checkpointing: bool, device: torch.device, dtype: str) -> float:
    """Peak bytes of the second training step (the first allocates the AdamW state)."""
    model = build(preset, checkpointing).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if device.type == "cuda":
        batch = make_batch(model.config, batch_size, device)
        train_step(model, optimizer, batch, device, dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, batch, device, dtype)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del model, optimizer, batch
        torch.cuda.empty_cache()
        return float(peak)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode(allow_non_fake_inputs=True):
        batch = make_batch(model.config, batch_size, device)
        train_step(model, optimizer, batch, device, dtype)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            train_step(model, optimizer, batch, device, dtype)
        snapshot = tracker.get_tracker_snapshot("peak")
    return float(sum(per_device["Total"] for per_device in snapshot.values()))


def run_memory(args) -> dict:
    device = torch.device(args.device)
    small, large = args.batch_sizes[:2]
    if args.memory_gib is None:  # the device's own size on CUDA; an H200's otherwise
        args.memory_gib = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else 140.0
    budget = args.memory_gib * GIB * args.headroom
    results = {}
    print(f"peak memory of a training step, {args.dtype}, device {device} "
          f"({'max_memory_allocated' if device.type == 'cuda' else 'tensors alive, fake-tensor tracking'}); "
          f"largest batch for {args.memory_gib:g} GiB x {args.headroom:g}")
    print(f"{'preset':<22}{'ckpt':>6}{f'GiB @{small}':>11}{f'GiB @{large}':>11}{'MiB/image':>11}"
          f"{'max batch':>11}{'ratio':>8}")
    for preset in args.presets:
        rows = {}
        for checkpointing in (False, True):
            a = peak_memory(preset, small, checkpointing, device, args.dtype)
            b = peak_memory(preset, large, checkpointing, device, args.dtype)
            per_image = (b - a) / (large - small)
            fixed = a - per_image * small
            rows[checkpointing] = {"peak_small": a, "peak_large": b, "per_image": per_image, "fixed": fixed,
                                   "max_batch": int((budget - fixed) // per_image) if per_image > 0 else None}
        ratio = rows[True]["peak_large"] / rows[False]["peak_large"]
        for checkpointing, row in rows.items():
            print(f"{preset:<22}{'on' if checkpointing else 'off':>6}{row['peak_small'] / GIB:>11.2f}"
                  f"{row['peak_large'] / GIB:>11.2f}{row['per_image'] / 2**20:>11.1f}{row['max_batch']:>11}"
                  f"{f'{ratio:.2f}x' if checkpointing else '':>8}")
        results[preset] = {"off": rows[False], "on": rows[True], f"ratio_at_{large}": ratio}
    return results


# ------------------------------------------------------------------------------------------------ MFU
def flops_per_image(preset: str) -> float:
    """Model FLOPs of one image's forward + backward pass (matmuls and convolutions), counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build(preset)
    with FakeTensorMode(allow_non_fake_inputs=True), sdpa_kernel(SDPBackend.MATH):
        batch = make_batch(model.config, 2, torch.device("cpu"))
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
    return counter.get_total_flops() / 2


def time_step(preset: str, batch_size: int, device, dtype: str, compile_model: bool, warmup: int, iters: int):
    """Images/s of the bare training step: fused AdamW, no data loading, one host sync per timed block. Compiled,
    it gets a fresh static-shape graph (no graph of an earlier batch size or of the loop carries over)."""
    model = build(preset).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if compile_model:
        torch._dynamo.reset()
    step_model = torch.compile(model, dynamic=False) if compile_model else model
    batch = make_batch(model.config, batch_size, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        train_step(step_model, optimizer, batch, device, dtype)
    synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        loss = train_step(step_model, optimizer, batch, device, dtype)
    loss.item()
    synchronize()
    return batch_size * iters / (time.perf_counter() - start)


def peak_tflops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)
    return None


def run_mfu(args) -> dict:
    device = torch.device(args.device)
    peak = peak_tflops(args, device)
    results = {}
    for preset in args.presets:
        flops = flops_per_image(preset)
        config = SimMIMConfig.from_preset(preset)
        print(f"{preset}: {flops / 1e9:.1f} GFLOPs per image per training step (forward + backward, counted; "
              f"{config.image_size} px); peak {peak or 'unknown'} TFLOP/s; {args.dtype}, compile={args.compile}")
        rows = []
        for batch_size in args.batch_sizes:
            try:
                rate = time_step(preset, batch_size, device, args.dtype, args.compile, args.warmup, args.iters)
            except torch.OutOfMemoryError:
                print(f"  batch {batch_size}: out of memory")
                torch.cuda.empty_cache()
                break
            achieved = flops * rate / 1e12
            mfu = achieved / peak if peak else None
            rows.append({"batch_size": batch_size, "images_per_sec": rate, "tflops": achieved, "mfu": mfu})
            print(f"  batch {batch_size:>4}: {rate:9.1f} images/s  {achieved:7.1f} TFLOP/s"
                  + (f"  MFU {100 * mfu:5.1f} %" if mfu is not None else ""))
        results[preset] = {"flops_per_image": flops, "peak_tflops": peak, "runs": rows}
    return results


# ------------------------------------------------------------------------------------------------ loop
def write_jpeg_folder(folder: Path, count: int, size=(500, 375)) -> Path:
    from PIL import Image

    from simmim_hf.sample_data import load_sample_images

    photos = [photo.resize(size, Image.BICUBIC) for photo in load_sample_images(shortest_edge=None)]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        buffer = io.BytesIO()
        photos[i % len(photos)].save(buffer, "JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buffer.getvalue())
    return folder


def run_loop(args) -> dict:
    from simmim_hf.engine import LoopCallback
    from simmim_hf.run_pretraining import main as pretrain

    device = torch.device(args.device)
    preset, batch_size = args.presets[0], args.batch_sizes[0]
    logged = []

    class Rates(LoopCallback):
        def on_log(self, loop, state, logs):
            logged.append(logs["train/images_per_sec"])

    with tempfile.TemporaryDirectory() as tmp:
        images = write_jpeg_folder(Path(tmp) / "images", args.num_images)
        argv = ["--preset", preset, "--train_dir", str(images), "--output_dir", str(Path(tmp) / "run"),
                "--per_device_train_batch_size", str(batch_size), "--max_train_steps", str(args.loop_steps),
                "--logging_steps", str(args.logging_steps), "--learning_rate", "1e-4",
                "--mixed_precision", {"fp32": "no"}.get(args.dtype, args.dtype)]
        if args.compile:
            argv.append("--torch_compile")
        if device.type == "cpu":
            argv.append("--cpu")
        pretrain(argv, callbacks=[Rates()])
    steady = logged[1:] or logged  # the first interval holds worker start-up and compilation
    loop_rate = statistics.median(steady)
    # Printed now: the bare step compiles again, and a time limit there must not lose the loop's figure.
    print(f"{preset} batch {batch_size} {args.dtype} compile={args.compile}: loop rate {loop_rate:.1f} images/s "
          f"(median of {len(steady)} logged intervals)", flush=True)
    bare = time_step(preset, batch_size, device, args.dtype, args.compile, args.warmup, args.iters)
    print(f"{preset} batch {batch_size} {args.dtype} compile={args.compile}: loop {loop_rate:.1f} images/s "
          f"(median of {len(steady)} logged intervals), bare step {bare:.1f} images/s: loop/bare {loop_rate / bare:.2f}")
    return {"preset": preset, "batch_size": batch_size, "loop_images_per_sec": loop_rate, "intervals": logged,
            "bare_images_per_sec": bare, "ratio": loop_rate / bare}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["memory", "mfu", "loop", "all"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--presets", nargs="+", default=None,
                        help="Default: vit-base-p16-224 and swin-base-w6-192 (memory), vit-base-p16-224 (mfu, loop).")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=None,
                        help="memory: the two batch sizes of the fit (default 32 64); mfu: each timed (default 64 "
                             "128 256); loop: the first (default 128).")
    parser.add_argument("--memory_gib", type=float, default=None,
                        help="Device memory for the largest batch (default: the GPU's; on the CPU an H200's 140 GiB).")
    parser.add_argument("--headroom", type=float, default=0.9, help="Share of --memory_gib the tensors may take.")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (mfu, loop).")
    parser.add_argument("--peak_tflops", type=float, default=None, help="Device peak (default: by GPU name).")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--num_images", type=int, default=4096, help="loop: JPEGs in the image folder.")
    parser.add_argument("--loop_steps", type=int, default=120, help="loop: optimizer steps of the pretraining run.")
    parser.add_argument("--logging_steps", type=int, default=20, help="loop: steps per logged images/s interval.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: tiny preset, tiny batches.")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets = args.presets or ["vit-nano-p4-32"]
        args.batch_sizes = args.batch_sizes or [2, 4]
        args.warmup, args.iters, args.num_images, args.loop_steps, args.logging_steps = 1, 2, 16, 6, 2
    parts = ["memory", "mfu", "loop"] if args.part == "all" else [args.part]
    results = {}
    for part in parts:
        part_args = argparse.Namespace(**vars(args))
        part_args.presets = args.presets or (["vit-base-p16-224", "swin-base-w6-192"] if part == "memory"
                                             else ["vit-base-p16-224"])
        part_args.batch_sizes = args.batch_sizes or {"memory": [32, 64], "mfu": [64, 128, 256], "loop": [128]}[part]
        results[part] = {"memory": run_memory, "mfu": run_mfu, "loop": run_loop}[part](part_args)
        if args.json:  # after every part: a later part that runs out of time loses only itself
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
