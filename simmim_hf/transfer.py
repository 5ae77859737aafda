"""Load a SimMIM checkpoint into a model configured for another image size or window size.

Fine-tuning often runs at a different resolution than pretraining (the paper's Swin recipe pretrains at
192 px with window 6 and fine-tunes at 224 px with window 7; a ViT can be fine-tuned on a finer grid).
Three kinds of tensor depend on the token grid and are mapped here:

* relative position bias tables: a ((2h-1)*(2w-1), heads) grid of biases per relative offset (Swin: per
  window), resized as the official SimMIM fine-tuning code (BEiT's) resizes them: the source offsets are
  spread on a geometric sequence that reaches the target's extent, so the near offsets (+-1, +-2, ...) keep
  their pretrained values, and a cubic spline through them (SciPy's `interp2d`, which SciPy has removed,
  here a not-a-knot spline in torch) is read at the target's integer offsets. The BEiT-style ViT table ends
  with 3 extra rows (cls->token, token->cls, cls->cls) that do not live on the grid; they are kept as they are;
* a ViT relative position bias shared by all blocks (the paper's pretraining setting) is copied into
  every per-block table when the target model asks for per-block biases (the paper's fine-tuning setting);
* absolute position embeddings (1, 1 + N, C): the N patch positions are interpolated bicubically on their
  grid, the CLS position is kept.

Everything else is copied by name. Whatever cannot be mapped (a shape that does not follow from a grid
change, a different number of heads, a per-block bias asked to become shared, checkpoint tensors the
model has no place for, model tensors the checkpoint lacks) is listed by name in the returned
`TransferReport` and logged, never dropped silently. At the original size every tensor is copied
unchanged, so the loaded model computes exactly what the saved one did.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TABLE_SUFFIX = "relative_position_bias_table"
# The BEiT-style ViT table appends cls->token, token->cls and cls->cls rows after the grid.
VIT_EXTRA_TABLE_ROWS = 3


@dataclass
class TransferReport:
    """What `transfer_state_dict` did, by parameter name (target model names)."""

    copied: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)  # "name: (shape) -> (shape)"
    expanded_shared: list[str] = field(default_factory=list)  # per-block tables filled from the shared one
    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint does not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the model has no place for
    mismatched: list[str] = field(default_factory=list)  # present in both but not mappable: "name: why"
    # SwinV2: the pretrained windows set on the model to match the checkpoint's (None: nothing changed)
    pretrained_window_sizes: list[int] | None = None

    def summary(self) -> str:
        lines = [
            f"copied {len(self.copied)} tensors unchanged, interpolated {len(self.interpolated)}, "
            f"filled {len(self.expanded_shared)} per-block relative position tables from the shared one"
        ]
        for title, names in (
            ("interpolated", self.interpolated),
            ("not in the checkpoint (left at their initialisation)", self.missing),
            ("in the checkpoint but unused by this model", self.unexpected),
            ("could NOT be mapped (left at their initialisation)", self.mismatched),
        ):
            if names:
                lines.append(f"{title}: " + ", ".join(names))
        if self.pretrained_window_sizes is not None:
            lines.append(f"SwinV2 pretrained_window_sizes set to {self.pretrained_window_sizes} (the checkpoint's "
                         "position-bias coordinate normalisation)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- tensors
def square_side(count: int, what: str) -> int:
    """Side of a square grid stored flat with `count` entries; a ValueError naming `what` otherwise."""
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{what}: expected a square number of grid entries; got {count}.")
    return side


def resize_relative_position_bias_table(
    table: torch.Tensor, dst_num_rows: int, num_extra_rows: int = 0
) -> torch.Tensor:
    """Resize a (num_rows, heads) relative position bias table to `dst_num_rows` rows.

    The first `num_rows - num_extra_rows` rows form a square (2h-1) x (2w-1) grid of relative offsets
    (row-major, as the index buffers read them); it is resized as the official SimMIM / BEiT fine-tuning code
    does (`_geometric_offsets`, then a cubic spline per head; grids under 4 offsets a side, too few for a cubic
    spline, bicubically). The last `num_extra_rows` rows (the BEiT-style CLS rows) are appended unchanged. A
    table that already has `dst_num_rows` rows is returned as it is.
    """
    if table.ndim != 2:
        raise ValueError(f"`table` must be (num_rows, heads); got shape {tuple(table.shape)}.")
    if table.shape[0] == dst_num_rows:
        return table
    src_side = square_side(table.shape[0] - num_extra_rows, "source relative position table")
    dst_side = square_side(dst_num_rows - num_extra_rows, "target relative position table")
    grid = table[: table.shape[0] - num_extra_rows]
    extra = table[table.shape[0] - num_extra_rows:]
    heads = table.shape[1]
    if src_side < 4:
        # Interpolate in float32 (bicubic is not implemented for every half dtype on CPU).
        resized = F.interpolate(grid.float().T.reshape(1, heads, src_side, src_side), size=(dst_side, dst_side),
                                mode="bicubic", align_corners=False).reshape(heads, dst_side * dst_side).T
    else:
        source = _geometric_offsets(src_side, dst_side)
        target = torch.arange(dst_side, dtype=torch.float64) - (dst_side - 1) / 2
        weights = _cubic_spline_matrix(source, target)  # (dst_side, src_side), the same along both axes
        planes = grid.double().T.reshape(heads, src_side, src_side)
        resized = (weights @ planes @ weights.T).reshape(heads, dst_side * dst_side).T
    return torch.cat([resized.to(table.dtype), extra], dim=0)


def _geometric_offsets(src_side: int, dst_side: int) -> torch.Tensor:
    """Where the official code places the source offsets -n..n (n = src_side // 2) when the target spans
    -m..m (m = dst_side // 2): at 0, +-1, +-(1 + q), +-(1 + q + q^2), ..., with q (found by bisection, as there)
    such that 1 + q + ... + q^(n-1) reaches m."""
    n, m = src_side // 2, dst_side // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q**n) / (1.0 - q) > m:
            right = q
        else:
            left = q
    distances, current = [], 1.0
    for i in range(n):
        distances.append(current)
        current += q ** (i + 1)
    return torch.tensor([-d for d in reversed(distances)] + [0.0] + distances, dtype=torch.float64)


def _cubic_spline_matrix(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """(len(xq), len(x)) float64 matrix W with W @ y = the not-a-knot cubic spline through (x, y) read at xq: the
    spline SciPy's `interp2d(kind="cubic")` / `RectBivariateSpline(s=0)` fit on a grid, one axis at a time, and
    like them (FITPACK) holding its end values beyond the end points. Needs len(x) >= 4."""
    n = x.numel()
    xq = xq.clamp(x[0], x[-1])
    h = x[1:] - x[:-1]
    # Second derivatives M solve A M = B y: continuity of the first derivative inside, not-a-knot at both ends.
    A = torch.zeros(n, n, dtype=torch.float64)
    B = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):
        A[i, i - 1], A[i, i], A[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        B[i, i - 1], B[i, i], B[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    A[0, 0], A[0, 1], A[0, 2] = h[1], -(h[0] + h[1]), h[0]
    A[-1, -3], A[-1, -2], A[-1, -1] = h[-1], -(h[-2] + h[-1]), h[-2]
    second = torch.linalg.solve(A, B)  # M = second @ y
    piece = torch.clamp(torch.searchsorted(x, xq, right=True) - 1, 0, n - 2)
    x0, x1, hq = x[piece], x[piece + 1], h[piece]
    a, b = (x1 - xq) / hq, (xq - x0) / hq  # the piece's linear part, and the cubic corrections below
    rows = torch.arange(xq.numel())
    weights = torch.zeros(xq.numel(), n, dtype=torch.float64)
    weights[rows, piece] += a
    weights[rows, piece + 1] += b
    curvature = ((a**3 - a) * hq**2 / 6)[:, None] * second[piece] + ((b**3 - b) * hq**2 / 6)[:, None] * second[piece + 1]
    return weights + curvature


def resize_position_embeddings(
    position_embeddings: torch.Tensor, dst_num_positions: int, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Resize (1, prefix + N, C) absolute position embeddings to (1, prefix + N', C); the N patch positions
    form a square grid and are interpolated bicubically, the prefix (CLS) positions are kept."""
    if position_embeddings.ndim != 3:
        raise ValueError(f"position embeddings must be (1, tokens, C); got shape {tuple(position_embeddings.shape)}.")
    if position_embeddings.shape[1] == dst_num_positions:
        return position_embeddings
    prefix = position_embeddings[:, :num_prefix_tokens]
    patches = position_embeddings[:, num_prefix_tokens:]
    src_side = square_side(patches.shape[1], "source position embeddings")
    dst_side = square_side(dst_num_positions - num_prefix_tokens, "target position embeddings")
    channels = patches.shape[-1]
    grid = patches.float().reshape(1, src_side, src_side, channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst_side, dst_side), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, dst_side * dst_side, channels).to(position_embeddings.dtype)
    return torch.cat([prefix, patches], dim=1)


# ---------------------------------------------------------------------------------------------- state dicts
def _align_prefix(state_dict: dict[str, torch.Tensor], target_keys: set[str], prefix: str | None) -> dict:
    """Bring checkpoint names to the target's naming: a bare encoder (`SimMIMModel`) checkpoint into a
    model with a head gets the `simmim.` prefix; a checkpoint with a head into a bare encoder loses it
    (its head tensors then stay unprefixed and end up reported as unexpected)."""
    if not prefix:
        return dict(state_dict)
    p = prefix + "."
    target_prefixed = any(k.startswith(p) for k in target_keys)
    source_prefixed = any(k.startswith(p) for k in state_dict)
    if target_prefixed and not source_prefixed:
        return {(p + k if p + k in target_keys or k.startswith(("embeddings.", "encoder.", "layernorm.")) else k): v
                for k, v in state_dict.items()}
    if source_prefixed and not target_prefixed:
        return {k.removeprefix(p): v for k, v in state_dict.items()}
    return dict(state_dict)


def _is_table(name: str) -> bool:
    return name.endswith(TABLE_SUFFIX)


def _is_shared_vit_table(name: str) -> bool:
    # `...encoder.relative_position_bias.relative_position_bias_table` (not under `layers.{i}`).
    return _is_table(name) and name.split(".")[-3] == "encoder"


def transfer_state_dict(
    state_dict: dict[str, torch.Tensor], model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], TransferReport]:
    """Map a SimMIM checkpoint's tensors onto `model` (any SimMIM class, any image / window size).

    Returns the state dict to load (only tensors of the right shape, every one of the model's names it
    could fill) and a `TransferReport`. Use `model.load_state_dict(new_state_dict, strict=False)`, or
    `load_pretrained_for_transfer` which does that and logs the report.
    """
    config = model.config
    target = model.state_dict()
    source = _align_prefix(state_dict, set(target), getattr(model, "base_model_prefix", None))
    num_extra_rows = VIT_EXTRA_TABLE_ROWS if config.encoder_type == "vit" else 0
    report = TransferReport()
    out: dict[str, torch.Tensor] = {}

    # A shared ViT table in the checkpoint, per-block tables in the model: copy it into every block.
    shared_names = [k for k in source if _is_shared_vit_table(k) and k not in target]
    per_block_targets = [k for k in target if _is_table(k) and not _is_shared_vit_table(k) and k not in source]
    expanded_from: str | None = None
    if config.encoder_type == "vit" and len(shared_names) == 1 and per_block_targets:
        expanded_from = shared_names[0]

    def place(name: str, tensor: torch.Tensor, origin: str) -> bool:
        """Put `tensor` (from checkpoint name `origin`) at model name `name`; False if it cannot be mapped."""
        dst = target[name]
        if tensor.shape == dst.shape:
            out[name] = tensor
            if origin == name:
                report.copied.append(name)
            return True
        why = None
        if _is_table(name):
            if tensor.ndim != 2 or tensor.shape[1] != dst.shape[1]:
                why = f"checkpoint {tuple(tensor.shape)} vs model {tuple(dst.shape)} (different number of heads)"
            else:
                try:
                    out[name] = resize_relative_position_bias_table(tensor, dst.shape[0], num_extra_rows)
                except ValueError as err:
                    why = f"checkpoint {tuple(tensor.shape)} vs model {tuple(dst.shape)} ({err})"
        elif name.endswith("position_embeddings"):
            if tensor.ndim != 3 or tensor.shape[-1] != dst.shape[-1]:
                why = f"checkpoint {tuple(tensor.shape)} vs model {tuple(dst.shape)} (different width)"
            else:
                try:
                    # ViT's table starts with the CLS token's row; Swin's is the patch grid alone.
                    out[name] = resize_position_embeddings(tensor, dst.shape[1],
                                                           num_prefix_tokens=1 if config.encoder_type == "vit" else 0)
                except ValueError as err:
                    why = f"checkpoint {tuple(tensor.shape)} vs model {tuple(dst.shape)} ({err})"
        else:
            why = f"checkpoint {tuple(tensor.shape)} vs model {tuple(dst.shape)}"
        if why is not None:
            report.mismatched.append(f"{name} (from {origin}): {why}" if origin != name else f"{name}: {why}")
            return False
        report.interpolated.append(f"{name}: {tuple(tensor.shape)} -> {tuple(out[name].shape)}")
        return True

    unmapped: set[str] = set()
    for name, tensor in source.items():
        if name in target:
            if not place(name, tensor, name):
                unmapped.add(name)
        elif name != expanded_from:
            report.unexpected.append(name)
    if expanded_from is not None:
        for name in per_block_targets:
            # clone: each block fine-tunes its own copy
            if place(name, source[expanded_from].clone(), expanded_from):
                report.expanded_shared.append(name)
            else:
                unmapped.add(name)
    report.missing = [name for name in target if name not in out and name not in unmapped]
    if config.encoder_type == "vit" and any(_is_shared_vit_table(k) for k in target) and not any(
        _is_shared_vit_table(k) for k in source
    ) and any(_is_table(k) for k in source):
        # Per-block tables cannot be merged into one shared table without changing the model.
        logger.warning("The checkpoint has per-block relative position tables but the model asks for a shared one; "
                       "they are not merged (see `unexpected` / `missing`).")
    return out, report


