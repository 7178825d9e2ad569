"""Turn a pytest-benchmark JSON file into the README's tables (markdown).

    pytest benchmarks/ --benchmark-json=bench.json
    python benchmarks/report.py bench.json [more.json ...] [--baseline reference] [--out table.md]
                                [--readme README.md --section h100]

Several JSON files (one session's runs) are merged. ``--readme`` replaces the generated part of one section of the
README's benchmark tables (``<!-- benchmark-table:NAME:start -->`` ... ``:end``: the header line and the tables;
the prose around them, which reads the numbers, stays and needs updating by hand); a README without sections
has its whole ``<!-- benchmark-table:start -->`` ... ``:end`` block replaced.

One table per op: a row per benchmark group (op, shape, mode), a column per provider with the median time, and
the speed-up of every provider over the baseline provider measured in the same run; where measured, a step's extra
peak memory, its share of the GPU's copy bandwidth, and on a GPU its device time (CUDA events, cold L2).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict


def _format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def merge(datasets: list[dict], names: list[str]) -> dict:
    """One dataset from several runs (a GPU session splits its benchmarks over several calls): the first run's
    machine and commit, every run's benchmarks; a (group, provider) measured twice keeps the later run's, with a
    warning (its speed-up was computed within its own run)."""
    merged = dict(datasets[0])
    seen: dict[tuple, int] = {}
    benchmarks: list[dict] = []
    for data, name in zip(datasets, names):
        for bench in data.get("benchmarks") or []:
            key = (bench.get("group"), (bench.get("extra_info") or {}).get("provider", bench.get("name")))
            if key in seen:
                print(f"report.py: {key} is in more than one file; keeping the one from {name}", file=sys.stderr)
                benchmarks[seen[key]] = bench
                continue
            seen[key] = len(benchmarks)
            benchmarks.append(bench)
    merged["benchmarks"] = benchmarks
    return merged


def header(data: dict) -> str:
    machine = data.get("machine_info") or {}
    first = next(iter(data.get("benchmarks") or []), {})
    extra = first.get("extra_info") or {}
    commit = ((data.get("commit_info") or {}).get("id") or "")[:10]
    peak = next((b["extra_info"]["copy_bandwidth_bytes_s"] for b in data.get("benchmarks") or []
                 if "copy_bandwidth_bytes_s" in (b.get("extra_info") or {})), None)
    bandwidth = f"{peak / 1e12:.1f} TB/s on this GPU" if peak else "H100: 3.0 TB/s"
    return (f"Device: {extra.get('device_name', '?')} ({extra.get('device', '?')}, {extra.get('threads', '?')} "
            f"threads), CPU: {machine.get('cpu', {}).get('brand_raw', '?')}, torch {extra.get('torch', '?')}, "
            f"commit {commit or '?'}, {data.get('datetime', '')[:19]}. Medians; speed-up = baseline / provider; "
            "MiB = extra peak memory of a step where measured; % BW = the bytes a step must move at least, per median "
            f"time, as a share of the GPU's measured copy bandwidth ({bandwidth})"
            + ("; device = the median GPU time of a step between CUDA events, each step after an L2 flush, and "
               "its % BW over that time" if _has_device_times(data) else "") + ".")


def _has_device_times(data: dict) -> bool:
    return any("device_time_median_s" in (b.get("extra_info") or {}) for b in data.get("benchmarks") or [])


def tables(data: dict, baseline: str | None = None) -> str:
    """Markdown tables, one per op, from pytest-benchmark JSON. Speed-ups are over ``baseline``, or else over the
    baseline each benchmark recorded (the seeds' loop or the reference)."""
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    baselines: dict[str, str] = {}
    memory: dict[tuple[str, str], float] = {}
    bandwidth: dict[tuple[str, str], float] = {}
    device: dict[tuple[str, str], tuple[float, float | None]] = {}  # (device seconds, fraction of copy bandwidth)
    ops: dict[str, list[str]] = defaultdict(list)
    providers_by_op: dict[str, list[str]] = defaultdict(list)
    for bench in data.get("benchmarks") or []:
        extra = bench.get("extra_info") or {}
        median = (bench.get("stats") or {}).get("median")
        if not median or median != median:   # not timed (a failed or disabled run), zero or NaN: no row to show
            continue
        op, provider = extra.get("op", "?"), extra.get("provider", bench.get("name", "?"))
        group = bench.get("group") or bench.get("name", "?")
        groups[group][provider] = median
        baselines[group] = baseline or extra.get("baseline", "reference")
        if extra.get("peak_memory_mib") is not None:
            memory[group, provider] = extra["peak_memory_mib"]
        if "fraction_of_copy_bandwidth" in extra:
            bandwidth[group, provider] = extra["fraction_of_copy_bandwidth"]
        if "device_time_median_s" in extra:
            device[group, provider] = (extra["device_time_median_s"], extra.get("device_fraction_of_copy_bandwidth"))
        if group not in ops[op]:
            ops[op].append(group)
        if provider not in providers_by_op[op]:
            providers_by_op[op].append(provider)
    out = []
    for op, op_groups in ops.items():
        providers = providers_by_op[op]
        out.append(f"#### {op}\n")
        out.append("| workload | " + " | ".join(providers) + " |")
        out.append("|---|" + "---|" * len(providers))
        for group in op_groups:
            medians = groups[group]
            group_baseline = baselines[group]
            base = medians.get(group_baseline)
            cells = []
            for p in providers:
                if p not in medians:
                    cells.append("–")
                elif base is None or p == group_baseline:
                    cells.append(_format_time(medians[p]))
                else:
                    cells.append(f"{_format_time(medians[p])} ({base / medians[p]:.1f}×)")
                if (group, p) in memory:
                    cells[-1] += f", {memory[group, p]:.0f} MiB"
                if (group, p) in bandwidth and p != group_baseline:
                    cells[-1] += f", {100 * bandwidth[group, p]:.0f}% BW"
                if (group, p) in device:
                    seconds, fraction = device[group, p]
                    cells[-1] += f"; device {_format_time(seconds)}"
                    if fraction is not None and p != group_baseline:
                        cells[-1] += f", {100 * fraction:.0f}% BW"
            workload = group[len(op):].strip() if group.startswith(op) else group
            out.append(f"| {workload} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def markdown(data: dict, baseline: str | None = None) -> str:
    """The header line and the tables: what a README section holds between its markers."""
    return header(data) + "\n\n" + tables(data, baseline)


START, END = "<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->"
SECTION_MARKER = re.compile(r"<!-- benchmark-table:([\w.-]+):start -->")


def sections(readme: str) -> list[str]:
    """The names of the README's benchmark-table sections, in order."""
    return SECTION_MARKER.findall(readme)


def _between(readme: str, start: str, end: str, what: str) -> tuple[str, str]:
    """(text before ``start`` included, text from ``end`` on) of the one span ``start`` ... ``end``."""
    if readme.count(start) != 1 or readme.count(end) != 1 or readme.index(start) > readme.index(end):
        raise SystemExit(f"{what}: expected one {start} ... {end} pair")
    head, rest = readme.split(start, 1)
    return head + start, end + rest.split(end, 1)[1]


def update_readme(path: str, text: str, source: str, section: str | None = None) -> None:
    """Replace the generated part of ``section`` (or, in a README without sections, the whole benchmark-table
    block) with ``text``."""
    with open(path) as f:
        readme = f.read()
    names = sections(readme)
    if section is None and names:
        raise SystemExit(f"{path} has benchmark-table sections ({', '.join(names)}): pick one with --section; "
                         "replacing the whole block would drop the other sections and the prose between them")
    if section is not None and section not in names:
        raise SystemExit(f"{path} has no benchmark-table section {section!r}; it has: {', '.join(names) or 'none'}")
    if section is None:
        head, tail = _between(readme, START, END, path)
    else:
        head, tail = _between(readme, f"<!-- benchmark-table:{section}:start -->",
                              f"<!-- benchmark-table:{section}:end -->", path)
    with open(path, "w") as f:
        f.write(f"{head}\n<!-- generated by benchmarks/report.py from {source} -->\n{text}\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_files", nargs="+", metavar="json_file",
                        help="pytest-benchmark JSON; several runs are merged into one set of tables")
    parser.add_argument("--baseline", help="provider the speed-ups are relative to (default: each benchmark's own)")
    parser.add_argument("--out", help="also write the markdown here")
    parser.add_argument("--readme", help="replace the generated part of a benchmark-table section of this file")
    parser.add_argument("--section", help="the README section to replace (its marker's NAME, e.g. h100)")
    args = parser.parse_args(argv)
    if args.section and not args.readme:
        parser.error("--section goes with --readme")
    data = merge([load(path) for path in args.json_files], args.json_files)
    text = markdown(data, args.baseline)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.readme:
        update_readme(args.readme, text, " + ".join(args.json_files), args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
