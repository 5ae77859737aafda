"""Convert SimMIM checkpoints into `SimMIMForMaskedImageModeling`.

Two sources are supported:

* ``official``: checkpoints of the official SimMIM code (microsoft/SimMIM), a ``.pth`` holding
  ``{'model': state_dict, 'epoch', 'max_accuracy', 'config': yacs CfgNode, ...}`` (a bare state dict,
  ``.bin`` and ``.safetensors`` are accepted too). The architecture is inferred from the state dict
  itself; the few settings it cannot reveal (masking recipe, LayerNorm epsilon) come from the pickled
  config when present, or from keyword overrides / CLI flags.
* ``transformers``: `ViTForMaskedImageModeling` and `SwinForMaskedImageModeling` models or checkpoint
  folders, converted into the equivalent simmim_hf configuration (plain ViT: absolute positions, full qkv
  bias, no LayerScale, CLS pooling; Swin v1); also `Swinv2ForMaskedImageModeling` and `Swinv2Model` (SwinV2).

Official SwinV2 checkpoints (microsoft/Swin-Transformer's SimMIM, e.g. the released data-scaling zoo on the Hub,
``zdaxie/SimMIM``) are recognised by their keys (`cpb_mlp`, or the older `rpe_mlp`); a ``--checkpoint`` of the form
``hf://<repo>/<path>`` is downloaded first. Their recipe settings not in the weights default to the official SwinV2
SimMIM recipe (local target normalisation k = 47).

Pickled files are read with a restricted unpickler: only tensors, plain containers and a short allowlist
of harmless globals are rebuilt; anything else (e.g. a `__reduce__` calling `os.system`) is refused before
it can run. yacs is not needed; a pickled `CfgNode` becomes a plain dict.

Command line (writes a `save_pretrained` folder with safetensors weights, config with `auto_map` and the
model code, loadable with `trust_remote_code=True`):

    python -m simmim_hf.convert --source official --checkpoint simmim_pretrain_swin_base.pth --output out/
    python -m simmim_hf.convert --source transformers --checkpoint path/to/vit-mim --output out/
    python -m simmim_hf.convert --source official \
        --checkpoint hf://zdaxie/SimMIM/simmim_swinv2_pretrain_models/swinv2_base_1k_500k.pth --output out/
"""

from __future__ import annotations

import argparse
import codecs
import collections
import importlib
import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download

from .configuration_simmim import SimMIMConfig
from .modeling_simmim import SimMIMForMaskedImageModeling, SimMIMModel
from .transfer import square_side

logger = logging.getLogger(__name__)

SOURCES = ("official", "transformers")


# ---------------------------------------------------------------------------------------------- safe loading
class _CfgNodeStandIn(dict):
    """Takes the place of `yacs.config.CfgNode` while unpickling (a dict subclass with some attributes)."""


def _numpy_global(module: str, name: str):
    # numpy 2 moved `numpy.core` to `numpy._core`; checkpoints written with either name must load.
    import numpy

    if name == "dtype":
        return numpy.dtype
    for candidate in (module, module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"{module}.{name}")


