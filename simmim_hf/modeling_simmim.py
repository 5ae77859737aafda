"""SimMIM models: ViT (BEiT-style, as in the paper), Swin v1 and SwinV2 encoders, the linear reconstruction head with
the masked L1 loss, and an image classifier for fine-tuning.

Data flow of `SimMIMForMaskedImageModeling` (B = batch, p = patch size, s = encoder stride, C = width):

    pixel_values (B, 3, H, W) --patch conv--> (B, H/p * W/p, C) --masked patches -> mask token-->
    encoder (ViT blocks | Swin / SwinV2 stages) --> feature map (B, C, H/s, W/s) --1x1 conv--> (B, s*s*3, H/s, W/s)
    --PixelShuffle(s)--> reconstruction (B, 3, H, W);   loss = L1 on the masked pixels only.

That is the paper's default; the config's component options (head_type, loss_type, prediction_resolution,
loss_area, norm_target_patch_size) swap one piece each, see `SimMIMForMaskedImageModeling`.

Hub-facing module: copied next to the weights for `trust_remote_code`, so it imports its siblings only
relatively and depends on nothing but torch and transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    MaskedImageModelingOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple

from .configuration_simmim import SimMIMConfig

# Additive bias that keeps tokens from different regions of a shifted Swin window apart. The official
# Swin/SimMIM code uses -100 rather than -inf (exp(-100) underflows to 0 in fp32 and bf16 alike).
SHIFTED_WINDOW_MASK_VALUE = -100.0
# The official ViT fine-tuning model multiplies its freshly drawn classifier weights by `init_scale`.
VIT_CLASSIFIER_INIT_SCALE = 1e-3


# `save_pretrained` writes only the saved class into config.json's `auto_map`; a Hub checkpoint should load
# through every Auto class, so the model fills in all of them (the files they name are saved alongside).
AUTO_MAP = {
    "AutoConfig": "configuration_simmim.SimMIMConfig",
    "AutoModel": "modeling_simmim.SimMIMModel",
    "AutoModelForMaskedImageModeling": "modeling_simmim.SimMIMForMaskedImageModeling",
    "AutoModelForImageClassification": "modeling_simmim.SimMIMForImageClassification",
}


# ---------------------------------------------------------------------------------------------- outputs
@dataclass
class SimMIMModelOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`(B, L, C)`): final token states (ViT: CLS first, then the H/p * W/p patch tokens; Swin:
        the (H/s) * (W/s) tokens of the last stage) after the final LayerNorm; with `config.use_fc_norm` (the
        official ViT fine-tuning layout) there is no final LayerNorm and the tokens are the last block's output.
    pooler_output (`(B, C)`): the image features a classifier reads. ViT `pooling="mean"`: mean of the
        patch tokens (normalised ones; with `use_fc_norm`, LayerNorm of the mean of the raw ones); ViT
        `pooling="cls"`: the normalised CLS token; Swin: mean of the normalised tokens (official avgpool).
    feature_map (`(B, C, H/s, W/s)`): the patch tokens of `last_hidden_state` as an image-shaped map, the input
        of the SimMIM head.
    hidden_states: ViT: the embeddings and the output of every block (`num_hidden_layers + 1` tensors);
        Swin: the embeddings and the output of every stage before its patch merging (`len(depths) + 1`).
    attentions: per block, `(B, heads, L, L)` for ViT, `(B * windows, heads, w*w, w*w)` for Swin.
    """

    feature_map: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------- helpers
def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole residual branches per sample, rescaling the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * keep / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


def relative_position_index(height: int, width: int, with_cls: bool) -> torch.Tensor:
    """Index into a relative position bias table for every (query, key) pair of a height x width grid.

    The table has (2h-1)*(2w-1) rows, one per relative offset; with a CLS token (BEiT-style ViT) three more
    rows follow for cls->token, token->cls and cls->cls. Returns (N, N) int64, N = h*w (+1 with CLS).
    """
    coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (hw, hw, 2)
    index = (relative[..., 0] + height - 1) * (2 * width - 1) + (relative[..., 1] + width - 1)
    if not with_cls:
        return index
    num_offsets = (2 * height - 1) * (2 * width - 1)
    full = torch.empty((height * width + 1,) * 2, dtype=index.dtype)
    full[1:, 1:] = index
    full[0, :] = num_offsets  # cls -> token
    full[:, 0] = num_offsets + 1  # token -> cls
    full[0, 0] = num_offsets + 2  # cls -> cls
    return full


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/w * W/w, w*w, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """(B, nW, w*w, C) -> (B, H, W, C); inverse of `window_partition`. One copy, whatever the input's strides."""
    b, _, _, c = windows.shape
    x = windows.unflatten(1, (height // window, width // window)).unflatten(3, (window, window))
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask (nW, w*w, w*w) that stops attention between regions a cyclic shift brought together."""
    regions = torch.zeros(1, height, width, 1)
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in slices:
        for ws in slices:
            regions[:, hs, ws, :] = label
            label += 1
    regions = window_partition(regions, window).squeeze(0).squeeze(-1)  # (nW, w*w)
    different = regions[:, None, :] != regions[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, SHIFTED_WINDOW_MASK_VALUE)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention in plain torch ops. Used for `output_attentions=True`, and on CPU when the additive mask needs
    a gradient (see `SimMIMAttention.attention_function`).

    query/key/value: (B, heads, N, d); attention_mask: additive, broadcastable to (B, heads, N, N).
    Returns ((B, N, heads, d), (B, heads, N, N)), the layout of transformers' attention functions.
    """
    scores = torch.matmul(query, key.transpose(-1, -2))
    # Scale and bias in one pass; scaling the scores rather than q and k keeps no scaled copies for backward.
    scores = scores * scaling if attention_mask is None else torch.add(attention_mask, scores, alpha=scaling)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# ---------------------------------------------------------------------------------------------- shared blocks
class SimMIMRelativePositionBias(nn.Module):
    """A learned bias per head and relative offset on an h x w grid (a ViT image or a Swin window)."""

    def __init__(self, grid: tuple[int, int], num_heads: int, with_cls: bool):
        super().__init__()
        self.grid = grid
        self.with_cls = with_cls
        num_rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + (3 if with_cls else 0)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rows, num_heads))
        # Derived from the grid, so it is rebuilt on load instead of stored.
        self.register_buffer("relative_position_index", relative_position_index(*grid, with_cls), persistent=False)

    def forward(self) -> torch.Tensor:
        """Returns the bias (heads, N, N)."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class SimMIMAttention(nn.Module):
    """Multi-head self-attention over one or several independent token groups (Swin windows).

    One fused qkv projection; its bias is split into q/k/v parts because the official ViT learns q and v
    biases only (the key bias is fixed at zero) while Swin and transformers' ViT learn all three.
    """

    def __init__(self, config: SimMIMConfig, dim: int, num_heads: int, bias_grid: tuple[int, int] | None,
                 with_cls: bool = False):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if config.qkv_bias else None
        self.k_bias = nn.Parameter(torch.zeros(dim)) if config.qkv_bias and config.use_key_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if config.qkv_bias else None
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.relative_position_bias = (
            SimMIMRelativePositionBias(bias_grid, num_heads, with_cls) if bias_grid is not None else None
        )

    def qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None:
            return None
        k_bias = self.k_bias if self.k_bias is not None else torch.zeros_like(self.v_bias)
        return torch.cat((self.q_bias, k_bias, self.v_bias))

    def attention_function(self, attention_bias: torch.Tensor | None, output_attentions: bool):
        if output_attentions:
            return eager_attention_forward
        implementation = self.config._attn_implementation
        # PyTorch's SDPA has no fused CPU kernel that returns a gradient for the additive mask, so with a learned
        # bias in training it runs its math path, which scales q and k separately and adds a safe-softmax pass:
        # `eager_attention_forward` is the same math with fewer passes over memory (faster forward and backward).
        if (implementation == "sdpa" and attention_bias is not None and attention_bias.device.type == "cpu"
                and attention_bias.requires_grad and torch.is_grad_enabled()):
            return eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None,
                output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states: (B, G, N, C), G independent groups (Swin windows; G = 1 for ViT).
        attention_bias: additive, broadcastable to (G, heads, N, N); the block's own relative position bias (if
        any) is added here. Returns (B, G, N, C) (a strided view) and, if asked, weights (B*G, heads, N, N).
        """
        b, g, n, c = hidden_states.shape
        qkv = F.linear(hidden_states, self.qkv.weight, self.qkv_bias())
        # (B, G, N, 3, heads, d) -> 3 x (B, G * heads, N, d) in one copy. Groups and heads share the attention
        # batch dim, so one (G * heads, N, N) bias broadcasts over the batch without being copied per image.
        query, key, value = (
            qkv.view(b, g, n, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
            .reshape(3, b, g * self.num_heads, n, self.head_dim).unbind(0)
        )

        if self.relative_position_bias is not None:
            own_bias = self.relative_position_bias()  # (heads, N, N)
            attention_bias = own_bias if attention_bias is None else attention_bias + own_bias
        if attention_bias is not None:
            attention_bias = attention_bias.to(query.dtype).expand(g, self.num_heads, n, n).reshape(1, -1, n, n)

        attention_fn = self.attention_function(attention_bias, output_attentions)
        context, weights = attention_fn(
            self, query, key, value, attention_bias,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, is_causal=False,
        )
        # The projection acts per token, so it runs in the (B, N, G, C) order the attention returns; the caller's
        # next reshape (the window reverse) makes the one copy back into its own order.
        output = self.proj_dropout(self.proj(context.view(b, n, g, c)))
        # Eager attention returns its weights whether asked or not; passed on unasked, they would be a layer output
        # that needs a gradient and never gets one, which reentrant gradient checkpointing refuses in backward.
        weights = weights.view(b * g, self.num_heads, n, n) if output_attentions else None
        return output.transpose(1, 2), weights


class SimMIMMLP(nn.Module):
    def __init__(self, config: SimMIMConfig, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.activation(self.fc1(x)))))


