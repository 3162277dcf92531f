"""The greedy search's decisions on constructed cases where the right move is known.

The error of a configuration comes from a scripted oracle (``ScriptedSearch``), so each rule of
spec method_rfq.md §5 is checked on its own: the argmin of 1.5 e/e_max + c/c_max - 1, the choice
of b*, the weight phase's threshold 0.95 cost(W=b*, A=5), cycle avoidance, both budget metrics.
The stage-cached scoring is checked against full forwards on ResNet-20 and MobileNetV2."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from rfq.cost import CostModel
from rfq.methods.rfq import initialize_activation_steps
from rfq.methods.rfq.search import GreedySearch
from rfq.models import build_model
from rfq.nn import mixed_layers, quantize_

from method_utils import level_cost, scripted_batches

class ScriptedSearch(GreedySearch):
    """GreedySearch whose error of a config is ``oracle(config)``; records every scoring."""

    def __init__(self, *args, oracle, **kw):
        super().__init__(*args, **kw)
        self.oracle, self.scored = oracle, []

    def _errors(self, config, moves, x, y):
        errors = [self.oracle(self._apply(config, m)) for m in moves]
        self.scored.append((dict(config), list(moves), errors))
        self.evaluations += len(moves)
        return errors


def uniform_cost(costs, model, w, a=None, metric="bitops"):
    cfg = {n: (costs.uniform(model, w)[n][0], costs.uniform(model, a or w)[n][1])
           for n, _ in mixed_layers(model)}
    return costs.cost(cfg, metric)


def replay(start, history):
    """The configs a search visited, from its start and its applied moves."""
    configs, cfg = [dict(start)], dict(start)
    for h in history:
        name, slot, bit = h["move"]
        pair = list(cfg[name])
        pair[slot] = bit
        cfg[name] = tuple(pair)
        configs.append(dict(cfg))
    return configs


def test_each_move_is_the_argmin_of_the_objective(resnet20):
    model, costs = resnet20
    # errors that differ per layer and bit, so the objective trades error against cost
    names = [n for n, _ in mixed_layers(model)]
    weight = {n: 0.01 * (1 + i % 5) for i, n in enumerate(names)}

    def oracle(cfg):
        return 0.05 + sum(weight[n] * (6 - w) ** 2 + 0.002 * (6 - a) for n, (w, a) in cfg.items())

    target = uniform_cost(costs, model, 3) * 1.1
    search = ScriptedSearch(model, costs, scripted_batches(), oracle=oracle)
    result = search.run(target)
    assert len(search.scored) == result.iterations > 5
    for (config, moves, errors), applied in zip(search.scored, result.history):
        c = [costs.cost(search._apply(config, m), "bitops") for m in moves]
        scores = [1.5 * (e / max(errors)) + ci / max(c) - 1 for e, ci in zip(errors, c)]
        assert list(applied["move"]) == list(moves[scores.index(min(scores))])


def test_a_sensitive_layer_keeps_its_bits_and_a_free_one_goes_low(resnet20):
    """Layer S destroys accuracy below 5 weight bits, layer F costs nothing at any bit: the
    search lowers F to the floor and never moves S down."""
    model, costs = resnet20
    names = [n for n, _ in mixed_layers(model)]
    sensitive, free = names[3], names[10]

    def oracle(cfg):
        e = 0.9 if cfg[sensitive][0] < 5 else 0.1
        # every other layer costs a little per bit removed, F nothing
        return e + sum(0.001 * (5 - w) for n, (w, _) in cfg.items() if n not in (sensitive, free))

    result = ScriptedSearch(model, costs, scripted_batches(), oracle=oracle).run(
        uniform_cost(costs, model, 4))
    assert result.reached
    assert result.config[sensitive][0] >= 5
    assert result.config[free][0] == 2
    assert not any(h["move"][0] == sensitive and h["move"][1] == 0 and h["move"][2] < 5
                   for h in result.history)


@pytest.mark.parametrize("level", [2.6, 3.4, 4.4])
def test_b_star_and_the_weight_phase_threshold(resnet20, level):
    """The weight phase stops at the first config with cost <= 0.95 cost(W=b*, A=5), b* the
    uniform level nearest the target; then the activation phase runs to the target."""
    model, costs = resnet20
    lo, hi = uniform_cost(costs, model, int(level)), uniform_cost(costs, model, int(level) + 1)
    target = lo + (hi - lo) * (level - int(level))
    levels = [2, 3, 4, 5, 6]
    b_star = min(levels, key=lambda b: abs(uniform_cost(costs, model, b) - target))
    assert b_star == round(level)  # nearest by cost here is nearest by level
    threshold = 0.95 * uniform_cost(costs, model, b_star, 5)
    result = ScriptedSearch(model, costs, scripted_batches(),
                            oracle=lambda cfg: 0.5 - 0.01 * sum(w for w, _ in cfg.values())
                            ).run(target)
    phases = [h["phase"] for h in result.history]
    n_w = phases.count("w")
    assert phases == ["w"] * n_w + ["a"] * (len(phases) - n_w)
    w_costs = [h["cost"] for h in result.history[:n_w]]
    assert w_costs[-1] <= threshold and all(c > threshold for c in w_costs[:-1])
    assert result.reached and result.bitops < target


def test_no_configuration_is_visited_twice_in_a_phase(resnet20):
    """An oracle that rewards raising bits again: '+' moves into visited configs are dropped,
    so the search cannot cycle, and it still ends."""
    model, costs = resnet20
    names = [n for n, _ in mixed_layers(model)]

    def oracle(cfg):  # raising layer 0 or 1 looks great, lowering them looks bad
        return 0.5 - 0.1 * (cfg[names[0]][0] + cfg[names[1]][0]) / 12

    start = costs.uniform(model, 5)
    result = ScriptedSearch(model, costs, scripted_batches(), oracle=oracle).run(
        uniform_cost(costs, model, 3))
    visited = replay(start, result.history)
    for phase in ("w", "a"):
        idx = [i + 1 for i, h in enumerate(result.history) if h["phase"] == phase]
        keys = [tuple(sorted(visited[i].items())) for i in idx]
        assert len(keys) == len(set(keys))
    assert result.reached


def test_size_budget_moves_weights_only(resnet20):
    model, costs = resnet20
    target = uniform_cost(costs, model, 3, metric="size") * 1.05
    result = ScriptedSearch(model, costs, scripted_batches(), metric="size",
                            oracle=lambda cfg: 0.3).run(target)
    assert result.reached and costs.size_bits(result.config) <= target
    assert {h["phase"] for h in result.history} == {"w"}
    assert all(a == 5 for _, a in result.config.values())


@pytest.mark.parametrize("name,channels,size", [("resnet20", 1, 12), ("mobilenetv2", 3, 16)])
def test_stage_caching_chooses_as_full_forwards_do(name, channels, size):
    """Scoring a move by re-running only the stages after it (cached weights and stage inputs)
    gives the same errors, hence the same config, as a full forward per move. Small images keep
    the many full forwards of the straightforward search cheap."""
    torch.manual_seed(0)
    model = quantize_(build_model(name, channels, 10))
    x = torch.randn(8, channels, size, size)
    y = torch.randint(0, 10, (8,))
    initialize_activation_steps(model, x)
    model.eval()
    costs = CostModel(model, (channels, size, size))
    # a budget a few moves below uniform 5
    target = 0.97 * uniform_cost(costs, model, 5)
    fast = GreedySearch(copy.deepcopy(model), costs, itertools.repeat((x, y)), fast=True)
    naive = GreedySearch(copy.deepcopy(model), costs, itertools.repeat((x, y)), fast=False)
    assert fast.stages is not None  # the stage-cached path is the one under test
    a, b = fast.run(target), naive.run(target)
    assert a.config == b.config
    assert [h["error"] for h in a.history] == [h["error"] for h in b.history]
    assert a.iterations >= 2


@pytest.mark.parametrize("level", [2.25, 2.5])
def test_weight_phase_ends_at_the_floor_when_its_threshold_is_unreachable(resnet20, level):
    """b* = 2 at these levels, so 0.95 cost(W=2, A=5) lies below every weight-only config: the
    weight phase ends as soon as every weight is at the floor (the spec's loop would wander
    through "+" moves until its cap), and the activation phase reaches the budget."""
    model, costs = resnet20
    target = level_cost(costs, model, level)

    def oracle(cfg):  # lower bits cost a little error: the search goes down, then is stuck
        return 0.5 - 0.01 * sum(w + 0.5 * a for w, a in cfg.values())

    start = costs.uniform(model, 5)
    result = ScriptedSearch(model, costs, scripted_batches(), oracle=oracle).run(target)
    assert result.reached
    configs = replay(start, result.history)
    phases = [h["phase"] for h in result.history]
    w_moves = phases.count("w")
    assert all(w == 2 for w, _ in configs[w_moves].values())  # the phase's last config
    assert not any(all(w == 2 for w, _ in c.values()) for c in configs[:w_moves])
    assert phases == ["w"] * w_moves + ["a"] * (len(phases) - w_moves)
