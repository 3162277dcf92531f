"""CSQ: bit-level continuous sparsification that grows and prunes each layer's precision to a
budget (Xiao et al., DAC 2023, arXiv 2212.02770; official code lawsonX/CSQ; spec
../shared/spec/methods_seeds.md §C, whose [ours] choices are documented where they are made).

    modules.py  CsqConv2d / CsqLinear (the fused rfq.ops.csq_weight), ``csq_(model)``
    budget.py   the regulariser whose sign flips at the target (size, bitops, layer modes)
    trainer.py  rounds, temperature, ticket round and rewind on the shared trainer; ``harden``
(the exported model: rfq.deploy.methods.export_csq; the command line: ``rfq csq``)
"""

from rfq.methods.csq.budget import BUDGET_MODES, BudgetRegulariser, layer_weights
from rfq.methods.csq.modules import (CsqConv2d, CsqLinear, csq_, csq_layers, layer_precisions,
                                     set_gate_mode, set_temperature)
from rfq.methods.csq.trainer import CSQ_DEFAULTS, CsqConfig, CsqTrainer, harden

__all__ = ["BUDGET_MODES", "BudgetRegulariser", "CSQ_DEFAULTS", "CsqConfig", "CsqConv2d",
           "CsqLinear", "CsqTrainer", "csq_", "csq_layers", "harden", "layer_precisions",
           "layer_weights", "set_gate_mode", "set_temperature"]
