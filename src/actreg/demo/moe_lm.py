"""The model of ``actreg moe``: a small decoder-only mixture-of-experts byte language model.

``vocab -> [pre-LN causal self-attention, pre-LN MoE feed-forward] * layers -> LN -> tied head``.
Each MoE layer has a linear router ``blocks.<i>.moe.router`` (``[..., E]`` logits), ``E`` GELU
experts and top-``k`` routing with the chosen experts' softmax probabilities renormalised as gates
(Mixtral, Qwen). *Which* experts a token goes to is decided by a routing function the caller
installs (:meth:`MoELM.set_routing`): plain top-k of the logits, or top-k of the scores plus an
expert bias (``reg.route``) -- and that function is where the caller hands the logits to its
regularizer (``reg.observe``). Every MoE layer keeps the load of its last forward (``load``,
top-k assignments per expert), which the demo logs independently of actreg.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: ``route(slot name, logits [..., E]) -> indices [..., k]`` of each token's chosen experts
Routing = Callable[[str, Tensor], Tensor]


def top_k_routing(top_k: int) -> Routing:
    """Plain top-k of the router logits (no bias, nothing recorded)."""

    def route(name: str, logits: Tensor) -> Tensor:
        return torch.topk(logits.detach(), top_k, dim=-1).indices

    return route


class MoEFeedForward(nn.Module):
    """Router + ``experts`` GELU MLPs ``d -> hidden -> d``; each token goes to ``top_k`` of them."""

    def __init__(self, d: int, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.experts, self.top_k = experts, top_k
        self.router = nn.Linear(d, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, d, hidden) / math.sqrt(d))
        self.b_in = nn.Parameter(torch.zeros(experts, hidden))
        self.w_out = nn.Parameter(torch.randn(experts, hidden, d) / math.sqrt(hidden))
        self.name = ""  #: the router's slot name (set by the model)
        self.route: Routing = top_k_routing(top_k)
        #: top-k assignments per expert of the last forward ``[E]`` (detached, float64)
        self.load = torch.zeros(experts, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        logits = self.router(x)
        chosen = self.route(self.name, logits)  # [..., k], no gradient
        gates = torch.softmax(logits, dim=-1).gather(-1, chosen)
        gates = gates / gates.sum(-1, keepdim=True)
        flat = x.reshape(-1, shape[-1])
        experts = chosen.reshape(-1)
        tokens = torch.arange(flat.shape[0], device=x.device).repeat_interleave(self.top_k)
        load = torch.bincount(experts, minlength=self.experts)
        self.load = load.detach().to(torch.float64)
        order = torch.argsort(experts, stable=True)
        tokens, weights = tokens[order], gates.reshape(-1)[order]
        out = torch.zeros_like(flat)
        w_in, b_in, w_out = self.w_in.unbind(0), self.b_in.unbind(0), self.w_out.unbind(0)
        start = 0
        for e, n in enumerate(load.tolist()):
            if n == 0:
                continue
            rows = tokens[start : start + n]
            h = F.gelu(torch.addmm(b_in[e], flat.index_select(0, rows), w_in[e]), approximate="tanh")
            out.index_add_(0, rows, (h @ w_out[e]) * weights[start : start + n, None])
            start += n
        return out.reshape(shape)


class Block(nn.Module):
    """Pre-LN transformer block with a causal self-attention and an MoE feed-forward."""

    def __init__(self, d: int, heads: int, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.moe = MoEFeedForward(d, hidden, experts, top_k)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        out: Tensor = x + self.moe(self.ln2(x))
        return out


class MoELM(nn.Module):
    """Decoder-only MoE language model over ``vocab`` tokens (bytes: 256) and contexts of ``context``."""

    def __init__(
        self,
        *,
        vocab: int = 256,
        context: int = 64,
        d: int = 64,
        heads: int = 4,
        layers: int = 2,
        hidden: int = 128,
        experts: int = 8,
        top_k: int = 2,
    ) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} must be a multiple of heads={heads}")
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        blocks = [Block(d, heads, hidden, experts, top_k) for _ in range(layers)]
        self.blocks = nn.ModuleList(blocks)
        self.ln = nn.LayerNorm(d)
        self.moe_layers = [block.moe for block in blocks]  #: (registered through ``blocks``)
        for i, moe in enumerate(self.moe_layers):
            moe.name = f"blocks.{i}.moe.router"

    def router_names(self) -> list[str]:
        """Slot names of the routers, ``blocks.<i>.moe.router``."""
        return [m.name for m in self.moe_layers]

    def set_routing(self, route: Routing) -> None:
        """Every MoE layer chooses its experts with ``route(name, logits)``."""
        for m in self.moe_layers:
            m.route = route

    def load(self) -> Tensor:
        """Top-k assignments per expert of the last forward, ``[layers, E]`` (float64)."""
        return torch.stack([m.load for m in self.moe_layers])

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits ``[B, T, vocab]`` of ``tokens`` ``[B, T]``."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        out: Tensor = self.ln(x) @ self.embed.weight.t()
        return out
