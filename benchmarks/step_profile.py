"""Where a training step's time goes, per kind of kernel, for the models of `train_step.py`.

Profiles `--steps` full training steps (forward, backward, AdamW) of each model with the torch profiler and
sums the self time of every ATen op into categories:

* ``gemm / attention``: mm / addmm / bmm / baddbmm (the linear layers and attention products) and PyTorch's
  fused CPU attention kernels;
* ``conv``: the patch embedding and the 1x1 decoder convolution (forward and backward);
* ``gelu / norm / softmax``: GELU, LayerNorm, softmax, forward and backward;
* ``optimizer``: everything under `Optimizer.step` (AdamW's element-wise updates);
* ``layout``: copies, concatenation, roll, padding, indexing: moving data between token orders;
* ``other``: the rest (residual adds, masking, loss, bias adds, reductions, ...).

The first four are work any implementation of the same architecture with the same optimizer has to do, with
the same kernels and shapes. So ``reference total / reference essential`` is an upper bound on the speed-up any
rewrite of the reference can reach while it runs those kernels, however cheap it makes everything else.

    python benchmarks/step_profile.py --pair swin            # CPU, fp32, batch 8 (as train_step.py)
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

# `python benchmarks/step_profile.py` puts this folder on sys.path: the sibling benchmark imports directly.
from train_step import PAIRS, Runner  # noqa: E402

CATEGORIES = {
    "gemm / attention": {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
                         "aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_flash_attention_for_cpu_backward"},
    "conv": {"aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
             "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"},
    "gelu / norm / softmax": {"aten::gelu", "aten::gelu_backward", "aten::native_layer_norm",
                              "aten::native_layer_norm_backward", "aten::_softmax", "aten::_softmax_backward_data",
                              "aten::_safe_softmax"},
    "layout": {"aten::copy_", "aten::clone", "aten::cat", "aten::stack", "aten::roll", "aten::constant_pad_nd",
               "aten::index", "aten::index_select", "aten::index_put_", "aten::_unsafe_index", "aten::contiguous"},
}
ESSENTIAL = ("gemm / attention", "conv", "gelu / norm / softmax", "optimizer")
ORDER = (*ESSENTIAL, "layout", "other")


def categorise(events) -> dict[str, float]:
    """Self time (ms) per category; ops running inside `Optimizer.step` count as optimizer."""
    totals = defaultdict(float)
    step_spans = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("Optimizer.step")]
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        start = event.time_range.start
        if any(lo <= start <= hi for lo, hi in step_spans):
            category = "optimizer"
        else:
            category = next((c for c, names in CATEGORIES.items() if event.name in names), "other")
        totals[category] += event.self_cpu_time_total / 1e3
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="swin", choices=list(PAIRS))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per model (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device, args.dtype = "cpu", "fp32"
    torch.manual_seed(0)

    names = PAIRS[args.pair]
    runners = {name: Runner(name, args) for name in names}
    for runner in runners.values():
        runner.step()
    totals = {name: defaultdict(float) for name in names}
    for _ in range(args.steps):  # alternate, as train_step.py does
        for name, runner in runners.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runner.step()
            for category, ms in categorise(prof.events()).items():
                totals[name][category] += ms / args.steps

    print(f"torch {torch.__version__}; CPU, {torch.get_num_threads()} threads; fp32; batch {args.batch_size}; "
          f"mean self time per step (ms) over {args.steps} profiled steps\n")
    print(f"{'category':<24}" + "".join(f"{name:>20}" for name in names))
    for category in ORDER:
        print(f"{category:<24}" + "".join(f"{totals[name][category]:>20.1f}" for name in names))
    step = {name: sum(totals[name].values()) for name in names}
    essential = {name: sum(totals[name][c] for c in ESSENTIAL) for name in names}
    print(f"{'total':<24}" + "".join(f"{step[name]:>20.1f}" for name in names))
    print(f"{'essential share':<24}" + "".join(f"{essential[name] / step[name]:>19.1%} " for name in names))
    reference, candidate = names
    print(f"\n{candidate} / {reference}: profiled speed x{step[reference] / step[candidate]:.3f}; the most any "
          f"implementation could gain over {reference} while running its essential kernels at the same speed: "
          f"x{step[reference] / essential[reference]:.3f}")


if __name__ == "__main__":
    main()
