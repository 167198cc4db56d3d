#!/usr/bin/env bash
# One GPU check in about 8 minutes on an H200, from a bundle made by scripts/gpu-bundle.sh:
#   1. parity tests on CUDA (RAE_TEST_DEVICE=cuda, RAE_TEST_PRECISION=f32 and bf16), pass/fail per test module
#   2. encoder DINOv2-B-reg, batch 256, bf16: images/s              (goal >= 5,000)
#   3. whole `rae-cache build` of synthetic JPEGs: images/s end to end and the share of time the GPU sat idle
#                                                                  (goal >= 3,000)
#   4. DiT-DH-XL training step at the largest batch that fits: s/step, images/s   (goal >= PyTorch)
#   5. decoder ViT-XL forward: images/s
#   and (2), (4), (5) in PyTorch (scripts/torch_ref_bench.py) beside ours.
# Each step has its own timeout and the whole run a budget: a step that fails or times out is recorded as
# FAIL/TIMEOUT and the next one runs; a step that would not fit in what is left is SKIPped. The most important
# results come first. Prints a markdown table at the end; with OUT set, writes every log, the JSON lines,
# nvidia-smi samples and table.md there.
#
# usage: bash scripts/gpu-check.sh BUNDLE_DIR|BUNDLE.tar.xz [--cpu-smoke]
#   --cpu-smoke   tiny shapes on the CPU, no nvidia-smi: proves the plumbing end to end (seconds to minutes)
# env: OUT (results dir), BUDGET_S (default 450), PYTHON (default python3), WORK (scratch, default a temp dir),
#      BUILD_IMAGES (8192), BUILD_BATCH (128), TRAIN_PRECISION (bf16), TRAIN_START_BATCH (32), TRAIN_MAX_BATCH (1024)
set -uo pipefail

BUNDLE=${1:?usage: gpu-check.sh BUNDLE_DIR|BUNDLE.tar.xz [--cpu-smoke]}
SMOKE=0
[ "${2:-}" = --cpu-smoke ] && SMOKE=1
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-450}
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d /tmp/rae-gpu-check.XXXXXX)}
mkdir -p "$WORK"
RES=${OUT:-$WORK/results}
mkdir -p "$RES"

