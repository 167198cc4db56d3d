#!/usr/bin/env bash
# Assemble what scripts/gpu-check.sh needs on a GPU machine that has no network and no Rust:
#   BUNDLE/rae-cache                      the `--features cuda` release binary (stripped)
#   BUNDLE/tests/it                       the integration-test binary built with the same features (stripped)
#   BUNDLE/tests/MODULES                  the test modules gpu-check.sh runs from it, one per line
#   BUNDLE/tests/fixtures/rae-ref/        the reference fixtures they read (RAE_REF_FIXTURES)
#   BUNDLE/scripts/                       gpu-check.sh, torch_ref_bench.py
#   BUNDLE/lib/                           optional: extra shared libraries (LIBS_FROM=DIR copies libcurand*)
# and BUNDLE.tar.xz beside it (the binaries are tens of MB each; xz brings the whole to tens of MB).
#
# usage: scripts/gpu-bundle.sh [BUNDLE_DIR]          (default /tmp/rae-gpu-bundle)
# env:   RAE_BIN     use this binary instead of the one built here
#        CARGO_TARGET_DIR  default /work/target-cuda
#        TESTS       test modules (of tests/it) to run there (default: parity_encoders parity_models parity_sampler
#                    gradients optim)
#        NO_BUILD=1  do not build; take the newest matching binaries from $CARGO_TARGET_DIR/$PROFILE_DIR
#        CPU=1       build without `--features cuda` with plain cargo (a plumbing test of the bundle on a CPU)
#        PROFILE     cargo profile (default release; `dev` makes a quick CPU plumbing bundle)
#        LIBS_FROM   a directory whose libcurand.so* (and anything named in LIBS) is copied to BUNDLE/lib
#
# On the GPU machine the binaries need libcudart.so.13, libcublas(.Lt).so.13 and libcurand.so.10: gpu-check.sh
# points LD_LIBRARY_PATH at PyTorch's site-packages/nvidia/*/lib (CUDA 13 wheels: nvidia/cu13/lib) and at
# BUNDLE/lib; see scripts/build-cuda.sh and the README's GPU build section.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PROJ=$(cd "$HERE/.." && pwd)
B=${1:-/tmp/rae-gpu-bundle}
TESTS=${TESTS:-parity_encoders parity_models parity_sampler gradients optim}
PROFILE=${PROFILE:-release}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda}
case "$PROFILE" in dev) PDIR=debug ;; *) PDIR=$PROFILE ;; esac

# Every integration test is a module of one test binary, `it` (tests/it/main.rs).
targs=(--bin rae-cache --test it)

json=$(mktemp)
trap 'rm -f "$json"' EXIT
if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building (${CPU:+CPU, }profile $PROFILE, target dir $CARGO_TARGET_DIR): rae-cache + tests (it)" >&2
  if [ "${CPU:-0}" = 1 ]; then
    (cd "$PROJ" && cargo build --profile "$PROFILE" "${targs[@]}" --message-format=json-render-diagnostics) > "$json"
  else
    # build-cuda.sh prints a line of its own after cargo: keep only cargo's JSON messages.
    # build-cuda.sh passes --release itself; cargo refuses --profile release beside it.
    prof=(); [ "$PROFILE" = release ] || prof=(--profile "$PROFILE")
    "$HERE/build-cuda.sh" "$PROJ" "${prof[@]}" "${targs[@]}" --message-format=json-render-diagnostics \
      | grep '^{' > "$json"
  fi
fi

# Paths of the executables: from cargo's messages when we built, else the newest on disk.
exe_of() { # $1 = target name, $2 = kind (bin|test)
  local p=""
  if [ -s "$json" ]; then
    p=$(python3 - "$json" "$1" "$2" <<'PY'
import json, sys
path, name, kind = sys.argv[1:]
exe = ""
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target") or {}
    if m.get("reason") == "compiler-artifact" and t.get("name") == name and kind in t.get("kind", []) and m.get("executable"):
        exe = m["executable"]
print(exe)
PY
)
  fi
  if [ -z "$p" ]; then
    if [ "$2" = bin ]; then p=$CARGO_TARGET_DIR/$PDIR/$1; else p=$(ls -t "$CARGO_TARGET_DIR/$PDIR/deps/$1"-* 2>/dev/null | grep -v '\.d$' | head -1 || true); fi
  fi
  [ -n "$p" ] && [ -x "$p" ] || { echo "no executable for $2 $1 (looked in $CARGO_TARGET_DIR/$PDIR)" >&2; return 1; }
  echo "$p"
}

rm -rf "$B"; mkdir -p "$B/tests" "$B/scripts" "$B/lib"
bin=${RAE_BIN:-$(exe_of rae-cache bin)}
cp "$bin" "$B/rae-cache"
cp "$(exe_of it test)" "$B/tests/it"
printf '%s\n' $TESTS > "$B/tests/MODULES"
if command -v strip >/dev/null; then strip --strip-unneeded "$B/rae-cache" "$B/tests/it" 2>/dev/null || true; fi
cp -r "$PROJ/tests/fixtures" "$B/tests/fixtures"
cp "$HERE/gpu-check.sh" "$HERE/torch_ref_bench.py" "$B/scripts/"
if [ -n "${LIBS_FROM:-}" ]; then
  for l in libcurand.so ${LIBS:-}; do cp -L "$LIBS_FROM"/$l* "$B/lib/" 2>/dev/null || echo "note: no $l* in $LIBS_FROM" >&2; done
fi
cat > "$B/BUNDLE.txt" <<EOF
rae-cache GPU check bundle
built: $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(cd "$PROJ" && git rev-parse --short HEAD 2>/dev/null || echo unknown) (profile $PROFILE${CPU:+, CPU build})
run:   bash scripts/gpu-check.sh .      (from this directory; OUT=DIR keeps the results)
EOF
(cd "$(dirname "$B")" && tar -cf - "$(basename "$B")" | xz -T0 -6 > "$B.tar.xz")
du -sh "$B" "$B.tar.xz" >&2
echo "$B"
