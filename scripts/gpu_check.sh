#!/usr/bin/env bash
# The whole GPU verification in one call, within 5.5 minutes on an H100/H200: build the CUDA kernels
# for this GPU alone, compute-sanitizer memcheck and racecheck over one small case of each CUDA
# kernel (scripts/gpu_sanitize_cases.py), every GPU test (CUDA and Triton, slow ones included),
# then `mvit2-bench --quick` and `mvit2-bench layer --quick` on cuda.
#
#   OUT=/path/to/folder bash scripts/gpu_check.sh        # on the GPU machine
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh        # anywhere: the steps a CPU can do
#
# Every step runs under `timeout` and within an overall budget (GPU_CHECK_BUDGET_S, 330 s, so that
# a rerun fits in a 15-minute device lease); a failed step is recorded and the next one runs (the
# GPU steps are skipped if the build failed). Each step keeps time for those after it, so the tests
# run even when the build and the sanitizers take their whole limits. Without ninja (torch then
# compiles the .cu files one after another: minutes) it stops at once, before building.
# The exit status is 0 only if every step passed. The last lines printed are the device and a
# table of the steps (status, seconds) and the kernels' fractions of the copy floor.
#
# $OUT (default: a new /tmp/gpu_check.XXXXXX) receives at most 8 files: summary.txt, build.log,
# sanitizer.log, tests.log, tests.xml (JUnit), bench.log, bench-ops.json, bench-layer.json.
#
# The script never builds in the tree it is run from: it copies the tracked and untracked,
# not-ignored files (as the device tool sends them) to GPU_CHECK_WORK (default: a new temporary
# folder, removed at the end unless GPU_CHECK_KEEP=1) and builds there in place.
#
# GPU_CHECK_DRY_RUN=1 rehearses without a GPU: the build with MVIT2_NO_CUDA=1, `pytest
# --collect-only` of the GPU selection with a pretend CUDA device (scripts/gpu_check_pytest.py),
# the sanitizer driver with --dry-run (the ops exist; its cases on the CPU kernels) and a tiny
# CPU benchmark whose JSON goes through the same summary. Without a GPU and without
# GPU_CHECK_DRY_RUN=1 it says so in one line and exits 3 at once, building nothing.
#
# Other knobs: PYTHON (default python3), GPU_CHECK_TEST_WORKERS (parallel pytest processes,
# default 8: pytest-xdist workers where installed, else 7 processes over the test files, split by
# file, plus one for the slow tests one after another; 1 runs serially), GPU_CHECK_SELECT (the
# pytest -k expression),
# GPU_CHECK_LIMIT_SCALE (an integer factor on every step's time limit, for a slow machine's
# rehearsal; raise GPU_CHECK_BUDGET_S with it).
# shellcheck disable=SC2329  # the step_* functions and cleanup are called by name ("step_$1", trap)
set -uo pipefail  # not -e: a failing step is recorded, and the script goes on

self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
root="$(cd "$(dirname "$self")/.." && pwd)"
dry="${GPU_CHECK_DRY_RUN:-0}"
[[ "$dry" == 1 ]] || dry=0
in_step=0
[[ "${1:-}" == --step ]] && in_step=1  # one step, run by this script under timeout

# --- No GPU: one line, nothing built, nothing written. -------------------------------------------
if [[ "$dry" == 0 && "$in_step" == 0 ]]; then
  gpu_line=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpu_line="$(timeout 20 nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null \
      | head -1)" || gpu_line=""
  fi
  if [[ -z "$gpu_line" || "$gpu_line" != *,* ]]; then
    why="nvidia-smi lists no GPU"
    command -v nvidia-smi >/dev/null 2>&1 || why="no nvidia-smi on PATH"
    echo "gpu_check.sh: no GPU on this machine ($why): nothing built or run; GPU_CHECK_DRY_RUN=1 rehearses the CPU-possible steps" >&2
    exit 3
  fi
fi

PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
out="${OUT:-}"
[[ -n "$out" ]] || out="$(mktemp -d /tmp/gpu_check.XXXXXX)"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
work="${GPU_CHECK_WORK:-}"
dev_log=""
cleanup() {
  [[ -n "$dev_log" ]] && rm -f "$dev_log"
  [[ "$own_work" == 1 && "${GPU_CHECK_KEEP:-0}" != 1 ]] && rm -rf "$work"
  return 0
}
own_work=0
if [[ "$in_step" == 0 ]]; then
  [[ -n "$work" ]] || { work="$(mktemp -d /tmp/gpu_check_work.XXXXXX)"; own_work=1; }
  dev_log="$(mktemp /tmp/gpu_check_device.XXXXXX)"
  trap cleanup EXIT
fi
mkdir -p "$work" && work="$(cd "$work" && pwd)"
budget="${GPU_CHECK_BUDGET_S:-330}"
# Every test of a CUDA or Triton backend or marked gpu: test_cuda.py, test_triton*.py, the
# [cuda-...] and [triton-...] cases of the shared tests; not this script's own (CPU) tests.
selection="${GPU_CHECK_SELECT:-(cuda or triton or gpu) and not test_gpu_check}"
summary="$out/summary.txt"
start=$SECONDS
deadline=$((start + budget))
[[ "$in_step" == 1 ]] || export PYTHONPATH="$work:$work/scripts${PYTHONPATH:+:$PYTHONPATH}"

names=() statuses=() secs=()
failed=0
record() {  # name status seconds
  names+=("$1") statuses+=("$2") secs+=("$3")
  case "$2" in ok*) ;; *) failed=1 ;; esac
  printf '[gpu_check] %-12s %-28s %4s s\n' "$1" "$2" "$3"
}

# step NAME LIMIT_S RESERVE_S LOG CMD...: CMD under `timeout` (its whole process group), output
# appended to LOG, its limit cut to what is left of the budget less RESERVE_S (kept for the steps
# after it); a step with under 15 s left is skipped.
step() {
  local name=$1 limit=$2 reserve=$3 log=$4
  shift 4
  local scale=${GPU_CHECK_LIMIT_SCALE:-1}
  local left=$((deadline - SECONDS - reserve * scale))
  limit=$((limit * scale))
  if ((left < 15)); then
    record "$name" "skipped (budget spent)" 0
    return 1
  fi
  ((limit > left)) && limit=$left
  {
    echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit} s:"
    printf ' %q' "$@"
    echo
  } >>"$log"
  echo "[gpu_check] $name: started (limit ${limit} s, log $(basename "$log"))"
  local t0=$SECONDS rc
  GPU_CHECK_STEP_LIMIT="$limit" timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local dt=$((SECONDS - t0))
  echo "=== [$name] exit $rc after $dt s" >>"$log"
  if ((rc == 0)); then
    record "$name" ok "$dt"
  elif ((rc == 124 || rc == 137)); then
    record "$name" "TIMEOUT (${limit} s)" "$dt"
    echo "[gpu_check] $name: last lines of $(basename "$log"):"
    tail -n 12 "$log" | sed 's/^/    /'
  else
    record "$name" "FAIL (exit $rc)" "$dt"
    echo "[gpu_check] $name: last lines of $(basename "$log"):"
    tail -n 12 "$log" | sed 's/^/    /'
  fi
  return "$rc"
}

# --- The working copy: what the device tool sends (tracked + untracked-not-ignored files). -------
copy_tree() {
  if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$root" && git ls-files -z -co --exclude-standard \
      | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$work" -xf -
  else
    tar -C "$root" --exclude=.git --exclude=build --exclude='*.so' --exclude='*.o' \
      --exclude=__pycache__ --exclude=.pytest_cache -cf - . | tar -C "$work" -xf -
  fi
}

# --- Steps (each also runs alone as `gpu_check.sh --step NAME`, under timeout). -----------------
step_device() {
  if [[ "$dry" == 0 ]]; then
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm \
      --format=csv,noheader
  else
    echo "dry run: no GPU used"
  fi
  "$PY" - <<'EOF'
import platform
import sys

import torch

try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
      f" triton {triton_version}")
if cuda:
    p = torch.cuda.get_device_properties(0)
    print(f"torch sees {torch.cuda.get_device_name(0)}, capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
import os
if os.environ.get("GPU_CHECK_DRY_RUN") != "1" and not cuda:
    sys.exit("torch sees no CUDA device (a CPU build of torch?)")
EOF
}

