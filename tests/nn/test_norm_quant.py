"""The input quantizers fused with the op in front of them inside quantized ResNet blocks: BN ->
conv2 (rfq.ops.batch_norm_quant) and the block's ReLU -> conv1 (rfq.ops.relu_quant); and each
block's last BN fused with its shortcut add (rfq.ops.batch_norm_add). Outputs,
gradients and running statistics of a training forward/backward are those of the unfused
composition; the fused paths are taken exactly where they may be."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from rfq import ops
from rfq.models import build_model
from rfq.nn import SwitchableBatchNorm2d, mixed_layers, quantize_, set_bits
from rfq.nn.modules import unfused_input_quant, use_reference_quantizer


def model_and_batch(seed=0, name="resnet20"):
    torch.manual_seed(seed)
    model = quantize_(build_model(name, 1, 10)).to(memory_format=torch.channels_last)
    x = torch.randn(16, 1, 12, 12).to(memory_format=torch.channels_last)
    return model, x, torch.arange(16) % 10


def count_fused(monkeypatch, name="batch_norm_quant"):
    calls = []
    real = getattr(ops, name)

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)
    monkeypatch.setattr(ops, name, spy)
    return calls


def init_activation_steps(model, x):
    """Training mode, every activation step initialised (the fused paths wait for it)."""
    model.train()
    with torch.no_grad():
        for a in (2, 3, 4, 5, 6):
            set_bits(model, (6, a))
            model(x)


def train_pass(model, x, y, bits):
    set_bits(model, bits)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("bits", [(6, 6), (2, 3), (4, 2)])
def test_fused_training_pass_equals_the_unfused_one(monkeypatch, bits):
    results = []
    for fused in (True, False):
        model, x, y = model_and_batch()
        init_activation_steps(model, x)
        calls = count_fused(monkeypatch)
        relu_calls = count_fused(monkeypatch, "relu_quant")
        add_calls = count_fused(monkeypatch, "batch_norm_add")
        if fused:
            loss = train_pass(model, x, y, bits)
            assert len(calls) == 9  # every BasicBlock's bn1 -> conv2
            assert len(relu_calls) == 9  # and its ReLU -> conv1
            assert len(add_calls) == 9  # and its bn2 + shortcut
        else:
            with unfused_input_quant():
                loss = train_pass(model, x, y, bits)
            assert not calls and not relu_calls and not add_calls
        monkeypatch.undo()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        bufs = {n: b.clone() for n, b in model.named_buffers()}
        results.append((loss, grads, bufs))
    (loss_f, grads_f, bufs_f), (loss_u, grads_u, bufs_u) = results
    # statistics differ from ATen's in the last fp32 bits, so codes on a boundary may flip
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-4, atol=1e-5)
    assert grads_f.keys() == grads_u.keys()
    for name in grads_f:
        scale = float(grads_u[name].abs().max()) + 1e-12
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=0, atol=2e-3 * scale,
                                   msg=name)
    for name in bufs_f:  # running statistics, usage marks, selectors
        if bufs_f[name].is_floating_point():
            torch.testing.assert_close(bufs_f[name], bufs_u[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(bufs_f[name], bufs_u[name]), name


def test_where_the_fused_path_is_not_taken(monkeypatch):
    model, x, y = model_and_batch()
    model.train()
    calls = count_fused(monkeypatch)
    model(x)  # first batch: activation steps are initialised from the BN outputs
    assert not calls
    model(x)
    assert len(calls) == 9
    calls.clear()
    model.eval()
    model(x)  # running statistics: plain BN
    assert not calls
    model.train()
    with use_reference_quantizer():  # E1b's plain-PyTorch step keeps its own composition
        model(x)
    assert not calls
    bn1 = model.blocks[0].bn1
    handle = bn1.register_forward_hook(lambda *a: None)  # someone wants bn1's output
    model(x)
    assert len(calls) == 8
    handle.remove()
    calls.clear()
    handle = model.blocks[1].conv2.register_forward_pre_hook(lambda *a: None)  # wants its input
    model(x)
    assert len(calls) == 8
    handle.remove()
    calls.clear()
    model.blocks[0].conv2.a_signed = True  # a signed quantizer does not replace the ReLU
    model(x)
    assert len(calls) == 8


def test_relu_fusion_runs_in_eval_too_and_keeps_the_outputs(monkeypatch):
    model, x, y = model_and_batch()
    model.train()
    model(x)  # initialise the activation steps
    model.eval()
    relu_calls = count_fused(monkeypatch, "relu_quant")
    with torch.no_grad():
        fused = model(x)
        assert len(relu_calls) == 9
        with unfused_input_quant():
            plain = model(x)
    assert len(relu_calls) == 9
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)


def test_running_statistics_modes():
    """Momentum, cumulative (BN recalibration) and batch_stats_only (search scoring) as in
    SwitchableBatchNorm2d.forward."""
    torch.manual_seed(0)
    bn = SwitchableBatchNorm2d(torch.nn.BatchNorm2d(5), 2, 2)
    bn.select(1, 0)
    x = torch.randn(8, 5, 4, 4) * 3 + 1
    steps, sel = torch.tensor([0.25]), torch.tensor(0)
    for mode in ("momentum", "cumulative", "batch_stats_only"):
        fused, plain = (SwitchableBatchNorm2d(torch.nn.BatchNorm2d(5), 2, 2) for _ in range(2))
        for m in (fused, plain):
            m.load_state_dict(bn.state_dict())
            m.select(1, 0)
            m.cumulative = mode == "cumulative"
            m.batch_stats_only = mode == "batch_stats_only"
        for k in range(3):
            xk = x + k
            q = fused.forward_quantized(xk, steps, [4], sel, False, 1.0)
            want = ops.coupled_quant(plain(xk), steps, [4], sel, False)
            assert (q != want).float().mean() < 1e-3
        torch.testing.assert_close(fused.running_mean, plain.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused.running_var, plain.running_var, rtol=1e-5, atol=1e-6)
        assert torch.equal(fused.used, plain.used)
    for mode in ("momentum", "cumulative", "batch_stats_only"):  # the same for forward_add
        fused, plain = (SwitchableBatchNorm2d(torch.nn.BatchNorm2d(5), 2, 2) for _ in range(2))
        for m in (fused, plain):
            m.load_state_dict(bn.state_dict())
            m.select(0, 1)
            m.cumulative = mode == "cumulative"
            m.batch_stats_only = mode == "batch_stats_only"
        for k in range(3):
            xk, r = x + k, torch.randn(x.shape)
            torch.testing.assert_close(fused.forward_add(xk, r), plain(xk) + r, rtol=1e-5,
                                       atol=1e-5)
        torch.testing.assert_close(fused.running_mean, plain.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused.running_var, plain.running_var, rtol=1e-5, atol=1e-6)
        assert torch.equal(fused.used, plain.used)
        assert bool(fused.used[0, 1]) == (mode != "batch_stats_only")


def test_where_the_fused_shortcut_add_is_not_taken(monkeypatch):
    """forward_add fuses only a training fp32 BN whose output nobody else needs, with a residual
    of x's shape: not in eval, not without gradients, not unfused, not with a hook, not while
    IDM keeps or compares its output; the unfused result is bn(x) + residual."""
    torch.manual_seed(0)
    bn = SwitchableBatchNorm2d(torch.nn.BatchNorm2d(4), 1, 1)
    x, r = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    calls = count_fused(monkeypatch, "batch_norm_add")
    bn.train()
    bn.forward_add(x, r)
    assert len(calls) == 1
    bn.eval()
    torch.testing.assert_close(bn.forward_add(x, r), bn(x) + r, rtol=0, atol=0)
    bn.train()
    with unfused_input_quant():
        bn.forward_add(x, r)
    bn.match_keep = True
    bn.forward_add(x, r)
    assert bn.match_kept is not None
    bn.match_keep, bn.match_kept = False, None
    bn.match_teacher = torch.zeros_like(x)
    bn.forward_add(x, r)
    assert bn.match_loss is not None
    bn.match_teacher = bn.match_loss = None
    handle = bn.register_forward_hook(lambda *a: None)
    bn.forward_add(x, r)
    handle.remove()
    with torch.no_grad():  # the search's scoring keeps F.batch_norm's arithmetic exactly
        bn.batch_stats_only = True
        torch.testing.assert_close(bn.forward_add(x, r), bn(x) + r, rtol=0, atol=0)
        bn.batch_stats_only = False
    bias = torch.randn(1, 4, 1, 1)  # a residual that broadcasts: the plain add does that
    torch.testing.assert_close(bn.forward_add(x, bias), bn(x) + bias, rtol=0, atol=0)
    assert len(calls) == 1
    bn.forward_add(x, r)
    assert len(calls) == 2


def test_resnet18_blocks_fuse_too(monkeypatch):
    torch.manual_seed(0)
    model = quantize_(build_model("resnet18", 3, 10))
    model.train()
    x = torch.randn(2, 3, 32, 32)
    model(x)
    calls = count_fused(monkeypatch)
    model(x)
    assert len(calls) == 8
    assert len(mixed_layers(model)) == 19


@pytest.mark.parametrize("bits", [(2, 3), (5, 6)])
def test_feature_matching_fused_equals_unfused(monkeypatch, bits):
    """A switchable BN with a ``match_teacher`` adds mean((its output - teacher)^2) as
    ``match_loss``: fused with conv2's quantizer (batch_norm_quant_mse) for every block's bn1,
    by F.batch_norm + FeatureMSE for bn2 and everywhere when unfused. Loss and gradients agree."""
    results = []
    for fused in (True, False):
        model, x, y = model_and_batch(1)
        init_activation_steps(model, x)
        bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
        g = torch.Generator().manual_seed(3)
        teachers = {}  # teacher features: the BN outputs of a max-bit pass, perturbed
        hooks = [bn.register_forward_hook(
            lambda mod, inp, out: teachers.__setitem__(mod, out.detach().clone()))
            for bn in bns]
        with torch.no_grad():
            set_bits(model, "max")
            model(x)
        for h in hooks:
            h.remove()
        for bn in bns:
            bn.match_teacher = teachers[bn] + 0.1 * torch.randn(teachers[bn].shape, generator=g)
        calls = count_fused(monkeypatch, "batch_norm_quant_mse")
        set_bits(model, bits)
        with contextlib.nullcontext() if fused else unfused_input_quant():
            out = model(x)
        assert len(calls) == (9 if fused else 0)  # every BasicBlock's bn1
        terms = [bn.match_loss for bn in bns]
        assert all(t is not None for t in terms)
        loss = F.cross_entropy(out, y) + 0.5 * torch.stack(terms).sum()
        loss.backward()
        monkeypatch.undo()
        for bn in bns:
            bn.match_teacher = bn.match_loss = None
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), torch.stack(terms).detach(), grads))
    (loss_f, terms_f, grads_f), (loss_u, terms_u, grads_u) = results
    torch.testing.assert_close(terms_f, terms_u, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-4, atol=1e-5)
    assert grads_f.keys() == grads_u.keys()
    for name in grads_f:
        scale = float(grads_u[name].abs().max()) + 1e-12
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=0, atol=2e-3 * scale,
                                   msg=name)


def test_kept_outputs_fused_equal_the_bn_outputs(monkeypatch):
    """``match_keep``: a switchable BN keeps its training output (IDM's teacher feature). Fused
    with conv2's quantizer the BN output is never written, so it is recomputed from x and the
    op's batch statistics; it matches the unfused F.batch_norm output to fp32 rounding and
    keeps x's layout, and the fused path is still taken."""
    kept = []
    for fused in (True, False):
        model, x, y = model_and_batch(2)
        init_activation_steps(model, x)
        set_bits(model, "max")
        bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
        for bn in bns:
            bn.match_keep = True
        calls = count_fused(monkeypatch)
        with contextlib.nullcontext() if fused else unfused_input_quant():
            model(x)
        assert len(calls) == (9 if fused else 0)
        monkeypatch.undo()
        assert all(bn.match_kept is not None and not bn.match_kept.requires_grad for bn in bns)
        assert all(bn.match_kept.is_contiguous(memory_format=torch.channels_last) for bn in bns)
        kept.append([bn.match_kept for bn in bns])
    for a, b in zip(*kept):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
