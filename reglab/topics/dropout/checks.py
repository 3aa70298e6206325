"""Checks of the dropout lab: the student's inverted-dropout module, the four dropout sites of their block,
and the open experiment's budget.

The student writes (see solutions/01_dropout_lab.ipynb for the full signatures):
- `Dropout(p)`, an nn.Module: in train mode y = m * x / (1 - p) with m ~ Bernoulli(1 - p) drawn afresh
  each call, the backward pass reusing the forward's mask; in eval mode the identity. p is the DROP rate.
- `DropoutBlock(vocab_size, block_size, n_embd, n_head, embd_p, attn_p, resid_p, ffn_p)`: token +
  position embeddings, then one pre-norm block x + attn(norm1(x)), x + mlp(norm2(x)), with dropout on
  the embeddings, on the attention weights after the softmax, on each sublayer's output before the
  residual add, and inside the FFN after the activation. forward(idx) returns the (B, T, C) output.
- `open_design(settings)`, the open experiment: {label: (p, steps)} whose steps fit in
  `settings.open_budget`. Its check has no fixed answer: the probe runs the design at the `ci` settings and
  the judge confirms that it ran, and within the budget (recomputed here, not taken from the probe).

How the judges decide. A probe runs the student's object on inputs it makes itself and returns raw
tensors (or counts); a judge recomputes what PyTorch's own implementation would give (torch's dropout
keeps 1 - p and scales by 1/(1 - p); the block's reference is spelled out with torch.nn.functional) and
compares. Nothing depends on matching a random seed: a judge tests the properties every correct
dropout has (each output is 0 or x/(1-p); the kept fraction is 1 - p within binomial noise; the backward
mask is the forward mask; the mean is h and the variance p/(1-p) h^2) and names the misconception
behind the first property that fails.

Statistical tolerances are Z = 5 standard errors, so a correct implementation fails one comparison with
probability 5.7e-7 (two-sided normal tail); no check makes more than 5 such comparisons, so a check's
false-failure rate is below 3e-6. (Probes seed the RNG, so a given implementation always gets the same
verdict; the rate is over the random draws of all correct implementations.) Exact properties (values,
masks) use float tolerances only.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from reglab.checks import Check, CheckFailed, add

Z = 5.0   # standard errors: a two-sided normal tail of 5.7e-7 per comparison


# ---------------------------------------------------------------------------------------------------
# Helpers shared by probes and judges
# ---------------------------------------------------------------------------------------------------

def _tensor(data) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.float64)


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _nonzero_inputs(shape, seed: int) -> torch.Tensor:
    """Values in +-[0.5, 1.5]: no input is 0, so a 0 in the output can only be a dropped unit."""
    gen = _rng(seed)
    magnitude = 0.5 + torch.rand(shape, generator=gen)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return magnitude * sign


def _run_seeded(seed: int, fn):
    """Run fn with the global RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _make(cls, p: float, train: bool = True) -> nn.Module:
    module = cls(p)
    module.train(train)
    return module


def _torch_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The answer key: PyTorch's own dropout on the same input (its own seed)."""
    return _run_seeded(seed, lambda: F.dropout(x, p=p, training=True))


def _kept_band(p: float, n: int) -> tuple[float, float]:
    """The kept fraction of n independent Bernoulli(1 - p) units lies within Z standard errors of 1 - p."""
    half = Z * math.sqrt(p * (1 - p) / n)
    return 1 - p - half, 1 - p + half


