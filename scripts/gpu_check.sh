#!/usr/bin/env bash
# Every GPU check of the project in one command, for a machine with a CUDA device (GPU.md's checklist):
# build, GPU tests, the op suite on CUDA tensors, compute-sanitizer, benchmarks, the triton launch-option sweep
# and the kernel profile.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      (OUT_DIR default: $OUT, else ./gpu_check_out)
#
# Each step writes its log under OUT_DIR as it goes and has its own time limit, so a run cut short by a lease
# still leaves every finished step's results (pytest failures stream to OUT_DIR/failures_*.log). Steps run in
# priority order; FSOSR_GPU_STEPS picks a subset (default "build gpu cuda sanitize bench tune profile").
# Other knobs: FSOSR_GPU_BUDGET (seconds for the whole run, default 560), FSOSR_BENCH_FILTER (pytest -k for the
# benchmarks), FSOSR_REBUILD=1 (rebuild even when an extension for this Python exists), TORCH_CUDA_ARCH_LIST
# (default 9.0 here: build only for the GPU at hand), a `.whl/` folder of extra wheels (installed to /tmp/site;
# .whl/ is git-ignored: the device tool sends it only with carry [".whl"]), FSOSR_BENCH_LIMIT / FSOSR_TUNE_LIMIT
# (seconds for those steps, default 300).
#
# The whole list does not fit one 10-minute call (the steps' limits add up to about 30 minutes), and a machine is
# released soon after a call, so every call builds first (an extension without CUDA kernels is rebuilt whatever
# FSOSR_GPU_STEPS says). A plan for a 30-minute lease, one step group per call with FSOSR_GPU_BUDGET=560:
#   1. "build gpu cuda"   2. "build bench" with FSOSR_BENCH_FILTER=test_moe_adapter_layer, FSOSR_BENCH_LIMIT=450
#   3. "build bench" with FSOSR_BENCH_FILTER="not test_moe_adapter_layer", then "profile" / "tune" / "sanitize"
#      as time allows. A step that would get under 40 s is skipped and says so. Put FSOSR_COMMIT=<sha of HEAD> in
#      each command (the machine's copy has no git history) and merge the runs' JSON with
#      `python benchmarks/report.py run1.json run2.json ... --readme README.md --section h100` (rewrites only the
#      README's H100 tables; the prose reading them is updated by hand).
set -u
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
BUDGET=${FSOSR_GPU_BUDGET:-560}
STEPS=${FSOSR_GPU_STEPS:-build gpu cuda sanitize bench tune profile}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
limit() { local want=$1 l; l=$(( $(left) - 10 )); (( l < want )) && want=$l; (( want < 1 )) && want=1; echo "$want"; }
want() { [[ " $STEPS " == *" $1 "* ]] && enough_time "$1"; }
say() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
enough_time() { (( $(left) >= 40 )) || { say "$1 SKIPPED (budget: $(left) s left)"; return 1; }; }
for step in $STEPS; do   # a typo (or "bench,tune") would otherwise run nothing and still say done
  case $step in build|gpu|cuda|sanitize|bench|tune|profile) ;;
    *) echo "FSOSR_GPU_STEPS: unknown step '$step' (steps: build gpu cuda sanitize bench tune profile," \
            "space-separated)"; exit 2 ;;
  esac
done
# Scripts run as `python path/to/script.py` import fsosr from the working tree, as the editable install does.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if compgen -G ".whl/*.whl" > /dev/null; then   # packages the machine lacks (e.g. open_clip_torch), as wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

$PY -c "import open_clip" 2>/dev/null \
  || echo "WARNING: open_clip cannot be imported (carry .whl/?): the CLIP tests and the training-step benchmark fail"
# Built with CUDA kernels? Checked whatever the steps say: without them every cuda provider and test drops out.
has_cuda_build() { $PY -c "from fsosr import _extension; raise SystemExit(0 if _extension.WITH_CUDA else 1)" \
  2>/dev/null; }
if [[ " $STEPS " == *" build "* ]] || ! has_cuda_build; then
  suffix=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  if [[ ! -e fsosr/_C$suffix || ${FSOSR_REBUILD:-0} == 1 ]] || ! has_cuda_build; then
    say "build"
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} FSOSR_CUDA=1 \
      timeout "$(limit 300)" $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT_DIR/build.log" 2>&1 \
      || { tail -40 "$OUT_DIR/build.log"; say "build failed"; exit 1; }
  fi
