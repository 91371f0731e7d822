#!/usr/bin/env bash
# The project's GPU check (issue: the users train on GPUs). On a machine with a CUDA GPU:
#   1. installs what the machine lacks of the project's own dependency list (pyproject.toml),
#      from $WHEELS (a folder of wheels, for machines without a package registry) or the registry;
#   2. runs every recipe's --smoke on the GPU (the test suite's recipe smoke runs, with
#      trainer.accelerator=gpu and CIFAR-10 read from a small copy);
#   3. times the supernet training step (benchmarks/supernet_throughput.py) on the GPU in fp32 and
#      bf16-mixed, for the ImageNet and the CIFAR-sized layouts;
#   4. times recipes/ofa_supernet_cifar10.yaml for a few hundred steps, fp32 and bf16-mixed.
# On a machine without one it says so and exits 0.
#
#   benchmarks/gpu_check.sh [OUT_DIR]      (default: gpu_check_out)
#
# Environment: PYTHON (default python3), WHEELS (wheel folder), GPU_CHECK_DATA (a CIFAR-10 arrays
# folder; default: a subset of ../shared/data/cifar10 written into OUT_DIR).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-gpu_check_out}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU here (torch is missing or torch.cuda.is_available() is false); nothing to check."
    exit 0
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" | tee "$OUT/device.txt"

# 1. the project's dependencies the machine lacks
missing=$("$PYTHON" - <<'PY'
import importlib.metadata as metadata, tomllib
from packaging.requirements import Requirement
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for line in project["dependencies"]:
    requirement = Requirement(line)
    try:
        if not requirement.specifier.contains(metadata.version(requirement.name), prereleases=True):
            print(line)
    except metadata.PackageNotFoundError:
        print(line)
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: installing what this machine lacks:" $missing
    source_args=()
    [ -n "${WHEELS:-}" ] && source_args=(--no-index --find-links "$WHEELS")
    # shellcheck disable=SC2086 # one requirement per line
    if ! "$PYTHON" -m pip install -q "${source_args[@]}" $missing; then
        echo "gpu_check: could not install the dependencies above (set WHEELS to a folder of wheels)" >&2
        exit 1
    fi
fi

# the data: a small class-balanced CIFAR-10 copy
DATA=${GPU_CHECK_DATA:-}
if [ -z "$DATA" ]; then
    if [ ! -f ../shared/data/cifar10/train.npz ]; then
        echo "gpu_check: set GPU_CHECK_DATA to a CIFAR-10 arrays folder (benchmarks/cifar10_subset.py writes one)" >&2
        exit 1
    fi
    DATA="$OUT/cifar10_subset"
    "$PYTHON" benchmarks/cifar10_subset.py ../shared/data/cifar10 "$DATA" --train 8000 --test 2000
fi
DATA=$(cd "$DATA" && pwd)
status=0

# 2. every recipe's --smoke on the GPU
LIGHTNING_NAS_SMOKE_ACCELERATOR=gpu LIGHTNING_NAS_SMOKE_CIFAR10="$DATA" LIGHTNING_NAS_SMOKE_SECONDS=600 \
    "$PYTHON" -m pytest tests/test_recipes.py -k recipe_runs_with_smoke -q -p no:cacheprovider -rs \
    2>&1 | tee "$OUT/smoke.txt" | tail -25 || status=1

# 3. training-step throughput
for space in ofa_mbv3 ofa_mbv3_cifar; do
    for precision in 32 bf16-mixed; do
        "$PYTHON" benchmarks/supernet_throughput.py --device cuda --space "$space" --precision "$precision" \
            --res 32 --batch 256 --num-classes 10 --steps 30 --warmup 5 \
            --json "$OUT/throughput_${space}_${precision}.json" || status=1
    done
done

# 4. the CIFAR-10 supernet recipe for a few hundred steps of its batch size (7,000 training
#    images: 54 steps an epoch; 3 full-network epochs, then 3 expand-phase epochs)
for precision in 32 bf16-mixed; do
    run="$OUT/runs_$precision"
    rm -rf "$run"
    SECONDS=0
    "$PYTHON" -m lightning_nas.cli fit recipes/ofa_supernet_cifar10.yaml vars.runs="$run" data.root="$DATA" \
        data.holdout_size=1000 trainer.accelerator=gpu trainer.precision="$precision" trainer.max_epochs=6 \
        task.bn_recalibration_images=500 \
        "callbacks.progressive_shrinking.init_args.phases=[{name: full, epochs: 3, lr: 0.1}, {name: expand, epochs: 3, lr: 0.05, kernel: [3, 5, 7], depth: [2, 3, 4], expand: [3, 4, 6], subnets_per_step: 2, reorder_channels: true}]" \
        > "$OUT/recipe_$precision.log" 2>&1 || status=1
    batch=$(grep -m1 'run_training_batch' "$run"/ofa_supernet_cifar10/fit-profile.txt 2>/dev/null | awk -F'|' '{print $3, "s x", $4, "steps"}')
    echo "gpu_check: ofa_supernet_cifar10 precision=$precision wall ${SECONDS}s, training batch ${batch:-?}" \
        | tee -a "$OUT/recipe_timing.txt"
    cp "$run"/ofa_supernet_cifar10/phases.csv "$OUT/phases_$precision.csv" 2>/dev/null || true
done

[ $status = 0 ] && echo "gpu_check: passed" || echo "gpu_check: FAILED (see $OUT)"
exit $status
