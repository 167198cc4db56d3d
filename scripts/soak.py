#!/usr/bin/env python3
"""Run a command and record its resident memory over time (Linux /proc).

  python3 scripts/soak.py --every 2 --csv rss.csv -- rae-cache sample --num 50000 ...

Samples VmRSS of the process (and its children) every --every seconds,
writes `seconds,rss_mb` rows, and prints a summary: RSS at 10%, 50% and the
end of the run, the peak, and the slope over the second half (MB/min; flat
memory is ~0). Exits with the command's status.
"""

import argparse
import os
import subprocess
import sys
import time


def rss_kb(pid):
    total = 0
    for p in [pid] + children(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def children(pid):
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for c in f.read().split():
                out.append(int(c))
                out.extend(children(int(c)))
    except OSError:
        pass
    return out


def slope(points):
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    return 0.0 if var == 0 else sum((p[0] - mx) * (p[1] - my) for p in points) / var


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=float, default=2.0)
    ap.add_argument("--csv")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("give the command after --")
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    samples = []
    while proc.poll() is None:
        kb = rss_kb(proc.pid)
        if kb:
            samples.append((time.time() - t0, kb / 1024))
        time.sleep(a.every)
    if a.csv:
        with open(a.csv, "w") as f:
            f.write("seconds,rss_mb\n")
            for s, m in samples:
                f.write(f"{s:.1f},{m:.1f}\n")
    if samples:
        at = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))][1]
        half = samples[len(samples) // 2:]
        print(
            f"soak: {len(samples)} samples over {samples[-1][0]:.0f} s; rss MB at 10% {at(0.1):.0f}, "
            f"50% {at(0.5):.0f}, end {samples[-1][1]:.0f}, peak {max(m for _, m in samples):.0f}; "
            f"second-half slope {slope(half) * 60:.2f} MB/min",
            file=sys.stderr,
        )
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