step_build() {
  cd "$work" || return 1
  local jobs
  jobs="$(nproc 2>/dev/null || echo 4)"
  if [[ "$dry" == 1 ]]; then
    MVIT2_NO_CUDA=1 MVIT2_CPU_ISA=native MAX_JOBS="$jobs" "$PY" setup.py build_ext --inplace || return
  else
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$GPU_CHECK_ARCH" MVIT2_CPU_ISA=native MAX_JOBS="$jobs" \
      "$PY" setup.py build_ext --inplace || return
  fi
  "$PY" -c '
import sys
import mvit2_kernels.backends as b
print("built:", "compiled_cuda", b.compiled_cuda(), "cpu_isa", b.cpu_isa(),
      "backends", b.available_backends())
sys.exit(0 if b.compiled_cuda() or sys.argv[1] == "1" else "the CUDA kernels are not in _C")
' "$dry"
}

sanitizer() {  # the compute-sanitizer executable, or nothing
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -n "$c" && -x "$c" ]] && { echo "$c"; return 0; }
  done
  return 1
}

step_sanitize() {  # memcheck | racecheck
  cd "$work" || return 1
  if [[ "$dry" == 1 ]]; then
    echo "dry run: would run compute-sanitizer --tool $1 --error-exitcode 86 over the cases"
    "$PY" scripts/gpu_sanitize_cases.py --dry-run
    return
  fi
  local cs
  cs="$(sanitizer)" || { echo "compute-sanitizer not found (PATH, CUDA_HOME)"; return 2; }
  # Each tensor its own cudaMalloc: memcheck sees an access past a tensor's end. Only the
  # kernels' own errors count (not CUDA API return codes, which torch probes on purpose).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$1" --error-exitcode 86 --report-api-errors no \
    --print-limit 50 "$PY" scripts/gpu_sanitize_cases.py
}

step_tests() {
  cd "$work" || return 1
  # -m "slow or not slow": the slow tests explicitly, which CI (scripts/test.sh) deselects.
  local args=(-k "$selection" -p gpu_check_pytest -p no:cacheprovider -q -rfEs)
  if [[ "$dry" == 1 ]]; then
    # Pretend a CUDA device so that the [cuda-...] cases are collected too (collection only).
    GPU_CHECK_PRETEND_CUDA=1 "$PY" -m pytest tests "${args[@]}" -m "slow or not slow" --collect-only
    return
  fi
  "$PY" -c 'import pytest_timeout' 2>/dev/null && args+=(--timeout=240)
  local workers="${GPU_CHECK_TEST_WORKERS:-8}"
  export GPU_CHECK_SLOW_GROUP=1  # slow tests: one at a time, each giving its memory back
  if ((workers <= 1)); then
    "$PY" -m pytest tests "${args[@]}" -m "slow or not slow" --junitxml="$out/tests.xml" \
      --durations=15
  elif "$PY" -c 'import xdist' 2>/dev/null; then
    "$PY" -m pytest tests "${args[@]}" -m "slow or not slow" --junitxml="$out/tests.xml" \
      --durations=15 -n "$workers" --dist loadgroup
  else
    test_shards "$((workers - 1))" "${args[@]}"
  fi
}

