"""Optimizer parameter groups and learning-rate schedules for SimMIM pretraining and fine-tuning.

Two rules from the paper's recipes (microsoft/SimMIM `optimizer.py`, BEiT):

* **Weight decay** only on matrices: no decay on 1-D parameters (biases, norm weights, LayerScale
  gammas), on the learned tokens and on the position / relative-position tables.
* **Layer-wise lr decay** (fine-tuning): the embeddings are layer 0, block ``i`` is layer ``i + 1``
  (counting through all Swin stages) and the final norm / head is layer ``depth + 1`` with
  ``depth = config.num_layers_for_decay``. Each group gets

      lr_scale = layer_decay ** (depth + 1 - layer_id)

  so the head trains at the base lr and every block below at ``layer_decay`` times the block above.
  (The issue writes this as ``decay ** (depth - layer_id)`` counting the head in ``depth``; both name
  the same numbers, e.g. ``scales[layer_id]`` of the official code.)

The scale is applied exactly once: `LayerDecayLRScheduler` sets every group's lr to
``schedule(step) * lr_scale``. The official code stores ``lr = base_lr * scale`` in each group *and*
an ``lr_scale`` key; timm >= 0.9 schedulers multiply their (already scaled) base values by ``lr_scale``
again, so the official code run with a current timm trains with ``scale ** 2``. Here the groups carry
only ``lr_scale`` and the scheduler derives each lr from the optimizer's base lr, so it does not matter
whether a group's initial ``lr`` was pre-scaled.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

# Parameters whose name contains one of these never get weight decay (in addition to all 1-D
# parameters). The model class may extend the list via `_no_weight_decay_keywords`.
DEFAULT_NO_WEIGHT_DECAY_KEYWORDS = (
    "cls_token",
    "mask_token",
    "position_embeddings",
    "relative_position_bias_table",
    "layer_scale",  # LayerScale gammas are 1-D anyway; the keyword also covers 2-D variants
    "lambda_",  # BEiT/official name of the LayerScale parameters
)

SCHEDULES = ("cosine", "linear", "multistep", "constant")


def _no_weight_decay_keywords(model: torch.nn.Module, extra: Iterable[str] | None) -> tuple[str, ...]:
    keywords = list(DEFAULT_NO_WEIGHT_DECAY_KEYWORDS)
    keywords += list(getattr(model, "_no_weight_decay_keywords", ()) or ())
    keywords += list(extra or ())
    return tuple(dict.fromkeys(keywords))  # de-duplicated, order kept


def wants_weight_decay(name: str, param: torch.Tensor, no_decay_keywords: Sequence[str] = DEFAULT_NO_WEIGHT_DECAY_KEYWORDS) -> bool:
    """The official rule: no decay on 1-D tensors, biases and the named tokens / tables."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    return not any(keyword in name for keyword in no_decay_keywords)


