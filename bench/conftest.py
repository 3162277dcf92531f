"""Benchmarks report ratios, not times: every benchmark names a group and a role ("rfq" or a
baseline), and the session ends with a table of baseline_median / rfq_median per group, measured
in the same run (shared machines drift by up to 4x between runs; ratios hold).

Options: --ratio-table FILE writes the table as markdown; --ratio-json FILE writes its rows, which
bench/summarize.py combines over several runs (median ratio and range) for bench/README.md.

Every benchmark warms up first (allocator and caches reach their steady state), then reports the
median: the default glibc allocator hands some calls freshly mapped pages whose 4 KB faults cost
~1 GB/s (spec §5), and the median keeps those outliers out of the ratio.
"""

import json
import os
import platform

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def steady_state():
    """About a second of mixed work before the first measurement: OpenMP threads spun up,
    allocator pools and clocks settled, so the first benchmark is not an outlier."""
    import time

    from rfq import ops

    x, steps, sel = torch.randn(6_422_528), torch.tensor([0.05]), torch.tensor(0)
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        y = ops.coupled_quant(x, steps, [4], sel)
        torch.ops.rfq.coupled_quant_backward(y, x, steps, [4], sel, True, 1.0)
        torch.mul(x, 2.0)


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.benchmark(warmup=True, warmup_iterations=10, min_rounds=15))


def pytest_addoption(parser):
    parser.addoption("--ratio-table", default=None, help="write the ratio table (markdown) here")
    parser.addoption("--ratio-json", default=None, help="write the ratio rows (JSON) here")


@pytest.fixture(autouse=True)
def two_threads():
    """The reference machine's 2 threads, whatever the host has (C6 overrides per call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def machine_line():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, 2 threads unless noted, torch {torch.__version__}, "
            f"CPU kernels: {torch.backends.cpu.get_cpu_capability()}")


def ratio_rows(benchmarks):
    by_group = {}
    for b in benchmarks:
        if b.stats is None or not b.stats.rounds:
            continue
        by_group.setdefault(b.group, {})[b.extra_info.get("role", b.name)] = b
    rows = []
    for group, roles in sorted(by_group.items()):
        ours = roles.get("rfq")
        if ours is None:
            continue
        for role, base in sorted(roles.items()):
            if role == "rfq":
                continue
            info = ours.extra_info
            rows.append(dict(
                target=info.get("target", ""), group=group, baseline=role,
                base_ms=base.stats.median * 1e3, rfq_ms=ours.stats.median * 1e3,
                ratio=base.stats.median / ours.stats.median,
                gbps=info.get("min_bytes", 0) / ours.stats.median / 1e9,
                floor=info.get("floor", ""),
            ))
    return rows


def format_table(rows):
    lines = [f"Machine: {machine_line()}", "",
             "| target | group | baseline | baseline ms | rfq ms | ratio | floor | rfq GB/s (min bytes) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['group']} | {r['baseline']} | {r['base_ms']:.3f} | "
            f"{r['rfq_ms']:.3f} | **{r['ratio']:.2f}x** | {r['floor']} | {r['gbps']:.1f} |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    rows = ratio_rows(session.benchmarks)
    if not rows:
        return
    table = format_table(rows)
    terminalreporter.write_sep("=", "rfq ratios (baseline median / rfq median, same run)")
    terminalreporter.write_line(table)
    path = config.getoption("--ratio-table")
    if path:
        with open(path, "w") as f:
            f.write(table + "\n")
    path = config.getoption("--ratio-json")
    if path:
        with open(path, "w") as f:
            json.dump({"machine": machine_line(), "rows": rows}, f, indent=1)
