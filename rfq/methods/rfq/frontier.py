"""The frontier search: every budget's configuration from one measurement of the coupled model.

The coupled model runs any layer at any bit without retraining, so a layer's sensitivity can be
measured instead of guessed from a proxy (HAWQ-V3 and LIMPQ solve the same budgeted choice with
Hessian or learned proxies):

1. **measure**: from the highest config, lower one layer's weight (or input) bit to each
   candidate in turn and record the rise of the held-out cross-entropy, on the same fixed
   held-out batches for every probe (paired, so batch noise cancels in the differences);
   L x (|W| + |A| - 2) probes, each stage-cached like the greedy search's moves. A lower bit is
   never credited with less damage than a higher one (running maximum downwards), since a
   lower bit that "helps" is noise;
2. **solve**: assume the damages add up over layers (and over a layer's weight and input) and
   solve the multiple-choice knapsack exactly for every budget at once: the Pareto front of
   (cost, predicted damage) over all layers, built layer by layer with dominated points
   dropped, so each budget is a lookup;
3. **refine**: damages do not quite add up at low bits, so around each budget's config every
   one-step move is measured again (fresh held-out batches), the local knapsack picks the
   best combination of those moves under the budget, and it is kept only if a third set of
   held-out batches confirms the lower loss; up to ``refine_rounds`` rounds.

Scores are the mean cross-entropy, not top-1 error: a continuous score separates configs that
one batch's error count cannot (1,024 images resolve 0.1 % of error).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import numpy as np
from torch import nn

from rfq.cost import CostModel
from rfq.methods.rfq.search import ConfigSearch, SearchResult
from rfq.nn import BitConfig

# A front larger than this is thinned to the best point per cost bucket (an approximation that
# never triggers on ResNet-20/18 or MobileNetV2 with 5 candidates; it bounds memory on huge nets).
MAX_FRONT = 50_000


class ParetoFront:
    """Exact multiple-choice knapsack over layers: every (cost, damage) point not dominated by
    a cheaper, less damaging one, with the per-layer choice that reaches it."""

    def __init__(self, items: list[list[tuple[float, float, object]]]):
        """``items[l]``: the (cost, damage, choice) options of layer l (pick exactly one)."""
        costs, damage = np.zeros(1), np.zeros(1)
        self._back = []  # per layer: (parent index, option index) of each surviving point
        self._options = []
        span = sum(max(c for c, _, _ in opts) for opts in items) or 1.0
        for opts in items:
            if not opts:
                raise ValueError("every layer needs at least one option")
            oc = np.array([c for c, _, _ in opts], dtype=np.float64)
            od = np.array([d for _, d, _ in opts], dtype=np.float64)
            c = (costs[:, None] + oc[None, :]).ravel()
            d = (damage[:, None] + od[None, :]).ravel()
            order = np.lexsort((d, c))  # by cost, ties by damage
            c, d = c[order], d[order]
            best_before = np.minimum.accumulate(np.concatenate(([np.inf], d[:-1])))
            keep = d < best_before
            if keep.sum() > MAX_FRONT:
                bucket = np.floor(c / span * MAX_FRONT)
                keep &= np.concatenate(([True], bucket[1:] != bucket[:-1]))
            idx = order[keep]
            self._back.append((idx // len(opts), idx % len(opts)))
            self._options.append([o for _, _, o in opts])
            costs, damage = c[keep], d[keep]
        self.costs, self.damage = costs, damage

    def __len__(self) -> int:
        return len(self.costs)

    def choices(self, index: int) -> list:
        """The option chosen for each layer at front point ``index``."""
        out = []
        for (parent, option), opts in zip(reversed(self._back), reversed(self._options)):
            out.append(opts[option[index]])
            index = parent[index]
        return out[::-1]

    def best_within(self, target: float, strict: bool) -> int | None:
        """Index of the least damaging point costing < target (strict) or <= target."""
        side = "left" if strict else "right"
        i = int(np.searchsorted(self.costs, target, side=side)) - 1
        return i if i >= 0 else None


class FrontierSearch(ConfigSearch):
    """Measure once, solve every budget, refine each (module docstring)."""

    def __init__(self, model: nn.Module, costs: CostModel, batches: Iterator,
                 metric: str = "bitops", min_bits: int | None = None, fast: bool = True,
                 measure_batches: int = 2, refine_rounds: int = 1, refine_batches: int = 2,
                 size_act_bits: int = 5, on_move: Callable[[dict], None] | None = None):
        super().__init__(model, costs, batches, metric, min_bits, False, fast, on_move)
        if measure_batches < 1 or refine_batches < 1 or refine_rounds < 0:
            raise ValueError(f"measure_batches and refine_batches must be >= 1 and "
                             f"refine_rounds >= 0, got {measure_batches}, {refine_batches}, "
                             f"{refine_rounds}")
        self.measure_batches, self.refine_batches = measure_batches, refine_batches
        self.refine_rounds = refine_rounds
        # a size budget leaves input bits free (they cost no storage): held where the greedy
        # search holds them, so the two compare on their weight choices
        self.size_act_bits = size_act_bits
        self.front: ParetoFront | None = None
        self.measure_seconds, self.measure_evaluations = 0.0, 0

    # -- measuring --
    def _take(self, n: int) -> list:
        return [next(self.batches) for _ in range(n)]

    def damages(self, config: BitConfig, moves: list, batches: list) -> list[float]:
        """Mean rise of the cross-entropy from ``config`` for each move, paired per batch."""
        total = [0.0] * len(moves)
        for x, y in batches:
            _, losses = self._measure(config, [None, *moves], x, y)
            for i, loss in enumerate(losses[1:]):
                total[i] += (loss - losses[0]) / len(batches)
        return total

    def loss(self, config: BitConfig, batches: list) -> float:
        return sum(self._measure(config, [None], x, y)[1][0] for x, y in batches) / len(batches)

    def _options(self, name: str, w_damage: dict, a_damage: dict) -> list:
        """(cost, damage, (w, a)) of every allowed bit pair of one layer."""
        layer_cost = self.costs.layers[name]
        out = []
        for w, dw in w_damage.items():
            for a, da in a_damage.items():
                if self.metric == "bitops":
                    cost = w * (a if a is not None else 8) * layer_cost.macs
                else:
                    cost = w * layer_cost.params
                out.append((float(cost), dw + da, (w, a)))
        return out

    def _solve(self, options: dict[str, list], target: float) -> BitConfig | None:
        names = [n for n, _ in self.layers]
        front = ParetoFront([options[n] for n in names])
        i = front.best_within(target - self.costs.cost(self._zero_config(), self.metric),
                              strict=self.metric == "bitops")
        return None if i is None else dict(zip(names, front.choices(i)))

    def _zero_config(self) -> BitConfig:
        """A config whose mixed layers cost nothing: the fixed layers' share of any cost."""
        return {n: (0, 0) for n, _ in self.layers}

    def measure(self) -> None:
        """Step 1 and 2: the damage of each layer at each bit, and the global front."""
        t0 = time.perf_counter()
        floor = self.floor(math.inf)
        top = {n: (max(m.w_bits), max(m.a_bits) if m.a_bits else None) for n, m in self.layers}
        probes = []
        for n, m in self.layers:
            probes += [(n, 0, b) for b in sorted(m.w_bits) if floor <= b < top[n][0]]
            if self.metric == "bitops" and m.a_bits:
                probes += [(n, 1, b) for b in sorted(m.a_bits) if floor <= b < top[n][1]]
        damage = dict(zip(probes, self.damages(top, probes, self._take(self.measure_batches))))
        self.sensitivity = {}
        for n, m in self.layers:
            per_slot = []
            for slot, cands in ((0, m.w_bits), (1, m.a_bits)):
                if slot == 1 and not cands:
                    per_slot.append({None: 0.0})
                    continue
                if slot == 1 and self.metric == "size":
                    held = min(cands, key=lambda b: (abs(b - self.size_act_bits), -b))
                    per_slot.append({held: 0.0})
                    continue
                table, worst = {}, 0.0
                for b in sorted(cands, reverse=True):
                    if b < floor:
                        break
                    worst = max(worst, damage.get((n, slot, b), 0.0))
                    table[b] = worst
                per_slot.append(table)
            self.sensitivity[n] = per_slot
        self.front = ParetoFront([self._options(n, *self.sensitivity[n]) for n, _ in self.layers])
        self.measure_seconds = time.perf_counter() - t0
        self.measure_evaluations = self.evaluations
        if self.on_move:
            self.on_move({"phase": "measure", "moves": 0, "cost": float("nan"),
                          "target": float("nan"), "error": float("nan"),
                          "evaluations": self.evaluations})

    # -- refining --
    def refine(self, config: BitConfig, target: float) -> tuple[BitConfig, list]:
        """Step 3: local knapsack rounds over one-step moves, each confirmed on fresh batches."""
        floor = self.floor(target)
        history = []
        phases = ("w", "a") if self.metric == "bitops" else ("w",)
        for r in range(self.refine_rounds):
            moves = [m for p in phases for m in self.moves(config, p, floor)]
            local = dict(zip(moves, self.damages(config, moves, self._take(self.refine_batches))))
            options = {}
            for n, _ in self.layers:
                w0, a0 = config[n]
                ws = {w0: 0.0, **{b: d for (ln, s, b), d in local.items() if ln == n and s == 0}}
                as_ = {a0: 0.0, **{b: d for (ln, s, b), d in local.items() if ln == n and s == 1}}
                options[n] = self._options(n, ws, as_)
            candidate = self._solve(options, target)
            if candidate is None or candidate == config:
                break
            check = self._take(self.refine_batches)
            before, after = self.loss(config, check), self.loss(candidate, check)
            changed = sorted(n for n in config if config[n] != candidate[n])
            history.append({"phase": f"refine {r + 1}", "changed": changed,
                            "loss_before": before, "loss_after": after,
                            "accepted": after < before})
            if self.on_move:
                self.on_move({"phase": f"refine {r + 1}", "moves": r + 1,
                              "cost": self.cost(candidate), "target": target,
                              "error": float("nan"), "evaluations": self.evaluations})
            if not after < before:
                break
            config = candidate
        return config, history

    # -- the search --
    def run_all(self, targets: list[float]) -> list[SearchResult]:
        """One measurement, then each budget's config (solved, refined). ``seconds`` of each
        result: the shared measurement plus its own refinement."""
        for t in targets:
            if not t > 0:
                raise ValueError(f"search target must be positive, got {t}")
        with self._scoring():
            if self.front is None:
                self.measure()
            names = [n for n, _ in self.layers]
            fixed = self.costs.cost(self._zero_config(), self.metric)
            results = []
            for target in targets:
                t0, evals0 = time.perf_counter(), self.evaluations
                i = self.front.best_within(target - fixed, strict=self.metric == "bitops")
                if i is None:  # below the cheapest allowed config: return that, unreached
                    i = 0
                config = dict(zip(names, self.front.choices(i)))
                predicted = float(self.front.damage[i])
                history = [{"phase": "solve", "predicted_damage": predicted,
                            "front_points": len(self.front)}]
                if self.within(self.cost(config), target):
                    config, steps = self.refine(config, target)
                    history += steps
                cost = self.cost(config)
                results.append(SearchResult(
                    metric=self.metric, target=target,
                    config={n: list(v) for n, v in config.items()},
                    bitops=self.costs.bitops(config), size_mib=self.costs.size_mib(config),
                    search_error=float("nan"), iterations=len(history) - 1,
                    evaluations=self.measure_evaluations + self.evaluations - evals0,
                    seconds=self.measure_seconds + time.perf_counter() - t0,
                    reached=self.within(cost, target), history=history, strategy="frontier",
                    convs=self.convs))
            return results

    def run(self, target: float) -> SearchResult:
        return self.run_all([target])[0]
