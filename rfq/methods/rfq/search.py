"""Stage 2: bidirectional greedy search under a BitOps or size budget, BN recalibration and the
final evaluation (spec method_rfq.md §5, with the fixes of §6: quirks 3, 4, 10).

Search, from uniform W=A=5:
1. weight phase: move weight bits only until cost <= 0.95 cost(W=b*, A=5), b* the uniform level
   whose cost is nearest the target;
2. activation phase: move input bits only until cost < target (BitOps; a size budget has no
   activation phase, since input bits cost no storage).
Every iteration scores each feasible one-step move (one layer one candidate down or up) on one
fresh held-out batch, BN on batch statistics, and applies the argmin of
S = 1.5 e/e_max + c/c_max - 1 (e: top-1 error, c: cost; maxima over the feasible moves).

Evaluating a move only recomputes what it changes: every layer's K quantized weights are made
once (``coupled_quant_multi``), and the inputs of the model's stages under the current config
are cached per iteration, so a move in stage s runs only stages s.. (``fast=False`` is the
straightforward version: a full forward per move, weights re-quantized every time; both choose
the identical configuration). Both score with every conv whose input is quantized after a ReLU
computed on integer codes where that is fast (``rfq.ops.integer_conv2d``: exact int32 sums,
on x86 CPUs with VNNI; ``integer_convs = False`` keeps the float convs).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rfq.cost import CostModel
from rfq.nn import BitConfig, mixed_layers, set_bits
from rfq.nn.modes import (bn_batch_statistics, bn_recalibration, cached_weights, integer_convs,
                          train_mode_without_dropout)


@dataclass
class SearchResult:
    metric: str
    target: float
    config: dict  # {layer: [w, a]}
    bitops: float
    size_mib: float
    search_error: float  # error on the last search batch
    iterations: int
    evaluations: int
    seconds: float
    accuracy: float | None = None  # after BN recalibration, on the evaluation split
    reached: bool = True  # False: no feasible move could bring the cost under the target
    history: list = field(default_factory=list)
    strategy: str = "greedy"
    seed: int | None = None  # of the held-out batches the search scored on
    convs: str = "float"  # the scoring's conv arithmetic: "integer" or "float"

    def to_dict(self) -> dict:
        return asdict(self)


class ScoreBatches:
    """Fresh un-augmented held-out batches, cycling through a seeded order of the split."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0,
                 transform: Callable | None = None):
        if batch_size < 1:
            raise ValueError(f"search batch size must be >= 1, got {batch_size}")
        self.images, self.labels, self.batch_size = images, labels, min(batch_size, len(labels))
        self.transform = transform
        self.order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        self.pos = 0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self.pos + self.batch_size > len(self.order):
            self.pos = 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        x = self.images[idx]
        return (self.transform(x) if self.transform else x), self.labels[idx]


def _stage_index(model: nn.Module) -> tuple[list[nn.Module] | None, dict[str, int]]:
    stages = model.stages() if hasattr(model, "stages") else None
    where = {}
    if stages:
        owner = {}
        for s, stage in enumerate(stages):
            for m in stage.modules():
                owner[id(m)] = s
        for name, layer in mixed_layers(model):
            if id(layer) not in owner:
                return None, {}
            where[name] = owner[id(layer)]
    return stages, where


