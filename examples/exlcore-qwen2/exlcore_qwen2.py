"""An out-of-tree architecture: Qwen2 is Llama with biases on q/k/v (none on o). Installing this package
is all it takes; exlcore finds it through the `exlcore` entry-point group."""

from exlcore.attention import Attention
from exlcore.config import ModelConfig, parse_common
from exlcore.hookspecs import hookimpl
from exlcore.layers import Embedding, GatedMLP, Head, Linear, RMSNorm
from exlcore.model import Block, Model
from exlcore.rope import Rotary
from exlcore.spec import ArchitectureSpec, Calibration


def parse_config(raw: dict, architecture: str) -> ModelConfig:
    cfg = parse_common(raw, architecture, attention_bias=True)
    if not raw.get("use_sliding_window"):
        cfg.sliding_window = None
    return cfg


def build(c: ModelConfig) -> Model:
    rotary = Rotary(c.rope, c.head_dim)
    embed = Embedding("model.embed_tokens", c.vocab_size, c.hidden_size)
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        window = c.sliding_window if c.layer_types[i] == "sliding_attention" else None
        layers.append(Block(
            attn_norm=RMSNorm(f"{p}.input_layernorm", c.hidden_size, c.norm_eps),
            attn=Attention(f"{p}.self_attn", i, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, rotary,
                           bias=True, out_bias=False, sliding_window=window),
            mlp_norm=RMSNorm(f"{p}.post_attention_layernorm", c.hidden_size, c.norm_eps),
            mlp=GatedMLP(f"{p}.mlp", c.hidden_size, c.intermediate_size, c.hidden_act),
        ))
    head = Head(Linear("lm_head", c.hidden_size, c.vocab_size), tied_to=embed if c.tie_word_embeddings else None)
    return Model(c, embed, layers, RMSNorm("model.norm", c.hidden_size, c.norm_eps), head)


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        names=("Qwen2ForCausalLM",),
        parse_config=parse_config,
        build=build,
        calibration=Calibration(shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                               ("mlp.gate_proj", "mlp.up_proj"))),
    ))
