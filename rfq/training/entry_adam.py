"""Adam whose step count is kept per entry, for stacked per-bit tensors (LSQ steps).

torch.optim.Adam keeps one scalar ``step`` per tensor, so when the masked update keeps an
unused entry's value and moments, its bias correction still advances: an entry first used at
step 50 is corrected as if its moments held 50 updates while they hold one (its first update
comes out ~0.7 of Adam's, and the error fades only over the next hundreds). Here ``step``
has the parameter's shape, so the masked update restores it with the moments and each entry's
correction counts its own updates. With every entry used every step it is torch's Adam.
"""

from __future__ import annotations

import torch


class EntrywiseAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                elif state["step"].shape != p.shape:  # a checkpoint of torch's Adam
                    state["step"] = torch.full_like(p, float(state["step"]),
                                                    dtype=torch.float32)
                step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                g = p.grad
                step.add_(1)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias1 = 1 - torch.pow(beta1, step)
                bias2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
                denom = (v.sqrt() / bias2_sqrt).add_(group["eps"])
                p.addcdiv_(m, denom * bias1, value=-group["lr"])
        return loss
