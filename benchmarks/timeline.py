"""Where a stream-kernel launch spends its time: each CUDA block's %globaltimer at six points (entry, its first copy
issued, after the wait for the kernel before, its first slot landed, the end of its chunk loop, exit), for
kernels.py's Llama-3-8B shapes at M = 1, the matmul alone (50 launches back to back) and after an RMSNorm (as in a
decode step). Needs the stream kernel for every matrix and the `clock` probe:

    AB="headstream+streamall+clock" AB_SCRIPT=benchmarks/timeline.py bash benchmarks/device.sh ab

Each point prints as min / median / max over the launch's blocks, in us from the first block's entry.
"""

import torch

from exl2 import BODY, HEAD, random_exl2
from kernels import graph_time, matmul_groups

from exlcore.ext import extension
from exlcore.formats.qmatrix import QMatmul, matmul

POINTS = ["entry", "copy0", "waited", "slot0", "loopend", "exit"]


def main():
    ext = extension()
    gen = torch.Generator("cuda").manual_seed(0)
    for name, shapes in matmul_groups().items():
        mats = [QMatmul.exl2(ext, random_exl2(n, k, HEAD if name == "head" else BODY, gen), "b", k, n)
                for n, k in shapes]
        x = torch.randn(1, shapes[0][1], device="cuda", generator=gen).half()
        norm = torch.ones(shapes[0][1], device="cuda")
        for mode, fn in (("alone", lambda: matmul(mats, x)),
                         ("after norm", lambda: matmul(mats, ext.rms_norm(x, norm, 1e-5)))):
            t = graph_time(fn)
            c = ext.stream_clock().double()
            c = c[c[:, 0] > c[:, 0].max() - 2e5]  # the last launch's blocks
            c[c == 0] = float("nan")  # points a block never reached
            c = (c - c[:, 0].min()) / 1e3
            cells = " | ".join(f"{p} {col.nanquantile(0):.1f}/{col.nanmedian():.1f}/{col.nanquantile(1):.1f}"
                               for p, col in zip(POINTS, c.T))
            print(f"| {name} | {mode} | {t * 1e6:.1f} | {len(c)} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
