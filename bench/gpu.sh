#!/usr/bin/env bash
# The GPU day in one command: on a machine with CUDA, check and benchmark everything in priority order, each stage
# under its own time limit (about 6 minutes in all on an H200), writing results as it goes, so a run stopped early
# still leaves what finished.
#
#   bench/gpu.sh                   # every stage; results in $OUT when set, else bench/results/<gpu-name>/
#   bench/gpu.sh --only attention  # one stage: tests, attention, lora, adamw, train, extras (or summary)
#   bench/gpu.sh --dry-run         # on a CPU: every stage with toy shapes and no timing worth reading (CI runs it)
#
# Stages: (1) tests: the kernel tests compiled (no interpreter), fp32, fp16 and bf16 (2) attention, lora, adamw:
# the kernel benchmarks on the committed launch configs (tinygraft/kernels/launch_configs.json) (3) train: GPT-2
# 124M at T = 1024 in bf16, eager and torch.compile (4) extras: the benchmarks of later issues that exist by then.
# Last, summary.md: each figure against its goal in DESIGN §7 (bench/gpu_summary.py).
set -uo pipefail
cd "$(dirname "$0")/.."

STAGES=(tests attention lora adamw train extras summary)
DRY=0
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only)
            ONLY="${2:-}"
            shift
            ;;
        -h | --help)
            sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "bench/gpu.sh: '$1' is not an option (use --only STAGE, --dry-run, --help)" >&2
            exit 2
            ;;
    esac
    shift
done
if [ -n "$ONLY" ] && [[ ! " ${STAGES[*]} " =~ [[:space:]]${ONLY}[[:space:]] ]]; then
    echo "bench/gpu.sh: --only takes one of ${STAGES[*]}, not '$ONLY'" >&2
    exit 2
fi

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
    RESULTS="${OUT:-$(mktemp -d)}/gpu-dry-run"
else
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "bench/gpu.sh: no CUDA GPU here; --dry-run walks the stages on a CPU" >&2
        exit 2
    fi
    RESULTS="${OUT:-bench/results/$("$PY" -c "from bench.common import bench_device, device_slug; print(device_slug(bench_device()))")}"
fi
mkdir -p "$RESULTS"
export BENCH_RESULTS_DIR="$RESULTS"
STATUS="$RESULTS/stages.tsv"
if [ -z "$ONLY" ] || [ ! -f "$STATUS" ]; then printf 'stage\texit\tseconds\tlimit_s\n' >"$STATUS"; fi
echo "results: $RESULTS$([ "$DRY" = 1 ] && echo ' (dry run: toy shapes, timings meaningless)')"
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$RESULTS/gpu.csv"

# stage NAME LIMIT_S COMMAND...: run it under its limit (SIGINT first, so Python writes what it has), log it, go on.
stage() {
    local name="$1" limit="$2"
    shift 2
    if [ -n "$ONLY" ] && [ "$ONLY" != "${name%%:*}" ]; then return 0; fi
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$RESULTS/${name%%:*}.log"
    local rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$STATUS"
    [ "$rc" = 0 ] || echo "== $name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)'); going on"
}

if [ "$DRY" = 1 ]; then
    stage tests 120 "$PY" -m pytest -p no:cacheprovider -q --collect-only tests/kernels
    stage attention 120 "$PY" -m bench.attention --seq 64 --dims 128 --tokens 128 --hidden 128 --budget-s 0.01
    stage lora 120 "$PY" -m bench.lora --quick --budget-s 0.01
    stage lora:segmented 120 "$PY" -m bench.lora_segmented --quick --budget-s 0.01
    stage adamw 120 "$PY" -m bench.adamw --repeats 2
    stage train 120 "$PY" -m bench.train_throughput --preset gpt-tiny --batch 2 --seq 32 --rounds 1 --budget 0.05
else
    # Compiled kernels: conftest.py leaves TRITON_INTERPRET unset where CUDA is; the compile check's own tests
    # need no GPU (CI runs them).
    stage tests 60 env -u TRITON_INTERPRET "$PY" -m pytest -p no:cacheprovider -q tests/kernels \
        --ignore=tests/kernels/test_compile_check.py --junitxml="$RESULTS/kernel-tests.xml"
    stage attention 70 "$PY" -m bench.attention --seq 1024,4096,16384 --dims 64,128 --budget-s 0.2
    stage lora 50 "$PY" -m bench.lora --budget-s 0.3
    stage lora:segmented 45 "$PY" -m bench.lora_segmented --budget-s 0.3
    stage adamw 30 "$PY" -m bench.adamw --repeats 20
    stage train:eager 50 "$PY" -m bench.train_throughput --preset gpt2 --seq 1024 --rounds 2 --budget 1.0
    stage train:compile 50 "$PY" -m bench.train_throughput --preset gpt2 --seq 1024 --rounds 2 --budget 1.0 --compile
fi
for extra in kd_loss peft ddp_scaling; do  # written by later issues; each takes --quick and --budget-s
    if [ -f "bench/$extra.py" ]; then
        limit=45; [ "$extra" = ddp_scaling ] && limit=90  # four torchrun launches, each importing torch twice
        stage extras:$extra $limit "$PY" -m "bench.$extra" $([ "$DRY" = 1 ] && echo --quick --budget-s 0.05)
    elif [ -z "$ONLY" ] || [ "$ONLY" = extras ]; then
        echo "== extras:$extra: bench/$extra.py does not exist yet"
    fi
done
# Activation checkpointing per method, with and without (GPU: GPT-2 124M, B 8 x T 1024, bf16). The dry run takes toy
# shapes and two methods: on a CPU each row's peak comes from the profiler's memory timeline.
stage extras:activation_checkpointing 60 "$PY" -m bench.activation_checkpointing \
    $([ "$DRY" = 1 ] && echo --quick --budget-s 0.05 --batch 2 --seq 32 --methods full,prefix-tuning)
stage summary 30 "$PY" -m bench.gpu_summary "$RESULTS" $([ "$DRY" = 1 ] && echo --dry-run)
failed=$(awk -F'\t' 'NR > 1 && $2 != 0' "$STATUS" | wc -l)
echo "done: $RESULTS/summary.md; $failed stage(s) did not finish cleanly"
[ "$DRY" = 0 ] || [ "$failed" = 0 ]
