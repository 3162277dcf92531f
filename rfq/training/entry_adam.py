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
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(params, group)
        return loss

    def _update(self, params, group) -> None:
        """One step of every parameter in ``params``, as one foreach call per formula term
        (the same per-element arithmetic as a loop over the parameters, without its ~13
        dispatches per parameter)."""
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            elif state["step"].shape != p.shape:  # a checkpoint of torch's Adam
                state["step"] = torch.full_like(p, float(state["step"]), dtype=torch.float32)
        steps = [self.state[p]["step"] for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        grads = [p.grad for p in params]
        torch._foreach_add_(steps, 1)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        # 1 - beta^step as (-beta^step) + 1: negation is exact, so these are the same floats
        bias1 = torch._foreach_pow(beta1, steps)
        torch._foreach_neg_(bias1)
        torch._foreach_add_(bias1, 1)
        bias2_sqrt = torch._foreach_pow(beta2, steps)
        torch._foreach_neg_(bias2_sqrt)
        torch._foreach_add_(bias2_sqrt, 1)
        torch._foreach_sqrt_(bias2_sqrt)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_mul_(denom, bias1)
        torch._foreach_addcdiv_(params, m, denom, value=-group["lr"])
