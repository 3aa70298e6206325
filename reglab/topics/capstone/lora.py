"""Topic capstone: LoRA, a frozen linear layer plus a trainable low-rank update, y = W x + b + (alpha / r) * B A dropout(x).

Hu et al. 2021 ("LoRA: Low-Rank Adaptation of Large Language Models", §4.1): the pretrained weight W
(out, in) stays frozen; the update is the product of B (out, r) and A (r, in) with r much smaller than
in and out. A starts random and B starts at zero, so at step 0 the adapted model *is* the pretrained
one; the update is scaled by alpha / r so that changing r does not change how large a step is.
After training, W + (alpha / r) B A is one ordinary matrix again (`merge`): inference costs nothing extra.

`lora_dropout` drops entries of the adapter's *input* only (the base path never sees it), and only in
train mode, as Microsoft's loralib and Hugging Face PEFT do. PEFT's default is 0.0; published
recipes use 0.05-0.1 (Hu et al. 2021, App. D; Dettmers et al. 2023, App. B).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from reglab.model import CausalSelfAttention

# The course model's attention projections (reglab.model.CausalSelfAttention): LoRA's usual targets.
ATTENTION_TARGETS = ("qkv", "proj")


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * lora_B(lora_A(lora_dropout(x))), with base frozen.

    Attributes: `base` (the wrapped nn.Linear, frozen), `lora_A` (r, in), `lora_B` (out, r),
    `scaling` = alpha / r, `lora_dropout` (an nn.Dropout on the adapter's input).
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, lora_dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)                      # the pretrained weight never moves
        self.r, self.alpha = r, alpha
        # alpha / r: with Adam, doubling r would otherwise double the size of the update (Hu et al. §4.1)
        self.scaling = alpha / r
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=weight.device, dtype=weight.dtype))
        # A like nn.Linear's default init (loralib's choice; the paper says "random Gaussian"); B = 0 so BA = 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(lora_dropout)

    def forward(self, x):
        # (..., in) -> (..., r) -> (..., out); the dropout mask touches the adapter's input only
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * update

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A, the (out, in) matrix the adapter adds to W."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new plain nn.Linear with weight W + (alpha / r) B A and the base's bias; self is left unchanged."""
        merged = copy.deepcopy(self.base)
        merged.weight.copy_(self.base.weight + self.delta_weight())
        for p in merged.parameters():
            p.requires_grad_(False)
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout.p}"


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, lora_dropout: float = 0.0,
             targets=ATTENTION_TARGETS) -> nn.Module:
    """Freeze every parameter of model, then wrap each attention projection named in targets in a LoRALinear.

    Works in place and returns the model; afterwards only the adapters' lora_A and lora_B train.
    """
    unknown = set(targets) - set(ATTENTION_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; allowed: {ATTENTION_TARGETS}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name in targets:
            layer = getattr(module, name, None)
            if isinstance(module, CausalSelfAttention) and isinstance(layer, nn.Linear):
                setattr(module, name, LoRALinear(layer, r=r, alpha=alpha, lora_dropout=lora_dropout))
                wrapped += 1
    if wrapped == 0:
        raise ValueError("add_lora found no CausalSelfAttention projections to wrap (is it a reglab GPT, "
                         "and not already wrapped?)")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of model with every LoRALinear replaced by its merged nn.Linear: the same function, no adapters."""
    merged = copy.deepcopy(model)
    for module in list(merged.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merge())
    return merged


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters an optimizer would update (requires_grad=True)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameter_count(in_features: int, out_features: int, r: int) -> int:
    """r * (in + out): what a rank-r adapter trains instead of the in * out entries of W."""
    return r * (in_features + out_features)
