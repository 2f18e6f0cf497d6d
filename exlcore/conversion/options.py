"""The EXL2 layouts conversion chooses from, as option strings (proportion:bits b_group g, widest first).

Each linear picks its own option (see optimize.py), so the list only needs to cover the range of bit rates
densely with layouts that spend bits well: a few wider groups first (the most salient input channels, in
act order) over a body of narrower ones, and small groups where few bits need finer scales."""

from exlcore.formats.exl2 import group_layout, layout_bits, parse_option

CANDIDATES = (
    "0.05:3b_64g/0.95:2b_64g",
    "0.05:6b_32g/0.2:3b_64g/0.75:2b_64g",
    "0.25:3b_64g/0.75:2b_64g",
    "0.5:3b_64g/0.5:2b_64g",
    "0.75:3b_64g/0.25:2b_64g",
    "3b_64g",
    "0.1:4b_128g/0.9:3b_128g",
    "0.05:8b_32g/0.95:3b_64g",
    "0.1:4b_32g/0.9:3b_32g",
    "0.3:4b_64g/0.7:3b_64g",
    "0.6:4b_64g/0.4:3b_64g",
    "4b_128g",
    "4b_32g",
    "0.05:8b_32g/0.95:4b_64g",
    "0.1:5b_64g/0.9:4b_64g",
    "0.5:5b_64g/0.5:4b_64g",
    "5b_64g",
    "0.1:6b_128g/0.9:5b_128g",
    "6b_128g",
    "0.1:8b_128g/0.9:6b_128g",
    "8b_128g",
)

# The option whose error calibrates each linear's sensitivity (measure.py): a middle rate.
PROBE = CANDIDATES.index("4b_128g")

# -hb N: the head's fixed option, keyed as ExLlamaV2's head_bits are (6 is the default there too).
HEAD = {
    2: "0.3:4b_32g/0.7:2b_32g",
    3: "0.15:4b_32g/0.85:3b_32g",
    4: "0.15:6b_32g/0.85:4b_32g",
    5: "0.15:6b_128g/0.85:5b_128g",
    6: "0.15:8b_128g/0.85:6b_128g",
    8: "8b_128g",
}


def layout(option: str, in_features: int) -> list[tuple[int, int]]:
    return group_layout(in_features, parse_option(option))


def bits(option: str, in_features: int, out_features: int) -> int:
    return layout_bits(in_features, out_features, layout(option, in_features))
