"""Settings of the main method's training, in groups on top of the shared ones
(rfq.training.config): candidate bits, the coupled step's losses, the bit-width scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rfq.nn import QuantConfig
from rfq.ops.layout import MAX_BITS, MIN_BITS
from rfq.training.config import TrainSettings

MODES = ("coupled", "float", "lsq", "hotswap")  # hotswap: rfq.methods.hotswap


@dataclass
class CandidateSettings:
    mode: str = "coupled"  # coupled | float | lsq (one bit-width trained alone)
    bits: list = field(default_factory=lambda: [6, 5, 4, 3, 2])
    act_bits: Optional[list] = None  # None: shared W/A candidate sets
    depthwise_bits: list = field(default_factory=lambda: [6, 5, 4, 3])
    lsq_bits: int = 4  # mode "lsq": the one bit-width (W and A)
    # mode "lsq": a mixed config {layer: [w, a]} trained alone instead of one bit-width (the
    # searched config's "retrained" baseline); the model keeps the candidate sets of ``bits``
    lsq_config: Optional[dict] = None
    lsq_grad_scale: bool = False
    wavelet: bool = True  # mode "hotswap": the wavelet path at 1-3 bits (False: the ablation)

    def check(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not MIN_BITS <= self.lsq_bits <= MAX_BITS:
            raise ValueError(f"lsq_bits must be in {MIN_BITS}..{MAX_BITS}, got {self.lsq_bits}")
        self.quant_config()  # validates the bit sets
        if self.lsq_config is not None:
            if self.mode != "lsq":
                raise ValueError(f"lsq_config is for mode 'lsq', this run is {self.mode!r}")
            if not isinstance(self.lsq_config, dict) or not self.lsq_config:
                raise ValueError("lsq_config must be a non-empty {layer: [w, a]} mapping")
            for name, pair in self.lsq_config.items():
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                    raise ValueError(f"lsq_config[{name!r}] must be [w, a], got {pair!r}")

    def quant_config(self) -> QuantConfig:
        if self.mode == "hotswap":  # every mixed layer, depthwise too, at the same candidates
            return QuantConfig(bits=tuple(self.bits), depthwise_bits=tuple(self.bits))
        if self.mode == "lsq" and self.lsq_config is None:
            b = (self.lsq_bits,)
            return QuantConfig(bits=b, act_bits=b, depthwise_bits=b,
                               lsq_grad_scale=self.lsq_grad_scale)
        return QuantConfig(bits=tuple(self.bits),
                           act_bits=tuple(self.act_bits) if self.act_bits else None,
                           depthwise_bits=tuple(self.depthwise_bits),
                           lsq_grad_scale=self.lsq_grad_scale)


@dataclass
class CoupledLossSettings:
    n_random: int = 3
    kd: bool = True  # random passes: 1/2 CE + 1/2 KL to the max pass (else CE)
    idm: bool = True
    idm_weight: float = 0.01
    qe: bool = False
    qe_start: Optional[int] = None  # default floor(0.27 E)
    qe_max: float = 0.1
    ar: bool = False
    ar_weight: float = 2.5e-5
    masked_update: bool = True  # False: RFQuant's drift of unused entries (legacy)

    def check(self):
        if self.n_random < 0:
            raise ValueError(f"n_random must be >= 0, got {self.n_random}")


@dataclass
class SchedulerSettings:
    scheduler: bool = True
    freeze_start: int = 2
    p_early: int = 2
    p_late: Optional[int] = None  # default ceil(E / 10)
    ratio_max: float = 0.5
    ratio_min: float = 0.2


@dataclass
class TrainConfig(CandidateSettings, CoupledLossSettings, SchedulerSettings, TrainSettings):
    """Every setting of a main-method run (also the float and LSQ-alone baselines)."""

    SHAPE_KEYS = ("mode", "model", "dataset", "bits", "act_bits", "depthwise_bits", "lsq_bits",
                  "lsq_config", "wavelet", "seed", "batch_size", "train_limit")
