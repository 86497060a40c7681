#!/usr/bin/env bash
# Stable Cascade on one lent H100/H200: the released full and lite models at 1024x1024, bfloat16,
# batch 1 and 4, Stage C 20 steps with CFG + Stage B 10 steps + Stage A decode, diffusers vs ours
# (default, and with set_fast_math) on identical random weights built on the GPU: nothing is
# downloaded. Prints seconds per image, images per second and Stage C's share of the bf16 peak;
# writes the text and JSON to $OUT (else benchmarks/). Under 8 minutes: the eager race is capped
# at 4.5 minutes, the optional run of ours with torch.compile at 3.5: block by block
# (`compile(regional=True)`, mode default, since CUDA graphs need the whole pass, whose compile of
# the full Stage B took over 4 minutes on an H100); full, batch 1, both stages; each stage's table
# is printed when done.
#
#     benchmarks/gpu.sh           # on the GPU machine, from anywhere
#     benchmarks/gpu.sh --tiny    # the same code path on a CPU with tiny models (a few minutes)
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

if [[ "${1:-}" == "--tiny" ]]; then
    common=(--device cpu --dtype bfloat16 --setups tiny --repeats 2)
    race=("${common[@]}" --batches 1 4 --fast-math)
    compiled=("${common[@]}" --batches 1 --compile default --regional)
else
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu_device.txt"
    common=(--device cuda --dtype bfloat16 --repeats 3)
    race=("${common[@]}" --setups lite full --batches 1 4 --fast-math)
    compiled=("${common[@]}" --setups full --batches 1 --compile default --regional)
fi

start=$SECONDS
timeout 270 python3 "$here/cascade.py" "${race[@]}" --json "$out/gpu_cascade.json" 2>&1 | tee "$out/gpu_cascade.txt"
status=${PIPESTATUS[0]}
echo "eager race: exit $status after $((SECONDS - start)) s"

start=$SECONDS
timeout 210 python3 "$here/cascade.py" "${compiled[@]}" --json "$out/gpu_compiled.json" 2>&1 \
    | tee "$out/gpu_compiled.txt"
echo "compiled run: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s (124: timed out; optional)"
exit "$status"
