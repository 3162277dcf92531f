"""Coupled training on digits: it learns at every bit-width, unused entries stay put, resume is
bit-identical, checkpoints fail loudly and are never overwritten."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from rfq import checkpoint as ckpt
from rfq.nn import SwitchableBatchNorm2d, mixed_layers, set_bits
from rfq.nn.modules import QuantLayer
from rfq.methods.rfq.search import recalibrate_bn
from rfq.training import EMA
from rfq.methods.rfq import TrainConfig, CoupledTrainer as Trainer
from rfq.methods.rfq.losses import qe_loss

from method_utils import coupled_config


def batch_losses(model, batches, bits):
    """Loss at a uniform config, evaluated as the method does: BN statistics recalibrated."""
    model = copy.deepcopy(model)
    set_bits(model, bits)
    recalibrate_bn(model, batches)
    model.eval()
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y).item() for x, y in batches) / len(batches)


def test_coupled_steps_reduce_loss_at_every_bit_width(tmp_path, digits):
    # from scratch (no float init), so there is a lot to learn in a few steps
    tr = Trainer(coupled_config(epochs=1, steps_per_epoch=40, freeze_start=10, lr=0.1),
                 tmp_path / "r", dataset=digits, progress=False)
    batches = [tr.stream.batch(0, i) for i in range(3)]
    before = {b: batch_losses(tr.model, batches, b) for b in (6, 5, 4, 3, 2)}
    tr.run()
    after = {b: batch_losses(tr.model, batches, b) for b in (6, 5, 4, 3, 2)}
    for b in before:
        assert after[b] < 0.8 * before[b], (b, before[b], after[b])


def test_unused_entries_keep_values_and_moments(tmp_path, digits, float_ckpt):
    tr = Trainer(coupled_config(float_ckpt, n_random=1, scheduler=False), tmp_path / "r",
                 dataset=digits, progress=False)
    x, y = tr.stream.batch(0, 0)
    tr.train_step(x, y)  # optimizer moments now exist everywhere
    layers = mixed_layers(tr.model)
    bns = [m._bn_ref[0] for _, m in layers]
    before = [(m.w_steps.detach().clone(), m.a_steps.detach().clone()) for _, m in layers]
    bn_before = [b.weight.detach().clone() for b in bns]
    mom_before = [tr.sgd.state[b.weight]["momentum_buffer"].clone() for b in bns]
    tr.train_step(x, y)
    for (_, m), (ws, as_), bn, w0, mom0 in zip(layers, before, bns, bn_before, mom_before):
        unused_w = ~m.w_used
        assert unused_w.any()
        assert torch.equal(m.w_steps.detach()[unused_w], ws[unused_w])
        assert not torch.equal(m.w_steps.detach()[m.w_used], ws[m.w_used])
        assert torch.equal(m.a_steps.detach()[~m.a_used], as_[~m.a_used])
        unused = ~bn.used
        assert torch.equal(bn.weight.detach()[unused], w0[unused])
        assert torch.equal(tr.sgd.state[bn.weight]["momentum_buffer"][unused], mom0[unused])
        assert not torch.equal(bn.weight.detach()[bn.used], w0[bn.used])


def test_masked_update_reuses_its_snapshot_buffers(tmp_path, digits, float_ckpt):
    tr = Trainer(coupled_config(float_ckpt, n_random=1, scheduler=False), tmp_path / "r",
                 dataset=digits, progress=False)
    x, y = tr.stream.batch(0, 0)
    tr.train_step(x, y)
    tr.train_step(x, y)
    buffers = {k: v.data_ptr() for k, v in tr.masked._copies.items()}
    assert buffers
    tr.train_step(x, y)
    assert {k: v.data_ptr() for k, v in tr.masked._copies.items()} == buffers


def test_legacy_drift_moves_unused_entries(tmp_path, digits, float_ckpt):
    tr = Trainer(coupled_config(float_ckpt, n_random=1, scheduler=False, masked_update=False),
                 tmp_path / "r", dataset=digits, progress=False)
    x, y = tr.stream.batch(0, 0)
    tr.train_step(x, y)
    bn = mixed_layers(tr.model)[0][1]._bn_ref[0]
    w0 = bn.weight.detach().clone()
    tr.train_step(x, y)
    assert not torch.equal(bn.weight.detach()[~bn.used], w0[~bn.used])  # momentum drift


@pytest.mark.parametrize("toggles", [dict(idm=False, scheduler=False, kd=False),
                                     dict(qe=True, qe_start=0, ar=True, n_random=2),
                                     dict(n_random=0)])
def test_every_term_toggles_independently(tmp_path, digits, float_ckpt, toggles):
    tr = Trainer(coupled_config(float_ckpt, epochs=1, steps_per_epoch=3, **toggles),
                 tmp_path / "r", dataset=digits, progress=False)
    logs = tr.run()
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert ("loss_random" in logs) == (tr.cfg.n_random > 0)


def test_qe_loss_pulls_only_towards_coarse_grid_codes():
    conv = torch.nn.Conv2d(1, 2, 1, bias=False)
    from rfq.nn import QuantConv2d

    q = QuantConv2d(conv, [4, 2], [4, 2])
    with torch.no_grad():
        q.w_steps.copy_(torch.tensor([1.0, 4.0]))
        conv.weight.copy_(torch.tensor([4.2, 2.7]).reshape(2, 1, 1, 1))
    q.set_bits(4, 4)
    # 4.2 -> code 4 (divisible by 2^(4-2)): pulled to 4; 2.7 -> code 3: no pull
    loss = qe_loss(q, 2)
    torch.testing.assert_close(loss, torch.tensor(0.2**2), rtol=1e-5, atol=1e-7)


def test_ema_warmup_and_lerp():
    m = torch.nn.Linear(2, 1)
    ema = EMA(m, decay=0.9, warmup=True)
    w0 = ema.model.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update()  # d_0 = min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.model.weight, w0 + 0.9)


def test_resume_is_bit_identical(tmp_path, digits, float_ckpt):
    cfg = coupled_config(float_ckpt, epochs=3, steps_per_epoch=4, checkpoint_every=100,
                         freeze_start=0)
    full = Trainer(cfg, tmp_path / "full", dataset=digits, progress=False)
    full.run()
    part = Trainer(cfg, tmp_path / "part", dataset=digits, progress=False)
    part.run(max_steps=5)  # stops mid-epoch; run() checkpoints at its last step
    part.close()
    resumed = Trainer(cfg, tmp_path / "part", resume=True, dataset=digits, progress=False)
    assert resumed.step == 5
    resumed.run()
    assert resumed.step == full.step == 12
    for (n, a), (_, b) in zip(full.model.state_dict().items(),
                              resumed.model.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), n
    for (n, a), (_, b) in zip(full.ema.model.state_dict().items(),
                              resumed.ema.model.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), n
    assert full.scheduler.state_dict() == resumed.scheduler.state_dict()


def test_checkpoint_errors_never_overwrite(tmp_path, digits, float_ckpt):
    cfg = coupled_config(float_ckpt, epochs=1, steps_per_epoch=2)
    tr = Trainer(cfg, tmp_path / "r", dataset=digits, progress=False)
    tr.run()
    path = tmp_path / "r" / "checkpoint.pt"
    good = path.read_bytes()
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        Trainer(cfg, tmp_path / "r", dataset=digits, progress=False)
    other = TrainConfig(**{**cfg.__dict__, "bits": [4, 2]})
    with pytest.raises(ckpt.CheckpointError, match="different run; bits"):
        Trainer(other, tmp_path / "r", resume=True, dataset=digits, progress=False)
    assert path.read_bytes() == good
    bad = tmp_path / "bad" / "checkpoint.pt"
    bad.parent.mkdir()
    bad.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        Trainer(cfg, tmp_path / "bad", resume=True, dataset=digits, progress=False)
    assert bad.read_bytes() == good[: len(good) // 2]
    with pytest.raises(ckpt.CheckpointError, match="holds a 'coupled' model, expected 'float'"):
        Trainer(coupled_config(path, epochs=1), tmp_path / "x", dataset=digits, progress=False)


def test_checkpoint_older_than_a_setting_resumes_at_its_default(tmp_path, digits, float_ckpt):
    """A shape setting added after a checkpoint was written compares as its default; a
    different value is still refused."""
    cfg = coupled_config(float_ckpt, epochs=2, steps_per_epoch=2)
    tr = Trainer(cfg, tmp_path / "r", dataset=digits, progress=False)
    tr.run(max_steps=2)
    tr.save()
    path = tmp_path / "r" / "checkpoint.pt"
    state = ckpt.load(path)
    del state["config"]["wavelet"]  # as written before the setting existed
    ckpt.save_atomic(state, path)
    resumed = Trainer(cfg, tmp_path / "r", resume=True, dataset=digits, progress=False)
    assert resumed.step == 2
    other = TrainConfig(**{**cfg.__dict__, "wavelet": False})
    with pytest.raises(ckpt.CheckpointError, match="different run; wavelet: checkpoint True"):
        Trainer(other, tmp_path / "r", resume=True, dataset=digits, progress=False)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainConfig(mode="fancy")
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="bits must be non-empty bit-widths in 1..8"):
        TrainConfig(bits=[12, 4])
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_usage_marks_and_max_pass_config(tmp_path, digits, float_ckpt):
    tr = Trainer(coupled_config(float_ckpt, n_random=2), tmp_path / "r", dataset=digits,
                 progress=False)
    x, y = tr.stream.batch(0, 0)
    tr.train_step(x, y)
    for _, m in mixed_layers(tr.model):
        assert m.w_used[m.w_bits.index(6)]  # the max pass always runs at 6 bits
        assert 1 <= int(m.w_used.sum()) <= 3
        assert (m.w_bit, m.a_bit) == (6, 6)  # left at the max config after the step
    for m in tr.model.modules():
        if isinstance(m, SwitchableBatchNorm2d):
            assert m.used[0, 0]
        if isinstance(m, QuantLayer):
            assert (m.w_steps > 0).all() and (m.a_steps > 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs a CUDA device")
def test_coupled_step_never_syncs_on_cuda(tmp_path, digits, float_ckpt):
    cfg = coupled_config(float_ckpt, device="cuda", qe=True, qe_start=0, ar=True)
    tr = Trainer(cfg, tmp_path / "r", dataset=digits, progress=False)
    x, y = tr.stream.batch(0, 0)
    tr.train_step(x, y)  # first step: optimizer state allocation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            tr.train_step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_feature_mse_matches_mse_loss_and_keeps_the_layout(layout):
    from rfq.nn.modules import FeatureMSE

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 8, 5, 3, generator=g).contiguous(memory_format=fmt)
    student = student.double().requires_grad_()
    teacher = torch.randn(4, 8, 5, 3, generator=g, dtype=torch.float64).contiguous(
        memory_format=fmt)
    loss = FeatureMSE.apply(student, teacher)
    torch.testing.assert_close(loss, F.mse_loss(student, teacher))
    (grad,) = torch.autograd.grad(3.0 * loss, student)
    torch.testing.assert_close(grad, 3.0 * 2 * (student - teacher).detach() / student.numel())
    assert grad.is_contiguous(memory_format=fmt)  # batch-norm backward's fast path needs it
    assert torch.autograd.gradcheck(lambda s: FeatureMSE.apply(s, teacher), (student,))


def test_idm_keeps_only_the_teacher_features_a_pass_compares(tmp_path, digits, float_ckpt):
    """The max pass stores teacher features only for layers some random pass drew at their
    lowest weight bit; the step's random configs are drawn in the same order as before."""
    tr = Trainer(coupled_config(init_from=float_ckpt, idm=True), tmp_path / "r", dataset=digits,
                 progress=False)
    x, y = tr.stream.batch(0, 0)
    stored = []
    real_loss = tr.tap.loss

    def spy():
        stored.append(set(tr.tap.teacher))
        return real_loss()

    tr.tap.loss = spy
    state = tr.sampler.getstate()
    tr.train_step(x, y)
    tr.sampler.setstate(state)
    layers = mixed_layers(tr.model)
    want = set().union(*(tr._idm_layers(tr.sample_config(), layers)
                         for _ in range(tr.cfg.n_random)))
    assert want and stored and all(s == want for s in stored)
    assert tr.tap.teacher == {} and tr.tap.selected == set()
    tr.close()


