"""Tests of `simmim_hf.evaluation`: weighted k-NN, token pooling, feature extraction and the linear probe.

The k-NN tests compare against a brute-force implementation written here (loops in float64); the feature
tests compare the evaluation functions against the model's own outputs (`pooler_output`, `hidden_states`)
rather than re-deriving the model's pooling, so they hold whatever pooling the model uses.
"""

import math

import numpy as np
import pytest
import torch

from simmim_hf.configuration_simmim import SimMIMConfig
from simmim_hf.evaluation import (
    LinearProbe,
    encoder_features,
    extract_features,
    knn_evaluate,
    knn_predict,
    linear_probe_evaluate,
    pool_tokens,
)
from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling, SimMIMModel


# ---------------------------------------------------------------------------------------------- helpers


def brute_force_knn(train_features, train_labels, query_features, num_classes, k, temperature):
    """Reference weighted k-NN: one query at a time, cosine similarity to every training example, the k
    largest vote for their label with weight exp(similarity / temperature), divided by the nearest one's."""
    train = train_features.double()
    query = query_features.double()
    k = min(k, train.shape[0])
    scores = torch.zeros(query.shape[0], num_classes, dtype=torch.float64)
    for q in range(query.shape[0]):
        sims = []
        for t in range(train.shape[0]):
            cos = torch.dot(query[q], train[t]) / (query[q].norm() * train[t].norm())
            sims.append((cos.item(), t))
        sims.sort(key=lambda pair: pair[0], reverse=True)
        for cos, t in sims[:k]:
            scores[q, int(train_labels[t])] += math.exp((cos - sims[0][0]) / temperature)
    return scores


def clusters(num_classes, per_class, dim, generator, noise=0.05):
    """Well separated clusters: orthonormal centres (dim >= num_classes) plus small noise; features are
    scaled by random positive factors so that only their direction (cosine similarity) identifies the class."""
    centres = torch.linalg.qr(torch.randn(dim, num_classes, generator=generator, dtype=torch.float64))[0].T.float()
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + noise * torch.randn(len(labels), dim, generator=generator)
    features = features * (0.5 + 5 * torch.rand(len(labels), 1, generator=generator))
    return features, labels


def tiny_config(**overrides):
    return SimMIMConfig.from_preset("vit-nano-p4-32", **overrides)


def tiny_swin_config(**overrides):
    return SimMIMConfig.from_preset("swin-nano-w4-32", **overrides)


def images(config, n, generator):
    return torch.randn(n, config.num_channels, config.image_size, config.image_size, generator=generator)


def make_loader(config, batch_sizes, generator, label_as_list=False):
    """A list-of-dicts "dataloader" with uneven batch sizes and distinct labels in a known order."""
    loader, start = [], 0
    for size in batch_sizes:
        labels = list(range(100 + start, 100 + start + size))
        loader.append({
            "pixel_values": images(config, size, generator),
            "labels": labels if label_as_list else torch.tensor(labels),
        })
        start += size
    return loader


# ------------------------------------------------------------------------------------------- knn_predict


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (7, 0.5), (20, 1.0)])
def test_knn_predict_matches_brute_force(k, temperature):
    g = torch.Generator().manual_seed(k)
    num_classes = 4
    train = torch.randn(23, 8, generator=g)
    labels = torch.randint(0, num_classes, (23,), generator=g)
    query = torch.randn(9, 8, generator=g)
    scores = knn_predict(train, labels, query, num_classes, k=k, temperature=temperature)
    expected = brute_force_knn(train, labels, query, num_classes, k, temperature)
    assert scores.shape == (9, num_classes)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)


def test_knn_predict_small_temperatures_do_not_overflow():
    """exp(similarity / T) passes float32's range once similarity / T > ~88 (T < ~0.011): classes then tied at inf
    and the accuracy fell to chance. The votes are taken relative to the nearest neighbour instead."""
    features, labels = clusters(10, 40, 16, torch.Generator().manual_seed(7))
    for temperature in (0.07, 0.01, 0.005, 0.001):
        scores = knn_predict(features, labels, features, 10, k=20, temperature=temperature)
        assert torch.isfinite(scores).all(), temperature
        assert knn_evaluate(features, labels, features, labels, k=20, temperature=temperature)["accuracy"] == 1.0


