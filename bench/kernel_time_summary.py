"""Adds up Nsight Compute's per-kernel durations (ncu --csv --print-units base --metrics
gpu__time_duration.sum) by kernel name: count, total and share, largest first.

    python3 bench/kernel_time_summary.py ncu-output.csv
"""
import csv
import io
import sys
from collections import defaultdict


def short_name(name: str) -> str:
    # Template arguments and parameter lists make every instantiation unique; keep the function.
    for cut in ("(", "<"):
        if cut in name:
            name = name[: name.index(cut)]
    return name.split("::")[-1] or name


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
        name = short_name(row["Kernel Name"])
        total_ns[name] += ns
        count[name] += 1
    grand = sum(total_ns.values())
    launches = sum(count.values())
    print(f"{launches} kernels, {grand / 1e3:.1f} us in all")
    print(f"{'kernel':<48} {'count':>6} {'total us':>10} {'mean us':>9} {'share':>6}")
    for name, ns in sorted(total_ns.items(), key=lambda kv: -kv[1]):
        print(f"{name[:48]:<48} {count[name]:>6} {ns / 1e3:>10.1f} {ns / 1e3 / count[name]:>9.2f}"
              f" {100 * ns / grand:>5.1f}%")


if __name__ == "__main__":
    main(sys.argv[1])
