"""What the CLI and the demo run after training: evaluate the one model at any configuration
(BN recalibrated), search budgets, report a table and a Pareto plot."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rfq import checkpoint as ckpt
from rfq.cost import CostModel, format_bitops
from rfq.data import BatchStream, Dataset, eval_batches, load_dataset, normalize
from rfq.nn import set_bits
from rfq.methods.rfq.frontier import FrontierSearch
from rfq.methods.rfq.search import GreedySearch, ScoreBatches, calibration_count, recalibrate_bn
from rfq.training import evaluate
from rfq.methods.rfq import TrainConfig, load_model
from rfq.runtime import flush_denormals


@dataclass
class LoadedRun:
    cfg: TrainConfig
    model: nn.Module  # the EMA model when the run has one
    dataset: Dataset
    costs: CostModel | None
    wall: float
    path: Path


def load_run(path: str | Path, dataset: Dataset | None = None, data_dir=None,
             device="cpu") -> LoadedRun:
    """A trained run's evaluation model (EMA if any) from its checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    saved = ckpt.load(path)
    cfg = TrainConfig.from_dict(saved["config"])
    if data_dir is not None:
        cfg.data_dir = data_dir
    cfg.init_from = None  # the checkpoint holds every weight
    cfg.device = device
    ds = dataset or load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    model = load_model(cfg, ds, device)
    try:
        if saved.get("ema") is not None:
            model.load_state_dict(saved["ema"]["model"])
        else:
            model.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise ckpt.CheckpointError(f"{path} does not match its own model: {str(err)[:300]}")
    model.eval()
    costs = CostModel(model, (ds.in_channels, *ds.image_size)) if cfg.mode != "float" else None
    return LoadedRun(cfg, model, ds, costs, saved.get("wall", 0.0), path)


def dataset_calibration_batches(ds: Dataset, images: int, stream_seed: int, device,
                                channels_last: bool, batch_size: int = 128) -> list:
    """Augmented training batches of ``ds`` for BN recalibration: floor(images / batch) + 1."""
    stream = BatchStream(ds.train, ds, batch_size, stream_seed, channels_last=channels_last,
                         device=device)
    n = min(calibration_count(images, batch_size), stream.steps_per_epoch)
    return [stream.batch(0, i) for i in range(n)]


def calibration_batches(run: LoadedRun, images: int, batch_size: int = 128, seed: int = 1):
    """A run's BN recalibration batches (dataset_calibration_batches, stream seed seed + 1000)."""
    return dataset_calibration_batches(run.dataset, images, seed + 1000,
                                       next(run.model.parameters()).device,
                                       run.cfg.channels_last, batch_size)


def test_batches(run: LoadedRun, split: str = "test", limit: int | None = None):
    s = getattr(run.dataset, split)
    return eval_batches(s, run.dataset, 256, next(run.model.parameters()).device,
                        run.cfg.channels_last, limit)


def evaluate_config(run: LoadedRun, config, calib, split: str = "test",
                    limit: int | None = None) -> float:
    """Accuracy of the one model at ``config``: bits set, all BN statistics recalibrated."""
    model = copy.deepcopy(run.model)
    with flush_denormals():
        if config is not None and run.costs is not None:
            set_bits(model, config)
        if calib:
            recalibrate_bn(model, calib)
        return evaluate(model, test_batches(run, split, limit))


def score_batches(run: LoadedRun, batch_size: int, seed: int = 0) -> ScoreBatches:
    ds = run.dataset
    device = next(run.model.parameters()).device

    def transform(images):
        x = normalize(images, ds.mean, ds.std)
        if run.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(device)

    return ScoreBatches(ds.holdout.images, ds.holdout.labels.to(device), batch_size, seed,
                        transform)