class ConfigSearch:
    """What every search strategy shares: a private copy of the model, the feasible one-step
    moves, the floor, and the scoring of configurations on held-out batches (train mode with
    batch-statistics BN, dropout off, stage-cached when ``fast``)."""

    # scoring computes the convs after a ReLU from integer codes where that is fast
    # (rfq.nn.modes.integer_convs), in both the cached and the straightforward search, so both
    # run the same arithmetic; False keeps the float convs (the bench's breakdown)
    integer_convs = True

    def __init__(self, model: nn.Module, costs: CostModel, batches: Iterator,
                 metric: str = "bitops", min_bits: int | None = None, legacy_floor: bool = False,
                 fast: bool = True, on_move: Callable[[dict], None] | None = None):
        if metric not in ("bitops", "size"):
            raise ValueError(f"search metric must be 'bitops' or 'size', got {metric!r}")
        self.model = copy.deepcopy(model)  # BN modes and caches never touch the caller's model
        self.costs, self.batches, self.metric = costs, batches, metric
        self.layers = mixed_layers(self.model)
        self._by_name = dict(self.layers)
        smallest = min(min(m.w_bits) for _, m in self.layers)
        if min_bits is not None and not smallest <= min_bits <= 8:
            raise ValueError(f"min_bits must be between the smallest candidate ({smallest}) "
                             f"and 8, got {min_bits}")
        self.min_bits, self.legacy_floor = min_bits, legacy_floor
        self.fast = fast
        self.stages, self.stage_of = _stage_index(self.model) if fast else (None, {})
        self.evaluations = 0
        self.convs = "float"  # what _scoring ran: "integer" where integer_convs took layers
        self.on_move = on_move  # called after every applied move (progress bars)

    def cost(self, config: BitConfig) -> float:
        return self.costs.cost(config, self.metric)

    def within(self, cost: float, target: float) -> bool:
        """A BitOps budget is a strict upper bound (spec §5), a size budget an inclusive one."""
        return cost < target if self.metric == "bitops" else cost <= target

    # -- moves --
    def floor(self, target: float) -> int:
        if self.legacy_floor:  # RFQuant: never below 3 bits for ImageNet-size budgets (quirk 3)
            return 3 if (self.metric == "bitops" and target >= 5e9) else 2
        return self.min_bits if self.min_bits is not None else \
            min(min(m.w_bits) for _, m in self.layers)

    def moves(self, config: BitConfig, phase: str, floor: int) -> list[tuple[str, int, int]]:
        """(layer, slot 0=w/1=a, new bit) for each feasible one-candidate step down or up."""
        out = []
        slot = 0 if phase == "w" else 1
        for name, layer in self.layers:
            cands = sorted(layer.w_bits if slot == 0 else layer.a_bits)
            if not cands:
                continue
            cur = config[name][slot]
            i = cands.index(cur)
            if i > 0 and cur > max(floor, cands[0]):
                out.append((name, slot, cands[i - 1]))
            if i + 1 < len(cands):
                out.append((name, slot, cands[i + 1]))
        return out

    def _lowest(self, config: BitConfig, slot: int, floor: int) -> BitConfig:
        """``config`` with every layer's bit of ``slot`` as low as "-" moves can take it."""
        out = dict(config)
        for name, layer in self.layers:
            cands = sorted(layer.w_bits if slot == 0 else layer.a_bits)
            if not cands:
                continue
            low = next((b for b in cands if b >= max(floor, cands[0])), None)
            if low is not None and low < config[name][slot]:
                pair = list(config[name])
                pair[slot] = low
                out[name] = tuple(pair)
        return out

    @staticmethod
    def _key(config: BitConfig) -> tuple:
        return tuple(sorted(config.items()))

    @staticmethod
    def _raises(config: BitConfig, move) -> bool:
        name, slot, bit = move
        return bit > config[name][slot]

    @staticmethod
    def _apply(config: BitConfig, move) -> BitConfig:
        name, slot, bit = move
        new = dict(config)
        pair = list(new[name])
        pair[slot] = bit
        new[name] = tuple(pair)
        return new

    # -- scoring --
    @contextlib.contextmanager
    def _scoring(self):
        """Train mode with batch-statistics BN and dropout off, the convs after a ReLU on
        integer codes; when fast, every quantized weight made once."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(train_mode_without_dropout(self.model))
            stack.enter_context(bn_batch_statistics(self.model))
            if self.fast:
                stack.enter_context(cached_weights(self.model))
            if self.integer_convs:
                stack.enter_context(integer_convs(self.model, cache_weights=self.fast))
            self.convs = "integer" if any(m.integer_input_scales is not None
                                          for _, m in self.layers) else "float"
            yield

    def _errors(self, config: BitConfig, moves, x, y) -> list[float]:
        """Top-1 error of every move's config on (x, y)."""
        return self._measure(config, moves, x, y)[0]

    def _measure(self, config: BitConfig, moves, x, y) -> tuple[list[float], list[float]]:
        """(top-1 error, mean cross-entropy) of every move's config on (x, y); a move of None
        is ``config`` itself. One host read for all of them."""
        out = []
        with torch.no_grad():
            if self.stages:
                set_bits(self.model, config)
                inputs, h = [], x
                for stage in self.stages:
                    inputs.append(h)
                    h = stage(h)
                base = h
            for move in moves:
                if move is None:
                    if self.stages:
                        h = base
                    else:
                        set_bits(self.model, config)
                        h = self.model(x)
                elif self.stages:
                    name, slot, bit = move
                    layer = self._by_name[name]
                    old = (layer.w_bit, layer.a_bit)
                    layer.set_bits(*((bit, None) if slot == 0 else (None, bit)))
                    s = self.stage_of[name]
                    h = inputs[s]
                    for stage in self.stages[s:]:
                        h = stage(h)
                    layer.set_bits(*old)
                else:
                    set_bits(self.model, self._apply(config, move))
                    h = self.model(x)
                out.append(torch.stack([(h.argmax(1) != y).sum().float(),
                                        F.cross_entropy(h.float(), y, reduction="sum")]))
                self.evaluations += 1
        sums = torch.stack(out).tolist()
        return [w / len(y) for w, _ in sums], [ce / len(y) for _, ce in sums]



