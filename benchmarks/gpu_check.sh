#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA GPUs and raptorz installed:
# the tests marked requires_cuda (the hot loop under torch.cuda.set_sync_debug_mode
# "error", device-side preparation against the CPU's), then DINOv2-L bf16 slices/s of
# the bare forward, the kernel and `raptorz embed` on one and on every visible GPU.
# Extra arguments go to bench_embed.py (e.g. --gpu-volumes 32 --batches 64 128).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
timeout 300 python -m pytest -q -m requires_cuda -p no:cacheprovider tests/
tests=$?
timeout 540 python benchmarks/bench_embed.py --gpu "$@"
bench=$?
echo "requires_cuda tests: exit $tests; bench_embed --gpu: exit $bench"
exit $(( tests || bench ))