def test_retain_freed_memory_is_idempotent():
    from rfq.runtime import retain_freed_memory

    first = retain_freed_memory()
    assert retain_freed_memory() is first
    import sys
    if sys.platform.startswith("linux"):
        import platform
        if platform.libc_ver()[0] == "glibc":
            assert first is True


def test_frozen_bits_are_never_drawn_after_a_scheduler_event(tmp_path, digits, float_ckpt):
    """After the scheduler freezes the lowest bit of its most turbulent layers, the sampler draws
    only from the shrunk sets (and still from the full sets of the other layers)."""
    tr = Trainer(coupled_config(float_ckpt, epochs=4, freeze_start=0, p_early=1,
                                ratio_max=0.5, ratio_min=0.5), tmp_path / "r",
                 dataset=digits, progress=False)
    message = tr.on_epoch_start(1)  # an event epoch: after freeze_start, period 1
    frozen = tr.scheduler.frozen_layers()
    assert frozen and message and str(len(frozen)) in message
    layers = dict(mixed_layers(tr.model))
    drawn = {n: set() for n in layers}
    for _ in range(400):
        for n, (w, a) in tr.sample_config().items():
            drawn[n].add(w)
    for n, layer in layers.items():
        if n in frozen:
            assert min(layer.w_bits) not in drawn[n]
            assert drawn[n] == set(tr.scheduler.w_sets[n])
        else:
            assert drawn[n] == set(layer.w_bits)