@pytest.mark.parametrize("which", ["train", "query"])
def test_knn_predict_refuses_non_finite_features(which):
    """One NaN row used to rank above every neighbour and turn every vote into NaN: accuracy 0 with no error."""
    g = torch.Generator().manual_seed(8)
    train, query = torch.randn(12, 4, generator=g), torch.randn(5, 4, generator=g)
    (train if which == "train" else query)[2, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"`{which}_features` has 1 of .* rows with NaN or infinite"):
        knn_predict(train, torch.zeros(12, dtype=torch.long), query, 2)


def test_empty_or_degenerate_evaluation_inputs_raise_clear_errors():
    g = torch.Generator().manual_seed(9)
    train, labels = torch.randn(6, 4, generator=g), torch.tensor([0, 1] * 3)
    with pytest.raises(ValueError, match=r"`train_features` is empty"):
        knn_evaluate(train[:0], labels[:0], train, labels, num_classes=2)
    with pytest.raises(ValueError, match=r"`steps` must be >= 1; got steps=0"):
        linear_probe_evaluate(train, labels, train, labels, steps=0)
    with pytest.raises(ValueError, match=r"must not be empty; got 6 train and 0 test rows"):
        linear_probe_evaluate(train, labels, train[:0], labels[:0], num_classes=2)
    train[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"`train_features` has 1 of 6 rows"):
        linear_probe_evaluate(train, labels, train[1:], labels[1:])


def test_knn_predict_chunking_gives_the_same_scores():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 5, (40,), generator=g)
    query = torch.randn(17, 6, generator=g)
    full = knn_predict(train, labels, query, 5, k=6, chunk_size=1024)
    for chunk_size in (1, 4, 16, 17):
        chunked = knn_predict(train, labels, query, 5, k=6, chunk_size=chunk_size)
        assert chunked.shape == full.shape
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(full.double(), brute_force_knn(train, labels, query, 5, 6, 0.07), rtol=1e-4, atol=1e-6)


def test_knn_predict_k_larger_than_training_set_uses_every_example():
    g = torch.Generator().manual_seed(2)
    train = torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    query = torch.randn(4, 5, generator=g)
    scores = knn_predict(train, labels, query, num_classes=3, k=50, temperature=0.3)
    torch.testing.assert_close(scores.double(), brute_force_knn(train, labels, query, 3, 6, 0.3), rtol=1e-4, atol=1e-6)
    # Every training example votes: each class's score is positive exactly when it has training examples.
    assert (scores > 0).all()


def test_knn_predict_unused_classes_score_zero():
    g = torch.Generator().manual_seed(3)
    train = torch.randn(10, 4, generator=g)
    labels = torch.tensor([0, 2] * 5)  # class 1 and 3 never appear
    scores = knn_predict(train, labels, torch.randn(5, 4, generator=g), num_classes=4, k=10)
    assert (scores[:, [1, 3]] == 0).all()
    assert (scores[:, [0, 2]] > 0).all()


def test_knn_predict_is_invariant_to_feature_scale():
    g = torch.Generator().manual_seed(4)
    train = torch.randn(15, 4, generator=g)
    labels = torch.randint(0, 3, (15,), generator=g)
    query = torch.randn(6, 4, generator=g)
    scores = knn_predict(train, labels, query, 3, k=5)
    scale_train = 0.1 + 10 * torch.rand(15, 1, generator=g)
    scale_query = 0.1 + 10 * torch.rand(6, 1, generator=g)
    torch.testing.assert_close(knn_predict(train * scale_train, labels, query * scale_query, 3, k=5), scores,
                               rtol=1e-4, atol=1e-6)


def test_knn_predict_mismatched_train_lengths_raise():
    with pytest.raises(ValueError):
        knn_predict(torch.randn(5, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3), num_classes=2)


# ------------------------------------------------------------------------------------------ knn_evaluate


