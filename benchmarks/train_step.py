"""Training-step throughput and peak memory: simmim_hf against transformers' own MIM models.

One training step = forward with a SimMIM mask (60 % of 32 px units) + masked L1 loss, backward, AdamW step.
Pairs compared (same architecture, same parameter count, same attention backend, SDPA):

* ``vit``:  transformers `ViTForMaskedImageModeling` (ViT-B/16 at 224) vs simmim_hf preset
  ``vit-base-p16-224-plain`` (absolute positions, full qkv bias, no LayerScale).
* ``swin``: transformers `SwinForMaskedImageModeling` (Swin-T at 192, window 6) vs simmim_hf preset
  ``swin-tiny-w6-192``.
* ``swin-base``: the same at Swin-B size (embed 128, heads 4/8/16/32, 192 px, window 6) against simmim_hf
  ``swin-base-w6-192``, the paper's pretraining model and issue 14's target (x1.2 in bf16).
* ``swinv2``: transformers `Swinv2ForMaskedImageModeling` (SwinV2-T at 192, window 6; transformers' Swinv2 has
  eager attention only) vs simmim_hf ``encoder_type="swinv2"`` with the same sizes (cosine attention through SDPA).
* ``paper``: simmim_hf ``vit-base-p16-224`` (the paper's ViT-B: shared relative position bias, LayerScale, q/v bias)
  vs the plain ViT-B above, i.e. the cost of the paper's architecture choices.

Stochastic depth is off everywhere (`drop_path_rate=0`) so that every model does the same work.

Throughput: all models live in one process and are timed *alternately* (round-robin, `--rounds` rounds of
`--iters` timed steps each after `--warmup` untimed steps), so slow drift of a shared machine hits every model
alike; the reported images/s is the median over rounds.

The speed ratio of a pair is the median over rounds of the ratio within each round (a paired comparison: both
models of a round ran under the same machine conditions), which is steadier on a shared machine than the ratio
of the two medians.

Peak memory is measured in a separate, fresh process per model (one process cannot tell which model caused its
peak). On CUDA it is `torch.cuda.max_memory_allocated()` of that process. On CPU two figures are given:

* "alloc": the CPU counterpart of that CUDA figure: the bytes of every tensor alive before a training step
  (parameters, AdamW state, batch) plus the highest running total of the step's own allocations, replayed from
  the torch profiler's allocation events.
* "RSS": the growth of the process's resident set size from just before the model is built to its peak during
  the training steps (`VmHWM`, reset at the start, minus the `VmRSS` baseline). It also counts what the C
  allocator keeps cached or fragmented, so it can differ between two models that allocate the same tensors.

Usage:
    python benchmarks/train_step.py                                 # CPU, fp32, batch 8
    python benchmarks/train_step.py --device cuda --dtype bf16 --batch_size 64 --iters 20
    python benchmarks/train_step.py --pairs swin --rounds 5          # one pair only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from transformers import (
    SwinConfig,
    SwinForMaskedImageModeling,
    Swinv2Config,
    Swinv2ForMaskedImageModeling,
    ViTConfig,
    ViTForMaskedImageModeling,
)

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling  # noqa: E402

# name -> (builder, short description). Builders return an un-initialised-for-speed but complete model.
MODELS = {
    "transformers-vit": "transformers ViTForMaskedImageModeling, ViT-B/16 @224",
    "simmim-vit-plain": "simmim_hf vit-base-p16-224-plain",
    "transformers-swin": "transformers SwinForMaskedImageModeling, Swin-T w6 @192",
    "simmim-swin": "simmim_hf swin-tiny-w6-192",
    "transformers-swin-base": "transformers SwinForMaskedImageModeling, Swin-B w6 @192",
    "simmim-swin-base": "simmim_hf swin-base-w6-192",
    "transformers-swinv2": "transformers Swinv2ForMaskedImageModeling, SwinV2-T w6 @192",
    "simmim-swinv2": "simmim_hf swinv2, SwinV2-T w6 @192",
    "simmim-vit-paper": "simmim_hf vit-base-p16-224 (shared rel. bias + LayerScale)",
}
# (reference, candidate): the ratio reported is candidate images/s / reference images/s.
PAIRS = {
    "vit": ("transformers-vit", "simmim-vit-plain"),
    "swin": ("transformers-swin", "simmim-swin"),
    "swin-base": ("transformers-swin-base", "simmim-swin-base"),
    "swinv2": ("transformers-swinv2", "simmim-swinv2"),
    "paper": ("simmim-vit-plain", "simmim-vit-paper"),
}
TARGETS = {"vit": 1.0, "swin": 1.2, "swin-base": 1.2, "swinv2": 1.0}
SWIN_T = dict(image_size=192, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=6)
SWIN_B = dict(image_size=192, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=6)


def build_model(name: str) -> torch.nn.Module:
    if name == "transformers-vit":
        config = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, encoder_stride=16, attn_implementation="sdpa")
        return ViTForMaskedImageModeling(config)
    if name in ("transformers-swin", "transformers-swin-base"):
        sizes = SWIN_T if name == "transformers-swin" else SWIN_B
        config = SwinConfig(**sizes, encoder_stride=32, drop_path_rate=0.0, attn_implementation="sdpa")
        return SwinForMaskedImageModeling(config)
    if name == "transformers-swinv2":
        return Swinv2ForMaskedImageModeling(Swinv2Config(**SWIN_T, encoder_stride=32, drop_path_rate=0.0))
    if name == "simmim-swinv2":
        config = SimMIMConfig(encoder_type="swinv2", **SWIN_T, mask_patch_size=32, drop_path_rate=0.0,
                              attn_implementation="sdpa")
        return SimMIMForMaskedImageModeling(config)
    preset = {"simmim-vit-plain": "vit-base-p16-224-plain", "simmim-swin": "swin-tiny-w6-192",
              "simmim-swin-base": "swin-base-w6-192", "simmim-vit-paper": "vit-base-p16-224"}[name]
    config = SimMIMConfig.from_preset(preset, drop_path_rate=0.0, attn_implementation="sdpa")
    return SimMIMForMaskedImageModeling(config)


def make_batch(model: torch.nn.Module, batch_size: int, device: torch.device, seed: int = 0):
    """Random images and a SimMIM mask: 60 % of the 32 px units, expanded to the model's patch grid."""
    config = model.config
    size, patch = config.image_size, config.patch_size
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    units = size // 32
    scores = torch.rand(batch_size, units * units, generator=generator)
    keep = scores.argsort(dim=1)[:, : int(0.6 * units * units)]
    unit_mask = torch.zeros(batch_size, units * units, dtype=torch.bool).scatter_(1, keep, True)
    unit_mask = unit_mask.view(batch_size, units, units)
    scale = 32 // patch
    bool_masked_pos = unit_mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).flatten(1)
    return pixel_values.to(device), bool_masked_pos.to(device)