def test_optimizer_parameter_groups(tmp_path, digits, float_ckpt):
    """SGD with weight decay: 4-D conv weights (stem too); SGD without: BN copies, FC, biases;
    Adam: every step size, nothing else."""
    tr = Trainer(coupled_config(float_ckpt, weight_decay=1e-4), tmp_path / "r", dataset=digits,
                 progress=False)
    names = {id(p): n for n, p in tr.model.named_parameters()}
    decay, no_decay = (tr.sgd.param_groups[0], tr.sgd.param_groups[1])
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert decay["nesterov"] and decay["momentum"] == 0.9
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in tr.model.named_parameters() if p.dim() == 4}
    adam = {names[id(p)] for p in tr.adam.param_groups[0]["params"]}
    assert adam == {n for n, p in tr.model.named_parameters()
                    if n.endswith(("w_steps", "a_steps")) and p.requires_grad}
    rest = {names[id(p)] for p in no_decay["params"]}
    assert rest and all(n.endswith(("bias", ".weight")) for n in rest)
    assert not rest & adam and not rest & {names[id(p)] for p in decay["params"]}
    every = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert every == rest | adam | {names[id(p)] for p in decay["params"]}


def _recorded_step(tr, x, y):
    """One coupled step with every forward's logits and every switchable BN's output recorded
    (detached), and the step's random configs (drawn again from the same sampler state)."""
    logits, features = [], []
    current = {}

    def on_model(module, inputs, output):  # hooks return None: the output stays as it is
        logits.append(output.detach())
        features.append(dict(current))
        current.clear()

    def on_bn(name):
        def hook(module, inputs, output):
            current[name] = output.detach()
        return hook

    hooks = [tr.model.register_forward_hook(on_model)]
    hooks += [layer._bn_ref[0].register_forward_hook(on_bn(name))
              for name, layer in mixed_layers(tr.model)]
    state = tr.sampler.getstate()
    logs = tr.train_step(x, y)
    tr.sampler.setstate(state)
    configs = [tr.sample_config() for _ in range(tr.cfg.n_random)]
    for h in hooks:
        h.remove()
    return logs, logits, features, configs