def test_knn_evaluate_separable_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(5)
    features, labels = clusters(num_classes=6, per_class=30, dim=16, generator=g)
    order = torch.randperm(len(labels), generator=g)
    features, labels = features[order], labels[order]
    result = knn_evaluate(features[:120], labels[:120], features[120:], labels[120:], k=10)
    assert result["accuracy"] == 1.0
    assert result["top5_accuracy"] == 1.0


def test_knn_evaluate_shuffled_training_labels_give_near_chance_accuracy():
    g = torch.Generator().manual_seed(6)
    num_classes = 10
    # Train and test from the same clusters (one call: `clusters` draws new centres each time).
    features, labels = clusters(num_classes, per_class=150, dim=16, generator=g, noise=0.1)
    order = torch.randperm(len(labels), generator=g)
    features, labels = features[order], labels[order]
    train, train_labels, test, test_labels = features[:1000], labels[:1000], features[1000:], labels[1000:]

    clean = knn_evaluate(train, train_labels, test, test_labels, num_classes=num_classes, k=5)
    assert clean["accuracy"] > 0.95  # the features carry the labels ...
    shuffled = train_labels[torch.randperm(len(train_labels), generator=g)]
    noisy = knn_evaluate(train, shuffled, test, test_labels, num_classes=num_classes, k=5)
    # ... but shuffled training labels carry none: chance is 0.1 (top-1) and 0.5 (top-5).
    assert noisy["accuracy"] < 0.25
    assert noisy["top5_accuracy"] < 0.7


def test_knn_evaluate_agrees_with_knn_predict_scores():
    g = torch.Generator().manual_seed(7)
    num_classes = 7
    train = torch.randn(60, 8, generator=g)
    train_labels = torch.randint(0, num_classes, (60,), generator=g)
    test = torch.randn(30, 8, generator=g)
    test_labels = torch.randint(0, num_classes, (30,), generator=g)
    # k = every training example, so that no class scores exactly 0 (ties would make top-5 arbitrary).
    result = knn_evaluate(train, train_labels, test, test_labels, num_classes=num_classes, k=60, temperature=0.2)
    scores = brute_force_knn(train, train_labels, test, num_classes, 60, 0.2)
    assert (scores > 0).all()
    ranking = scores.argsort(dim=1, descending=True)
    top1 = (ranking[:, 0] == test_labels).double().mean().item()
    top5 = (ranking[:, :5] == test_labels[:, None]).any(dim=1).double().mean().item()
    assert result["accuracy"] == pytest.approx(top1)
    assert result["top5_accuracy"] == pytest.approx(top5)


@pytest.mark.parametrize("num_classes,has_top5", [(2, False), (4, False), (5, True), (8, True)])
def test_knn_evaluate_reports_top5_only_with_at_least_five_classes(num_classes, has_top5):
    g = torch.Generator().manual_seed(num_classes)
    features, labels = clusters(num_classes, per_class=10, dim=12, generator=g)
    # num_classes is inferred from the labels.
    result = knn_evaluate(features[::2], labels[::2], features[1::2], labels[1::2], k=3)
    assert ("top5_accuracy" in result) is has_top5
    assert set(result) <= {"accuracy", "top5_accuracy"}
    assert 0.0 <= result["accuracy"] <= 1.0


def test_knn_evaluate_mismatched_train_lengths_raise():
    with pytest.raises(ValueError):
        knn_evaluate(torch.randn(8, 3), torch.zeros(7, dtype=torch.long), torch.randn(4, 3),
                     torch.zeros(4, dtype=torch.long))


def test_knn_evaluate_mismatched_test_lengths_raise():
    # A length-1 side would otherwise broadcast silently into a wrong accuracy.
    g = torch.Generator().manual_seed(8)
    train, train_labels = torch.randn(10, 4, generator=g), torch.arange(10) % 3
    with pytest.raises(ValueError, match="test_labels"):
        knn_evaluate(train, train_labels, torch.randn(6, 4, generator=g), torch.tensor([1]), k=3)
    with pytest.raises(ValueError, match="test_labels"):
        knn_evaluate(train, train_labels, torch.randn(1, 4, generator=g), torch.tensor([0, 1, 2, 1]), k=3)


