"""Calibration token rows for conversion: a fixed mix of the built-in texts, or the text column of a parquet file.
The built-in wiki text excludes the evaluation slice (data/README.md), so calibration never sees what
`exl eval ppl` scores."""

from pathlib import Path

import torch

from exlcore.errors import ExlError
from exlcore.tokenizer import Tokenizer

CALIBRATION_DIR = Path(__file__).parent / "data" / "calibration"

# Tenths of the rows each built-in source gets; rows come out grouped by source in this order.
MIX = {"wiki": 3, "c4": 2, "code": 2, "multilingual": 1, "technical": 1, "tiny": 1}


def read_parquet_text(path: Path) -> str:
    """The text column ("text" if several) of a parquet file, non-empty rows joined by blank lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ExlError(f"{path}: cannot be read as parquet ({e})") from None
    columns = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if not columns:
        raise ExlError(f"{path}: no text column (columns: {', '.join(table.column_names)}); give a parquet with one")
    column = "text" if "text" in columns else columns[0]
    return "\n\n".join(t for t in table.column(column).to_pylist() if t)


def default_texts() -> dict[str, str]:
    """The six built-in calibration texts by source name."""
    return {name: (CALIBRATION_DIR / f"{name}.utf8").read_text(encoding="utf-8") for name in MIX}


def row_counts(rows: int) -> dict[str, int]:
    """Rows per built-in source: MIX's proportions by largest remainder, at least one each when rows >= 6."""
    total = sum(MIX.values())
    counts = {name: rows * w // total for name, w in MIX.items()}
    by_remainder = sorted(MIX, key=lambda name: -(rows * MIX[name] % total))  # stable: ties keep MIX order
    for name in by_remainder[: rows - sum(counts.values())]:
        counts[name] += 1
    if rows >= len(MIX):
        for name in [n for n, c in counts.items() if c == 0]:
            counts[max(counts, key=counts.get)] -= 1
            counts[name] = 1
    return counts


def _pieces(text: str, size: int = 16_384):
    """Consecutive pieces of `text` of about `size` characters, each ending at a newline where there is one."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _leading_tokens(tokenizer: Tokenizer, text: str, count: int) -> list[int]:
    """The first `count` tokens of `text` (fewer if it runs out). Piece by piece, so a large text costs only the
    tokenizing of what is used; pieces end at newlines, where splitting changes tokens least."""
    ids: list[int] = []
    for piece in _pieces(text):
        if len(ids) >= count:
            break
        ids += tokenizer.encode(piece, add_bos=False)
    return ids[:count]


def calibration_rows(tokenizer: Tokenizer, rows: int, length: int, parquet: Path | None = None) -> torch.Tensor:
    """(rows, length) int64 token ids, contiguous runs of text without BOS. From `parquet`: its text column's
    leading tokens. Otherwise the built-in mix, grouped by source in MIX order (see row_counts)."""
    if rows < 1 or length < 2:
        raise ExlError(f"calibration needs at least 1 row of at least 2 tokens, not {rows} x {length}; raise -r or -l")
    need = rows * length
    if parquet is not None:
        ids = _leading_tokens(tokenizer, read_parquet_text(parquet), need)
        if len(ids) < need:
            raise ExlError(f"{parquet}: {len(ids)} tokens of text, {need} needed for {rows} rows x {length}; "
                           "use fewer rows (-r), shorter rows (-l) or a parquet with more text")
    else:
        ids = []
        texts = default_texts()
        for name, count in row_counts(rows).items():
            if count:
                source = _leading_tokens(tokenizer, texts[name], count * length)
                # A source shorter than its share wraps around to its start: repeated text beats a skewed mix.
                ids += (source * -(-count * length // len(source)))[: count * length]
    return torch.tensor(ids, dtype=torch.int64).view(rows, length)
