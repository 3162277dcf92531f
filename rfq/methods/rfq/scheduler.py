"""The turbulence-driven bit-width scheduler (spec method_rfq.md §3).

At the start of an event epoch every mixed layer gets a turbulence score from its weights,
``T_l = mean_{b in Cw_l} share_b / b``, where ``share_b`` is the fraction of weights in the outer
25 % of their rounding bin at bit b (``rfq.ops.quant_stats`` with delta = 0.125; clipped tails
never count). The ``K = floor(rho L)`` most turbulent layers lose their lowest bit if it is still
the floor (2; 3 for depthwise); every other layer gets its full set back. Freezing only narrows
the sampling of the random passes: the max pass, the EMA model and the search keep full sets.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rfq import ops
from rfq.nn import mixed_layers


class BitWidthScheduler:
    def __init__(self, model: nn.Module, epochs: int, freeze_start: int = 5, p_early: int = 2,
                 p_late: int = 15, late_fraction: float = 0.72, ratio_max: float = 0.5,
                 ratio_min: float = 0.2, delta: float = 0.125, shared_sets: bool = True):
        if epochs < 1:
            raise ValueError(f"scheduler epochs must be >= 1, got {epochs}")
        if not 0 <= ratio_min <= ratio_max <= 1:
            raise ValueError(f"need 0 <= ratio_min <= ratio_max <= 1, got {ratio_min}, "
                             f"{ratio_max}")
        if p_early < 1 or p_late < 1:
            raise ValueError("scheduler periods p_early and p_late must be >= 1")
        self.epochs, self.freeze_start = epochs, freeze_start
        self.p_early, self.p_late, self.late_fraction = p_early, p_late, late_fraction
        self.ratio_max, self.ratio_min, self.delta = ratio_max, ratio_min, delta
        self.shared_sets = shared_sets
        self.full = {n: (list(m.w_bits), list(m.a_bits)) for n, m in mixed_layers(model)}
        self.floor = {n: min(w) for n, (w, _) in self.full.items()}
        self.w_sets = {n: list(w) for n, (w, _) in self.full.items()}
        self.a_sets = {n: list(a) for n, (_, a) in self.full.items()}
        self.history: list[dict] = []

    # -- schedule --
    def period(self, epoch: int) -> int:
        return self.p_early if epoch <= math.floor(self.late_fraction * self.epochs) \
            else self.p_late

    def is_event(self, epoch: int) -> bool:
        return epoch > self.freeze_start and (epoch + 1) % self.period(epoch) == 0

    def ratio(self, epoch: int) -> float:
        phase = math.floor((epoch - self.freeze_start) / 2) / max(math.floor(self.epochs / 2), 1)
        return self.ratio_min + 0.5 * (self.ratio_max - self.ratio_min) * \
            (1 + math.cos(math.pi * phase))

    # -- action --
    @torch.no_grad()
    def turbulence(self, model: nn.Module) -> dict[str, float]:
        """T_l over each layer's current weight candidate set (one quant_stats call per layer)."""
        scores = {}
        for name, layer in mixed_layers(model):
            _, share = ops.quant_stats(layer.weight.detach(), layer.w_steps.detach(),
                                       layer.w_bits, True, self.delta)
            share = share.tolist()  # host read: once per layer per event epoch
            current = self.w_sets[name]
            scores[name] = sum(share[layer.w_bits.index(b)] / b for b in current) / len(current)
        return scores

    def step(self, model: nn.Module, epoch: int) -> list[str]:
        """Run the event of ``epoch`` (if it is one). Returns the layers frozen by it."""
        if not self.is_event(epoch):
            return []
        scores = self.turbulence(model)
        k = math.floor(self.ratio(epoch) * len(scores))
        ranked = sorted(scores, key=lambda n: (-scores[n], n))
        top = set(ranked[:k])
        frozen = []
        for name in scores:
            w_full, a_full = self.full[name]
            if name in top and min(self.w_sets[name]) == self.floor[name] \
                    and len(self.w_sets[name]) > 1:
                drop = self.floor[name]
                self.w_sets[name] = [b for b in w_full if b != drop]
                self.a_sets[name] = [b for b in a_full if b != drop] if self.shared_sets \
                    else list(a_full)
                frozen.append(name)
            elif name not in top:
                self.w_sets[name], self.a_sets[name] = list(w_full), list(a_full)
            # a top layer whose floor is already frozen keeps its set (and counts towards K)
        self.history.append({"epoch": epoch, "k": k, "frozen": frozen,
                             "turbulence": {n: round(v, 6) for n, v in scores.items()}})
        return frozen

    def frozen_layers(self) -> list[str]:
        return [n for n in self.w_sets if len(self.w_sets[n]) < len(self.full[n][0])]

    def state_dict(self) -> dict:
        return {"w_sets": self.w_sets, "a_sets": self.a_sets, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        if set(state["w_sets"]) != set(self.w_sets):
            raise ValueError("scheduler state is for other layers than this model's")
        self.w_sets = {n: list(v) for n, v in state["w_sets"].items()}
        self.a_sets = {n: list(v) for n, v in state["a_sets"].items()}
        self.history = list(state["history"])
