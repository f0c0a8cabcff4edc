#!/usr/bin/env bash
# One device run: install, GPU tests, kernel and decode benchmarks; logs under $OUT.
set -u
export PYTHONUNBUFFERED=1
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
stage=${1:-all}
if [ "$stage" = all ] || [ "$stage" = tests ]; then
  timeout 330 python -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -30
  timeout 200 python -m pytest -q -p no:cacheprovider tests/compiler/test_numerics.py -k cuda 2>&1 | tee "$OUT/gpu_numerics.log" | tail -3
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  timeout 120 python -m infer.benchmarks.fused_kernels --out "$OUT/fused.json" 2>&1 | tail -12
  timeout 150 python -m infer.benchmarks.attention_decode --out "$OUT/attention.json" 2>&1 | tail -12
  timeout 300 python -m infer.benchmarks.decode_step --batch 1 64 --out "$OUT/decode.json" \
    --modes eager piecewise-eager full-eager nopass-piecewise-eager piecewise-inductor nopass-piecewise-inductor 2>&1 | tail -22
fi
