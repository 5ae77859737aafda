"""SimMIM configuration: one config for both encoders (ViT as in the paper, Swin v1) plus the mask settings.

Hub-facing module: it is copied next to the weights for `trust_remote_code`, so it imports nothing from
`simmim_hf` except, relatively, its flat sibling modules.
"""

from __future__ import annotations

import copy
import inspect
import json
import math

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

ENCODER_TYPES = ("vit", "swin")
POOLING_TYPES = ("mean", "cls")
INIT_RECIPES = ("simmim", "transformers")

# Field types, checked before anything is derived from them (a string `mlp_ratio` would otherwise be repeated,
# not multiplied, and a Swin MLP sized from it asks for petabytes). Bools are rejected where numbers are expected.
_INT_FIELDS = ("image_size", "patch_size", "num_channels", "mask_patch_size", "num_hidden_layers",
               "num_attention_heads", "embed_dim", "window_size")
_OPTIONAL_INT_FIELDS = ("hidden_size", "intermediate_size")
_BOOL_FIELDS = ("qkv_bias", "use_absolute_position_embeddings", "use_relative_position_bias", "patch_norm",
                "use_fc_norm")
_OPTIONAL_BOOL_FIELDS = ("use_key_bias", "use_shared_relative_position_bias")
# Real-valued fields: (the range they must lie in, as a check, and as words for the error message).
_REAL_FIELDS = {
    "hidden_dropout_prob": (lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)"),
    "attention_probs_dropout_prob": (lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)"),
    "drop_path_rate": (lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)"),
    "mask_ratio": (lambda v: 0.0 < v < 1.0, "must lie strictly between 0 and 1"),
    "mlp_ratio": (lambda v: v > 0, "must be a positive number"),
    "initializer_range": (lambda v: v > 0, "must be a positive number"),
    "layer_norm_eps": (lambda v: v > 0, "must be a positive number"),
    "layer_scale_init_value": (lambda v: v >= 0, "must be a number >= 0 (0 disables LayerScale)"),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A finite int or float (not a bool, not a string): what a JSON number becomes."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or math.isfinite(value)
    )


def _mlp_width(dim: int, mlp_ratio: float) -> int:
    """`int(dim * mlp_ratio)`, the MLP width the models build; a named error where it overflows."""
    try:
        return int(dim * mlp_ratio)
    except OverflowError:
        raise ValueError(f"SimMIMConfig: `mlp_ratio` gives an infinite MLP width (int({dim} * mlp_ratio)); "
                         f"got mlp_ratio={mlp_ratio!r}.") from None

# Named recipes. The paper's pretraining configs (microsoft/SimMIM `configs/*pretrain*`), the ViT-B
# fine-tuning variant, and tiny models for demos and tests (32 px images, a few thousand parameters).
PRESETS: dict[str, dict] = {
    # ViT-B/16 at 224 as pretrained in the paper: shared relative position bias, LayerScale 0.1, no APE.
    "vit-base-p16-224": dict(
        encoder_type="vit", image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, drop_path_rate=0.1,
    ),
    "vit-large-p16-224": dict(
        encoder_type="vit", image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24,
        num_attention_heads=16, intermediate_size=4096, drop_path_rate=0.1,
    ),
    # transformers' plain ViT-B/16 (absolute positions, full qkv bias, no LayerScale, CLS pooling).
    "vit-base-p16-224-plain": dict(
        encoder_type="vit", image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, use_absolute_position_embeddings=True,
        use_shared_relative_position_bias=False, use_key_bias=True, layer_scale_init_value=0.0,
        pooling="cls", layer_norm_eps=1e-12, init_recipe="transformers",
    ),
    "swin-tiny-w6-192": dict(
        encoder_type="swin", image_size=192, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24], window_size=6,
    ),
    "swin-base-w6-192": dict(
        encoder_type="swin", image_size=192, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2],
        num_heads=[4, 8, 16, 32], window_size=6,
    ),
    "swin-large-w12-192": dict(
        encoder_type="swin", image_size=192, patch_size=4, embed_dim=192, depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48], window_size=12,
    ),
    # Tiny models for demos and tests; the same layouts as the official-code fixtures.
    "vit-nano-p4-32": dict(
        encoder_type="vit", image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=256, mask_patch_size=8,
    ),
    "swin-nano-w4-32": dict(
        encoder_type="swin", image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2],
        num_heads=[2, 4, 8], window_size=4, mask_patch_size=8,
    ),
    # A small but non-trivial model for the CPU demo run (64 px, ~0.85 M parameters).
    "vit-micro-p8-64": dict(
        encoder_type="vit", image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=512, mask_patch_size=16,
    ),
}


