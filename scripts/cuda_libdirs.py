#!/usr/bin/env python3
"""Print the folders (colon-separated) of the CUDA 13 runtime libraries that the Python
environment's nvidia-* wheels carry (PyTorch's cu13 wheels: cudart, cuBLAS(Lt),
cuRAND), for LD_LIBRARY_PATH. Used by scripts/gpu_run.sh and scripts/gpu_pg.sh."""
import glob
import os
import site

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
