"""Export simmim_hf checkpoints to transformers' own model classes, which load without `trust_remote_code`.

    python -m simmim_hf.export --checkpoint <simmim_hf folder> --output DIR

simmim_hf encoder -> transformers classes (pretraining model / classifier / bare encoder):

* SwinV2 (`"swinv2"`) -> `Swinv2ForMaskedImageModeling` / `Swinv2ForImageClassification` / `Swinv2Model`;
* Swin v1 (`"swin"`) -> `SwinForMaskedImageModeling` / `SwinForImageClassification` / `SwinModel`;
* plain ViT (no relative position bias, no LayerScale) -> `ViTForMaskedImageModeling` / `ViTForImageClassification`
  / `ViTModel`;
* the paper's ViT (relative position bias and/or LayerScale) -> `BeitModel` / `BeitForImageClassification` /
  `BeitModel`.

The official ViT is BEiT's architecture (q/v biases, shared or per-block relative position bias with the three CLS
rows, LayerScale, and for fine-tuning mean pooling + LayerNorm), so it becomes BEiT; BEiT's masked-image-modeling
head predicts VQ-VAE tokens, not pixels, so a paper-ViT pretraining checkpoint exports its encoder (`BeitModel`,
mask token included). Everything transformers' classes compute from the exported weights equals simmim_hf's
outputs (hidden states, reconstruction, logits; tested to 1e-5) with these exceptions, stated where they apply:
transformers' masked-image-modeling loss is the plain masked L1 (a SimMIM checkpoint trained with another loss or
a normalised target still exports its exact reconstruction), and the pooled output of a bare BEiT / ViT export
without `use_fc_norm` / `pooling="cls"` is BEiT's CLS token / ViT's tanh pooler (the hidden states are exact).
For Swin and SwinV2 the last hidden state is exact, while the per-stage `hidden_states` differ in where they are
taken: ours are each stage's output before its patch merging, transformers' after it.
What cannot be represented exactly is refused with a ValueError naming the setting (e.g. a non-linear SimMIM head,
a LayerNorm epsilon other than 1e-5 for Swin, absolute position embeddings for SwinV2, a Swin stage smaller than
the window, as in the paper's Swin-L at 192 px).

The exported folders plug into transformers' downstream models: e.g. `SwinBackbone` / `Swinv2Backbone` as the
backbone of `UperNetForSemanticSegmentation`, or `BeitForSemanticSegmentation` / `BeitBackbone` for the paper ViT.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configuration_simmim import SimMIMConfig
from .image_processing_simmim import SimMIMImageProcessor
from .modeling_simmim import SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMModel
from .transfer import load_checkpoint_state_dict

logger = logging.getLogger(__name__)

HEADS = ("mim", "classification", "encoder")


@dataclass
class ExportPlan:
    """How one simmim_hf model maps onto a transformers class: its config, and the tensor names on both sides.

    `pairs` are copied as they are (simmim_hf name, transformers name). `attention` lists the fused projections:
    (simmim_hf attention prefix, transformers (q, k, v) weight names, transformers (q, k, v) bias names or None
    where that side has no bias); a simmim_hf model without a key bias exports zeros where transformers has one.
    """

    kind: str  # "swinv2", "swin", "vit" or "beit"
    head: str  # one of HEADS
    hf_class: type
    hf_config: object
    pairs: list[tuple[str, str]] = field(default_factory=list)
    attention: list[tuple[str, tuple[str, str, str], tuple[str | None, str | None, str | None]]] = field(
        default_factory=list)
    dropped: list[str] = field(default_factory=list)  # simmim_hf tensors with no place in the target class

    def export_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {theirs: state_dict[ours] for ours, theirs in self.pairs}
        for prefix, weights, biases in self.attention:
            for name, part in zip(weights, state_dict[f"{prefix}.qkv.weight"].chunk(3)):
                out[name] = part
            for name, ours in zip(biases, ("q_bias", "k_bias", "v_bias")):
                if name is None:
                    continue
                value = state_dict.get(f"{prefix}.{ours}")
                out[name] = value if value is not None else torch.zeros_like(state_dict[f"{prefix}.qkv.weight"][0])
        return {name: tensor.contiguous() for name, tensor in out.items()}

    def import_state_dict(self, state_dict: dict[str, torch.Tensor], has: set[str]) -> dict[str, torch.Tensor]:
        """The inverse: transformers tensors back to simmim_hf names (`has`: the simmim_hf model's names)."""
        out = {ours: state_dict[theirs] for ours, theirs in self.pairs}
        for prefix, weights, biases in self.attention:
            out[f"{prefix}.qkv.weight"] = torch.cat([state_dict[name] for name in weights])
            for name, ours in zip(biases, ("q_bias", "k_bias", "v_bias")):
                if name is not None and f"{prefix}.{ours}" in has:
                    out[f"{prefix}.{ours}"] = state_dict[name]
        return out


# ---------------------------------------------------------------------------------------------- planning
def _head_of(model: torch.nn.Module) -> str:
    if isinstance(model, SimMIMForMaskedImageModeling):
        return "mim"
    if isinstance(model, SimMIMForImageClassification):
        return "classification"
    if isinstance(model, SimMIMModel):
        return "encoder"
    raise ValueError(f"`model` must be a simmim_hf model (SimMIMForMaskedImageModeling, SimMIMForImageClassification "
                     f"or SimMIMModel); got {type(model).__name__}.")


def _refuse(config: SimMIMConfig, setting: str, why: str) -> None:
    raise ValueError(f"Cannot export this {config.encoder_type} model to transformers exactly: {setting} ({why}).")


def _check_mim_head(config: SimMIMConfig) -> None:
    """transformers' SimMIM heads are the paper's linear head; the reconstruction must come out the same."""
    if getattr(config, "head_type", "linear") != "linear":
        _refuse(config, f"head_type={config.head_type!r}", "transformers' heads are the linear 1x1 conv + PixelShuffle")
    if getattr(config, "prediction_resolution", None) is not None or getattr(config, "loss_type", "l1") == "color_ce":
        _refuse(config, "prediction_resolution / loss_type='color_ce'", "the head predicts something other than "
                "one value per input pixel")
    different = {name: getattr(config, name, default) for name, default in
                 (("loss_type", "l1"), ("loss_area", "masked"), ("norm_target_patch_size", None))
                 if getattr(config, name, default) != default}
    if different:
        logger.warning("Exported the reconstruction head exactly, but transformers' loss is the paper's masked L1 on "
                       "the raw target; this checkpoint was trained with %s.", different)


def _common(config: SimMIMConfig) -> dict:
    return dict(image_size=config.image_size, patch_size=config.patch_size, num_channels=config.num_channels,
                hidden_act=config.hidden_act, hidden_dropout_prob=config.hidden_dropout_prob,
                attention_probs_dropout_prob=config.attention_probs_dropout_prob,
                drop_path_rate=config.drop_path_rate, initializer_range=config.initializer_range,
                layer_norm_eps=config.layer_norm_eps, encoder_stride=config.encoder_stride,
                id2label=config.id2label, label2id=config.label2id)


def _swin_family_plan(config: SimMIMConfig, head: str) -> ExportPlan:
    import transformers

    v2 = config.encoder_type == "swinv2"
    if config.layer_norm_eps != 1e-5:
        _refuse(config, f"layer_norm_eps={config.layer_norm_eps}", "transformers' Swin and Swinv2 always use 1e-5 in "
                "the patch-embedding norm")
    if not config.patch_norm:
        _refuse(config, "patch_norm=False", "transformers' Swin and Swinv2 always normalise the patch embedding")
    if v2 and config.use_absolute_position_embeddings:
        _refuse(config, "use_absolute_position_embeddings=True", "transformers' Swinv2 cannot add absolute position "
                "embeddings (it sizes them for one token more than the patch grid)")
    if v2 and config.use_key_bias:
        _refuse(config, "use_key_bias=True", "transformers' Swinv2 has no key bias")
    if not v2 and any(window != config.window_size for window in config.stage_window_sizes):
        _refuse(config, f"window_size={config.window_size} with stage windows {config.stage_window_sizes}",
                "a stage smaller than the window attends over its whole grid, with a smaller relative position "
                "bias table, while transformers' Swin sizes every stage's table for window_size")
    family = "Swinv2" if v2 else "Swin"
    names = {"mim": "ForMaskedImageModeling", "classification": "ForImageClassification", "encoder": "Model"}
    hf_class = getattr(transformers, family + names[head])
    fields = dict(embed_dim=config.embed_dim, depths=list(config.depths), num_heads=list(config.num_heads),
                  window_size=config.window_size, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                  use_absolute_embeddings=config.use_absolute_position_embeddings, **_common(config))
    if v2:
        fields["pretrained_window_sizes"] = list(config.pretrained_window_sizes or [0] * len(config.depths))
    hf_config = getattr(transformers, family + "Config")(**fields)

    ours, theirs = ("", "") if head == "encoder" else ("simmim.", "swinv2." if v2 else "swin.")
    plan = ExportPlan(kind=config.encoder_type, head=head, hf_class=hf_class, hf_config=hf_config)
    pairs = plan.pairs
    pairs += [(f"{ours}embeddings.projection.{n}", f"{theirs}embeddings.patch_embeddings.projection.{n}")
              for n in ("weight", "bias")]
    pairs += [(f"{ours}embeddings.norm.{n}", f"{theirs}embeddings.norm.{n}") for n in ("weight", "bias")]
    pairs += [(f"{ours}layernorm.{n}", f"{theirs}layernorm.{n}") for n in ("weight", "bias")]
    if head == "mim":
        pairs.append((f"{ours}embeddings.mask_token", f"{theirs}embeddings.mask_token"))
    else:
        plan.dropped.append(f"{ours}embeddings.mask_token")  # pretraining-only; transformers builds none here
    if config.use_absolute_position_embeddings:
        pairs.append((f"{ours}embeddings.position_embeddings", f"{theirs}embeddings.position_embeddings"))
    if v2:
        parts = {"attention_output_norm": "layernorm_before", "mlp_output_norm": "layernorm_after",
                 "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "attention.proj": "attention.output.dense"}
    else:
        parts = {"layernorm_before": "layernorm_before", "layernorm_after": "layernorm_after", "mlp.fc1": "mlp.fc1",
                 "mlp.fc2": "mlp.fc2", "attention.proj": "attention.o_proj"}
    for s, depth in enumerate(config.depths):
        for b in range(depth):
            src, dst = f"{ours}encoder.stages.{s}.blocks.{b}", f"{theirs}encoder.layers.{s}.blocks.{b}"
            pairs += [(f"{src}.{a}.{n}", f"{dst}.{t}.{n}") for a, t in parts.items() for n in ("weight", "bias")]
            if v2:
                pairs.append((f"{src}.attention.logit_scale", f"{dst}.attention.self.logit_scale"))
                pairs += [(f"{src}.attention.cpb_mlp.{n}", f"{dst}.attention.self.continuous_position_bias_mlp.{n}")
                          for n in ("0.weight", "0.bias", "2.weight")]
                qkv = tuple(f"{dst}.attention.self.{n}" for n in ("query", "key", "value"))
                biases = (f"{qkv[0]}.bias", None, f"{qkv[2]}.bias") if config.qkv_bias else (None, None, None)
            else:
                table = "attention.relative_position_bias.relative_position_bias_table"
                pairs.append((f"{src}.{table}", f"{dst}.{table}"))
                qkv = tuple(f"{dst}.attention.{n}_proj" for n in "qkv")
                biases = tuple(f"{name}.bias" for name in qkv) if config.qkv_bias else (None, None, None)
            plan.attention.append((f"{src}.attention", tuple(f"{name}.weight" for name in qkv), biases))
        if s < len(config.depths) - 1:
            src, dst = f"{ours}encoder.stages.{s}.downsample", f"{theirs}encoder.layers.{s}.downsample"
            pairs.append((f"{src}.reduction.weight", f"{dst}.reduction.weight"))
            pairs += [(f"{src}.norm.{n}", f"{dst}.norm.{n}") for n in ("weight", "bias")]
    _add_head(plan, config, head)
    return plan


def _is_plain_vit(config: SimMIMConfig) -> bool:
    return not (config.use_shared_relative_position_bias or config.use_relative_position_bias
                or config.layer_scale_init_value)


def _vit_family_plan(config: SimMIMConfig, head: str) -> ExportPlan:
    import transformers

    plain = _is_plain_vit(config)
    kind = "vit" if plain else "beit"
    if head == "classification":
        if plain and config.pooling != "cls":
            _refuse(config, "a classifier with pooling='mean'", "transformers' ViT classifies the CLS token")
        if not plain and config.pooling == "mean" and not config.use_fc_norm:
            _refuse(config, "a classifier with pooling='mean' and use_fc_norm=False", "BEiT classifies either the CLS "
                    "token or a LayerNorm of the mean patch token (use_fc_norm=True)")
    if plain and not config.use_absolute_position_embeddings:
        _refuse(config, "no position embeddings of any kind", "transformers' ViT always adds absolute ones")
    if not plain and config.use_key_bias and config.qkv_bias:
        _refuse(config, "use_key_bias=True", "BEiT has no key bias")
    fields = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
                  **_common(config))
    if plain:
        names = {"mim": "ViTForMaskedImageModeling", "classification": "ViTForImageClassification",
                 "encoder": "ViTModel"}
        hf_config = transformers.ViTConfig(qkv_bias=config.qkv_bias, **fields)
    else:
        names = {"mim": "BeitModel", "classification": "BeitForImageClassification", "encoder": "BeitModel"}
        hf_config = transformers.BeitConfig(
            use_mask_token=True, use_absolute_position_embeddings=config.use_absolute_position_embeddings,
            use_relative_position_bias=config.use_relative_position_bias,
            use_shared_relative_position_bias=config.use_shared_relative_position_bias,
            layer_scale_init_value=config.layer_scale_init_value, use_mean_pooling=config.use_fc_norm, **fields)
    # A pretraining checkpoint exported as BeitModel: the encoder alone (BEiT's own MIM head predicts VQ-VAE tokens).
    target_head = "encoder" if (not plain and head == "mim") else head
    root = {"vit": "vit.", "beit": "beit."}[kind] if target_head != "encoder" else ""
    ours = "" if head == "encoder" else "simmim."
    plan = ExportPlan(kind=kind, head=target_head, hf_class=getattr(transformers, names[head]), hf_config=hf_config)
    pairs = plan.pairs
    pairs += [(f"{ours}embeddings.projection.{n}", f"{root}embeddings.patch_embeddings.projection.{n}")
              for n in ("weight", "bias")]
    pairs.append((f"{ours}embeddings.cls_token", f"{root}embeddings.cls_token"))
    if head == "mim":
        pairs.append((f"{ours}embeddings.mask_token", f"{root}embeddings.mask_token"))
    elif plain:
        plan.dropped.append(f"{ours}embeddings.mask_token")
    else:
        pairs.append((f"{ours}embeddings.mask_token", f"{root}embeddings.mask_token"))  # BEiT keeps one
    if config.use_absolute_position_embeddings:
        pairs.append((f"{ours}embeddings.position_embeddings", f"{root}embeddings.position_embeddings"))
    final = "pooler.layernorm" if config.use_fc_norm else "layernorm"
    pairs += [(f"{ours}{final}.{n}", f"{root}{final}.{n}") for n in ("weight", "bias")]
    table = "relative_position_bias_table"
    if config.use_shared_relative_position_bias:
        pairs.append((f"{ours}encoder.relative_position_bias.{table}", f"{root}shared_position_bias.{table}"))
    for i in range(config.num_hidden_layers):
        src, dst = f"{ours}encoder.layers.{i}", f"{root}layers.{i}"
        pairs += [(f"{src}.{p}.{n}", f"{dst}.{p}.{n}") for p in ("layernorm_before", "layernorm_after", "mlp.fc1",
                                                                 "mlp.fc2") for n in ("weight", "bias")]
        pairs += [(f"{src}.attention.proj.{n}", f"{dst}.attention.o_proj.{n}") for n in ("weight", "bias")]
        if config.layer_scale_init_value:
            pairs += [(f"{src}.lambda_{k}", f"{dst}.lambda_{k}") for k in (1, 2)]
        if config.use_relative_position_bias:
            pairs.append((f"{src}.attention.relative_position_bias.{table}", f"{dst}.relative_position_bias.{table}"))
        qkv = tuple(f"{dst}.attention.{n}_proj" for n in "qkv")
        biases = (f"{qkv[0]}.bias", f"{qkv[1]}.bias" if plain else None, f"{qkv[2]}.bias")
        if plain and not config.qkv_bias:
            biases = (None, None, None)
        plan.attention.append((f"{src}.attention", tuple(f"{name}.weight" for name in qkv), biases))
    _add_head(plan, config, head)
    return plan


def _add_head(plan: ExportPlan, config: SimMIMConfig, head: str) -> None:
    if head == "mim" and plan.head == "mim":
        _check_mim_head(config)
        plan.pairs += [(f"decoder.0.{n}", f"decoder.0.{n}") for n in ("weight", "bias")]
    elif head == "mim":
        plan.dropped += ["decoder.0.weight", "decoder.0.bias"]
    elif head == "classification" and config.num_labels > 0:
        plan.pairs += [(f"classifier.{n}", f"classifier.{n}") for n in ("weight", "bias")]


def plan_export(config: SimMIMConfig, head: str) -> ExportPlan:
    """The transformers class, config and tensor names for a simmim_hf model with `config` and `head` (one of
    `HEADS`); a ValueError names whatever transformers' class cannot represent exactly."""
    if head not in HEADS:
        raise ValueError(f"`head` must be one of {HEADS}; got head={head!r}.")
    if config.encoder_type in ("swin", "swinv2"):
        return _swin_family_plan(config, head)
    return _vit_family_plan(config, head)


# ---------------------------------------------------------------------------------------------- export
def export_model(model: torch.nn.Module):
    """A transformers model (in eval mode) computing what the simmim_hf `model` computes; see the module docstring
    for the class chosen. Every simmim_hf tensor is placed or deliberately dropped (the mask token of a classifier,
    a paper-ViT pretraining head); the load into the transformers class is strict."""
    head = _head_of(model)
    plan = plan_export(model.config, head)
    state_dict = model.state_dict()
    exported = plan.export_state_dict(state_dict)
    placed = {ours for ours, _ in plan.pairs} | {f"{p}.{n}" for p, _, _ in plan.attention
                                                for n in ("qkv.weight", "q_bias", "k_bias", "v_bias")}
    leftover = [k for k in state_dict if k not in placed and k not in plan.dropped]
    if leftover:
        raise ValueError(f"Export to {plan.hf_class.__name__} has no place for {leftover[:10]}.")
    hf_model = plan.hf_class(plan.hf_config)
    result = hf_model.load_state_dict(exported, strict=False)
    # Tensors transformers derives itself (index buffers) may be absent from our export; a bare ViT's tanh pooler
    # is not part of SimMIM and stays at its initialisation.
    missing = [k for k in result.missing_keys if not k.endswith(("relative_position_index", "relative_coords_table"))
               and not k.startswith("pooler.dense.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"Export to {plan.hf_class.__name__} does not fit: missing {missing[:10]}, unexpected "
                         f"{result.unexpected_keys[:10]}.")
    return hf_model.eval()


def load_simmim_checkpoint(path: str | Path, **hub_kwargs) -> torch.nn.Module:
    """A simmim_hf folder (or Hub repo) as the model class its weights belong to: the SimMIM pretraining model when
    it has a `decoder`, the classifier when it has a `classifier`, else the bare encoder. Safetensors only."""
    state_dict = load_checkpoint_state_dict(str(path), **hub_kwargs)
    config = SimMIMConfig.from_pretrained(str(path), **hub_kwargs)
    if any(k.startswith("decoder.") for k in state_dict):
        model = SimMIMForMaskedImageModeling(config)
    elif any(k.startswith("classifier.") for k in state_dict):
        model = SimMIMForImageClassification(config)
    else:
        model = SimMIMModel(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def export_image_processor(processor: SimMIMImageProcessor):
    """transformers' own image processor doing `processor`'s evaluation transform, or None where none does (a
    non-square size, not three channels): CLIP's processor resizes the shorter side to `size / crop_pct` and center
    crops, as ours does; the pixels are the same except a one-pixel shift of the crop where its margin is odd
    (transformers floors the offset, torchvision's CenterCrop, which ours follows, rounds it)."""
    from transformers import CLIPImageProcessor

    height, width = processor.size["height"], processor.size["width"]
    if height != width or len(processor.image_mean) != 3:
        return None
    return CLIPImageProcessor(
        size={"shortest_edge": int(height / processor.crop_pct)}, crop_size={"height": height, "width": width},
        resample=int(processor.eval_resample), do_rescale=processor.do_rescale,
        rescale_factor=processor.rescale_factor, do_normalize=processor.do_normalize,
        image_mean=list(processor.image_mean), image_std=list(processor.image_std), do_convert_rgb=True)


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path, **hub_kwargs):
    """Read a simmim_hf folder (or Hub repo), export it, and `save_pretrained` the transformers model, with a
    transformers image processor where one does the same evaluation transform, to `output_dir`. Returns
    (simmim_hf model, transformers model, its processor or None)."""
    model = load_simmim_checkpoint(checkpoint, **hub_kwargs)
    hf_model = export_model(model)
    try:
        processor = SimMIMImageProcessor.from_pretrained(str(checkpoint), **hub_kwargs)
    except OSError:  # a folder saved without its processor: the one its config implies (none for non-RGB)
        try:
            processor = SimMIMImageProcessor.from_config(model.config)
        except ValueError:
            processor = None
    hf_processor = export_image_processor(processor) if processor is not None else None
    hf_model.save_pretrained(output_dir)
    if hf_processor is not None:
        hf_processor.save_pretrained(output_dir)
    else:
        logger.warning("No transformers image processor does this model's evaluation transform (%d channels, "
                       "image size %s): %s has none.", model.config.num_channels, model.config.image_size, output_dir)
    return model, hf_model, hf_processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="simmim-export",
        description="Export a simmim_hf checkpoint to transformers' own classes (Swinv2, Swin, ViT or BEiT), "
                    "loadable without trust_remote_code.",
    )
    parser.add_argument("--checkpoint", required=True, help="simmim_hf save_pretrained folder or Hub repo id")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if Path(args.checkpoint).exists() and output.resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"`--output` {args.output!r} is the checkpoint folder itself: exporting there would replace "
                         "its weights and config; choose another folder.")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise ValueError(f"`--output` {args.output!r} exists and is not empty; choose a new folder, or pass "
                         "--overwrite to write into it.")
    model, hf_model, hf_processor = export_checkpoint(args.checkpoint, args.output)
    print(f"Exported {args.checkpoint} ({model.config.encoder_type}, {type(model).__name__}) -> {args.output} "
          f"({type(hf_model).__name__}" + (f", {type(hf_processor).__name__.removesuffix('Pil')})" if hf_processor
                                           else ")"))


if __name__ == "__main__":
    main()


__all__ = ["ExportPlan", "export_checkpoint", "export_image_processor", "export_model", "load_simmim_checkpoint", "main",
           "plan_export"]
