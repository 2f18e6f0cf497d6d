"""`exl eval ppl`: perplexity and KL against transformers' own numbers, text and parquet input, the
built-in evaluation slice on the real model."""

import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from exlcore.cli import main
from test_exl2 import to_exl2
from tiny import TINY_TEXT, make_tiny

TEXT = TINY_TEXT.read_text()[200_000:230_000]  # past what the tokenizer saw


def run_ppl(capsys, *args) -> tuple[float, float | None]:
    assert main(["eval", "ppl", "--device", "cpu", *map(str, args)]) == 0
    out = capsys.readouterr().out
    ppl = float(re.search(r"perplexity ([\d.]+)", out).group(1))
    kl = re.search(r"KL divergence from \S+ ([\d.]+)", out)
    return ppl, float(kl.group(1)) if kl else None


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval")
    make_tiny("llama", root / "hf", tiny_tokenizer_dir)
    deq = to_exl2(root / "hf", root / "exl2")
    (root / "text.txt").write_text(TEXT)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    return root, load(root / "hf"), load(deq)


def rows_of(root, length, count):
    from exlcore.tokenizer import Tokenizer

    ids = Tokenizer(root / "hf", {}).encode(TEXT, add_bos=False)
    return torch.tensor(ids[: length * count]).view(count, length)


def test_perplexity_and_kl_match_transformers(models, capsys):
    root, hf, hf_quantized = models
    rows = rows_of(root, 64, 5)
    with torch.no_grad():
        loss = hf_quantized(rows, labels=rows).loss  # mean over the predicted positions of every row
        p_ref = torch.log_softmax(hf(rows).logits[:, :-1], -1)
        p_q = torch.log_softmax(hf_quantized(rows).logits[:, :-1], -1)
    kl = float((p_ref.exp() * (p_ref - p_q)).sum(-1).mean())
    ppl, got_kl = run_ppl(capsys, "-m", root / "exl2", "--text", root / "text.txt", "-l", 64, "--rows", 5,
                          "--ref", root / "hf", "--batch", 2)
    assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert kl > 0.001 and got_kl == pytest.approx(kl, rel=1e-3, abs=1e-4)
    _, self_kl = run_ppl(capsys, "-m", root / "hf", "--text", root / "text.txt", "-l", 64, "--rows", 2,
                         "--ref", root / "hf")
    assert self_kl == pytest.approx(0, abs=1e-5)


def test_parquet_text_column(models, tmp_path, capsys):
    root = models[0]
    pieces = TEXT.split("\n\n")
    pq.write_table(pa.table({"id": list(range(len(pieces))), "text": pieces}), tmp_path / "data.parquet")
    (tmp_path / "same.txt").write_text("\n\n".join(p for p in pieces if p))
    from_parquet = run_ppl(capsys, "-m", root / "hf", "--parquet", tmp_path / "data.parquet", "-l", 64, "--rows", 3)
    from_text = run_ppl(capsys, "-m", root / "hf", "--text", tmp_path / "same.txt", "-l", 64, "--rows", 3)
    assert from_parquet == from_text
    pq.write_table(pa.table({"id": [1, 2]}), tmp_path / "numbers.parquet")
    assert main(["eval", "ppl", "-m", str(root / "hf"), "--device", "cpu", "--parquet",
                 str(tmp_path / "numbers.parquet")]) == 1
    assert "no text column (columns: id)" in capsys.readouterr().err
    assert main(["eval", "ppl", "-m", str(root / "hf"), "--device", "cpu", "--text", str(root / "text.txt"),
                 "-l", "100000"]) == 1
    assert "fewer than one window of 100000" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_on_the_evaluation_slice(smollm2_dir, capsys):
    """The shared quality protocol: 16 windows of 2048 tokens of the evaluation slice; fp16 on the H100 gave
    9.801 (shared/data/README.md). The CPU computes in fp32."""
    ppl, _ = run_ppl(capsys, "-m", smollm2_dir, "--batch", 2)
    assert ppl == pytest.approx(9.801, abs=0.03)


def test_a_reference_of_another_vocabulary_is_refused(models, tmp_path, tiny_tokenizer_dir, capsys):
    root = models[0]
    make_tiny("llama", tmp_path / "wide", tiny_tokenizer_dir, vocab_size=640)
    capsys.readouterr()  # transformers' own output while saving
    assert main(["eval", "ppl", "-m", str(root / "hf"), "--text", str(root / "text.txt"), "-l", "64", "--rows", "2",
                 "--ref", str(tmp_path / "wide"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "the reference model's vocabulary (640) differs from the model's (512)" in err and err.count("\n") == 1
