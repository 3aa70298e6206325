"""Checks of the dropout lab, the block: the four dropout sites of the student's `DropoutBlock`.

The block's reference is spelled out with torch.nn.functional on fixed small weights; its probes put
`nn.Dropout`-compatible modules in the block's slots and compare each site's effect with what that
site's p should do (see reglab.topics.dropout.checks for the Dropout module's checks and tolerances).
Imported by that module, which the check registry loads for ids "dropout.*".
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from reglab.checks import Check, CheckFailed, add
from reglab.topics.dropout.checks import _close, _kept_band, _rng, _run_seeded, _tensor

# ---------------------------------------------------------------------------------------------------
# The block: a fixed small configuration with known weights
# ---------------------------------------------------------------------------------------------------

VOCAB, BLOCK, EMBD, HEADS, BATCH = 11, 8, 24, 2, 4     # head size 12 >= T = 8: the attention is recoverable
SITES = ("embd_p", "attn_p", "resid_p", "ffn_p")
SITE_NAMES = {"embd_p": "embedding", "attn_p": "attention-weights", "resid_p": "residual", "ffn_p": "FFN"}
SITE_P = 0.3


def block_weights() -> dict[str, torch.Tensor]:
    """The block's weights (the names its __init__ gives), random but of a size that keeps activations O(1)."""
    gen = _rng(77)

    def normal(*shape, std=1.0):
        return std * torch.randn(*shape, generator=gen)

    C, H = EMBD, 4 * EMBD
    weights = {"tok_emb.weight": normal(VOCAB, C), "pos_emb.weight": normal(BLOCK, C)}
    for norm in ("norm1", "norm2"):
        weights[f"{norm}.weight"] = 1 + normal(C, std=0.1)
        weights[f"{norm}.bias"] = normal(C, std=0.1)
    for name, (n_in, n_out) in {"qkv": (C, 3 * C), "proj": (C, C), "up": (C, H), "down": (H, C)}.items():
        weights[f"{name}.weight"] = normal(n_out, n_in, std=1 / math.sqrt(n_in))   # (out, in), like nn.Linear
        weights[f"{name}.bias"] = normal(n_out, std=0.1)
    return weights


def block_tokens() -> torch.Tensor:
    return torch.randint(VOCAB, (BATCH, BLOCK), generator=_rng(78))        # (B, T)


def _load(cls, ps: dict):
    """The student's block with the known weights and torch's nn.Dropout in its four dropout slots."""
    model = cls(VOCAB, BLOCK, EMBD, HEADS, **ps)
    result = model.load_state_dict(block_weights(), strict=False)
    if result.unexpected_keys:
        return None, f"the block has no parameters named {result.unexpected_keys}: keep the given __init__"
    for slot, p in (("embd_dropout", ps["embd_p"]), ("attn_dropout", ps["attn_p"]),
                    ("resid_dropout", ps["resid_p"]), ("ffn_dropout", ps["ffn_p"])):
        setattr(model, slot, nn.Dropout(p))    # a block check tests the sites, not the student's Dropout
    return model.to(torch.float32), None


def _record_block(cls, ps: dict, train: bool, seed: int) -> dict:
    """One forward of the student's block; the inputs of norm1, proj, norm2 and down, and the output."""
    model, error = _load(cls, ps)
    if error:
        return {"error": error}
    model.train(train)
    seen = {}
    names = {"norm1": "norm1_in", "proj": "proj_in", "norm2": "norm2_in", "down": "down_in"}

    def pre_hook_for(key):
        def hook(module, args):
            seen.setdefault(key, []).append(args[0].detach().double().tolist())
        return hook

    handles = [getattr(model, name).register_forward_pre_hook(pre_hook_for(key)) for name, key in names.items()]
    try:
        out = _run_seeded(seed, lambda: model(block_tokens()))
    finally:
        for handle in handles:
            handle.remove()
    for key, values in seen.items():
        if len(values) != 1:
            return {"error": f"{key.split('_')[0]} was called {len(values)} times in one forward; the block calls it once"}
    missing = [name for name, key in names.items() if key not in seen]
    if missing:
        return {"error": f"the forward never called self.{missing[0]}: use the layers the given __init__ creates"}
    if tuple(out.shape) != (BATCH, BLOCK, EMBD):
        return {"error": f"forward(idx) returned shape {tuple(out.shape)}; expected (B, T, C) = {(BATCH, BLOCK, EMBD)}"}
    return {"ps": ps, **{key: values[0] for key, values in seen.items()}, "out": out.detach().double().tolist()}


