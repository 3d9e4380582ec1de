#!/usr/bin/env bash
# One GPU session's measurements, in one script: under 8 minutes on an H200, no dataset, no network.
#   1. the GPU's name
#   2. bench/priors.py: extraction images/s and ratio to a bare forward+backward on the shipped CNN (ResNet-18,
#      128 px) and a random ResNet-18 at 64 px (random / shapes inputs); the priors stage vs extraction alone on a
#      Fashion-MNIST-format fixture it writes to a temp folder
#   3. bench/generator.py: generator inference images/s (cpu, cpu64 and paper presets), GAN training images/s of the
#      paper presets (configs/fashion_{lsft,gsft}_paper.yaml: width 64, batch 16) in fp32 and bf16 autocast
#   4. bench/classifier.py: classifier training images/s (ResNet-18, 128 px, batch 32), fp32 and bf16 autocast
#   5. a summary of all of it (bench/device_summary.py), from the JSON files each step writes
#
# Usage: bash bench/device.sh [--device cuda|cpu] [--quick] [--out DIR]
#   --device  cuda (default) or cpu
#   --quick   tiny sizes, one repeat: the same code paths in seconds (tests run `--device cpu --quick`)
#   --out     folder for the JSON results (default: $OUT/device-bench when $OUT is set, else a temp folder,
#             removed at the end)
# A step that fails or passes its time limit ($BENCH_STEP_LIMIT seconds; default 240 on cuda, 3600 on cpu) is
# reported and the others still run; the exit code is then 1. $PYTHON names the interpreter (default python).
# Bad arguments: one line on stderr, exit 2.
set -uo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

device=cuda quick=0 out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) [ $# -ge 2 ] || die "--device needs a value (cuda or cpu)"; device=$2; shift 2 ;;
        --device=*) device=${1#*=}; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a folder"; out=$2; shift 2 ;;
        --out=*) out=${1#*=}; shift ;;
        --quick) quick=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see bash bench/device.sh --help)" ;;
    esac
done
case "$device" in cpu|cuda) ;; *) die "--device: '$device' is not cuda or cpu" ;; esac

cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python}
if [ -z "$out" ]; then
    if [ -n "${OUT:-}" ]; then out=$OUT/device-bench; else out=$(mktemp -d); trap 'rm -rf "$out"' EXIT; fi
fi
mkdir -p "$out" || die "--out: cannot create '$out'"

# seconds per step (a hung step must not eat the GPU session); $BENCH_STEP_LIMIT overrides
if [ "$device" = cuda ]; then limit=${BENCH_STEP_LIMIT:-240}; else limit=${BENCH_STEP_LIMIT:-3600}; fi
if [ "$quick" = 1 ]; then
    priors=(--quick --threads 1)
    generator=(--quick --threads 1)
    classifier=(--quick --threads 1)
elif [ "$device" = cuda ]; then
    priors=(--batches 8 --batch-size 64 --repeats 5 --stage-images 2048 --workers 4 --threads 8)
    generator=(--batch 64 --repeats 10 --train-batch 16)
    classifier=(--steps 20 --repeats 5)
else
    priors=(--threads 1)
    generator=(--threads 1 --repeats 3)
    classifier=(--threads 1)
fi

failed=0
step() {  # step NAME COMMAND...: run with a time limit; on failure say so and go on
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "== $name FAILED (exit $rc$([ $rc -eq 124 ] && echo ", over ${limit}s"))"
        failed=1
    else
        echo "== $name done in $((SECONDS - start)) s"
    fi
}

echo "== gpu"
gpu_check="
import sys, torch
if '$device' == 'cuda' and not torch.cuda.is_available():
    sys.exit('error: --device cuda: no CUDA device here (use --device cpu)')
name = torch.cuda.get_device_name(0) if '$device' == 'cuda' else 'none (--device cpu)'
print(f'gpu: {name} | torch {torch.__version__} | cuda {torch.version.cuda}')
"
timeout "$limit" "$py" -c "$gpu_check" || exit 2
command -v nvidia-smi >/dev/null && [ "$device" = cuda ] && \
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
step priors "$py" bench/priors.py --device "$device" --stage-data fixture --json "$out/priors.json" "${priors[@]}"
step generator "$py" bench/generator.py --device "$device" --train on --json "$out/generator.json" "${generator[@]}"
step classifier "$py" bench/classifier.py --device "$device" --json "$out/classifier.json" "${classifier[@]}"
step summary "$py" bench/device_summary.py "$out"
exit $failed
