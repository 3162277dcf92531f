"""DF-MPC: data-free mixed-precision compensation (Chen, Bai et al., Pattern Recognition 2023,
arXiv 2307.00498; spec ../shared/spec/methods_seeds.md §A). No official code exists.

From a float model and no data at all: pair layers, quantize each pair's first conv low
(ternary for 2 bits, DoReFa for 3..8) and everything else high, and fold a closed-form
per-channel compensation into the BatchNorm between the pair.

    pairing.py     which convs may pair (never across a residual add, concat or shared tensor)
    compensate.py  quantizers per layer, the closed form, folding, the report
    repair.py      the compensation applied to a coupled model's mixed config
"""

from rfq.methods.dfmpc.compensate import (LayerCodes, PairReport, Report, closed_form_c,
                                          compensate, pair_c, quantize_uncompensated,
                                          quantize_weight)
from rfq.methods.dfmpc.pairing import (FOLD_BN, FOLD_NEXT, Pair, PairingError, check_pairs,
                                       find_pairs)

__all__ = ["FOLD_BN", "FOLD_NEXT", "LayerCodes", "Pair", "PairReport", "PairingError", "Report",
           "check_pairs", "closed_form_c", "compensate", "find_pairs", "pair_c",
           "quantize_uncompensated", "quantize_weight"]