# ---------------------------------------------------------------------------------------------- ViT
class SimMIMViTEmbeddings(nn.Module):
    """Patch projection, mask token (replacing masked patches right after the projection, as the official
    code does), CLS token and optional absolute position embeddings."""

    def __init__(self, config: SimMIMConfig):
        super().__init__()
        grid = config.image_size // config.patch_size
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = (
            nn.Parameter(torch.zeros(1, grid * grid + 1, config.hidden_size))
            if config.use_absolute_position_embeddings else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + H/p * W/p, C)."""
        patches = self.projection(pixel_values).flatten(2).transpose(1, 2)
        if bool_masked_pos is not None:
            masked = bool_masked_pos.unsqueeze(-1).type_as(patches)
            patches = patches * (1.0 - masked) + self.mask_token.to(patches.dtype) * masked
        tokens = torch.cat((self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype), patches), dim=1)
        if self.position_embeddings is not None:
            tokens = tokens + self.position_embeddings
        return self.dropout(tokens)


class SimMIMViTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block with optional LayerScale (lambda_1, lambda_2) and stochastic depth."""

    def __init__(self, config: SimMIMConfig, layer_index: int, drop_path_rate: float):
        super().__init__()
        self.layer_index = layer_index
        grid = config.image_size // config.patch_size
        dim = config.hidden_size
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = SimMIMAttention(
            config, dim, config.num_attention_heads,
            bias_grid=(grid, grid) if config.use_relative_position_bias else None, with_cls=True,
        )
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = SimMIMMLP(config, dim, config.intermediate_size)
        # The official ViT shrinks the residual-branch outputs of block l (1-based) by 1/sqrt(2l) at init. The depth
        # sits on the two projections, which own parameters: transformers skips `_init_weights` for a module without
        # parameters of its own, which this block is without LayerScale.
        for linear in (self.attention.proj, self.mlp.fc2):
            linear.residual_rescale_depth = layer_index + 1
        use_layer_scale = config.layer_scale_init_value and config.layer_scale_init_value > 0
        self.lambda_1 = nn.Parameter(torch.ones(dim)) if use_layer_scale else None
        self.lambda_2 = nn.Parameter(torch.ones(dim)) if use_layer_scale else None
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None,
                output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(self.layernorm_before(hidden_states).unsqueeze(1), attention_bias,
                                           output_attentions)
        attended = attended.squeeze(1)
        if self.lambda_1 is not None:
            attended = self.lambda_1 * attended
        hidden_states = hidden_states + self.drop_path(attended)
        transformed = self.mlp(self.layernorm_after(hidden_states))
        if self.lambda_2 is not None:
            transformed = self.lambda_2 * transformed
        return hidden_states + self.drop_path(transformed), weights


class SimMIMViTEncoder(nn.Module):
    def __init__(self, config: SimMIMConfig):
        super().__init__()
        grid = config.image_size // config.patch_size
        self.relative_position_bias = (
            SimMIMRelativePositionBias((grid, grid), config.num_attention_heads, with_cls=True)
            if config.use_shared_relative_position_bias else None
        )
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.layers = nn.ModuleList([SimMIMViTLayer(config, i, rate) for i, rate in enumerate(rates)])

    def forward(self, hidden_states, output_hidden_states=False, output_attentions=False):
        # The shared bias is gathered from its table once per forward, not once per block.
        shared_bias = self.relative_position_bias() if self.relative_position_bias is not None else None
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, shared_bias, output_attentions)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return hidden_states, all_hidden, all_attentions