class GreedySearch(ConfigSearch):
    """RFQ's bidirectional greedy search (module docstring), from uniform ``start_bits``."""

    def __init__(self, model: nn.Module, costs: CostModel, batches: Iterator,
                 metric: str = "bitops", min_bits: int | None = None, legacy_floor: bool = False,
                 fast: bool = True, start_bits: int = 5,
                 on_move: Callable[[dict], None] | None = None):
        super().__init__(model, costs, batches, metric, min_bits, legacy_floor, fast, on_move)
        self.start_bits = start_bits

    def run(self, target: float) -> SearchResult:
        if not target > 0:
            raise ValueError(f"search target must be positive, got {target}")
        t0 = time.perf_counter()
        with self._scoring():
            return self._search(target, t0)

    def _search(self, target: float, t0: float) -> SearchResult:
        cost = lambda c: self.costs.cost(c, self.metric)  # noqa: E731
        config = self.costs.uniform(self.model, self.start_bits)
        levels = sorted({b for _, m in self.layers for b in m.w_bits})
        b_star = min(levels, key=lambda b: abs(cost(self.costs.uniform(self.model, b)) - target))
        w_star = {n: (self.costs.uniform(self.model, b_star)[n][0], config[n][1])
                  for n in config}
        floor = self.floor(target)
        phases = [("w", 0.95 * cost(w_star), lambda c, thr: cost(c) <= thr)]
        if self.metric == "bitops":
            phases.append(("a", target, lambda c, thr: cost(c) < thr))
        else:  # size: only weight bits cost storage
            phases[0] = ("w", target, lambda c, thr: cost(c) <= thr)
        history, iterations, error = [], 0, float("nan")
        for phase, threshold, done in phases:
            # Where the threshold lies below every config this phase can reach (b* at the floor:
            # 0.95 cost(W=2, A=5) with weights already all at 2, e.g. levels 2.25 and 2.5 of
            # {6..2}), the spec's loop never meets it and wanders through "+" moves until the
            # cap. The phase ends instead once its bits are all at the floor (ours; §6-style fix).
            floor_cost = cost(self._lowest(config, 0 if phase == "w" else 1, floor))
            # A "+" move into a configuration already visited in this phase could make the
            # search cycle; such moves are dropped. "-" moves are always allowed, and every "+"
            # enters a new configuration, so each phase ends. The cap is a safety net only.
            visited = {self._key(config)}
            cap = 10 * sum(len(m.w_bits) + len(m.a_bits) for _, m in self.layers)
            steps = 0
            while not done(config, threshold) and cost(config) > floor_cost and steps < cap:
                moves = [m for m in self.moves(config, phase, floor)
                         if not self._raises(config, m)
                         or self._key(self._apply(config, m)) not in visited]
                if not moves:
                    break
                x, y = next(self.batches)
                errors = self._errors(config, moves, x, y)
                costs = [cost(self._apply(config, m)) for m in moves]
                e_max, c_max = max(errors), max(costs)
                scores = [1.5 * (e / e_max if e_max > 0 else 0.0) + c / c_max - 1
                          for e, c in zip(errors, costs)]
                best = min(range(len(moves)), key=lambda i: scores[i])
                config = self._apply(config, moves[best])
                visited.add(self._key(config))
                error = errors[best]
                history.append({"phase": phase, "move": list(moves[best]), "error": error,
                                "cost": costs[best]})
                iterations += 1
                steps += 1
                if self.on_move:
                    self.on_move({"phase": phase, "moves": iterations, "cost": costs[best],
                                  "target": target, "error": error,
                                  "evaluations": self.evaluations})
        reached = self.within(cost(config), target)
        return SearchResult(
            metric=self.metric, target=target, config={n: list(v) for n, v in config.items()},
            bitops=self.costs.bitops(config), size_mib=self.costs.size_mib(config),
            search_error=error, iterations=iterations, evaluations=self.evaluations,
            seconds=time.perf_counter() - t0, reached=reached, history=history,
            convs=self.convs)