def _close(a, b, rtol=1e-5, atol=1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


# ---------------------------------------------------------------------------------------------------
# Dropout: which fraction is kept
# ---------------------------------------------------------------------------------------------------

KEEP_PS, KEEP_SHAPE = (0.2, 0.7), (256, 256)


def probe_keep_fraction(cls) -> dict:
    out = {}
    for i, p in enumerate(KEEP_PS):
        x = _nonzero_inputs(KEEP_SHAPE, seed=10 + i)
        y = _run_seeded(100 + i, lambda: _make(cls, p)(x.clone()))
        out[str(p)] = {"kept": int((y != 0).sum()), "n": y.numel()}
    return {"runs": out}


def judge_keep_fraction(data: dict) -> None:
    for i, p in enumerate(KEEP_PS):
        run = data["runs"][str(p)]
        kept, n = run["kept"] / run["n"], run["n"]
        low, high = _kept_band(p, n)
        reference = _torch_dropout(_nonzero_inputs(KEEP_SHAPE, seed=10 + i), p, seed=200 + i)
        torch_kept = float((reference != 0).double().mean())
        assert low <= torch_kept <= high, "the answer key itself is off: torch's dropout outside the band"
        if low <= kept <= high:
            continue
        said = (f"with p={p} your Dropout kept {kept:.1%} of {n} units; torch.nn.functional.dropout kept "
                f"{torch_kept:.1%} and the derivation says 1 - p = {1 - p:.0%} (allowed {low:.1%} to {high:.1%})")
        if kept == 1.0:
            raise CheckFailed(f"{said}. Nothing was dropped in train mode: draw the mask when self.training is True.")
        keep_low, keep_high = _kept_band(1 - p, n)
        if keep_low <= kept <= keep_high:
            raise CheckFailed(f"{said}. You treat p as the KEEP probability (the convention of Srivastava et al. "
                              f"2014 and TensorFlow 1's keep_prob); in PyTorch p is the probability of DROPPING "
                              f"a unit: keep it with probability 1 - p, e.g. mask = torch.rand_like(x) >= p.")
        raise CheckFailed(f"{said}. Each unit must be kept independently with probability 1 - p.")


add(Check("dropout.keep_fraction", 2, probe_keep_fraction, judge_keep_fraction,
          "keeps a fraction 1 - p of the units (p is the drop probability), like torch's dropout"))


# ---------------------------------------------------------------------------------------------------
# Dropout: what a kept unit becomes
# ---------------------------------------------------------------------------------------------------

SCALE_PS, SCALE_SHAPE = (0.2, 0.6), (64, 64)


def probe_scaling(cls) -> dict:
    runs = {}
    for i, p in enumerate(SCALE_PS):
        x = _nonzero_inputs(SCALE_SHAPE, seed=20 + i)
        y = _run_seeded(120 + i, lambda: _make(cls, p)(x.clone()))
        runs[str(p)] = {"x": x.tolist(), "y": y.detach().double().tolist()}
    return {"runs": runs}


def _ratios(x: torch.Tensor, y: torch.Tensor):
    """Kept units' y / x, and whether every output is either exactly 0 or a constant multiple of x."""
    kept = y != 0
    ratio = (y[kept] / x[kept]) if kept.any() else torch.zeros(0, dtype=torch.float64)
    scale = float(ratio.median()) if ratio.numel() else 0.0
    consistent = bool(torch.allclose(y[kept], scale * x[kept], rtol=1e-5, atol=1e-6)) if ratio.numel() else True
    return kept, scale, consistent


def judge_scaling(data: dict) -> None:
    for i, p in enumerate(SCALE_PS):
        run = data["runs"][str(p)]
        x, y = _tensor(run["x"]), _tensor(run["y"])
        if x.shape != y.shape:
            raise CheckFailed(f"the output has shape {tuple(y.shape)}, the input {tuple(x.shape)}: dropout keeps the shape")
        reference = _torch_dropout(x, p, seed=220 + i)
        _, torch_scale, _ = _ratios(x, reference)
        assert _close(torch_scale, 1 / (1 - p)), "the answer key itself is off: torch's kept units not x/(1-p)"
        kept, scale, consistent = _ratios(x, y)
        target = 1 / (1 - p)
        said = f"with p={p} the kept units came out as {scale:.4g} * x; torch.nn.functional.dropout gives x/(1-p) = {target:.4g} * x"
        if not consistent:
            raise CheckFailed(f"with p={p} the outputs are not each either 0 or one fixed multiple of x "
                              f"(torch.nn.functional.dropout gives 0 or x/(1-p)): multiply x by a 0/1 mask and one "
                              f"scale, nothing else (no noise, no per-unit factors)")
        if _close(scale, target):
            continue
        kept_fraction = float(kept.double().mean())
        if _close(scale, 1 / p):
            if abs(kept_fraction - p) < abs(kept_fraction - (1 - p)):
                raise CheckFailed(f"{said}, and you kept {kept_fraction:.0%} of the units. You treat p as the KEEP "
                                  f"probability (keep with probability p, scale by 1/p); in PyTorch p is the DROP "
                                  f"probability: keep with probability 1 - p and scale by 1/(1 - p).")
            raise CheckFailed(f"{said}. You scale by 1/p instead of 1/(1-p): the kept units are a fraction 1 - p, "
                              f"so dividing by 1 - p is what restores the expectation E[y] = x.")
        if _close(scale, 1.0):
            raise CheckFailed(f"{said}. The kept units are not scaled: inverted dropout divides them by (1 - p) so "
                              f"that E[y] = x in training and eval mode can be the identity; unscaled, the "
                              f"expected output in training is (1 - p) x.")
        if _close(scale, 1 - p):
            raise CheckFailed(f"{said}. You multiply by (1 - p): that is the inference-time rule of standard "
                              f"(non-inverted) dropout; inverted dropout divides the kept units by (1 - p) in training.")
        raise CheckFailed(f"{said}. Scale the kept units by exactly 1/(1 - p).")


add(Check("dropout.scaling", 2, probe_scaling, judge_scaling,
          "each output is 0 or x/(1-p), as torch's dropout gives (inverted dropout)"))


# ---------------------------------------------------------------------------------------------------
# Dropout: eval mode and p = 0
# ---------------------------------------------------------------------------------------------------

def probe_eval_identity(cls) -> dict:
    x = _nonzero_inputs((32, 32), seed=30)
    module = _make(cls, 0.4, train=False)
    first = _run_seeded(130, lambda: module(x.clone()))
    second = _run_seeded(131, lambda: module(x.clone()))
    zero_p = _run_seeded(132, lambda: _make(cls, 0.0, train=True)(x.clone()))
    return {"x": x.tolist(), "eval_first": first.detach().double().tolist(),
            "eval_second": second.detach().double().tolist(), "train_p0": zero_p.detach().double().tolist()}


def judge_eval_identity(data: dict) -> None:
    x = _tensor(data["x"])
    reference = F.dropout(x, p=0.4, training=False)          # the answer key: torch's dropout in eval mode
    for key, what in (("eval_first", "in eval mode (p=0.4)"), ("eval_second", "in eval mode, called again"),
                      ("train_p0", "in train mode with p=0")):
        y = _tensor(data[key])
        if torch.allclose(y, reference, rtol=1e-6, atol=1e-7):
            continue
        if not bool(torch.isfinite(y).all()):
            raise CheckFailed(f"{what} your Dropout returned inf or nan: a division by p, which is 0 here? The "
                              f"kept units are scaled by 1/(1 - p), and p = 0 must give x back unchanged.")
        if key != "train_p0" and (y == 0).any():
            raise CheckFailed(f"{what} your Dropout still zeroes units ({int((y == 0).sum())} of {y.numel()}): dropout "
                              f"is active in eval mode. Return x unchanged when self.training is False "
                              f"(torch.nn.functional.dropout(x, p, training=False) is the identity).")
        if key != "train_p0" and torch.allclose(y, 0.6 * x, rtol=1e-6):
            raise CheckFailed(f"{what} your Dropout multiplies by (1 - p): that is standard dropout's inference rule. "
                              f"With inverted dropout the training pass already divides by (1 - p), so eval mode is "
                              f"the identity.")
        raise CheckFailed(f"{what} your Dropout changed its input (largest change "
                          f"{float((y - x).abs().max()):.3g}); it must return x unchanged")


add(Check("dropout.eval_identity", 1, probe_eval_identity, judge_eval_identity,
          "eval mode (and p = 0) is the identity, as torch's dropout is"))


# ---------------------------------------------------------------------------------------------------
# Dropout: the backward pass
# ---------------------------------------------------------------------------------------------------

BACKWARD_P = 0.3


def probe_backward_mask(cls) -> dict:
    x = _nonzero_inputs((64, 64), seed=40).requires_grad_(True)
    upstream = _nonzero_inputs((64, 64), seed=41)

    def run():
        y = _make(cls, BACKWARD_P)(x)
        if not y.requires_grad:
            return y, None
        y.backward(upstream)
        return y, x.grad

    y, grad = _run_seeded(140, run)
    return {"y": y.detach().double().tolist(), "upstream": upstream.tolist(), "x": x.detach().tolist(),
            "grad": None if grad is None else grad.double().tolist()}


def judge_backward_mask(data: dict) -> None:
    p = BACKWARD_P
    if data["grad"] is None:
        raise CheckFailed("no gradient reached the input: the output does not require grad (computed under "
                          "torch.no_grad(), detached, or the backward returns None for x)")
    y, upstream, grad = _tensor(data["y"]), _tensor(data["upstream"]), _tensor(data["grad"])
    forward_mask = y != 0
    # the answer key: autograd through torch's dropout gives d y / d x = m / (1 - p) with the forward's m
    x = _tensor(data["x"]).requires_grad_(True)
    reference = _torch_dropout(x, p, seed=240)
    reference.backward(upstream)
    assert torch.allclose(x.grad, (reference != 0) * upstream / (1 - p)), "the answer key itself is off"
    expected = forward_mask * upstream / (1 - p)
    if torch.allclose(grad, expected, rtol=1e-5, atol=1e-6):
        return
    backward_mask = grad != 0
    mismatched = int((backward_mask != forward_mask).sum())
    if mismatched == 0:
        kept = forward_mask
        scale = float((grad[kept] / upstream[kept]).median())
        raise CheckFailed(f"the backward uses the forward's mask but scales by {scale:.4g} instead of "
                          f"1/(1-p) = {1 / (1 - p):.4g}: d y/d x = m/(1 - p), the same factor as the forward")
    if bool(backward_mask.all()):
        raise CheckFailed(f"the backward passes the gradient to every unit, {mismatched} of which were dropped in "
                          f"the forward: a dropped unit did not affect the output, so its gradient must be 0 "
                          f"(d y/d x = m/(1 - p)); multiply the gradient by the saved mask")
    raise CheckFailed(f"the backward's mask differs from the forward's at {mismatched} of {y.numel()} units: the "
                      f"backward must reuse the mask drawn in the forward (save it with ctx.save_for_backward), "
                      f"not draw a new one")


add(Check("dropout.backward_mask", 2, probe_backward_mask, judge_backward_mask,
          "the gradient is upstream * m / (1 - p) with the forward pass's mask m"))


# ---------------------------------------------------------------------------------------------------
# Dropout, hidden: mean and variance over many draws; fresh independent masks; any shape and dtype
# ---------------------------------------------------------------------------------------------------

MOMENT_P, MOMENT_H, MOMENT_N = 0.3, 1.5, 200_000


def _value_counts(y: torch.Tensor) -> dict:
    values, counts = torch.unique(y.detach().double(), return_counts=True)
    return {"values": values.tolist()[:50], "counts": counts.tolist()[:50], "n": y.numel()}


def probe_moments(cls) -> dict:
    x = torch.full((MOMENT_N,), MOMENT_H)
    return _value_counts(_run_seeded(150, lambda: _make(cls, MOMENT_P)(x.clone())))


def _moments(table: dict) -> tuple[float, float]:
    values, counts, n = _tensor(table["values"]), _tensor(table["counts"]), table["n"]
    if int(counts.sum()) != n:
        raise CheckFailed(f"the output takes more than 50 distinct values for a constant input h={MOMENT_H}: "
                          f"dropout's output is either 0 or h/(1 - p)")
    mean = float((values * counts).sum() / n)
    var = float((counts * (values - mean) ** 2).sum() / (n - 1))
    return mean, var


def judge_moments(data: dict) -> None:
    p, h, n = MOMENT_P, MOMENT_H, MOMENT_N
    mean, var = _moments(data)
    derived_var = p / (1 - p) * h ** 2                                   # Var[m h/(1-p)] = p/(1-p) h^2
    mu4 = p * h ** 4 + (1 - p) * (h * p / (1 - p)) ** 4                   # E[(y - h)^4]
    mean_tol = Z * math.sqrt(derived_var / n)                            # standard error of a mean
    var_tol = Z * math.sqrt(mu4 / n - derived_var ** 2 * (n - 3) / (n * (n - 1)))   # s.e. of a sample variance
    torch_mean, torch_var = _moments(_value_counts(_torch_dropout(torch.full((n,), h), p, seed=250)))
    assert abs(torch_mean - h) <= mean_tol and abs(torch_var - derived_var) <= var_tol, "answer key off"
    said = (f"over {n} draws of h={h} with p={p} your Dropout's output has mean {mean:.4f} and variance {var:.4f}; "
            f"torch.nn.functional.dropout gives {torch_mean:.4f} and {torch_var:.4f}, the derivation h = {h} and "
            f"p/(1-p) h^2 = {derived_var:.4f}")
    if abs(mean - h) > mean_tol:
        raise CheckFailed(f"{said}. The mean must stay h (E[m]/(1 - p) = 1): check the keep probability and the scale.")
    if abs(var - derived_var) > var_tol:
        raise CheckFailed(f"{said}. The mean is right but the variance is not: the mask is not Bernoulli(1 - p) per unit.")


add(Check("dropout.moments", 2, probe_moments, judge_moments,
          "over many draws the mean is h and the variance p/(1-p) h^2, as with torch's dropout"))


FRESH_P, FRESH_SHAPE = 0.4, (64, 64)


def probe_fresh_masks(cls) -> dict:
    x = torch.ones(FRESH_SHAPE)

    def run():
        module = _make(cls, FRESH_P)
        return module(x.clone()), module(x.clone())

    first, second = _run_seeded(160, run)
    return {"first": (first != 0).int().tolist(), "second": (second != 0).int().tolist()}


def _lag_correlation(mask: torch.Tensor, dim: int) -> float:
    a, b = mask.narrow(dim, 0, mask.size(dim) - 1).flatten(), mask.narrow(dim, 1, mask.size(dim) - 1).flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def judge_fresh_masks(data: dict) -> None:
    p = FRESH_P
    first, second = _tensor(data["first"]), _tensor(data["second"])
    n = first.numel()
    # two independent masks agree on a unit with probability q = p^2 + (1-p)^2
    q = p ** 2 + (1 - p) ** 2
    agree = float((first == second).double().mean())
    if agree > q + Z * math.sqrt(q * (1 - q) / n):
        raise CheckFailed(f"two calls agreed on {agree:.1%} of the units (independent masks agree on "
                          f"p^2 + (1-p)^2 = {q:.0%}): the mask is drawn once (e.g. in __init__, or with a fixed "
                          f"seed) and reused; draw a new mask on every forward call")
    for dim, name in ((0, "column"), (1, "row")):
        corr = _lag_correlation(first, dim)
        tol = Z / math.sqrt(first.size(0) * (first.size(1) - 1))           # sd of a sample correlation ~ 1/sqrt(n)
        if abs(corr) > tol:
            raise CheckFailed(f"neighbouring units along a {name} are dropped together (correlation {corr:.2f}): "
                              f"each unit needs its own independent draw (torch.rand_like(x), not one draw per {name})")


add(Check("dropout.fresh_masks", 1, probe_fresh_masks, judge_fresh_masks,
          "every call draws a new mask, independently for each unit"))


SHAPES = ((1000,), (8, 16, 24), (4, 3, 8, 8))


def probe_any_shape(cls) -> dict:
    runs = []
    for i, shape in enumerate(SHAPES):
        x = _nonzero_inputs(shape, seed=70 + i).double()
        before = x.clone()
        y = _run_seeded(170 + i, lambda: _make(cls, 0.25)(x))
        runs.append({"shape": list(y.shape), "dtype": str(y.dtype), "input_unchanged": bool(torch.equal(x, before)),
                     "x": before.flatten().tolist(), "y": y.detach().flatten().tolist()})
    return {"runs": runs}


def judge_any_shape(data: dict) -> None:
    for shape, run in zip(SHAPES, data["runs"]):
        if run["shape"] != list(shape):
            raise CheckFailed(f"an input of shape {shape} came out with shape {tuple(run['shape'])}")
        if run["dtype"] != "torch.float64":
            raise CheckFailed(f"a float64 input came out as {run['dtype']}: make the mask in x's dtype (torch.rand_like(x))")
        if not run["input_unchanged"]:
            raise CheckFailed("the forward modified its input in place: autograd and the caller may still need x")
        x, y = _tensor(run["x"]), _tensor(run["y"])
        kept = y != 0
        if not torch.allclose(y[kept], x[kept] / 0.75, rtol=1e-9, atol=1e-12):
            raise CheckFailed(f"for an input of shape {shape} the kept units are not x/(1-p)")


add(Check("dropout.any_shape", 1, probe_any_shape, judge_any_shape,
          "works on inputs of any shape and dtype, without changing the input"))


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


# ---------------------------------------------------------------------------------------------------
# The open experiment: a design the student chose, run within the budget (no fixed answer)
# ---------------------------------------------------------------------------------------------------

OPEN_BUDGET = "ci"    # the probe runs the design at this budget's settings, as the grader runs the lab


def probe_open_experiment(design) -> dict:
    """Ask the design for its runs at the ci settings and, if the budget allows them, train them (one seed,
    the built-in corpus, the lab's sweep); return each run's p, steps, steps trained and best val loss."""
    from reglab.budget import Session
    from reglab.topics.dropout.lab import design_problems, lab_settings, open_experiment, open_record, small_data_task
    settings = lab_settings(OPEN_BUDGET)
    runs = design(settings)
    if not isinstance(runs, dict):
        return {"design": repr(runs)[:200]}
    described = {str(name): list(run) if isinstance(run, (tuple, list)) else repr(run)[:80]
                 for name, run in runs.items()}
    if design_problems(runs, settings.open_budget):
        return {"design": described}
    with torch.random.fork_rng(devices=[]):
        session = Session(budget=OPEN_BUDGET, device=torch.device("cpu"), seed=0)
        text, task = small_data_task(settings, "builtin", session)
        results = open_experiment(settings, text, task, session, design, progress=False)
    return {"design": described, "record": open_record(settings, runs, results)}


def judge_open_experiment(data: dict) -> None:
    from reglab.topics.dropout.lab import design_problems, lab_settings
    budget = lab_settings(OPEN_BUDGET).open_budget          # the grader's budget, not the probe's word for it
    design = data["design"]
    if not isinstance(design, dict):
        raise CheckFailed(f"open_design(settings) must return a dict {{label: (p, steps)}}; it returned {design}")
    runs = {name: tuple(run) if isinstance(run, list) else run for name, run in design.items()}
    problems = design_problems(runs, budget)
    if problems:
        raise CheckFailed("the open experiment's design is refused: " + "; ".join(problems))
    record = data.get("record")
    if not isinstance(record, dict) or set(record.get("runs", {})) != set(runs):
        raise CheckFailed("the design was not run: the probe found no result for each of its runs")
    for name, found in record["runs"].items():
        if found["steps_trained"] != runs[name][1]:
            raise CheckFailed(f"run {name!r} trained {found['steps_trained']} steps, its design says {runs[name][1]}")
        if not (isinstance(found["best_val_loss"], float) and math.isfinite(found["best_val_loss"])):
            raise CheckFailed(f"run {name!r} reached no finite val loss ({found['best_val_loss']!r})")
    spent = sum(found["steps_trained"] for found in record["runs"].values())
    if spent > budget:
        raise CheckFailed(f"the runs trained {spent} optimizer steps, over the budget of {budget}")


add(Check("dropout.open_experiment", 1, probe_open_experiment, judge_open_experiment,
          "your open experiment's design runs within its budget of optimizer steps (what it finds is yours)"))