@pytest.mark.parametrize("idm", [False, True])
def test_random_pass_loss_is_ce_plus_kl_from_the_max_pass_plus_idm(tmp_path, digits,
                                                                   float_ckpt, idm):
    """loss_random = 1/2 CE + 1/2 KL(p_max || p_random) (the teacher is the max pass: the KL
    of the other direction is a different number) + 0.01 x the sum over IDM layers (those
    drawn at their lowest weight bit) of mean((BN out - max pass's BN out)^2)."""
    tr = Trainer(coupled_config(float_ckpt, n_random=1, idm=idm, scheduler=False),
                 tmp_path / "r", dataset=digits, progress=False)
    x, y = tr.stream.batch(0, 0)
    logs, logits, features, (config,) = _recorded_step(tr, x, y)
    z0, z1 = logits
    ce = F.cross_entropy(z1, y, label_smoothing=tr.cfg.label_smoothing)
    p0, logp0, logp1 = F.softmax(z0, 1), F.log_softmax(z0, 1), F.log_softmax(z1, 1)
    kl = (p0 * (logp0 - logp1)).sum(1).mean()
    reverse = (logp1.exp() * (logp1 - logp0)).sum(1).mean()
    want = 0.5 * ce + 0.5 * kl
    if idm:
        layers = mixed_layers(tr.model)
        chosen = tr._idm_layers(config, layers)
        assert chosen  # digits' SmallCNN draws a lowest bit often enough at this seed
        want = want + 0.01 * sum(((features[1][n] - features[0][n]) ** 2).mean()
                                 for n in chosen)
    got = logs["loss_random"].item()
    assert got == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert abs(reverse.item() - kl.item()) > 1e-4 * abs(kl.item()) + 1e-6
    tr.close()