# (module, name) -> how to resolve it. Everything here only builds data: tensors from storages torch has
# already read, containers, and numpy scalars (official checkpoints store `max_accuracy` as one).
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): lambda m, n: collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): lambda m, n: getattr(importlib.import_module(m), n),
    ("torch._utils", "_rebuild_tensor_v2"): lambda m, n: getattr(importlib.import_module(m), n),
    ("torch._utils", "_rebuild_parameter"): lambda m, n: getattr(importlib.import_module(m), n),
    ("torch", "Size"): lambda m, n: torch.Size,
    ("builtins", "set"): lambda m, n: set,
    ("builtins", "frozenset"): lambda m, n: frozenset,
    ("builtins", "slice"): lambda m, n: slice,
    ("__builtin__", "set"): lambda m, n: set,
    ("numpy", "dtype"): _numpy_global,
    ("numpy.core.multiarray", "scalar"): _numpy_global,
    ("numpy._core.multiarray", "scalar"): _numpy_global,
    # Pickle protocol 2 (torch.save's) stores a numpy scalar's raw bytes through `_codecs.encode`.
    ("_codecs", "encode"): lambda m, n: codecs.encode,
    ("yacs.config", "CfgNode"): lambda m, n: _CfgNodeStandIn,
}
# numpy pickles dtypes as `numpy.dtype` plus the class of the scalar type on numpy >= 1.25 / 2.x.
_NUMPY_DTYPE_CLASS = re.compile(r"^numpy\.(_core\.|core\.)?(dtypes|multiarray)$")


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint references a global outside the allowlist; it was not loaded."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allowlisted globals.

    `torch.load` subclasses `pickle_module.Unpickler` and resolves its own storage types (names containing
    "Storage") before delegating here, so tensors load while any other global is refused.
    """

    def find_class(self, module: str, name: str):
        resolver = _ALLOWED_GLOBALS.get((module, name))
        if resolver is None and _NUMPY_DTYPE_CLASS.match(module) and name.endswith("DType"):
            resolver = _numpy_global
        if resolver is None:
            raise UnsafeCheckpointError(f"{module}.{name}")
        return resolver(module, name)


class _RestrictedPickleModule:
    """The `pickle_module` handed to `torch.load` (it needs `Unpickler`, `load` and `__name__`)."""

    __name__ = "simmim_hf_restricted_pickle"
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def _plain(obj: Any) -> Any:
    """Turn `CfgNode` stand-ins (and nested ones) into plain dicts."""
    if isinstance(obj, _CfgNodeStandIn):
        return {key: _plain(value) for key, value in obj.items()}
    return obj


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without executing pickled code.

    `.safetensors` files are read directly; `.pth`, `.pt`, `.bin` and `.ckpt` (torch pickles) go through a
    restricted unpickler that rebuilds tensors, plain containers, numpy scalars and yacs `CfgNode`s (as
    dicts) and refuses every other global. Returns the unpickled object (usually a dict).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"`checkpoint` {str(path)!r} is a directory; an official SimMIM checkpoint is one file (.pth, .pt, .bin, "
            ".ckpt or .safetensors): pass the file inside it. (A transformers model folder converts with "
            "--source transformers / convert_transformers_checkpoint.)"
        )
    if not path.is_file():
        raise ValueError(f"`checkpoint` must be an existing file; got {str(path)!r}, which does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"Could not read {str(path)!r} as a safetensors file (truncated or not one?): "
                             f"{error}") from error
    try:
        checkpoint = torch.load(path, map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False)
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(
            f"Refusing to load {str(path)!r}: its pickle references the global `{error}`, which is not on the "
            "allowlist (tensors, OrderedDict, numpy scalars, yacs CfgNode). Loading it could execute arbitrary "
            "code. If you trust the file, re-save its state dict as .safetensors and convert that instead."
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:  # OSError: a truncated zip archive
        raise ValueError(f"Could not read {str(path)!r} as a torch checkpoint (truncated or not one?): {error}") \
            from error
    if isinstance(checkpoint, dict):
        checkpoint = {key: _plain(value) for key, value in checkpoint.items()}
    return checkpoint


def _state_dict_of(checkpoint: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside an official checkpoint (`{'model': ...}`) or a bare state dict."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        state_dict = checkpoint["model"]
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        state_dict = checkpoint["state_dict"]
    else:
        state_dict = checkpoint
    if not isinstance(state_dict, dict) or not state_dict or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        raise ValueError(
            f"{str(path)!r} holds no state dict: expected {{'model': state_dict, ...}} or a mapping of names to "
            f"tensors; got {type(checkpoint).__name__}"
            + (f" with keys {list(checkpoint)[:8]}." if isinstance(checkpoint, dict) else ".")
        )
    # Checkpoints saved from a DistributedDataParallel wrapper prefix every name with "module.".
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


# ---------------------------------------------------------------------------------------------- helpers
def _square_side(count: int, what: str) -> int:
    try:
        return square_side(count, what)
    except ValueError as err:
        raise ValueError(f"Cannot infer the image size: {err}") from None


def _table_side(rows: int, extra: int, what: str) -> int:
    """Grid side g of a relative position bias table with (2g-1)^2 + extra rows."""
    span = math.isqrt(rows - extra)
    if span * span != rows - extra or span % 2 == 0:
        raise ValueError(f"{what} has {rows} rows, not (2g-1)^2 + {extra} for any grid side g.")
    return (span + 1) // 2


def _count_indices(state_dict: dict, pattern: str) -> int:
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(pattern, key))}
    if indices != set(range(len(indices))):
        raise ValueError(f"Non-contiguous block indices {sorted(indices)} for pattern {pattern!r}.")
    return len(indices)


# The paper masks 32 px units at 192 px (a 6x6 grid of units); below that the unit shrinks with the image.
_PAPER_MASK_PATCH_SIZE, _PAPER_IMAGE_SIZE, _MIN_MASK_UNITS_PER_SIDE = 32, 192, 4


def _default_mask_patch_size(image_size: int, patch_size: int) -> int:
    """A masking unit that leaves enough units for `mask_ratio` to mean something.

    At >= 192 px the paper's 32 px unit (or the valid unit closest to it); below, the unit scales with the
    image (`32 * image_size / 192`, the paper's 6x6 grid of units), always a multiple of the model patch that
    divides the image and leaves at least 4x4 units. (A 32 px unit on a 32 px image is one unit: every image
    would be masked 100 %.) Refuses, with the way out, when even the model patch leaves fewer than 4x4 units.
    """
    target = _PAPER_MASK_PATCH_SIZE if image_size >= _PAPER_IMAGE_SIZE else \
        _PAPER_MASK_PATCH_SIZE * image_size / _PAPER_IMAGE_SIZE
    candidates = [m for m in range(patch_size, image_size + 1, patch_size)
                  if image_size % m == 0 and image_size // m >= _MIN_MASK_UNITS_PER_SIDE]
    if not candidates:
        raise ValueError(
            f"Cannot choose a default mask_patch_size for image_size={image_size}, patch_size={patch_size}: even "
            f"the model patch leaves {image_size // patch_size}x{image_size // patch_size} masking units (fewer than "
            f"{_MIN_MASK_UNITS_PER_SIDE}x{_MIN_MASK_UNITS_PER_SIDE}), too few for mask_ratio to hold. Pass "
            "mask_patch_size=... (--mask_patch_size) explicitly."
        )
    return min(candidates, key=lambda m: (abs(m - target), -m))


def _merge_overrides(inferred: dict, overrides: dict, source: str) -> dict:
    """Apply user overrides, refusing those that contradict what the weights prove."""
    for key, value in overrides.items():
        if value is None:
            continue
        if key in inferred and inferred[key] != value and key in _ARCHITECTURE_FIELDS:
            raise ValueError(
                f"Override {key}={value!r} contradicts the {source} checkpoint, whose weights imply "
                f"{key}={inferred[key]!r}."
            )
        inferred[key] = value
    return inferred


# Fields read off the weights' shapes; an override may not change them.
_ARCHITECTURE_FIELDS = {
    "encoder_type", "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
    "num_attention_heads", "intermediate_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio",
    "qkv_bias", "use_key_bias", "use_absolute_position_embeddings", "use_shared_relative_position_bias",
    "use_relative_position_bias", "patch_norm",
}


def _build_config(kwargs: dict, origin: str) -> SimMIMConfig:
    try:
        return SimMIMConfig(**kwargs)
    except ValueError as error:
        raise ValueError(f"The architecture inferred from {origin} is not a valid SimMIMConfig: {error}") from error


# ---------------------------------------------------------------------------------------------- official
def _official_config_hints(node: dict | None) -> dict:
    """Settings from the official yacs config (`DATA.*`, `MODEL.*`) that the state dict cannot reveal."""
    if not isinstance(node, dict):
        return {}
    data, model = node.get("DATA", {}) or {}, node.get("MODEL", {}) or {}
    data, model = (part if isinstance(part, dict) else {} for part in (data, model))  # malformed: no hints
    hints = {
        "encoder_type": model.get("TYPE"),
        "image_size": data.get("IMG_SIZE"),
        "mask_patch_size": data.get("MASK_PATCH_SIZE"),
        "mask_ratio": data.get("MASK_RATIO"),
        "drop_path_rate": model.get("DROP_PATH_RATE"),
    }
    return {key: value for key, value in hints.items() if value is not None}


def _infer_official_vit(sd: dict) -> tuple[dict, list]:
    """Architecture and key mapping of the official BEiT-style ViT (`encoder.blocks.i.*`)."""
    width, channels, patch, _ = sd["encoder.patch_embed.proj.weight"].shape
    depth = _count_indices(sd, r"encoder\.blocks\.(\d+)\.")
    shared = "encoder.rel_pos_bias.relative_position_bias_table" in sd
    per_block = "encoder.blocks.0.attn.relative_position_bias_table" in sd
    ape = "encoder.pos_embed" in sd
    if "encoder.blocks.0.attn.q_bias" in sd:
        # The official ViT learns q and v biases only (its key bias is a constant zero).
        qkv_bias, key_bias = True, "encoder.blocks.0.attn.k_bias" in sd
    else:
        qkv_bias = key_bias = "encoder.blocks.0.attn.qkv.bias" in sd

    grid = None
    heads = None
    table_key = "encoder.rel_pos_bias.relative_position_bias_table" if shared else \
        "encoder.blocks.0.attn.relative_position_bias_table" if per_block else None
    if table_key is not None:
        rows, heads = sd[table_key].shape
        grid = _table_side(rows, 3, table_key)
    if ape:
        pos_grid = _square_side(sd["encoder.pos_embed"].shape[1] - 1, "encoder.pos_embed (minus CLS)")
        if grid is not None and grid != pos_grid:
            raise ValueError(f"encoder.pos_embed implies a {pos_grid}x{pos_grid} grid, the bias table {grid}x{grid}.")
        grid = pos_grid

    arch = dict(
        encoder_type="vit", num_channels=channels, patch_size=patch, hidden_size=width, num_hidden_layers=depth,
        intermediate_size=sd["encoder.blocks.0.mlp.fc1.weight"].shape[0], qkv_bias=qkv_bias, use_key_bias=key_bias,
        use_absolute_position_embeddings=ape, use_shared_relative_position_bias=shared,
        use_relative_position_bias=per_block,
        # Only the presence of LayerScale matters: its values are loaded from the checkpoint.
        layer_scale_init_value=0.1 if "encoder.blocks.0.gamma_1" in sd else 0.0,
    )
    if grid is not None:
        arch["image_size"] = grid * patch
    if heads is not None:
        arch["num_attention_heads"] = heads

    rules = [
        (r"encoder\.patch_embed\.proj\.", "simmim.embeddings.projection."),
        (r"encoder\.cls_token$", "simmim.embeddings.cls_token"),
        (r"encoder\.mask_token$", "simmim.embeddings.mask_token"),
        (r"encoder\.pos_embed$", "simmim.embeddings.position_embeddings"),
        (r"encoder\.rel_pos_bias\.", "simmim.encoder.relative_position_bias."),
        (r"encoder\.blocks\.(\d+)\.gamma_(\d)$", r"simmim.encoder.layers.\1.lambda_\2"),
        (r"encoder\.blocks\.(\d+)\.norm1\.", r"simmim.encoder.layers.\1.layernorm_before."),
        (r"encoder\.blocks\.(\d+)\.norm2\.", r"simmim.encoder.layers.\1.layernorm_after."),
        (r"encoder\.blocks\.(\d+)\.attn\.relative_position_",
         r"simmim.encoder.layers.\1.attention.relative_position_bias.relative_position_"),
        (r"encoder\.blocks\.(\d+)\.attn\.", r"simmim.encoder.layers.\1.attention."),
        (r"encoder\.blocks\.(\d+)\.mlp\.", r"simmim.encoder.layers.\1.mlp."),
        (r"encoder\.norm\.", "simmim.layernorm."),
        (r"decoder\.", "decoder."),
    ]
    return arch, rules


def _infer_official_swin(sd: dict) -> tuple[dict, list]:
    """Architecture and key mapping of the official Swin v1 (`encoder.layers.s.blocks.b.*`)."""
    embed_dim, channels, patch, _ = sd["encoder.patch_embed.proj.weight"].shape
    num_stages = _count_indices(sd, r"encoder\.layers\.(\d+)\.")
    depths = [_count_indices(sd, rf"encoder\.layers\.{s}\.blocks\.(\d+)\.") for s in range(num_stages)]
    prefix = "encoder.layers.{}.blocks.{}.attn."
    heads, windows = [], []
    for s in range(num_stages):
        rows, h = sd[prefix.format(s, 0) + "relative_position_bias_table"].shape
        heads.append(h)
        windows.append(_table_side(rows, 0, prefix.format(s, 0) + "relative_position_bias_table"))
    # A stage smaller than the window attends over the whole stage (smaller table): the first stage's
    # table has the configured window unless even stage 0 is that small.
    window = max(windows)

    # Resolution: a shifted block's attention mask has one entry per window, (res/w)^2.
    resolution = None
    for s in range(num_stages):
        for b in range(depths[s]):
            key = f"encoder.layers.{s}.blocks.{b}.attn_mask"
            if key in sd:
                side = _square_side(sd[key].shape[0], key) * windows[s]
                resolution = side * 2**s
                break
        if resolution is not None:
            break
    if resolution is None and "encoder.absolute_pos_embed" in sd:
        resolution = _square_side(sd["encoder.absolute_pos_embed"].shape[1], "encoder.absolute_pos_embed")
    if resolution is None:
        # No shifted block anywhere: every stage is at most one window. A shrunken table gives its stage size.
        for s, w in enumerate(windows):
            if w < window:
                resolution = w * 2**s
                break

    fc1 = sd["encoder.layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    has_qkv_bias = (prefix.format(0, 0) + "qkv.bias") in sd
    arch = dict(
        encoder_type="swin", num_channels=channels, patch_size=patch, embed_dim=embed_dim, depths=depths,
        num_heads=heads, window_size=window, mlp_ratio=fc1 / embed_dim, qkv_bias=has_qkv_bias,
        use_key_bias=has_qkv_bias,
        use_absolute_position_embeddings="encoder.absolute_pos_embed" in sd,
        patch_norm="encoder.patch_embed.norm.weight" in sd,
    )
    if resolution is not None:
        arch["image_size"] = resolution * patch

    rules = [
        (r"encoder\.patch_embed\.proj\.", "simmim.embeddings.projection."),
        (r"encoder\.patch_embed\.norm\.", "simmim.embeddings.norm."),
        (r"encoder\.mask_token$", "simmim.embeddings.mask_token"),
        (r"encoder\.absolute_pos_embed$", "simmim.embeddings.position_embeddings"),
        (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.norm1\.", r"simmim.encoder.stages.\1.blocks.\2.layernorm_before."),
        (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.norm2\.", r"simmim.encoder.stages.\1.blocks.\2.layernorm_after."),
        (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_",
         r"simmim.encoder.stages.\1.blocks.\2.attention.relative_position_bias.relative_position_"),
        (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.", r"simmim.encoder.stages.\1.blocks.\2.attention."),
        (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn_mask$", r"simmim.encoder.stages.\1.blocks.\2.shift_mask"),
        (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.", r"simmim.encoder.stages.\1.blocks.\2.mlp."),
        (r"encoder\.layers\.(\d+)\.downsample\.", r"simmim.encoder.stages.\1.downsample."),
        (r"encoder\.norm\.", "simmim.layernorm."),
        (r"decoder\.", "decoder."),
    ]
    return arch, rules


def _rename(state_dict: dict, rules: list, origin: str) -> dict:
    renamed = {}
    unmapped = []
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            if re.match(pattern, key):
                renamed[re.sub(pattern, replacement, key, count=1)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"{origin}: {len(unmapped)} tensors have no counterpart in simmim_hf: {unmapped[:10]}")
    return renamed


def _split_fused_qkv_bias(state_dict: dict) -> dict:
    """Swin/timm-style `attention.qkv.bias` (3C) -> our separate q/k/v biases."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attention.qkv.bias"):
            base = key[: -len("qkv.bias")]
            for name, part in zip(("q_bias", "k_bias", "v_bias"), value.chunk(3)):
                out[base + name] = part
        else:
            out[key] = value
    return out


