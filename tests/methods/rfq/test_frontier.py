"""The frontier search and the random-config baseline on constructed cases where the right
answer is known: the exact knapsack against brute force, scripted damages, refinement that only
accepts what a fresh check confirms, and the measured damages against direct evaluation."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rfq.cost import CostModel
from rfq.methods.rfq.frontier import FrontierSearch, ParetoFront
from rfq.methods.rfq.search import random_config
from rfq.models import build_model
from rfq.nn import mixed_layers, quantize_

from method_utils import level_cost, scripted_batches

@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 1000)), min_size=1,
                         max_size=4), min_size=1, max_size=4),
       st.integers(0, 170), st.booleans())
def test_pareto_front_is_the_exact_knapsack(items, budget, strict):
    """Every budget's front point is the least total damage of any one-option-per-layer pick
    within the budget (brute force), and its choices add up to its cost and damage."""
    opts = [[(float(c), d / 1000, (layer, k)) for k, (c, d) in enumerate(layer_items)]
            for layer, layer_items in enumerate(items)]
    front = ParetoFront(opts)
    best = None
    for pick in itertools.product(*opts):
        cost, damage = sum(o[0] for o in pick), sum(o[1] for o in pick)
        if (cost < budget) if strict else (cost <= budget):
            best = damage if best is None else min(best, damage)
    i = front.best_within(budget, strict)
    if best is None:
        assert i is None
        return
    assert front.damage[i] == pytest.approx(best, abs=1e-9)
    chosen = front.choices(i)
    assert sum(opts[layer][k][0] for layer, k in chosen) == front.costs[i]
    assert sum(opts[layer][k][1] for layer, k in chosen) == pytest.approx(front.damage[i])
    # a front: costs rise, damages fall
    assert all(a < b for a, b in zip(front.costs, front.costs[1:]))
    assert all(a > b for a, b in zip(front.damage, front.damage[1:]))


class ScriptedFrontier(FrontierSearch):
    """FrontierSearch whose loss of a config is ``oracle(config)`` (+ ``check_bias`` on the
    refinement's confirmation batches, marked by their label)."""

    def __init__(self, *args, oracle, **kw):
        super().__init__(*args, **kw)
        self.oracle = oracle

    def _measure(self, config, moves, x, y):
        losses = [self.oracle(config if m is None else self._apply(config, m), int(y[0]))
                  for m in moves]
        self.evaluations += len(moves)
        return [float("nan")] * len(moves), losses


def test_a_sensitive_layer_keeps_its_bits_and_a_free_one_goes_to_the_floor(resnet20):
    model, costs = resnet20
    names = [n for n, _ in mixed_layers(model)]
    sensitive, free = names[3], names[10]

    def oracle(cfg, _):
        e = 5.0 if cfg[sensitive][0] < 5 else 0.0
        return e + sum(0.01 * (6 - w) + 0.005 * (6 - a) for n, (w, a) in cfg.items()
                       if n not in (sensitive, free))

    search = ScriptedFrontier(model, costs, scripted_batches(), oracle=oracle)
    result = search.run(level_cost(costs, model, 3))
    assert result.reached and result.strategy == "frontier"
    assert result.config[sensitive][0] >= 5
    assert result.config[free] == [2, 2]


def test_additive_damage_gives_the_optimum_for_every_budget(resnet20):
    """With damages that add up exactly, the solved config of each budget has the least total
    damage of all configs within it: no single swap (one layer down, another up) that stays
    within the budget lowers the loss."""
    model, costs = resnet20
    names = [n for n, _ in mixed_layers(model)]
    weight = {n: 0.001 * (1 + (7 * i) % 11) for i, n in enumerate(names)}

    def oracle(cfg, _):
        return sum(weight[n] * ((6 - w) ** 2 + 0.5 * (6 - a) ** 1.5) for n, (w, a) in cfg.items())

    levels = [2.25, 2.5, 2.75, 3, 3.5, 4, 4.5, 5]
    targets = [level_cost(costs, model, lv) for lv in levels]
    search = ScriptedFrontier(model, costs, scripted_batches(), oracle=oracle, refine_rounds=0)
    results = search.run_all(targets)
    assert search.evaluations == search.measure_evaluations  # one measurement for all
    losses = []
    for target, r in zip(targets, results):
        cfg = {n: tuple(v) for n, v in r.config.items()}
        assert r.reached and costs.bitops(cfg) < target
        loss = oracle(cfg, 0)
        losses.append(loss)
        moves = search.moves(cfg, "w", 2) + search.moves(cfg, "a", 2)
        for m1, m2 in itertools.product(moves, moves):
            swapped = search._apply(search._apply(cfg, m1), m2) if m1[:2] != m2[:2] else None
            if swapped and costs.bitops(swapped) < target:
                assert oracle(swapped, 0) >= loss - 1e-9
    assert losses == sorted(losses, reverse=True)  # more budget, never more damage


def test_refinement_keeps_a_move_only_when_fresh_batches_confirm_it(resnet20):
    """A pairwise interaction the measurement at the top cannot see (layers P and Q both low is
    much worse than the sum): the solved config has both low, a refinement round finds the
    combination that lifts one, and the confirmation accepts it; with the confirmation batches
    scripted to disagree, nothing is accepted."""
    model, costs = resnet20
    names = [n for n, _ in mixed_layers(model)]
    p, q = names[5], names[6]

    def base(cfg):
        # P and Q cost little alone, so the additive model sends both to the floor
        loss = sum((0.0001 if n in (p, q) else 0.01) * (6 - w) + 0.01 * (6 - a)
                   for n, (w, a) in cfg.items())
        if cfg[p][0] == 2 and cfg[q][0] == 2:
            loss += 1.0
        return loss

    target = level_cost(costs, model, 3)
    plain = ScriptedFrontier(model, costs, scripted_batches(), oracle=lambda c, _: base(c),
                             refine_rounds=0).run(target)
    assert plain.config[p][0] == plain.config[q][0] == 2  # the additive model's trap
    fixed = ScriptedFrontier(model, costs, scripted_batches(), oracle=lambda c, _: base(c),
                             refine_rounds=2).run(target)
    assert fixed.reached and costs.bitops({n: tuple(v) for n, v in fixed.config.items()}) \
        < target
    assert not fixed.config[p][0] == fixed.config[q][0] == 2
    assert any(h.get("accepted") for h in fixed.history)

    # the confirmation batches (label 1: after 2 measuring and 2 refining batches) disagree:
    # there every config but the solved one is worse, so the measured improvement is not taken
    solved = {n: tuple(v) for n, v in plain.config.items()}
    labels = itertools.chain([0, 0, 0, 0], itertools.repeat(1))
    stream = ((torch.zeros(1), torch.full((1,), next(labels))) for _ in itertools.count())
    rejected = ScriptedFrontier(model, costs, stream, oracle=lambda c, y: base(c) + 5.0 * y *
                                (c != solved), measure_batches=2, refine_rounds=2).run(target)
    assert rejected.config == plain.config
    assert [h.get("accepted") for h in rejected.history[1:]] == [False]


@pytest.mark.parametrize("metric", ["bitops", "size"])
def test_floor_budget_and_size_rules(resnet20, metric):
    model, costs = resnet20
    target = level_cost(costs, model, 3.4, metric)
    oracle = lambda cfg, _: sum((6 - w) ** 2 + (6 - a) for w, a in cfg.values())  # noqa: E731
    r = ScriptedFrontier(model, costs, scripted_batches(), metric, min_bits=3, oracle=oracle).run(target)
    cfg = {n: tuple(v) for n, v in r.config.items()}
    assert all(w >= 3 and a >= 3 for w, a in cfg.values())
    assert costs.cost(cfg, metric) <= target
    if metric == "size":  # inputs cost no storage: held at 5 like the greedy search's
        assert {a for _, a in cfg.values()} == {5}


def test_unreachable_budget_returns_the_cheapest_config_unreached(resnet20):
    model, costs = resnet20
    r = ScriptedFrontier(model, costs, scripted_batches(), oracle=lambda c, _: 0.0).run(1.0)
    assert not r.reached
    assert all(w == 2 and a == 2 for w, a in r.config.values())


def test_measured_damages_equal_direct_evaluation():
    """The stage-cached probes give the same damages as full forwards of each probed config."""
    torch.manual_seed(0)
    model = quantize_(build_model("resnet20", 1, 10))
    from rfq.methods.rfq import initialize_activation_steps

    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    initialize_activation_steps(model, x)
    costs = CostModel(model, (1, 28, 28))
    fast = FrontierSearch(copy.deepcopy(model), costs, itertools.repeat((x, y)), fast=True,
                          measure_batches=1, refine_rounds=0)
    naive = FrontierSearch(copy.deepcopy(model), costs, itertools.repeat((x, y)), fast=False,
                           measure_batches=1, refine_rounds=0)
    target = level_cost(costs, model, 3)
    a, b = fast.run(target), naive.run(target)
    for n in fast.sensitivity:
        for slot in (0, 1):
            for bit, d in fast.sensitivity[n][slot].items():
                assert d == pytest.approx(naive.sensitivity[n][slot][bit], abs=1e-4)
    assert a.config == b.config


def test_bad_frontier_arguments(resnet20):
    model, costs = resnet20
    with pytest.raises(ValueError, match="measure_batches"):
        FrontierSearch(model, costs, scripted_batches(), measure_batches=0)
    with pytest.raises(ValueError, match="target"):
        FrontierSearch(model, costs, scripted_batches()).run_all([0.0])


@pytest.mark.parametrize("metric", ["bitops", "size"])
def test_random_configs_fit_the_budget_tightly(resnet20, metric):
    model, costs = resnet20
    target = level_cost(costs, model, 2.5, metric)
    seen = set()
    for seed in range(5):
        cfg = random_config(model, costs, target, metric, seed=seed, floor=2)
        assert cfg == random_config(model, costs, target, metric, seed=seed, floor=2)
        cost = costs.cost(cfg, metric)
        assert cost < target if metric == "bitops" else cost <= target
        # tight: no single one-step raise still fits
        for n, m in mixed_layers(model):
            for slot, cands in ((0, m.w_bits), (1, m.a_bits if metric == "bitops" else ())):
                higher = [b for b in cands if b > cfg[n][slot]]
                if higher:
                    pair = list(cfg[n])
                    pair[slot] = min(higher)
                    raised = costs.cost({**cfg, n: tuple(pair)}, metric)
                    assert not (raised < target if metric == "bitops" else raised <= target)
        if metric == "size":
            assert {a for _, a in cfg.values()} == {5}
        seen.add(tuple(sorted(cfg.items())))
    assert len(seen) == 5
