"""The same checks on the GPU in fp16/bf16. Low precision has no exact answer, so each comparison measures
transformers' own error against an fp32 reference and allows exlcore at most twice that (plus a floor)."""

import pytest
import torch

import exlcore
from exlcore.cli import main
from exlcore.evaluate import perplexity, windows
from exlcore.graphs import DecodeGraphs
from test_smollm2 import WIKI
from tiny import CONFIGS, make_tiny, max_error

pytestmark = pytest.mark.cuda
DTYPES = [torch.float16, torch.bfloat16]


def check_against_reference(ours, theirs, reference):
    hf_err = max_error(theirs, reference)
    assert max_error(ours, reference) <= max(2 * hf_err, 2e-3), (max_error(ours, reference), hf_err)
    agree = (ours.argmax(-1) == reference.argmax(-1)).float().mean()
    hf_agree = (theirs.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree >= hf_agree - 0.05  # argmax near-ties flip either way in low precision


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_models_on_gpu(name, dtype, tmp_path, tiny_tokenizer_dir):
    ref = make_tiny(name, tmp_path, tiny_tokenizer_dir).cuda()
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        reference = ref(ids).logits.float()
        theirs = ref.to(dtype)(ids).logits.float()
    model = exlcore.load(tmp_path, device="cuda", dtype=dtype)
    check_against_reference(model.forward(ids), theirs, reference)
    if name == "llama_dynamic_rope":
        return  # its frequencies depend on the length seen so far, so cached decoding differs by design
    # With the KV cache: a 30-token prefill, then one token at a time, must agree just as well.
    cache = model.new_cache(2, 64)
    steps = [model.forward(ids[:, :30], cache)] + [model.forward(ids[:, t:t + 1], cache) for t in range(30, 40)]
    check_against_reference(torch.cat(steps, 1), theirs, reference)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).cuda().eval()
    ids = torch.tensor([exlcore.load(smollm2_dir, device="cpu").tokenizer.encode(WIKI.read_text()[:4000])[:512]]).cuda()
    with torch.no_grad():
        reference = hf(ids).logits.float()
        theirs = {dtype: hf.to(dtype)(ids).logits.float() for dtype in DTYPES}
    return ids, reference, theirs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_smollm2_on_gpu(smollm2_dir, smollm2_reference, dtype):
    ids, reference, theirs = smollm2_reference
    model = exlcore.load(smollm2_dir, device="cuda", dtype=dtype)
    check_against_reference(model.forward(ids), theirs[dtype], reference)
    rows = windows(model.tokenizer.encode(WIKI.read_text(), add_bos=False), 512, 40)
    assert perplexity(model, rows, batch=8) == pytest.approx(16.02, abs=0.1)
    assert exlcore.Generator(model).generate("The capital of France is", max_new_tokens=3,
                                             temperature=0).startswith(" Paris")


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3", "mistral_sliding"])
def test_cuda_graph_decode_matches_eager(name, tmp_path, tiny_tokenizer_dir):
    """Graph replay (padded KV buckets, positions on the device) gives the eager path's greedy tokens, across
    a bucket boundary."""
    make_tiny(name, tmp_path, tiny_tokenizer_dir)
    model = exlcore.load(tmp_path, device="cuda", dtype=torch.float32)
    prompt = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    runs = []
    for use_graphs in (True, False):
        gen = exlcore.Generator(model, max_seq_len=320)
        assert gen.graphs is not None
        if not use_graphs:
            gen.graphs = None
        runs.append(list(gen.tokens(prompt, 260, temperature=0, stop_ids=set())))
    assert runs[0] == runs[1] and len(runs[0]) == 260


