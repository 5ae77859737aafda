"""Quick evaluations of a SimMIM encoder: features from a chosen layer, linear probing and k-NN.

* `extract_features`: the frozen encoder's features for a dataloader, average-pooled patch tokens of one
  layer (`output_hidden_states`), e.g. block 8 of ViT-B as in the paper's linear-probing study.
* `LinearProbe`: frozen encoder + BatchNorm-free linear head. MAE and others put a BatchNorm (without
  affine parameters) in front of the probe; here the pooled features are standardised per example by a
  LayerNorm without parameters, which needs no running statistics, behaves the same for any batch size and
  number of processes, and keeps the head a linear classifier of normalised features.
* `knn_predict` / `knn_evaluate`: weighted k-NN on cosine similarity (the protocol of DINO), a
  training-free check of a pretraining run.

Not Hub-facing: imports freely from the package.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput


def pool_tokens(hidden_state: torch.Tensor, has_cls_token: bool) -> torch.Tensor:
    """Average the patch tokens of a (B, L, C) hidden state (the CLS token, if any, left out), or a
    (B, C, H, W) feature map over its positions; returns (B, C)."""
    if hidden_state.ndim == 4:
        return hidden_state.mean(dim=(2, 3))
    if hidden_state.ndim != 3:
        raise ValueError(f"Expected a (B, L, C) or (B, C, H, W) hidden state; got shape {tuple(hidden_state.shape)}.")
    return (hidden_state[:, 1:] if has_cls_token else hidden_state).mean(dim=1)


def _encoder(model: nn.Module) -> nn.Module:
    # Accept SimMIMModel or any model with the encoder under `base_model_prefix` (MIM model, classifier).
    prefix = getattr(model, "base_model_prefix", None)
    return getattr(model, prefix, model) if prefix and hasattr(model, prefix) else model


def encoder_features(encoder: nn.Module, pixel_values: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """Pooled features (B, C) of `layer`.

    `layer` indexes `hidden_states`: ViT: 0 = patch embeddings, i = output of block i (1-based), so ViT-B's
    block 8 is `layer=8`; Swin: i = output of stage i. `None` = the encoder's own pooled output (after its
    final LayerNorm), which is what fine-tuning starts from.
    """
    encoder = _encoder(encoder)
    if layer is None:
        return encoder(pixel_values).pooler_output
    outputs = encoder(pixel_values, output_hidden_states=True)
    hidden_states = outputs.hidden_states
    if not -len(hidden_states) <= layer < len(hidden_states):
        raise ValueError(
            f"`layer` must index the encoder's {len(hidden_states)} hidden states (0 = embeddings, "
            f"{len(hidden_states) - 1} = last block/stage) or be None; got layer={layer}."
        )
    return pool_tokens(hidden_states[layer], has_cls_token=encoder.config.encoder_type == "vit")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataloader: Iterable[dict],
    layer: int | None = None,
    device: torch.device | str | None = None,
    label_key: str = "labels",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, C) (float32, on CPU) and labels (N,) of every batch of `dataloader` (dicts with
    `pixel_values` and `label_key`), with the encoder in eval mode."""
    encoder = _encoder(model)
    was_training = encoder.training
    encoder.eval()
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    features, labels = [], []
    try:
        for batch in dataloader:
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            features.append(encoder_features(encoder, pixel_values, layer).float())
            labels.append(torch.as_tensor(batch[label_key]))
    finally:
        encoder.train(was_training)
    # One transfer at the end rather than a host sync per batch.
    return torch.cat(features).cpu(), torch.cat(labels).cpu()


