"""Calibration rows: the built-in mix (every source contributes, none of it from the evaluation slice) and
parquet input, with the tiny real tokenizer."""

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from exlcore.calibration import CALIBRATION_DIR, calibration_rows, default_texts, row_counts
from exlcore.errors import ExlError
from exlcore.evaluate import EVALUATION_TEXT
from exlcore.tokenizer import Tokenizer
from tiny import TINY_TEXT


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return Tokenizer(tiny_tokenizer_dir, {})


def text_of(tokenizer, row) -> str:
    # A row may start or end inside a multi-byte character, which decodes to U+FFFD.
    return tokenizer.decode(row.tolist()).strip("\ufffd")


def test_rows_are_int64_deterministic_and_mix_every_source(tokenizer):
    rows = calibration_rows(tokenizer, 10, 64)
    assert rows.shape == (10, 64) and rows.dtype == torch.int64
    assert torch.equal(rows, calibration_rows(tokenizer, 10, 64))
    counts = row_counts(10)
    assert list(counts.values()) == [3, 2, 2, 1, 1, 1]
    texts = default_texts()
    groups = rows.split(list(counts.values()))
    for (name, text), group in zip(texts.items(), groups):
        for row in group:
            assert text_of(tokenizer, row) in text, name


def test_row_counts_keep_proportions_and_every_source():
    assert list(row_counts(100).values()) == [30, 20, 20, 10, 10, 10]
    for rows in range(1, 40):
        counts = row_counts(rows)
        assert sum(counts.values()) == rows
        assert rows < 6 or min(counts.values()) >= 1


def test_calibration_never_sees_the_evaluation_slice(tokenizer):
    calibration_wiki = (CALIBRATION_DIR / "wiki.utf8").read_text(encoding="utf-8")
    evaluation = EVALUATION_TEXT.read_text(encoding="utf-8")
    docs = lambda text: set(re.findall(r'^<doc id="\d+"', text, re.M))  # noqa: E731
    assert docs(calibration_wiki) and docs(evaluation) and not docs(calibration_wiki) & docs(evaluation)
    for row in calibration_rows(tokenizer, 10, 64)[:row_counts(10)["wiki"]]:
        text = text_of(tokenizer, row)
        assert text in calibration_wiki and text not in evaluation


def test_packaged_text_comes_from_the_shared_source():
    """The package's wiki text is a prefix of ../shared/data/wiki.utf8 and its evaluation slice that file's tail,
    with no overlap; its tiny.utf8 (which the tests read) is the shared one byte for byte. Needs the shared folder
    beside the checkout (or EXLCORE_SHARED_DIR), as the project's CI has it."""
    shared = Path(os.environ.get("EXLCORE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")) / "data"
    if not shared.is_dir():
        pytest.skip(f"{shared} not found: the source text to check the packaged copies against")
    wiki = (shared / "wiki.utf8").read_text(encoding="utf-8")
    calibration_wiki = (CALIBRATION_DIR / "wiki.utf8").read_text(encoding="utf-8")
    evaluation = EVALUATION_TEXT.read_text(encoding="utf-8")
    cut = len(wiki) - len(evaluation)
    assert wiki[cut:] == evaluation and len(calibration_wiki) <= cut and wiki.startswith(calibration_wiki)
    assert (shared / "tiny.utf8").read_bytes() == TINY_TEXT.read_bytes()


def test_short_source_wraps_around(tokenizer):
    tiny = default_texts()["tiny"]
    length = len(tokenizer.encode(tiny, add_bos=False)) + 1000  # one row longer than the whole tiny text
    text = text_of(tokenizer, calibration_rows(tokenizer, 6, length)[-1])
    assert text.startswith(tiny[:200]) and text.count(tiny[:200]) == 2


def test_parquet_rows_are_the_leading_tokens_of_its_text(tokenizer, tmp_path):
    pieces = TINY_TEXT.read_text()[200_000:220_000].split("\n\n")
    pq.write_table(pa.table({"id": list(range(len(pieces))), "text": pieces}), tmp_path / "data.parquet")
    rows = calibration_rows(tokenizer, 3, 32, tmp_path / "data.parquet")
    assert rows.shape == (3, 32) and rows.dtype == torch.int64
    assert "\n\n".join(p for p in pieces if p).startswith(tokenizer.decode(rows.flatten().tolist()))
    with pytest.raises(ExlError, match=r"data\.parquet: \d+ tokens of text, 320000 needed for 10 rows x 32000; "
                                       r"use fewer rows \(-r\)"):
        calibration_rows(tokenizer, 10, 32_000, tmp_path / "data.parquet")


def test_bad_input_is_one_line(tokenizer, tmp_path):
    pq.write_table(pa.table({"id": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(ExlError, match=re.escape(f"{tmp_path / 'numbers.parquet'}: no text column (columns: id)")):
        calibration_rows(tokenizer, 2, 16, tmp_path / "numbers.parquet")
    (tmp_path / "not.parquet").write_text("plain text")
    with pytest.raises(ExlError, match=re.escape(f"{tmp_path / 'not.parquet'}: cannot be read as parquet")):
        calibration_rows(tokenizer, 2, 16, tmp_path / "not.parquet")
    for rows, length in [(0, 16), (2, 1)]:
        with pytest.raises(ExlError, match="at least 1 row of at least 2 tokens"):
            calibration_rows(tokenizer, rows, length)
