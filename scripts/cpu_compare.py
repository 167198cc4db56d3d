#!/usr/bin/env python3
"""rae-cache and PyTorch side by side on the CPU, one workload per process, alternating, in one run.

For each row of the CPU-speed table (issue 15) it runs `rae-cache bench ...` and
`scripts/torch_ref_bench.py ...` with the same shapes, batch, precision (f32) and thread count,
then prints a Markdown table: seconds per iteration (best of --iters), peak resident memory, and the
ratio PyTorch time / rae-cache time (> 1: rae-cache is faster).

  python3 scripts/cpu_compare.py --bin target/release/rae-cache --python .venv/bin/python --threads 2
  python3 scripts/cpu_compare.py --rows small-train,sample-s --iters 2     # a subset
  python3 scripts/cpu_compare.py --rows decoder-train-b --rae-src /tmp/rae-ref   # stage-1 step vs the reference's code
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = os.path.join(HERE, "..", "configs", "ditdh-small.json")

# row: (label, rae-cache bench args, PyTorch script args[, the PyTorch script: torch_ref_bench.py
# unless named])
ROWS = {
    "encoder": ("DINOv2-B-reg encode, batch 16",
                ["encoder", "--batch", "16"],
                ["--what", "encoder", "--batch-encoder", "16"]),
    "decoder-b": ("RAE decoder ViT-B forward, batch 16",
                  ["decoder", "--preset", "vit-b", "--batch", "16"],
                  ["--what", "decoder", "--decoder", "vit-b", "--batch-decoder", "16"]),
    # the reference's own decoder and LPIPS code (needs --rae-src)
    "decoder-train-b": ("RAE decoder ViT-B training step (noise, L1 + LPIPS, AdamW), batch 8",
                        ["decoder-train", "--preset", "vit-b", "--batch", "8"],
                        ["--batch", "8"], "torch_stage1_step.py"),
    "decoder-xl": ("RAE decoder ViT-XL forward, batch 16",
                   ["decoder", "--preset", "vit-xl", "--batch", "16"],
                   ["--what", "decoder", "--decoder", "vit-xl", "--batch-decoder", "16"]),
    "train-s": ("DiT-DH-S training step, batch 8",
                ["train", "--preset", "ditdh-s", "--batch", "8"],
                ["--what", "train", "--ditdh", "s", "--batch-train", "8"]),
    "small-train": ("small DiT-DH training step (0.4 M), batch 16",
                    ["train", "--preset", SMALL, "--batch", "16"],
                    ["--what", "train", "--hidden", "64,96", "--depth", "2,1", "--heads", "4,6",
                     "--in-channels", "64", "--grid", "16", "--classes", "4", "--batch-train", "16"]),
    "sample-s": ("DiT-DH-S Euler sampling, 50 steps, CFG 4, batch 16",
                 ["sample", "--preset", "ditdh-s", "--batch", "16", "--steps", "50", "--cfg-scale", "4"],
                 ["--what", "sample", "--ditdh", "s", "--batch-sample", "16", "--steps", "50",
                  "--cfg-scale", "4"]),
}


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in output:\n" + text[-2000:])


def run(cmd, env):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-400:]}
    return last_json(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/rae-cache")
    ap.add_argument("--python", default=sys.executable, help="a Python with torch (and transformers)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--sample-steps", type=int, default=50,
                    help="grid points of the sampling row (50 as the issue; fewer for a quick run)")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    ap.add_argument("--rae-src", default="/tmp/rae-ref",
                    help="checkout of bytetriper/RAE (its src/) for the decoder-train-b row")
    ap.add_argument("--decoder-train-batch", type=int, default=8,
                    help="batch of the decoder-train-b row (8 as the issue; 1 for a quick check)")
    a = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads))
    common = ["--iters", str(a.iters), "--warmup", str(a.warmup)]
    results = []
    for key in [r.strip() for r in a.rows.split(",") if r.strip()]:
        label, ours, theirs, *script = ROWS[key]
        script = script[0] if script else "torch_ref_bench.py"
        if script == "torch_stage1_step.py":
            theirs = [*theirs, "--rae-src", a.rae_src, "--json"]
            if a.decoder_train_batch != 8:
                fix = lambda args: [str(a.decoder_train_batch) if v == "8" else v for v in args]
                ours, theirs = fix(ours), fix(theirs)
                label = label.replace("batch 8", f"batch {a.decoder_train_batch}")
        if key == "sample-s" and a.sample_steps != 50:
            fix = lambda args: [str(a.sample_steps) if v == "50" else v for v in args]
            ours, theirs = fix(ours), fix(theirs)
            label = label.replace("50 steps", f"{a.sample_steps} grid points")
        r = run([a.bin, "bench", *ours, "--precision", "f32", "--device", "cpu", *common], env)
        t = run([a.python, os.path.join(HERE, script), *theirs, "--precision", "f32",
                 "--device", "cpu", "--threads", str(a.threads), *common], env)
        results.append((key, label, r, t))
        print(f"{key}: rae-cache {r.get('min_seconds_per_iter', r.get('error'))} s, "
              f"pytorch {t.get('min_seconds_per_iter', t.get('error'))} s", file=sys.stderr, flush=True)

    when = datetime.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    torch_v = next((t.get("torch") for *_, t in results if t.get("torch")), "?")
    print(f"\n{when}, {cpu}, {a.threads} threads, f32, best of {a.iters} after {a.warmup} warm-up; "
          f"PyTorch {torch_v}\n")
    print("| workload | rae-cache s/iter | PyTorch s/iter | speed ratio (PyTorch / rae-cache) | peak RSS rae-cache | peak RSS PyTorch |")
    print("|---|---|---|---|---|---|")
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"
    for key, label, r, t in results:
        rs, ts = r.get("min_seconds_per_iter"), t.get("min_seconds_per_iter")
        ratio = f"{ts / rs:.2f}x" if rs and ts else "-"
        print(f"| {label} | {rs:.3f} | {ts:.3f} | {ratio} | {gib(r.get('peak_rss_bytes'))} | "
              f"{gib(t.get('peak_rss_bytes'))} |" if rs and ts else
              f"| {label} | {r.get('error', rs)} | {t.get('error', ts)} | - | - | - |")
    if a.json:
        print(json.dumps([{"row": k, "rae_cache": r, "pytorch": t} for k, _, r, t in results], indent=1))


if __name__ == "__main__":
    sys.exit(main())