# ------------------------------------------------------------------------------------------- pool_tokens


def test_pool_tokens_sequence_with_and_without_cls():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    tokens[:, 0] = 1e6  # a CLS token that would dominate any average including it
    with_cls = pool_tokens(tokens, has_cls_token=True)
    without_cls = pool_tokens(tokens, has_cls_token=False)
    assert with_cls.shape == without_cls.shape == (2, 3)
    for b in range(2):
        for c in range(3):
            patches = [tokens[b, i, c].item() for i in range(1, 5)]
            assert with_cls[b, c].item() == pytest.approx(sum(patches) / 4)
            assert without_cls[b, c].item() == pytest.approx((1e6 + sum(patches)) / 5)


def test_pool_tokens_feature_map_matches_token_layout():
    g = torch.Generator().manual_seed(9)
    feature_map = torch.randn(3, 4, 5, 6, generator=g)  # (B, C, H, W)
    pooled = pool_tokens(feature_map, has_cls_token=True)  # the flag is irrelevant for a feature map
    assert pooled.shape == (3, 4)
    as_tokens = feature_map.flatten(2).transpose(1, 2)  # (B, H*W, C)
    torch.testing.assert_close(pooled, pool_tokens(as_tokens, has_cls_token=False))
    assert pooled[1, 2].item() == pytest.approx(feature_map[1, 2].sum().item() / 30, rel=1e-5)


@pytest.mark.parametrize("shape", [(4,), (2, 3), (1, 2, 3, 4, 5)])
def test_pool_tokens_bad_ndim_raises(shape):
    with pytest.raises(ValueError):
        pool_tokens(torch.zeros(shape), has_cls_token=False)


# ------------------------------------------------------------------------------ features from the model


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    # Drop path makes train-mode forwards random, so a missed switch to eval mode would show.
    return SimMIMModel(tiny_config(drop_path_rate=0.5))


@pytest.mark.parametrize("layer", [None, 0, 1, 2, -1])
def test_extract_features_shapes_labels_and_values(vit, layer):
    g = torch.Generator().manual_seed(10)
    loader = make_loader(vit.config, [3, 2, 4], g, label_as_list=layer == 0)
    vit.train()
    features, labels = extract_features(vit, loader, layer=layer)
    assert vit.training  # the encoder's mode is restored
    assert all(m.training for m in vit.modules())

    assert features.shape == (9, vit.config.hidden_size)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert labels.tolist() == list(range(100, 109))

    pixel_values = torch.cat([batch["pixel_values"] for batch in loader])
    vit.eval()
    try:
        with torch.no_grad():
            direct = encoder_features(vit, pixel_values, layer)
            outputs = vit(pixel_values, output_hidden_states=True)
    finally:
        vit.train()
    torch.testing.assert_close(features, direct, rtol=1e-5, atol=1e-5)
    if layer is None:
        expected = outputs.pooler_output
    else:
        # Average of the patch tokens of the chosen hidden state (the CLS token at index 0 left out).
        expected = outputs.hidden_states[layer][:, 1:].mean(dim=1)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_extract_features_keeps_eval_mode_and_accepts_the_pretraining_model():
    torch.manual_seed(1)
    config = tiny_config(drop_path_rate=0.5)
    mim = SimMIMForMaskedImageModeling(config)
    mim.eval()
    g = torch.Generator().manual_seed(11)
    loader = make_loader(config, [2, 3], g)
    features, labels = extract_features(mim, loader, layer=None)
    assert not mim.simmim.training  # stays in eval mode
    with torch.no_grad():
        expected = mim.simmim(torch.cat([b["pixel_values"] for b in loader])).pooler_output
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    # Deterministic although the model has drop path: the encoder ran in eval mode both times.
    mim.train()
    again, _ = extract_features(mim, loader, layer=None)
    torch.testing.assert_close(again, features, rtol=1e-5, atol=1e-5)
    assert mim.simmim.training


