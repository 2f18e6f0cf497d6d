"""Generator behaviour on a tiny model: streaming, stop strings and ids, prefix reuse, seeds."""

import pytest
import torch

import exlcore
from exlcore.graphs import DecodeGraphs
from tiny import make_tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_tokenizer_dir):
    folder = tmp_path_factory.mktemp("llama")
    make_tiny("llama", folder, tiny_tokenizer_dir)
    return exlcore.load(folder, device="cpu")


def test_stream_pieces_make_the_generated_text(model):
    gen = exlcore.Generator(model, max_seq_len=128)
    pieces = list(gen.stream("Once upon a time", max_new_tokens=40, temperature=0, stop=[]))
    ids = list(exlcore.Generator(model, max_seq_len=128).tokens(model.tokenizer.encode("Once upon a time"),
                                                                 max_new_tokens=40, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == model.tokenizer.decode(ids)


def test_stop_string_ends_output_before_it(model):
    gen = exlcore.Generator(model, max_seq_len=128)
    full = gen.generate("Once upon a time", max_new_tokens=40, temperature=0)
    stop = full[10:13]
    cut = gen.generate("Once upon a time", max_new_tokens=40, temperature=0, stop=[stop])
    assert gen.stats.stop_reason == "stop_string"
    assert cut == full[: full.index(stop)]


def test_stop_token_id(model):
    gen = exlcore.Generator(model, max_seq_len=128)
    ids = list(gen.tokens(model.tokenizer.encode("Once upon a time"), max_new_tokens=20, temperature=0))
    out = list(gen.tokens(model.tokenizer.encode("Once upon a time"), max_new_tokens=20, temperature=0,
                          stop_ids={ids[5]}))
    assert out == ids[: ids.index(ids[5])] and gen.stats.stop_reason == "eos"
    assert gen.stats.new_tokens == len(out) + 1


def test_cache_after_a_stop_matches_its_ids(model):
    """Each token is fed before it is read (the GPU runs a step ahead of the host), so the stop token is in the
    cache when generation ends: cached_ids says so, and a prompt that continues through it reuses it all and gives
    what a fresh generator gives."""
    prompt = model.tokenizer.encode("Once upon a time")
    gen = exlcore.Generator(model, max_seq_len=128)
    ids = list(gen.tokens(prompt, max_new_tokens=20, temperature=0))
    out = list(gen.tokens(prompt, max_new_tokens=20, temperature=0, stop_ids={ids[5]}))
    assert gen.cache.lengths == [len(gen.cached_ids)] and len(gen.cached_ids) == len(prompt) + len(out) + 1
    follow = prompt + out + [ids[5], 40]
    fresh = list(exlcore.Generator(model, max_seq_len=128).tokens(follow, max_new_tokens=8, temperature=0))
    assert list(gen.tokens(follow, max_new_tokens=8, temperature=0)) == fresh
    assert gen.stats.cached_tokens == len(follow) - 1


def test_cached_prefix_gives_the_same_tokens(model):
    prompt = model.tokenizer.encode("The cat sat on the mat and then")
    fresh = list(exlcore.Generator(model, max_seq_len=128).tokens(prompt + [40, 41], max_new_tokens=16, temperature=0))
    gen = exlcore.Generator(model, max_seq_len=128)
    list(gen.tokens(prompt, max_new_tokens=8, temperature=0))
    reused = list(gen.tokens(prompt + [40, 41], max_new_tokens=16, temperature=0))
    assert gen.stats.cached_tokens == len(prompt)
    assert reused == fresh


def test_repetition_penalty_sees_the_generated_tokens(model):
    """Greedy with a repetition penalty over the prompt and every token generated so far: the same tokens as
    recomputing the whole sequence each step and penalising all of it."""
    import torch

    from exlcore.sampling import apply_repetition_penalty

    ids = model.tokenizer.encode("Once upon a time")
    got = list(exlcore.Generator(model, max_seq_len=128).tokens(ids, max_new_tokens=12, temperature=0,
                                                                 repetition_penalty=1.8, stop_ids=set()))
    seq = list(ids)
    for _ in range(12):
        logits = model.forward(torch.tensor([seq]))[:, -1]
        seq.append(int(apply_repetition_penalty(logits, torch.tensor([seq]), 1.8).argmax()))
    assert got == seq[len(ids):]


def test_seeded_sampling_repeats(model):
    gen = exlcore.Generator(model, max_seq_len=128)
    a = gen.generate("Once", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3)
    b = gen.generate("Once", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3)
    c = gen.generate("Once", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=4)
    assert a == b != c


def test_overlong_request_is_refused(model):
    gen = exlcore.Generator(model, max_seq_len=32)
    with pytest.raises(exlcore.ExlError, match="exceed max_seq_len 32"):
        gen.generate("Once upon a time", max_new_tokens=40)


def test_forward_past_the_cache_is_refused(model):
    cache = model.new_cache(1, 16)
    model.forward(torch.ones(1, 12, dtype=torch.long), cache)
    with pytest.raises(exlcore.ExlError, match="context overflow: 17 tokens exceed the cache's 16; raise max_seq_len"):
        model.forward(torch.ones(1, 5, dtype=torch.long), cache)


def test_decode_graphs_refuse_a_model_they_cannot_capture(model):
    with pytest.raises(exlcore.ExlError, match="decodes without CUDA graphs .* use model.forward"):
        DecodeGraphs(model, model.new_cache(2, 16))


PROMPTS = ["Once upon a time", "The cat sat on the mat and then it", "Hello"]


def test_ragged_batch_forward_matches_each_prompt_alone(model):
    """A batch padded to its longest prompt, with each row's real length, gives each prompt's own logits, and
    decoding continues each row from its own length."""
    rows = [model.tokenizer.encode(p) for p in PROMPTS]
    longest = max(map(len, rows))
    cache = model.new_cache(3, 32)
    ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
    logits = model.forward(ids, cache, last_only=True, lengths=[len(r) for r in rows])
    assert cache.lengths == [len(r) for r in rows]
    alone = [model.new_cache(1, 32) for _ in rows]
    expected = [model.forward(torch.tensor([r]), c, last_only=True) for r, c in zip(rows, alone)]
    for _ in range(4):
        torch.testing.assert_close(logits, torch.cat(expected), atol=1e-5, rtol=1e-5)
        tokens = logits[:, -1].argmax(-1)
        logits = model.forward(tokens[:, None], cache)
        expected = [model.forward(t.view(1, 1), c) for t, c in zip(tokens, alone)]
    assert cache.lengths == [len(r) + 4 for r in rows]


@pytest.mark.parametrize("penalty", [1.0, 1.6])
def test_batch_generation_matches_each_prompt_alone(model, penalty):
    gen = exlcore.Generator(model, max_seq_len=128)
    alone, reasons = [], []
    for p in PROMPTS:
        alone.append(gen.generate(p, max_new_tokens=24, temperature=0, repetition_penalty=penalty))
        reasons.append(gen.stats.stop_reason)
    assert gen.generate(PROMPTS, max_new_tokens=24, temperature=0, repetition_penalty=penalty) == alone
    assert [s.stop_reason for s in gen.stats] == reasons
    assert [s.prompt_tokens for s in gen.stats] == [len(model.tokenizer.encode(p)) for p in PROMPTS]


def test_batch_stop_strings_end_each_row(model):
    gen = exlcore.Generator(model, max_seq_len=128)
    full = gen.generate(PROMPTS, max_new_tokens=30, temperature=0)
    stop = full[1][6:9]
    cut = gen.generate(PROMPTS, max_new_tokens=30, temperature=0, stop=[stop])
    assert cut == [f[:f.index(stop)] if stop in f else f for f in full]
    assert gen.stats[1].stop_reason == "stop_string"


def test_seeded_batch_sampling_repeats(model):
    gen = exlcore.Generator(model, max_seq_len=128)
    a, b = (gen.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=5) for _ in range(2))
    assert a == b != gen.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=6)


def test_bad_batches_are_refused(model):
    gen = exlcore.Generator(model, max_seq_len=32)
    with pytest.raises(exlcore.ExlError, match="empty prompt"):
        gen.generate(["Once", ""])
    with pytest.raises(exlcore.ExlError, match="exceed max_seq_len 32"):
        gen.generate(["Once", "Once upon a time"], max_new_tokens=30)
    with pytest.raises(exlcore.ExlError, match="stream takes one prompt"):
        list(gen.stream(["Once", "Hello"]))
    with pytest.raises(exlcore.ExlError, match=r"lengths \[3, 5\] do not fit 2 rows of 4 tokens"):
        model.forward(torch.ones(2, 4, dtype=torch.long), lengths=[3, 5])
