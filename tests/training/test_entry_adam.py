"""EntrywiseAdam: torch's Adam when every entry is used; per-entry bias correction under the
masked update (an entry unused for a while continues exactly where its own history stopped)."""

import pytest
import torch

from rfq.training.entry_adam import EntrywiseAdam


def test_equals_torch_adam_when_every_entry_is_used():
    torch.manual_seed(0)
    a = torch.randn(5, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    ours, ref = EntrywiseAdam([a], lr=0.01), torch.optim.Adam([b], lr=0.01)
    for _ in range(20):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def loop_step(params, state, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """The update written per parameter (the oracle of the foreach step)."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            st = state.setdefault(p, {"step": torch.zeros_like(p), "m": torch.zeros_like(p),
                                      "v": torch.zeros_like(p)})
            g = p.grad
            st["step"].add_(1)
            st["m"].lerp_(g, 1 - beta1)
            st["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias1 = 1 - torch.pow(beta1, st["step"])
            bias2_sqrt = (1 - torch.pow(beta2, st["step"])).sqrt()
            denom = (st["v"].sqrt() / bias2_sqrt).add_(eps)
            p.addcdiv_(st["m"], denom * bias1, value=-lr)


def test_foreach_step_is_bit_identical_to_the_per_parameter_update():
    """Several shapes, gradients over 5 decades, some parameters without a gradient."""
    torch.manual_seed(2)
    ours_p = [torch.randn(s, requires_grad=True) for s in [(5,), (3, 4), (7,), (1,)]]
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    opt, ref_state = EntrywiseAdam(ours_p, lr=0.01), {}
    for k in range(200):
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            if (k + i) % 3 == 0:
                a.grad = b.grad = None
                continue
            g = torch.randn_like(a) * 10.0 ** (k % 5 - 2)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        loop_step(ref_p, ref_state, lr=0.01)
    for a, b in zip(ours_p, ref_p):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], ref_state[b]["v"])
        assert torch.equal(opt.state[a]["step"], ref_state[b]["step"])


def test_an_entry_skipped_by_the_masked_update_keeps_its_own_count():
    """Entry 1 is used at steps 1 and 7 only (restored in between, as MaskedUpdate does):
    its value equals a one-entry Adam that saw just those two gradients."""
    torch.manual_seed(1)
    p = torch.randn(2, requires_grad=True)
    alone = p.detach()[1:].clone().requires_grad_()
    opt, ref = EntrywiseAdam([p], lr=0.05), torch.optim.Adam([alone], lr=0.05)
    used = [True, False, False, False, False, False, True]
    for k, use in enumerate(used):
        g = torch.randn(2)
        p.grad = g.clone()
        old = p.detach().clone()
        old_state = {key: v.clone() for key, v in opt.state[p].items()}
        opt.step()
        mask = torch.tensor([True, use])
        with torch.no_grad():
            p.copy_(torch.where(mask, p, old))
            for key, v in old_state.items():
                opt.state[p][key].copy_(torch.where(mask, opt.state[p][key], v))
        if use:
            alone.grad = g[1:].clone()
            ref.step()
    assert opt.state[p]["step"].tolist() == [7.0, 2.0]
    torch.testing.assert_close(p.detach()[1:], alone.detach(), rtol=1e-5, atol=1e-6)


def test_loads_a_torch_adam_state_with_a_scalar_step():
    p = torch.ones(3, requires_grad=True)
    torch_adam = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    torch_adam.step()
    ours = EntrywiseAdam([p], lr=0.1)
    ours.load_state_dict(torch_adam.state_dict())
    p.grad = torch.ones(3)
    ours.step()
    assert ours.state[p]["step"].tolist() == [2.0, 2.0, 2.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr"):
        EntrywiseAdam([torch.zeros(1, requires_grad=True)], lr=-1)
    with pytest.raises(ValueError, match="betas"):
        EntrywiseAdam([torch.zeros(1, requires_grad=True)], betas=(1.0, 0.9))
