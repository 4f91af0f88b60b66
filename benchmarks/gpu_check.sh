#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA GPUs and raptorz installed:
# the tests marked requires_cuda (the hot loop under torch.cuda.set_sync_debug_mode
# "error", CUDA fp32/bf16/fp16 against the CPU), then gpu_check.py's one table (accuracy
# per precision and preprocessing, out-of-memory halving under a capped memory fraction,
# the encoder's share of a block, workers' memory and CUDA contexts, DINOv2-L bf16
# slices/s bare and end to end on one and on every visible GPU), then bench_embed.py.
# Extra arguments go to bench_embed.py (e.g. --gpu-volumes 32 --batches 64 128).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
timeout 300 python -m pytest -q -m requires_cuda -p no:cacheprovider tests/
tests=$?
timeout 600 python benchmarks/gpu_check.py
check=$?
timeout 540 python benchmarks/bench_embed.py --gpu "$@"
bench=$?
echo "requires_cuda tests: exit $tests; gpu_check: exit $check; bench_embed --gpu: exit $bench"
exit $(( tests || check || bench ))
