"""Top-1 accuracy of logits and of a model over batches."""

from __future__ import annotations

import torch
from torch import nn


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean()


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    """Top-1 accuracy over batches in eval mode (one host read at the end)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    total = 0
    for x, y in batches:
        correct = correct + (model(x).argmax(1) == y).sum().cpu()
        total += len(y)
    model.train(was_training)
    return correct.item() / max(total, 1)
