"""One of kernels.py's matmul groups at M = 1, five calls: a target for Nsight Compute. For a variant's build:

    AB="headstream+streamall" AB_SCRIPT="benchmarks/one_matmul.py gate/up" AB_PROFILE="/usr/local/cuda/bin/ncu
    --kernel-name regex:stream_kernel --launch-skip 3 --launch-count 1 --section SourceCounters -o $OUT/report"
    bash benchmarks/device.sh ab

then `ncu -i report.ncu-rep --page source --print-source sass --csv` gives each SASS instruction's count."""

import sys

import torch

from exl2 import BODY, SHAPE, random_exl2

from exlcore.ext import extension
from exlcore.formats.qmatrix import QMatmul, matmul


def main():
    ext = extension()
    gen = torch.Generator("cuda").manual_seed(0)
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    shapes = {"gate/up": [(i, h), (i, h)], "down": [(h, i)], "o": [(h, h)]}[sys.argv[1]]
    mats = [QMatmul.exl2(ext, random_exl2(n, k, BODY, gen), "b", k, n) for n, k in shapes]
    x = torch.randn(1, shapes[0][1], device="cuda", generator=gen).half()
    for _ in range(5):
        matmul(mats, x)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