def test_extract_features_custom_label_key(vit):
    g = torch.Generator().manual_seed(12)
    loader = [{"pixel_values": images(vit.config, 2, g), "target": torch.tensor([7, 3])}]
    _, labels = extract_features(vit, loader, label_key="target")
    assert labels.tolist() == [7, 3]


@pytest.mark.parametrize("layer", [3, 10, -4])
def test_layer_out_of_range_raises(vit, layer):
    # vit-nano has 2 blocks: hidden_states 0 (embeddings), 1, 2 (and -3..-1).
    g = torch.Generator().manual_seed(13)
    loader = make_loader(vit.config, [2], g)
    vit.train()
    with pytest.raises(ValueError):
        extract_features(vit, loader, layer=layer)
    assert vit.training  # restored even when it fails
    with pytest.raises(ValueError):
        encoder_features(vit, loader[0]["pixel_values"], layer=layer)


def test_extract_features_swin_every_layer():
    torch.manual_seed(2)
    swin = SimMIMModel(tiny_swin_config()).eval()
    g = torch.Generator().manual_seed(14)
    loader = make_loader(swin.config, [2, 1], g)
    pixel_values = torch.cat([b["pixel_values"] for b in loader])
    with torch.no_grad():
        outputs = swin(pixel_values, output_hidden_states=True)
    for layer in range(len(outputs.hidden_states)):
        features, _ = extract_features(swin, loader, layer=layer)
        # Swin has no CLS token: every token of the hidden state is averaged.
        torch.testing.assert_close(features, outputs.hidden_states[layer].mean(dim=1), rtol=1e-5, atol=1e-5)
    features, _ = extract_features(swin, loader)
    torch.testing.assert_close(features, outputs.pooler_output, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ LinearProbe


def test_linear_probe_only_trains_the_head():
    torch.manual_seed(3)
    config = tiny_config(drop_path_rate=0.5)
    probe = LinearProbe(SimMIMModel(config), num_labels=3, layer=1)
    probe.train()
    assert probe.training and probe.head.training
    assert not probe.encoder.training
    assert not any(m.training for m in probe.encoder.modules())

    trainable = {name for name, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}

    encoder_before = {name: p.detach().clone() for name, p in probe.encoder.named_parameters()}
    head_before = {name: p.detach().clone() for name, p in probe.head.named_parameters()}
    # All parameters handed to the optimizer, with weight decay: frozen ones must still not move.
    optimizer = torch.optim.AdamW(probe.parameters(), lr=0.1, weight_decay=0.5)
    g = torch.Generator().manual_seed(15)
    pixel_values = images(config, 4, g)
    labels = torch.tensor([0, 1, 2, 1])
    output = probe(pixel_values, labels=labels)
    assert output.logits.shape == (4, 3)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    output.loss.backward()
    optimizer.step()

    for name, p in probe.encoder.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p, encoder_before[name]), name
    assert any(not torch.equal(p, head_before[name]) for name, p in probe.head.named_parameters())

    # Train mode, yet deterministic: the encoder's drop path is off.
    with torch.no_grad():
        torch.testing.assert_close(probe(pixel_values).logits, probe(pixel_values).logits)
    assert probe(pixel_values).loss is None


