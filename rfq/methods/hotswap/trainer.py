"""Hot-swap training, the sandwich rule (spec methods_seeds.md §B.2 item 6) on the main method's
coupled step and the shared trainer (optimizers, EMA, masked update, checkpoints, resume, DDP,
logging): per step one pass with every layer at 8 bits (CE; its logits are the teacher), then
one at 1 bit and n_random - 1 at bits drawn uniformly from 2..7, the whole model at one
bit-width each, with CE and KL to the detached 8-bit logits (weighted 1/2 + 1/2 as in the
coupled step); the gradients add up and one optimizer step follows. Entries of the per-bit
tensors (steps, band steps, BN copies) that no pass used are left untouched."""

from __future__ import annotations

import torch

from rfq.methods.rfq.trainer import CoupledTrainer
from rfq.nn import resolve_config
from rfq.training import MaskedUpdate


class HotSwapTrainer(CoupledTrainer):
    @property
    def kind(self) -> str:
        return "hotswap"

    def setup(self) -> None:
        if self.cfg.mode != "hotswap":
            raise ValueError(f"HotSwapTrainer trains mode 'hotswap', got {self.cfg.mode!r}")
        self.scheduler, self.tap = None, None
        self.masked = MaskedUpdate(self.model, self.optimizers) if self.cfg.masked_update \
            else None

    def passes(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        return self._coupled_passes(x, y)

    def uniform(self, bits: int) -> dict:
        return resolve_config(self.model, bits)

    def step_configs(self) -> list[dict]:
        bits = sorted(self.cfg.bits)
        low, middle = bits[0], bits[1:-1] or bits
        draws = [self.sampler.choice(middle) for _ in range(self.cfg.n_random - 1)]
        return [self.uniform(b) for b in ([low] + draws)[: self.cfg.n_random]]


__all__ = ["HotSwapTrainer"]
