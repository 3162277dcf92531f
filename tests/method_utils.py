"""Shared helpers of the method tests: tiny runs on scikit-learn's digits with SmallCNN."""

from __future__ import annotations

from dataclasses import asdict

from rfq import checkpoint as ckpt
from rfq.methods.rfq import TrainConfig, CoupledTrainer as Trainer

DIGITS = dict(model="smallcnn", dataset="digits", batch_size=64, channels_last=False)


def float_config(**kw) -> TrainConfig:
    return TrainConfig(**{**DIGITS, "mode": "float", "epochs": 6, "lr": 0.05,
                          "warmup_epochs": 0.0, "weight_decay": 5e-4, **kw})


def coupled_config(init_from=None, **kw) -> TrainConfig:
    return TrainConfig(**{**DIGITS, "mode": "coupled", "epochs": 4, "lr": 0.01,
                          "warmup_epochs": 0.0, "ema_decay": 0.99, "freeze_start": 1,
                          "init_from": str(init_from) if init_from else None, **kw})


def train_float(tmp_path, dataset, **kw):
    """A float SmallCNN on digits; returns the path of its model.pt."""
    cfg = float_config(**kw)
    tr = Trainer(cfg, tmp_path / "float", dataset=dataset, progress=False)
    tr.run()
    path = tmp_path / "float" / "model.pt"
    ckpt.save_atomic({"kind": "float", "config": asdict(cfg), "model": tr.model.state_dict()},
                     path)
    tr.close()
    return path


def scripted_batches():
    """Endless placeholder batches for searches whose scores come from an oracle."""
    import itertools

    import torch

    return itertools.repeat((torch.zeros(1), torch.zeros(1, dtype=torch.long)))


def level_cost(costs, model, level: float, metric: str = "bitops") -> float:
    """The cost of uniform W=A=level, linear between the integer levels around it."""
    lo, hi = int(level), int(level) + 1
    c_lo = costs.cost(costs.uniform(model, lo), metric)
    return c_lo + (costs.cost(costs.uniform(model, hi), metric) - c_lo) * (level - lo)
