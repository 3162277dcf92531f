"""Greedy search and BN recalibration on a small coupled model (digits)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rfq.data import load_digits_dataset
from rfq.nn import SwitchableBatchNorm2d, mixed_layers, set_bits
from rfq.cli.pipeline import budget_levels, load_run, score_batches
from rfq.methods.rfq.search import GreedySearch, recalibrate_bn
from rfq.methods.rfq import CoupledTrainer as Trainer

from method_utils import coupled_config, train_float


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    digits = load_digits_dataset()
    tmp = tmp_path_factory.mktemp("search")
    init = train_float(tmp, digits)
    tr = Trainer(coupled_config(init, epochs=3), tmp / "coupled", dataset=digits, progress=False)
    tr.run()
    tr.close()
    return load_run(tmp / "coupled", dataset=digits)


def valid(run, config):
    for name, layer in mixed_layers(run.model):
        w, a = config[name]
        assert w in layer.w_bits and a in layer.a_bits


@pytest.mark.parametrize("level", [2.5, 3, 4.5])
def test_search_respects_the_budget_and_returns_a_valid_config(run, level):
    target = budget_levels(run, [level])[0]
    result = GreedySearch(run.model, run.costs, score_batches(run, 128)).run(target)
    config = {n: tuple(v) for n, v in result.config.items()}
    valid(run, config)
    assert result.reached and run.costs.bitops(config) < target
    assert result.bitops == run.costs.bitops(config)
    assert result.iterations == len(result.history) > 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_cached_and_straightforward_search_choose_the_same_config(run, channels_last):
    target = budget_levels(run, [3.5])[0]
    model = copy.deepcopy(run.model)
    if channels_last:  # the cached weights must keep the layout, or the convs' sums differ
        model.to(memory_format=torch.channels_last)
    batches = lambda: ((x.contiguous(memory_format=torch.channels_last) if channels_last else x,
                        y) for x, y in score_batches(run, 128))  # noqa: E731
    fast = GreedySearch(model, run.costs, batches(), fast=True).run(target)
    naive = GreedySearch(model, run.costs, batches(), fast=False).run(target)
    assert fast.config == naive.config
    assert [h["error"] for h in fast.history] == [h["error"] for h in naive.history]


@pytest.mark.parametrize("integer", [True, False])
def test_both_searches_score_with_the_same_conv_arithmetic(run, integer, monkeypatch):
    """Integer convs (where fast) or float convs: the cached and the straightforward search run
    the same arithmetic, so they choose the same config either way."""
    from rfq import ops

    calls = []
    real = ops.integer_conv2d
    monkeypatch.setattr(ops, "integer_conv2d", lambda *a: calls.append(1) or real(*a))
    target = budget_levels(run, [4])[0]
    results = []
    for fast in (True, False):
        search = GreedySearch(run.model, run.costs, score_batches(run, 128), fast=fast)
        search.integer_convs = integer
        results.append(search.run(target))
    assert results[0].config == results[1].config
    assert [h["error"] for h in results[0].history] == [h["error"] for h in results[1].history]
    assert bool(calls) == (integer and ops.integer_conv_fast("cpu"))


def test_size_budget_moves_weight_bits_only(run):
    uniform4 = run.costs.uniform(run.model, 4)
    target = run.costs.size_bits(uniform4)
    result = GreedySearch(run.model, run.costs, score_batches(run, 128), metric="size").run(target)
    assert result.reached and run.costs.size_bits(
        {n: tuple(v) for n, v in result.config.items()}) <= target
    assert all(v[1] == 5 for v in result.config.values())  # activations stay at the start, 5
    assert {h["phase"] for h in result.history} == {"w"}


def test_min_bits_floor_is_respected(run):
    target = budget_levels(run, [2])[0] * 1.01
    result = GreedySearch(run.model, run.costs, score_batches(run, 128), min_bits=3).run(target)
    assert min(v[0] for v in result.config.values()) >= 3
    assert not result.reached  # W/A 2 budgets are unreachable with a 3-bit weight floor


def test_search_leaves_the_callers_model_untouched(run):
    before = copy.deepcopy(run.model.state_dict())
    config = {n: (m.w_bit, m.a_bit) for n, m in mixed_layers(run.model)}
    GreedySearch(run.model, run.costs, score_batches(run, 64)).run(budget_levels(run, [4])[0])
    assert {n: (m.w_bit, m.a_bit) for n, m in mixed_layers(run.model)} == config
    for k, v in run.model.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k]), k


def test_bad_search_arguments():
    with pytest.raises(ValueError, match="metric must be"):
        GreedySearch(nn.Linear(1, 1), None, iter(()), metric="latency")


def test_recalibration_is_the_average_of_batch_statistics():
    torch.manual_seed(0)
    bn = SwitchableBatchNorm2d(nn.BatchNorm2d(3), 2, 2)
    plain = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, plain)
    batches = [(torch.randn(8, 3, 4, 4) * (i + 1) + i, None) for i in range(3)]
    bn.select(1, 0)
    with torch.no_grad():
        bn.running_mean.fill_(7.0)
    assert recalibrate_bn(model, batches) == 3
    means = torch.stack([x.mean((0, 2, 3)) for x, _ in batches])
    torch.testing.assert_close(bn.running_mean[1, 0], means.mean(0))
    assert (bn.running_mean[0] == 0).all() and (bn.running_mean[1, 1] == 0).all()  # all reset
    unbiased = torch.stack([x.var((0, 2, 3), unbiased=True) for x, _ in batches])
    torch.testing.assert_close(bn.running_var[1, 0], unbiased.mean(0))
    normalized = [F.batch_norm(x, None, None, bn.weight[1, 0].detach(), bn.bias[1, 0].detach(),
                               True) for x, _ in batches]
    torch.testing.assert_close(plain.running_mean,
                               torch.stack([z.mean((0, 2, 3)) for z in normalized]).mean(0))


def test_recalibration_changes_uniform_accuracy_only_through_bn(run):
    model = copy.deepcopy(run.model)
    set_bits(model, 3)
    x, y = next(score_batches(run, 128))
    weights = [m.weight.detach().clone() for _, m in mixed_layers(model)]
    recalibrate_bn(model, [(x, y)])
    assert all(torch.equal(w, m.weight) for w, (_, m) in zip(weights, mixed_layers(model)))


def test_on_move_reports_every_applied_move(run):
    target = budget_levels(run, [3])[0]
    seen = []
    result = GreedySearch(run.model, run.costs, score_batches(run, 128),
                          on_move=seen.append).run(target)
    assert [s["moves"] for s in seen] == list(range(1, result.iterations + 1))
    assert [s["cost"] for s in seen] == [h["cost"] for h in result.history]
    assert [s["error"] for s in seen] == [h["error"] for h in result.history]
    assert all(s["target"] == target for s in seen)
    assert seen[-1]["evaluations"] == result.evaluations


def test_search_budgets_shows_a_bar_per_search(run, capsys):
    from rfq.cli.pipeline import search_budgets

    targets = budget_levels(run, [3, 4])
    search_budgets(run, targets, batch_size=128, calib_images=0, progress=None, bars=True,
                   eval_limit=64)
    err = capsys.readouterr().err
    assert "search 1/2 <" in err and "search 2/2 <" in err
    assert "cost " in err and "error " in err and "move" in err