# ---------------------------------------------------------------------------------------------- Swin
class SimMIMSwinEmbeddings(nn.Module):
    """Patch projection, its LayerNorm, then the mask token (official order), optional absolute positions."""

    def __init__(self, config: SimMIMConfig):
        super().__init__()
        grid = config.image_size // config.patch_size
        self.projection = nn.Conv2d(config.num_channels, config.embed_dim, config.patch_size, config.patch_size)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps) if config.patch_norm else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.position_embeddings = (
            nn.Parameter(torch.zeros(1, grid * grid, config.embed_dim))
            if config.use_absolute_position_embeddings else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/p * W/p, embed_dim)."""
        tokens = self.projection(pixel_values).flatten(2).transpose(1, 2)
        if self.norm is not None:
            tokens = self.norm(tokens)
        if bool_masked_pos is not None:
            masked = bool_masked_pos.unsqueeze(-1).type_as(tokens)
            tokens = tokens * (1.0 - masked) + self.mask_token.to(tokens.dtype) * masked
        if self.position_embeddings is not None:
            tokens = tokens + self.position_embeddings
        return self.dropout(tokens)


class SimMIMShiftedWindowLayer(GradientCheckpointingLayer):
    """What Swin v1 and v2 blocks share: the window partition of a stage (a stage no larger than the window attends
    globally and does not shift, as in Swin), the shift with its attention mask, and attention within windows."""

    def _init_windows(self, config: SimMIMConfig, resolution: int, shift: bool) -> None:
        self.window_size = min(config.window_size, resolution)
        self.shifts = shift  # every second block; whether it does at a given input depends on the stage's grid
        self.shift_size = self._shift_at(resolution, resolution)  # at the built resolution
        # The shift mask at the configured resolution is built once; other resolutions build theirs on the fly.
        self.resolution = resolution
        self.register_buffer("shift_mask", self._shift_mask(resolution, resolution), persistent=False)

    def _shift_at(self, height: int, width: int) -> int:
        """Swin's rule at a stage grid: a shifting block moves by half a window unless a side is no longer than the
        window (nothing to shift). A model run at another input size than it was built for shifts, or not, as one
        built at that size does (a window clipped to a small built stage stays clipped, so there it cannot)."""
        return self.window_size // 2 if self.shifts and min(height, width) > self.window_size else 0

    def _shift_mask(self, height: int, width: int) -> torch.Tensor | None:
        shift = self._shift_at(height, width)
        return shifted_window_mask(height, width, self.window_size, shift) if shift else None

    def _window_attention(self, x: torch.Tensor, grid: tuple[int, int], output_attentions: bool):
        """x (B, H, W, C) -> attention within (shifted) windows, (B, H*W, C), and the weights if asked."""
        height, width = grid
        b, _, _, c = x.shape
        shift = self._shift_at(height, width)  # at a smaller or larger input than the built one too
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, self.window_size)  # (B, nW, w*w, C)
        attention_bias = None
        if shift:
            mask = self.shift_mask if grid == (self.resolution,) * 2 else self._shift_mask(height, width).to(x)
            attention_bias = mask.unsqueeze(1)  # (nW, 1, N, N): the same for every head
        attended, weights = self.attention(windows, attention_bias, output_attentions)
        x = window_reverse(attended, self.window_size, height, width)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x.reshape(b, height * width, c), weights


class SimMIMSwinLayer(SimMIMShiftedWindowLayer):
    """Swin block: (shifted) window attention, then MLP, both pre-norm with residuals."""

    def __init__(self, config: SimMIMConfig, dim: int, num_heads: int, resolution: int, shift: bool,
                 drop_path_rate: float):
        super().__init__()
        self._init_windows(config, resolution, shift)
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = SimMIMAttention(config, dim, num_heads, bias_grid=(self.window_size,) * 2)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = SimMIMMLP(config, dim, int(dim * config.mlp_ratio))
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int], output_attentions: bool = False):
        """hidden_states (B, H*W, C) on an H x W token grid."""
        b, _, c = hidden_states.shape
        x = self.layernorm_before(hidden_states).view(b, *grid, c)
        attended, weights = self._window_attention(x, grid, output_attentions)
        hidden_states = hidden_states + self.drop_path(attended)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.layernorm_after(hidden_states)))
        return hidden_states, weights


def concat_2x2_neighbours(hidden_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H * W, C) tokens -> (B, H/2 * W/2, 4C): each 2x2 neighbourhood's channels side by side, in Swin's order
    x0, x1, x2, x3 = (even row, even col), (odd, even), (even, odd), (odd, odd) (pretrained weights depend on it)."""
    height, width = grid
    b, _, c = hidden_states.shape
    x = hidden_states.view(b, height, width, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    return x.view(b, -1, 4 * c)


class SimMIMPatchMerging(nn.Module):
    """Halve the token grid and double the width: concatenate 2x2 neighbours (4C), norm, project to 2C."""

    def __init__(self, config: SimMIMConfig, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=config.layer_norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.reduction(self.norm(concat_2x2_neighbours(hidden_states, grid)))


class SimMIMSwinStage(nn.Module):
    """The blocks of one resolution (shifted windows on every second block), then patch merging unless last.
    SwinV2 swaps in its block and merging classes (and passes the stage's pretrained window)."""

    layer_class = SimMIMSwinLayer
    merging_class = SimMIMPatchMerging

    def __init__(self, config: SimMIMConfig, stage: int, drop_path_rates: list[float]):
        super().__init__()
        dim = config.embed_dim * 2**stage
        resolution = config.image_size // (config.patch_size * 2**stage)
        self.blocks = nn.ModuleList([
            self.layer_class(config, dim, config.num_heads[stage], resolution, shift=i % 2 == 1,
                             drop_path_rate=rate, **self.layer_kwargs(config, stage))
            for i, rate in enumerate(drop_path_rates)
        ])
        self.downsample = self.merging_class(config, dim) if stage < len(config.depths) - 1 else None

    @staticmethod
    def layer_kwargs(config: SimMIMConfig, stage: int) -> dict:
        return {}


class SimMIMSwinEncoder(nn.Module):
    stage_class = SimMIMSwinStage  # SwinV2 swaps in its own stages

    def __init__(self, config: SimMIMConfig):
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        starts = [sum(config.depths[:s]) for s in range(len(config.depths))]
        self.stages = nn.ModuleList([
            self.stage_class(config, s, rates[start:start + depth])
            for s, (start, depth) in enumerate(zip(starts, config.depths))
        ])

    def forward(self, hidden_states, grid, output_hidden_states=False, output_attentions=False):
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for stage in self.stages:
            for block in stage.blocks:
                hidden_states, weights = block(hidden_states, grid, output_attentions)
                if output_attentions:
                    all_attentions += (weights,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if stage.downsample is not None:
                hidden_states = stage.downsample(hidden_states, grid)
                grid = (grid[0] // 2, grid[1] // 2)
        return hidden_states, grid, all_hidden, all_attentions


# ---------------------------------------------------------------------------------------------- SwinV2
# Swin Transformer V2 as microsoft/Swin-Transformer `models/swin_transformer_v2.py` (and its SimMIM wrapper, whose
# embeddings are Swin v1's: patch projection, its norm, then the mask token): cosine attention with a clamped
# per-head temperature, a continuous position bias (CPB) computed by a small MLP from log-spaced relative
# coordinates, q and v biases only, res-post-norm blocks and reduce-then-norm patch merging.

# The learned per-head log temperature is clamped at log(1 / 0.01), so cosine logits are scaled by at most 100.
SWINV2_MAX_LOGIT_SCALE = math.log(1.0 / 0.01)
SWINV2_INITIAL_LOGIT_SCALE = math.log(10.0)
# The CPB MLP maps a 2-d relative coordinate through 512 hidden units to one value per head; its output is bounded
# by 16 * sigmoid.
SWINV2_CPB_HIDDEN_SIZE = 512
SWINV2_CPB_BIAS_BOUND = 16.0


def swinv2_relative_coords_table(window: int, pretrained_window: int = 0) -> torch.Tensor:
    """The CPB MLP's input, ((2w-1)^2, 2) rows in the row order `relative_position_index` reads.

    Each relative offset (dy, dx) of a w x w window is divided by `pretrained_window - 1` (by `w - 1` when
    `pretrained_window` is 0), stretched to [-8, 8] and compressed log-spaced: sign(t) * log2(1 + |t|) / log2(8).
    Normalising by the pretraining window keeps the offsets seen in pretraining at the same coordinates when a
    larger window is used for fine-tuning. A 1x1 window has the single offset 0 and divides by nothing.
    """
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)
    span = (pretrained_window if pretrained_window > 0 else window) - 1
    if span > 0:
        table = table / span
    table = table * 8
    return (torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)).reshape(-1, 2)


class SimMIMSwinV2Attention(SimMIMAttention):
    """SwinV2 window attention: logits = cos(q, k) * exp(min(logit_scale, log 100)) + 16 * sigmoid(CPB(coords)).

    It reuses `SimMIMAttention`'s fused qkv projection (q and v biases, the key bias fixed at zero), output
    projection and kernel choice. The normalised q, multiplied by its head's scale, and the normalised k go through
    the standard kernels (SDPA) with scale 1 and the position bias (plus any shift mask) as the additive mask.

    Numerics: the normalisation, the CPB MLP and the attention itself (logits, softmax, weighted sum of the values)
    run in float32 whatever the autocast or parameter dtype; cosine logits scaled by up to 100 need float32's
    precision, and half-precision norms of large q and k overflow (|q|^2 beyond 65504 in fp16), one way SwinV2 turns
    NaN in fp16. The projections before and after run in the compute dtype.
    """

    def __init__(self, config: SimMIMConfig, dim: int, num_heads: int, window: int, pretrained_window: int = 0):
        super().__init__(config, dim, num_heads, bias_grid=None)
        self.window_size = window
        self.pretrained_window_size = pretrained_window
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), SWINV2_INITIAL_LOGIT_SCALE))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, SWINV2_CPB_HIDDEN_SIZE), nn.ReLU(inplace=True),
            nn.Linear(SWINV2_CPB_HIDDEN_SIZE, num_heads, bias=False),
        )
        # Both derive from the window sizes alone: rebuilt on load, never stored.
        self.register_buffer("relative_coords_table", swinv2_relative_coords_table(window, pretrained_window),
                             persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window, window, with_cls=False),
                             persistent=False)

    def set_pretrained_window_size(self, pretrained_window: int) -> None:
        """Renormalise the CPB coordinates for another pretraining window (0 = this window)."""
        self.pretrained_window_size = pretrained_window
        table = swinv2_relative_coords_table(self.window_size, pretrained_window)
        self.relative_coords_table = table.to(self.relative_coords_table.device)

    def logit_scales(self) -> torch.Tensor:
        """(heads, 1, 1) float32: the clamped, exponentiated temperatures."""
        return torch.clamp(self.logit_scale.float(), max=SWINV2_MAX_LOGIT_SCALE).exp()

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) float32: 16 * sigmoid of the CPB MLP's output, gathered for every (query, key) pair."""
        first, _, second = self.cpb_mlp
        hidden = F.relu(F.linear(self.relative_coords_table.float(), first.weight.float(), first.bias.float()))
        table = SWINV2_CPB_BIAS_BOUND * torch.sigmoid(F.linear(hidden, second.weight.float()))  # (rows, heads)
        n = self.relative_position_index.shape[0]
        return table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None,
                output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `SimMIMAttention.forward`: hidden_states (B, G, N, C), attention_bias (G, 1, N, N) or None."""
        b, g, n, c = hidden_states.shape
        heads, head_dim = self.num_heads, self.head_dim
        qkv = F.linear(hidden_states, self.qkv.weight, self.qkv_bias())
        query, key, value = (
            qkv.view(b, g, n, 3, heads, head_dim).permute(3, 0, 1, 4, 2, 5)
            .reshape(3, b, g * heads, n, head_dim).unbind(0)
        )
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            query = F.normalize(query.float(), dim=-1).view(b, g, heads, n, head_dim) * self.logit_scales()
            query = query.view(b, g * heads, n, head_dim)
            key = F.normalize(key.float(), dim=-1)
            bias = self.position_bias().unsqueeze(0)  # (1, heads, N, N)
            if attention_bias is not None:
                bias = bias + attention_bias.float()
            bias = bias.expand(g, heads, n, n).reshape(1, g * heads, n, n)
            attention_fn = self.attention_function(bias, output_attentions)
            context, weights = attention_fn(
                self, query, key, value.float(), bias,
                dropout=self.attention_dropout if self.training else 0.0, scaling=1.0, is_causal=False,
            )
        output = self.proj_dropout(self.proj(context.to(qkv.dtype).view(b, n, g, c)))
        weights = weights.view(b * g, heads, n, n) if output_attentions else None  # unasked: none (see above)
        return output.transpose(1, 2), weights


class SimMIMSwinV2PostNorm(nn.LayerNorm):
    """The LayerNorm on a residual branch's output (res-post-norm). Its own class so that initialisation finds it:
    transformers skips `_init_weights` for a custom module without parameters or buffers of its own, such as a
    block without a shift mask, so the block cannot reach into its norms itself."""


class SimMIMSwinV2Layer(SimMIMShiftedWindowLayer):
    """SwinV2 block, res-post-norm: x + norm(attention(x)), then x + norm(mlp(x)); (shifted) windows as Swin v1."""

    def __init__(self, config: SimMIMConfig, dim: int, num_heads: int, resolution: int, shift: bool,
                 drop_path_rate: float, pretrained_window: int = 0):
        super().__init__()
        self._init_windows(config, resolution, shift)
        self.attention = SimMIMSwinV2Attention(config, dim, num_heads, self.window_size, pretrained_window)
        self.attention_output_norm = SimMIMSwinV2PostNorm(dim, eps=config.layer_norm_eps)
        self.mlp = SimMIMMLP(config, dim, int(dim * config.mlp_ratio))
        self.mlp_output_norm = SimMIMSwinV2PostNorm(dim, eps=config.layer_norm_eps)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int], output_attentions: bool = False):
        """hidden_states (B, H*W, C) on an H x W token grid."""
        b, _, c = hidden_states.shape
        attended, weights = self._window_attention(hidden_states.view(b, *grid, c), grid, output_attentions)
        hidden_states = hidden_states + self.drop_path(self.attention_output_norm(attended))
        hidden_states = hidden_states + self.drop_path(self.mlp_output_norm(self.mlp(hidden_states)))
        return hidden_states, weights


class SimMIMSwinV2PatchMerging(nn.Module):
    """SwinV2 patch merging: concatenate 2x2 neighbours (4C, Swin's channel order), project to 2C, then norm."""

    def __init__(self, config: SimMIMConfig, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.norm(self.reduction(concat_2x2_neighbours(hidden_states, grid)))


class SimMIMSwinV2Stage(SimMIMSwinStage):
    layer_class = SimMIMSwinV2Layer
    merging_class = SimMIMSwinV2PatchMerging

    @staticmethod
    def layer_kwargs(config: SimMIMConfig, stage: int) -> dict:
        return {"pretrained_window": (config.pretrained_window_sizes or [0] * len(config.depths))[stage]}


class SimMIMSwinV2Encoder(SimMIMSwinEncoder):
    """Swin v1's stage loop over SwinV2 stages."""

    stage_class = SimMIMSwinV2Stage


def _init_swinv2_module(module: nn.Module, init_recipe: str) -> None:
    """SwinV2 parts of the initialisation, run after `_init_weights`' generic branches for the same module: the
    temperatures start at log(10), the rebuilt buffers are filled, and with the official recipe every block's
    post-norms start at zero weight and bias (`_init_respostnorm`, called unconditionally by the official model),
    so each block starts as the identity. transformers' Swinv2 keeps them at ones / zeros."""
    if isinstance(module, SimMIMSwinV2PostNorm) and init_recipe == "simmim":
        init.zeros_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, SimMIMSwinV2Attention):
        init.constant_(module.logit_scale, SWINV2_INITIAL_LOGIT_SCALE)
        init.copy_(module.relative_coords_table,
                   swinv2_relative_coords_table(module.window_size, module.pretrained_window_size))
        init.copy_(module.relative_position_index,
                   relative_position_index(module.window_size, module.window_size, with_cls=False))
    elif isinstance(module, SimMIMSwinV2Layer) and module.shift_mask is not None:
        init.copy_(module.shift_mask, module._shift_mask(module.resolution, module.resolution))


# ---------------------------------------------------------------------------------------------- models
def _scale_unless_loaded(parameter: torch.Tensor, factor: float) -> None:
    """Multiply a freshly initialised tensor in place; a tensor loaded from a checkpoint is left alone."""
    if not getattr(parameter, "_is_hf_initialized", False):
        with torch.no_grad():
            parameter.mul_(factor)


class SimMIMPooler(nn.Module):
    """LayerNorm over the mean of the patch tokens: the official ViT fine-tuning head's `fc_norm`, used instead
    of the encoder's final norm (which that model does not have)."""

    def __init__(self, config: SimMIMConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, C)."""
        return self.layernorm(patch_tokens.mean(dim=1))


class SimMIMPreTrainedModel(PreTrainedModel):
    config_class = SimMIMConfig
    config: SimMIMConfig
    base_model_prefix = "simmim"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SimMIMViTLayer", "SimMIMSwinLayer", "SimMIMSwinV2Layer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    @property
    def _no_weight_decay_keywords(self) -> tuple[str, ...]:
        """Parameters exempt from weight decay besides biases and other 1-D tensors (norms, LayerScale), as the
        official models list them (`no_weight_decay` / `no_weight_decay_keywords`): ViT only its CLS token and
        absolute positions (its mask token and relative position tables are decayed); Swin its absolute
        positions, relative position tables and (pretraining) mask token; SwinV2 also its continuous position
        bias MLP and logit scales. Replaces `simmim_hf.optimization.DEFAULT_NO_WEIGHT_DECAY_KEYWORDS`."""
        if self.config.encoder_type == "vit":
            return ("cls_token", "position_embeddings")
        swin = ("position_embeddings", "relative_position_bias_table", "mask_token")
        return swin + ("cpb_mlp", "logit_scale") if self.config.encoder_type == "swinv2" else swin

    # The official pretraining ViT (`VisionTransformerForSimMIM`) truncates every truncated-normal draw at
    # +-1 std; every other official model keeps timm's default bounds of +-2 (absolute, so untruncated at std
    # 0.02). `SimMIMModel(..., truncate_init_at_std=True)` selects the former (ViT only).
    truncate_init_at_std: bool = False

    def _trunc_normal(self, tensor: torch.Tensor, std: float) -> None:
        if self.truncate_init_at_std and self.config.encoder_type == "vit":
            init.trunc_normal_(tensor, std=std, a=-std, b=std)
        else:
            init.trunc_normal_(tensor, std=std)

    def _init_as_transformers(self, module: nn.Module, std: float) -> bool:
        """transformers' ViT/Swin `_init_weights` for the modules it differs on; True if `module` was handled.
        (The ViT residual rescale, which transformers does not have, is skipped in `_init_weights`.)"""
        if isinstance(module, (nn.Linear, nn.Conv2d)):  # every one, the SimMIM head included
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            return True
        if isinstance(module, (SimMIMViTEmbeddings, SimMIMSwinEmbeddings)):
            init.zeros_(module.mask_token)
            if isinstance(module, SimMIMViTEmbeddings):
                init.trunc_normal_(module.cls_token, std=std)
            if module.position_embeddings is not None:
                init.trunc_normal_(module.position_embeddings, std=std)
            return True
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """Initialisation of the official SimMIM code (timm-style truncated normal, std 0.02).

        Children are initialised before their parents, so a parent's branch below overrides its children's
        generic init (the ViT patch projection, the residual-branch rescale); `init.*` skips loaded tensors.
        """
        std = self.config.initializer_range
        if self.config.init_recipe == "transformers" and self._init_as_transformers(module, std):
            return
        if isinstance(module, nn.Linear):
            self._trunc_normal(module.weight, std)
            if module.bias is not None:
                init.zeros_(module.bias)
            depth = getattr(module, "residual_rescale_depth", None)
            if depth is not None and self.config.init_recipe == "simmim":
                _scale_unless_loaded(module.weight, 1.0 / math.sqrt(2.0 * depth))
        elif isinstance(module, nn.Conv2d):
            # PyTorch's default conv init, which the official code keeps for the Swin patch projection and the
            # SimMIM head.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (SimMIMViTEmbeddings, SimMIMSwinEmbeddings)):
            self._trunc_normal(module.mask_token, std)
            if isinstance(module, SimMIMViTEmbeddings):
                self._trunc_normal(module.cls_token, std)
                # The official ViT draws its patch projection like a linear layer, with a zero bias.
                self._trunc_normal(module.projection.weight, std)
                init.zeros_(module.projection.bias)
            if module.position_embeddings is not None:
                self._trunc_normal(module.position_embeddings, std)
        elif isinstance(module, SimMIMRelativePositionBias):
            # BEiT-style ViT starts its tables at zero, Swin draws them like the other weights.
            if module.with_cls:
                init.zeros_(module.relative_position_bias_table)
            else:
                init.trunc_normal_(module.relative_position_bias_table, std=std)
            init.copy_(module.relative_position_index, relative_position_index(*module.grid, module.with_cls))
        elif isinstance(module, SimMIMAttention):
            for bias in (module.q_bias, module.k_bias, module.v_bias):
                if bias is not None:
                    init.zeros_(bias)
        elif isinstance(module, SimMIMSwinLayer):
            if module.shift_mask is not None:
                init.copy_(module.shift_mask, module._shift_mask(module.resolution, module.resolution))
        elif isinstance(module, SimMIMViTLayer):
            if module.lambda_1 is not None:
                init.constant_(module.lambda_1, self.config.layer_scale_init_value)
                init.constant_(module.lambda_2, self.config.layer_scale_init_value)
            # Official ViT: shrink the residual-branch outputs of block l (1-based) by 1/sqrt(2l). The projections did
            # it already (above); redrawn here too, so that models with LayerScale keep their initial weights.
            if self.config.init_recipe == "simmim":
                for linear in (module.attention.proj, module.mlp.fc2):
                    self._trunc_normal(linear.weight, std)
                    _scale_unless_loaded(linear.weight, 1.0 / math.sqrt(2.0 * (module.layer_index + 1)))
        _init_swinv2_module(module, self.config.init_recipe)  # last: it refines the generic branches above

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Entries already present (e.g. "repo--module.Class" references of a model loaded from the Hub) win.
        self.config.auto_map = {**AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_layer_id_for_lr_decay(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay, as in the official fine-tuning code: 0 for the
        embeddings, i + 1 for the i-th block counted through all stages (a Swin patch merging belongs with the
        last block of its stage), `num_layers_for_decay + 1` for everything after the encoder (final norm,
        heads) and for a shared ViT relative position bias, which the official code also trains at full lr, as
        it does a Swin's absolute position embeddings (`get_swin_layer` puts only the patch embedding and the
        mask token at 0)."""
        name = name.removeprefix(f"{self.base_model_prefix}.")
        if name == "embeddings.position_embeddings" and self.config.encoder_type in ("swin", "swinv2"):
            return self.config.num_layers_for_decay + 1
        if name.startswith("embeddings."):
            return 0
        parts = name.split(".")
        if self.config.encoder_type == "vit" and parts[:2] == ["encoder", "layers"]:
            return int(parts[2]) + 1
        if self.config.encoder_type in ("swin", "swinv2") and parts[:2] == ["encoder", "stages"]:
            stage = int(parts[2])
            if parts[3] == "blocks":
                return sum(self.config.depths[:stage]) + int(parts[4]) + 1
            return sum(self.config.depths[:stage + 1])
        return self.config.num_layers_for_decay + 1


class SimMIMModel(SimMIMPreTrainedModel):
    """The SimMIM encoder (ViT or Swin per `config.encoder_type`), its final LayerNorm and pooled features.

    With `config.use_fc_norm` (ViT fine-tuning, as the official model) the final LayerNorm is replaced by one on
    the mean-pooled patch tokens (`pooler.layernorm`). `truncate_init_at_std=True` initialises as the official
    pretraining ViT (truncated normal cut at +-1 std); `SimMIMForMaskedImageModeling` sets it.
    """

    # Loading the encoder (or a classifier) from a pretraining checkpoint drops its head on purpose, and so does
    # an `fc_norm` ViT with the pretrained final norm, which the official fine-tuning model does not have.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^(simmim\.)?layernorm\."]

    def __init__(self, config: SimMIMConfig, truncate_init_at_std: bool = False):
        super().__init__(config)
        self.truncate_init_at_std = truncate_init_at_std
        if config.encoder_type == "vit":
            self.embeddings = SimMIMViTEmbeddings(config)
            self.encoder = SimMIMViTEncoder(config)
        else:
            self.embeddings = SimMIMSwinEmbeddings(config)
            self.encoder = SimMIMSwinV2Encoder(config) if config.encoder_type == "swinv2" else SimMIMSwinEncoder(config)
        use_fc_norm = config.encoder_type == "vit" and config.use_fc_norm
        self.layernorm = None if use_fc_norm else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = SimMIMPooler(config) if use_fc_norm else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.projection

    def _check_inputs(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> tuple[int, int]:
        """Validate shapes up front so that bad input fails with a message, not a reshape error deep inside."""
        config = self.config
        if pixel_values is None:
            raise ValueError("`pixel_values` is required, of shape (batch, num_channels, height, width).")
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"`pixel_values` must be a torch.Tensor; got {type(pixel_values).__name__}.")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != config.num_channels:
            raise ValueError(
                f"`pixel_values` must have shape (batch, {config.num_channels}, height, width); "
                f"got {tuple(pixel_values.shape)}."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError(f"`pixel_values` must hold at least one image; got batch size 0 (shape "
                             f"{tuple(pixel_values.shape)}).")
        if not pixel_values.is_floating_point():
            raise ValueError(
                "`pixel_values` must be floating point: the model expects normalised float pixel values, "
                f"(x / 255 - mean) / std as SimMIMImageProcessor returns them; got dtype={pixel_values.dtype}."
            )
        height, width = pixel_values.shape[-2:]
        p = config.patch_size
        if height < p or width < p:
            raise ValueError(f"`pixel_values` height and width must be at least patch_size={p}; got {height}x{width}.")
        if height % p or width % p:
            raise ValueError(
                f"`pixel_values` height and width must be divisible by patch_size={p}; got {height}x{width}."
            )
        grid = (height // p, width // p)
        if config.encoder_type == "vit":
            fixed = config.use_absolute_position_embeddings or config.use_relative_position_bias or \
                config.use_shared_relative_position_bias
            if fixed and (height, width) != (config.image_size, config.image_size):
                raise ValueError(
                    f"`pixel_values` must be {config.image_size}x{config.image_size} for this ViT: its position "
                    f"embeddings/biases are sized for {config.image_size}x{config.image_size} "
                    f"images; got pixel_values of {height}x{width}. Load the checkpoint with the target "
                    "`image_size` to interpolate them (see `simmim_hf.transfer`)."
                )
        else:
            problem = config.swin_grid_error(height, width)  # the config's own rule, at this input's size
            if problem is not None:
                raise ValueError(f"`pixel_values`: {problem}.")
            if config.use_absolute_position_embeddings and (height, width) != (config.image_size,) * 2:
                raise ValueError(
                    f"`pixel_values` must be {config.image_size}x{config.image_size} for this Swin: its absolute "
                    f"position embeddings are sized for {config.image_size}x{config.image_size} images; got "
                    f"pixel_values of {height}x{width}.")
        if bool_masked_pos is not None:
            if not isinstance(bool_masked_pos, torch.Tensor):
                raise ValueError(f"`bool_masked_pos` must be a torch.Tensor; got {type(bool_masked_pos).__name__}.")
            expected = (pixel_values.shape[0], grid[0] * grid[1])
            if tuple(bool_masked_pos.shape) != expected:
                raise ValueError(
                    f"`bool_masked_pos` must have shape (batch, (H/p)*(W/p)) = {expected} for pixel_values "
                    f"{tuple(pixel_values.shape)} and patch_size={p}; got {tuple(bool_masked_pos.shape)}."
                )
            if bool_masked_pos.dtype != torch.bool:
                if bool_masked_pos.is_floating_point() or bool_masked_pos.is_complex():
                    raise ValueError(f"`bool_masked_pos` must be boolean (or 0/1 integers); got {bool_masked_pos.dtype}.")
                # Only integer masks pay for this check (a host sync); boolean masks are valid by type.
                if ((bool_masked_pos != 0) & (bool_masked_pos != 1)).any():
                    raise ValueError("`bool_masked_pos` must contain only 0 and 1 (or be boolean).")
        return grid

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> SimMIMModelOutput | tuple:
        r"""
        pixel_values (`(B, C, H, W)`): normalised images.
        bool_masked_pos (`(B, (H/p)*(W/p))`, bool, *optional*): True where the patch is replaced by the mask token.
        """
        output_hidden_states = output_hidden_states if output_hidden_states is not None else \
            self.config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        grid = self._check_inputs(pixel_values, bool_masked_pos)
        pixel_values = pixel_values.to(self.embeddings.projection.weight.dtype)

        hidden_states = self.embeddings(pixel_values, bool_masked_pos)
        if self.config.encoder_type == "vit":
            hidden_states, all_hidden, all_attentions = self.encoder(
                hidden_states, output_hidden_states, output_attentions
            )
        else:
            hidden_states, grid, all_hidden, all_attentions = self.encoder(
                hidden_states, grid, output_hidden_states, output_attentions
            )
        sequence = self.layernorm(hidden_states) if self.layernorm is not None else hidden_states
        patches = sequence[:, 1:] if self.config.encoder_type == "vit" else sequence
        if self.pooler is not None:
            pooled = self.pooler(patches)
        elif self.config.encoder_type == "vit" and self.config.pooling == "cls":
            pooled = sequence[:, 0]
        else:
            pooled = patches.mean(dim=1)
        feature_map = patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid)

        return SimMIMModelOutput(
            last_hidden_state=sequence, pooler_output=pooled, hidden_states=all_hidden,
            attentions=all_attentions, feature_map=feature_map,
        )


def pixel_mask(bool_masked_pos: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Upsample a (B, (H/p)*(W/p)) patch mask to a (B, 1, H, W) float pixel mask (1 = masked)."""
    b = bool_masked_pos.shape[0]
    mask = bool_masked_pos.reshape(b, 1, height // patch_size, 1, width // patch_size, 1)
    return mask.expand(-1, -1, -1, patch_size, -1, patch_size).reshape(b, 1, height, width).float()


def target_mask(bool_masked_pos: torch.Tensor, height: int, width: int, patch_size: int,
                downsample: int = 1) -> torch.Tensor:
    """The mask of a target area-averaged over `downsample` x `downsample` squares: (B, 1, H/f, W/f) float,
    1 where *every* pixel of the square is masked (a target pixel that averages some visible pixels could be
    partly copied from the input). With f = 1 it is `pixel_mask`."""
    mask = pixel_mask(bool_masked_pos, height, width, patch_size)
    if downsample == 1:
        return mask
    f = downsample
    return mask.view(mask.shape[0], 1, height // f, f, width // f, f).amin(dim=(3, 5))


def area_average(pixel_values: torch.Tensor, downsample: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H/f, W/f): the mean of each f x f square (the low-resolution prediction target)."""
    return pixel_values if downsample == 1 else F.avg_pool2d(pixel_values, downsample)


def normalize_targets(targets: torch.Tensor, window: int) -> torch.Tensor:
    """Local per-channel normalisation of the target, as `norm_targets` of the official SwinV2 SimMIM code.

    For each pixel and channel, mean and variance over the `window` x `window` neighbourhood clipped to the image
    (n valid pixels: fewer at the borders); the variance is made unbiased (x n / (n - 1)) and clamped at 0.
    Returns (x - mean) / sqrt(var + 1e-6), the shape of `targets` (B, C, H, W).
    """
    mean, scale = local_target_stats(targets, window)
    return (targets - mean) / scale


def local_target_stats(targets: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sqrt(unbiased variance + 1e-6)) over each pixel's `window` x `window` neighbourhood clipped to the
    image: what `normalize_targets` subtracts and divides by (and what shows a prediction as an image again)."""
    pad = window // 2
    mean = F.avg_pool2d(targets, window, stride=1, padding=pad, count_include_pad=False)
    mean_of_squares = F.avg_pool2d(targets**2, window, stride=1, padding=pad, count_include_pad=False)
    # Valid pixels per window: the padded average of ones times the window area.
    count = F.avg_pool2d(torch.ones_like(targets), window, stride=1, padding=pad, count_include_pad=True) * window**2
    variance = ((mean_of_squares - mean**2) * (count / (count - 1))).clamp(min=0.0)
    return mean, (variance + 1e-6) ** 0.5


def _channel_stats(config: SimMIMConfig, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input normalisation, `config.image_mean` / `image_std`, as (1, C, 1, 1) float32 tensors."""
    shape = (1, len(config.image_mean), 1, 1)
    return (torch.tensor(config.image_mean, dtype=torch.float32, device=like.device).view(shape),
            torch.tensor(config.image_std, dtype=torch.float32, device=like.device).view(shape))


def color_classes(pixel_values: torch.Tensor, config: SimMIMConfig) -> torch.Tensor:
    """The colour-classification target: normalised (B, C, H, W) -> int64 bins (B, C, H, W) in [0, K).

    The input is un-normalised with the config's mean/std to 8-bit values (rounded: area-averaged targets are not
    integers), and value v falls in bin v // (256 / K), K = `config.num_color_bins`.
    """
    mean, std = _channel_stats(config, pixel_values)
    raw = ((pixel_values.float() * std + mean) * 255.0).round().clamp(0.0, 255.0)
    return torch.div(raw, 256 // config.num_color_bins, rounding_mode="floor").long()


def _bins_last(logits: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Colour logits (B, C*K, H, W), channel c*K + k -> (B, H, W, C, K), the bins last and contiguous. The head's
    output is channels-last in memory (the encoder's feature map is a transposed token sequence), so this is
    usually a view of the largest tensor of the step, not a copy; softmax over the last dim is the fast kernel."""
    b, _, h, w = logits.shape
    return logits.permute(0, 2, 3, 1).reshape(b, h, w, -1, num_bins)


def expected_color(logits: torch.Tensor, config: SimMIMConfig) -> torch.Tensor:
    """Colour logits (B, C*K, H, W) (channel c*K + k) -> the expected colour (B, C, H, W), normalised like the input.

    Each bin stands for its mean 8-bit value, (b + 1/2) * 256/K - 1/2 (bin b itself for K = 256).
    """
    k = config.num_color_bins
    probs = _bins_last(logits, k).float().softmax(dim=-1)  # (B, H, W, C, K)
    width = 256 // k
    centers = torch.arange(k, dtype=torch.float32, device=logits.device) * width + (width - 1) / 2
    colour = torch.matmul(probs, centers).permute(0, 3, 1, 2) / 255.0  # (B, C, H, W)
    mean, std = _channel_stats(config, logits)
    return ((colour - mean) / std).to(logits.dtype)


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, loss_type: str = "l1",
                        smooth_l1_beta: float = 1.0) -> torch.Tensor:
    """The SimMIM loss over the pixels `mask` counts, averaged over those pixels and the channels:

        loss = sum(error * m) / (sum(m) + 1e-5) / channels

    prediction: (B, C, h, w) values, or for `"color_ce"` (B, C*K, h, w) logits (channel c*K + k); target: (B, C, h, w)
    values, or int64 colour bins for `"color_ce"`; mask m: (B, 1, h, w), 1 = counted. The error per pixel and channel is
    |d| (`"l1"`), `smooth_l1_loss(d, beta)` (`"smooth_l1"`), d**2 (`"l2"`) or the cross-entropy of the true bin
    (`"color_ce"`), d = prediction - target.
    """
    channels = target.shape[1]
    # In float32 even under autocast: a bf16 sum over millions of pixels would lose the loss's precision.
    prediction = prediction.float()
    if loss_type == "color_ce":
        logits = _bins_last(prediction, prediction.shape[1] // channels)  # (B, h, w, C, K)
        error = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.permute(0, 2, 3, 1).reshape(-1),
                                reduction="none").view(logits.shape[:-1]).permute(0, 3, 1, 2)  # (B, C, h, w)
    elif loss_type == "l1":
        error = F.l1_loss(prediction, target.float(), reduction="none")
    elif loss_type == "smooth_l1":
        error = F.smooth_l1_loss(prediction, target.float(), reduction="none", beta=smooth_l1_beta)
    elif loss_type == "l2":
        error = F.mse_loss(prediction, target.float(), reduction="none")
    else:
        raise ValueError(f"`loss_type` must be one of 'l1', 'smooth_l1', 'l2', 'color_ce'; got {loss_type!r}.")
    return (error * mask).sum() / (mask.sum() + 1e-5) / channels


def masked_l1_loss(pixel_values: torch.Tensor, reconstruction: torch.Tensor, bool_masked_pos: torch.Tensor,
                   patch_size: int) -> torch.Tensor:
    """The official SimMIM loss: mean absolute error over the masked pixels and the channels.

    bool_masked_pos (B, (H/p)*(W/p)) is upsampled to a pixel mask m (B, 1, H, W);
    loss = sum(|x - x_rec| * m) / (sum(m) + 1e-5) / channels.
    """
    height, width = pixel_values.shape[2:]
    mask = pixel_mask(bool_masked_pos, height, width, patch_size)
    return reconstruction_loss(reconstruction, pixel_values, mask, "l1")


def build_head(config: SimMIMConfig) -> nn.Sequential:
    """The prediction head: feature map (B, hidden, H/s, W/s) -> (B, C * K, H/f, W/f), K = `num_color_bins`
    for `"color_ce"` (logits, channel c * K + k) else 1, f = `config.prediction_downsample`.

    `"linear"` (the paper's): 1x1 conv to (s/f)**2 * C * K channels + PixelShuffle(s/f). `"mlp"`: 1x1 conv to
    `head_hidden_size`, GELU, then the same. The linear head's keys (`decoder.0.*`) are the official checkpoints'.
    """
    upscale = config.encoder_stride // config.prediction_downsample
    outputs = upscale**2 * config.num_channels * (config.num_color_bins if config.loss_type == "color_ce" else 1)
    if config.head_type == "linear":
        return nn.Sequential(nn.Conv2d(config.hidden_size, outputs, kernel_size=1), nn.PixelShuffle(upscale))
    hidden = config.head_hidden_size if config.head_hidden_size is not None else config.hidden_size
    return nn.Sequential(
        nn.Conv2d(config.hidden_size, hidden, kernel_size=1), nn.GELU(),
        nn.Conv2d(hidden, outputs, kernel_size=1), nn.PixelShuffle(upscale),
    )


class SimMIMForMaskedImageModeling(SimMIMPreTrainedModel):
    """SimMIM: the encoder plus a prediction head that regresses (or classifies) the pixels of the masked area.

    The paper's setting is the default: a linear head (1x1 conv + PixelShuffle), raw normalised pixels as the
    target, L1 over the masked pixels. The config's component options change one piece each (f = the config's
    `prediction_downsample`, K = `num_color_bins`):

        head_type               "linear" | "mlp"        -> `build_head`
        target                  pixel_values, area-averaged to (H/f, W/f) when `prediction_resolution` is set,
                                then locally normalised when `norm_target_patch_size` is set, or colour bins
                                (int64) for loss_type "color_ce"                             -> `targets`
        loss mask               masked target pixels (`target_mask`), or all with loss_area "all" -> `loss_mask`
        loss                    l1 | smooth_l1 | l2 | color_ce (`reconstruction_loss`)
    """

    def __init__(self, config: SimMIMConfig):
        super().__init__(config)
        # The official pretraining ViT draws its init from a normal truncated at +-1 std.
        self.simmim = SimMIMModel(config, truncate_init_at_std=True)
        self.decoder = build_head(config)
        self.post_init()

    def targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the head learns to predict: (B, C, H/f, W/f), float values or int64 colour bins."""
        config = self.config
        targets = area_average(pixel_values, config.prediction_downsample)
        if config.loss_type == "color_ce":
            return color_classes(targets, config)
        if config.norm_target_patch_size is not None:
            targets = normalize_targets(targets.float(), config.norm_target_patch_size)
        return targets

    def loss_mask(self, bool_masked_pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Which target pixels the loss counts: (B, 1, H/f, W/f) float, 1 = counted."""
        f = self.config.prediction_downsample
        if self.config.loss_area == "all":
            return torch.ones(bool_masked_pos.shape[0], 1, height // f, width // f, device=bool_masked_pos.device)
        return target_mask(bool_masked_pos, height, width, self.config.patch_size, f)

    def prediction_to_image(self, prediction: torch.Tensor) -> torch.Tensor:
        """Head output -> `reconstruction` (B, C, H, W), normalised like the input (or, with a locally normalised
        target, in that target's space): the expected colour for "color_ce", repeated over each f x f square for
        a low-resolution prediction, so that visualisation works for every option."""
        if self.config.loss_type == "color_ce":
            prediction = expected_color(prediction, self.config)
        f = self.config.prediction_downsample
        if f > 1:
            prediction = prediction.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
        return prediction

    def reconstruction_in_input_space(self, reconstruction: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """`reconstruction` normalised like the input, so it can be shown as an image: with a locally normalised
        target, the prediction is mapped back with the local statistics of `pixel_values`' own windows (those the
        target was normalised with); otherwise it is returned as it is."""
        config = self.config
        if config.norm_target_patch_size is None or config.loss_type == "color_ce":
            return reconstruction
        stats = local_target_stats(area_average(pixel_values, config.prediction_downsample).float(),
                                   config.norm_target_patch_size)
        mean, scale = (self.prediction_to_image(t) for t in stats)  # at the reconstruction's resolution
        return reconstruction.float() * scale + mean

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> MaskedImageModelingOutput | tuple:
        r"""
        pixel_values (`(B, C, H, W)`): normalised images; also the source of the target (see `targets`).
        bool_masked_pos (`(B, (H/p)*(W/p))`, bool, *optional*): masked patches. Without it nothing is masked
            and no loss is returned (the reconstruction is still computed), whatever `loss_area` says.

        Returns `MaskedImageModelingOutput(loss, reconstruction (B, C, H, W), hidden_states, attentions)`.
        """
        outputs = self.simmim(
            pixel_values, bool_masked_pos=bool_masked_pos, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, return_dict=True,
        )
        prediction = self.decoder(outputs.feature_map)  # (B, C, H/f, W/f), or (B, C*K, H/f, W/f) colour logits
        loss = None
        if bool_masked_pos is not None:
            height, width = pixel_values.shape[2:]
            loss = reconstruction_loss(prediction, self.targets(pixel_values),
                                       self.loss_mask(bool_masked_pos, height, width), self.config.loss_type,
                                       self.config.smooth_l1_beta)
        reconstruction = self.prediction_to_image(prediction)
        return MaskedImageModelingOutput(
            loss=loss, reconstruction=reconstruction, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class SimMIMForImageClassification(SimMIMPreTrainedModel):
    """Encoder and a linear classifier on its pooled features (`SimMIMModel.pooler_output`). The official
    fine-tuning models: ViT with `use_fc_norm=True`: LayerNorm(mean of the patch tokens) -> linear, classifier
    init scaled by 1e-3; Swin: final LayerNorm -> mean -> linear."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^simmim\.layernorm\."]

    def __init__(self, config: SimMIMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.simmim = SimMIMModel(config)
        # Classification never masks: the mask token gets no gradient, and a trainable parameter without one stops
        # DDP (`find_unused_parameters=False`) at the second step. Frozen, it stays out of the optimizer too.
        self.simmim.embeddings.mask_token.requires_grad_(False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        # Loading replaces the parameters, and the new mask token is trainable again (see `__init__`).
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.simmim.embeddings.mask_token.requires_grad_(False)
        return loaded

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self.classifier and isinstance(module, nn.Linear) and self.config.encoder_type == "vit" \
                and self.config.init_recipe == "simmim":
            # The official ViT classifier starts near zero (trunc-normal 0.02 x init_scale 0.001) so that the
            # first updates do not push large, random gradients into the pretrained encoder; Swin keeps 0.02.
            _scale_unless_loaded(module.weight, VIT_CLASSIFIER_INIT_SCALE)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        r"""
        labels (`(B,)`, *optional*): class indices; with them the output carries the loss (cross-entropy for
            single-label problems, following `config.problem_type`).
        """
        outputs = self.simmim(
            pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "SimMIMForImageClassification",
    "SimMIMForMaskedImageModeling",
    "SimMIMModel",
    "SimMIMModelOutput",
    "SimMIMPooler",
    "SimMIMPreTrainedModel",
    "area_average",
    "build_head",
    "color_classes",
    "expected_color",
    "masked_l1_loss",
    "normalize_targets",
    "pixel_mask",
    "reconstruction_loss",
    "target_mask",
]