def test_batched_graph_decode_matches_eager(tmp_path, tiny_tokenizer_dir):
    """DecodeGraphs steps a batch of sequences as eager forwards do, across a bucket boundary, and refuses a wrong
    number of tokens and a full cache."""
    make_tiny("llama", tmp_path, tiny_tokenizer_dir)
    model = exlcore.load(tmp_path, device="cuda", dtype=torch.float32)
    ids = torch.randint(3, 512, (3, 250), generator=torch.Generator().manual_seed(5)).cuda()
    graphed, eager = model.new_cache(3, 270), model.new_cache(3, 270)
    model.forward(ids, graphed)
    logits = model.forward(ids, eager, last_only=True)
    decode = DecodeGraphs(model, graphed)
    for _ in range(20):  # positions 250 .. 269: buckets 256 and 270
        tokens = logits[:, -1].argmax(-1)
        logits = model.forward(tokens[:, None], eager, last_only=True)
        torch.testing.assert_close(decode.step(tokens), logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(exlcore.ExlError, match="2 tokens for a cache of 3 sequences"):
        decode.step(tokens[:2])
    with pytest.raises(exlcore.ExlError, match="context overflow: 271 tokens"):
        decode.step(tokens)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_ragged_batch_decodes_through_graphs(name, tmp_path, tiny_tokenizer_dir):
    """Prompts of different lengths prefill as one padded batch and decode through the graphs, each sequence at
    its own position (rows in different KV buckets): the eager forwards' logits, and each prompt's own tokens."""
    make_tiny(name, tmp_path, tiny_tokenizer_dir)
    model = exlcore.load(tmp_path, device="cuda", dtype=torch.float32)
    seed = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, 512, (n,), generator=seed).tolist() for n in (40, 250, 100)]
    ids, lengths = torch.tensor([r + r[-1:] * (250 - len(r)) for r in rows]), [len(r) for r in rows]
    graphed, eager = model.new_cache(3, 300), model.new_cache(3, 300)
    model.forward(ids, graphed, lengths=lengths)
    logits = model.forward(ids, eager, last_only=True, lengths=lengths)
    decode = DecodeGraphs(model, graphed)
    for _ in range(12):  # the longest row from bucket 256 into the next
        tokens = logits[:, -1].argmax(-1)
        logits = model.forward(tokens[:, None], eager, last_only=True)
        torch.testing.assert_close(decode.step(tokens), logits, atol=1e-4, rtol=1e-4)
    assert graphed.lengths == eager.lengths == [n + 12 for n in lengths]
    gen = exlcore.Generator(model, max_seq_len=320)
    alone = [gen.generate(r, max_new_tokens=30, temperature=0) for r in rows]
    assert gen.generate(rows, max_new_tokens=30, temperature=0) == alone
    assert gen.batch[1] is not None and sorted(gen.batch[1].graphs) == [256, 320]


def test_bench_decodes_batches_through_graphs(tmp_path, tiny_tokenizer_dir, capsys):
    make_tiny("llama", tmp_path, tiny_tokenizer_dir, max_position_embeddings=1024)
    assert main(["bench", "-m", str(tmp_path), "-p", "200", "-n", "100", "-b", "1", "4"]) == 0  # across a bucket
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["prefill", "decode, batch 1", "decode, batch 4", "peak GPU memory"]


def test_graphs_recapture_after_the_rope_table_grows(tmp_path, tiny_tokenizer_dir):
    """A forward longer than the rope table replaces it; graphs captured before must not read the old one."""
    make_tiny("llama", tmp_path, tiny_tokenizer_dir, max_position_embeddings=8192)
    model = exlcore.load(tmp_path, device="cuda", dtype=torch.float32)
    prompt = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    gen = exlcore.Generator(model, max_seq_len=320)
    first = list(gen.tokens(prompt, 30, temperature=0, stop_ids=set()))
    model.forward(torch.randint(3, 512, (1, 5000)))  # grows every rope table past its first 4096 rows
    torch.cuda.empty_cache()
    torch.zeros(64 << 20, device="cuda")  # reuse freed memory, so a stale table would read garbage
    again = list(gen.tokens(prompt[1:] + prompt[:1], 30, temperature=0, stop_ids=set()))
    gen.graphs = None
    eager = list(gen.tokens(prompt[1:] + prompt[:1], 30, temperature=0, stop_ids=set()))
    assert again == eager and len(first) == 30


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_decodes_on_gpu(bits, tmp_path, tiny_tokenizer_dir):
    """Single-token steps over a quantized cache (the decode kernel) give what one prefill over the whole sequence
    gives (the PyTorch path; both read every key back from the cache), and decode graphs what the eager steps
    give, across a bucket boundary (in fp16's rounding: their splits differ)."""
    make_tiny("llama", tmp_path, tiny_tokenizer_dir, head_dim=32, max_position_embeddings=512)
    model = exlcore.load(tmp_path, device="cuda", dtype=torch.float16)
    ids = torch.randint(3, 512, (2, 270), generator=torch.Generator().manual_seed(7)).cuda()
    cache = model.new_cache(2, 270, bits)
    steps = torch.cat([model.forward(ids[:, :250], cache)] + [model.forward(ids[:, t:t + 1], cache)
                                                              for t in range(250, 270)], 1)
    whole = model.forward(ids, model.new_cache(2, 270, bits))
    assert max_error(steps[:, 250:], whole[:, 250:]) < 0.01
    graphed = model.new_cache(2, 270, bits)
    model.forward(ids[:, :250], graphed)
    decode = DecodeGraphs(model, graphed)
    for t in range(250, 270):  # buckets 256 and 320
        assert max_error(decode.step(ids[:, t]), steps[:, t:t + 1]) < 0.01
