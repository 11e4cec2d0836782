#!/usr/bin/env python3
"""Per-kernel device time from an ncu CSV (ncu --csv --page raw --metrics gpu__time_duration.sum),
divided over a number of steps: where a step's GPU time goes, largest first.

    scripts/kernel_times.py NCU_CSV STEPS [TOP]
"""
import csv
import sys
from collections import defaultdict

UNIT_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def short_name(kernel):
    """'void ns::(anonymous namespace)::scan_kernel<4>(Args)' -> 'scan_kernel'."""
    name = kernel.replace("(anonymous namespace)::", "").removeprefix("void ")
    return name.split("(")[0].split("<")[0].split("::")[-1].strip()


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: kernel_times.py NCU_CSV STEPS [TOP]")
    path, steps = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) == 4 else 15
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        sys.exit(f"kernel_times.py: {path} holds no ncu table (no line starts with \"ID\")")
    rows = list(csv.reader(lines[start:]))
    header, units = rows[0], rows[1]
    name_col, time_col = header.index("Kernel Name"), header.index("gpu__time_duration.sum")
    scale = UNIT_US.get(units[time_col])
    if scale is None:
        sys.exit(f"kernel_times.py: {path}: unknown time unit '{units[time_col]}'")
    total, calls = defaultdict(float), defaultdict(int)
    for row in rows[2:]:
        if len(row) <= time_col or not row[time_col]:
            continue
        name = short_name(row[name_col])
        total[name] += float(row[time_col].replace(",", "")) * scale
        calls[name] += 1
    step_us = sum(total.values()) / steps
    print(f"{'kernel':<40} {'calls/step':>10} {'us/step':>10} {'share':>6}")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{name[:40]:<40} {calls[name] / steps:>10.1f} {us / steps:>10.1f} {100 * us / steps / step_us:>5.1f}%")
    print(f"{'all kernels':<40} {sum(calls.values()) / steps:>10.1f} {step_us:>10.1f}")


if __name__ == "__main__":
    main()
