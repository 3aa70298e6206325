"""Checks of the dropout lab: the student's inverted-dropout module, the four dropout sites of their block
(in `block_checks`), and the open experiment's budget.

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

from reglab.checks import Check, CheckFailed, Shortcut, add, refuse
from reglab.experiments import open_check

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


def _seeded_outputs(cls, ps, shape, input_seed: int, run_seed: int):
    """(p, x, y) for each p: a train-mode cls(p) on fixed nonzero inputs x, its RNG seeded per p."""
    for i, p in enumerate(ps):
        x = _nonzero_inputs(shape, seed=input_seed + i)
        yield p, x, _run_seeded(run_seed + i, lambda: _make(cls, p)(x.clone()))


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
    return {"runs": {str(p): {"kept": int((y != 0).sum()), "n": y.numel()}
                     for p, x, y in _seeded_outputs(cls, KEEP_PS, KEEP_SHAPE, input_seed=10, run_seed=100)}}


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
    return {"runs": {str(p): {"x": x.tolist(), "y": y.detach().double().tolist()}
                     for p, x, y in _seeded_outputs(cls, SCALE_PS, SCALE_SHAPE, input_seed=20, run_seed=120)}}


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
# Shortcuts: the Dropout checks refuse PyTorch's dropout (the answer key), in any of its spellings.
# The block checks do not: their probe puts nn.Dropout in the block's slots itself.
# ---------------------------------------------------------------------------------------------------

refuse("dropout", "keep_fraction scaling eval_identity backward_mask moments fresh_masks any_shape",
       "the exercise is to write inverted dropout yourself (a Bernoulli mask times x / (1 - p))",
       Shortcut("torch.nn.Dropout", "nn.Dropout is PyTorch's dropout, the checks' answer key"),
       Shortcut("torch.nn.functional.dropout", "F.dropout is PyTorch's dropout, the checks' answer key"),
       Shortcut("torch.dropout", "torch.dropout is PyTorch's dropout kernel, the checks' answer key"))


# ---------------------------------------------------------------------------------------------------
# The open experiment: a design the student chose, run within the budget (no fixed answer)
# ---------------------------------------------------------------------------------------------------

OPEN = add(open_check("dropout"))     # reglab.experiments: the design ran within its budget (what it found is yours)
probe_open_experiment, judge_open_experiment = OPEN.probe, OPEN.judge


from reglab.topics.dropout import block_checks  # noqa: E402,F401  (registers the block's checks, "dropout.block_*")
