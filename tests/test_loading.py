"""Loading paths: sharded checkpoints with and without an index, bf16/fp16 files, sentencepiece tokenizers,
chat_template.jinja, and `exl info` / `exl generate` on what was loaded."""

import json
import shutil

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import save_file

import exlcore
from exlcore.cli import main
from tiny import TINY_TEXT, make_tiny, max_error


def test_sharded_with_and_without_index(tmp_path, tiny_tokenizer_dir):
    ref = make_tiny("llama", tmp_path, tiny_tokenizer_dir)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    for f in tmp_path.glob("model.safetensors"):
        f.unlink()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
    torch.testing.assert_close(exlcore.load(tmp_path, device="cpu").forward(ids), expected, rtol=1e-4, atol=1e-4)
    # A stray extra file is ignored while the index names the shards...
    save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64)}, tmp_path / "consolidated.safetensors")
    torch.testing.assert_close(exlcore.load(tmp_path, device="cpu").forward(ids), expected, rtol=1e-4, atol=1e-4)
    (tmp_path / "consolidated.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").unlink()  # ...and without an index (EXL2 writes none), all load
    torch.testing.assert_close(exlcore.load(tmp_path, device="cpu").forward(ids), expected, rtol=1e-4, atol=1e-4)
    first = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shutil.copy(first, tmp_path / "copy.safetensors")
    with pytest.raises(exlcore.ExlError, match="is also in"):
        exlcore.load(tmp_path, device="cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_computes_in_fp32_on_cpu(dtype, tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    make_tiny("gemma2", tmp_path, tiny_tokenizer_dir).to(dtype).save_pretrained(tmp_path)
    model = exlcore.load(tmp_path, device="cpu")
    assert model.dtype == torch.float32 and model.embed.weight.dtype == torch.float32
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    # A fresh fp32 load of the half-precision files (a cast model would keep a rounded rope buffer).
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        expected = ref(ids).logits
    assert max_error(model.forward(ids), expected) < 1e-4


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> bytes:
    """A real sentencepiece BPE model trained on the shared text, Llama-style special ids."""
    folder = tmp_path_factory.mktemp("sp")
    text = folder / "text.txt"
    text.write_text(TINY_TEXT.read_text()[:300_000])
    spm.SentencePieceTrainer.Train(input=str(text), model_prefix=str(folder / "sp"), vocab_size=500, model_type="bpe",
                                   unk_id=0, bos_id=1, eos_id=2, byte_fallback=True,
                                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    return (folder / "sp.model").read_bytes()


def test_sentencepiece_tokenizer_and_jinja_template(tmp_path, tiny_tokenizer_dir, sentencepiece_model):
    make_tiny("gemma", tmp_path, tiny_tokenizer_dir)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model)
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model)
    turn = {str(sp.PieceToId(t)): {"content": t, "special": True} for t in ("<start_of_turn>", "<end_of_turn>")}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "added_tokens_decoder": turn}))
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    tok = exlcore.load(tmp_path, device="cpu").tokenizer
    text = "Once upon a time, a little fox met 3 owls."
    assert tok.encode(text) == [1] + sp.EncodeAsIds(text)  # sentencepiece models get BOS by default
    assert tok.encode(text, add_bos=False) == sp.EncodeAsIds(text)
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert prompt == "<s><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode(prompt, add_bos=False)
    assert ids[:2] == [1, sp.PieceToId("<start_of_turn>")] and tok.stop_ids == [2]