def _check_and_drop_buffers(model: SimMIMForMaskedImageModeling, state_dict: dict, origin: str) -> dict:
    """Index buffers and Swin shift masks are recomputed by simmim_hf, so they are not stored. Comparing the
    checkpoint's copies with ours proves the inferred architecture (grid, window, shift) is the right one."""
    buffers = dict(model.named_buffers())
    kept = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index") or key.endswith("shift_mask"):
            ours = buffers.get(key)
            if ours is None or ours.shape != value.shape or not torch.equal(ours.to(value.dtype), value):
                raise ValueError(
                    f"{origin}: the stored buffer for {key!r} (shape {tuple(value.shape)}) does not match the one "
                    f"simmim_hf computes for the inferred architecture "
                    f"({'missing' if ours is None else tuple(ours.shape)}); the image/window size was inferred wrongly "
                    "or must be given explicitly."
                )
            continue
        kept[key] = value
    return kept


def convert_official_checkpoint(path: str | Path, **overrides) -> SimMIMForMaskedImageModeling:
    """Load an official SimMIM pretraining checkpoint (ViT or Swin) as `SimMIMForMaskedImageModeling`.

    The architecture is read off the state dict: encoder type, widths, depths and heads (from the relative
    position bias tables), patch size (conv kernel), image size (relative position index, Swin attention
    masks or position embeddings), window size, LayerScale, shared vs per-block relative bias, absolute
    positions and the qkv bias style. Settings the weights do not reveal come from the checkpoint's pickled
    config (`DATA.MASK_PATCH_SIZE`, `DATA.MASK_RATIO`, `DATA.IMG_SIZE`, `MODEL.DROP_PATH_RATE`) when present
    and otherwise from `overrides` (any `SimMIMConfig` field, e.g. `mask_patch_size=32`, `layer_norm_eps=1e-6`),
    which also take precedence. An override that contradicts the weights is a ValueError.

    Args:
        path: `.pth` / `.bin` (read with a restricted unpickler) or `.safetensors`.
        **overrides: `SimMIMConfig` fields.

    Returns:
        The model in eval mode, its weights loaded with `strict=True`.
    """
    path = resolve_checkpoint_reference(path)
    checkpoint = load_checkpoint_file(path)
    state_dict = _state_dict_of(checkpoint, path)
    hints = _official_config_hints(checkpoint.get("config") if isinstance(checkpoint, dict) else None)
    origin = f"official checkpoint {str(path)!r}"

    try:
        if "encoder.patch_embed.proj.weight" in state_dict and any(k.startswith("encoder.blocks.") for k in state_dict):
            arch, rules = _infer_official_vit(state_dict)
        elif _is_official_swinv2(state_dict):
            arch, rules = _infer_official_swinv2(state_dict)
        elif "encoder.patch_embed.proj.weight" in state_dict and any(k.startswith("encoder.layers.") for k in state_dict):
            arch, rules = _infer_official_swin(state_dict)
        else:
            raise ValueError(
                f"{origin} is not a SimMIM pretraining state dict: expected 'encoder.patch_embed.proj.weight' with "
                f"'encoder.blocks.*' (ViT) or 'encoder.layers.*' (Swin); got keys {list(state_dict)[:8]}."
            )
    except KeyError as missing:  # a key the architecture is read from: a truncated or edited state dict
        raise ValueError(f"{origin} lacks {missing}, which its architecture is read from; is the file complete?") \
            from None
    if "decoder.0.weight" not in state_dict:
        raise ValueError(f"{origin} has no SimMIM decoder ('decoder.0.weight'); is it a fine-tuned classifier?")

    if hints.get("encoder_type", arch["encoder_type"]) != arch["encoder_type"]:
        raise ValueError(
            f"{origin}: its config says MODEL.TYPE={hints['encoder_type']!r} but the weights are a "
            f"{arch['encoder_type']!r} encoder."
        )
    hints.pop("encoder_type", None)
    if "image_size" in hints and "image_size" in arch and hints["image_size"] != arch["image_size"]:
        raise ValueError(
            f"{origin}: its config says DATA.IMG_SIZE={hints['image_size']} but the weights imply "
            f"image_size={arch['image_size']}."
        )
    kwargs = {**hints, **arch}
    kwargs = _merge_overrides(kwargs, overrides, "official")
    if arch["encoder_type"] == "swinv2":
        kwargs = _swinv2_settings(kwargs, arch, checkpoint.get("config") if isinstance(checkpoint, dict) else None,
                                  origin)
    if kwargs.get("norm_target_patch_size") == 0:  # 0 (the CLI's "off") switches the target normalisation off
        kwargs["norm_target_patch_size"] = None
    if "image_size" not in kwargs:
        raise ValueError(f"{origin}: cannot infer the image size from the weights; pass image_size=... (--image_size).")
    if arch["encoder_type"] == "vit" and "num_attention_heads" not in kwargs:
        raise ValueError(
            f"{origin}: a ViT without relative position bias does not reveal its head count; pass "
            "num_attention_heads=... (--num_attention_heads)."
        )
    kwargs.setdefault("mask_patch_size", _default_mask_patch_size(kwargs["image_size"], kwargs["patch_size"]))

    config = _build_config(kwargs, origin)
    model = SimMIMForMaskedImageModeling(config)
    renamed = _split_fused_qkv_bias(_rename(state_dict, rules, origin))
    renamed = _check_and_drop_coords_tables(model, renamed, origin)
    renamed = _check_and_drop_buffers(model, renamed, origin)
    _load_strict(model, renamed, origin, _source_names(state_dict, rules, origin))
    return model.eval()


