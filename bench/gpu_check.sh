#!/usr/bin/env bash
# One GPU visit: build, GPU tests, sanitizer, the targets benchmark; everything it finds lands in $OUT.
#
#   bash bench/gpu_check.sh visit           # a 15-minute lease in one device call (below)
#   bash bench/gpu_check.sh                 # every step, in order (about 25 minutes at most)
#   bash bench/gpu_check.sh build tests     # only some steps (a device command may run 10 minutes:
#   bash bench/gpu_check.sh sanitizer bench #  split the visit over calls while the machine is warm)
#
# `visit` is for a lease of 15 minutes of device time, the machine's start (1-2 minutes) and the
# transfers included: one device call with timeout_s=600 that runs, most important first, info,
# build, tests (the gpu-marked ones), bench, sanitizer, all inside VISIT_S seconds (default 540).
# With VISIT_S set (visit sets it), every step's limit is cut to the time left before that deadline,
# a step with under 20 s left is skipped (recorded as such), and the targets run gets what is left
# after reserving OVERHEAD_RESERVE_S (90) for the overhead runs: whatever the build costs, the call
# ends inside its limit with the summary and the partial results in $OUT.
#
# Steps: info, build, compile, tests, triton-tests, sanitizer, racecheck, bench (the targets suite and
# `python -m bench overhead`, the eager host overhead per call at small M). A failing step does not stop
# the later ones: each step's exit status is appended to $OUT/summary.txt, and the script exits
# non-zero when any step failed. Each step has a time limit (seconds, below) so that the whole visit
# stays under ~25 minutes of GPU time. No network is needed: the CUTLASS headers come from a carried
# wheel folder .whl/ when present (else the CUDA 2:4 GEMMs are built without them, or skipped).
#
# Files in $OUT (at most 8, as the device tool returns): summary.txt, build.txt (info and build),
# compile-check.txt, gpu-tests.txt, sanitizer.txt (memcheck and racecheck), bench.txt,
# <gpu>-<date>-targets.json and <gpu>-<date>-overhead.json (the benchmark's results, named by GPU and
# date, ready to copy to bench/results/).
#
# The bench step's budget (540 s). The targets suite (`python -m bench --suite targets`: the cells of the
# performance tables of issues 4 and 5, 18 cells, each run by dense, sparsekernels[triton],
# sparsekernels[cuda] and the peers) costs, in a fresh process, a Triton compile and tuning run per new
# tuning key (up to 9 configurations, roughly 10-25 s; about 22 keys: 3 per training-step cell) plus
# about 1.5 s of timing per (cell, implementation): some 5 to 9 minutes, too much beside the quick
# suite, whose CUDA cells it mostly contains (6 of 9; the others, b64 at M=2048 and b64 d0.5 at M=16,
# are no issue's cells): quick is not run here (`make bench` runs it). The targets run gets
# TARGETS_LIMIT_S (400 s) and is then interrupted with SIGINT, on which the harness keeps and writes
# the cells measured so far (run.complete false, exit 130; the cells with a target come first); the
# overhead runs get the rest. Tuning results persist in ~/.cache/sparsekernels while the machine stays
# warm. The targets run writes $BENCH_DIR/results.json as it goes (default /tmp/gpu-check-bench-targets);
# to finish the cells a cut-off first call did not reach, continue it in a second device call with
#   BENCH_RESUME=1 bash bench/gpu_check.sh bench
# which keeps BENCH_DIR and passes --resume (only the missing cells run; results.json gets the union,
# run.complete true once all are in). On a machine that went cold in between, /tmp is gone: set
# BENCH_DIR to a path in the repository (bench/out/targets, git-ignored), carry it into both calls
# (the device tool's `carry`), and copy the first call's $OUT/<gpu>-<date>-targets.json there as
# results.json when the machine did not keep it. A longer suite continues the same way, by hand:
#   timeout -s INT 570 python -m bench --suite full --device cuda --out bench/out/full --no-plots --resume
# in each call (docs/benchmark.md, "Resuming a cut-off run"). A resume across another GPU, torch,
# triton or git commit is refused (the step fails, exit 2): start afresh without BENCH_RESUME.
set -euo pipefail

OUT="${OUT:-$PWD/gpu-check-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
failed=0

# step NAME LIMIT_SECONDS LOG COMMAND...: run COMMAND under a time limit, tee its output to LOG,
# record "NAME rc=N seconds=S" in the summary, and never stop the script.
step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local started rc
    started=$(date +%s)
    if [ -n "$DEADLINE" ]; then
        local left=$(( DEADLINE - started ))
        if [ "$left" -lt 20 ]; then
            echo "$name skipped: ${left}s left of VISIT_S=${VISIT_S}" | tee -a "$SUMMARY"
            return 0
        fi
        if [ "$left" -lt "$limit" ]; then limit="$left"; fi
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    set +e
    # bash -c: the steps below are shell functions (exported), which timeout cannot run directly.
    timeout "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    echo "$name rc=$rc seconds=$(( $(date +%s) - started ))" | tee -a "$SUMMARY"
    if [ "$rc" -ne 0 ]; then failed=1; fi
}

info() {
    nvidia-smi || true
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton missing:", error)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), "sm", f"{props.major}{props.minor}", "SMs", props.multi_processor_count)
EOF
    command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
}

