#!/usr/bin/env bash
# Every benchmark in benchmarks/ at realistic sizes on one GPU, in one go (9 minutes at most).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine: bf16, 512-1024 px, 20 steps
#   bash benchmarks/gpu_check.sh --tiny       # anywhere, CPU: the same runs on tiny models (or GPU_CHECK_TINY=1)
#   bash benchmarks/gpu_check.sh --dry-run    # print the commands and the budget, run nothing
#
# Each benchmark's output (stdout and stderr) goes to $OUT/<name>.log when $OUT is set, else to
# ./gpu-check-out/<name>.log; summary.log lists each one's exit code and seconds. The exit code is
# non-zero when any benchmark failed or ran out of its time.
#
#   preview_overhead_{sd,sdxl,flux}  benchmarks/preview_overhead.py --models large: random-weight models of
#                        the real widths (benchmarks/realistic_models.py: SD 1.5 and SDXL whole, Flux at its width
#                        with 2+4 blocks and a 4-layer T5-XXL), bf16, 4 prompts at 512 px (SD) / 1024 px (SDXL,
#                        Flux), 20 steps; (a) monitor, (b) the example's reload + one image per call, (c) bare
#                        batched call; peak CUDA memory of a training-like run with and without the monitor.
#   brisque_throughput   ours on the GPU, 16 images of 1024 px (the reference runs on the CPU if installed).
#   distributed_render   a CPU benchmark (gloo, Accelerator(cpu=True)); run here on the machine's CPUs with the
#                        GPU hidden, as a check that it still runs: one GPU cannot show a split over devices.
#
# Needs python3 with torch (CUDA), diffusers >= 0.30, transformers, peft and accelerate ($PYTHON picks another
# interpreter; .venv/bin/python is used when present). Where diffusers is missing, wheels in $GPU_CHECK_WHEELS
# (default ./.whl) are installed into /tmp/gpu-check-site first. The BRISQUE model must be found offline:
# $LORA_MONITOR_BRISQUE_MODEL, lora-monitor's cache, or benchmarks/data/brisque_live_svr.safetensors (ignored by
# git; copy it there from ~/.cache/lora-monitor/ to carry it to a machine without network).
# Knobs: GPU_CHECK_BUDGET_S (total seconds, default 540), GPU_CHECK_STEPS (20), GPU_CHECK_REPEATS (2),
# GPU_CHECK_MEMORY=1 (also the peak memory of training with and without the monitor: two more children per family,
# which overran the caps on the first GPU run; off by default), GPU_CHECK_MEMORY_EXAMPLE=1 (with it, the example's
# too: one more child per family), GPU_CHECK_WORK (a folder
# for the model folders, default the system's temporary folder).
set -u -o pipefail

CALLER_DIR=$(pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)

TINY=${GPU_CHECK_TINY:-0}
DRY=0
for arg in "$@"; do
    case "$arg" in
        --tiny) TINY=1 ;;
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --tiny, --dry-run or --help)" >&2; exit 2 ;;
    esac
done

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
OUT_DIR=${OUT:-$CALLER_DIR/gpu-check-out}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${LORA_MONITOR_BRISQUE_MODEL:-}" ] && [ -f "$ROOT/benchmarks/data/brisque_live_svr.safetensors" ]; then
    export LORA_MONITOR_BRISQUE_MODEL="$ROOT/benchmarks/data/brisque_live_svr.safetensors"
fi
WORK=()
[ -n "${GPU_CHECK_WORK:-}" ] && WORK=(--work-dir "$GPU_CHECK_WORK")
MEMORY=(--no-memory)
[ "${GPU_CHECK_MEMORY:-0}" = 1 ] && MEMORY=()
[ "${GPU_CHECK_MEMORY:-0}" = 1 ] && [ "${GPU_CHECK_MEMORY_EXAMPLE:-0}" = 1 ] && MEMORY=(--memory-example)

if [ "$TINY" = 1 ]; then
    # The same code paths (bf16 weights and autocast, every family, the memory children) on tiny models, CPU.
    MODE="tiny (CPU)"
    PREVIEW=(--device cpu --dtype bfloat16 --models tiny --resolution 32 --prompts 2 --steps 2 --repeats 1 --memory-example)
    BRISQUE=(--device cpu --size 128 --count 4 --repeats 1 --threads 1)
    DISTRIBUTED=(--model tiny --size 32 --prompts 4 --steps 2 --repeats 1 --threads 2)
    # name, seconds at most (the tiny runs are slow only on a busy 2-core machine)
    LIMITS=(brisque_throughput=120 distributed_render=240 preview_overhead_sd=240 preview_overhead_sdxl=240 preview_overhead_flux=240)
    BUDGET=${GPU_CHECK_BUDGET_S:-1080}
