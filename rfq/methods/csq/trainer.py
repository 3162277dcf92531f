"""CSQ training (spec methods_seeds.md §C.2-C.4) on the shared trainer (data stream, SGD, logging,
atomic checkpoints, bit-identical resume, DDP).

Schedule: ``rounds`` soft rounds of ``round_epochs`` epochs, then a ticket round of
``ticket_epochs``. In every round the temperature is beta = 200^(e/E) at epoch e of its E
epochs (reset to 1 at each round's start; a ticket round without rewind stays at 200, since
its digits continue from a hardened state [ours]) and the learning rate follows its own cosine.
Between soft rounds m <- min(beta m, m_init). The ticket round freezes the masks at 1[m > 0]
and, with ``rewind``, restarts from the weights saved at epoch ``rewind_epoch`` of round 0 (the
ImageNet recipe); without it, it continues (the CIFAR recipe: hard masks from epoch ``ticket``
on). The loss is CE plus the budget regulariser (budget.py) during the soft rounds. SGD with
momentum and weight decay on every parameter, gates included; no EMA (the official code has
none).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from rfq.cost import CostModel
from rfq.methods.csq.budget import BUDGET_MODES, BudgetRegulariser, check_target
from rfq.methods.csq.modules import (ACT_QUANTIZERS, M_INIT, check_planes, csq_, csq_layers,
                                     set_gate_mode, set_temperature)
from rfq.training.config import TrainSettings
from rfq.training.metrics import accuracy
from rfq.training.trainer import Trainer, build_float_model

BETA_MAX = 200.0
ZERO_LAYER_RULES = ("clamp", "prune")


@dataclass
class CsqSettings:
    planes: int = 6  # N bit planes per weight (2..8); 8 can need 9-bit codes to export
    target_bits: float = 3.0  # the budget: average bits (R* = target / N)
    act_bits: int = 4
    act_quant: str = "spec"  # "lsq": learned LSQ input steps (Adam, step_lr), an ablation
    budget_mode: str = "size"
    reg_strength: float = 0.1  # lambda (the official 0.01 is for 300-600 epochs; ours are short)
    rounds: int = 1  # soft rounds
    round_epochs: int = 20
    ticket_epochs: int = 6
    rewind: bool = False
    rewind_epoch: int = 2
    zero_layers: str = "clamp"  # "clamp": every layer keeps >= 1 bit; "prune": it may reach 0

    def check(self):
        check_planes(self.planes)
        check_target(self.target_bits, self.planes)
        if self.act_quant not in ACT_QUANTIZERS:
            raise ValueError(f"act_quant must be one of {ACT_QUANTIZERS}, got "
                             f"{self.act_quant!r}")
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"budget_mode must be one of {BUDGET_MODES}, got "
                             f"{self.budget_mode!r}")
        if self.zero_layers not in ZERO_LAYER_RULES:
            raise ValueError(f"zero_layers must be one of {ZERO_LAYER_RULES}, got "
                             f"{self.zero_layers!r}")
        if self.rounds < 1 or self.round_epochs < 1 or self.ticket_epochs < 0:
            raise ValueError("rounds and round_epochs must be >= 1, ticket_epochs >= 0")
        if self.rewind and not 0 <= self.rewind_epoch < self.round_epochs:
            raise ValueError(f"rewind_epoch must be in 0..round_epochs-1, got "
                             f"{self.rewind_epoch}")
        if not self.reg_strength >= 0:
            raise ValueError(f"reg_strength must be >= 0, got {self.reg_strength}")
        # the run's length follows from its rounds
        self.epochs = self.rounds * self.round_epochs + self.ticket_epochs


@dataclass
class CsqConfig(CsqSettings, TrainSettings):
    """Every setting of a CSQ run."""

    SHAPE_KEYS = ("model", "dataset", "seed", "batch_size", "train_limit", "planes",
                  "act_bits", "act_quant", "target_bits", "budget_mode", "rounds", "round_epochs",
                  "ticket_epochs", "rewind")


# Fashion-MNIST ResNet-20 from the shipped float model: 1,300 steps of 128 images, pseudo-epochs
# of 50 steps so that beta rises in 20 steps per round; SGD lr 0.05 (the CIFAR N=6 recipe),
# weight decay 5e-4 on everything, lambda 0.1. NCHW: the digit logits [N, C_out, C_in, kh, kw]
# are 5-D, which channels_last does not cover.
CSQ_DEFAULTS = dict(lr=0.05, weight_decay=5e-4, warmup_epochs=0.0, min_lr=0.0, momentum=0.9,
                    steps_per_epoch=50, checkpoint_every=100, ema_decay=0.0,
                    channels_last=False)


class CsqTrainer(Trainer):
    cfg: CsqConfig

    @property
    def kind(self) -> str:
        return "csq"

    def build_model(self) -> nn.Module:
        model = build_float_model(self.cfg, self.ds)
        return csq_(model, self.cfg.planes, self.cfg.act_bits, self.cfg.act_quant)

    def optimizer_groups(self):
        # spec §C.4: SGD with weight decay on every parameter, the gates included; learned LSQ
        # input steps (act_quant="lsq") take the shared trainer's Adam, as in the main method
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.cfg.act_quant == "lsq":
            return ([p for n, p in params if not n.endswith("a_steps")], [],
                    [p for n, p in params if n.endswith("a_steps")])
        return [p for _, p in params], [], []

    def setup(self) -> None:
        cfg = self.cfg
        for _, layer in csq_layers(self.model):
            layer.keep_one_bit = cfg.zero_layers == "clamp"
        self.costs = CostModel(self.model, (self.ds.in_channels, *self.ds.image_size))
        self.regulariser = BudgetRegulariser(self.model, self.costs, cfg.target_bits,
                                             cfg.budget_mode, cfg.reg_strength)
        self.rewind_state: dict | None = None
        self.history: list[dict] = []  # one row per epoch start: the precision over training

    def fresh_start(self) -> None:
        self.ema = None

    # -- schedule --
    def round_of(self, epoch: int) -> tuple[int, int, int]:
        """(round, epoch within it, its length); round == cfg.rounds is the ticket round."""
        cfg = self.cfg
        r = min(epoch // cfg.round_epochs, cfg.rounds)
        start = r * cfg.round_epochs
        return r, epoch - start, cfg.round_epochs if r < cfg.rounds else cfg.ticket_epochs

    def beta_at(self, epoch: int) -> float:
        r, e, length = self.round_of(epoch)
        if r == self.cfg.rounds and not self.cfg.rewind:
            return BETA_MAX  # the CIFAR recipe: the masks harden, the temperature stays [ours]
        return BETA_MAX ** (e / length)

    def lr_at(self, step: int) -> tuple[float, float]:
        """A cosine per round (restarted at each round's start), no warm-up."""
        cfg = self.cfg
        e = self.epoch_of(step)
        _, _, length = self.round_of(int(e))
        start = min(int(e) // cfg.round_epochs, cfg.rounds) * cfg.round_epochs
        t = min((e - start) / max(length, 1), 1.0)
        cosine = 0.5 * (1 + math.cos(math.pi * t))
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * cosine, cfg.step_lr * cosine

    @property
    def in_ticket(self) -> bool:
        return self.round_of(self.step // self.steps_per_epoch)[0] >= self.cfg.rounds

    def on_epoch_start(self, epoch: int) -> str | None:
        cfg = self.cfg
        r, e, _ = self.round_of(epoch)
        message = None
        if e == 0 and 0 < r:
            if r < cfg.rounds:  # a new soft round: m <- min(beta m, m_init)
                with torch.no_grad():
                    for _, layer in csq_layers(self.model):
                        layer.m.copy_(torch.clamp(layer.beta * layer.m, max=M_INIT))
                message = f"round {r}: gates rescaled"
            else:
                set_gate_mode(self.model, "ticket")
                if cfg.rewind and self.rewind_state is not None:
                    self._rewind()
                message = f"ticket round: masks frozen, average {self.average_bits():.3f} bits"
        if r == 0 and e == cfg.rewind_epoch and cfg.rewind:
            self.rewind_state = {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
                                 for k, v in self.model.state_dict().items()
                                 if not k.endswith(".m")}
        set_temperature(self.model, self.beta_at(epoch))
        self.history.append({"epoch": epoch, "round": r, "beta": self.beta_at(epoch),
                             "average_bits": self.average_bits()})
        return message

    def _rewind(self) -> None:
        masks = {k: v.clone() for k, v in self.model.state_dict().items() if k.endswith(".m")}
        self.model.load_state_dict({**self.rewind_state, **masks})
        set_gate_mode(self.model, "ticket")
        for opt in self.optimizers:
            opt.state.clear()

    def average_bits(self) -> float:
        return float(self.regulariser.average_bits())

    # -- one step --
    def passes(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        logits = self.net(x)
        loss = self.ce(logits, y)
        ratio = self.regulariser.ratio()
        logs = {"loss": loss.detach(), "acc": accuracy(logits.detach(), y),
                "avg_bits": ratio * self.regulariser.planes}
        if not self.in_ticket and self.cfg.reg_strength > 0:
            reg = self.regulariser.loss(ratio)
            loss = loss + reg
            logs["reg"] = reg.detach()
        loss.backward()
        return logs

    # -- checkpoint --
    def extra_state(self) -> dict:
        return {"rewind_state": self.rewind_state, "history": self.history}

    def load_extra_state(self, saved: dict) -> None:
        self.rewind_state = saved["rewind_state"]
        self.history = list(saved["history"])


@torch.no_grad()
def harden(model: nn.Module, zero_layers: str = "clamp") -> dict[str, int]:
    """The exported model: every layer's gates and digits thresholded at 0 (spec §C.1
    "Export"), in place. A layer with no bit on keeps the bit with the largest m ("clamp") or
    stays all zero ("prune"). Returns each layer's precision."""
    if zero_layers not in ZERO_LAYER_RULES:
        raise ValueError(f"zero_layers must be one of {ZERO_LAYER_RULES}, got {zero_layers!r}")
    out = {}
    for name, layer in csq_layers(model):
        if zero_layers == "clamp" and layer.precision() == 0:
            best = int(layer.m.argmax())
            layer.m[best] = M_INIT
        layer.set_gate_mode("hard")
        out[name] = layer.precision()
    return out


__all__ = ["BETA_MAX", "CSQ_DEFAULTS", "CsqConfig", "CsqSettings", "CsqTrainer", "harden"]
