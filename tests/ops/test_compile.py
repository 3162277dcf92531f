"""torch.compile(fullgraph=True) over a module built on rfq ops: same values and gradients as
eager, and re-selecting the bit-width every step does not recompile."""

import torch
import torch.nn.functional as F

from rfq import ops


class TinyQuantMLP(torch.nn.Module):
    """Two linear layers with coupled weight (signed) and input (unsigned) quantizers."""

    def __init__(self, bits=(2, 3, 4, 5, 6)):
        super().__init__()
        self.bits = list(bits)
        k = len(self.bits)
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(32, 16, generator=g) * 0.3)
        self.w2 = torch.nn.Parameter(torch.randn(10, 32, generator=g) * 0.3)
        self.s_w = torch.nn.Parameter(torch.full((2, k), 0.05))
        self.s_a = torch.nn.Parameter(torch.full((2, k), 0.1))
        self.register_buffer("sel", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        x = ops.coupled_quant(x.relu(), self.s_a[0], self.bits, self.sel, False)
        h = F.linear(x, ops.coupled_quant(self.w1, self.s_w[0], self.bits, self.sel, True))
        h = ops.coupled_quant(h.relu(), self.s_a[1], self.bits, self.sel, False)
        return F.linear(h, ops.coupled_quant(self.w2, self.s_w[1], self.bits, self.sel, True))


def run_step(model, x, target):
    model.zero_grad()
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_compile_fullgraph_matches_eager_without_recompiling():
    torch._dynamo.reset()
    eager = TinyQuantMLP()
    compiled_model = TinyQuantMLP()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)

    run_step(compiled, x, target)  # compile once
    with torch._dynamo.config.patch(error_on_recompile=True):
        for j in [3, 0, 4, 1, 2, 4]:
            eager.sel.fill_(j)
            compiled_model.sel.fill_(j)
            loss_e, grads_e = run_step(eager, x, target)
            loss_c, grads_c = run_step(compiled, x, target)
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
            for a, b in zip(grads_c, grads_e):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_stats_and_codes():
    torch._dynamo.reset()
    steps = torch.tensor([0.2, 0.05])

    @torch.compile(fullgraph=True)
    def f(x):
        mse, share = ops.quant_stats(x, steps, [2, 4])
        return mse, share, ops.quantize_codes(x, steps[1:], 4)

    x = torch.randn(1000)
    mse, share, codes = f(x)
    emse, eshare = ops.quant_stats(x, steps, [2, 4])
    assert torch.equal(mse, emse) and torch.equal(share, eshare)
    assert torch.equal(codes, ops.quantize_codes(x, steps[1:], 4))