def search_budgets(run: LoadedRun, budgets: list[float], metric: str = "bitops",
                   batch_size: int = 1024, calib_images: int = 7000, fast: bool = True,
                   min_bits: int | None = None, legacy_floor: bool = False, progress=print,
                   seed: int = 0, eval_limit: int | None = None,
                   bars: bool | None = None, strategy: str = "greedy",
                   integer_convs: bool = True) -> list[dict]:
    """Search every budget, then test each config with recalibrated BN.

    ``integer_convs``: score with integer convolutions where they are fast (False: float ones,
    the arithmetic of searches before 2026-12-06; each result's "convs" says which ran).

    ``strategy``: "greedy" (RFQ's search, one run per budget from uniform 5) or "frontier"
    (one measurement of the model, every budget solved from it, then refined).
    ``bars``: a progress bar per search (moves, cost against the budget, error of the last
    move); None shows them where stderr is a terminal."""
    if run.costs is None:
        raise ValueError("a float model has no bit-widths to search")
    if strategy not in ("greedy", "frontier"):
        raise ValueError(f"strategy must be 'greedy' or 'frontier', got {strategy!r}")
    calib = calibration_batches(run, calib_images)

    def label(target):
        return format_bitops(target) if metric == "bitops" else f"{target / 8 / 1024:.1f}KiB"

    found = []
    if strategy == "frontier":
        with flush_denormals(), _search_bar(f"frontier, {len(budgets)} budgets", metric,
                                            bars) as on_move:
            searcher = FrontierSearch(run.model, run.costs, score_batches(run, batch_size, seed),
                                      metric, min_bits, fast, on_move=on_move)
            searcher.integer_convs = integer_convs
            t0 = time.perf_counter()
            found = searcher.run_all(budgets)
            front_seconds = time.perf_counter() - t0
        if progress:
            progress(f"  frontier: the whole front of {len(budgets)} budgets in "
                     f"{front_seconds:.1f} s (measurement {searcher.measure_seconds:.1f} s, "
                     f"then each budget solved and refined)")
    for k, target in enumerate(budgets):
        if strategy == "greedy":
            with flush_denormals(), _search_bar(f"search {k + 1}/{len(budgets)} <{label(target)}",
                                                metric, bars) as on_move:
                searcher = GreedySearch(run.model, run.costs, score_batches(run, batch_size, seed),
                                        metric, min_bits, legacy_floor, fast, on_move=on_move)
                searcher.integer_convs = integer_convs
                found.append(searcher.run(target))
        result = found[k]
        result.seed = seed
        result.accuracy = evaluate_config(run, {n: tuple(v) for n, v in result.config.items()},
                                          calib, limit=eval_limit)
        if progress:
            progress(f"  {strategy} budget {label(target)}: {format_bitops(result.bitops)} BitOps, "
                     f"{result.size_mib * 1024:.1f} KiB, acc {result.accuracy * 100:.2f} %, "
                     f"{result.iterations} moves, {result.evaluations} evaluations, "
                     f"{result.seconds:.1f} s")
    dicts = [r.to_dict() for r in found]
    if strategy == "frontier":
        for d in dicts:
            d["front_seconds"] = front_seconds
    return dicts


@contextlib.contextmanager
def _search_bar(desc: str, metric: str, enabled: bool | None):
    """A tqdm bar fed by GreedySearch's on_move: moves so far, current cost / budget, error."""
    from tqdm import tqdm

    disable = None if enabled is None else not enabled  # None: tqdm's own test for a terminal
    bar = tqdm(desc=desc, unit="move", disable=disable, dynamic_ncols=True, mininterval=0.5)

    def on_move(info):
        cost, target = info["cost"], info["target"]
        shown = (f"{format_bitops(cost)}/{format_bitops(target)}" if metric == "bitops"
                 else f"{cost / 8192:.1f}/{target / 8192:.1f}KiB")
        bar.set_postfix_str(f"phase {info['phase']}, cost {shown}, "
                            f"error {info['error'] * 100:.1f} %, "
                            f"{info['evaluations']} evals", refresh=False)
        bar.update(1)

    try:
        yield on_move
    finally:
        bar.close()


def uniform_results(run: LoadedRun, bits: list[int], calib_images: int = 7000,
                    eval_limit: int | None = None) -> list[dict]:
    calib = calibration_batches(run, calib_images)
    out = []
    for b in bits:
        cfg = run.costs.uniform(run.model, b)
        out.append({"bits": b, "bitops": run.costs.bitops(cfg),
                    "size_mib": run.costs.size_mib(cfg),
                    "accuracy": evaluate_config(run, cfg, calib, limit=eval_limit)})
    return out