def test_linear_probe_features_are_the_encoders():
    torch.manual_seed(4)
    encoder = SimMIMModel(tiny_config()).eval()
    probe = LinearProbe(encoder, num_labels=5, layer=None, normalize=False).eval()
    g = torch.Generator().manual_seed(16)
    pixel_values = images(encoder.config, 3, g)
    with torch.no_grad():
        pooled = encoder(pixel_values).pooler_output
        torch.testing.assert_close(probe(pixel_values).logits, probe.head(pooled), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_config", [tiny_config, tiny_swin_config], ids=["vit", "swin"])
def test_linear_probe_runs_on_every_layer(make_config):
    torch.manual_seed(5)
    config = make_config()
    encoder = SimMIMModel(config).eval()
    g = torch.Generator().manual_seed(17)
    pixel_values = images(config, 2, g)
    with torch.no_grad():
        num_hidden = len(encoder(pixel_values, output_hidden_states=True).hidden_states)
    for layer in [None, *range(-num_hidden, num_hidden)]:
        probe = LinearProbe(encoder, num_labels=4, layer=layer)
        with torch.no_grad():
            features = encoder_features(encoder, pixel_values, layer)
            logits = probe(pixel_values).logits
        # The head is sized for the chosen layer's width (Swin's stages differ).
        assert probe.head.in_features == features.shape[1], layer
        assert logits.shape == (2, 4)


# ------------------------------------------------------------------------------------------- linear probe on features


def test_linear_probe_evaluate_separates_linear_classes_and_not_shuffled_ones():
    from simmim_hf.evaluation import linear_probe_evaluate

    g = torch.Generator().manual_seed(3)
    directions = torch.randn(4, 16, generator=g)
    labels = torch.arange(400) % 4
    features = directions[labels] * 3 + torch.randn(400, 16, generator=g)
    good = linear_probe_evaluate(features[:200], labels[:200], features[200:], labels[200:], steps=200, lr=0.05)
    assert good["accuracy"] > 0.95
    shuffled = labels[:200][torch.randperm(200, generator=g)]
    bad = linear_probe_evaluate(features[:200], shuffled, features[200:], labels[200:], steps=200, lr=0.05)
    assert bad["accuracy"] < 0.5
    # Deterministic for a seed.
    again = linear_probe_evaluate(features[:200], labels[:200], features[200:], labels[200:], steps=200, lr=0.05)
    assert again == good
    with pytest.raises(ValueError, match="same length"):
        linear_probe_evaluate(features[:10], labels[:9], features[:5], labels[:5])


def test_top_k_accuracy_counts_ties_and_nan_scores_as_wrong():
    """A constant or diverged (NaN) classifier scores 0, not 100 %: `best/` is chosen by this metric."""
    from simmim_hf.metrics import load_metric

    metric = load_metric("top_k_accuracy", num_process=1)
    labels = np.array([0, 1, 2, 3, 4, 5])
    logits = np.random.default_rng(0).normal(size=(6, 8))
    expected_top1 = float((logits.argmax(1) == labels).mean())
    expected_top5 = float((np.argsort(-logits, 1)[:, :5] == labels[:, None]).any(1).mean())
    result = metric.compute(predictions=logits, references=labels, top_k=(1, 5))
    assert result == {"accuracy": pytest.approx(expected_top1), "top5_accuracy": pytest.approx(expected_top5)}
    assert metric.compute(predictions=np.zeros((6, 8)), references=labels, top_k=(1, 5)) == {
        "accuracy": 0.0, "top5_accuracy": 0.0}
    diverged = logits.copy()
    diverged[:3] = np.nan
    assert metric.compute(predictions=diverged, references=labels, top_k=(1,))["accuracy"] == pytest.approx(
        float((logits.argmax(1)[3:] == labels[3:]).sum()) / 6)
    with pytest.raises(ValueError, match=r"references.*\[0, 8\)"):
        metric.compute(predictions=logits, references=labels + 3)


def test_knn_top5_counts_only_classes_that_got_votes():
    """With k=1 one class gets a vote; the other four "top-5" classes are zero-score ties and must not count."""
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(200, 8, generator=generator), torch.randn(300, 8, generator=generator)
    train_labels = torch.randint(0, 10, (200,), generator=generator)
    test_labels = torch.randint(0, 10, (300,), generator=generator)
    result = knn_evaluate(train, train_labels, test, test_labels, num_classes=10, k=1)
    assert result["top5_accuracy"] == result["accuracy"]


def test_evaluate_classifier_on_an_empty_loader_raises_a_clear_error():
    """It failed inside the metric library ("Evaluation module cache file doesn't exist ...")."""
    from accelerate import Accelerator
    from jobs import reset_accelerate

    from simmim_hf.evaluation import evaluate_classifier

    reset_accelerate()
    probe = LinearProbe(SimMIMModel(tiny_config()), num_labels=3)
    with pytest.raises(ValueError, match=r"The evaluation set is empty"):
        evaluate_classifier(probe, [], Accelerator(cpu=True), num_classes=3)
    reset_accelerate()
