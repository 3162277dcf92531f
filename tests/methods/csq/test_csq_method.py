"""CSQ (rfq.methods.csq, spec methods_seeds.md §C): bit-level layers, the budget regulariser, the
rounds and the ticket, hardening, export and resume, on digits with SmallCNN."""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from method_utils import DIGITS
from rfq import deploy
from rfq import reference as ref
from rfq.cli import main
from rfq.cost import CostModel
from rfq.deploy.methods import csq_spec, export_csq
from rfq.methods.csq import (CSQ_DEFAULTS, BudgetRegulariser, CsqConfig, CsqTrainer, csq_,
                             csq_layers, harden, layer_weights, set_temperature)
from rfq.methods.csq.modules import digit_logits
from rfq.models import build_model
from rfq.training import evaluate
from rfq.data import eval_batches

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))
from independent_reader import read_codes  # noqa: E402


def small_model(planes=8, act_bits=4, seed=0):
    torch.manual_seed(seed)
    return csq_(build_model("smallcnn", 1, 10), planes, act_bits)


def config(float_ckpt, **kw):
    return CsqConfig(**{**DIGITS, **CSQ_DEFAULTS, "steps_per_epoch": 5, "round_epochs": 4,
                        "ticket_epochs": 2, "init_from": str(float_ckpt), **kw})


def set_bits_on(layer, on):
    with torch.no_grad():
        layer.m.copy_(torch.tensor([1.0 if i in on else -1.0 for i in range(layer.planes)]))


# ---- layers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("planes", [2, 5, 8])
def test_digit_init_reconstructs_the_rounded_weight(planes):
    w = torch.randn(6, 3, 3, 3)
    p, q, s = digit_logits(w, planes)
    assert set(p.unique().tolist()) <= {-1.0, 1.0} and set(q.unique().tolist()) <= {-1.0, 1.0}
    assert not bool(((p > 0) & (q > 0)).any())  # one sign per weight
    levels = 2 ** planes - 1
    codes = ref.csq_codes(p, q, torch.ones(planes))
    assert torch.equal(codes, (torch.round(w.abs() / s * levels) * w.sign()).to(torch.int32))
    assert (codes.float() * s / levels - w).abs().max() <= s / (2 * levels) + 1e-6


def test_hard_weights_are_exact_integers_times_the_step():
    model = small_model(planes=6)
    torch.manual_seed(1)
    for _, layer in csq_layers(model):
        with torch.no_grad():
            layer.p.normal_()
            layer.q.normal_()
            layer.m.normal_()
    harden(model, "prune")
    for name, layer in csq_layers(model):
        codes = ref.csq_codes(layer.p, layer.q, layer.m)
        assert torch.equal(layer.hard_codes(), codes), name
        assert codes.abs().max() <= 63
        step = layer.scale.detach() / 63
        w = layer.quantized_weight()
        assert torch.equal(w, codes.float() * step), name  # integer codes times the step


def test_gates_of_a_layer_harden_as_beta_grows():
    model = small_model()
    layer = csq_layers(model)[1][1]
    hard = copy.deepcopy(layer)
    hard.set_gate_mode("hard")
    want = hard.quantized_weight()
    errors = []
    for beta in (1.0, 10.0, 200.0, 1e4):
        set_temperature(model, beta)
        errors.append((layer.quantized_weight() - want).abs().max().item())
    # saturated, only the rounding of the per-plane factors remains
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6 < errors[0]


def test_ticket_mode_freezes_the_masks_exactly():
    model = small_model()
    layer = csq_layers(model)[2][1]
    set_bits_on(layer, {0, 2})
    layer.set_gate_mode("ticket")
    assert not layer.m.requires_grad
    set_temperature(model, 1.0)
    ticket = layer.quantized_weight()
    plain = torch.ops.rfq.csq_weight(layer.p, layer.q, torch.tensor([1e4, -1e4, 1e4] + [-1e4] * 5),
                                     layer.scale, layer.beta)
    assert torch.equal(ticket, plain)