# ---------------------------------------------------------------------------------------------- SwinV2
# A SwinV2 checkpoint holds no grid-sized tensor: the continuous position bias MLP maps relative coordinates to
# biases at any window, and the coordinate tables and indices are buffers rebuilt from the config. What must carry
# over is the normalisation of those coordinates: the pretrained model divided each stage's offsets by its own
# window (or by its `pretrained_window_sizes`), so a model fine-tuned at another window divides by the same number
# (official: window 12 at 192 px -> fine-tuning at window 14 with pretrained_window_sizes [12, 12, 12, 6]).
def swinv2_pretrained_window_sizes(source_config) -> list[int]:
    """Per stage, the window a SwinV2 checkpoint's position-bias coordinates were normalised by: its own
    `pretrained_window_sizes` where set, else the window the stage attended in (`stage_window_sizes`). A 1x1 window
    normalises nothing and maps to 0."""
    own = list(source_config.pretrained_window_sizes or [0] * len(source_config.depths))
    windows = [p if p > 0 else w for p, w in zip(own, source_config.stage_window_sizes)]
    return [w if w > 1 else 0 for w in windows]


def align_swinv2_pretrained_windows(model: torch.nn.Module, source_config, report: TransferReport | None = None
                                    ) -> list[int] | None:
    """Give a SwinV2 `model` the coordinate normalisation of the checkpoint it is about to load.

    Where the model's stages already normalise as the checkpoint did (same windows, or matching
    `pretrained_window_sizes`) nothing changes. Otherwise, if the model's `pretrained_window_sizes` is unset (None or
    all 0), it is set to `swinv2_pretrained_window_sizes(source_config)` in `model.config` and every attention's
    coordinate table is rebuilt; returns the new list (also in `report.pretrained_window_sizes`). An explicit,
    different setting is left alone and listed in `report.mismatched`.
    """
    config = model.config
    if config.encoder_type != "swinv2" or getattr(source_config, "encoder_type", None) != "swinv2":
        return None
    wanted = swinv2_pretrained_window_sizes(source_config)
    if len(wanted) != len(config.depths):
        return None  # a different stage layout; its tensors are reported by `transfer_state_dict`
    current = swinv2_pretrained_window_sizes(config)
    if current == wanted:
        return None
    if any(config.pretrained_window_sizes or []):
        if report is not None:
            report.mismatched.append(
                f"pretrained_window_sizes: the model normalises position-bias coordinates by {current}, the checkpoint "
                f"by {wanted}; the model's explicit pretrained_window_sizes={config.pretrained_window_sizes} is kept")
        return None
    config.pretrained_window_sizes = wanted
    prefix = getattr(model, "base_model_prefix", "simmim")
    encoder = getattr(model, prefix, model).encoder
    for stage, window in zip(encoder.stages, wanted):
        for block in stage.blocks:
            block.attention.set_pretrained_window_size(window)
    if report is not None:
        report.pretrained_window_sizes = wanted
    return wanted


