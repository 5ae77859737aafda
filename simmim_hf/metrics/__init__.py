"""Metric scripts for `evaluate`, shipped with the package so evaluation works offline.

`evaluate.load("accuracy")` fetches its script from the Hub, which fails without a network (and
`HF_HUB_OFFLINE=1`). The scripts here are ordinary `evaluate` metric modules loaded by path:

    >>> from simmim_hf.metrics import load_metric
    >>> metric = load_metric("top_k_accuracy")
    >>> metric.compute(predictions=logits, references=labels, top_k=(1, 5))
    {'accuracy': ..., 'top5_accuracy': ...}
"""

from __future__ import annotations

import os

METRICS_DIR = os.path.dirname(os.path.abspath(__file__))
AVAILABLE_METRICS = ("top_k_accuracy",)


def metric_path(name: str) -> str:
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric name={name!r}; expected one of {AVAILABLE_METRICS}.")
    return os.path.join(METRICS_DIR, f"{name}.py")


def load_metric(name: str = "top_k_accuracy", **kwargs):
    """`evaluate.load` of a metric script shipped with simmim_hf (works offline)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["AVAILABLE_METRICS", "load_metric", "metric_path"]
