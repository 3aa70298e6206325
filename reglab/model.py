"""Core: the course transformer, a small decoder-only GPT with a dropout knob at every site the course discusses.

Read it top to bottom like a chapter: config, normalization, attention, feed-forward, block, model.
Dropout is only ever active in train mode (`model.train()`); `model.eval()` makes every forward
deterministic, including the dropout that PyTorch fuses into `scaled_dot_product_attention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# The four places dropout can go, in the order a token meets them.
DROPOUT_SITES = ("embd_dropout", "attn_dropout", "ffn_dropout", "resid_dropout")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 128        # characters of the corpus (or tokens of a synthetic task)
    block_size: int = 64         # longest context the position table covers
    n_layer: int = 2             # small enough that a CPU trains it in seconds
    n_head: int = 4              # n_embd must divide evenly by it
    n_embd: int = 64             # width of the residual stream
    mlp_ratio: int = 4           # FFN hidden width = mlp_ratio * n_embd (GPT-2's choice)
    # --- regularization knobs (dropout probabilities, PyTorch's convention: p is the DROP rate) ---
    embd_dropout: float = 0.0    # on token + position embeddings, before the first block
    attn_dropout: float = 0.0    # on the attention weights, after the softmax
    ffn_dropout: float = 0.0     # inside the FFN, after the activation
    resid_dropout: float = 0.0   # on each sublayer's output, before it is added to the residual
    # --- architecture choices ---
    # Llama-style options: the weight-decay lab checks the decay split on such a block (RMSNorm, SwiGLU, no biases)
    norm: str = "layernorm"      # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    mlp: str = "gelu"            # "gelu" (GPT-2) or "swiglu" (Llama, PaLM)
    bias: bool = True            # biases in Linear layers; Llama and PaLM drop them
    use_sdpa: bool = True        # fused scaled_dot_product_attention; False spells attention out
    # qk-layernorm: normalize q and k per head before q.k, which bounds the attention logits (Dehghani et al.
    # 2023, ViT-22B; Wortsman et al. 2023 §3.1: it removes attention-logit growth at high learning rates)
    qk_norm: bool = False
    n_classes: int | None = None # None: language model; an int: classifier head with that many classes
    pool: str = "last"           # classifier input: the "last" position or the "mean" over positions

    def __post_init__(self):
        for site in DROPOUT_SITES:
            p = getattr(self, site)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{site} must be in [0, 1), got {p!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.pool not in ("last", "mean"):
            raise ValueError(f"pool must be 'last' or 'mean', got {self.pool!r}")
        if self.n_classes is not None and self.n_classes < 2:
            raise ValueError(f"n_classes must be None or at least 2, got {self.n_classes!r}")

    def with_dropout(self, p: float, sites=DROPOUT_SITES) -> "GPTConfig":
        """The same config with dropout p at the named sites and 0 elsewhere."""
        unknown = set(sites) - set(DROPOUT_SITES)
        if unknown:
            raise ValueError(f"unknown dropout sites {sorted(unknown)}; allowed: {DROPOUT_SITES}")
        return replace(self, **{site: (p if site in sites else 0.0) for site in DROPOUT_SITES})


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g: LayerNorm without the mean subtraction and the bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over the last dimension, of width dim (n_embd unless given: qk-norm uses head_size)."""
    dim = config.n_embd if dim is None else dim
    if config.norm == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.use_sdpa = config.use_sdpa
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_p = config.attn_dropout            # a float: SDPA takes the probability, not a module
        self.attn_dropout = nn.Dropout(config.attn_dropout)  # the same site, spelled out
        self.resid_dropout = nn.Dropout(config.resid_dropout)
        # qk-norm per head; Identity (no parameters, the same tensor back) when off. Both exist either way,
        # so a forward hook on them sees the q and k that enter q.k (reglab.train.stability_stats).
        head_size = config.n_embd // config.n_head
        self.q_norm = make_norm(config, head_size) if config.qk_norm else nn.Identity()
        self.k_norm = make_norm(config, head_size) if config.qk_norm else nn.Identity()
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("causal_mask", mask.view(1, 1, config.block_size, config.block_size),
                             persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # with qk-norm, |q.k| / sqrt(hs) <= ||g_q * q_hat|| ||g_k * k_hat|| / sqrt(hs), whatever W_q and W_k are
        q, k = self.q_norm(q), self.k_norm(k)                                # (B, nh, T, hs)
        if self.use_sdpa:
            # dropout_p only while training: SDPA has no train/eval switch of its own, and code that
            # passes the probability unconditionally keeps dropping attention weights at eval time.
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.attn_p if self.training else 0.0)
        else:
            # att = softmax(q k^T / sqrt(hs)) with future positions masked, then dropout on the weights
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))          # (B, nh, T, T)
            att = att.masked_fill(~self.causal_mask[:, :, :T, :T], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v                                                      # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                     # (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            hidden = 2 * hidden // 3   # keeps the parameter count of the GELU FFN (Shazeer 2020)
            self.gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x):
        # GELU: down(drop(gelu(up x)));  SwiGLU: down(drop(silu(gate x) * up x))
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x))
        return self.resid_dropout(self.down(self.ffn_dropout(h)))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.embd_dropout = nn.Dropout(config.embd_dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        if config.n_classes is None:
            self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            self.head.weight = self.tok_emb.weight   # weight tying (GPT-2; Press & Wolf 2017)
        else:
            self.head = nn.Linear(config.n_embd, config.n_classes, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: residual projections get std 0.02 / sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters counted once (the tied head shares the token embedding)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx):
        """idx (B, T) token ids -> logits (B, T, vocab_size), or (B, n_classes) for a classifier."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.embd_dropout(self.tok_emb(idx) + self.pos_emb(pos))        # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.norm_f(x)
        if self.config.n_classes is not None:
            x = x[:, -1] if self.config.pool == "last" else x.mean(dim=1)    # (B, C)
        return self.head(x)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 means greedy decoding."""
        if self.config.n_classes is not None:
            raise ValueError("generate() needs a language model (n_classes=None)")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1]         # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
