"""SimMIM configuration: one config for every encoder (ViT as in the paper, Swin v1, SwinV2) plus the mask settings.

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
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .masking import validate_mask_settings

ENCODER_TYPES = ("vit", "swin", "swinv2")
POOLING_TYPES = ("mean", "cls")
INIT_RECIPES = ("simmim", "transformers")
# The paper's component study (section 4): prediction head, loss, and which pixels the loss counts.
HEAD_TYPES = ("linear", "mlp")
LOSS_TYPES = ("l1", "smooth_l1", "l2", "color_ce")
LOSS_AREAS = ("masked", "all")

# Field types, checked before anything is derived from them (a string `mlp_ratio` would otherwise be repeated,
# not multiplied, and a Swin MLP sized from it asks for petabytes). Bools are rejected where numbers are expected.
_INT_FIELDS = ("image_size", "patch_size", "num_channels", "mask_patch_size", "num_hidden_layers",
               "num_attention_heads", "embed_dim", "window_size", "num_color_bins")
_OPTIONAL_INT_FIELDS = ("hidden_size", "intermediate_size", "head_hidden_size", "prediction_resolution",
                        "norm_target_patch_size")
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
    "smooth_l1_beta": (lambda v: v > 0, "must be a positive number (beta -> 0 is loss_type='l1')"),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A finite int or float (not a bool, not a string): what a JSON number becomes."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or math.isfinite(value)
    )


def _channel_values(value, rgb_default, num_channels):
    """`image_mean` / `image_std` as stored: a list (JSON has no tuples, so a round trip compares equal); None
    means the processor's default, ImageNet's for RGB and 0.5 per channel otherwise (the value is checked later)."""
    if value is None:
        value = rgb_default if num_channels == 3 else [0.5] * (num_channels if _is_int(num_channels) else 0)
    return list(value) if isinstance(value, (list, tuple)) else value


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

# SwinV2 (microsoft/Swin-Transformer). `swinv2-base-w12-192` is the paper's SwinV2 SimMIM pretraining config
# (`configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml`: 192 px, window 12, 32 px mask units,
# ratio 0.6, drop path 0.1, target normalisation k = 47). The other sizes are the released data-scaling zoo's
# (hub repo zdaxie/SimMIM; widths and depths of the SwinV2 paper, 32 channels per head; backbone sizes 49M / 87M /
# 195M / 655M / 1.06B), pretrained with the same recipe; their drop path rate is not published, 0.1 is kept.
_SWINV2_RECIPE = dict(encoder_type="swinv2", image_size=192, patch_size=4, window_size=12, depths=[2, 2, 18, 2],
                      mask_patch_size=32, mask_ratio=0.6, drop_path_rate=0.1, norm_target_patch_size=47)
PRESETS.update({
    f"swinv2-{size}-w12-192": dict(_SWINV2_RECIPE, embed_dim=width, num_heads=[width // 32 * 2**s for s in range(4)])
    for size, width in (("small", 96), ("base", 128), ("large", 192), ("huge", 352), ("giant", 448))
})
# Tiny SwinV2 for demos and tests: the layout of the official-code fixture `swinv2_tiny` (which also used k = 7).
PRESETS["swinv2-nano-w4-32"] = dict(
    encoder_type="swinv2", image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 4, 8],
    window_size=4, mask_patch_size=8,
)


class SimMIMConfig(PretrainedConfig):
    r"""
    Configuration of a SimMIM model: the encoder (`encoder_type="vit"`, `"swin"` or `"swinv2"`), the linear
    reconstruction head and the masking recipe the image processor follows.

    Field names follow transformers' `ViTConfig` / `SwinConfig`. Fields that belong to the other encoder
    type are kept but unused. Every field is checked, also those of the other encoder type, at construction and
    when a config is loaded (`from_pretrained` / `from_dict`, keyword overrides included): a wrong type (`"16"`,
    `16.0` or `true` where an integer is meant, `"0.5"` for a number), a value out of range or an unknown
    `hidden_act` raises a `ValueError` naming the field.

    Args:
        encoder_type (`str`, defaults to `"vit"`): `"vit"` (BEiT-style ViT of the SimMIM paper), `"swin"` (Swin v1)
            or `"swinv2"` (Swin Transformer V2 as the official code: cosine attention, continuous position bias,
            res-post-norm; it uses the Swin fields below).
        image_size (`int`, defaults to 224): pretraining resolution; the encoder also accepts other sizes
            divisible by its patch size (ViT) or by `patch_size * 2**(stages-1)` and the windows (Swin).
        patch_size (`int`, defaults to 16): model patch size p; `bool_masked_pos` has (H/p)*(W/p) entries.
        num_channels (`int`, defaults to 3).
        hidden_size (`int`, *optional*): ViT width (default 768). For Swin it is derived: the width of the
            last stage, `embed_dim * 2**(len(depths)-1)`.
        num_hidden_layers, num_attention_heads, intermediate_size: ViT depth, heads and MLP width.
        embed_dim, depths, num_heads, window_size, mlp_ratio: Swin stage layout.
        pretrained_window_sizes (`list[int]`, *optional*): SwinV2 only; per stage, the window the continuous
            position bias was pretrained with (its relative coordinates are normalised by it), 0 = the stage's own
            window. Set it when fine-tuning at a larger window than pretraining (official: `[12, 12, 12, 6]` for
            window 14 from a window-12 checkpoint at 192 px). None means 0 for every stage.
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
        head_type (`str`, defaults to `"linear"`): the prediction head. `"linear"`: the paper's 1x1 conv +
            PixelShuffle; `"mlp"`: 1x1 conv to `head_hidden_size`, GELU, 1x1 conv, PixelShuffle (the paper's
            2-layer head ablation).
        head_hidden_size (`int`, *optional*): width of the `"mlp"` head; default the encoder width `hidden_size`.
            Unused by the linear head.
        loss_type (`str`, defaults to `"l1"`): `"l1"` (the paper's), `"smooth_l1"` (Huber-like, `smooth_l1_beta`),
            `"l2"` (squared error), or `"color_ce"`: per-channel classification of the raw 8-bit colour into
            `num_color_bins` equal bins with cross-entropy (the head then predicts `num_color_bins` logits per
            channel and pixel; `reconstruction` is the expected colour, normalised like the input).
        smooth_l1_beta (`float`, defaults to 1.0): where `"smooth_l1"` switches from quadratic to linear.
        num_color_bins (`int`, defaults to 256): bins of `"color_ce"`; must divide 256 (8 is the paper's coarse
            variant), each bin covers 256 / num_color_bins consecutive 8-bit values.
        prediction_resolution (`int`, *optional*): predict an r x r target, the normalised image area-averaged
            over (image_size / r)-pixel squares, instead of every pixel (the paper's prediction-resolution sweep).
            r must divide `image_size`, and the averaging factor image_size / r must divide `encoder_stride` (the
            head upsamples the feature map by encoder_stride / factor). A low-resolution pixel is masked when
            every pixel of the square it averages is masked. Other input sizes keep the factor, not r, and so
            does a config whose `image_size` is changed (`with_overrides`, `from_pretrained(..., image_size=...)`):
            r follows the new size, so the head keeps its shape.
        loss_area (`str`, defaults to `"masked"`): which pixels the loss counts: `"masked"` (the paper's) or
            `"all"`; both normalise the same way, by the number of counted pixels and the channels.
        norm_target_patch_size (`int`, *optional*): an odd window k >= 3: regress a locally normalised target,
            each channel's value minus the mean over the k x k window around it, divided by the window's
            (unbiased) standard deviation, as the official SwinV2 SimMIM recipe (k = 47 there). `reconstruction`
            is then in that normalised-target space, not an image. Not combinable with `"color_ce"`.
        image_mean, image_std (`list[float]`, default ImageNet's): the normalisation of `pixel_values`, one value per
            channel; must match the processor's. Used to recover raw 8-bit colours for `"color_ce"`.

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
        pretrained_window_sizes: list[int] | tuple[int, ...] | None = None,
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
        head_type: str = "linear",
        head_hidden_size: int | None = None,
        loss_type: str = "l1",
        smooth_l1_beta: float = 1.0,
        num_color_bins: int = 256,
        prediction_resolution: int | None = None,
        loss_area: str = "masked",
        norm_target_patch_size: int | None = None,
        image_mean: list[float] | tuple[float, ...] | None = None,
        image_std: list[float] | tuple[float, ...] | None = None,
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
        self.pretrained_window_sizes = (list(pretrained_window_sizes) if isinstance(pretrained_window_sizes, tuple)
                                        else pretrained_window_sizes)
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
        self.head_type, self.head_hidden_size = head_type, head_hidden_size
        self.loss_type, self.smooth_l1_beta, self.num_color_bins = loss_type, smooth_l1_beta, num_color_bins
        self.prediction_resolution, self.loss_area = prediction_resolution, loss_area
        self.norm_target_patch_size = norm_target_patch_size
        self.image_mean = _channel_values(image_mean, IMAGENET_DEFAULT_MEAN, num_channels)
        self.image_std = _channel_values(image_std, IMAGENET_DEFAULT_STD, num_channels)

        if encoder_type not in ENCODER_TYPES:
            raise ValueError(
                f"SimMIMConfig: `encoder_type` must be one of {ENCODER_TYPES}; got encoder_type={encoder_type!r}."
            )
        self._validate_types()
        is_vit = encoder_type == "vit"
        if use_key_bias is None:
            use_key_bias = encoder_type == "swin"  # ViT and SwinV2 learn q and v biases only
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
        self._validate_components()
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
        try:  # the masking module's rule, as the processor and the mask generator apply it
            validate_mask_settings(self.image_size, self.patch_size, self.mask_patch_size, self.mask_ratio,
                                   size_name="image_size")
        except ValueError as err:
            raise ValueError(f"SimMIMConfig: {err}") from None
        if self.pooling not in POOLING_TYPES:
            fail("pooling", f"must be one of {POOLING_TYPES}", self.pooling)
        if self.init_recipe not in INIT_RECIPES:
            fail("init_recipe", f"must be one of {INIT_RECIPES}", self.init_recipe)
        if self.encoder_type == "vit":
            self._validate_vit(fail)
        else:
            self._validate_swin(fail)
            if self.encoder_type == "swinv2":
                self._validate_swinv2(fail)

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
        for stage, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2**stage
            if heads <= 0 or width % heads:
                fail("num_heads", f"must divide the width of stage {stage} ({width})", self.num_heads)
        problem = self.swin_grid_error(self.image_size, self.image_size)
        if problem is not None:
            field = "image_size" if "divisible" in problem else "window_size"
            fail(field, f"must fit the stages ({problem})", getattr(self, field))

    def swin_grid_error(self, height: int, width: int) -> str | None:
        """Why a `height` x `width` input cannot pass through this Swin's stages, or None if it can. The one rule
        for both the config (at `image_size`) and every forward: the sides divide by the total downsampling, and
        every stage's token grid splits into the windows its blocks were built with (a stage no larger than
        `window_size` attends over all of its tokens, as in Swin)."""
        p, stages = self.patch_size, len(self.depths)
        stride = p * 2 ** (stages - 1)
        if height % stride or width % stride:
            return f"height and width must be divisible by patch_size * 2**(stages-1) = {stride}; got {height}x{width}"
        built = self.stage_window_sizes
        for s in range(stages):
            h, w = height // (p * 2**s), width // (p * 2**s)
            if min(h, w) < self.window_size < max(h, w):
                return (f"stage {s} has a non-square {h}x{w} token grid smaller than the window ({self.window_size}) "
                        f"on one side only; got {height}x{width}")
            if h % built[s] or w % built[s]:
                multiple = math.lcm(*(p * 2**t * built[t] for t in range(stages)))
                return (f"stage {s} has a {h}x{w} token grid, but its blocks attend in {built[s]}x{built[s]} windows, "
                        f"so both sides must be multiples of {built[s]}: height and width must be multiples of "
                        f"{multiple} pixels for this model; got {height}x{width}")
        return None

    # ------------------------------------------------------------------ SwinV2
    def _validate_swinv2(self, fail) -> None:
        """SwinV2 on top of the Swin layout rules: q/v biases only, one pretrained window per stage."""
        if self.use_key_bias:
            fail("use_key_bias", "must be False for SwinV2 (it learns q and v biases only, as the official code)",
                 self.use_key_bias)
        windows = self.pretrained_window_sizes
        if windows is not None:
            if len(windows) != len(self.depths):
                fail("pretrained_window_sizes", f"must have one entry per stage ({len(self.depths)} stages)", windows)
            if any(w == 1 for w in windows):
                fail("pretrained_window_sizes", "entries must be 0 (none) or a window >= 2 (coordinates are divided "
                     "by window - 1)", windows)

    @property
    def stage_window_sizes(self) -> list[int]:
        """Swin / SwinV2: the window each stage attends in at `image_size` (a stage smaller than `window_size`
        attends over all of its tokens)."""
        return [min(self.window_size, self.image_size // (self.patch_size * 2**s)) for s in range(len(self.depths))]

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
        windows = self.pretrained_window_sizes
        if windows is not None and (not isinstance(windows, list) or not all(_is_int(v) and v >= 0 for v in windows)):
            fail("pretrained_window_sizes", "must be None or a list of integers >= 0 (one per stage, 0 = none)",
                 windows)
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

    def _validate_components(self) -> None:
        """The component-study options (head, loss, target, loss area); needs the derived `encoder_stride`."""

        def fail(field: str, expected: str, value) -> None:
            raise ValueError(f"SimMIMConfig: `{field}` {expected}; got {field}={value!r}.")

        for field, choices in (("head_type", HEAD_TYPES), ("loss_type", LOSS_TYPES), ("loss_area", LOSS_AREAS)):
            if getattr(self, field) not in choices:
                fail(field, f"must be one of {choices}", getattr(self, field))
        if self.head_hidden_size is not None and self.head_hidden_size <= 0:
            fail("head_hidden_size", "must be a positive integer or None (None: the encoder width)",
                 self.head_hidden_size)
        if not 2 <= self.num_color_bins <= 256 or 256 % self.num_color_bins:
            fail("num_color_bins", "must divide 256 and be at least 2 (2, 4, 8, ..., 256: equal bins of 8-bit "
                 "values)", self.num_color_bins)
        r = self.prediction_resolution
        if r is not None:
            if r <= 0 or self.image_size % r:
                fail("prediction_resolution", f"must be None or a positive divisor of image_size={self.image_size}",
                     r)
            if self.encoder_stride % (self.image_size // r):
                # The head turns each (image_size / encoder_stride)-grid feature into a block of
                # encoder_stride / factor target pixels: the factor must divide the stride.
                fail("prediction_resolution",
                     f"must be a multiple of image_size / encoder_stride = {self.image_size // self.encoder_stride}"
                     f" (the averaging factor image_size / r must divide encoder_stride={self.encoder_stride})", r)
        for field in ("image_mean", "image_std"):
            value = getattr(self, field)
            if not isinstance(value, list) or len(value) != self.num_channels or not all(_is_real(v) for v in value) \
                    or (field == "image_std" and not all(v > 0 for v in value)):
                fail(field, f"must be a list of {self.num_channels} numbers (one per channel"
                     + (", each > 0)" if field == "image_std" else ")"), value)
        k = self.norm_target_patch_size
        if k is not None:
            if k < 3 or k % 2 == 0:
                fail("norm_target_patch_size", "must be None or an odd window size >= 3 (centred on each pixel; "
                     "the variance needs at least 2 pixels)", k)
            if self.loss_type == "color_ce":
                fail("norm_target_patch_size", "must be None with loss_type='color_ce' (the classes are raw "
                     "colours, not a normalised target)", k)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As transformers', plus validation of keyword overrides. transformers builds the config with
        `cls(**config_dict)` (validated in `__init__`, so a hand-edited config.json is checked) but then *assigns*
        keyword overrides such as `from_pretrained(path, mask_ratio=0.5)` with setattr, bypassing `__init__`; a
        config changed that way is rebuilt once through `__init__`, which checks it as a whole and recomputes the
        fields derived from others (`from_pretrained(path, patch_size=8)` changes `encoder_stride` too)."""
        kwargs = _keep_prediction_factor(kwargs, config_dict.get("image_size"), config_dict.get("prediction_resolution"))
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if kwargs.get("return_unused_kwargs") else result
        if any(key in kwargs for key in cls._init_field_names()):
            rebuilt = cls(**config.to_dict())
            for key in rebuilt._derived_fields():
                setattr(config, key, getattr(rebuilt, key))
        return result

    def _derived_fields(self) -> tuple[str, ...]:
        """Fields computed from others in `__init__` (given values must agree): never written to config.json, so
        editing a saved config (e.g. `embed_dim`) cannot leave a stale derived value behind."""
        return ("encoder_stride",) + (("hidden_size",) if self.encoder_type in ("swin", "swinv2") else ())

    def to_dict(self) -> dict:
        values = super().to_dict()
        for key in self._derived_fields():
            values.pop(key, None)
        return values

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
        values.update(_keep_prediction_factor(overrides, self.image_size, self.prediction_resolution))
        return type(self)(**values)  # derived fields are not in `to_dict`: recomputed unless overridden

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
    def prediction_downsample(self) -> int:
        """Side in pixels of the square one predicted target value averages: image_size / prediction_resolution
        (1 = every pixel)."""
        return 1 if self.prediction_resolution is None else self.image_size // self.prediction_resolution

    @property
    def num_layers_for_decay(self) -> int:
        """Number of blocks, the `depth` of layer-wise lr decay."""
        return self.num_hidden_layers if self.encoder_type == "vit" else sum(self.depths)


def _keep_prediction_factor(overrides: dict, old_image_size, old_resolution) -> dict:
    """`overrides`, plus the `prediction_resolution` that keeps the averaging factor image_size / r (and so the
    head's shape) when `image_size` changes and r is not itself overridden."""
    new_size = overrides.get("image_size")
    if not old_resolution or new_size is None or "prediction_resolution" in overrides or not old_image_size:
        return dict(overrides)
    factor = old_image_size // old_resolution
    if new_size % factor:
        raise ValueError(f"image_size={new_size} with prediction_resolution={old_resolution} at image_size="
                         f"{old_image_size}: the averaging factor {factor} must divide the new image_size; pass "
                         "prediction_resolution too.")
    return {**overrides, "prediction_resolution": new_size // factor}


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


__all__ = ["SimMIMConfig", "PRESETS", "HEAD_TYPES", "LOSS_TYPES", "LOSS_AREAS", "parse_config_overrides"]
