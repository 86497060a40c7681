#!/usr/bin/env bash
# Stable Cascade on one lent H100/H200, issues 19's and 29's measurements in one call (< 10 minutes):
# diffusers vs ours interleaved on identical random weights built on the GPU (nothing is downloaded),
# bfloat16, batch 1 and 4. Time-boxed routes, each printing its tables when done:
#   0. which SDPA kernel (flash, memory-efficient, cuDNN, math) Stage C's attention shapes get in
#      bf16, and each one's time (`sdpa.py`, capped at 60 s);
#   3. whole pipeline calls (`pipelines.py`): the prior, decoder and combined pipelines of both
#      libraries, the `mid` and `lite` setups, 5 steps per stage, no guidance, batch 1 and 4, with
#      ours / diffusers and ours by phase (text, set-up, each step, Stage A, conversion) (capped at
#      90 s; 300 s with --tiny);
#   1. the released full models at 1024², Stage C 20 steps with CFG + Stage B 10 steps + Stage A:
#      eager vs CUDA graphs (`enable_cuda_graphs`, no compiler) vs FP8 Stage C (`enable_fp8`, with
#      graphs; its max error vs bf16 ours on the same seed is the "max |output - ours|" row),
#      batch 1 and 4 (capped at 270 s);
#   2. regional compile (`compile(regional=True)`, one graph per block shape) alone and with CUDA
#      graphs, batch 1 (capped at 150 s).
# Every table reports seconds (per image) and × diffusers; routes 1 and 2 also the first call's
# compile/capture seconds per stage and Stage C's share of the bf16 peak. Text and JSON go to $OUT
# (else benchmarks/).
#
#     benchmarks/gpu.sh           # on the GPU machine, from anywhere: routes 0, 3, 1, 2
#     benchmarks/gpu.sh 3         # only the named routes, in the order given
#     benchmarks/gpu.sh --tiny    # the same code paths on a CPU with tiny models (CUDA-only variants
#                                 # report "skipped: no CUDA"; a few minutes)
#
# The GPU image has PyTorch but not diffusers (the reference). Carry its wheel: in the repository
# root, with .whl/ git-ignored, `python3 -m pip download --no-deps diffusers==0.42.1 -d .whl`, and
# name .whl in the run's carry list; this script installs what it finds there.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${OUT:-$here}"
mkdir -p "$out"
if compgen -G "$root/.whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$root"/.whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! error=$(python3 -c "import diffusers, stable_cascade" 2>&1); then
    echo "$error" | tee "$out/gpu_import_error.txt"
    echo "cannot import diffusers or stable_cascade: carry diffusers' wheel (see the top of this script)"
    exit 2
fi

tiny=0
routes=()
for arg in "$@"; do
    case "$arg" in
        --tiny) tiny=1 ;;
        0 | 1 | 2 | 3) routes+=("$arg") ;;
        *) echo "usage: $0 [--tiny] [route ...]  (routes 0 1 2 3; default: 0 3 1 2)"; exit 2 ;;
    esac
done
((${#routes[@]})) || routes=(0 3 1 2)

race_variants=(graphs fast+graphs fast+fp8+graphs)
compiled_variants=(fast+regional fast+regional+graphs)
if ((tiny)); then
    common=(--device cpu --dtype bfloat16 --setups tiny --repeats 2)
    whole=(--device cpu --dtype float32 --setups tiny --repeats 1)  # bf16 is slow on CPUs
    whole_cap=300
    compiled_variants=(regional regional+graphs)
else
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu_device.txt"
    common=(--device cuda --dtype bfloat16 --setups full --repeats 2)
    whole=(--device cuda --dtype bfloat16 --setups mid lite --repeats 3)
    whole_cap=90
fi

status=0
for route in "${routes[@]}"; do
    start=$SECONDS
    case "$route" in
        0)  # the attention kernel Stage C gets
            timeout 60 python3 "$here/sdpa.py" 2>&1 | tee "$out/gpu_sdpa.txt"
            rc=${PIPESTATUS[0]}; what="SDPA backends" ;;
        3)
            timeout "$whole_cap" python3 "$here/pipelines.py" "${whole[@]}" --batches 1 4 \
                --json "$out/gpu_pipelines.json" 2>&1 | tee "$out/gpu_pipelines.txt"
            rc=${PIPESTATUS[0]}; what="whole pipelines" ;;
        1)
            timeout 270 python3 "$here/cascade.py" "${common[@]}" --batches 1 4 \
                --variants "${race_variants[@]}" --json "$out/gpu_cascade.json" 2>&1 | tee "$out/gpu_cascade.txt"
            rc=${PIPESTATUS[0]}; what="eager / CUDA graphs / FP8" ;;
        2)
            timeout 150 python3 "$here/cascade.py" "${common[@]}" --batches 1 \
                --variants "${compiled_variants[@]}" --json "$out/gpu_compiled.json" 2>&1 \
                | tee "$out/gpu_compiled.txt"
            rc=${PIPESTATUS[0]}; what="regional compile" ;;
    esac
    echo "route $route, $what: exit $rc after $((SECONDS - start)) s (124: timed out)"
    ((rc && !status)) && status=$rc
done
exit "$status"
