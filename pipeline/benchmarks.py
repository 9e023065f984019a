"""Task metrics as pure functions: GLUE-style accuracy / F1 from a confusion matrix, LM loss."""

from __future__ import annotations

import math

import torch


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """counts[true, predicted] as a float64 tensor (summable across workers)."""
    flat = labels.long() * num_labels + predictions.long()
    return torch.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels).double()


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro-F1 and (for two classes) the positive-class F1 GLUE reports for MRPC/QQP."""
    total = float(confusion.sum())
    if total == 0:
        raise ValueError("no examples were evaluated")
    correct = float(confusion.diag().sum())
    f1s = []
    for k in range(confusion.shape[0]):
        tp = float(confusion[k, k])
        predicted = float(confusion[:, k].sum())
        actual = float(confusion[k, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    metrics = {"accuracy": correct / total, "f1_macro": sum(f1s) / len(f1s), "examples": total}
    if len(f1s) == 2:
        metrics["f1"] = f1s[1]
    return metrics


def language_model_metrics(loss_sum: float, token_count: float) -> dict[str, float]:
    """Mean token cross-entropy over the response tokens and its perplexity."""
    if token_count == 0:
        raise ValueError("no target tokens were evaluated")
    loss = loss_sum / token_count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": token_count}