def format_table(uniform: list[dict], searched: list[dict], baselines: list[dict] = ()) -> str:
    lines = ["| model | W/A bits | BitOps | size KiB | top-1 % |", "|---|---|---|---|---|"]
    for u in uniform:
        lines.append(f"| coupled, uniform | {u['bits']}/{u['bits']} | {format_bitops(u['bitops'])} "
                     f"| {u['size_mib'] * 1024:.1f} | {u['accuracy'] * 100:.2f} |")
    for s in searched:
        w = [v[0] for v in s["config"].values()]
        a = [v[1] for v in s["config"].values() if v[1] is not None]
        lines.append(f"| coupled, {s.get('strategy', 'greedy')} < {format_bitops(s['target'])} "
                     f"| mixed "
                     f"(mean {sum(w) / len(w):.2f}/{sum(a) / max(len(a), 1):.2f}) | "
                     f"{format_bitops(s['bitops'])} | {s['size_mib'] * 1024:.1f} | "
                     f"{s['accuracy'] * 100:.2f} |")
    for b in baselines:
        bits = "mixed" if b["bits"] == "mixed" else f"{b['bits']}/{b['bits']}"
        lines.append(f"| LSQ trained alone | {bits} | "
                     f"{format_bitops(b['bitops'])} | {b['size_mib'] * 1024:.1f} | "
                     f"{b['accuracy'] * 100:.2f} |")
    return "\n".join(lines)


def pareto_plot(path: str | Path, uniform: list[dict], searched: list[dict],
                baselines: list[dict] = (), title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    if uniform:
        ax.plot([u["bitops"] / 1e6 for u in uniform], [u["accuracy"] * 100 for u in uniform],
                "o-", label="one coupled model, uniform W=A")
        for u in uniform:
            ax.annotate(f"{u['bits']}", (u["bitops"] / 1e6, u["accuracy"] * 100),
                        textcoords="offset points", xytext=(4, -10), fontsize=8)
    styles = {"frontier": ("*-", 12, "same model, frontier search (one measurement)"),
              "greedy": ("D", 7, "same model, greedy search (RFQ)")}
    for strategy, (marker, size, label) in styles.items():
        points = sorted((s["bitops"] / 1e6, s["accuracy"] * 100) for s in searched
                        if s.get("strategy", "greedy") == strategy)
        if points:
            ax.plot(*zip(*points), marker, markersize=size, label=label)
    if baselines:
        ax.plot([b["bitops"] / 1e6 for b in baselines], [b["accuracy"] * 100 for b in baselines],
                "s", label="LSQ trained alone per bit-width")
    ax.set_xlabel("BitOps (M)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
    return path


def budget_levels(run: LoadedRun, levels: list[float], metric: str = "bitops") -> list[float]:
    """Costs of (fractional) uniform levels: 4 -> the cost of W4A4; 3.5 -> the midpoint of the
    W3A3 and W4A4 costs. ``metric``: "bitops" or "size" (bits)."""
    out = []
    for lv in levels:
        lo, hi = math.floor(lv), math.ceil(lv)
        c_lo = run.costs.cost(run.costs.uniform(run.model, lo), metric)
        c_hi = run.costs.cost(run.costs.uniform(run.model, hi), metric)
        out.append(c_lo + (c_hi - c_lo) * (lv - lo))
    return out


__all__ = ["LoadedRun", "load_run", "evaluate_config", "search_budgets", "uniform_results",
           "format_table", "pareto_plot", "budget_levels", "calibration_batches", "score_batches"]


def dataset_arch(model: str, ds: Dataset) -> dict:
    """A deploy file's ``arch``: build_model's arguments and the dataset's input shape."""
    return {"model": model, "in_channels": ds.in_channels, "classes": ds.classes,
            "input_shape": [ds.in_channels, *ds.image_size]}


def run_arch(run: LoadedRun) -> dict:
    return dataset_arch(run.cfg.model, run.dataset)


def export_config(run: LoadedRun, config, path: str | Path, calib_images: int,
                  source: str) -> Path:
    """Write ``config`` of the one model as a deploy file (rfq.deploy), with BN recalibrated on
    the same batches ``evaluate_config`` uses, so the file scores what the search reported."""
    from rfq import deploy

    model = copy.deepcopy(run.model)
    set_bits(model, config)
    with flush_denormals():
        recalibrate_bn(model, calibration_batches(run, calib_images))
    ds = run.dataset
    extra = {"checkpoint": str(run.path), "dataset": run.cfg.dataset,
             "calib_images": calib_images, "config_from": source,
             "normalize": {"mean": ds.mean, "std": ds.std}}
    return deploy.export(model, path, arch=run_arch(run), extra=extra)


def deployed_accuracy(run: LoadedRun, path: str | Path, split: str = "test",
                      limit: int | None = None) -> float:
    """Top-1 of a deploy file on the run's dataset (the model rebuilt from the file alone)."""
    from rfq import deploy

    model = deploy.load(path)
    with flush_denormals(), torch.inference_mode():
        return evaluate(model, test_batches(run, split, limit))