def _source_names(state_dict: dict, rules: list, origin: str) -> dict:
    """simmim_hf name -> the checkpoint's own name (for error messages): the names go through `_rename` itself,
    and a fused `qkv.bias` stands for the q/k/v biases `_split_fused_qkv_bias` makes of it."""
    names = _rename({key: key for key in state_dict}, rules, origin)
    split = {new[: -len("qkv.bias")] + f"{n}_bias": old
             for new, old in names.items() if new.endswith("attention.qkv.bias") for n in "qkv"}
    return {**names, **split}


def _load_strict(model: torch.nn.Module, state_dict: dict, origin: str, names: dict | None = None) -> None:
    names = names or {}
    expected = {key: value.shape for key, value in model.state_dict().items()}
    # Checked before loading: `load_state_dict` raises a bare RuntimeError on the first size mismatch.
    mismatched = [k for k, v in state_dict.items() if k in expected and tuple(expected[k]) != tuple(v.shape)]
    if mismatched:
        details = "; ".join(
            (f"{names[k]!r} (simmim_hf {k!r})" if names.get(k, k) != k else repr(k))
            + f": expected shape {tuple(expected[k])}, got {tuple(state_dict[k].shape)}"
            for k in mismatched[:10])
        raise ValueError(
            f"{origin}: {len(mismatched)} tensor(s) do not have the shape the inferred architecture needs "
            f"({details}). The checkpoint is inconsistent (edited or truncated?) or not a SimMIM model."
        )
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{origin} does not fit the inferred architecture: missing {result.missing_keys[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}."
        )


# ---------------------------------------------------------------------------------------------- official SwinV2
# microsoft/Swin-Transformer's SimMIM (`SwinTransformerV2ForSimMIM`), e.g. the released data-scaling zoo. The CPB MLP
# is resolution-free, so the window and image size come from the stored buffers (relative coordinate tables, index,
# shift masks) when present, else from the pickled config, else from the official SwinV2 SimMIM recipe.
# Recipe settings the weights cannot reveal: 192 px, window 12, local target normalisation k = 47 (the masking unit,
# 32 px at 192, and ratio 0.6 are the generic defaults). Every one can be overridden (CLI flags).
SWINV2_RECIPE_DEFAULTS = {"image_size": 192, "window_size": 12, "norm_target_patch_size": 47}
# The released zoo is hosted on the Hub; `--checkpoint` also takes a file reference there.
SWINV2_ZOO_REPO = "zdaxie/SimMIM"
_SWINV2_ATTENTION_KEY = re.compile(r"encoder\.layers\.\d+\.blocks\.\d+\.attn\.(logit_scale$|cpb_mlp\.|rpe_mlp\.)")


def _is_official_swinv2(sd: dict) -> bool:
    return "encoder.patch_embed.proj.weight" in sd and any(_SWINV2_ATTENTION_KEY.match(key) for key in sd)


def _coords_table_pretrained_window(table: torch.Tensor, window: int) -> int:
    """The pretrained window a stored SwinV2 coordinate table was normalised by (0 when by its own window): its
    largest coordinate, log2(1 + 8 (w-1) / (p-1)) / 3, solved for p."""
    largest = table.abs().max().item()
    if window == 1 or largest == 0:
        return 0
    span = round(8 * (window - 1) / (2 ** (3 * largest) - 1))
    return 0 if span + 1 == window else span + 1