def _source_config(pretrained: str, **hub_kwargs):
    """The SimMIMConfig saved next to a checkpoint (folder or Hub repo), or None where there is none."""
    from .configuration_simmim import SimMIMConfig

    if os.path.isfile(str(pretrained)):
        candidate = os.path.join(os.path.dirname(str(pretrained)), "config.json")
        pretrained = os.path.dirname(str(pretrained)) if os.path.isfile(candidate) else None
    if pretrained is None:
        return None
    try:
        return SimMIMConfig.from_pretrained(pretrained, **hub_kwargs)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- loading
def load_checkpoint_state_dict(pretrained_model_name_or_path: str, **hub_kwargs) -> dict[str, torch.Tensor]:
    """Read the safetensors weights of a local `save_pretrained` folder, a `.safetensors` file or a Hub
    repo (single file or sharded). Never unpickles anything."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import load_file

    path = str(pretrained_model_name_or_path)
    if os.path.isfile(path):
        return load_file(path)

    def fetch(filename: str) -> str | None:
        if os.path.isdir(path):
            candidate = os.path.join(path, filename)
            return candidate if os.path.isfile(candidate) else None
        try:
            return hf_hub_download(path, filename, **hub_kwargs)
        except EntryNotFoundError:
            return None

    single = fetch("model.safetensors")
    if single is not None:
        return load_file(single)
    index = fetch("model.safetensors.index.json")
    if index is None:
        raise FileNotFoundError(
            f"No model.safetensors or model.safetensors.index.json in {path!r}; SimMIM checkpoints are "
            "loaded from safetensors only (convert official .pth checkpoints first)."
        )
    with open(index, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state_dict: dict[str, torch.Tensor] = {}
    for shard in shards:
        state_dict.update(load_file(fetch(shard)))
    return state_dict


def load_pretrained_for_transfer(
    model: torch.nn.Module,
    pretrained: str | dict[str, torch.Tensor],
    strict: bool = False,
    pretrained_config=None,
    **hub_kwargs,
) -> TransferReport:
    """Load `pretrained` (path, Hub id or state dict) into `model`, adapting grid-dependent tensors.

    With `strict=True` a tensor that could not be mapped, or an encoder tensor the checkpoint lacks, is an
    error. Heads missing from the checkpoint (a fresh classifier) are always allowed, and checkpoint tensors
    the model has no place for (the SimMIM reconstruction head) are reported, not an error.

    SwinV2: the model's position-bias coordinates are normalised as the checkpoint's were (see
    `align_swinv2_pretrained_windows`), using `pretrained_config` or else the config saved with `pretrained`.
    """
    state_dict = pretrained if isinstance(pretrained, dict) else load_checkpoint_state_dict(pretrained, **hub_kwargs)
    new_state_dict, report = transfer_state_dict(state_dict, model)
    if getattr(model.config, "encoder_type", None) == "swinv2":
        if pretrained_config is None and not isinstance(pretrained, dict):
            pretrained_config = _source_config(pretrained, **hub_kwargs)
        if pretrained_config is not None:
            align_swinv2_pretrained_windows(model, pretrained_config, report)
        else:
            logger.warning("SwinV2: no config for the checkpoint, so its window is unknown; the model keeps "
                           "pretrained_window_sizes=%s (pass pretrained_config= to match it).",
                           model.config.pretrained_window_sizes)
    prefix = getattr(model, "base_model_prefix", "") + "."
    # The mask token is pretraining-only and the pooling layer (a ViT classifier's `fc_norm`) is part of the head.
    missing_encoder = [k for k in report.missing
                       if k.startswith(prefix) and "mask_token" not in k and not k.startswith(prefix + "pooler.")]
    if strict and (report.mismatched or missing_encoder):
        raise ValueError("Checkpoint does not map onto the model:\n" + report.summary())
    model.load_state_dict(new_state_dict, strict=False)
    (logger.warning if report.mismatched else logger.info)("Loaded pretrained weights: %s", report.summary())
    return report


__all__ = [
    "TransferReport",
    "align_swinv2_pretrained_windows",
    "swinv2_pretrained_window_sizes",
    "load_checkpoint_state_dict",
    "load_pretrained_for_transfer",
    "resize_position_embeddings",
    "resize_relative_position_bias_table",
    "transfer_state_dict",
]
