"""Llama and Mistral: pre-norm blocks of GQA attention and a SiLU-gated MLP."""

from exlcore.attention import Attention
from exlcore.config import ModelConfig, parse_common
from exlcore.hookspecs import hookimpl
from exlcore.layers import Embedding, GatedMLP, Head, Linear, RMSNorm
from exlcore.model import Block, Model
from exlcore.rope import Rotary
from exlcore.spec import ArchitectureSpec, Calibration


def parse_config(raw: dict, architecture: str) -> ModelConfig:
    cfg = parse_common(raw, architecture)
    if architecture == "LlamaForCausalLM":
        cfg.sliding_window = None  # Llama ignores the key where a config carries it
    elif cfg.sliding_window:  # Mistral (and Mixtral): every layer slides
        cfg.layer_types = ["sliding_attention"] * cfg.num_layers
    return cfg


def dense_mlp(prefix: str, c: ModelConfig):
    return GatedMLP(f"{prefix}.mlp", c.hidden_size, c.intermediate_size, c.hidden_act, c.mlp_bias)


def build(c: ModelConfig, mlp=dense_mlp) -> Model:
    """The Llama graph; `mlp(layer_prefix, config)` makes each block's feed-forward (Mixtral swaps in MoE)."""
    rotary = Rotary(c.rope, c.head_dim)
    embed = Embedding("model.embed_tokens", c.vocab_size, c.hidden_size)
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        window = c.sliding_window if c.layer_types[i] == "sliding_attention" else None
        layers.append(Block(
            attn_norm=RMSNorm(f"{p}.input_layernorm", c.hidden_size, c.norm_eps),
            attn=Attention(f"{p}.self_attn", i, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, rotary,
                           bias=c.attention_bias, out_bias=c.attention_bias, sliding_window=window),
            mlp_norm=RMSNorm(f"{p}.post_attention_layernorm", c.hidden_size, c.norm_eps),
            mlp=mlp(p, c),
        ))
    head = Head(Linear("lm_head", c.hidden_size, c.vocab_size), tied_to=embed if c.tie_word_embeddings else None)
    return Model(c, embed, layers, RMSNorm("model.norm", c.hidden_size, c.norm_eps), head)


SPEC = ArchitectureSpec(
    names=("LlamaForCausalLM", "MistralForCausalLM"),
    parse_config=parse_config,
    build=build,
    calibration=Calibration(
        shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
    ),
)


@hookimpl
def register_architectures(register):
    register(SPEC)


LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@hookimpl
def register_chat_templates(register):
    register("llama3", LLAMA3)
    register("chatml", CHATML)