else
    MODE="GPU"
    STEPS=${GPU_CHECK_STEPS:-20}
    REPEATS=${GPU_CHECK_REPEATS:-2}
    PREVIEW=(--device cuda --dtype bfloat16 --models large --prompts 4 --batch-size 4 --steps "$STEPS" --repeats "$REPEATS" "${MEMORY[@]}")
    BRISQUE=(--device cuda --size 1024 --count 16 --repeats 3)
    DISTRIBUTED=(--model tiny --prompts 8 --steps 4 --repeats 2 --threads 8)
    # first GPU run (H200): BRISQUE 16 s; timings alone SD 55 s, Flux 59 s, SDXL more than 98 s (build 13-15 s)
    LIMITS=(brisque_throughput=45 distributed_render=75 preview_overhead_sd=90 preview_overhead_sdxl=200 preview_overhead_flux=120)
fi

declare -A LIMIT
for entry in "${LIMITS[@]}"; do LIMIT[${entry%%=*}]=${entry#*=}; done

bench_command() {  # sets CMD to the benchmark's command line
    case "$1" in
        brisque_throughput) CMD=("$PYTHON" benchmarks/brisque_throughput.py "${BRISQUE[@]}") ;;
        distributed_render) CMD=(env CUDA_VISIBLE_DEVICES= "$PYTHON" benchmarks/distributed_render.py "${DISTRIBUTED[@]}") ;;
        preview_overhead_*) CMD=("$PYTHON" benchmarks/preview_overhead.py --family "${1#preview_overhead_}" "${PREVIEW[@]}" "${WORK[@]}") ;;
    esac
}

NAMES=(brisque_throughput distributed_render preview_overhead_sd preview_overhead_sdxl preview_overhead_flux)

if [ "$DRY" = 1 ]; then
    echo "mode $MODE; budget ${BUDGET} s; logs to $OUT_DIR"
    for name in "${NAMES[@]}"; do bench_command "$name"; echo "[$name, at most ${LIMIT[$name]} s] ${CMD[*]}"; done
    exit 0
fi

mkdir -p "$OUT_DIR" || exit 2
# the default folder ignores itself, so that git (and a copy of the working tree) leaves it out
[ -z "${OUT:-}" ] && [ ! -e "$OUT_DIR/.gitignore" ] && echo '*' >"$OUT_DIR/.gitignore"
SUMMARY="$OUT_DIR/summary.log"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

note "gpu_check: mode $MODE, python $PYTHON, budget ${BUDGET} s, logs in $OUT_DIR"
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
if [ -d "$WHEELS" ] && ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    # a machine without diffusers (the GPU image has torch, transformers, peft, accelerate): install carried wheels
    note "installing the wheels in $WHEELS into /tmp/gpu-check-site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site "$WHEELS"/*.whl >>"$SUMMARY" 2>&1 \
        || { note "installing the wheels failed"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu-check-site"
fi
if [ "$TINY" != 1 ]; then
    # Fail in seconds, not after minutes, where the machine cannot run the check at all.
    if ! preflight=$("$PYTHON" - 2>&1 <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
import diffusers, peft, transformers, accelerate  # noqa: F401
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, {torch.cuda.get_device_name(0)}")
EOF
    ); then
        note "$preflight"
        note "preflight failed: needs a CUDA GPU and diffusers/transformers/peft/accelerate importable by $PYTHON"
        exit 1
    fi
    note "$preflight"
fi

failed=0
start_all=$SECONDS
for name in "${NAMES[@]}"; do
    left=$((BUDGET - (SECONDS - start_all)))
    limit=${LIMIT[$name]}
    [ "$left" -lt "$limit" ] && limit=$left
    log="$OUT_DIR/$name.log"
    if [ "$limit" -le 5 ]; then
        echo "not run: the check's budget of ${BUDGET} s was spent" >"$log"
        note "$(printf '%-24s SKIPPED (budget spent)' "$name")"
        failed=1
        continue
    fi
    bench_command "$name"
    echo "\$ ${CMD[*]}" >"$log"
    started=$SECONDS
    timeout --kill-after=10 "$limit" "${CMD[@]}" >>"$log" 2>&1
    rc=$?
    took=$((SECONDS - started))
    if [ "$rc" = 0 ]; then
        status=ok
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status="TIMED OUT after ${limit} s"
        failed=1
    else
        status="FAILED (exit $rc)"
        failed=1
    fi
    note "$(printf '%-24s %-28s %4d s' "$name" "$status" "$took")"
done
note "total $((SECONDS - start_all)) s; $([ "$failed" = 0 ] && echo 'all benchmarks ran' || echo 'SOME BENCHMARKS FAILED: see their logs')"
exit "$failed"
