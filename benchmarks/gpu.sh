#!/usr/bin/env bash
# Stable Cascade on one lent H100/H200, issue 19's measurements in one call (< 8 minutes): the
# released full models at 1024x1024, bfloat16, batch 1 and 4, Stage C 20 steps with CFG + Stage B
# 10 steps + Stage A decode, diffusers vs ours interleaved on identical random weights built on the
# GPU (nothing is downloaded). Time-boxed routes, each printing its tables when done:
#   0. which SDPA kernel (flash, memory-efficient, cuDNN, math) Stage C's attention shapes get in
#      bf16, and each one's time (`sdpa.py`, capped at 60 s);
#   1. eager vs CUDA graphs (`enable_cuda_graphs`, no compiler) vs FP8 Stage C (`enable_fp8`, with
#      graphs; its max error vs bf16 ours on the same seed is the "max |output - ours|" row),
#      batch 1 and 4 (capped at 290 s);
#   2. regional compile (`compile(regional=True)`, one graph per block shape) alone and with CUDA
#      graphs, batch 1 (capped at 170 s).
# Every table reports seconds per image and × diffusers, the first call's compile/capture seconds
# per stage, and Stage C's share of the bf16 peak. Text and JSON go to $OUT (else benchmarks/).
#
#     benchmarks/gpu.sh           # on the GPU machine, from anywhere
#     benchmarks/gpu.sh --tiny    # the same code path on a CPU with tiny models (CUDA-only variants
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

race_variants=(graphs fast+graphs fast+fp8+graphs)
compiled_variants=(fast+regional fast+regional+graphs)
if [[ "${1:-}" == "--tiny" ]]; then
    common=(--device cpu --dtype bfloat16 --setups tiny --repeats 2)
    compiled_variants=(regional regional+graphs)
else
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu_device.txt"
    common=(--device cuda --dtype bfloat16 --setups full --repeats 2)
fi

timeout 60 python3 "$here/sdpa.py" 2>&1 | tee "$out/gpu_sdpa.txt"  # the attention kernel Stage C gets
echo "route 0, SDPA backends: exit ${PIPESTATUS[0]}"

start=$SECONDS
timeout 290 python3 "$here/cascade.py" "${common[@]}" --batches 1 4 --variants "${race_variants[@]}" \
    --json "$out/gpu_cascade.json" 2>&1 | tee "$out/gpu_cascade.txt"
status=${PIPESTATUS[0]}
echo "route 1, eager / CUDA graphs / FP8: exit $status after $((SECONDS - start)) s (124: timed out)"

start=$SECONDS
timeout 170 python3 "$here/cascade.py" "${common[@]}" --batches 1 --variants "${compiled_variants[@]}" \
    --json "$out/gpu_compiled.json" 2>&1 | tee "$out/gpu_compiled.txt"
echo "route 2, regional compile: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s (124: timed out)"
exit "$status"
