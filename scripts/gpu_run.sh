#!/usr/bin/env bash
# On a GPU machine, from the repository root: parity and throughput of the cuda build
# of examples/gpu_bench (built elsewhere with `make cuda`, carried as target/cuda/carry:
# the program and a compressed libcurand.so.10) and of the PyTorch reference
# (scripts/torch_reference_bench.py), on the same GPU. Needs the NVIDIA driver, python3
# with PyTorch built for CUDA 13 (its nvidia wheels provide libcublas(Lt).so.13; cuRAND
# comes from the carried copy when they lack it), no Rust and no PostgreSQL.
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

# The CUDA 13 runtime libraries of the Python environment's nvidia-* wheels.
LIBS=$(python3 - <<'EOF'
import glob, os, site
roots = list(site.getsitepackages()) + [site.getusersitepackages()]
want = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10")
dirs = []
for r in roots:
    for w in want:
        for p in glob.glob(os.path.join(r, "nvidia", "**", w), recursive=True):
            d = os.path.dirname(p)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$BIN" | grep -q 'libcurand.so.10 => not found'; then
  XZ="$(dirname "$BIN")/libcurand.so.10.xz"
  [ -f "$XZ" ] || { echo "gpu_run: libcurand.so.10 is missing and there is no $XZ"; exit 1; }
  LIBDIR="${TMPDIR:-/tmp}/exceiver-cuda-libs"
  mkdir -p "$LIBDIR"
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$XZ" "$LIBDIR/libcurand.so.10"
  export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$LIBDIR"
fi
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
echo; echo "== PyTorch reference: published Exceiver"
python3 scripts/torch_reference_bench.py --weights fixtures/pretrained_TS_exceiver.safetensors --device "$DEVICE" || status=1
echo; echo "== PyTorch reference: published classifier, parity only"
python3 scripts/torch_reference_bench.py --weights fixtures/pretrained_TS_exceiver_classifier.safetensors \
  --device "$DEVICE" --batches '' --skip-train || status=1
exit $status
