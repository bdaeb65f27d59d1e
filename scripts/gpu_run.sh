#!/usr/bin/env bash
# On a GPU machine, from the repository root: parity and throughput of the cuda build
# of examples/gpu_bench (built elsewhere with `make cuda`, carried as target/cuda/carry)
# and of the two PyTorch forms (scripts/torch_reference_bench.py), on the same GPU.
# Needs the NVIDIA driver and python3 with PyTorch built for CUDA 13 (its nvidia wheels
# provide cudart, cuBLAS and cuRAND), no Rust and no PostgreSQL.
#
#   scripts/gpu_run.sh [extra gpu_bench options, e.g. --batches 64,256 --native]
#   GPU_BENCH=path/to/gpu_bench DEVICE=cuda:1 scripts/gpu_run.sh
#   TORCH=0 scripts/gpu_run.sh      without the PyTorch runs
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${GPU_BENCH:-target/cuda/carry/gpu_bench}
[ -x "$BIN" ] || BIN=target/cuda/release/examples/gpu_bench
DEVICE=${DEVICE:-cuda:0}
[ -x "$BIN" ] || { echo "gpu_run: no $BIN (build it with make cuda and carry it here)"; exit 1; }

# The CUDA 13 runtime libraries of the Python environment's nvidia-* wheels (cudart,
# cuBLAS, cuRAND: the GPU machines' PyTorch has them all).
LIBS=$(python3 scripts/cuda_libdirs.py)
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ldd "$BIN" | grep -q 'not found' && { echo "gpu_run: $BIN misses libraries:"; ldd "$BIN" | grep 'not found'; exit 1; }
echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(nvidia-smi not found)"
echo "== libraries of $BIN (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
ldd "$BIN" | grep -E 'not found|libcuda|cublas|curand|cudart|nvrtc'
status=0
echo; echo "== exceiver (candle, CUDA): published Exceiver"
"$BIN" fixtures/pretrained_TS_exceiver.safetensors --device "$DEVICE" "$@" || status=1
echo; echo "== exceiver (candle, CUDA): published classifier, parity only"
"$BIN" fixtures/pretrained_TS_exceiver_classifier.safetensors --device "$DEVICE" --batches 0 --skip-train || status=1
[ "${TORCH:-1}" = 0 ] && exit $status
echo; echo "== PyTorch, dense reference and O(expressed genes): published Exceiver"
python3 scripts/torch_reference_bench.py --weights fixtures/pretrained_TS_exceiver.safetensors --device "$DEVICE" || status=1
echo; echo "== PyTorch, both forms: published classifier, parity only"
python3 scripts/torch_reference_bench.py --weights fixtures/pretrained_TS_exceiver_classifier.safetensors \
  --device "$DEVICE" --batches '' --skip-train || status=1
exit $status
