#!/usr/bin/env bash
# The checks a session runs when it is lent a CUDA machine: the CUDA tests, where the step time
# goes (benchmarks/step_profile.py), then the step benchmark on GPT-2 small (fp32 parameters; bf16 parameters with --bf16). Logs and JSON go to
# $OUT (default gpu_out/). Works from a plain checkout: the package is put on PYTHONPATH, and
# wheels in .whl/ (pytorch-optimizer, came-pytorch, to time them beside shine) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider --show-capture=no tests/test_cuda.py 2>&1 | tee "$out/tests.log"
timeout 120 python3 benchmarks/step_profile.py --only adamw c-adamw lion mars-adamw came c-came --per-tensor-form 2>&1 | tee "$out/profile.log"
timeout 60 python3 benchmarks/step_profile.py --only adamw came --paths fused foreach --host 15 >"$out/host.log" 2>&1
timeout 270 python3 -m shine bench --device cuda --paths fused foreach --steps 20 --json "$out/bench_fp32.json" \
    2>&1 | tee "$out/bench_fp32.log"
if [[ "${1:-}" == "--bf16" ]]; then
    python3 -m shine bench --device cuda --param-dtype bf16 --paths fused foreach --no-external --steps 30 \
        --json "$out/bench_bf16.json" 2>&1 | tee "$out/bench_bf16.log"
fi
