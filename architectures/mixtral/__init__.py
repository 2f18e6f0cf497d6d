"""Mixtral: the Mistral graph with each MLP replaced by a sparse mixture of SiLU-gated experts."""

from exlcore.architectures import llama
from exlcore.config import ModelConfig, need
from exlcore.hookspecs import hookimpl
from exlcore.layers import SparseMoE
from exlcore.model import Model
from exlcore.spec import ArchitectureSpec, Calibration


def parse_config(raw: dict, architecture: str) -> ModelConfig:
    cfg = llama.parse_config(raw, architecture)
    cfg.num_experts = need(raw, "num_local_experts")
    cfg.num_experts_per_tok = need(raw, "num_experts_per_tok")
    return cfg


def moe(prefix: str, c: ModelConfig) -> SparseMoE:
    return SparseMoE(f"{prefix}.block_sparse_moe", c.hidden_size, c.intermediate_size, c.num_experts,
                     c.num_experts_per_tok, c.hidden_act)


def build(c: ModelConfig) -> Model:
    return llama.build(c, mlp=moe)


SPEC = ArchitectureSpec(
    names=("MixtralForCausalLM",),
    parse_config=parse_config,
    build=build,
    calibration=Calibration(
        # Every expert sees every calibration token, so all w1/w3 read one input.
        shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                       ("block_sparse_moe.experts.*.w1", "block_sparse_moe.experts.*.w3")),
        all_experts_see_tokens=True,
        keep_unquantized=("block_sparse_moe.gate",),
    ),
)


@hookimpl
def register_architectures(register):
    register(SPEC)


# Mistral has no system role: a system message is prefixed to the first user turn.
MISTRAL = (
    "{{ bos_token }}{% set sys = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}"
    "[INST] {{ sys if loop.first else '' }}{{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@hookimpl
def register_chat_templates(register):
    register("mistral", MISTRAL)