class Runner:
    """A model, its AdamW optimizer and a fixed batch; `step()` is one full training step."""

    def __init__(self, name: str, args):
        self.name = name
        self.device = torch.device(args.device)
        self.model = build_model(name).to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05)
        self.batch = make_batch(self.model, args.batch_size, self.device)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
        )
        self.num_parameters = sum(p.numel() for p in self.model.parameters())

    def step(self) -> float:
        pixel_values, bool_masked_pos = self.batch
        with self.autocast:
            loss = self.model(pixel_values, bool_masked_pos=bool_masked_pos).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()  # also synchronises CUDA


def timed(runner: Runner, iters: int) -> float:
    """Seconds for `iters` steps."""
    start = time.perf_counter()
    for _ in range(iters):
        runner.step()
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def proc_status_kib(field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (peak resident) of this process, in KiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Restart the peak-RSS counter (`VmHWM`) from the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # VmHWM then also counts the import phase, which is below the baseline taken before the model


def memory_worker(name: str, args) -> dict:
    """Runs in its own process: peak memory of building and training one model."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Not `getrusage().ru_maxrss`: Linux carries the parent's high-water mark into a child across exec, so a
    # worker started by a big parent would report the parent's peak. VmHWM belongs to this process image.
    reset_peak_rss()
    baseline_kib = proc_status_kib("VmRSS")
    runner = Runner(name, args)
    for _ in range(max(args.warmup, 1) + 1):
        runner.step()
    if args.device == "cuda":
        return {"name": name, "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    rss_mib = (proc_status_kib("VmHWM") - baseline_kib) / 1024
    return {"name": name, "peak_mib": cpu_peak_allocated_mib(runner), "rss_mib": rss_mib}


def cpu_peak_allocated_mib(runner: Runner) -> float:
    """Bytes of the tensors alive before one training step plus the peak of the step's own allocations."""
    from torch.profiler import ProfilerActivity, profile

    state = [*runner.model.parameters(), *runner.model.buffers(), *runner.batch]
    state += [t for s in runner.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    resident = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    # Allocation (+bytes) and free (-bytes) events in time order; the running total is the step's live memory.
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return (resident + peak) / 2**20


def measure_memory(names: list[str], args) -> dict[str, dict]:
    peaks = {}
    for name in names:
        command = [sys.executable, __file__, "--memory_worker", name, "--device", args.device, "--dtype", args.dtype,
                   "--batch_size", str(args.batch_size), "--warmup", str(args.warmup)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"memory worker for {name} failed:\n{result.stderr}")
        peaks[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="bf16 = autocast mixed precision (fp32 master weights)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model before the first round")
    parser.add_argument("--iters", type=int, default=1, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds; the median is reported")
    parser.add_argument("--pairs", nargs="+", default=["vit", "swin", "swinv2", "paper"], choices=list(PAIRS),
                        help="Pairs to time (swin-base, for GPUs, is not in the default).")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--json", type=str, help="also write the results to this file")
    parser.add_argument("--memory_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        # fp32 means fp32 for both libraries, in the matmuls and the (patch embedding, decoder) convolutions.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)

    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args)))
        return

    names = list(dict.fromkeys(name for pair in args.pairs for name in PAIRS[pair]))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}; {device_name}; {args.dtype}; batch {args.batch_size}; "
          f"{args.warmup} warmup + {args.rounds} rounds x {args.iters} timed steps per model, alternating")

    runners = {name: Runner(name, args) for name in names}
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step()
    per_round = {name: [] for name in names}
    for round_index in range(args.rounds):
        # Alternate the order too, so no model always runs right after the same neighbour.
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            seconds = timed(runners[name], args.iters)
            per_round[name].append(args.iters * args.batch_size / seconds)
    throughput = {name: statistics.median(values) for name, values in per_round.items()}
    parameters = {name: runner.num_parameters for name, runner in runners.items()}
    del runners

    def report(memory: dict) -> None:
        """The table, the pair ratios and the JSON (rewritten once the memory figures are in)."""
        rss = args.device == "cpu"
        memory_head = f"{'alloc MiB':>9} {'RSS MiB':>8}" if rss else f"{'peak MiB':>9}"
        print(f"\n{'model':<20} {'params':>11} {'images/s':>9} {'(per round)':<24} {memory_head}  description")
        for name in names:
            rounds = ", ".join(f"{v:.2f}" for v in per_round[name])
            measured = memory.get(name, {})
            mem = f"{measured['peak_mib']:>9.0f}" if measured else f"{'-':>9}"
            if rss:
                mem += f" {measured['rss_mib']:>8.0f}" if measured else f" {'-':>8}"
            print(f"{name:<20} {parameters[name]:>11,} {throughput[name]:>9.2f} ({rounds:<22}) {mem}  {MODELS[name]}")
        print()
        results = {"args": vars(args), "throughput": throughput, "per_round": per_round, "memory": memory,
                   "parameters": parameters, "pairs": {}}
        for pair in args.pairs:
            reference, candidate = PAIRS[pair]
            round_ratios = [c / r for c, r in zip(per_round[candidate], per_round[reference])]
            ratio = statistics.median(round_ratios)
            line = f"{pair:<6} {candidate} / {reference}: speed x{ratio:.3f} " \
                   f"(rounds {min(round_ratios):.3f}-{max(round_ratios):.3f})"
            memory_ratio = None
            if memory:
                peak_c, peak_r = memory[candidate]["peak_mib"], memory[reference]["peak_mib"]
                memory_ratio = peak_c / peak_r
                line += f", peak {'allocated ' if rss else ''}memory {peak_c:.0f} vs {peak_r:.0f} MiB (x{memory_ratio:.3f})"
                if rss:
                    rss_c, rss_r = memory[candidate]["rss_mib"], memory[reference]["rss_mib"]
                    line += f", RSS {rss_c:.0f} vs {rss_r:.0f} MiB (x{rss_c / rss_r:.3f})"
            if pair in TARGETS:
                line += f"  [target speed >= {TARGETS[pair]}: {'met' if ratio >= TARGETS[pair] else 'NOT met'}]"
            print(line)
            results["pairs"][pair] = {"speed_ratio": ratio, "round_ratios": round_ratios, "memory_ratio": memory_ratio}
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    # Speed first: a run cut short while measuring memory (fresh processes) still leaves its throughput.
    report({})
    if not args.skip_memory:
        report(measure_memory(names, args))


if __name__ == "__main__":
    main()
