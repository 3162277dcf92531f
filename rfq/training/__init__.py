"""Training machinery shared by every method: settings groups, the resumable trainer, EMA, the
masked update and evaluation."""

from rfq.training.config import (DataSettings, EmaSettings, LogSettings, OptimSettings,
                                 TrainSettings)
from rfq.training.ema import EMA
from rfq.training.masked_update import MaskedUpdate
from rfq.training.metrics import accuracy, evaluate
from rfq.training.trainer import Trainer, build_float_model, place_model

__all__ = ["DataSettings", "EMA", "EmaSettings", "LogSettings", "MaskedUpdate", "OptimSettings",
           "TrainSettings", "Trainer", "accuracy", "build_float_model", "evaluate",
           "place_model"]
