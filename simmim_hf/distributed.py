"""Distributed strategies on the CPU: what Accelerate does not do by itself.

On a machine without an accelerator, `Accelerator(cpu=True)` turns every launched config into `MULTI_CPU` DDP
over gloo. FSDP2 (`fully_shard`) does run on the CPU over gloo, so an FSDP2 config keeps its strategy
(`use_fsdp_on_cpu`); strategies that cannot run there (FSDP1, DeepSpeed, Megatron-LM) are refused up front with
what to do instead (`check_cpu_strategy`) rather than silently becoming DDP. `wrap_present_layers_only` lets one
FSDP config serve every encoder family on any device.
"""

from __future__ import annotations

import os


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def check_cpu_strategy(has_accelerator: bool = False) -> None:
    """Refuse, before any process group exists, an `accelerate launch` config whose strategy cannot run on the CPU.

    With `cpu=True` Accelerate turns every distributed config into `MULTI_CPU` DDP over gloo; only FSDP2 is
    brought back (`use_fsdp_on_cpu`). FSDP1 cannot run on the CPU (torch: "FSDP needs a non-CPU accelerator
    device"; Accelerate's plugin: "no available devices found"); DeepSpeed and Megatron-LM would silently train
    as DDP. They stop here, with what to do instead."""
    fix = ("Launch it on GPUs, set `fsdp_version: 2` in an FSDP config (FSDP2 runs on the CPU over gloo, e.g. "
           "examples/accelerate_configs/fsdp.yaml), or launch plain DDP on the CPU (`accelerate launch --multi_gpu "
           "--num_processes N`, which becomes MULTI_CPU here).")
    where = ("--cpu was passed on a machine with an accelerator" if has_accelerator
             else "this machine has no GPU/XPU/MPS, so the job runs on the CPU")
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(f"The accelerate config asks for distributed_type DEEPSPEED but {where}: Accelerate would "
                         f"silently fall back to DistributedType.MULTI_CPU (DDP, no ZeRO sharding). {fix}")
    if _env_flag("ACCELERATE_USE_MEGATRON_LM"):
        raise ValueError(f"The accelerate config asks for distributed_type MEGATRON_LM but {where}. {fix}")
    if _env_flag("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ValueError(f"The accelerate config asks for distributed_type FSDP with fsdp_version {version} but "
                             f"{where}: FSDP1 needs a GPU (torch and Accelerate refuse it on the CPU), and "
                             f"Accelerate would fall back to DistributedType.MULTI_CPU (DDP, no sharding). {fix}")
        if has_accelerator:
            raise ValueError(f"The accelerate config asks for distributed_type FSDP but {where}: FSDP would build "
                             "its device mesh on the accelerator. Drop --cpu to shard on the accelerator, or launch "
                             "on a machine without one (FSDP2 on the CPU).")


def use_fsdp_on_cpu(accelerator) -> None:
    """Keep the FSDP2 strategy of the accelerate config on a machine without an accelerator.

    Accelerate only turns a launched run into `DistributedType.FSDP` on GPU-like devices; on the CPU it stays
    `MULTI_CPU` (DDP over gloo) and drops the plugin. FSDP2 (`fully_shard`) works on the CPU over gloo in
    torch >= 2.6 (DTensor shards, full and sharded state dicts), so the state is switched to FSDP with the
    plugin read from the launcher's `FSDP_*` variables, as Accelerate does on a GPU. No-op unless the config asked
    for FSDP (`check_cpu_strategy` already refused FSDP1) and the processes formed a gloo group."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not _env_flag("ACCELERATE_USE_FSDP") or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` set
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def wrap_present_layers_only(accelerator) -> None:
    """Let one FSDP config serve every preset: Accelerate's TRANSFORMER_BASED_WRAP raises for a listed layer class
    the model lacks (`fsdp_transformer_layer_cls_to_wrap: SimMIMViTLayer,SimMIMSwinLayer`, or the default, the
    model's `_no_split_modules`, on a ViT). Keep the listed classes the model has; none: Accelerate's error."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type != DistributedType.FSDP or plugin is None:
        return
    set_policy = plugin.set_auto_wrap_policy

    def set_auto_wrap_policy(model):
        names = plugin.transformer_cls_names_to_wrap or getattr(model, "_no_split_modules", None) or []
        present = {type(module).__name__ for module in model.modules()}
        if any(name in present for name in names):
            plugin.transformer_cls_names_to_wrap = [name for name in names if name in present]
        set_policy(model)

    plugin.set_auto_wrap_policy = set_auto_wrap_policy


__all__ = ["check_cpu_strategy", "use_fsdp_on_cpu", "wrap_present_layers_only"]
