"""Adds up Nsight Compute's per-kernel durations (ncu --csv --print-units base --metrics
gpu__time_duration.sum) by kernel name and launch shape: count, total and share, largest first.

    python3 bench/kernel_time_summary.py ncu-output.csv
"""
import csv
import io
import re
import sys
from collections import defaultdict


def short_name(name: str) -> str:
    """The kernel function's own name: no return type, namespaces, template arguments or
    parameter list (every instantiation of a template is one row per launch shape instead)."""
    name = name.replace("(anonymous namespace)::", "")
    match = re.search(r"(\w+)\s*[<(]", name)
    return match.group(1) if match else name[:48]


def main(path: str) -> None:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.find('"ID"')  # ncu prints its own log lines before the table
    if start < 0:
        print(f"no ncu table in {path}")
        return
    total_ns = defaultdict(float)
    count = defaultdict(int)
    for row in csv.DictReader(io.StringIO(text[start:])):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        try:
            ns = float(row["Metric Value"].replace(",", ""))
        except ValueError:
            continue
        # The launch shape tells apart the projections (and batch sizes) of one kernel.
        name = f'{short_name(row["Kernel Name"])} {row.get("Grid Size", "")} {row.get("Block Size", "")}'

        total_ns[name] += ns
        count[name] += 1
    grand = sum(total_ns.values())
    launches = sum(count.values())
    print(f"{launches} kernels, {grand / 1e3:.1f} us in all")
    print("(each kernel timed alone; a kernel launched with programmatic dependent launch also counts")
    print(" its wait for the kernel before it, so read those as upper bounds)")
    print(f"{'kernel, grid, block':<72} {'count':>6} {'total us':>10} {'mean us':>9} {'share':>6}")
    for name, ns in sorted(total_ns.items(), key=lambda kv: -kv[1]):
        print(f"{name[:72]:<72} {count[name]:>6} {ns / 1e3:>10.1f} {ns / 1e3 / count[name]:>9.2f}"
              f" {100 * ns / grand:>5.1f}%")


if __name__ == "__main__":
    main(sys.argv[1])
