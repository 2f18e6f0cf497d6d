"""Picking each linear's option: the least total error whose bits fit the target.

The measured errors are relative perturbations of the residual stream, and independent perturbations add,
so the objective is their sum (ExLlamaV2 instead minimises the largest module error). Every linear chooses
freely among the candidates. The Lagrangian relaxation, min sum(err + lambda * bits), decouples the linears;
bisection on lambda finds the cheapest multiplier that fits the budget, and a greedy pass then spends what
is left on the upgrades with the best error saved per bit.

Options more than BELOW bits under the target are left out: their errors are measured by a linear response
around a 4-bit probe (measure.py), which underestimates the harm of errors that large. On SmolLM2 at 4.0 bpw,
leaving them out cut the KL divergence from the source model by a quarter; at 3.0 and 2.5 bpw it leaves
every option in."""

import math
from dataclasses import dataclass

from exlcore.errors import ExlError

BELOW = 1.0


@dataclass
class Item:
    key: str
    numel: int
    bits: list[int]  # per candidate option
    errors: list[float]


def reachable(items: list[Item]) -> tuple[float, float]:
    numel = sum(i.numel for i in items)
    return sum(min(i.bits) for i in items) / numel, sum(max(i.bits) for i in items) / numel


def check_target(items: list[Item], target: float):
    low, high = reachable(items)
    if not low <= target <= high:
        raise ExlError(f"-b {target}: the options reach {low:.2f} to {high:.2f} bits per weight for this model; "
                       "choose a target in that range")


def choose(items: list[Item], target: float) -> list[int]:
    """The chosen option index per item, with total bits <= target * total weights."""
    check_target(items, target)
    budget = math.floor(target * sum(i.numel for i in items))
    allowed = []
    for i in items:  # always keep the widest option within the target
        floor = min((target - BELOW) * i.numel, max((b for b in i.bits if b <= target * i.numel), default=0))
        allowed.append([o for o, b in enumerate(i.bits) if b >= floor])
    if sum(min(i.bits[o] for o in a) for i, a in zip(items, allowed)) > budget:
        # Linears that cannot reach the target on their own need the others' narrow options.
        allowed = [list(range(len(i.bits))) for i in items]

    def pick(lam: float) -> list[int]:
        return [min(a, key=lambda o: (i.errors[o] + lam * i.bits[o], i.bits[o])) for i, a in zip(items, allowed)]

    def cost(choice: list[int]) -> int:
        return sum(i.bits[o] for i, o in zip(items, choice))

    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget:
        hi *= 4
    for _ in range(100):  # cost(pick(lam)) falls as lam rises: find the smallest lam that fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(pick(mid)) > budget else (lo, mid)
    choice = pick(hi)
    left = budget - cost(choice)
    while True:
        best = None
        for n, (i, o) in enumerate(zip(items, choice)):
            for c in allowed[n]:
                extra, saved = i.bits[c] - i.bits[o], i.errors[o] - i.errors[c]
                if 0 < extra <= left and saved > 0 and (best is None or saved / extra > best[0]):
                    best = (saved / extra, n, c, extra)
        if best is None:
            return choice
        _, n, c, extra = best
        choice[n] = c
        left -= extra