build() {
    # The pinned version lives in one place: csrc/cuda/find_cutlass.py.
    local cutlass
    cutlass=$("$PY" -c "import runpy; print(runpy.run_path('csrc/cuda/find_cutlass.py')['PINNED_VERSION'])")
    if compgen -G ".whl/nvidia_cutlass-$cutlass*.whl" > /dev/null; then
        "$PY" -m pip install --no-deps --no-index .whl/nvidia_cutlass-"$cutlass"*.whl
    else
        echo "no .whl/nvidia_cutlass-$cutlass wheel carried: skipping the CUTLASS headers"
    fi
    # Only the visiting GPU's architecture (arch_list.py makes an H100's 9.0 into 9.0a): the default
    # list would compile every CUDA source for sm_80 as well, about doubling the nvcc time.
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-native}" "$PY" -m pip install --no-build-isolation --no-deps -e .
}

gpu_name_for_file() {
    "$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))" \
        2>/dev/null || echo unknown-gpu
}

bench() {
    local dir="${BENCH_DIR:-/tmp/gpu-check-bench-targets}" stem rc=0 resume=()
    if [ -n "${BENCH_RESUME:-}" ]; then resume=(--resume); else rm -rf "$dir"; fi
    stem="$(gpu_name_for_file)-$(date -u +%Y-%m-%d)"
    local targets_limit="${TARGETS_LIMIT_S:-400}"
    if [ -n "$DEADLINE" ]; then
        # Inside a visit: what is left, less the overhead runs' reserve (at least 60 s).
        local left=$(( DEADLINE - $(date +%s) - ${OVERHEAD_RESERVE_S:-90} ))
        if [ "$left" -lt 60 ]; then left=60; fi
        if [ "$left" -lt "$targets_limit" ]; then targets_limit="$left"; fi
    fi
    echo "targets run limited to ${targets_limit}s"
    # Every sparsekernels backend of the build (sparsekernels[triton], sparsekernels[cuda]) and every peer.
    timeout -s INT -k 30 "$targets_limit" \
        "$PY" -m bench --suite targets --device cuda --out "$dir" --no-plots --no-progress "${resume[@]}" || rc=$?
    if [ -f "$dir/results.json" ]; then
        cp "$dir/results.json" "$OUT/$stem-targets.json"
        echo "results: $OUT/$stem-targets.json"
    fi
    "$PY" -m bench overhead --device cuda --shapes 4096x4096,14336x4096 --layouts b64d0.1,2:4 --m 1,16 \
        --dtype bfloat16 --out "$dir" || rc=$?
    if [ -f "$dir/overhead.json" ]; then cp "$dir/overhead.json" "$OUT/$stem-overhead.json"; fi
    # The host's Python work alone (launches stubbed): its table goes to bench.txt; eager minus
    # this is the launch itself (_common.launch and Triton's launcher).
    "$PY" -m bench overhead --host-only --device cuda --shapes 4096x4096 --layouts b64d0.1,2:4 --m 1,16 \
        --dtype bfloat16 --out "$dir/host-only" || rc=$?
    return "$rc"
}

steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then
    steps=(info build compile tests triton-tests sanitizer racecheck bench)
elif [ "${steps[*]}" = "visit" ]; then
    steps=(info build tests bench sanitizer)
    VISIT_S="${VISIT_S:-540}"
fi
DEADLINE=""
if [ -n "${VISIT_S:-}" ]; then DEADLINE=$(( $(date +%s) + VISIT_S )); fi

export OUT PY BENCH_DIR BENCH_RESUME DEADLINE VISIT_S
export -f info build bench gpu_name_for_file
export PYTHONUNBUFFERED=1

for name in "${steps[@]}"; do
    case "$name" in
        info) step info 60 "$OUT/build.txt" info ;;
        build) step build 480 "$OUT/build.txt" build ;;
        compile) step compile 180 "$OUT/compile-check.txt" "$PY" -m sparsekernels.triton.compile_check --quick ;;
        # The gpu-marked tests of the whole suite (larger shapes, bfloat16, CUDA-only checks).
        tests) step tests 300 "$OUT/gpu-tests.txt" "$PY" -m pytest -q -m gpu tests/ ;;
        # The Triton kernel tests run on CUDA tensors whenever a GPU is present (marked or not).
        triton-tests) step triton-tests 420 "$OUT/gpu-tests.txt" \
            "$PY" -m pytest -q -x tests/test_triton*.py ;;
        # memcheck over a small subset: every kernel family once, bf16, a partial row tile.
        sanitizer) step sanitizer 300 "$OUT/sanitizer.txt" \
            compute-sanitizer --tool memcheck --target-processes all --error-exitcode 1 \
            "$PY" -m pytest -q -x tests/test_triton.py -k "test_matches_dense_reference and bfloat16 and 7 and bias" ;;
        # racecheck (shared-memory hazards) is much slower: one forward and one backward test per family.
        racecheck) step racecheck 300 "$OUT/sanitizer.txt" \
            compute-sanitizer --tool racecheck --target-processes all --error-exitcode 1 \
            "$PY" -m pytest -q -x tests/test_triton.py -k "test_matches_dense_reference and bfloat16 and 7 and nobias and (block32 or nm2:4)" ;;
        bench) step bench 540 "$OUT/bench.txt" bench ;;
        *) echo "unknown step $name (info, build, compile, tests, triton-tests, sanitizer, racecheck, bench; or visit alone)" | tee -a "$SUMMARY"
           failed=1 ;;
    esac
done

echo "--- summary"
cat "$SUMMARY"
exit "$failed"
