#!/usr/bin/env bash
# The checks a session runs when it is lent a CUDA machine, in one call of under 10 minutes (run
# it with timeout_s 600; the parts below add up to 570 s at most, --bf16 adds 100: a second call):
# the CUDA tests (about 200 s on an H200), where the step time goes (benchmarks/step_profile.py:
# the GPU's multi-tensor form against itself with a launch per tensor's scale and no CAME stacks;
# the fused path with its graphs first compiled on small tensors, in groups and one tensor per call;
# each row's costliest kernels),
# then the step benchmark on
# GPT-2 small (fp32 parameters; bf16 parameters too with --bf16). Each part has its own time
# limit, and its whole log goes to $OUT (default gpu_out/) with the JSON. Works from a plain
# checkout: the package is put on PYTHONPATH, and wheels in .whl/ (pytorch-optimizer,
# came-pytorch, to time them beside shine) go in first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
profile="python3 benchmarks/step_profile.py"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 230 python3 -m pytest -q -p no:cacheprovider --show-capture=no tests/test_cuda.py 2>&1 | tee "$out/tests.log"
timeout 70 $profile --only adamw c-adamw mars-adamw came --paths foreach --launch-per-scale --kernels 3 2>&1 \
    | tee "$out/profile.log"
timeout 120 $profile --only adamw c-adamw mars-adamw came --paths fused --small-first --single-fused --kernels 3 2>&1 \
    | tee "$out/fused.log"
timeout 150 python3 -m shine bench --device cuda --paths fused foreach --no-extras --steps 15 \
    --json "$out/bench_fp32.json" 2>&1 | tee "$out/bench_fp32.log"
if [[ "${1:-}" == "--bf16" ]]; then
    timeout 100 python3 -m shine bench --device cuda --param-dtype bf16 --paths foreach --no-external --no-extras \
        --steps 20 --json "$out/bench_bf16.json" 2>&1 | tee "$out/bench_bf16.log"
fi