if [ -f "$BUNDLE" ]; then # a tarball: unpack next to the scratch files
  mkdir -p "$WORK/bundle" && tar -xJf "$BUNDLE" -C "$WORK/bundle" && BUNDLE=$(ls -d "$WORK"/bundle/*/ | head -1)
fi
BUNDLE=$(cd "$BUNDLE" && pwd)
BIN=$BUNDLE/rae-cache
FIX=$BUNDLE/tests/fixtures/rae-ref
export RAE_REF_FIXTURES=$FIX RAE_LOG=${RAE_LOG:-warn}

if [ $SMOKE = 1 ]; then
  DEV=cpu; PREC=f32; ENC_SHAPE=tiny; ENC_BATCH=2; ITERS=1; WARM=1
  BUILD_IMAGES=${BUILD_IMAGES:-24}; BUILD_SIZE=64x48; BUILD_BATCH=${BUILD_BATCH:-8}
  TRAIN_MODEL=$FIX/ditdh.json; TRAIN_START=1; TRAIN_MAX=4; TRAIN_PREC=f32
  DEC_ARGS=(--decoder-config "$FIX/decoder.json"); DEC_BATCH=2; TORCH_TINY=--tiny
else
  DEV=cuda; PREC=bf16; ENC_SHAPE=base; ENC_BATCH=256; ITERS=5; WARM=2
  BUILD_IMAGES=${BUILD_IMAGES:-8192}; BUILD_SIZE=500x375; BUILD_BATCH=${BUILD_BATCH:-128}
  TRAIN_MODEL=ditdh-xl; TRAIN_START=${TRAIN_START_BATCH:-32}; TRAIN_MAX=${TRAIN_MAX_BATCH:-1024}
  TRAIN_PREC=${TRAIN_PRECISION:-bf16}
  DEC_ARGS=(--preset vit-xl); DEC_BATCH=256; TORCH_TINY=
fi

# CUDA libraries: PyTorch's wheels (nvidia/*/lib; CUDA 13 = nvidia/cu13/lib) and BUNDLE/lib.
if [ $SMOKE = 0 ]; then
  SP=$("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)
  LP=$BUNDLE/lib
  for s in $SP; do for d in "$s"/nvidia/*/lib; do [ -d "$d" ] && LP=$LP:$d; done; done
  export LD_LIBRARY_PATH=$LP${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

STEPS=$RES/steps.tsv
: > "$STEPS"
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }

# run_step NAME TIMEOUT_S CMD... : stdout -> NAME.out, stderr -> NAME.err; one row in steps.tsv
# (name, status, rc, start, end epoch seconds).
run_step() {
  local name=$1 to=$2; shift 2
  local l; l=$(left)
  if [ "$l" -lt 10 ]; then
    printf '%s\tSKIP\t-\t0\t0\n' "$name" >> "$STEPS"; echo "== $name: SKIP (budget spent)" >&2; return 1
  fi
  [ "$to" -gt "$l" ] && to=$l
  echo "== $name (timeout ${to}s, ${l}s of budget left)" >&2
  local s e rc st
  s=$(date +%s.%N)
  timeout -k 5 "$to" "$@" > "$RES/$name.out" 2> "$RES/$name.err"
  rc=$?
  e=$(date +%s.%N)
  case $rc in 0) st=OK ;; 124|137) st=TIMEOUT ;; *) st=FAIL ;; esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$st" "$rc" "$s" "$e" >> "$STEPS"
  echo "   $st (rc $rc, $(awk -v a="$s" -v b="$e" 'BEGIN{printf "%.1f", b-a}') s)" >&2
  [ $rc = 0 ]
}

# Background GPU sampler for the whole run: utilisation and memory every 100 ms.
SMI_PID=
if [ $SMOKE = 0 ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi -L > "$RES/gpu.txt" 2>&1
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 100 \
    > "$RES/smi.csv" 2>/dev/null &
  SMI_PID=$!
fi
cleanup() { [ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null; }
trap cleanup EXIT

{ echo "bundle: $BUNDLE"; cat "$BUNDLE/BUNDLE.txt" 2>/dev/null; echo "mode: $([ $SMOKE = 1 ] && echo cpu-smoke || echo gpu)";
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; ldd "$BIN" 2>&1 | grep -E 'cuda|cublas|curand|not found' || true; } > "$RES/env.txt"

# ---- 1. parity tests (tiny fixtures: seconds each): the modules listed in tests/MODULES of the one test
#         binary tests/it, each run alone (its module path as the test filter)
TEST_DEV=$DEV
for prec in f32 bf16; do
  for n in $(cat "$BUNDLE/tests/MODULES" 2>/dev/null); do
    RAE_TEST_DEVICE=$TEST_DEV RAE_TEST_PRECISION=$prec run_step "parity-$n-$prec" 60 \
      "$BUNDLE/tests/it" "$n::" --test-threads=4
  done
done

# ---- 2. encoder: a random DINOv2-B-reg directory (also used by the build), then batch 256
run_step random-encoder 60 "$BIN" bench random-encoder --shape "$ENC_SHAPE" --out "$WORK/encoder"
run_step encoder 60 "$BIN" bench encoder --encoder "$WORK/encoder" --batch "$ENC_BATCH" --iters "$((ITERS * 2))" \
  --warmup "$WARM" --device "$DEV" --precision "$PREC"

# ---- 3. whole build over synthetic JPEGs (images/s from the wall clock, GPU idle share from smi.csv)
run_step synth-images 60 "$BIN" bench synth-images --out "$WORK/images" --count "$BUILD_IMAGES" --size "$BUILD_SIZE" \
  --classes 100
rm -rf "$WORK/cache"
run_step build 120 "$BIN" build "$WORK/images" --encoder "$WORK/encoder" --out "$WORK/cache" --device "$DEV" \
  --batch-size "$BUILD_BATCH" --json
rm -rf "$WORK/cache" # several GB: free the disk for what follows

# ---- 4. training step, largest batch first found by doubling; then PyTorch at the same batch
run_step train 150 "$BIN" bench train --preset "$TRAIN_MODEL" --find-max-batch --batch "$TRAIN_START" \
  --max-batch "$TRAIN_MAX" --iters "$ITERS" --warmup 1 --device "$DEV" --precision "$TRAIN_PREC"
TB=$("$PY" -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["batch"])' \
  "$RES/train.out" 2>/dev/null || echo "$TRAIN_START")
TORCH_OK=1
"$PY" -c 'import torch' 2>/dev/null || TORCH_OK=0
if [ $TORCH_OK = 1 ]; then
  run_step torch-train 120 "$PY" "$BUNDLE/scripts/torch_ref_bench.py" $TORCH_TINY --what train --device "$DEV" \
    --precision "$TRAIN_PREC" --batch-train "$TB" --iters "$ITERS" --warmup 2
else
  printf '%s\tSKIP\t-\t0\t0\n' torch-train >> "$STEPS"
fi

# ---- 5. decoder, then PyTorch encoder + decoder
run_step decoder 60 "$BIN" bench decoder "${DEC_ARGS[@]}" --batch "$DEC_BATCH" --iters "$ITERS" --warmup "$WARM" \
  --device "$DEV" --precision "$PREC"
if [ $TORCH_OK = 1 ]; then
  run_step torch-encdec 120 "$PY" "$BUNDLE/scripts/torch_ref_bench.py" $TORCH_TINY --what encoder,decoder \
    --device "$DEV" --precision "$PREC" --batch-encoder "$ENC_BATCH" --batch-decoder "$DEC_BATCH" \
    --iters "$((ITERS * 2))" --warmup "$WARM"
else
  printf '%s\tSKIP\t-\t0\t0\n' torch-encdec >> "$STEPS"
fi

# ---- 5b. the data-parallel training path on this device: 2 ranks sharing it (TCP backend: NCCL refuses
#          two ranks on one GPU) against one process, same global batch; the losses must agree
DPM=$WORK/dp-model.json
cat > "$DPM" <<'JSON'
{"input_size": 16, "in_channels": 48, "hidden_size": [64, 96], "depth": [2, 1], "num_heads": [4, 4],
 "num_classes": 100, "mlp_ratio": 4.0, "use_qknorm": false, "use_swiglu": true, "use_rope": true,
 "use_rmsnorm": true, "wo_shift": false, "use_pos_embed": true}
JSON
DP_ARGS=(--model-config "$DPM" --global-batch 8 --steps 3 --seed 3 --device "$DEV" --precision f32 --json)
rm -rf "$WORK/dpcache" "$WORK/dp1" "$WORK/dp2"
run_step dp-cache 60 "$BIN" build "$WORK/images" --encoder "$FIX/encoder-dinov2reg" --out "$WORK/dpcache" \
  --device "$DEV" --limit 32 --json
run_step dp-one 60 "$BIN" train --data "$WORK/dpcache" --out "$WORK/dp1" --batch-size 8 "${DP_ARGS[@]}"
run_step dp-two 90 env RAE_DIST_BACKEND=tcp "$BIN" launch --nproc-per-node 2 --master-port "${DP_PORT:-29531}" -- \
  train --data "$WORK/dpcache" --out "$WORK/dp2" --batch-size 4 "${DP_ARGS[@]}"

# ---- 6. if time is left: our training step in plain f32 (no autocast) at the same batch
if [ "$TRAIN_PREC" != f32 ]; then
  run_step train-f32 90 "$BIN" bench train --preset "$TRAIN_MODEL" --batch "$TB" --iters 2 --warmup 1 \
    --device "$DEV" --precision f32
fi

cleanup
SMI_PID=

# ---- the table
"$PY" - "$RES" "$SMOKE" "$BUILD_IMAGES" "$(($(date +%s) - T0))" > "$RES/table.md" <<'PY'
import datetime, glob, json, os, re, sys

res, smoke, build_images, total_s = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
steps = {}
for line in open(os.path.join(res, "steps.tsv")):
    n, st, rc, s, e = line.rstrip("\n").split("\t")
    steps[n] = dict(status=st, rc=rc, start=float(s), end=float(e))

def last_json(name, what=None):
    p = os.path.join(res, name + ".out")
    if not os.path.exists(p):
        return None
    out = None
    text = open(p).read()
    objs = []
    try:
        objs = [json.loads(text)]  # `build --json` prints one pretty object
    except ValueError:
        for l in text.splitlines():
            try:
                objs.append(json.loads(l))
            except ValueError:
                pass
    for o in objs:
        if isinstance(o, dict) and (what is None or o.get("what") == what):
            out = o
    return out

# nvidia-smi samples: (epoch, util %, memory MiB)
samples = []
smi = os.path.join(res, "smi.csv")
if os.path.exists(smi):
    for l in open(smi):
        f = [x.strip() for x in l.split(",")]
        try:
            ts = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((ts, float(f[1]), float(f[2])))
        except (ValueError, IndexError):
            pass

def gpu_during(name):
    s = steps.get(name)
    if not s or not samples:
        return None
    w = [x for x in samples if s["start"] <= x[0] <= s["end"]]
    if not w:
        return None
    return dict(idle=sum(1 for x in w if x[1] == 0) / len(w), util=sum(x[1] for x in w) / len(w),
                mem_gib=max(x[2] for x in w) / 1024, n=len(w))

def st(name):
    s = steps.get(name)
    return s["status"] if s else "SKIP"

def fmt(v, unit=""):
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:,.0f}{unit}"
    return f"{v:.3g}{unit}"

def rate(o):
    return o.get("images_per_s") if o and "error" not in o else None

def verdict(ok):
    return "–" if ok is None else ("met" if ok else "NOT met")

rows = []
# 1. parity
par = sorted(n for n in steps if n.startswith("parity-"))
for n in par:
    txt = open(os.path.join(res, n + ".out")).read() if os.path.exists(os.path.join(res, n + ".out")) else ""
    m = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", txt)
    counts = f"{sum(int(x[0]) for x in m)} passed, {sum(int(x[1]) for x in m)} failed, {sum(int(x[2]) for x in m)} ignored" if m else ""
    rows.append(("1", n[len("parity-"):], st(n), counts, "", "all pass", "PASS" if st(n) == "OK" else st(n)))

enc, tenc = last_json("encoder", "encoder"), last_json("torch-encdec", "encoder")
g = gpu_during("encoder")
enc_label = ("tiny DINOv2-reg" if smoke else "DINOv2-B-reg") + (f" b{enc['batch']} {enc['precision']}" if enc else "")
rows.append(("2", "encoder " + enc_label, st("encoder"),
             fmt(rate(enc), " img/s"), fmt(rate(tenc), " img/s"), ">= 5,000 img/s",
             verdict(None if rate(enc) is None or smoke else rate(enc) >= 5000)
             + (f"; params {enc['params']:,}" if enc else "") + (f" / PyTorch {tenc['params']:,}" if tenc and "params" in tenc else "")
             + (f"; GPU mem {g['mem_gib']:.1f} GiB" if g else "")))

b = last_json("build")
bs = steps.get("build")
wall = bs["end"] - bs["start"] if bs and bs["status"] == "OK" else None
e2e = build_images / wall if wall else None
g = gpu_during("build")
note = f"{build_images} images in {wall:.1f} s wall" if wall else ""
if b:
    note += f"; build's own figure {b.get('images_per_second', 0):,.0f} img/s"
if g:
    note += f"; GPU idle {100 * g['idle']:.0f}% of {g['n']} samples, mean util {g['util']:.0f}%"
elif not smoke:
    note += "; no nvidia-smi samples"
rows.append(("3", "whole build (synthetic JPEGs, hflip both, encoder bf16)", st("build"),
             fmt(e2e, " img/s"), "", ">= 3,000 img/s", verdict(None if e2e is None or smoke else e2e >= 3000) + "; " + note))

tr, ttr = last_json("train", "train"), last_json("torch-train", "train")
g = gpu_during("train")
if tr:
    search = ", ".join(f"{x['batch']}:{'ok' if x['ok'] else ('OOM' if x.get('out_of_memory') else 'err')}"
                       for x in tr.get("max_batch_search", []))
    note = f"{tr['seconds_per_iter']:.3f} s/step at batch {tr['batch']} ({tr['precision']} compute, f32 masters); params {tr['params']:,}"
    if ttr and "error" not in ttr:
        note += f"; PyTorch {ttr['seconds_per_iter']:.3f} s/step, params {ttr['params']:,}"
        if ttr.get("peak_device_bytes"):
            note += f", peak {ttr['peak_device_bytes'] / 2**30:.1f} GiB"
    note += f"; batches tried {search}"
    if g:
        note += f"; GPU mem peak {g['mem_gib']:.1f} GiB"
else:
    note = ""
ok = None if rate(tr) is None or rate(ttr) is None else rate(tr) >= rate(ttr)
rows.append(("4", "train " + ("tiny DiT-DH" if smoke else "DiT-DH-XL") + " step", st("train"), fmt(rate(tr), " img/s"),
             fmt(rate(ttr), " img/s") if ttr else st("torch-train"), ">= PyTorch", verdict(ok) + "; " + note))

tf = last_json("train-f32", "train")
if "train-f32" in steps:
    rows.append(("4b", "train DiT-DH-XL step, f32 weights (trainer today)", st("train-f32"), fmt(rate(tf), " img/s"), "", "",
                 f"{tf['seconds_per_iter']:.3f} s/step at batch {tf['batch']}" if tf else ""))

dec, tdec = last_json("decoder", "decoder"), last_json("torch-encdec", "decoder")
g = gpu_during("decoder")
rows.append(("5", "decoder " + ("tiny" if smoke else "ViT-XL") + (f" b{dec['batch']} {dec['precision']}" if dec else ""), st("decoder"),
             fmt(rate(dec), " img/s"), fmt(rate(tdec), " img/s"), "", (f"params {dec['params']:,}" if dec else "")
             + (f" / PyTorch {tdec['params']:,}" if tdec and 'params' in tdec else "") + (f"; GPU mem {g['mem_gib']:.1f} GiB" if g else "")))

one, two = last_json("dp-one"), last_json("dp-two")
l1 = one["last"]["loss"] if one and one.get("last") else None
l2 = two["last"]["loss"] if two and two.get("last") else None
agree = None if l1 is None or l2 is None else abs(l1 - l2) <= 1e-4 * abs(l1)
rows.append(("6", "data-parallel train: 2 ranks on one device (TCP) vs 1 process, global batch 8, f32, 3 steps",
             st("dp-two"), f"loss {l2:.6f}" if l2 is not None else "–", "", "same loss (1e-4 rel)",
             verdict(agree) + (f"; one process {l1:.6f}" if l1 is not None else "")))

print(f"## rae-cache GPU check ({'CPU smoke run, tiny shapes' if smoke else 'GPU'}; {total_s} s)\n")
print("| # | check | step | ours | PyTorch | goal | verdict / notes |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
bad = [n for n, s in steps.items() if s["status"] != "OK"]
print("\nsteps not OK: " + (", ".join(n + " (" + steps[n]["status"] + ")" for n in bad) or "none"))
PY
cat "$RES/table.md"
echo "results: $RES" >&2
