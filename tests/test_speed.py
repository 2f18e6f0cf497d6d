"""`exl bench` (exlcore.speed) on a tiny model: what it reports, and what it refuses."""

import re

import pytest

from exlcore.cli import main
from tiny import make_tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_tokenizer_dir):
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny("llama", folder, tiny_tokenizer_dir)
    return folder


def bench(capsys, folder, *args) -> tuple[int, str, str]:
    code = main(["bench", "-m", str(folder), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_reports_prefill_and_each_batch(folder, capsys):
    code, out, _ = bench(capsys, folder, "--device", "cpu", "-p", "16", "-n", "4", "-b", "1", "3")
    assert code == 0
    lines = out.splitlines()
    assert re.fullmatch(r"prefill: [\d,]+ tokens/s \(16 tokens\)", lines[0])
    for line, batch in zip(lines[1:], (1, 3)):
        line = re.sub(r"(?<=\d),(?=\d)", "", line)  # thousands separators
        found = re.fullmatch(rf"decode, batch {batch}: ([\d.]+) tokens/s per sequence, ([\d.]+) in all", line)
        rate, total = map(float, found.groups())
        assert rate > 0 and total == pytest.approx(batch * rate, abs=0.05 * (batch + 1))  # both rounded
    assert len(lines) == 3  # no GPU memory line on the CPU


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "the prompt, the new tokens and every batch size must be at least 1"),
    (["-b", "2", "0"], "the prompt, the new tokens and every batch size must be at least 1"),
    (["-p", "200", "-n", "100"], "200 prompt \\+ 100 new tokens exceed the model's context of 256; ask for fewer"),
])
def test_bad_sizes_are_one_line(folder, capsys, args, message):
    code, out, err = bench(capsys, folder, "--device", "cpu", *args)
    assert code == 1 and out == ""
    assert re.fullmatch(f"exl: error: {message}\n", err)
