"""One of kernels.py's matmul groups (q/k/v, o, gate/up, down, head) at M = 1, five calls: a target for Nsight
Compute. For a variant's build:

    AB="headstream+streamall" AB_SCRIPT="benchmarks/one_matmul.py gate/up" AB_PROFILE="/usr/local/cuda/bin/ncu
    --kernel-name regex:stream_kernel --launch-skip 3 --launch-count 1 --section SourceCounters -o $OUT/report"
    bash benchmarks/device.sh ab

then `ncu -i report.ncu-rep --page source --print-source sass --csv` gives each SASS instruction's count."""

import sys

import torch

from exl2 import BODY, HEAD, random_exl2
from kernels import matmul_groups

from exlcore.ext import extension
from exlcore.formats.qmatrix import QMatmul, matmul


def main():
    ext = extension()
    gen = torch.Generator("cuda").manual_seed(0)
    name = sys.argv[1]
    shapes = matmul_groups()[name]
    mats = [QMatmul.exl2(ext, random_exl2(n, k, HEAD if name == "head" else BODY, gen), "b", k, n) for n, k in shapes]
    x = torch.randn(1, shapes[0][1], device="cuda", generator=gen).half()
    for _ in range(5):
        matmul(mats, x)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