# test_shards N PYTEST_ARGS...: without pytest-xdist, N background pytest processes over the test
# files (largest first, dealt round-robin) with -m "not slow", and one more for every slow test
# in turn (tens of GB of GPU memory each: never two at once). Each stops 15 s before the step's
# limit so that the logs and JUnit XMLs are merged into tests.log and tests.xml even then.
test_shards() {
  local n=$1 shards i j rc=0 status files pids=()
  shift
  shards="$(mktemp -d "$work/.shards.XXXXXX")"
  local limit=$((${GPU_CHECK_STEP_LIMIT:-600} - 15))
  mapfile -t files < <(ls -S tests/test_*.py)
  for ((i = 0; i <= n; i++)); do
    local part=() marks="not slow"
    if ((i == n)); then
      part=(tests) marks="slow"
    else
      for ((j = i; j < ${#files[@]}; j += n)); do part+=("${files[$j]}"); done
    fi
    timeout --kill-after=5 "$limit" "$PY" -m pytest "${part[@]}" "$@" -m "$marks" \
      --junitxml="$shards/$i.xml" >"$shards/$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    status=$?
    echo "=== shard $i ($([[ $i == "$n" ]] && echo slow || echo 'not slow')): exit $status"
    cat "$shards/$i.log"
    ((status == 0 || status == 5)) || rc=1  # 5: the shard's files hold no selected test
  done
  "$PY" - "$out/tests.xml" "$shards"/*.xml <<'EOF' || rc=1
import sys
import xml.etree.ElementTree as ET

merged = ET.Element("testsuites")
totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
for path in sys.argv[2:]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        continue  # a shard killed before it wrote its XML: its log says so
    for suite in root.iter("testsuite"):
        merged.append(suite)
        for key in totals:
            totals[key] += int(suite.get(key, 0))
ET.ElementTree(merged).write(sys.argv[1], encoding="utf-8", xml_declaration=True)
ok = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
print(f"tests ({len(sys.argv) - 2} shards): {ok} passed, {totals['failures']} failed, "
      f"{totals['errors']} errors, {totals['skipped']} skipped")
EOF
  rm -rf "$shards"
  return "$rc"
}

step_bench() {  # ops | layer
  cd "$work" || return 1
  local cmd=() json="$out/bench-$1.json"
  [[ "$1" == layer ]] && cmd=(layer)
  cmd+=(--quick --no-progress --json "$json")
  if [[ "$dry" == 1 ]]; then  # the JSON path only: a tiny CPU run
    if [[ "$1" == ops ]]; then
      cmd+=(--device cpu --no-compile --dtype fp32 --shape "1x16x4x64,1x64x16")
    else
      cmd+=(--device cpu --dtype fp32 --shape 1x16x4x64 --impl "fused-layer,eager")
    fi
  elif [[ "$1" == ops ]]; then
    # No torch.compile baseline here: 24 fresh inductor compiles would take minutes; the copy
    # floor and eager are the kernels' yardsticks (layer keeps its compiled baselines).
    cmd+=(--device cuda --no-compile)
  else
    cmd+=(--device cuda)
  fi
  "$PY" -m mvit2_kernels.bench "${cmd[@]}"
}

if [[ "${1:-}" == --step ]]; then
  shift
  "step_$1" "${@:2}"
  exit
fi

# --- Run. ----------------------------------------------------------------------------------------
# The steps (this script again, with --step) see the same folders and settings.
export OUT="$out" GPU_CHECK_WORK="$work" GPU_CHECK_DRY_RUN="$dry" GPU_CHECK_SELECT="$selection"
: >"$out/build.log"
{
  echo "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)$([[ $dry == 1 ]] && echo ' (dry run)')"
  echo "repo: $root$(git -C "$root" log -1 --format=' at %h %s' 2>/dev/null)"
  git -C "$root" status --short 2>/dev/null | head -20 | sed 's/^/  changed: /'
} >"$summary"
echo "[gpu_check] $([[ $dry == 1 ]] && echo 'DRY RUN: ')out $out, work $work, budget $budget s"

t0=$SECONDS
if copy_tree; then record copy ok $((SECONDS - t0)); else record copy FAIL $((SECONDS - t0)); fi

step device 60 0 "$dev_log" "$BASH" "$self" --step device
GPU_CHECK_ARCH=""
if [[ "$dry" == 0 ]]; then
  cap="$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')"
  [[ "$cap" =~ ^[0-9]+\.[0-9]+$ ]] \
    || cap="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
  GPU_CHECK_ARCH="$cap"
fi
export GPU_CHECK_ARCH
echo "arch: ${GPU_CHECK_ARCH:-none (dry run)}" >>"$dev_log"

built=1
if ! "$PY" -c 'from torch.utils.cpp_extension import is_ninja_available as n; raise SystemExit(not n())' 2>/dev/null; then
  echo "ninja not found: torch would compile the .cu files one after another (minutes); pip install ninja" >>"$out/build.log"
  record ninja "FAIL (not found)" 0
  built=0
fi
# Limits and reserves (seconds kept for the steps after): with the build and both sanitizers at
# their limits (5 + 120 + 35 + 35 s), the tests still get 90 s and the benchmarks 45 s of 330.
((built)) && { step build 120 140 "$out/build.log" "$BASH" "$self" --step build || built=0; }
for what in memcheck racecheck tests bench-ops bench-layer; do
  case "$what" in
    memcheck | racecheck) limit=35 reserve=135 log="$out/sanitizer.log" args=(sanitize "$what") ;;
    tests) limit=140 reserve=45 log="$out/tests.log" args=(tests) ;;
    bench-ops) limit=25 reserve=20 log="$out/bench.log" args=(bench ops) ;;
    bench-layer) limit=20 reserve=0 log="$out/bench.log" args=(bench layer) ;;
  esac
  if ((built)); then
    step "$what" "$limit" "$reserve" "$log" "$BASH" "$self" --step "${args[@]}"
  else
    record "$what" "skipped (build failed)" 0
  fi
done

# --- Summary: device, steps, the kernels against the copy floor. ----------------------------------
{
  echo
  echo "device:"
  grep -v -e '^===' -e '^ /' "$dev_log" | sed 's/^/  /'
  if [[ "$dry" == 1 ]]; then
    echo "selection (pytest -k \"$selection\"): $(grep -E '^[0-9]+(/[0-9]+)? tests? collected' "$out/tests.log" | tail -1)"
  else
    echo "tests: $(grep -E '(passed|failed|error)' "$out/tests.log" 2>/dev/null | grep -v '^=== ' | tail -1)"
  fi
  echo
  printf '%-12s %-28s %7s\n' step status seconds
  for i in "${!names[@]}"; do
    printf '%-12s %-28s %7s\n' "${names[$i]}" "${statuses[$i]}" "${secs[$i]}"
  done
  printf '%-12s %-28s %7s\n' total "$([[ $failed == 0 ]] && echo ok || echo FAILED)" $((SECONDS - start))
  "$PY" - "$out/bench-ops.json" "$out/bench-layer.json" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None

ops, layer = (load(p) for p in sys.argv[1:])
if ops:
    # Per kernel (op, backend, pass): the fraction of the copy floor, per dtype at the training
    # batch (the largest B of the run) and its range over every shape and dtype.
    groups = {}
    for r in ops.get("rows", []):
        if r.get("impl") in ("copy", "eager", "compile") or r.get("floor_fraction") is None:
            continue
        groups.setdefault((r.get("op"), r["impl"], r.get("pass")), []).append(r)
    if groups:
        print("\nkernel fraction of the copy floor (1.0 = copy speed; from bench-ops.json)")
        print(f"{'op':<11}{'backend':<8}{'pass':<17}{'at largest B, per dtype':<36}range")
        for (op, impl, pass_), rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
            top = max(r.get("batch", 0) for r in rows)
            per_dtype = {}
            for r in rows:
                if r.get("batch", 0) == top:
                    per_dtype.setdefault(r.get("dtype"), []).append(r["floor_fraction"])
            at_top = ", ".join(f"{d} {statistics.median(f):.2f}" for d, f in per_dtype.items())
            fr = [r["floor_fraction"] for r in rows]
            print(f"{op!s:<11}{impl:<8}{pass_!s:<17}{at_top:<36}"
                  f"{min(fr):.2f}-{max(fr):.2f} (median {statistics.median(fr):.2f})")
    for s in ops.get("skipped", []):
        print(f"  skipped {s.get('impl')} at {s.get('shape')} {s.get('dtype')}: {s.get('reason')}")
if layer:
    rows = [r for r in layer.get("rows", []) if r.get("impl") not in ("eager", "compile")]
    if rows:
        print("\nlayer speed-ups (from bench-layer.json)")
        for r in rows:
            fig = ", ".join(f"x{r[k]:.2f} {k.removeprefix('speedup_vs_')}"
                            for k in ("speedup_vs_eager", "speedup_vs_compile") if r.get(k))
            print(f"  {r.get('shape')} {r.get('dtype')} {r.get('pass')} {r['impl']}: "
                  f"{r['median_ms']:.3f} ms{', ' + fig if fig else ''}")
    for s in layer.get("skipped", []):
        print(f"  skipped {s.get('impl')} at {s.get('shape')}: {s.get('reason')}")
EOF
} >>"$summary" 2>&1
echo
sed -n '/^device:/,$p' "$summary"
files=("$out"/*)
echo "[gpu_check] ${#files[@]} files in $out: ${files[*]##*/}"
exit "$failed"
