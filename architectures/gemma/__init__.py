"""Gemma, Gemma 2 and Gemma 3 (text). Shared: embeddings scaled by sqrt(hidden), norms stored as w - 1,
tanh-GELU MLPs, tied head. Gemma 2 adds post-norms, alternating sliding-window layers and soft-capping;
Gemma 3 adds QK norm and a separate rope base for its sliding layers."""

import math

import torch

from exlcore.attention import Attention
from exlcore.config import ModelConfig, parse_common, parse_rope, setting
from exlcore.hookspecs import hookimpl
from exlcore.layers import Embedding, GatedMLP, Head, Linear, RMSNorm
from exlcore.model import Block, Model
from exlcore.rope import RopeConfig, Rotary
from exlcore.spec import ArchitectureSpec, Calibration

GEMMA1, GEMMA2, GEMMA3 = "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"


def parse_config(raw: dict, architecture: str) -> ModelConfig:
    cfg = parse_common(raw, architecture, tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)))
    if cfg.hidden_act == "gelu":  # older Gemma configs say "gelu"; the reference runs the tanh approximation
        cfg.hidden_act = "gelu_pytorch_tanh"
    if architecture == GEMMA1:
        return cfg
    if "layer_types" not in raw:  # checkpoints from before transformers wrote layer_types
        every = 2 if architecture == GEMMA2 else setting(raw, "sliding_window_pattern", 6, int)
        cfg.layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                           for i in range(cfg.num_layers)]
    cfg.query_pre_attn_scalar = setting(raw, "query_pre_attn_scalar", float(cfg.head_dim))
    cfg.final_logit_softcap = raw.get("final_logit_softcapping")
    if architecture == GEMMA2:
        cfg.attn_logit_softcap = raw.get("attn_logit_softcapping")
    else:  # Gemma 3 keeps attn_logit_softcapping in its config but its reference never applies it
        cfg.rope = parse_rope(raw, "full_attention")
        cfg.rope_local = (parse_rope(raw, "sliding_attention") if "sliding_attention" in (raw.get("rope_parameters") or {})
                          else RopeConfig(theta=setting(raw, "rope_local_base_freq", 10000.0)))
    return cfg


def build(c: ModelConfig) -> Model:
    v2plus = c.architecture != GEMMA1
    global_rope = Rotary(c.rope, c.head_dim)
    local_rope = Rotary(c.rope_local, c.head_dim) if c.rope_local else global_rope
    scale = c.query_pre_attn_scalar**-0.5 if v2plus else None

    def norm(key: str, dim: int = c.hidden_size) -> RMSNorm:
        return RMSNorm(key, dim, c.norm_eps, offset=1.0)

    embed = Embedding("model.embed_tokens", c.vocab_size, c.hidden_size, scale=math.sqrt(c.hidden_size))
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        sliding = c.layer_types[i] == "sliding_attention"
        attn = Attention(f"{p}.self_attn", i, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                         local_rope if sliding else global_rope, bias=c.attention_bias, scale=scale,
                         sliding_window=c.sliding_window if sliding else None, softcap=c.attn_logit_softcap,
                         qk_norm_eps=c.norm_eps if c.architecture == GEMMA3 else None, qk_norm_offset=1.0)
        mlp = GatedMLP(f"{p}.mlp", c.hidden_size, c.intermediate_size, c.hidden_act)
        if v2plus:
            layers.append(Block(norm(f"{p}.input_layernorm"), attn, norm(f"{p}.pre_feedforward_layernorm"), mlp,
                                post_attn_norm=norm(f"{p}.post_attention_layernorm"),
                                post_mlp_norm=norm(f"{p}.post_feedforward_layernorm")))
        else:
            layers.append(Block(norm(f"{p}.input_layernorm"), attn, norm(f"{p}.post_attention_layernorm"), mlp))
    head = Head(Linear("lm_head", c.hidden_size, c.vocab_size), tied_to=embed if c.tie_word_embeddings else None,
                softcap=c.final_logit_softcap)
    return Model(c, embed, layers, norm("model.norm"), head, residual_fp32_with_fp16=True)


SPEC = ArchitectureSpec(
    names=(GEMMA1, GEMMA2, GEMMA3),
    parse_config=parse_config,
    build=build,
    calibration=Calibration(
        shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
    ),
    cuda_dtype=torch.bfloat16,
)


@hookimpl
def register_architectures(register):
    register(SPEC)


# Gemma has no system role: a system message is prefixed to the first user turn.
GEMMA = (
    "{{ bos_token }}{% set sys = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ sys if loop.first else '' }}{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@hookimpl
def register_chat_templates(register):
    register("gemma", GEMMA)