def _infer_official_swinv2(sd: dict) -> tuple[dict, list]:
    """Architecture and key mapping of the official SwinV2 (`encoder.layers.s.blocks.b.attn.cpb_mlp.*`; older
    checkpoints name the CPB MLP `rpe_mlp`)."""
    embed_dim, channels, patch, _ = sd["encoder.patch_embed.proj.weight"].shape
    num_stages = _count_indices(sd, r"encoder\.layers\.(\d+)\.")
    depths = [_count_indices(sd, rf"encoder\.layers\.{s}\.blocks\.(\d+)\.") for s in range(num_stages)]
    heads = [sd[f"encoder.layers.{s}.blocks.0.attn.logit_scale"].shape[0] for s in range(num_stages)]

    # Per stage: the window (from any stored buffer), the pretrained window (from the coordinate table) and the
    # token grid side (a shift mask has one entry per window, (side / w)^2).
    windows, pretrained, sides = {}, {}, {}
    for s in range(num_stages):
        for b in range(depths[s]):
            attn = f"encoder.layers.{s}.blocks.{b}.attn."
            if attn + "relative_coords_table" in sd:
                table = sd[attn + "relative_coords_table"]
                window = (table.shape[1] + 1) // 2
                windows[s] = window
                pretrained[s] = _coords_table_pretrained_window(table, window)
            elif attn + "relative_position_index" in sd:
                index = attn + "relative_position_index"
                windows[s] = _square_side(sd[index].shape[0], index)
            mask_key = f"encoder.layers.{s}.blocks.{b}.attn_mask"
            if mask_key in sd:
                windows[s] = _square_side(sd[mask_key].shape[-1], mask_key)
                sides[s] = _square_side(sd[mask_key].shape[0], mask_key) * windows[s]

    fc1 = sd["encoder.layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    arch = dict(
        encoder_type="swinv2", num_channels=channels, patch_size=patch, embed_dim=embed_dim, depths=depths,
        num_heads=heads, mlp_ratio=fc1 / embed_dim, qkv_bias="encoder.layers.0.blocks.0.attn.q_bias" in sd,
        use_key_bias=False, use_absolute_position_embeddings="encoder.absolute_pos_embed" in sd,
        patch_norm="encoder.patch_embed.norm.weight" in sd,
    )
    if windows:
        arch["window_size"] = max(windows.values())
    if sides:
        s = min(sides)
        arch["image_size"] = sides[s] * 2**s * patch
    elif "encoder.absolute_pos_embed" in sd:
        positions = sd["encoder.absolute_pos_embed"].shape[1]
        arch["image_size"] = _square_side(positions, "encoder.absolute_pos_embed") * patch
    if any(pretrained.values()):
        arch["pretrained_window_sizes"] = [pretrained.get(s, 0) for s in range(num_stages)]

    block = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
    target = r"simmim.encoder.stages.\1.blocks.\2."
    rules = [
        (r"encoder\.patch_embed\.proj\.", "simmim.embeddings.projection."),
        (r"encoder\.patch_embed\.norm\.", "simmim.embeddings.norm."),
        (r"encoder\.mask_token$", "simmim.embeddings.mask_token"),
        (r"encoder\.absolute_pos_embed$", "simmim.embeddings.position_embeddings"),
        (block + r"norm1\.", target + "attention_output_norm."),
        (block + r"norm2\.", target + "mlp_output_norm."),
        (block + r"attn\.(rpe|cpb)_mlp\.", target + "attention.cpb_mlp."),
        (block + r"attn\.", target + "attention."),
        (block + r"attn_mask$", target + "shift_mask"),
        (block + r"mlp\.", target + "mlp."),
        (r"encoder\.layers\.(\d+)\.downsample\.", r"simmim.encoder.stages.\1.downsample."),
        (r"encoder\.norm\.", "simmim.layernorm."),
        (r"decoder\.", "decoder."),
    ]
    return arch, rules


def _official_swinv2_hints(node: dict | None) -> dict:
    """`MODEL.SWINV2.WINDOW_SIZE` and `MODEL.SIMMIM.NORM_TARGET` of the official yacs config, where present (0 for a
    disabled target normalisation). `PRETRAINED_WINDOW_SIZES` is not read: the official SimMIM model ignores it."""
    if not isinstance(node, dict):
        return {}
    model = node.get("MODEL") or {}
    hints = {}
    window = (model.get("SWINV2") or {}).get("WINDOW_SIZE")
    if window is not None:
        hints["window_size"] = window
    target = (model.get("SIMMIM") or {}).get("NORM_TARGET")
    if isinstance(target, dict) and "ENABLE" in target:
        hints["norm_target_patch_size"] = target.get("PATCH_SIZE", 47) if target["ENABLE"] else 0
    return hints


