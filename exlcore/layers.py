"""Core components other than attention. Each is keyed by its checkpoint tensor prefix and reads its own
tensors in `load`, so an architecture's module graph is also its tensor-name map."""

import torch
import torch.nn.functional as F
from torch import nn

from exlcore.errors import ExlError
from exlcore.ext import on
from exlcore.formats import format_of, load_weight, qmatrix
from exlcore.weights import Weights

# Activations the extension fuses with the gate product (its code for each).
FUSED_ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1}
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}


class Linear(nn.Module):
    """y = x W^T (+ b). The stored format is chosen from the tensors the checkpoint holds."""

    def __init__(self, key: str, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.key, self.in_features, self.out_features, self.has_bias = key, in_features, out_features, bias
        self.weight = self.bias = self.kernel = None
        self.format = "dense"

    def load(self, w: Weights, dtype: torch.dtype):
        self.format = format_of(w, self.key)
        weight = load_weight(w, self.key, self.in_features, self.out_features, dtype)
        if isinstance(weight, torch.Tensor):
            self.weight = weight
        else:
            self.kernel = weight  # packed on the GPU, multiplied by a CUDA kernel
        if self.has_bias:
            self.bias = w.get(f"{self.key}.bias", (self.out_features,), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            return F.linear(x, self.weight, self.bias)
        y = self.kernel(x)
        return y if self.bias is None else y + self.bias


def linears(module: nn.Module) -> dict[str, Linear]:
    """Every Linear inside `module`, by checkpoint key, in declaration order."""
    return {m.key: m for m in module.modules() if isinstance(m, Linear)}


def project(x: torch.Tensor, linears: list[Linear]) -> list[torch.Tensor]:
    """Several linears of one input (q/k/v, gate/up): one kernel launch when all of them are packed."""
    if all(lin.kernel is not None for lin in linears):
        ys = qmatrix.matmul([lin.kernel for lin in linears], x)
        return [y if lin.bias is None else y + lin.bias for lin, y in zip(linears, ys)]
    return [lin(x) for lin in linears]


class Embedding(nn.Module):
    def __init__(self, key: str, vocab_size: int, hidden_size: int, scale: float | None = None):
        super().__init__()
        self.key, self.vocab_size, self.hidden_size, self.scale = key, vocab_size, hidden_size, scale
        self.weight = None

    def load(self, w: Weights, dtype: torch.dtype):
        self.weight = w.get(f"{self.key}.weight", (self.vocab_size, self.hidden_size), dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.weight)
        if self.scale is not None:
            # Gemma multiplies by sqrt(hidden) rounded to the activation dtype, as its reference does.
            x = x * torch.tensor(self.scale, dtype=x.dtype)
        return x


class RMSNorm(nn.Module):
    """Computed in fp32. `offset` is 1.0 for Gemma, whose checkpoints store w - 1."""

    def __init__(self, key: str, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.key, self.dim, self.eps, self.offset = key, dim, eps, offset
        self.weight = None

    def load(self, w: Weights, dtype: torch.dtype):
        self.weight = w.get(f"{self.key}.weight", (self.dim,), torch.float32) + self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = on(x)
        if ext is not None:
            return ext.rms_norm(x.contiguous(), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).to(x.dtype)

    def add_forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add before a norm: (x + h, norm(x + h)), the sum in x's dtype (rounded before the norm
        reads it), the norm in h's. One launch on CUDA; x itself is left as it is."""
        ext = on(x)
        if ext is not None:
            return ext.add_rms_norm(x.contiguous(), h.contiguous(), self.weight, self.eps)
        x = x + h.to(x.dtype)
        return x, self(x).to(h.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, key: str, hidden: int, intermediate: int, act: str = "silu", bias: bool = False,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ExlError(f"config.json: activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        self.act, self.act_code = ACTIVATIONS[act], FUSED_ACTIVATIONS.get(act)
        self.gate = Linear(f"{key}.{names[0]}", hidden, intermediate, bias)
        self.up = Linear(f"{key}.{names[1]}", hidden, intermediate, bias)
        self.down = Linear(f"{key}.{names[2]}", intermediate, hidden, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, [self.gate, self.up])
        ext = on(x)
        if ext is None or self.act_code is None:
            return self.down(self.act(gate) * up)
        if self.down.kernel is None:
            return self.down(ext.act_mul(gate.contiguous(), up.contiguous(), self.act_code))
        # The packed down projection takes the activation as it reads its input: no launch in between.
        y = qmatrix.matmul([self.down.kernel], gate, up, self.act_code)[0]
        return y if self.down.bias is None else y + self.down.bias


class SparseMoE(nn.Module):
    """Top-k routed experts: softmax over all router logits in fp32, keep the top k, renormalise them
    to sum to one (Mixtral), and mix the chosen experts' outputs."""

    graph_safe = False  # the expert loop runs over host-side lists of the chosen experts

    def __init__(self, key: str, hidden: int, intermediate: int, num_experts: int, top_k: int,
                 act: str = "silu", router: str = "gate", expert: str = "experts.{e}",
                 names: tuple[str, str, str] = ("w1", "w3", "w2")):
        super().__init__()
        self.top_k = top_k
        self.router = Linear(f"{key}.{router}", hidden, num_experts)
        self.experts = nn.ModuleList(
            GatedMLP(f"{key}.{expert.format(e=e)}", hidden, intermediate, act, names=names) for e in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            rows, slot = torch.where(chosen == e)
            out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, slot, None])
        return out.reshape(shape)


class Head(nn.Module):
    """The output projection, optionally tied to the embedding, with optional final soft-capping."""

    def __init__(self, linear: Linear, tied_to: Embedding | None = None, softcap: float | None = None):
        super().__init__()
        self.linear, self.softcap = linear, softcap
        self.tied_to = [tied_to]  # a list keeps the embedding out of this module's children

    def load(self, w: Weights, dtype: torch.dtype):
        embedding = self.tied_to[0]
        # Quantized checkpoints store the head even when tied (EXL2 always writes a quantized lm_head).
        if embedding is None or format_of(w, self.linear.key) != "dense":
            self.linear.load(w, dtype)
        else:
            self.linear.weight = embedding.weight  # shared storage, not a copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
