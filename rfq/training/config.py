"""The settings every trainer shares, in groups. A method's config is a dataclass that inherits
these groups and adds its own (``rfq.methods.rfq.TrainConfig``); every group may define
``check()``, and all of them run after construction."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Optional


@dataclass
class DataSettings:
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    seed: int = 0
    batch_size: int = 128
    train_limit: Optional[int] = None  # use only the first N training images (quick runs)
    channels_last: bool = True
    init_from: Optional[str] = None  # float checkpoint to start from
    device: str = "cpu"

    def check(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class OptimSettings:
    epochs: int = 40
    steps_per_epoch: Optional[int] = None  # None: one pass over the training images
    lr: float = 0.01  # SGD: weights, BN, FC
    warmup_epochs: float = 2.0
    min_lr: float = 1e-5
    momentum: float = 0.9
    weight_decay: float = 2.5e-5
    step_lr: float = 1e-4  # Adam: quantizer step sizes
    grad_clip: float = 1.0  # every gradient element clipped to [-grad_clip, grad_clip]; 0: off
    label_smoothing: float = 0.0

    def check(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if not self.lr > 0 or not self.step_lr >= 0:
            raise ValueError("lr must be > 0 and step_lr >= 0")


@dataclass
class EmaSettings:
    ema_decay: float = 0.998
    ema_warmup: bool = True


@dataclass
class LogSettings:
    log_every: int = 20
    tensorboard: bool = False  # also write the logged scalars to run_dir/tensorboard
    checkpoint_every: int = 200

    def check(self):
        for name in ("log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainSettings(DataSettings, OptimSettings, EmaSettings, LogSettings):
    """All shared groups; a method's config inherits this and its own groups."""

    # settings that shape the model and the data: a checkpoint must agree on them
    SHAPE_KEYS = ("model", "dataset", "seed", "batch_size", "train_limit")

    def __post_init__(self):
        for cls in reversed(type(self).__mro__):
            check = cls.__dict__.get("check")
            if check is not None:
                check(self)

    @classmethod
    def defaults(cls) -> dict:
        """Every setting's default: what a checkpoint written before a setting existed ran."""
        out = {}
        for f in fields(cls):
            if f.default is not MISSING:
                out[f.name] = f.default
            elif f.default_factory is not MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        return cls(**values)