fi
# fsosr._triton is the kernels/ folder, mapped by the (editable) install; a carried prebuilt extension skips
# the install, so map it by a link then.
$PY -c "import fsosr._triton" 2>/dev/null || ln -sfn ../kernels fsosr/_triton
$PY -m fsosr.info > "$OUT_DIR/info.txt" 2>&1; head -8 "$OUT_DIR/info.txt"   # (tee | head could cut the file)

# pytest-xdist when present: 8 workers, 2 CPU threads each (their fp64 CPU references would oversubscribe).
XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n "${FSOSR_GPU_WORKERS:-8}")
# pytest-timeout when present: one hung test must not take a whole step (a hung CUDA call ignores SIGINT).
TIMEOUT=()
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT=(--timeout "${FSOSR_TEST_TIMEOUT:-120}")
run_pytest() {  # name, limit, pytest args...
  local name=$1 lim=$2; shift 2
  say "$name"
  OMP_NUM_THREADS=2 FSOSR_FAILURE_LOG="$OUT_DIR/failures_$name.log" timeout -s INT -k 15 "$(limit "$lim")" \
    $PY -m pytest -q -p no:cacheprovider "${XDIST[@]}" "${TIMEOUT[@]}" "$@" > "$OUT_DIR/$name.log" 2>&1
  echo "   rc=$? $(tail -1 "$OUT_DIR/$name.log")"
}
want gpu && run_pytest gpu_tests 240 -m gpu tests
want cuda && FSOSR_TEST_DEVICE=cuda run_pytest cuda_suite 240 -m "not gpu" tests/ops tests/nn

if want sanitize; then
  for tool in memcheck initcheck racecheck; do
    say "compute-sanitizer $tool"
    timeout "$(limit 120)" compute-sanitizer --tool "$tool" --print-limit 20 \
      $PY tests/ops/moe_mlp_cuda_sanitize.py > "$OUT_DIR/sanitize_$tool.log" 2>&1
    echo "   rc=$? $(grep -m1 'ERROR SUMMARY' "$OUT_DIR/sanitize_$tool.log")"
  done
fi

if want bench; then
  say "benchmarks"
  FSOSR_BENCH_ROUNDS=${FSOSR_BENCH_ROUNDS:-30} timeout -s INT -k 20 "$(limit "${FSOSR_BENCH_LIMIT:-300}")" \
    $PY -m pytest benchmarks -q -p no:cacheprovider -p no:xdist ${TIMEOUT:+--timeout 300} --benchmark-json="$OUT_DIR/bench.json" \
    --ignore=benchmarks/test_moe_mlp_tuning.py ${FSOSR_BENCH_FILTER:+-k "$FSOSR_BENCH_FILTER"} \
    > "$OUT_DIR/bench.log" 2>&1
  echo "   rc=$? $(tail -1 "$OUT_DIR/bench.log")"
fi
if want tune; then   # launch options of the triton moe_mlp kernels (benchmarks/test_moe_mlp_tuning.py)
  say "triton launch-option sweep"
  FSOSR_BENCH_ROUNDS=${FSOSR_BENCH_ROUNDS:-30} timeout -s INT -k 20 "$(limit "${FSOSR_TUNE_LIMIT:-300}")" \
    $PY -m pytest benchmarks/test_moe_mlp_tuning.py -q -p no:cacheprovider -p no:xdist "${TIMEOUT[@]}" \
    --benchmark-json="$OUT_DIR/tune.json" > "$OUT_DIR/tune.log" 2>&1
  echo "   rc=$? $(tail -1 "$OUT_DIR/tune.log")"
fi
if want profile; then
  say "kernel profile"
  timeout "$(limit 120)" $PY benchmarks/kernel_profile.py > "$OUT_DIR/kernel_profile.txt" 2>&1
  echo "   rc=$?"; grep "###" "$OUT_DIR/kernel_profile.txt"
fi
# The device tool brings back only a few files from $OUT: pack the logs into one archive (bench.json stays apart).
( cd "$OUT_DIR" && shopt -s nullglob && logs=(./*.log ./*.txt) && (( ${#logs[@]} )) \
    && tar czf logs.tgz --remove-files "${logs[@]}" )
say "done; results in $OUT_DIR (logs in logs.tgz)"
