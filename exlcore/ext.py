"""The C++/CUDA extension (exlcore/csrc), built with ninja on first use and cached.

EXLCORE_NO_EXTENSION=1 skips it: CUDA models then run the pure-PyTorch reference path (quantized weights are
dequantized once at load). EXLCORE_BUILD_DIR sets the build cache (default: torch's, ~/.cache/torch_extensions).
MAX_JOBS and TORCH_CUDA_ARCH_LIST are honoured as torch documents them.
"""

import os
import sys
from functools import cache
from pathlib import Path

import torch

SOURCES = ["ext.cpp", "qmatmul.cu", "attention.cu", "fused.cu", "gptq.cu"]


@cache
def extension():
    """The compiled module, or None when CUDA is absent, it is switched off, or the build failed (said once)."""
    if os.environ.get("EXLCORE_NO_EXTENSION") == "1" or not torch.cuda.is_available():
        return None
    from torch.utils.cpp_extension import load

    csrc = Path(__file__).parent / "csrc"
    build = os.environ.get("EXLCORE_BUILD_DIR")
    if build:
        Path(build).mkdir(parents=True, exist_ok=True)
    try:
        return load(name="exlcore_ext", sources=[str(csrc / s) for s in SOURCES], build_directory=build,
                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr"],
                    verbose=os.environ.get("EXLCORE_VERBOSE_BUILD") == "1")
    except Exception as e:  # a compiler error is long: one line, then the reference path
        print(f"exlcore: the CUDA extension did not build ({str(e).splitlines()[0]}); using the PyTorch "
              "reference path (EXLCORE_VERBOSE_BUILD=1 shows the build log)", file=sys.stderr)
        return None


def on(t: torch.Tensor):
    """The extension when `t` lives on a GPU and the extension is available, else None (reference path)."""
    return extension() if t.is_cuda else None