def _weights64() -> dict[str, torch.Tensor]:
    return {name: w.double() for name, w in block_weights().items()}


def _layer_norm(x, w, name):
    return F.layer_norm(x, (EMBD,), w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)


def _linear(x, w, name):
    return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])


def _heads(t):
    return t.view(BATCH, BLOCK, HEADS, EMBD // HEADS).transpose(1, 2)              # (B, nh, T, hs)


def _attention_weights(normed, w):
    q, k, _ = _linear(normed, w, "qkv").split(EMBD, dim=2)
    q, k = _heads(q), _heads(k)
    scores = q @ k.transpose(-2, -1) / math.sqrt(EMBD // HEADS)                   # (B, nh, T, T)
    causal = torch.ones(BLOCK, BLOCK, dtype=torch.bool).tril()
    return F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def reference_block(idx: torch.Tensor) -> torch.Tensor:
    """The block without dropout, spelled out with torch.nn.functional in float64: the answer key."""
    w = _weights64()
    x = F.embedding(idx, w["tok_emb.weight"]) + w["pos_emb.weight"][: idx.size(1)]     # (B, T, C)
    normed = _layer_norm(x, w, "norm1")
    _, _, v = _linear(normed, w, "qkv").split(EMBD, dim=2)
    y = (_attention_weights(normed, w) @ _heads(v)).transpose(1, 2).reshape(BATCH, BLOCK, EMBD)
    x = x + _linear(y, w, "proj")
    hidden = F.gelu(_linear(_layer_norm(x, w, "norm2"), w, "up"))
    return x + _linear(hidden, w, "down")


# ---------------------------------------------------------------------------------------------------
# The block: eval mode
# ---------------------------------------------------------------------------------------------------

def probe_block_eval(cls) -> dict:
    all_on = {site: SITE_P for site in SITES}
    all_off = {site: 0.0 for site in SITES}
    return {"eval_first": _record_block(cls, all_on, train=False, seed=180),
            "eval_second": _record_block(cls, all_on, train=False, seed=181),
            "train_p0": _record_block(cls, all_off, train=True, seed=182)}


def judge_block_eval(data: dict) -> None:
    for run in data.values():
        if "error" in run:
            raise CheckFailed(run["error"])
    reference = reference_block(block_tokens())
    plain = _tensor(data["train_p0"]["out"])
    gap = float((plain - reference).abs().max())
    if gap > 1e-4:
        raise CheckFailed(f"with every p = 0 your block's output differs from the reference block by up to {gap:.3g}: "
                          f"it should compute x = tok_emb(idx) + pos_emb(pos); x = x + proj(attention(norm1(x))); "
                          f"x = x + down(gelu(up(norm2(x)))) with causal softmax(q k^T / sqrt(head size)) attention, "
                          f"heads split as view(B, T, n_head, C // n_head), and exact (erf) GELU")
    first, second = _tensor(data["eval_first"]["out"]), _tensor(data["eval_second"]["out"])
    if not torch.equal(first, second) or float((first - reference).abs().max()) > 1e-4:
        raise CheckFailed(f"in eval mode, with every p = {SITE_P}, your block's output is not the dropout-free "
                          f"reference (largest difference {float((first - reference).abs().max()):.3g}; two eval "
                          f"calls {'agree' if torch.equal(first, second) else 'differ'}): dropout is active in eval "
                          f"mode. A common cause: scaled_dot_product_attention(dropout_p=p) drops whenever p > 0, so "
                          f"pass dropout_p=p if self.training else 0.0 (F.dropout needs training=self.training too)")


add(Check("dropout.block_eval", 1, probe_block_eval, judge_block_eval,
          "with dropout off (eval mode, or p = 0) the block computes the reference pre-norm block"))


# ---------------------------------------------------------------------------------------------------
# The block: each site, one at a time and all together
# ---------------------------------------------------------------------------------------------------

def _site_relation(before: torch.Tensor, after: torch.Tensor, atol: float) -> dict:
    """How `after` relates to `before` unit by unit: is each after either 0 or s * before for one scale s?

    Units whose `before` is within atol of 0 say nothing and are left out.
    """
    informative = before.abs() > 10 * atol
    b, a = before[informative], after[informative]
    identity = bool(torch.allclose(after, before, rtol=1e-4, atol=atol))
    dropped = a.abs() <= atol
    kept = ~dropped
    scale = float((a[kept] / b[kept]).median()) if kept.any() else 0.0
    consistent = bool(((a - scale * b).abs() <= atol + 1e-4 * (scale * b).abs())[kept].all())
    return {"identity": identity, "consistent": consistent, "scale": scale,
            "kept": float(kept.double().mean()) if b.numel() else 1.0, "n": int(b.numel())}


def _site_hint(site: str, attention_rows_sum_to_one: bool) -> str:
    if site == "embd_p":
        return ("embedding dropout acts on the sum tok_emb(idx) + pos_emb(pos), the tensor that enters the "
                "block (not on one of the two alone, not after the norm)")
    if site == "attn_p":
        if attention_rows_sum_to_one:
            return ("the attention rows still sum to 1, so the dropout acted before the softmax (on the scores); "
                    "attention dropout zeroes weights AFTER the softmax, so a row sums to about 1 only on average")
        return ("attention dropout acts on the attention weights after the softmax, before they multiply v "
                "(not on q, k, v, and not on the output att @ v)")
    if site == "resid_p":
        return ("residual dropout acts on each sublayer's output before it is added: x + drop(f(norm(x))); "
                "dropping after the add, drop(x + f(...)), also drops the skip path")
    return ("FFN dropout acts inside the FFN on the activation's output: down(drop(gelu(up(norm2(x))))), not "
            "before the activation and not after down (that is the residual site)")


def _judge_site(site: str, where: str, relation: dict, ps: dict, rows_sum_to_one: bool = False) -> None:
    p = ps[site]
    name = SITE_NAMES[site]
    others = {s: q for s, q in ps.items() if s != site and q > 0}
    if p == 0:
        if relation["identity"]:
            return
        guess = [s for s, q in others.items() if relation["consistent"] and _close(relation["scale"], 1 / (1 - q), 1e-3)]
        culprit = f"; it looks like the {SITE_NAMES[guess[0]]} dropout ({guess[0]}={others[guess[0]]}) is applied here" \
            if len(guess) == 1 else ""
        raise CheckFailed(f"with {site}=0 (only {', '.join(f'{s}={q}' for s, q in others.items())} set), the {where} "
                          f"still changed: dropout is applied at the wrong site{culprit}. "
                          f"Hint for the {name} site: {_site_hint(site, rows_sum_to_one)}")
    if relation["identity"]:
        raise CheckFailed(f"with {site}={p} nothing was dropped at the {name} site ({where} passed unchanged): "
                          f"dropout is missing there. {_site_hint(site, False)}")
    if not relation["consistent"]:
        raise CheckFailed(f"with {site}={p}, the {where} is neither 0 nor (the dropout-free value)/(1 - p) unit by "
                          f"unit: dropout is applied at a different point. {_site_hint(site, rows_sum_to_one)}")
    scale, target = relation["scale"], 1 / (1 - p)
    if not _close(scale, target, 1e-3):
        wrong = [s for s, q in others.items() if _close(scale, 1 / (1 - q), 1e-3)]
        if wrong:
            raise CheckFailed(f"the {name} site drops with p={others[wrong[0]]} ({wrong[0]}), not {site}={p}: "
                              f"the wrong module or probability is wired to this site")
        raise CheckFailed(f"at the {name} site the kept units were scaled by {scale:.4g}, expected 1/(1 - {site}) = "
                          f"{target:.4g}")
    low, high = _kept_band(p, relation["n"])
    if not low <= relation["kept"] <= high:
        raise CheckFailed(f"at the {name} site {relation['kept']:.1%} of {relation['n']} units were kept; with "
                          f"{site}={p} expected {1 - p:.0%} (allowed {low:.1%} to {high:.1%})")


def _recover_attention(proj_in: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The (B, nh, T, T) matrix A with y = A v per head, by least squares (v has more columns than rows)."""
    y = _heads(proj_in)                                                               # (B, nh, T, hs)
    return y @ torch.linalg.pinv(v)                                                   # (B, nh, T, T)


def judge_block_run(run: dict) -> None:
    """Every site of one recorded train-mode forward, in the order a token meets them."""
    if "error" in run:
        raise CheckFailed(run["error"])
    ps, w = run["ps"], _weights64()
    x_in, proj_in = _tensor(run["norm1_in"]), _tensor(run["proj_in"])
    x_mid, down_in, out = _tensor(run["norm2_in"]), _tensor(run["down_in"]), _tensor(run["out"])
    idx = block_tokens()
    embeddings = F.embedding(idx, w["tok_emb.weight"]) + w["pos_emb.weight"][:BLOCK]
    _judge_site("embd_p", "input of norm1", _site_relation(embeddings, x_in, 1e-5), ps)
    normed = _layer_norm(x_in, w, "norm1")
    _, _, v = _linear(normed, w, "qkv").split(EMBD, dim=2)
    attention = _attention_weights(normed, w)
    recovered = _recover_attention(proj_in, _heads(v))
    causal = torch.ones(BLOCK, BLOCK, dtype=torch.bool).tril()
    rows_sum_to_one = bool(torch.allclose(recovered.sum(-1), torch.ones_like(recovered.sum(-1)), atol=1e-3))
    future = float(recovered.masked_select(~causal).abs().max())
    if future > 1e-3 and ps["attn_p"] == 0:
        raise CheckFailed("the attention output is not a causal mix of v: keep the causal mask (position t sees 0..t)")
    relation = _site_relation(attention.masked_select(causal), recovered.masked_select(causal), 1e-3)
    if future > 1e-3:
        relation["consistent"] = False
    _judge_site("attn_p", "attention weights (recovered from the input of proj)", relation, ps, rows_sum_to_one)
    attn_branch = _linear(proj_in, w, "proj")
    _judge_site("resid_p", "attention branch's contribution to the residual stream (input of norm2 minus input of norm1)",
                _site_relation(attn_branch, x_mid - x_in, 1e-5), ps)
    activation = F.gelu(_linear(_layer_norm(x_mid, w, "norm2"), w, "up"))
    _judge_site("ffn_p", "input of down", _site_relation(activation, down_in, 1e-5), ps)
    _judge_site("resid_p", "FFN branch's contribution to the residual stream (output minus input of norm2)",
                _site_relation(_linear(down_in, w, "down"), out - x_mid, 1e-5), ps)


def probe_block_sites(cls) -> dict:
    runs = {}
    for i, site in enumerate(SITES):
        ps = {s: (SITE_P if s == site else 0.0) for s in SITES}
        runs[site] = _record_block(cls, ps, train=True, seed=190 + i)
    return runs


def judge_block_sites(data: dict) -> None:
    for site in SITES:
        judge_block_run(data[site])


add(Check("dropout.block_sites", 3, probe_block_sites, judge_block_sites,
          "with p at one site at a time, exactly that site drops, with the right mask and scale"))


ALL_SITES_PS = {"embd_p": 0.1, "attn_p": 0.2, "resid_p": 0.3, "ffn_p": 0.4}


def probe_block_all_sites(cls) -> dict:
    return _record_block(cls, dict(ALL_SITES_PS), train=True, seed=195)


def judge_block_all_sites(data: dict) -> None:
    judge_block_run(data)


add(Check("dropout.block_all_sites", 2, probe_block_all_sites, judge_block_all_sites,
          "with four different p at once, each site drops with its own p"))
