"""The main method (spec method_rfq.md): one-shot weight-coupled training with the bit-width
scheduler and IDM, then a greedy search per budget, no retraining.

    config.py     TrainConfig (groups: candidates, coupled losses, scheduler + shared ones)
    trainer.py    CoupledTrainer (coupled step; float and LSQ-alone baselines), load_model
    losses.py     IDM feature MSE, QE and AR terms
    scheduler.py  turbulence-driven bit-width scheduler
    search.py     bidirectional greedy search, BN recalibration
"""

from rfq.methods.rfq.config import TrainConfig
from rfq.methods.rfq.scheduler import BitWidthScheduler
from rfq.methods.rfq.search import (GreedySearch, ScoreBatches, SearchResult, calibration_count,
                                    recalibrate_bn)
from rfq.methods.rfq.trainer import (CoupledTrainer, build_run_model,
                                     initialize_activation_steps, load_model)

__all__ = ["BitWidthScheduler", "CoupledTrainer", "GreedySearch", "ScoreBatches", "SearchResult",
           "TrainConfig", "build_run_model", "calibration_count", "initialize_activation_steps",
           "load_model", "recalibrate_bn"]
