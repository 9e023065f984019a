"""pipeline.benchmarks: the train-time metrics agree with scikit-learn."""

from __future__ import annotations

import random

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from pipeline import benchmarks


def test_classification_metrics_match_sklearn():
    rng = random.Random(0)
    labels = torch.tensor([rng.randint(0, 2) for _ in range(500)])
    preds = torch.tensor([rng.randint(0, 2) for _ in range(500)])
    metrics = benchmarks.classification_metrics(benchmarks.confusion_matrix(preds, labels, 3))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert metrics["f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro"))
    binary = benchmarks.classification_metrics(benchmarks.confusion_matrix(preds % 2, labels % 2, 2))
    assert binary["f1"] == pytest.approx(f1_score(labels % 2, preds % 2))
    with pytest.raises(ValueError):
        benchmarks.classification_metrics(torch.zeros(2, 2))