def random_config(model: nn.Module, costs: CostModel, target: float, metric: str = "bitops",
                  seed: int = 0, floor: int | None = None, size_act_bits: int = 5) -> BitConfig:
    """A random mixed config that fits the budget tightly (the baseline a search must beat):
    each layer's bits drawn uniformly, then random one-step cuts until it fits, then random
    one-step raises while it still fits. A size budget holds input bits at ``size_act_bits``
    (free: they cost no storage), as the searches do."""
    rng = random.Random(seed)
    layers = mixed_layers(model)
    floor = floor if floor is not None else min(min(m.w_bits) for _, m in layers)
    within = (lambda c: c < target) if metric == "bitops" else (lambda c: c <= target)
    sets = {}
    for name, m in layers:
        a_set = sorted(m.a_bits) if m.a_bits else [None]
        if metric == "size" and m.a_bits:
            a_set = [min(m.a_bits, key=lambda b: (abs(b - size_act_bits), -b))]
        sets[name] = (sorted(b for b in m.w_bits if b >= floor) or [min(m.w_bits)],
                      [b for b in a_set if b is None or b >= floor] or a_set[:1])
    config = {n: [rng.choice(w), rng.choice(a)] for n, (w, a) in sets.items()}

    def steps(direction):
        out = []
        for n, pair in config.items():
            for slot in (0, 1):
                cands = sets[n][slot]
                i = cands.index(pair[slot]) + direction
                if 0 <= i < len(cands):
                    out.append((n, slot, cands[i]))
        return out

    def cost():
        return costs.cost({n: tuple(v) for n, v in config.items()}, metric)

    while not within(cost()):
        down = steps(-1)
        if not down:
            break  # even the lowest config does not fit
        n, slot, b = rng.choice(down)
        config[n][slot] = b
    while True:
        up = steps(+1)
        rng.shuffle(up)
        for n, slot, b in up:
            old = config[n][slot]
            config[n][slot] = b
            if within(cost()):
                break
            config[n][slot] = old
        else:
            break
    return {n: tuple(v) for n, v in config.items()}


# ---- BN recalibration and evaluation -------------------------------------------------------------


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches) -> int:
    """Reset every BN's statistics, then set them to the plain average over ``batches``
    (train-mode forwards of the current config, dropout off). Returns the number of batches."""
    n = 0
    with train_mode_without_dropout(model), bn_recalibration(model):
        for x, _ in batches:
            model(x)
            n += 1
    return n


def calibration_count(images: int, batch_size: int, world: int = 1) -> int:
    """RFQuant: floor(images / (world * batch)) + 1 batches."""
    return math.floor(images / (world * batch_size)) + 1
