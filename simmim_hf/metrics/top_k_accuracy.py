"""Top-k classification accuracy from logits, as an `evaluate` metric (top-1 is the usual accuracy)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Fraction of examples whose reference label is among the k highest-scoring classes. `predictions` are the
per-class scores (logits or probabilities) of each example, `references` the integer labels. `accuracy` is
top-1 (the `accuracy` metric applied to the argmax, except that a tie for the top score, or a NaN score,
counts as wrong); `top{k}_accuracy` is reported for every
other requested k that does not exceed the number of classes (top-5 of a 3-class problem would be 1.0
by construction, so it is left out).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): class scores, shape (n_examples, n_classes).
    references (`list` of `int`): true labels.
    top_k (`tuple` of `int`, defaults to (1, 5)): which k to report.
Returns:
    accuracy (`float`): top-1 accuracy in [0, 1].
    top{k}_accuracy (`float`): top-k accuracy for each other k <= n_classes.
Examples:
    >>> metric = evaluate.load("path/to/top_k_accuracy.py")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], top_k=(1,))
    {'accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, top_k=(1, 5)):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
            raise ValueError(
                f"`predictions` must be (n_examples, n_classes) with one row per reference; got shape "
                f"{scores.shape} for {labels.shape[0]} references."
            )
        num_classes = scores.shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"`references` must be class indices in [0, {num_classes}); got values in "
                             f"[{labels.min()}, {labels.max()}].")
        # Rank of the true class = the other classes scoring at least as high: a tie counts against the example
        # (bf16 logits tie often enough to inflate accuracy, and a constant output must not score 100 %), and
        # so does any NaN score (a diverged model must not be selected as the best).
        true_scores = scores[np.arange(len(labels)), labels][:, None]
        rank = (scores > true_scores).sum(axis=1) + (scores == true_scores).sum(axis=1) - 1
        rank[np.isnan(scores).any(axis=1)] = num_classes
        results = {"accuracy": float((rank < 1).mean())}
        for k in top_k:
            if k > 1 and k <= num_classes:
                results[f"top{k}_accuracy"] = float((rank < k).mean())
        return results