def test_idm_on_resnet_blocks_runs_fused_and_leaves_no_state(tmp_path, digits, monkeypatch):
    """ResNet-20's bn1 feeds conv2's quantizer: with IDM on, every bn1 of all 4 passes still
    runs fused (the teacher pass keeps its features from the fused op's statistics, the student
    passes use batch_norm_quant_mse); the step's loss equals the unfused step's, and afterwards
    no BN holds a teacher, a kept feature, a loss or a hook."""
    from rfq import ops
    from rfq.nn.modules import unfused_input_quant

    logs = []
    for fused in (True, False):
        tr = Trainer(coupled_config(None, model="resnet20", idm=True, scheduler=False,
                                    n_random=3), tmp_path / f"r{fused}", dataset=digits,
                     progress=False)
        x, y = tr.stream.batch(0, 0)
        calls = {"batch_norm_quant": [], "batch_norm_quant_mse": []}
        for name, seen in calls.items():
            real = getattr(ops, name)
            monkeypatch.setattr(ops, name, lambda *a, _r=real, _s=seen, **k: _s.append(1) or _r(*a, **k))
        with contextlib.nullcontext() if fused else unfused_input_quant():
            logs.append(tr.train_step(x, y))
        monkeypatch.undo()
        assert bool(calls["batch_norm_quant_mse"]) == fused
        fused_calls = len(calls["batch_norm_quant"]) + len(calls["batch_norm_quant_mse"])
        assert fused_calls == (4 * 9 if fused else 0)  # 9 blocks' bn1, 4 passes
        assert all(not bn.match_keep and bn.match_kept is None and bn.match_teacher is None
                   and bn.match_loss is None and not bn._forward_hooks
                   for bn in tr.tap.bns.values())
        tr.close()
    torch.testing.assert_close(logs[0]["loss_random"], logs[1]["loss_random"], rtol=1e-4,
                               atol=1e-5)