def test_input_quantizers_follow_the_spec():
    model = small_model(act_bits=4)
    layers = dict(csq_layers(model))
    assert layers["stem.0"].a_bits == []  # the image
    for name in ("body1.0", "body2.0", "head.fc"):
        layer = layers[name]
        assert layer.a_bits == [4] and not layer.a_steps.requires_grad
        assert layer.a_steps.item() == pytest.approx(6 / 15)  # ReLU6, max-scaled
    pact = dict(csq_layers(small_model(act_bits=3)))["body1.0"]
    assert pact.a_steps.requires_grad and pact.a_steps.item() == pytest.approx(10 / 7)


# ---- the regulariser --------------------------------------------------------------------------

def test_layer_weights_per_mode():
    model = small_model()
    costs = CostModel(model, (1, 8, 8))
    size = layer_weights(model, costs, "size")
    assert size == {n: float(c.params) for n, c in costs.layers.items()}
    bitops = layer_weights(model, costs, "bitops")
    assert bitops["stem.0"] == costs.layers["stem.0"].macs * 8
    assert bitops["body1.0"] == costs.layers["body1.0"].macs * 4
    assert set(layer_weights(model, costs, "layer").values()) == {1.0}


@pytest.mark.parametrize("mode", ["size", "bitops", "layer"])
def test_coefficient_flips_sign_at_the_target(mode):
    model = small_model()
    costs = CostModel(model, (1, 8, 8))
    reg = BudgetRegulariser(model, costs, target_bits=4, mode=mode, strength=1.0)
    for _, layer in csq_layers(model):
        set_bits_on(layer, set(range(4)))
    assert reg.average_bits().item() == pytest.approx(4.0)
    grads = []
    for on in (set(range(6)), set(range(4)), set(range(2))):
        for _, layer in csq_layers(model):
            set_bits_on(layer, on)
            layer.m.grad = None
        reg.loss().backward()
        grads.append(torch.cat([layer.m.grad for _, layer in csq_layers(model)]))
    above, at, below = grads
    assert (above > 0).all()  # gradient descent lowers m: prunes
    assert (at == 0).all()
    assert (below < 0).all()  # raises m: grows


def test_size_mode_average_is_size_weighted():
    model = small_model()
    costs = CostModel(model, (1, 8, 8))
    reg = BudgetRegulariser(model, costs, target_bits=3)
    bits = {"stem.0": {0}, "body1.0": {0, 1, 2}, "body2.0": set(range(7)), "head.fc": {0, 5}}
    for name, layer in csq_layers(model):
        set_bits_on(layer, bits[name])
    params = {n: c.params for n, c in costs.layers.items()}
    want = sum(params[n] * len(b) for n, b in bits.items()) / sum(params.values())
    assert reg.average_bits().item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("start_on, target", [(set(range(8)), 3.0), ({0, 1}, 6.0)])
def test_regulariser_moves_precision_toward_target(digits, float_ckpt, tmp_path, start_on,
                                                   target):
    """From above it prunes, from below it grows (the training signal included)."""
    cfg = config(float_ckpt, target_bits=target, reg_strength=2.0, round_epochs=8,
                 ticket_epochs=0)
    tr = CsqTrainer(cfg, tmp_path / "run", dataset=digits, progress=False)
    for _, layer in csq_layers(tr.model):
        set_bits_on(layer, start_on)
    start = tr.average_bits()
    tr.run()
    end = tr.average_bits()
    assert abs(end - target) < abs(start - target) - 0.5, (start, end)


# ---- training: rounds, resume ----------------------------------------------------------------

