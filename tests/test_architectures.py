"""Every built-in architecture against transformers on tiny random configs: fp32 logits and greedy tokens."""

import pytest
import torch

import exlcore
from tiny import CONFIGS, make_tiny, max_error

SEQ = 40  # longer than the sliding windows (8) and the dynamic rope's trained context (24)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_greedy_match_transformers(name, tmp_path, tiny_tokenizer_dir):
    ref = make_tiny(name, tmp_path, tiny_tokenizer_dir)
    model = exlcore.load(tmp_path, device="cpu")
    ids = torch.randint(3, 512, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = model.forward(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert max_error(got, expected) < 1e-4
    if name != "llama_dynamic_rope":  # its frequencies depend on the length seen so far: cached decoding differs
        # With the KV cache, both rows: a 30-token prefill, then one token at a time.
        cache = model.new_cache(2, 64)
        steps = [model.forward(ids[:, :30], cache)] + [model.forward(ids[:, t:t + 1], cache) for t in range(30, SEQ)]
        assert max_error(torch.cat(steps, 1), expected) < 1e-4

    prompt = ids[:1, :12]
    with torch.no_grad():
        hf = ref.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                          min_new_tokens=32)[0, 12:].tolist()
    gen = exlcore.Generator(model, max_seq_len=64)
    ours = list(gen.tokens(prompt[0].tolist(), max_new_tokens=32, temperature=0, stop_ids=set()))
    assert ours == hf