class SimMIMConfig(PretrainedConfig):
    r"""
    Configuration of a SimMIM model: the encoder (`encoder_type="vit"` or `"swin"`), the linear
    reconstruction head and the masking recipe the image processor follows.

    Field names follow transformers' `ViTConfig` / `SwinConfig`. Fields that belong to the other encoder
    type are kept but unused. Every field is checked, also those of the other encoder type, at construction and
    when a config is loaded (`from_pretrained` / `from_dict`, keyword overrides included): a wrong type (`"16"`,
    `16.0` or `true` where an integer is meant, `"0.5"` for a number), a value out of range or an unknown
    `hidden_act` raises a `ValueError` naming the field.

    Args:
        encoder_type (`str`, defaults to `"vit"`): `"vit"` (BEiT-style ViT of the SimMIM paper) or `"swin"` (Swin v1).
        image_size (`int`, defaults to 224): pretraining resolution; the encoder also accepts other sizes
            divisible by its patch size (ViT) or by `patch_size * 2**(stages-1)` and the windows (Swin).
        patch_size (`int`, defaults to 16): model patch size p; `bool_masked_pos` has (H/p)*(W/p) entries.
        num_channels (`int`, defaults to 3).
        hidden_size (`int`, *optional*): ViT width (default 768). For Swin it is derived: the width of the
            last stage, `embed_dim * 2**(len(depths)-1)`.
        num_hidden_layers, num_attention_heads, intermediate_size: ViT depth, heads and MLP width.
        embed_dim, depths, num_heads, window_size, mlp_ratio: Swin stage layout.
        hidden_act (`str`, defaults to `"gelu"`).
        hidden_dropout_prob, attention_probs_dropout_prob (`float`, defaults to 0.0).
        drop_path_rate (`float`, defaults to 0.0): stochastic depth, linearly increasing over the blocks.
        qkv_bias (`bool`, defaults to `True`): bias on the query and value projections.
        use_key_bias (`bool`, *optional*): also a bias on the key projection. Default: `False` for ViT (the
            official BEiT-style attention, whose key bias is fixed at zero), `True` for Swin.
        use_absolute_position_embeddings (`bool`, defaults to `False`): learned absolute positions.
        use_shared_relative_position_bias (`bool`, *optional*): ViT only; one relative position bias table
            shared by all blocks (the paper's pretraining setting). Default: `True` unless
            `use_relative_position_bias` or `use_absolute_position_embeddings` is set.
        use_relative_position_bias (`bool`, defaults to `False`): ViT only; one table per block (fine-tuning).
        layer_scale_init_value (`float`, defaults to 0.1): ViT LayerScale init; 0 disables LayerScale.
        patch_norm (`bool`, defaults to `True`): Swin only; LayerNorm after the patch embedding.
        pooling (`str`, *optional*): classification features, `"mean"` of the patch tokens or `"cls"`
            (ViT only). Default `"mean"`.
        init_recipe (`str`, defaults to `"simmim"`): weight initialisation. `"simmim"`: the official SimMIM code's
            (pretraining ViT: normal truncated at +-1 std, 1/sqrt(2l) residual rescale; PyTorch's conv init for the
            head). `"transformers"`: transformers' ViT/Swin `_init_weights` (truncated normal with std
            `initializer_range` for every linear and conv layer, the head included; zero mask token; no rescale),
            the recipe of the plain-ViT preset, under which a plain ViT pretrains better (see the quality benchmark).
        use_fc_norm (`bool`, defaults to `False`): ViT with `pooling="mean"` only; the official fine-tuning
            layout (`use_mean_pooling=True` there): no final LayerNorm on the tokens, and the pooled features are
            a LayerNorm (`fc_norm`) of the mean of the un-normalised patch tokens. Pretraining uses the final
            LayerNorm (`False`); `examples/run_finetune.py` switches it on for ViT classifiers.
        layer_norm_eps (`float`, *optional*): 1e-6 for ViT (official), 1e-5 for Swin.
        initializer_range (`float`, defaults to 0.02).
        encoder_stride (`int`, *optional*): total downsampling of the encoder; derived (ViT: `patch_size`,
            Swin: `patch_size * 2**(len(depths)-1)`). A given value must agree.
        mask_patch_size (`int`, defaults to 32): side of one masking unit in pixels.
        mask_ratio (`float`, defaults to 0.6): fraction of masking units that are masked.

    Example:
        ```python
        >>> from simmim_hf import SimMIMConfig
        >>> config = SimMIMConfig.from_preset("swin-base-w6-192")
        >>> config.encoder_stride
        32
        ```
    """

    model_type = "simmim"

    def __init__(
        self,
        encoder_type: str = "vit",
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int | None = None,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int | None = None,
        embed_dim: int = 96,
        depths: list[int] | tuple[int, ...] = (2, 2, 6, 2),
        num_heads: list[int] | tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        qkv_bias: bool = True,
        use_key_bias: bool | None = None,
        use_absolute_position_embeddings: bool = False,
        use_shared_relative_position_bias: bool | None = None,
        use_relative_position_bias: bool = False,
        layer_scale_init_value: float = 0.1,
        patch_norm: bool = True,
        pooling: str | None = None,
        use_fc_norm: bool = False,
        init_recipe: str = "simmim",
        layer_norm_eps: float | None = None,
        initializer_range: float = 0.02,
        encoder_stride: int | None = None,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        **kwargs,
    ):
        self.encoder_type = encoder_type
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.embed_dim = embed_dim
        self.depths = list(depths) if isinstance(depths, (list, tuple)) else depths
        self.num_heads = list(num_heads) if isinstance(num_heads, (list, tuple)) else num_heads
        self.window_size = window_size
        self.mlp_ratio = mlp_ratio
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.qkv_bias = qkv_bias
        self.use_absolute_position_embeddings = use_absolute_position_embeddings
        self.use_relative_position_bias = use_relative_position_bias
        self.layer_scale_init_value = layer_scale_init_value
        self.patch_norm = patch_norm
        self.initializer_range = initializer_range
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        # The optional fields as given (None = derive), for the type checks below.
        self.hidden_size, self.intermediate_size, self.layer_norm_eps = hidden_size, intermediate_size, layer_norm_eps
        self.use_key_bias, self.use_shared_relative_position_bias = use_key_bias, use_shared_relative_position_bias
        self.use_fc_norm = use_fc_norm
        self.init_recipe = init_recipe

        if encoder_type not in ENCODER_TYPES:
            raise ValueError(
                f"SimMIMConfig: `encoder_type` must be one of {ENCODER_TYPES}; got encoder_type={encoder_type!r}."
            )
        self._validate_types()
        is_vit = encoder_type == "vit"
        if use_key_bias is None:
            use_key_bias = not is_vit
        self.use_key_bias = use_key_bias
        if use_shared_relative_position_bias is None:
            use_shared_relative_position_bias = is_vit and not (
                use_relative_position_bias or use_absolute_position_embeddings
            )
        self.use_shared_relative_position_bias = use_shared_relative_position_bias
        self.pooling = pooling if pooling is not None else "mean"
        self.layer_norm_eps = layer_norm_eps if layer_norm_eps is not None else (1e-6 if is_vit else 1e-5)

        if is_vit:
            self.hidden_size = hidden_size if hidden_size is not None else 768
            self.intermediate_size = (
                intermediate_size if intermediate_size is not None else _mlp_width(self.hidden_size, mlp_ratio)
            )
        else:
            self.hidden_size = int(embed_dim * 2 ** (len(self.depths) - 1))
            if hidden_size is not None and hidden_size != self.hidden_size:
                raise ValueError(
                    f"`hidden_size` is derived for Swin as embed_dim * 2**(len(depths)-1) = {self.hidden_size}; "
                    f"got hidden_size={hidden_size}. Leave it unset."
                )
            self.intermediate_size = intermediate_size

        self._validate()
        derived_stride = self.patch_size * (2 ** (len(self.depths) - 1) if not is_vit else 1)
        if encoder_stride is not None and encoder_stride != derived_stride:
            raise ValueError(
                f"`encoder_stride` must equal the encoder's total downsampling ({derived_stride} for "
                f"encoder_type={encoder_type!r}, patch_size={patch_size}"
                + ("" if is_vit else f", {len(self.depths)} stages")
                + f"); got encoder_stride={encoder_stride}. Leave it unset to derive it."
            )
        self.encoder_stride = derived_stride
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def fail(field: str, expected: str, value) -> None:
            raise ValueError(f"SimMIMConfig: `{field}` {expected}; got {field}={value!r}.")

        for field in ("image_size", "patch_size", "num_channels", "mask_patch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(field, "must be a positive integer", value)
        if self.image_size % self.patch_size:
            fail("image_size", f"must be divisible by patch_size={self.patch_size}", self.image_size)
        if self.image_size % self.mask_patch_size:
            fail("image_size", f"must be divisible by mask_patch_size={self.mask_patch_size}", self.image_size)
        if self.mask_patch_size % self.patch_size:
            fail("mask_patch_size", f"must be a multiple of patch_size={self.patch_size}", self.mask_patch_size)
        if self.pooling not in POOLING_TYPES:
            fail("pooling", f"must be one of {POOLING_TYPES}", self.pooling)
        if self.init_recipe not in INIT_RECIPES:
            fail("init_recipe", f"must be one of {INIT_RECIPES}", self.init_recipe)
        if self.encoder_type == "vit":
            self._validate_vit(fail)
        else:
            self._validate_swin(fail)

    def _validate_vit(self, fail) -> None:
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, field) <= 0:
                fail(field, "must be positive", getattr(self, field))
        if self.intermediate_size <= 0:
            fail("intermediate_size", f"must be positive (given, or int(hidden_size * mlp_ratio) = "
                 f"int({self.hidden_size} * {self.mlp_ratio}))", self.intermediate_size)
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"must divide hidden_size={self.hidden_size}", self.num_attention_heads)
        if self.use_fc_norm and self.pooling != "mean":
            fail("use_fc_norm", "needs pooling='mean' (it normalises the mean of the patch tokens)", self.use_fc_norm)
        if self.use_shared_relative_position_bias and self.use_relative_position_bias:
            fail("use_relative_position_bias",
                 "cannot be combined with use_shared_relative_position_bias=True (choose shared or per-block)",
                 self.use_relative_position_bias)

    def _validate_swin(self, fail) -> None:
        if not self.depths or any(d <= 0 for d in self.depths):
            fail("depths", "must be a non-empty list of positive integers", self.depths)
        if len(self.num_heads) != len(self.depths):
            fail("num_heads", f"must have one entry per stage ({len(self.depths)} stages)", self.num_heads)
        if self.window_size <= 0:
            fail("window_size", "must be a positive integer", self.window_size)
        if self.embed_dim <= 0:
            fail("embed_dim", "must be a positive integer", self.embed_dim)
        if _mlp_width(self.embed_dim, self.mlp_ratio) <= 0 or _mlp_width(self.hidden_size, self.mlp_ratio) <= 0:
            fail("mlp_ratio", f"must give an MLP width int(embed_dim * mlp_ratio) >= 1 (embed_dim={self.embed_dim})",
                 self.mlp_ratio)
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            fail("intermediate_size", "must be positive or None (Swin sizes its MLPs with mlp_ratio)",
                 self.intermediate_size)
        if self.pooling == "cls":
            fail("pooling", "must be 'mean' for Swin, which has no CLS token", self.pooling)
        if self.use_fc_norm:
            fail("use_fc_norm", "is ViT only (Swin classifies the mean of its normalised tokens)", self.use_fc_norm)
        stride = self.patch_size * 2 ** (len(self.depths) - 1)
        if self.image_size % stride:
            fail("image_size", f"must be divisible by patch_size * 2**(stages-1) = {stride}", self.image_size)
        for stage, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2**stage
            if heads <= 0 or width % heads:
                fail("num_heads", f"must divide the width of stage {stage} ({width})", self.num_heads)
            resolution = self.image_size // (self.patch_size * 2**stage)
            # As in Swin, a stage no larger than the window attends globally (the window shrinks to it).
            if resolution > self.window_size and resolution % self.window_size:
                fail("window_size",
                     f"must divide the token grid of every stage; stage {stage} is {resolution}x{resolution}",
                     self.window_size)

    def _validate_types(self) -> None:
        """Types of every field (JSON can hold "16" or 16.0 or true where 16 is meant), before any arithmetic."""

        def fail(field: str, expected: str, value) -> None:
            raise ValueError(f"SimMIMConfig: `{field}` {expected}; got {field}={value!r}.")

        for field in (*_INT_FIELDS, *_OPTIONAL_INT_FIELDS):
            value = getattr(self, field)
            if not (_is_int(value) or (value is None and field in _OPTIONAL_INT_FIELDS)):
                fail(field, "must be a positive integer" + (" or None" if field in _OPTIONAL_INT_FIELDS else ""), value)
        for field in ("depths", "num_heads"):
            value = getattr(self, field)
            if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
                fail(field, "must be a list of positive integers (one per Swin stage)", value)
        for field in (*_BOOL_FIELDS, *_OPTIONAL_BOOL_FIELDS):
            value = getattr(self, field)
            if not (isinstance(value, bool) or (value is None and field in _OPTIONAL_BOOL_FIELDS)):
                fail(field, "must be true or false" + (" (or None)" if field in _OPTIONAL_BOOL_FIELDS else ""), value)
        for field, (in_range, expected) in _REAL_FIELDS.items():
            value = getattr(self, field)
            if value is None and field == "layer_norm_eps":  # derived later
                continue
            if not _is_real(value) or not in_range(value):
                fail(field, expected, value)
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            fail("hidden_act", f"must be one of transformers' activations {sorted(ACT2FN)}", self.hidden_act)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As transformers', plus validation of keyword overrides. transformers builds the config with
        `cls(**config_dict)` (validated in `__init__`, so a hand-edited config.json is checked) but then *assigns*
        keyword overrides such as `from_pretrained(path, mask_ratio=0.5)` with setattr, bypassing `__init__`; a
        config changed that way is rebuilt once through `__init__`, which checks it as a whole."""
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if kwargs.get("return_unused_kwargs") else result
        if any(key in kwargs for key in cls._init_field_names()):
            cls(**config.to_dict())
        return result

    @classmethod
    def _init_field_names(cls) -> tuple[str, ...]:
        return tuple(name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs"))

    # ------------------------------------------------------------------ overrides
    def with_overrides(self, overrides: dict | str) -> "SimMIMConfig":
        """A new, validated config with `overrides` applied: a dict, or a string in transformers'
        `update_from_string` syntax (`"key=value,key=value"`) that also takes lists (`"depths=[2,2,6,2]"`).
        Derived fields (`encoder_stride`, Swin `hidden_size`) are recomputed; unknown fields are an error."""
        if isinstance(overrides, str):
            overrides = parse_config_overrides(overrides, self)
        fields = self._init_field_names()
        unknown = sorted(key for key in overrides if key not in fields and not hasattr(self, key))
        if unknown:
            raise ValueError(f"Unknown SimMIMConfig field(s) {unknown} in the overrides; fields are {sorted(fields)}.")
        values = self.to_dict()
        for key in ("architectures", "auto_map", "transformers_version", "model_type", "_name_or_path"):
            values.pop(key, None)
        derived = ("encoder_stride",) + (("hidden_size",) if values.get("encoder_type") == "swin" else ())
        for key in derived:
            if key not in overrides:
                values.pop(key, None)
        values.update(overrides)
        return type(self)(**values)

    def update_from_string(self, update_str: str) -> None:
        """transformers' in-place `update_from_string`, with lists and full validation (see `with_overrides`)."""
        self.__dict__.update(self.with_overrides(update_str).__dict__)

    # ------------------------------------------------------------------ presets
    @classmethod
    def available_presets(cls) -> list[str]:
        return sorted(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SimMIMConfig":
        """Build a config from a named recipe (see `SimMIMConfig.available_presets()`); keyword arguments
        override single fields, e.g. `from_preset("vit-base-p16-224", drop_path_rate=0.0)`."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset name={name!r}; expected one of {sorted(PRESETS)}.")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)

    # ------------------------------------------------------------------ derived quantities
    @property
    def num_stages(self) -> int:
        return 1 if self.encoder_type == "vit" else len(self.depths)

    @property
    def num_layers_for_decay(self) -> int:
        """Number of blocks, the `depth` of layer-wise lr decay."""
        return self.num_hidden_layers if self.encoder_type == "vit" else sum(self.depths)


def parse_config_overrides(text: str, config: PretrainedConfig | None = None) -> dict:
    """Parse `"key=value,key=value"` (transformers' `update_from_string` syntax) into a dict. Commas inside
    brackets do not split (`depths=[2,2,6,2],num_heads=[3,6,12,24]`). Values are JSON where they parse as JSON
    (numbers, `true`/`false`, `null`, lists); otherwise a `True`/`False` for a boolean field of `config`, else
    the plain string (so `hidden_act=gelu` works). Types and ranges are checked by the config itself."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    overrides = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"Config overrides must be key=value pairs separated by commas; got {item!r} in {text!r}.")
        try:
            overrides[key] = json.loads(value.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError:
            is_bool_field = config is not None and isinstance(getattr(config, key, None), bool)
            overrides[key] = value.lower() == "true" if is_bool_field and value.lower() in ("true", "false") else value
    return overrides


__all__ = ["SimMIMConfig", "PRESETS", "parse_config_overrides"]