def layer_decay_scales(num_layers: int, layer_decay: float) -> list[float]:
    """``scales[layer_id] = layer_decay ** (num_layers + 1 - layer_id)`` for layer ids 0 .. num_layers + 1."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"`layer_decay` must lie in (0, 1]; got layer_decay={layer_decay}.")
    return [layer_decay ** (num_layers + 1 - layer_id) for layer_id in range(num_layers + 2)]


def _resolve_layer_id_fn(model: torch.nn.Module) -> Callable[[str], int]:
    get_layer_id = getattr(model, "get_layer_id_for_lr_decay", None)
    if get_layer_id is None:
        raise ValueError(
            f"Layer-wise lr decay needs `model.get_layer_id_for_lr_decay(name)`, which "
            f"{type(model).__name__} does not define; pass `get_layer_id=` or `layer_decay=None`."
        )
    return get_layer_id


def build_param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    *,
    num_layers: int | None = None,
    get_layer_id: Callable[[str], int] | None = None,
    no_weight_decay_keywords: Iterable[str] | None = None,
) -> list[dict]:
    """Torch optimizer parameter groups with the weight-decay rule and optional layer-wise lr decay.

    Args:
        model: any module; for layer decay it must provide `get_layer_id_for_lr_decay(name)` (every
            SimMIM model does) unless `get_layer_id` is given.
        weight_decay: decay of the parameters that get any (see `wants_weight_decay`).
        layer_decay: per-layer lr decay factor (ViT 0.65, Swin-B 0.9 / 0.8, Swin-L 0.7 in the paper);
            `None` or 1.0 keeps every group at `lr_scale = 1`.
        num_layers: the decay depth; default `model.config.num_layers_for_decay`.
        get_layer_id: override of the name -> layer id mapping.
        no_weight_decay_keywords: extra name keywords that get no weight decay.

    Returns:
        A list of dicts `{"params", "param_names", "weight_decay", "lr_scale", "layer_id", "group_name"}`.
        Every trainable parameter (`requires_grad=True`) is in exactly one group; frozen ones in none.
        No group sets `"lr"`: use `LayerDecayLRScheduler` (or multiply by `lr_scale` yourself, once).
    """
    keywords = _no_weight_decay_keywords(model, no_weight_decay_keywords)
    use_layer_decay = layer_decay is not None and layer_decay != 1.0
    scales = None
    if use_layer_decay:
        get_layer_id = get_layer_id or _resolve_layer_id_fn(model)
        if num_layers is None:
            config = getattr(model, "config", None)
            num_layers = getattr(config, "num_layers_for_decay", None)
            if num_layers is None:
                raise ValueError(
                    "Layer-wise lr decay needs the decay depth: pass `num_layers=` or use a model whose "
                    "`config.num_layers_for_decay` is set."
                )
        scales = layer_decay_scales(num_layers, layer_decay)

    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = wants_weight_decay(name, param, keywords)
        layer_id = None
        scale = 1.0
        if scales is not None:
            layer_id = int(get_layer_id(name))
            if not 0 <= layer_id < len(scales):
                raise ValueError(
                    f"get_layer_id_for_lr_decay({name!r}) returned {layer_id}; expected a layer id in "
                    f"[0, {len(scales) - 1}] (0 = embeddings, num_layers + 1 = head)."
                )
            scale = scales[layer_id]
        group_name = ("" if layer_id is None else f"layer_{layer_id}_") + ("decay" if decay else "no_decay")
        group = groups.get(group_name)
        if group is None:
            group = groups[group_name] = {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "layer_id": layer_id,
                "group_name": group_name,
            }
        group["params"].append(param)
        group["param_names"].append(name)
    # Sorted by layer so logs read bottom-up; the order has no effect on training.
    return sorted(groups.values(), key=lambda g: (g["layer_id"] or 0, g["group_name"]))


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **group_kwargs,
) -> torch.optim.AdamW:
    """AdamW over `build_param_groups` (the paper's optimizer for pretraining and fine-tuning)."""
    groups = build_param_groups(model, weight_decay, layer_decay, **group_kwargs)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class LayerDecayLRScheduler(LRScheduler):
    """Per-step warmup + cosine / linear / multistep / constant schedule that honours ``lr_scale``, shaped as
    the official SimMIM schedules (timm's schedulers as the official code configures them).

    A group with ``lr_scale`` s (missing = 1) peaks at ``base_lr * s``. Over the first `num_warmup_steps` its lr
    rises linearly from `warmup_lr` to that peak; then

    * ``"cosine"``: ``min_lr + (peak - min_lr) * (1 + cos(pi * step / num_training_steps)) / 2``. As timm's
      ``CosineLRScheduler`` without ``warmup_prefix`` the cosine spans *all* steps, warmup included, so it is
      already past its top when the warmup ends (at 20 of 100 epochs: 0.905 x peak);
    * ``"linear"``: from the peak down to `min_lr` over the steps after the warmup;
    * ``"multistep"``: ``peak * gamma ** (number of milestones <= step)``;
    * ``"constant"``: the peak.

    `warmup_lr` and `min_lr` are absolute and the same for every group (as timm's ``warmup_lr_init`` / ``lr_min``),
    not multiplied by ``lr_scale``. `base_lr` defaults to the optimizer's `lr`. The group's own initial ``lr`` is
    ignored, so the scale is applied once even to groups built like the official code (``lr = base_lr * scale``).
    Call `step()` once per optimizer update (the official schedules count updates, not epochs).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_training_steps: int,
        num_warmup_steps: int = 0,
        schedule: str = "cosine",
        base_lr: float | None = None,
        warmup_lr: float = 0.0,
        min_lr: float = 0.0,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        last_epoch: int = -1,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}; got schedule={schedule!r}.")
        if num_training_steps <= 0:
            raise ValueError(f"`num_training_steps` must be positive; got num_training_steps={num_training_steps}.")
        if not 0 <= num_warmup_steps <= num_training_steps:
            raise ValueError(
                f"`num_warmup_steps` must lie in [0, num_training_steps={num_training_steps}]; "
                f"got num_warmup_steps={num_warmup_steps}."
            )
        if schedule == "multistep" and any(m < num_warmup_steps for m in milestones):
            raise ValueError(
                f"`milestones` must not fall inside the warmup (num_warmup_steps={num_warmup_steps}); "
                f"got milestones={list(milestones)}."
            )
        self.num_training_steps = int(num_training_steps)
        self.num_warmup_steps = int(num_warmup_steps)
        self.schedule = schedule
        self.base_lr = float(optimizer.defaults["lr"] if base_lr is None else base_lr)
        self.warmup_lr = float(warmup_lr)
        self.min_lr = float(min_lr)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int, lr_scale: float = 1.0) -> float:
        """The lr of a group with `lr_scale` after `step` optimizer updates."""
        peak = self.base_lr * lr_scale
        if step < self.num_warmup_steps:
            return self.warmup_lr + (peak - self.warmup_lr) * step / self.num_warmup_steps
        if self.schedule == "constant":
            return peak
        if self.schedule == "multistep":
            return peak * self.gamma ** bisect_right(self.milestones, step)
        if self.schedule == "linear":
            span = max(1, self.num_training_steps - self.num_warmup_steps)
            progress = min(1.0, (step - self.num_warmup_steps) / span)
            return peak + (self.min_lr - peak) * progress
        progress = min(1.0, step / self.num_training_steps)
        return self.min_lr + 0.5 * (peak - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch, group.get("lr_scale", 1.0)) for group in self.optimizer.param_groups]


def parse_milestones(text: str | None, steps_per_epoch: int | None = None) -> list[int]:
    """`--lr_milestones`: comma-separated epochs (fractions allowed, e.g. "1.5,3") -> optimizer steps
    (`epoch x steps_per_epoch`, rounded down; with no `steps_per_epoch`, e.g. a stream, the numbers are steps)."""
    if not text:
        return []
    try:
        epochs = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"`lr_milestones` must be comma-separated numbers of epochs; got {text!r}.") from None
    if any(not math.isfinite(e) or e < 0 for e in epochs):
        raise ValueError(f"`lr_milestones` must be finite and >= 0; got {text!r}.")
    return [int(e * (steps_per_epoch or 1)) for e in epochs]


__all__ = [
    "parse_milestones",
    "DEFAULT_NO_WEIGHT_DECAY_KEYWORDS",
    "LayerDecayLRScheduler",
    "build_optimizer",
    "build_param_groups",
    "layer_decay_scales",
    "wants_weight_decay",
]