def test_schedule_rounds_and_ticket(digits, float_ckpt, tmp_path):
    cfg = config(float_ckpt, rounds=2, round_epochs=3, ticket_epochs=2, rewind=True,
                 rewind_epoch=1)
    tr = CsqTrainer(cfg, tmp_path / "run", dataset=digits, progress=False)
    assert cfg.epochs == 8 and tr.total_steps == 40
    assert [tr.beta_at(e) for e in range(8)] == pytest.approx(
        [1, 200 ** (1 / 3), 200 ** (2 / 3)] * 2 + [1, 200 ** 0.5])
    tr.run(max_steps=15)  # the end of round 0
    assert tr.rewind_state is not None
    before = {n: (l.m.detach().clone(), l.beta.item()) for n, l in csq_layers(tr.model)}
    tr.run(max_steps=1)  # round 1 starts: m <- min(beta m, 1), then one SGD step
    for name, layer in csq_layers(tr.model):
        m, beta = before[name]
        want = torch.clamp(beta * m, max=1.0)
        assert (layer.m.detach() - want).abs().max() < 0.05, name
        assert layer.beta.item() == 1.0
    tr.run(max_steps=15)  # the ticket round starts: masks frozen, weights rewound
    masks = {n: (l.m > 0).clone() for n, l in csq_layers(tr.model)}
    assert all(l.gate_mode == "ticket" for _, l in csq_layers(tr.model))
    tr.run()
    assert all(torch.equal(l.m > 0, masks[n]) for n, l in csq_layers(tr.model))
    assert len(tr.history) == 8 and tr.history[-1]["round"] == 2


def test_resume_is_bit_identical(digits, float_ckpt, tmp_path):
    cfg = config(float_ckpt, rounds=2, round_epochs=2, ticket_epochs=2, rewind=True,
                 rewind_epoch=1, checkpoint_every=7)
    straight = CsqTrainer(cfg, tmp_path / "a", dataset=digits, progress=False)
    straight.run()
    first = CsqTrainer(cfg, tmp_path / "b", dataset=digits, progress=False)
    first.run(max_steps=13)
    first.save()
    resumed = CsqTrainer(cfg, tmp_path / "b", resume=True, dataset=digits, progress=False)
    resumed.run()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]), k
    assert straight.history == resumed.history


# ---- export -----------------------------------------------------------------------------------

def trained_hard_model(digits, float_ckpt, tmp_path, planes=6):
    cfg = config(float_ckpt, planes=planes, target_bits=3, reg_strength=1.0)
    tr = CsqTrainer(cfg, tmp_path / "run", dataset=digits, progress=False)
    tr.run()
    model = copy.deepcopy(tr.model)
    precisions = harden(model)
    return tr, model, precisions


def test_export_equals_the_hardened_model(digits, float_ckpt, tmp_path):
    tr, model, precisions = trained_hard_model(digits, float_ckpt, tmp_path)
    path = export_csq(model, tmp_path / "m.safetensors")
    tensors, meta = deploy.format.read(path)
    for name, layer in csq_layers(model):
        assert meta["config"][name][0] == precisions[name] == layer.precision()
        spec = csq_spec(layer)
        rec = meta["layers"][name]
        assert rec["bits"] == spec.bits
        # the file's codes times its step are the hard codes times s / (2^N - 1)
        codes = torch.from_numpy(read_codes(str(path))[name]).to(torch.int64)
        hard = layer.hard_codes().reshape(codes.shape[0], -1).to(torch.int64)
        shift = int(round(math.log2(spec.scale.item() * 63 / layer.scale.item())))
        assert torch.equal(codes << shift, hard), name
    loaded = deploy.load(path)
    x = next(iter(eval_batches(digits.test, digits, 64, "cpu", False)))[0]
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
    batches = list(eval_batches(digits.test, digits, 64, "cpu", False))
    assert abs(evaluate(loaded, batches) - evaluate(model, batches)) <= 1 / len(digits.test.labels)


def test_export_refuses_a_soft_model_and_nine_bit_codes(digits, float_ckpt, tmp_path):
    model = small_model(planes=8)
    with pytest.raises(ValueError, match="harden the model first"):
        export_csq(model, tmp_path / "x.safetensors")
    harden(model)  # every bit on, the largest weight's code is 255
    with pytest.raises(ValueError, match="need 9-bit signed storage"):
        export_csq(model, tmp_path / "x.safetensors")