def _swinv2_settings(kwargs: dict, arch: dict, node: dict | None, origin: str) -> dict:
    """Fill what a SwinV2 checkpoint's weights leave open: pickled config, then the official recipe."""
    hints = _official_swinv2_hints(node)
    if "window_size" in hints and "window_size" in arch and "image_size" in kwargs:
        # The buffers give each stage's effective window, min(window, stage side): the config must produce them.
        sides = [kwargs["image_size"] // (kwargs["patch_size"] * 2**s) for s in range(len(arch["depths"]))]
        stored = [min(arch["window_size"], side) for side in sides]
        if [min(hints["window_size"], side) for side in sides] != stored:
            raise ValueError(f"{origin}: its config says MODEL.SWINV2.WINDOW_SIZE={hints['window_size']} but the "
                             f"stored buffers imply windows {stored}.")
        if kwargs["window_size"] == arch["window_size"]:
            kwargs["window_size"] = hints["window_size"]
    for key, value in {**SWINV2_RECIPE_DEFAULTS, **hints}.items():
        kwargs.setdefault(key, value)
    return kwargs


def _check_and_drop_coords_tables(model: SimMIMForMaskedImageModeling, state_dict: dict, origin: str) -> dict:
    """SwinV2 stores its CPB coordinate tables as (1, 2w-1, 2w-1, 2); simmim_hf rebuilds them (flat). They must agree:
    that proves the inferred window and pretrained window of every block."""
    buffers = dict(model.named_buffers())
    kept = {}
    for key, value in state_dict.items():
        if not key.endswith("relative_coords_table"):
            kept[key] = value
            continue
        ours = buffers.get(key)
        # At the stored precision: a release cast to half precision rounded its coordinates too.
        tolerance = max(1e-6, torch.finfo(value.dtype).eps) if value.is_floating_point() else 1e-6
        if ours is None or ours.numel() != value.numel() or not torch.allclose(
                ours.to(value.dtype).float(), value.reshape(ours.shape).float(), rtol=0, atol=tolerance):
            raise ValueError(
                f"{origin}: the stored buffer for {key!r} (shape {tuple(value.shape)}) does not match the one "
                f"simmim_hf computes for the inferred window / pretrained window "
                f"({'missing' if ours is None else tuple(ours.shape)}); pass window_size / image_size explicitly."
            )
    return kept


def resolve_checkpoint_reference(checkpoint: str | Path, **hub_kwargs) -> Path:
    """A local checkpoint path, or a file on the Hub downloaded (and cached) with `huggingface_hub`:

    * `hf://<repo_id>[@<revision>]/<path in repo>`, e.g.
      `hf://zdaxie/SimMIM/simmim_swinv2_pretrain_models/swinv2_base_1k_500k.pth`;
    * a Hub file URL, `https://huggingface.co/<repo_id>/resolve/<revision>/<path>` (`?download=true` allowed), as
      the official MODELHUB.md links the zoo.

    The downloaded file is read like a local one (restricted unpickler: no pickled code runs).
    """
    text = str(checkpoint)
    match = re.fullmatch(r"hf://([^/@]+/[^/@]+)(?:@([^/]+))?/(.+)", text) or re.fullmatch(
        r"https://huggingface\.co/([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/([^?]+)(?:\?.*)?", text)
    if match is None:
        return Path(checkpoint)
    repo_id, revision, filename = match.groups()
    return Path(hf_hub_download(repo_id, filename, revision=revision, **hub_kwargs))


# ---------------------------------------------------------------------------------------------- transformers
def _as_int(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"simmim_hf needs a square `{name}`; got {name}={value!r}.")
        value = value[0]
    return int(value)


def _fuse_qkv(state_dict: dict, prefix: str, target: str, out: dict, key_bias: bool) -> None:
    """Separate q/k/v projections -> one fused `qkv.weight` (rows q, k, v) and q/k/v biases."""
    out[f"{target}.qkv.weight"] = torch.cat([state_dict.pop(f"{prefix}.{n}_proj.weight") for n in "qkv"])
    for n in "qkv":
        bias = state_dict.pop(f"{prefix}.{n}_proj.bias", None)
        if bias is not None and (n != "k" or key_bias):
            out[f"{target}.{n}_bias"] = bias
    out[f"{target}.proj.weight"] = state_dict.pop(f"{prefix}.o_proj.weight")
    out[f"{target}.proj.bias"] = state_dict.pop(f"{prefix}.o_proj.bias")


def _common_fields(hf_config) -> dict:
    return dict(
        image_size=_as_int(hf_config.image_size, "image_size"), patch_size=_as_int(hf_config.patch_size, "patch_size"),
        num_channels=hf_config.num_channels, hidden_act=hf_config.hidden_act,
        hidden_dropout_prob=hf_config.hidden_dropout_prob,
        attention_probs_dropout_prob=hf_config.attention_probs_dropout_prob,
        layer_norm_eps=hf_config.layer_norm_eps, initializer_range=hf_config.initializer_range,
        qkv_bias=hf_config.qkv_bias, use_key_bias=hf_config.qkv_bias,
        init_recipe="transformers",  # any tensor a later transfer leaves fresh is drawn as transformers would
    )


def _check_decoder_stride(hf_config, derived: int, origin: str) -> None:
    if hf_config.encoder_stride != derived:
        raise ValueError(
            f"{origin}: config.encoder_stride={hf_config.encoder_stride} but the encoder downsamples by {derived}; "
            "its reconstruction would not match the input size, so it cannot be converted."
        )


def _convert_transformers_vit(model, origin: str) -> tuple[dict, dict]:
    c = model.config
    kwargs = dict(
        encoder_type="vit", hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        use_absolute_position_embeddings=True, use_shared_relative_position_bias=False,
        use_relative_position_bias=False, layer_scale_init_value=0.0, pooling="cls", **_common_fields(c),
    )
    _check_decoder_stride(c, kwargs["patch_size"], origin)
    sd = dict(model.state_dict())
    out = {
        "simmim.embeddings.cls_token": sd.pop("vit.embeddings.cls_token"),
        "simmim.embeddings.mask_token": sd.pop("vit.embeddings.mask_token"),
        "simmim.embeddings.position_embeddings": sd.pop("vit.embeddings.position_embeddings"),
    }
    for name in ("weight", "bias"):
        out[f"simmim.embeddings.projection.{name}"] = sd.pop(f"vit.embeddings.patch_embeddings.projection.{name}")
        out[f"simmim.layernorm.{name}"] = sd.pop(f"vit.layernorm.{name}")
        out[f"decoder.0.{name}"] = sd.pop(f"decoder.0.{name}")
    for i in range(c.num_hidden_layers):
        src, dst = f"vit.layers.{i}", f"simmim.encoder.layers.{i}"
        _fuse_qkv(sd, f"{src}.attention", f"{dst}.attention", out, key_bias=True)
        for part in ("layernorm_before", "layernorm_after", "mlp.fc1", "mlp.fc2"):
            for name in ("weight", "bias"):
                out[f"{dst}.{part}.{name}"] = sd.pop(f"{src}.{part}.{name}")
    return kwargs, _finish(sd, out, origin)


def _require_one_layer_norm_eps(config, origin: str, family: str) -> None:
    # transformers' Swin and Swinv2 hard-code eps=1e-5 for the patch-embedding norm but use config.layer_norm_eps
    # elsewhere; simmim_hf uses one epsilon throughout.
    if config.layer_norm_eps != 1e-5:
        raise ValueError(
            f"{origin}: {family}Config.layer_norm_eps={config.layer_norm_eps}, but transformers' {family} always uses "
            "1e-5 in its patch-embedding norm; simmim_hf uses one epsilon, so only layer_norm_eps=1e-5 converts "
            "exactly."
        )


def _convert_transformers_swin(model, origin: str) -> tuple[dict, dict]:
    c = model.config
    _require_one_layer_norm_eps(c, origin, "Swin")
    depths = list(c.depths)
    kwargs = dict(
        encoder_type="swin", embed_dim=c.embed_dim, depths=depths, num_heads=list(c.num_heads),
        window_size=c.window_size, mlp_ratio=c.mlp_ratio, drop_path_rate=c.drop_path_rate,
        use_absolute_position_embeddings=c.use_absolute_embeddings, patch_norm=True, **_common_fields(c),
    )
    _check_decoder_stride(c, kwargs["patch_size"] * 2 ** (len(depths) - 1), origin)
    sd = dict(model.state_dict())
    out = {"simmim.embeddings.mask_token": sd.pop("swin.embeddings.mask_token")}
    if c.use_absolute_embeddings:
        out["simmim.embeddings.position_embeddings"] = sd.pop("swin.embeddings.position_embeddings")
    _convert_swin_stem_and_merging(sd, out, depths, "swin.", "simmim.", decoder=True)
    for s, depth in enumerate(depths):
        for b in range(depth):
            src, dst = f"swin.encoder.layers.{s}.blocks.{b}", f"simmim.encoder.stages.{s}.blocks.{b}"
            _fuse_qkv(sd, f"{src}.attention", f"{dst}.attention", out, key_bias=True)
            table = "attention.relative_position_bias.relative_position_bias_table"
            out[f"{dst}.{table}"] = sd.pop(f"{src}.{table}")
            for part in ("layernorm_before", "layernorm_after", "mlp.fc1", "mlp.fc2"):
                for name in ("weight", "bias"):
                    out[f"{dst}.{part}.{name}"] = sd.pop(f"{src}.{part}.{name}")
    return kwargs, _finish(sd, out, origin)


def _convert_swin_stem_and_merging(sd: dict, out: dict, depths: list, src_root: str, dst_root: str,
                                   decoder: bool) -> None:
    """Move the tensors transformers' Swin and Swinv2 name alike from `sd` to `out`: the patch embedding and its
    norm, the final norm, the SimMIM decoder (`decoder`) and every stage's patch merging."""
    for name in ("weight", "bias"):
        out[f"{dst_root}embeddings.projection.{name}"] = sd.pop(
            f"{src_root}embeddings.patch_embeddings.projection.{name}")
        out[f"{dst_root}embeddings.norm.{name}"] = sd.pop(f"{src_root}embeddings.norm.{name}")
        out[f"{dst_root}layernorm.{name}"] = sd.pop(f"{src_root}layernorm.{name}")
        if decoder:
            out[f"decoder.0.{name}"] = sd.pop(f"decoder.0.{name}")
    for s in range(len(depths) - 1):
        src, dst = f"{src_root}encoder.layers.{s}.downsample", f"{dst_root}encoder.stages.{s}.downsample"
        out[f"{dst}.reduction.weight"] = sd.pop(f"{src}.reduction.weight")
        for name in ("weight", "bias"):
            out[f"{dst}.norm.{name}"] = sd.pop(f"{src}.norm.{name}")


def _finish(leftover: dict, out: dict, origin: str) -> dict:
    leftover = [k for k in leftover if not k.endswith(("relative_position_index", "attn_mask"))]
    if leftover:
        raise ValueError(f"{origin}: {len(leftover)} tensors were not converted: {leftover[:10]}")
    return out


def _check_swin_index_buffers(hf_model, model: SimMIMForMaskedImageModeling, origin: str) -> None:
    """transformers keeps its relative position indices as (non-persistent) buffers: compare with ours."""
    ours = dict(model.named_buffers())
    for name, buffer in hf_model.named_buffers():
        if not name.endswith("relative_position_index"):
            continue
        match = re.match(r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\..*relative_position_index$", name)
        if match is None:
            continue
        key = (f"simmim.encoder.stages.{match.group(1)}.blocks.{match.group(2)}."
               "attention.relative_position_bias.relative_position_index")
        # transformers stores the (N, N) index flattened.
        if key not in ours or ours[key].numel() != buffer.numel() or \
                not torch.equal(ours[key].reshape(-1), buffer.reshape(-1).to(ours[key].dtype)):
            raise ValueError(f"{origin}: relative position index of {name} differs from simmim_hf's {key}.")


def _source_normalisation(path) -> dict:
    """The input normalisation the source was trained with (`image_mean` / `image_std` of its local
    preprocessor_config.json), which the converted model's config and processor then keep; {} without one."""
    import json

    file = Path(str(path)) / "preprocessor_config.json"
    if not file.is_file():
        return {}
    saved = json.loads(file.read_text(encoding="utf-8"))
    return {key: list(saved[key]) for key in ("image_mean", "image_std")
            if isinstance(saved.get(key), (list, tuple)) and len(saved[key]) == 3}


def convert_transformers_checkpoint(model_or_path, **overrides) -> SimMIMForMaskedImageModeling:
    """Convert transformers' `ViTForMaskedImageModeling` or `SwinForMaskedImageModeling` into simmim_hf.

    Args:
        model_or_path: a model instance, or a folder / Hub id that `from_pretrained` can load.
        **overrides: non-architecture `SimMIMConfig` fields, e.g. `mask_patch_size`, `mask_ratio`
            (defaults: 32 px masking units at >= 192 px, smaller units scaled with the image below that,
            see `_default_mask_patch_size`; and 0.6).

    ViT converts to the plain-ViT options (absolute positions, full qkv bias, no LayerScale, CLS pooling),
    Swin to Swin v1; the separate q/k/v projections are concatenated into the fused qkv projection.
    Differences that cannot be represented (transformers pads Swin stages that the window does not divide,
    simmim_hf requires divisibility; encoder_stride not equal to the real downsampling) are ValueErrors.
    """
    from transformers import (
        PreTrainedModel,
        SwinForMaskedImageModeling,
        Swinv2ForMaskedImageModeling,
        Swinv2Model,
        ViTForMaskedImageModeling,
    )

    if isinstance(model_or_path, PreTrainedModel):
        hf_model, origin = model_or_path, f"transformers model {type(model_or_path).__name__}"
    else:
        hf_model, origin = _load_transformers_model(model_or_path), f"transformers checkpoint {str(model_or_path)!r}"
    if isinstance(hf_model, ViTForMaskedImageModeling):
        kwargs, state_dict = _convert_transformers_vit(hf_model, origin)
    elif isinstance(hf_model, SwinForMaskedImageModeling):
        kwargs, state_dict = _convert_transformers_swin(hf_model, origin)
    elif isinstance(hf_model, (Swinv2ForMaskedImageModeling, Swinv2Model)):
        kwargs, state_dict = _convert_transformers_swinv2(hf_model, origin)
    else:
        raise ValueError(
            f"`model_or_path` must be a ViTForMaskedImageModeling or SwinForMaskedImageModeling, or a "
            f"Swinv2ForMaskedImageModeling or Swinv2Model; got {type(hf_model).__name__} ({origin})."
        )
    if not isinstance(model_or_path, PreTrainedModel):
        kwargs.update(_source_normalisation(model_or_path))
    kwargs = _merge_overrides(kwargs, overrides, "transformers")
    kwargs.setdefault("mask_patch_size", _default_mask_patch_size(kwargs["image_size"], kwargs["patch_size"]))
    config = _build_config(kwargs, origin)
    # A bare encoder (Swinv2Model) has no SimMIM head to convert: it becomes the bare encoder, SimMIMModel.
    model = SimMIMModel(config) if isinstance(hf_model, Swinv2Model) else SimMIMForMaskedImageModeling(config)
    if isinstance(hf_model, SwinForMaskedImageModeling):
        _check_swin_index_buffers(hf_model, model, origin)
    if isinstance(hf_model, (Swinv2ForMaskedImageModeling, Swinv2Model)):
        _check_swinv2_buffers(hf_model, model, origin)
    _load_strict(model, state_dict, origin)
    return model.eval()


def _load_transformers_model(path):
    from transformers import (
        AutoConfig,
        SwinForMaskedImageModeling,
        Swinv2ForMaskedImageModeling,
        Swinv2Model,
        ViTForMaskedImageModeling,
    )

    local = Path(path)
    if local.is_file():
        raise ValueError(
            f"`checkpoint` {str(path)!r} is a file; --source transformers expects a model folder (with config.json) "
            "or a Hub id. An official SimMIM .pth converts with --source official."
        )
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(f"`checkpoint` {str(path)!r} is not a transformers model folder (no config.json).")
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as error:
        raise ValueError(
            f"`checkpoint` {str(path)!r} is neither a transformers model folder nor a reachable Hub id: {error}"
        ) from error
    classes = {"vit": ViTForMaskedImageModeling, "swin": SwinForMaskedImageModeling,
               # A Swinv2 checkpoint of another head (e.g. a classifier) converts as its encoder.
               "swinv2": Swinv2ForMaskedImageModeling
               if "Swinv2ForMaskedImageModeling" in (config.architectures or []) else Swinv2Model}
    if config.model_type not in classes:
        raise ValueError(
            f"{str(path)!r} has model_type={config.model_type!r}; expected one of {sorted(classes)} "
            "(transformers' ViT, Swin or Swinv2 for masked image modeling, or a Swinv2 encoder)."
        )
    architectures = config.architectures or []
    if config.model_type in ("vit", "swin") and not any(a.endswith("ForMaskedImageModeling") for a in architectures):
        # Loading it as a masked-image-modeling model would give a freshly random decoder, converted as if trained.
        raise ValueError(
            f"{str(path)!r} is a {architectures or config.model_type} checkpoint without the SimMIM decoder; "
            f"--source transformers converts {config.model_type.capitalize()}ForMaskedImageModeling checkpoints "
            "(for fine-tuning from other weights, load them into SimMIMForImageClassification by hand).")
    # float32: the checks compare rebuilt buffers (SwinV2's coordinate tables) with ours at float32 precision.
    return classes[config.model_type].from_pretrained(path, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------- transformers SwinV2
def _convert_transformers_swinv2(model, origin: str) -> tuple[dict, dict]:
    """`Swinv2ForMaskedImageModeling` (encoder under `swinv2.`, SimMIM decoder) or a bare `Swinv2Model`."""
    from transformers import Swinv2Model

    c = model.config
    _require_one_layer_norm_eps(c, origin, "Swinv2")
    if c.use_absolute_embeddings:
        raise ValueError(
            f"{origin}: use_absolute_embeddings=True. transformers' Swinv2 sizes these embeddings for one token more "
            "than its patch grid and cannot add them in its forward, so there is no working model to convert."
        )
    depths = list(c.depths)
    pretrained = list(c.pretrained_window_sizes or [])[: len(depths)]
    kwargs = dict(
        encoder_type="swinv2", embed_dim=c.embed_dim, depths=depths, num_heads=list(c.num_heads),
        window_size=c.window_size, mlp_ratio=c.mlp_ratio, drop_path_rate=c.drop_path_rate,
        use_absolute_position_embeddings=False, patch_norm=True, **_common_fields(c),
    )
    kwargs["use_key_bias"] = False  # transformers' Swinv2 key projection has no bias
    if any(pretrained):
        kwargs["pretrained_window_sizes"] = pretrained + [0] * (len(depths) - len(pretrained))
    bare = isinstance(model, Swinv2Model)
    src_root, dst_root = ("", "") if bare else ("swinv2.", "simmim.")
    if not bare:
        _check_decoder_stride(c, kwargs["patch_size"] * 2 ** (len(depths) - 1), origin)
    sd = dict(model.state_dict())
    out = {}
    # A Swinv2Model built without `use_mask_token` has none; transformers would initialise it at zero.
    mask_token = sd.pop(f"{src_root}embeddings.mask_token", None)
    out[f"{dst_root}embeddings.mask_token"] = mask_token if mask_token is not None else torch.zeros(1, 1, c.embed_dim)
    _convert_swin_stem_and_merging(sd, out, depths, src_root, dst_root, decoder=not bare)
    parts = {"layernorm_before": "attention_output_norm", "layernorm_after": "mlp_output_norm",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "attention.output.dense": "attention.proj"}
    for s, depth in enumerate(depths):
        for b in range(depth):
            src = f"{src_root}encoder.layers.{s}.blocks.{b}"
            dst = f"{dst_root}encoder.stages.{s}.blocks.{b}"
            attention = f"{src}.attention.self"
            out[f"{dst}.attention.qkv.weight"] = torch.cat(
                [sd.pop(f"{attention}.{n}.weight") for n in ("query", "key", "value")])
            for n, ours in (("query", "q_bias"), ("value", "v_bias")):
                bias = sd.pop(f"{attention}.{n}.bias", None)
                if bias is not None:
                    out[f"{dst}.attention.{ours}"] = bias
            out[f"{dst}.attention.logit_scale"] = sd.pop(f"{attention}.logit_scale")
            for name in ("0.weight", "0.bias", "2.weight"):
                out[f"{dst}.attention.cpb_mlp.{name}"] = sd.pop(f"{attention}.continuous_position_bias_mlp.{name}")
            for theirs, ours in parts.items():
                for name in ("weight", "bias"):
                    out[f"{dst}.{ours}.{name}"] = sd.pop(f"{src}.{theirs}.{name}")
    return kwargs, _finish(sd, out, origin)


def _check_swinv2_buffers(hf_model, model: torch.nn.Module, origin: str) -> None:
    """transformers rebuilds its coordinate tables and indices (non-persistent buffers): compare with ours."""
    ours = dict(model.named_buffers())
    prefix = "" if "simmim." not in next(iter(ours), "simmim.") else "simmim."
    for name, buffer in hf_model.named_buffers():
        match = re.search(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\."
                          r"(relative_coords_table|relative_position_index)$", name)
        if match is None:
            continue
        key = f"{prefix}encoder.stages.{match.group(1)}.blocks.{match.group(2)}.attention.{match.group(3)}"
        mine = ours.get(key)
        if mine is None or mine.numel() != buffer.numel() or not torch.allclose(
                mine.reshape(-1).double(), buffer.reshape(-1).double(), rtol=0, atol=1e-6):
            raise ValueError(f"{origin}: {match.group(3)} of {name} differs from simmim_hf's {key}.")


# ---------------------------------------------------------------------------------------------- CLI
def save_converted(model: SimMIMForMaskedImageModeling, output_dir: str | Path) -> Path:
    """Write a Hub-ready folder: safetensors weights, config.json with `auto_map`, the model code, and the
    image processor config when simmim_hf provides an image processor."""
    output_dir = Path(output_dir)
    package = importlib.import_module(__package__ or "simmim_hf")
    processor_class = getattr(package, "SimMIMImageProcessor", None)
    processor = None
    if processor_class is not None and model.config.num_channels == 3:  # the processor makes RGB images
        processor = processor_class.from_config(model.config) if hasattr(processor_class, "from_config") \
            else processor_class()
    elif processor_class is not None:
        logger.warning("No image processor written: SimMIMImageProcessor makes RGB images and this model takes "
                       "%d channel(s); prepare its pixel_values yourself.", model.config.num_channels)
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="simmim-convert",
        description="Convert an official SimMIM (ViT, Swin, SwinV2) or a transformers ViT/Swin/Swinv2 checkpoint "
                    "into a simmim_hf folder.",
    )
    parser.add_argument("--source", required=True, help=f"one of {SOURCES}")
    parser.add_argument("--checkpoint", required=True,
                        help="official: .pth/.bin/.safetensors file, or a Hub file as hf://<repo>/<path> or a "
                             "https://huggingface.co/<repo>/resolve/<revision>/<path> URL (e.g. the SwinV2 zoo, "
                             f"{SWINV2_ZOO_REPO}); transformers: model folder or Hub id")
    parser.add_argument("--output", required=True, help="folder to write (save_pretrained layout); new or empty")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    parser.add_argument("--mask_patch_size", type=int,
                        help="masking unit in pixels (default: checkpoint config, else 32 at >= 192 px and "
                             "scaled with the image below, leaving at least 4x4 units)")
    parser.add_argument("--mask_ratio", type=float, help="fraction of masked units (default: checkpoint config or 0.6)")
    parser.add_argument("--image_size", type=int, help="official only, when the weights do not reveal it")
    parser.add_argument("--num_attention_heads", type=int, help="official ViT without relative position bias only")
    parser.add_argument("--layer_norm_eps", type=float, help="default 1e-6 (ViT) / 1e-5 (Swin), as the official code")
    parser.add_argument("--drop_path_rate", type=float, help="stored in the config for further training")
    parser.add_argument("--window_size", type=int,
                        help="official SwinV2 whose stored buffers do not reveal it (default: checkpoint config, else "
                             f"the official recipe's {SWINV2_RECIPE_DEFAULTS['window_size']})")
    parser.add_argument("--norm_target_patch_size", type=int,
                        help="local target normalisation window k, 0 = off (default: official SwinV2: checkpoint "
                             f"config, else the recipe's {SWINV2_RECIPE_DEFAULTS['norm_target_patch_size']}; "
                             "others: off)")
    args = parser.parse_args(argv)

    if args.source not in SOURCES:
        raise ValueError(f"`--source` must be one of {SOURCES}; got {args.source!r}.")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        # Also catches --output pointing at the source folder, which the conversion would overwrite.
        raise ValueError(f"`--output` {args.output!r} exists and is not empty; choose a new folder, or pass "
                         "--overwrite to write into it.")
    overrides = {
        key: getattr(args, key) for key in ("mask_patch_size", "mask_ratio", "layer_norm_eps", "drop_path_rate",
                                            "window_size", "norm_target_patch_size")
    }
    if args.source == "official":
        overrides.update(image_size=args.image_size, num_attention_heads=args.num_attention_heads)
        model = convert_official_checkpoint(args.checkpoint, **overrides)
    else:
        if args.image_size is not None or args.num_attention_heads is not None:
            raise ValueError("`--image_size` and `--num_attention_heads` apply to --source official only.")
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if overrides.get("norm_target_patch_size") == 0:  # off, the default here
            del overrides["norm_target_patch_size"]
        if "layer_norm_eps" in overrides:  # the checkpoint's config states it; another value changes the model
            raise ValueError("`--layer_norm_eps` applies to --source official only: a transformers checkpoint's "
                             "config states its own.")
        model = convert_transformers_checkpoint(args.checkpoint, **overrides)
    output = save_converted(model, args.output)
    config = model.config
    print(
        f"Converted {args.source} checkpoint {args.checkpoint} -> {output} "
        f"({config.encoder_type}, image_size={config.image_size}, patch_size={config.patch_size}, "
        f"mask_patch_size={config.mask_patch_size}, {sum(p.numel() for p in model.parameters()):,} parameters)"
    )


if __name__ == "__main__":
    main()
