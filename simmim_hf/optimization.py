"""Optimizer parameter groups and learning-rate schedules for SimMIM pretraining and fine-tuning.

Two rules from the paper's recipes (microsoft/SimMIM `optimizer.py`, BEiT):

* **Weight decay** only on matrices: no decay on 1-D parameters (biases, norm weights, LayerScale
  gammas) and on what the official model lists: ViT its CLS token and absolute positions (its mask token and
  relative position tables are decayed), Swin its absolute positions, relative position tables and mask token,
  SwinV2 also its position-bias MLP and logit scales.
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

import logging
import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LRScheduler

logger = logging.getLogger(__name__)

# Parameters whose name contains one of these never get weight decay (in addition to all 1-D parameters): the
# names ViT-family models (timm, BEiT, transformers) give their tokens and position tables. A model that knows its
# recipe's list sets `_no_weight_decay_keywords`, which replaces this one (every SimMIM model does: the official ViT
# decays its mask token and relative position tables, Swin does not).
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
    own = getattr(model, "_no_weight_decay_keywords", None)
    keywords = list(DEFAULT_NO_WEIGHT_DECAY_KEYWORDS if own is None else own) + list(extra or ())
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
      With `warmup_prefix=True` (the official SwinV2 SimMIM code: timm's ``warmup_prefix``) the cosine starts
      after the warmup instead, over the remaining steps, from the peak itself;
    * ``"linear"``: from the peak down to `min_lr` over the steps after the warmup (the official
      ``LinearLRScheduler`` ends each group at 1 % of its own peak instead; no official recipe uses it);
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
        warmup_prefix: bool = False,
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
        self.warmup_prefix = bool(warmup_prefix)
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
        # The share of the steps after the warmup that is done: the linear schedule's, and the prefixed cosine's.
        after_warmup = min(1.0, (step - self.num_warmup_steps) / max(1, self.num_training_steps - self.num_warmup_steps))
        if self.schedule == "linear":
            return peak + (self.min_lr - peak) * after_warmup
        progress = after_warmup if self.warmup_prefix else min(1.0, step / self.num_training_steps)
        return self.min_lr + 0.5 * (peak - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def load_state_dict(self, state_dict: dict) -> None:
        # A state saved before `warmup_prefix` existed ran without it.
        super().load_state_dict({"warmup_prefix": False, **state_dict})

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


# The paper's linear scaling rule: learning rates are given for a total batch of this size (official code:
# `lr * TOTAL_BATCH / 512`).
REFERENCE_BATCH_SIZE = 512


@dataclass(frozen=True)
class LearningRatePlan:
    """What a run's optimisation arguments mean once the data and the world size are known: the one place
    both scripts turn batch sizes, epochs and per-512 learning rates into optimizer steps and absolute rates.

    * total batch = per-device batch x processes x accumulation steps;
    * peak lr = `learning_rate` if given, else `base_learning_rate` x total batch / 512;
    * warmup and final lr = `warmup_lr` / `min_lr` x (peak lr / base lr), so they keep their ratio to the peak
      whether the peak was scaled or given;
    * steps: `max_train_steps`, else epochs x steps per epoch; warmup: `warmup_steps`, else warmup epochs x steps
      per epoch (at most all steps); multistep milestones are epochs (fractions allowed) turned into steps.
    A stream (`steps_per_epoch=None`) counts steps only: `max_train_steps` is required, epochs are unknown."""

    total_batch_size: int
    peak_lr: float
    warmup_lr: float
    min_lr: float
    max_train_steps: int
    warmup_steps: int
    steps_per_epoch: int | None
    milestones: tuple[int, ...]
    lr_given: bool

    @property
    def num_epochs(self) -> int | None:
        return None if self.steps_per_epoch is None else math.ceil(self.max_train_steps / self.steps_per_epoch)

    @classmethod
    def from_args(cls, args, num_processes: int, batches_per_epoch: int | None) -> "LearningRatePlan":
        """`args` carries the `OptimizationArguments` fields; `batches_per_epoch` is the length of one process's
        training DataLoader (None for a stream)."""
        accumulation = args.gradient_accumulation_steps
        total_batch_size = args.per_device_train_batch_size * num_processes * accumulation
        # Accelerate steps the optimizer at the end of the dataloader even mid-accumulation, hence the ceil.
        steps_per_epoch = None if batches_per_epoch is None else math.ceil(batches_per_epoch / accumulation)
        if steps_per_epoch is None and args.max_train_steps is None:
            raise ValueError("`max_train_steps` is required when the epoch length is unknown (a stream).")
        if steps_per_epoch == 0:
            raise ValueError(f"An epoch has no optimizer step: the training set is smaller than one batch of "
                             f"{args.per_device_train_batch_size} per process; lower per_device_train_batch_size.")
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        scaled = args.base_learning_rate * total_batch_size / REFERENCE_BATCH_SIZE
        peak_lr = args.learning_rate if args.learning_rate is not None else scaled
        ratio = peak_lr / args.base_learning_rate if args.base_learning_rate else 1.0
        if args.warmup_steps is not None:
            warmup_steps = args.warmup_steps
        elif steps_per_epoch is None:
            # A stream has no epochs: the warmup takes the share of the run that --warmup_epochs takes of
            # --num_train_epochs (10 of 100 by default), rather than none at all.
            warmup_steps = round(max_train_steps * min(1.0, args.warmup_epochs / max(args.num_train_epochs, 1)))
            logger.info(f"Streaming: warmup of {warmup_steps} steps ({args.warmup_epochs:g} / "
                        f"{args.num_train_epochs} of --max_train_steps); --warmup_steps sets it directly.")
        else:
            warmup_steps = round(args.warmup_epochs * steps_per_epoch)
        milestones = tuple(parse_milestones(args.lr_milestones, steps_per_epoch))
        if any(m >= max_train_steps for m in milestones):
            logger.warning(f"--lr_milestones {args.lr_milestones}: milestone steps {list(milestones)} at or beyond "
                           f"the last step ({max_train_steps}) never lower the lr.")
        return cls(
            total_batch_size=total_batch_size, peak_lr=peak_lr, warmup_lr=args.warmup_lr * ratio,
            min_lr=args.min_lr * ratio, max_train_steps=max_train_steps,
            warmup_steps=min(warmup_steps, max_train_steps), steps_per_epoch=steps_per_epoch,
            milestones=milestones,
            lr_given=args.learning_rate is not None,
        )

    def describe(self) -> str:
        how = "given" if self.lr_given else f"base lr x total batch {self.total_batch_size} / {REFERENCE_BATCH_SIZE}"
        return (f"peak lr {self.peak_lr:.3g} ({how}), warmup {self.warmup_steps} of {self.max_train_steps} steps "
                f"from {self.warmup_lr:.3g}, final lr {self.min_lr:.3g}")


def create_optimizer_and_scheduler(model: torch.nn.Module, args, plan: LearningRatePlan,
                                   layer_decay: float | None = None, fused: bool | None = None):
    """AdamW over `build_param_groups` (weight-decay rules, layer-wise lr decay) and the
    `LayerDecayLRScheduler` of `plan`; frozen parameters (a linear probe's encoder) are left out. `fused` asks for the single-kernel AdamW (which can also skip a non-finite step without a host sync)."""
    groups = build_param_groups(model, args.weight_decay, layer_decay)
    warmup_prefix = args.lr_warmup_prefix
    if warmup_prefix is None:  # the official SwinV2 code starts the cosine after the warmup, microsoft/SimMIM's does not
        encoder_type = getattr(getattr(model, "config", None), "encoder_type", None)
        warmup_prefix = encoder_type == "swinv2" and args.lr_scheduler_type == "cosine"
    for group in groups:  # bookkeeping keys are not optimizer options
        group.pop("param_names", None)
    optimizer = torch.optim.AdamW(groups, lr=plan.peak_lr, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, weight_decay=args.weight_decay, fused=fused)
    scheduler = LayerDecayLRScheduler(
        optimizer, num_training_steps=plan.max_train_steps, num_warmup_steps=plan.warmup_steps,
        schedule=args.lr_scheduler_type, base_lr=plan.peak_lr, warmup_lr=plan.warmup_lr, min_lr=plan.min_lr,
        milestones=plan.milestones, gamma=args.lr_gamma, warmup_prefix=warmup_prefix)
    return optimizer, scheduler


__all__ = [
    "LearningRatePlan",
    "REFERENCE_BATCH_SIZE",
    "create_optimizer_and_scheduler",
    "parse_milestones",
    "DEFAULT_NO_WEIGHT_DECAY_KEYWORDS",
    "LayerDecayLRScheduler",
    "build_optimizer",
    "build_param_groups",
    "layer_decay_scales",
    "wants_weight_decay",
]