class LinearProbe(nn.Module):
    """A frozen SimMIM encoder with a BatchNorm-free linear classifier on the pooled features of `layer`.

    The encoder's parameters get `requires_grad=False` and the encoder stays in eval mode (no drop path)
    even when the probe is put in train mode, so training the probe cannot change it; only `head` learns.
    The forward signature and output match `SimMIMForImageClassification`.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, layer: int | None = None, normalize: bool = True):
        super().__init__()
        self.encoder = _encoder(encoder)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.layer = layer
        self.config = self.encoder.config
        hidden_size = self._feature_width()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6) if normalize else nn.Identity()
        self.head = nn.Linear(hidden_size, num_labels)
        # MAE's probe init: a small normal so that the first logits are near uniform.
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def _feature_width(self) -> int:
        config = self.config
        if self.layer is None or config.encoder_type == "vit":
            return config.hidden_size
        # Swin hidden_states: embeddings (stage-0 width) then one per stage, before its patch merging.
        num = len(config.depths) + 1
        index = self.layer % num
        return config.embed_dim * 2 ** max(0, index - 1)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen: always the deterministic inference path
        return self

    def full_head_state_dict(self) -> dict[str, torch.Tensor]:
        """The head's weights, whole, on the CPU. FSDP shards them (DTensors): gathering them is a collective, so
        every process calls this, also those that will not write."""
        from torch.distributed.tensor import DTensor

        return {key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
                for key, value in self.head.state_dict().items()}

    def save_head(self, folder, base_model: str | None, id2label: dict | None = None,
                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write only the trained head (`linear_probe_head.safetensors`; `state_dict` from `full_head_state_dict`
        when sharded) and what it needs (`linear_probe_config.json`: the encoder it sits on, the layer, the
        normalisation, the class names)."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state_dict = self.full_head_state_dict() if state_dict is None else state_dict
        save_file({k: v.contiguous().cpu() for k, v in state_dict.items()}, str(folder / "linear_probe_head.safetensors"))
        (folder / "linear_probe_config.json").write_text(json.dumps(
            {"base_model": base_model, "probe_layer": self.layer, "normalize": "layernorm_without_affine",
             "num_labels": self.head.out_features,
             "id2label": {str(k): v for k, v in (id2label or {}).items()} or None}, indent=2))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> ImageClassifierOutput:
        with torch.no_grad():
            features = encoder_features(self.encoder, pixel_values, self.layer)
        logits = self.head(self.norm(features.float()))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def _check_finite(**features: torch.Tensor) -> None:
    """One NaN row ranks above every neighbour in `topk` and turns every vote (or the probe's loss) into NaN."""
    for name, values in features.items():
        bad = int((~torch.isfinite(values.float()).all(dim=1)).sum()) if values.numel() else 0
        if bad:
            raise ValueError(f"`{name}` has {bad} of {values.shape[0]} rows with NaN or infinite values; the encoder "
                             "produced non-finite features (e.g. an overflow in half precision).")


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, num_classes) of weighted k-NN: the k most cosine-similar training examples vote
    for their label with weight exp(similarity / temperature) (DINO's protocol), scaled per query so that the
    nearest neighbour's weight is 1 (the ranking is DINO's)."""
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"`train_features` ({train_features.shape[0]} rows) and `train_labels` ({train_labels.shape[0]}) "
            "must have the same length."
        )
    if train_features.shape[0] == 0:
        raise ValueError("`train_features` is empty; k-NN needs at least one training example.")
    _check_finite(train_features=train_features, query_features=query_features)
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.long()
    scores = []
    for start in range(0, query_features.shape[0], chunk_size):
        query = F.normalize(query_features[start:start + chunk_size].float(), dim=1)
        similarity, index = (query @ train.T).topk(k, dim=1)
        # Relative to the nearest neighbour (weight 1): the same vote, without exp overflowing to inf (and classes
        # tying at inf) once similarity / temperature passes ~88, i.e. for temperatures below ~0.011.
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[index], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 (and top-5 when there are >= 5 classes) accuracy of `knn_predict` on the test features."""
    if test_features.shape[0] != test_labels.shape[0]:
        raise ValueError(
            f"`test_features` ({test_features.shape[0]} rows) and `test_labels` ({test_labels.shape[0]}) "
            "must have the same length."
        )
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1)
    # A class no neighbour voted for is not a prediction: without this, zero-score ties fill the top 5 arbitrarily.
    hits = (top.indices == test_labels.long()[:, None]) & (top.values > 0)
    result = {"accuracy": hits[:, 0].float().mean().item()}
    if num_classes >= 5:
        result["top5_accuracy"] = hits.any(dim=1).float().mean().item()
    return result


def linear_probe_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    steps: int = 500,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of a linear classifier trained on frozen features (full-batch AdamW, cross-entropy).

    Features are standardised per example (a LayerNorm without parameters, as `LinearProbe`), so one
    learning rate suits every encoder; the probe is the same for every arm of a comparison.
    """
    if train_features.shape[0] != train_labels.shape[0] or test_features.shape[0] != test_labels.shape[0]:
        raise ValueError(
            f"Features and labels must have the same length; got train {train_features.shape[0]} vs "
            f"{train_labels.shape[0]}, test {test_features.shape[0]} vs {test_labels.shape[0]}."
        )
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1; got steps={steps}.")
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError(f"Features must not be empty; got {train_features.shape[0]} train and "
                         f"{test_features.shape[0]} test rows.")
    _check_finite(train_features=train_features, test_features=test_features)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)

    train, test = standardise(train_features), standardise(test_features)
    head = nn.Linear(train.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    labels = train_labels.long()
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(head(train), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predictions = head(test).argmax(dim=1)
    return {"accuracy": (predictions == test_labels.long()).float().mean().item(), "train_loss": loss.item()}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataloader, accelerator, num_classes: int) -> dict:
    """Accuracy (and top-5 accuracy with >= 5 classes), mean cross-entropy and the number of unreadable images
    of a classifier over a prepared evaluation DataLoader, across all processes. `gather_for_metrics` drops the
    samples the sampler repeated to even out the last batch, so nothing is counted twice (the per-sample
    `unreadable` flags go through it with the logits)."""
    from .metrics import load_metric

    metric = load_metric("top_k_accuracy", num_process=1)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    unreadable = torch.zeros((), device=accelerator.device, dtype=torch.long)
    for batch in dataloader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        flags = batch.get("unreadable", torch.zeros_like(batch["labels"], dtype=torch.bool))
        logits, labels, losses, flags = accelerator.gather_for_metrics((logits, batch["labels"], losses, flags))
        loss_sum += losses.sum()
        count += losses.numel()
        unreadable += flags.sum()
        metric.add_batch(predictions=logits.float().cpu().numpy(), references=labels.cpu().numpy())
    model.train(was_training)
    if count.item() == 0:
        raise ValueError("The evaluation set is empty: the evaluation DataLoader gave no samples.")
    results = metric.compute(top_k=(1, 5) if num_classes >= 5 else (1,))
    results["loss"] = (loss_sum / count).item()
    results["unreadable_images"] = int(unreadable.item())
    return results


__all__ = [
    "LinearProbe",
    "evaluate_classifier",
    "linear_probe_evaluate",
    "encoder_features",
    "extract_features",
    "knn_evaluate",
    "knn_predict",
    "pool_tokens",
]
