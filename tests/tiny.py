"""Tiny random-weight Hugging Face models, saved with transformers, for comparing exlcore against it."""

import json
import shutil
from pathlib import Path

import torch

from exlcore.calibration import CALIBRATION_DIR

# The children's stories text: the package's calibration copy, byte-identical to ../shared/data/tiny.utf8
# (test_calibration checks it where ../shared is at hand).
TINY_TEXT = CALIBRATION_DIR / "tiny.utf8"

def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference from the reference b, relative to b's largest magnitude (in fp32)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=0, eos_token_id=2,
              pad_token_id=0)

# name -> (transformers config class name, overrides). Each exercises a feature the issue lists.
CONFIGS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama_tied_llama3": ("LlamaConfig", dict(tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_linear_rope": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "llama_dynamic_rope": ("LlamaConfig", dict(max_position_embeddings=24, rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    "llama_yarn_rope": ("LlamaConfig", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64))),
    "llama_bias_mha": ("LlamaConfig", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "mistral_sliding": ("MistralConfig", dict(sliding_window=8)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "gemma": ("GemmaConfig", dict(hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                    query_pre_attn_scalar=24)),
    "gemma3": ("Gemma3TextConfig", dict(sliding_window=8, sliding_window_pattern=2, final_logit_softcapping=6.0,
                                        query_pre_attn_scalar=16, rope_scaling=dict(rope_type="linear", factor=8.0))),
}


def make_tiny(name: str, folder: Path, tokenizer_dir: Path, config_class: str | None = None, **overrides):
    """Save a seeded random model to `folder` (with the tiny tokenizer) and return the transformers model."""
    import transformers

    if config_class is None:
        config_class, overrides = CONFIGS[name][0], {**CONFIGS[name][1], **overrides}
    cfg = getattr(transformers, config_class)(**{**COMMON, **overrides})
    torch.manual_seed(sum(map(ord, name)))
    # Eager attention is the reference's definition; other backends on CUDA may drop soft-capping.
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # weights large enough that logits are well separated (no argmax near-ties)
        for n, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "norm" in n else 0.15)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return model


def write_tiny_tokenizer(folder: Path) -> Path:
    """A real byte-level BPE tokenizer (vocab 512) trained on a slice of the shared calibration text, with a
    ChatML template: small enough for tiny models, real enough to exercise encode/decode/templates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=COMMON["vocab_size"], special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = TINY_TEXT.read_text()[:200_000]
    tok.train_from_iterator([text[i:i + 1000] for i in range(0, len(text), 1000)], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }))
    return folder