def test_exl_info(tmp_path, tiny_tokenizer_dir, capsys):
    make_tiny("mixtral", tmp_path, tiny_tokenizer_dir)
    assert main(["info", "-m", str(tmp_path), "--context", "1000"]) == 0
    out = capsys.readouterr().out
    # 3 layers x (attention 64*64*2 + 64*32*2 + 4 experts * 3 * 64*128 + router 4*64 + 2 norms 64)
    # + embed and head 512*64 each + final norm 64
    params = 3 * (2 * 64 * 64 + 2 * 64 * 32 + 4 * 3 * 64 * 128 + 4 * 64 + 2 * 64) + 2 * 512 * 64 + 64
    assert f"parameters    {params / 1e6:,.1f} M" in out
    assert "MixtralForCausalLM (3 layers, hidden 64, 4 heads / 2 kv heads, vocab 512, 4 experts top-2)" in out
    assert "format        f32" in out and "self_attn.q_proj 32.00" in out
    kv = 2 * 3 * 2 * 16 * 2 * 1000
    assert f"KV cache {kv / 2**30:.2f} GiB at 1000 tokens" in out
    assert "kv cache" not in out  # heads of 16: no quantized cache


def test_exl_info_quantized_cache_sizes(tmp_path, tiny_tokenizer_dir, capsys):
    make_tiny("llama", tmp_path, tiny_tokenizer_dir, head_dim=32)
    assert main(["info", "-m", str(tmp_path), "--context", "100000"]) == 0
    elements = 2 * 3 * 2 * 32 * 100000  # keys and values: layers, kv heads, head size, tokens
    want = ", ".join(f"{bits}-bit {elements * (bits / 8 + 2 / 32) / 2**30:.2f} GiB" for bits in (8, 4))
    assert f"kv cache      {want} with --cache-bits" in capsys.readouterr().out


def test_exl_generate(tmp_path, tiny_tokenizer_dir, capsys):
    make_tiny("llama", tmp_path, tiny_tokenizer_dir)
    model = exlcore.load(tmp_path, device="cpu")
    expected = exlcore.Generator(model).generate("Once upon", max_new_tokens=10, temperature=0)
    assert main(["generate", "-m", str(tmp_path), "-p", "Once upon", "--max-new-tokens", "10", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n" and "tokens/s" in captured.err


def test_exl_generate_batch(tmp_path, tiny_tokenizer_dir, capsys):
    make_tiny("llama", tmp_path, tiny_tokenizer_dir)
    model = exlcore.load(tmp_path, device="cpu")
    prompts = ["Once upon", "The cat sat on the mat"]
    expected = [exlcore.Generator(model).generate(p, max_new_tokens=10, temperature=0) for p in prompts]
    args = ["generate", "-m", str(tmp_path), "-p", prompts[0], "-p", prompts[1], "--max-new-tokens", "10"]
    assert main([*args, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    blocks = captured.out.split("--- prompt ")[1:]  # "1: N tokens, M new (reason)\n" and the text
    assert [b.split("\n", 1)[1] for b in blocks] == [e + "\n" for e in expected]
    assert [b.split(":")[0] for b in blocks] == ["1", "2"]
    assert "2 prompts" in captured.err and "tokens/s" in captured.err


@pytest.mark.parametrize("mode", ["chatml", "gemma", "llama3", "mistral"])
def test_fallback_templates_keep_every_turn(mode):
    from exlcore import chat, plugins

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye now"}]
    prompt = chat.render(plugins.chat_templates()[mode], messages, True, bos_token="<s>", eos_token="</s>")
    positions = [prompt.index(t) for t in ("Be brief.", "Hi there", "Hello.", "Bye now")]
    assert positions == sorted(positions)
    assert not prompt.endswith("Bye now")  # the generation prompt (or [/INST]) follows the last turn


def test_exl_chat_drops_old_turns_to_fit(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    import io

    make_tiny("llama", tmp_path, tiny_tokenizer_dir)
    turns = ["Once upon a time there was a little fox who lived in the woods near a river."] * 4
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    assert main(["chat", "-m", str(tmp_path), "--device", "cpu", "--max-seq-len", "80", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("tokens/s") == 4  # every turn answered although the history outgrew the context
    monkeypatch.setattr("sys.stdin", io.StringIO(" ".join(turns * 3) + "\n"))
    assert main(["chat", "-m", str(tmp_path), "--device", "cpu", "--max-seq-len", "80", "--max-new-tokens", "8"]) == 1
    assert "does not fit in the context" in capsys.readouterr().err
