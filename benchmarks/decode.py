"""Decode tokens/s of the exlcore on sys.path, for the Llama-3-8B-shaped EXL2 model of benchmarks/exl2.py (written to
WORK once): the figures benchmarks/ab.sh compares kernel variants by.

    python benchmarks/decode.py WORK [ROUNDS] [LABEL]

Each round decodes 128 tokens after a new 128-token prompt through the Generator (CUDA graphs), as exl2.py's
batch-1 figure, after a round that captures the graphs; then batch 4 and 16 once each, per sequence, as exl2.py's
(exlcore.speed.decode_rate). ROUNDS 0 only writes the model; -1 prints where a batch-1 step's GPU time goes instead
(exl2.py's profile), e.g. per variant with AB_SCRIPT="benchmarks/decode.py $HOME/bench -1".
"""

import statistics
import sys
from pathlib import Path

import torch

from exl2 import SHAPE, decode_profile, decode_rates, write_model

import exlcore
from exlcore.speed import decode_rate


def main():
    work, rounds = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4
    label = sys.argv[3] if len(sys.argv) > 3 else "exlcore"
    folder = work / "exl2-llama8b"
    write_model(folder, SHAPE)
    if rounds == 0:
        return
    model = exlcore.load(folder, device="cuda", dtype=torch.float16)
    g = exlcore.Generator(model, max_seq_len=128 + 128 + 8)
    prompt = torch.randint(0, SHAPE["vocab_size"], (128,), generator=torch.Generator().manual_seed(1)).tolist()
    if rounds < 0:
        print(decode_profile(g, prompt), flush=True)
        return
    rates = decode_rates(g, prompt, 128, rounds)
    del g
    batched = " ".join(f"b{b} {decode_rate(model, b, 128, 128):.1f}" for b in (4, 16))
    print(f"{label}: decode {statistics.median(rates):.1f} tok/s (median; rounds {' '.join(f'{r:.1f}' for r in rates)}); "
          f"{batched}", flush=True)


if __name__ == "__main__":
    main()
