"""Model cards of pretrained and fine-tuned folders: what was trained, on what, how, and how to load it.

The templates are `model_cards/pretraining.md` and `model_cards/finetuning.md` of the source tree (Jinja with
`{{ card_data }}` front matter, rendered by `huggingface_hub.ModelCard`). An installed package without the source
tree writes a short card with the same metadata instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from .training_utils import format_count, write_model_card

TEMPLATES = Path(__file__).resolve().parents[1] / "model_cards"
FALLBACK_TEMPLATE = ("---\n{{ card_data }}\n---\n\n# {{ model_name }}\n\n{{ summary }}\n\nLoad it with "
                     "`trust_remote_code=True` where `simmim_hf` is not installed.\n")


def _render(template_name: str, folder: Path, card_data: dict, summary: str, **fields) -> Path:
    template = TEMPLATES / template_name
    if template.is_file():
        return write_model_card(template, folder, card_data, **fields)
    fallback = folder / ".card_template.md"
    fallback.write_text(FALLBACK_TEMPLATE, encoding="utf-8")
    try:
        return write_model_card(fallback, folder, card_data, summary=summary, **fields)
    finally:
        fallback.unlink()


def describe_architecture(config) -> str:
    if config.encoder_type == "vit":
        return f"ViT, {config.num_hidden_layers} layers, width {config.hidden_size}"
    name = "SwinV2" if config.encoder_type == "swinv2" else "Swin"
    return f"{name}, depths {config.depths}, embed dim {config.embed_dim}, window {config.window_size}"


def describe_objective(config) -> str:
    """The SimMIM component choices (head, target, loss) in words, for the card."""
    target = "normalised pixels" if not config.norm_target_patch_size else \
        f"pixels normalised in {config.norm_target_patch_size}x{config.norm_target_patch_size} windows"
    if config.prediction_resolution:
        target += f" area-averaged to {config.prediction_resolution}x{config.prediction_resolution}"
    loss = {"l1": "L1", "l2": "L2", "smooth_l1": f"smooth L1 (beta {config.smooth_l1_beta})",
            "color_ce": f"cross-entropy over {config.num_color_bins} colour bins per channel"}[config.loss_type]
    return f"{config.head_type} head, {target}, {loss} on {config.loss_area} pixels"


def write_pretraining_card(folder, args, config, model_source: str, data_description: str, num_params: int, plan,
                           accelerator, state, eval_loss: float | None, repo_id: str | None,
                           mask_strategy: str = "random", avg_dist: float | None = None) -> Path:
    folder = Path(folder)
    card_data = {"library_name": "transformers", "license": "apache-2.0", "pipeline_tag": "image-feature-extraction",
                 "tags": ["simmim", "masked-image-modeling", "self-supervised", config.encoder_type]}
    if args.dataset_name:
        card_data["datasets"] = [args.dataset_name]
    architecture = describe_architecture(config)
    return _render(
        "pretraining.md", folder, card_data,
        summary=f"SimMIM pretraining of {architecture} on {data_description}: {state.global_step} steps, final loss "
                f"{state.last_loss:.4f}.",
        model_name=repo_id or folder.resolve().name, architecture=architecture, preset=model_source,
        num_parameters=format_count(num_params), image_size=config.image_size, patch_size=config.patch_size,
        mask_patch_size=config.mask_patch_size, mask_ratio=config.mask_ratio,
        mask_ratio_percent=round(100 * config.mask_ratio), dataset_description=data_description,
        mask_strategy=mask_strategy, avg_dist=f"{avg_dist:.1f}" if avg_dist is not None else None,
        objective=describe_objective(config),
        epochs=plan.num_epochs if plan.num_epochs is not None else "streamed", steps=state.global_step,
        total_batch_size=plan.total_batch_size, num_processes=accelerator.num_processes,
        per_device_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=f"{plan.peak_lr:.3g}",
        weight_decay=args.weight_decay, lr_scheduler=args.lr_scheduler_type, warmup_steps=plan.warmup_steps,
        mixed_precision=accelerator.mixed_precision, final_loss=f"{state.last_loss:.4f}",
        eval_loss=f"{eval_loss:.4f}" if eval_loss is not None else None,
        repo_id=repo_id or "path/to/this/folder", small_data=not (args.dataset_name or args.train_dir),
    )


def _probe_features(config, layer: int | None) -> str:
    """What `evaluation.LinearProbe` classifies: pooled features of hidden state `layer` (or the encoder's pooled
    output), normalised by a LayerNorm without affine weights."""
    pooled = f"mean of hidden state {layer}'s patch tokens" if layer is not None else \
        f"the encoder's pooled output ({_pooling(config)})"
    return pooled + ", then a LayerNorm without affine weights"


def _pooling(config) -> str:
    if config.use_fc_norm:
        return "LayerNorm of the mean patch token (fc_norm, no final norm)"
    if config.encoder_type == "vit" and config.pooling == "cls":
        return "the normalised CLS token"
    return "mean of the final-normalised tokens"


def write_finetuning_card(folder, args, config, results: dict, data_description: str, plan, layer_decay,
                          accelerator, augmentation: str, repo_id: str | None = None) -> Path:
    """`repo_id`: the Hub repo the folder is pushed to (as created: a bare --hub_model_id gains the user's
    namespace), named in the card's snippet; without one the snippet loads a local folder."""
    folder = Path(folder)
    base = args.model_name_or_path
    is_hub_id = base is not None and not os.path.isdir(base) and base.count("/") == 1
    rows = [f"| {r['epoch']} | {r['accuracy'] * 100:.2f} | "
            + (f"{r['top5_accuracy'] * 100:.2f}" if "top5_accuracy" in r else "–") + f" | {r['loss']:.4f} |"
            for r in results["history"]]
    card_data = {"license": "apache-2.0", "tags": ["simmim", "image-classification", "vision"]
                 + (["linear-probe"] if args.linear_probe else [])}
    if not args.linear_probe:  # a probe's folder holds its head only: no transformers model for the widget to load
        card_data.update(library_name="transformers", pipeline_tag="image-classification")
    if is_hub_id:
        card_data["base_model"] = base
    if args.dataset_name:
        card_data["datasets"] = [args.dataset_name]
    best = results["best"]
    name = repo_id or Path(args.output_dir).resolve().name
    width = f"depths {config.depths}" if config.encoder_type != "vit" else f"{config.num_hidden_layers} blocks"
    return _render(
        "finetuning.md", folder, card_data,
        summary=f"{'Linear probe' if args.linear_probe else 'Fine-tuning'} of a SimMIM encoder on {data_description}: "
                f"best accuracy {best['accuracy'] * 100:.2f} % (epoch {best['epoch']}).",
        model_name=name, repo_id=repo_id or "path/to/this/folder",
        mode="linear probe" if args.linear_probe else "fine-tuning",
        linear_probe=args.linear_probe, probe_layer=args.probe_layer,
        base_model=base or f"none (random init, preset `{args.preset}`)",
        base_model_link=(f"[{base}](https://huggingface.co/{base})" if is_hub_id else
                         (f"`{base}` (local)" if base else f"none: random init from preset `{args.preset}`")),
        architecture=f"{config.encoder_type.upper()} ({width}, width {config.hidden_size})",
        image_size=config.image_size, dataset_description=data_description,
        train_samples=results["train_samples"], eval_samples=results["eval_samples"],
        num_classes=results["num_classes"], label_fraction=args.train_label_fraction, epochs=plan.num_epochs,
        steps=plan.max_train_steps, warmup_steps=plan.warmup_steps, total_batch_size=plan.total_batch_size,
        num_processes=accelerator.num_processes, learning_rate=f"{plan.peak_lr:.3g}",
        layer_decay=layer_decay if layer_decay is not None else "none", weight_decay=args.weight_decay,
        drop_path_rate=config.drop_path_rate, label_smoothing=args.label_smoothing, mixup=args.mixup,
        cutmix=args.cutmix, mixed_precision=accelerator.mixed_precision, augmentation=augmentation,
        pooling=_probe_features(config, args.probe_layer) if args.linear_probe else _pooling(config),
        best_epoch=best["epoch"], best_accuracy=f"{best['accuracy'] * 100:.2f}",
        best_top5=f"{best['top5_accuracy'] * 100:.2f}" if "top5_accuracy" in best else None,
        results_rows="\n".join(rows), seed=args.seed,
    )


__all__ = ["describe_architecture", "describe_objective", "write_finetuning_card", "write_pretraining_card"]