def test_zero_layer_rules():
    model = small_model()
    layer = csq_layers(model)[1][1]
    set_bits_on(layer, set())
    with torch.no_grad():
        layer.m[3] = -0.5
    assert harden(copy.deepcopy(model), "clamp")["body1.0"] == 1
    pruned = copy.deepcopy(model)
    assert harden(pruned, "prune")["body1.0"] == 0
    assert csq_layers(pruned)[1][1].quantized_weight().abs().max() == 0


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    (dict(planes=8, target_bits=9.0), r"target_bits must be in \(0, N=8\]"),
    (dict(target_bits=0.0), r"target_bits must be in \(0, N=6\]"),
    (dict(target_bits=-1.0), r"target_bits must be in"),
    (dict(planes=6, target_bits=7.0), r"target_bits must be in \(0, N=6\]"),
    (dict(budget_mode="energy"), r"budget_mode must be one of \('size', 'bitops', 'layer'\)"),
    (dict(planes=1), r"planes \(N\) must be an integer in 2\.\.8, got 1"),
    (dict(planes=9), r"planes \(N\) must be an integer in 2\.\.8, got 9"),
    (dict(zero_layers="drop"), r"zero_layers must be one of"),
])
def test_bad_settings_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        CsqConfig(**{**DIGITS, **change})


@pytest.mark.parametrize("argv, match", [
    (["--target-bits", "7"], r"target_bits must be in \(0, N=6\]"),
    (["--target-bits", "0"], r"target_bits must be in"),
    (["--planes", "12"], r"planes \(N\) must be an integer in 2\.\.8, got 12"),
])
def test_cli_bad_input_is_a_clear_error(tmp_path, argv, match):
    with pytest.raises(SystemExit, match=r"rfq csq: bad settings: " + match):
        main(["csq", "--out", str(tmp_path / "x"), "--model", "smallcnn", "--dataset",
              "digits", *argv])


def test_cli_unknown_budget_mode_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["csq", "--out", str(tmp_path / "x"), "--budget-mode", "energy"])
    assert "invalid choice: 'energy'" in capsys.readouterr().err


# ---- the command ------------------------------------------------------------------------------

def test_cli_trains_hardens_and_exports(float_ckpt, tmp_path, capsys):
    out = tmp_path / "csq"
    argv = ["csq", "--out", str(out), "--init-from", str(float_ckpt), "--model", "smallcnn",
            "--dataset", "digits", "--planes", "6", "--target-bits", "3", "--act-bits", "4",
            "--round-epochs", "4", "--ticket-epochs", "2", "--steps-per-epoch", "5",
            "--batch-size", "64", "--reg-strength", "1.0", "--calib-images", "256",
            "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 30 and len(report["history"]) == 6
    params = {n: r["params"] for n, r in report["layers"].items()}
    counted = sum(params[n] * r["bits"] for n, r in report["layers"].items())
    assert report["average_bits"] == pytest.approx(counted / sum(params.values()))
    assert report["size_kib"] == pytest.approx(counted / 8 / 1024)
    assert abs(report["deploy_top1"] - report["top1"]) <= 2 / 360
    assert (out / "model.safetensors").is_file()
    assert "reached" in capsys.readouterr().out
    # a finished run resumes into the report alone
    assert main(argv + ["--resume"]) == 0
    assert json.loads((out / "report.json").read_text())["top1"] == report["top1"]


def test_learned_input_steps_ablation(digits, float_ckpt, tmp_path):
    """act_quant="lsq": the inputs get the main method's LSQ steps, set from the first batch and
    trained by the shared Adam; the export carries them."""
    cfg = config(float_ckpt, act_quant="lsq", reg_strength=1.0, target_bits=3)
    tr = CsqTrainer(cfg, tmp_path / "run", dataset=digits, progress=False)
    layer = dict(csq_layers(tr.model))["body1.0"]
    assert layer.a_ready == [False] and layer.a_steps.requires_grad
    assert any(layer.a_steps is p for p in tr.adam.param_groups[0]["params"])
    before = layer.a_steps.detach().clone()
    tr.run()
    assert layer.a_ready == [True] and not torch.equal(layer.a_steps.detach(), before)
    model = copy.deepcopy(tr.model)
    harden(model)
    path = export_csq(model, tmp_path / "m.safetensors")
    tensors, _ = deploy.format.read(path)
    assert torch.equal(tensors["body1.0.a_step"], layer.a_steps.detach().reshape(1))
    with pytest.raises(ValueError, match=r"act_quant must be one of \('spec', 'lsq'\)"):
        CsqConfig(**{**DIGITS, "act_quant": "pact"})
