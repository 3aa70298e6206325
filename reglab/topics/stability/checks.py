"""Checks of the stability lab: a student's qk-norm logits and z-loss against the model's own path and torch.logsumexp.

The student writes three functions:
- `qk_norm_scores(q, k, q_norm, k_norm)`: the attention logits with qk-layernorm, q_norm(q) k_norm(k)^T / sqrt(hs),
  for q and k of shape (B, nh, T, hs) and the layer's two norms; (B, nh, T, T), before the causal mask and
  the softmax. The answer key is the course model itself (`GPTConfig(qk_norm=True)`): the probe reads q and k
  where they enter the model's q_norm and k_norm (forward hooks) and the judge rebuilds the same model and
  multiplies what leaves them.
- `z_loss(logits, coef)`: coef * mean over predictions of (log Z)^2, log Z = logsumexp over the vocabulary,
  the last axis (PaLM, Chowdhery et al. 2022 §5); logits (..., V).
- `training_loss(logits, targets, coef)`: the one number the trainer both backpropagates and logs:
  cross-entropy + z_loss(logits, coef) (as `reglab.train` does: history.loss holds what was backpropagated).

The open experiment's check ("stability.open_experiment", from reglab.experiments) only confirms that the
student's open_design(settings) ran within its budget of optimizer steps: what it finds has no fixed answer.

Every probe builds its inputs itself from a named case below; every judge rebuilds the same case and computes
the answer in float64, so the data the probe returns holds only what the student's code did. A failure names
the misconception its numbers match: normalizing after the dot product, the z-loss on the wrong axis,
forgetting the z-loss in the logged loss (or adding it detached, so that it logs but does not train).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from reglab.checks import Check, CheckFailed, Shortcut, add, refuse
from reglab.experiments import open_check

# float32 against a float64 answer: a product of hs = 8 terms and a LayerNorm carry ~1e-6 relative error;
# 1e-4 leaves room, and every wrong answer below differs by far more (checked in tests/test_stability_lab.py)
RTOL, ATOL = 1e-4, 1e-5


# --------------------------------------------------------------------------------------------------
# data encoding: tensors as flat lists, non-finite values as strings ("inf", "-inf", "nan") so the data is JSON
# --------------------------------------------------------------------------------------------------

def _encode(t: torch.Tensor) -> dict:
    flat = t.detach().double().reshape(-1).tolist()
    return {"shape": list(t.shape),
            "values": [x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
                       for x in flat]}


def _decode(data, what: str) -> torch.Tensor:
    if not (isinstance(data, dict) and isinstance(data.get("shape"), list) and isinstance(data.get("values"), list)):
        raise CheckFailed(f"malformed probe data for {what}")
    values = []
    for x in data["values"]:
        if isinstance(x, str) and x in ("nan", "inf", "-inf"):
            values.append(float(x))
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            values.append(float(x))
        else:
            raise CheckFailed(f"malformed probe data for {what}: {x!r} is not a number")
    shape = [int(n) for n in data["shape"]]
    if math.prod(shape) != len(values):
        raise CheckFailed(f"malformed probe data for {what}: {len(values)} values for shape {shape}")
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def _returned(value, what: str) -> dict:
    """What a student's function returned, as data: a tensor, or a description of what it was."""
    if isinstance(value, torch.Tensor):
        return {"tensor": _encode(value), "requires_grad": bool(value.requires_grad)}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"tensor": _encode(torch.tensor(float(value))), "requires_grad": False}
    return {"type": type(value).__name__}


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=RTOL, atol=atol, equal_nan=True)


# a z-loss can be ~1e-4 (PaLM's coef): scalars are compared relatively only (float32 sums: ~1e-6 relative)
def _same_number(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _close(a.reshape(()), b.reshape(()), atol=1e-12)


def _error_free(result, what: str) -> dict:
    if not isinstance(result, dict):
        raise CheckFailed(f"malformed probe data for {what}")
    if result.get("error"):
        raise CheckFailed(f"{what} raised {result['error']}")
    if "tensor" not in result:
        raise CheckFailed(f"{what} returned {result.get('type', '?')}; return a tensor")
    return result


def _run(fn, *args) -> dict:
    try:
        return _returned(fn(*args), fn.__name__ if hasattr(fn, "__name__") else "the function")
    except NotImplementedError:
        raise
    except Exception as err:  # the student's error, reported as data
        return {"error": f"{type(err).__name__}: {err}"}


# --------------------------------------------------------------------------------------------------
# qk-norm: the cases and the model's own path
# --------------------------------------------------------------------------------------------------

# (B, nh, T, hs); "square" has T == hs, so a LayerNorm(hs) can also be applied to the T x T score matrix:
# the misconception "normalizing after the dot product" then runs instead of raising, and is named.
QK_CASES = {
    "square": dict(shape=(1, 3, 8, 8), seed=12),
    "wide":   dict(shape=(2, 2, 6, 8), seed=11),
    "batch":  dict(shape=(3, 1, 5, 4), seed=13),
}
QK_SCALE = 1000.0    # q and k multiplied by this: qk-norm must give the same logits (up to LayerNorm's eps)


def qk_case(name: str):
    """(model, x): a one-layer course model with qk-norm, its norms' gains and biases drawn away from (1, 0)
    so that a function that ignores them is seen, and a batch of token ids x (B, T)."""
    from reglab.model import GPT, GPTConfig
    B, nh, T, hs = QK_CASES[name]["shape"]
    gen = torch.Generator().manual_seed(QK_CASES[name]["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(QK_CASES[name]["seed"])
        model = GPT(GPTConfig(vocab_size=13, block_size=T, n_layer=1, n_head=nh, n_embd=nh * hs, qk_norm=True))
    attn = model.blocks[0].attn
    with torch.no_grad():
        # larger q and k rows than GPT-2's 0.02 init, so the logits are of order 1 and mistakes show
        attn.qkv.weight.copy_(torch.randn(attn.qkv.weight.shape, generator=gen))
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.copy_(1 + 0.5 * torch.randn(hs, generator=gen))
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(0.3 * torch.randn(hs, generator=gen))
    model.eval()
    x = torch.randint(13, (B, T), generator=gen)
    return model, x


def qk_inputs(model, x):
    """q and k of the first layer where they enter q_norm and k_norm, (B, nh, T, hs), read by forward hooks."""
    attn = model.blocks[0].attn
    seen = {}
    hooks = [norm.register_forward_hook(lambda module, inputs, output, key=key: seen.__setitem__(key, inputs[0]))
             for key, norm in (("q", attn.q_norm), ("k", attn.k_norm))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["q"].detach().clone(), seen["k"].detach().clone()


def reference_scores(name: str) -> dict:
    """The answer key and the wrong answers of the usual mistakes, in float64, for case `name`.

    The answer: the model's own q_norm and k_norm applied to q and k, then q k^T / sqrt(hs)."""
    model, x = qk_case(name)
    attn = model.blocks[0].attn
    q, k = qk_inputs(model, x)
    model = model.double()
    q, k = q.double(), k.double()
    hs, T = q.size(-1), q.size(-2)
    with torch.no_grad():
        qn, kn = attn.q_norm(q), attn.k_norm(k)
        raw = q @ k.transpose(-2, -1) / math.sqrt(hs)
        answer = qn @ kn.transpose(-2, -1) / math.sqrt(hs)
        wrong = {
            "after": [F.layer_norm(raw, (T,))] + ([attn.q_norm(raw), attn.k_norm(attn.q_norm(raw)),
                                                  attn.k_norm(raw)] if T == hs else []),
            "none": [raw],
            "no_scale": [qn @ kn.transpose(-2, -1)],
            "hs_scale": [qn @ kn.transpose(-2, -1) / hs],
            "q_only": [qn @ k.transpose(-2, -1) / math.sqrt(hs)],
            "k_only": [q @ kn.transpose(-2, -1) / math.sqrt(hs)],
            "swapped": [attn.k_norm(q) @ attn.q_norm(k).transpose(-2, -1) / math.sqrt(hs)],
            "no_affine": [F.layer_norm(q, (hs,)) @ F.layer_norm(k, (hs,)).transpose(-2, -1) / math.sqrt(hs)],
            "softmax": [torch.softmax(answer.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf), -1),
                        torch.softmax(answer, -1)],
            "masked": [answer.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf),
                       answer.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0.0)],
        }
    return {"answer": answer, "wrong": wrong, "hs": hs, "T": T}


QK_MISTAKES = {
    "after": "normalized after the dot product: the LayerNorm went on the T x T score matrix instead of on q and "
             "k. qk-norm normalizes q and k (each head's hs-vector) before q.k, which is what bounds the logits; "
             "normalizing the scores afterwards lets q.k grow as before and only rescales each row",
    "none": "did not normalize q and k: the logits are q.k / sqrt(hs) of the raw q and k; apply q_norm(q) and "
            "k_norm(k) first",
    "no_scale": "forgot the 1 / sqrt(hs) scale of the dot product",
    "hs_scale": "divided by hs instead of sqrt(hs)",
    "q_only": "normalized q only; k needs k_norm too",
    "k_only": "normalized k only; q needs q_norm too",
    "swapped": "swapped the norms: q goes through q_norm and k through k_norm (each has its own learned gain)",
    "no_affine": "normalized without the norms' learned gain and bias (e.g. F.layer_norm without weight): call the "
                 "modules q_norm(q) and k_norm(k), so their parameters act and train",
    "softmax": "returned the attention weights (after the softmax); return the logits before the mask and the softmax",
    "masked": "applied the causal mask; return the logits of every (query, key) pair, before the mask",
}


def _rows_standardized(t: torch.Tensor) -> bool:
    """Every row over the last axis has mean ~0 and variance ~1: the mark of a norm applied to the scores."""
    if not torch.isfinite(t).all() or t.size(-1) < 2:
        return False
    mean, var = t.mean(-1), t.var(-1, unbiased=False)
    return bool((mean.abs() < 1e-3).all() and ((var - 1).abs() < 1e-2).all())


def _diagnose_scores(got: torch.Tensor, ref: dict) -> str:
    for mistake, candidates in ref["wrong"].items():
        if any(_close(got, c) for c in candidates):
            return QK_MISTAKES[mistake]
    if _rows_standardized(got):
        return QK_MISTAKES["after"]
    worst = float((got - ref["answer"]).abs().max())
    return f"the logits differ from the model's own qk-norm path by up to {worst:.3g}"


def _student_norms(model):
    attn = model.blocks[0].attn
    return attn.q_norm, attn.k_norm


def probe_qk_scores(fn) -> dict:
    out = {}
    for name in QK_CASES:
        model, x = qk_case(name)
        q, k = qk_inputs(model, x)
        out[name] = _run(fn, q, k, *_student_norms(model))
    return out


def _judge_scores_case(result, name: str, context: str) -> None:
    result = _error_free(result, f"qk_norm_scores on case {name!r}")
    ref = reference_scores(name)
    got = _decode(result["tensor"], f"case {name!r}")
    B, nh, T, hs = QK_CASES[name]["shape"]
    if list(got.shape) != [B, nh, T, T]:
        raise CheckFailed(f"{context}: returned shape {list(got.shape)} for q, k of shape {[B, nh, T, hs]}; the "
                          f"logits are (B, nh, T, T) = {[B, nh, T, T]}")
    if not _close(got, ref["answer"]):
        raise CheckFailed(f"{context}: {_diagnose_scores(got, ref)}")


def judge_qk_scores(data: dict) -> None:
    for name in QK_CASES:
        _judge_scores_case(data.get(name), name, f"case {name!r} (q, k of shape {list(QK_CASES[name]['shape'])})")


add(Check("stability.qk_norm_scores", 3, probe_qk_scores, judge_qk_scores,
          "the logits are q_norm(q) . k_norm(k) / sqrt(hs), as the course model computes them with qk_norm=True"))


def probe_qk_scale(fn) -> dict:
    """The same case with q and k multiplied by QK_SCALE (what a growing W_q and W_k do to them)."""
    out = {}
    for name in ("wide", "square"):
        model, x = qk_case(name)
        q, k = qk_inputs(model, x)
        out[name] = {"plain": _run(fn, q, k, *_student_norms(model)),
                     "scaled": _run(fn, QK_SCALE * q, QK_SCALE * k, *_student_norms(model))}
    return out


def judge_qk_scale(data: dict) -> None:
    for name in ("wide", "square"):
        pair = data.get(name) if isinstance(data, dict) else None
        if not isinstance(pair, dict):
            raise CheckFailed(f"malformed probe data for case {name!r}")
        plain = _decode(_error_free(pair.get("plain"), f"qk_norm_scores on case {name!r}")["tensor"], name)
        scaled = _decode(_error_free(pair.get("scaled"), f"qk_norm_scores on case {name!r}, q and k x "
                                                         f"{QK_SCALE:g}")["tensor"], name)
        # LayerNorm divides by sqrt(var + 1e-5): scaling q by 1000 changes the result by ~1e-5 / (2 var) relative
        if plain.shape != scaled.shape or not torch.allclose(plain, scaled, rtol=1e-3, atol=1e-3):
            ratio = float(scaled.abs().max() / plain.abs().max().clamp_min(1e-30))
            raise CheckFailed(f"case {name!r}: with q and k {QK_SCALE:g} times larger the largest logit grew "
                              f"{ratio:.3g}-fold; with qk-norm the logits must not depend on the scale of q and k "
                              f"(that is what stops attention-logit growth): normalize q and k before q.k")


add(Check("stability.qk_norm_scale", 1, probe_qk_scale, judge_qk_scale,
          "the logits do not grow when q and k grow 1000-fold (what stops attention-logit growth)"))


QK_GRAD_CASE = "wide"


def _grad_weights(name: str) -> torch.Tensor:
    B, nh, T, _ = QK_CASES[name]["shape"]
    return torch.randn((B, nh, T, T), generator=torch.Generator().manual_seed(99))


def probe_qk_grads(fn) -> dict:
    """Backpropagate a fixed weighting of the logits; the gradients that reach the norms' gains."""
    model, x = qk_case(QK_GRAD_CASE)
    q, k = qk_inputs(model, x)
    q_norm, k_norm = _student_norms(model)
    try:
        scores = fn(q, k, q_norm, k_norm)
        if scores.requires_grad:                 # else nothing reaches the gains: reported below as no gradient
            (scores * _grad_weights(QK_GRAD_CASE).to(scores.dtype)).sum().backward()
    except NotImplementedError:
        raise
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {name: None if norm.weight.grad is None else _encode(norm.weight.grad)
            for name, norm in (("q_norm", q_norm), ("k_norm", k_norm))}


def judge_qk_grads(data: dict) -> None:
    if not isinstance(data, dict):
        raise CheckFailed("malformed probe data")
    if data.get("error"):
        raise CheckFailed(f"backpropagating through qk_norm_scores raised {data['error']}")
    model, x = qk_case(QK_GRAD_CASE)
    q, k = qk_inputs(model, x)
    attn = model.blocks[0].attn
    hs = q.size(-1)
    answer = attn.q_norm(q) @ attn.k_norm(k).transpose(-2, -1) / math.sqrt(hs)
    (answer * _grad_weights(QK_GRAD_CASE)).sum().backward()
    for name in ("q_norm", "k_norm"):
        if data.get(name) is None:
            raise CheckFailed(f"no gradient reached {name}'s gain: the logits must be computed through the module "
                              f"{name}(...) (not F.layer_norm without its weight, not under torch.no_grad), so its "
                              f"gain trains")
    for name, norm in (("q_norm", attn.q_norm), ("k_norm", attn.k_norm)):
        got = _decode(data[name], name)
        if not torch.allclose(got, norm.weight.grad.double(), rtol=1e-3, atol=1e-4):
            raise CheckFailed(f"the gradient of {name}'s gain differs from the model's by up to "
                              f"{float((got - norm.weight.grad.double()).abs().max()):.3g}")


add(Check("stability.qk_norm_grads", 1, probe_qk_grads, judge_qk_grads,
          "the gradient reaches q_norm's and k_norm's gains as in the model"))


# --------------------------------------------------------------------------------------------------
# z-loss: the cases and the answer in float64
# --------------------------------------------------------------------------------------------------

# distinct sizes on every axis, so logsumexp over a wrong axis gives a different number; "large" overflows
# a naive log(sum(exp(z))) in float32 (exp(300) = inf), which torch.logsumexp avoids by subtracting the max
Z_CASES = {
    "btv":   dict(shape=(3, 5, 7), scale=2.0, offset=0.0, coef=0.5, seed=21),
    "nv":    dict(shape=(6, 11), scale=3.0, offset=1.0, coef=1e-2, seed=22),
    "palm":  dict(shape=(4, 3, 5), scale=1.0, offset=-4.0, coef=1e-4, seed=23),   # log Z < 0: the square matters
    "large": dict(shape=(2, 4, 9), scale=5.0, offset=300.0, coef=1e-3, seed=24),
}


def z_case(name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(logits (..., V), targets (...), coef) of a case, float32, the same numbers every time."""
    case = Z_CASES[name]
    gen = torch.Generator().manual_seed(case["seed"])
    logits = torch.randn(case["shape"], generator=gen) * case["scale"] + case["offset"]
    targets = torch.randint(case["shape"][-1], case["shape"][:-1], generator=gen)
    return logits, targets, case["coef"]


def reference_z(logits: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * mean over predictions of logsumexp(logits, -1)^2, in float64."""
    return coef * torch.logsumexp(logits.double(), dim=-1).pow(2).mean()


def z_mistakes(logits: torch.Tensor, coef: float) -> dict[str, list[torch.Tensor]]:
    """What the usual mistakes compute, in float64."""
    z = logits.double()
    lse = torch.logsumexp(z, dim=-1)
    wrong_axes = [torch.logsumexp(z, dim=d) for d in range(z.dim() - 1)]
    return {
        "axis": [coef * w.pow(2).mean() for w in wrong_axes] + [coef * torch.logsumexp(z.reshape(-1), 0).pow(2)],
        "no_square": [coef * lse.mean(), coef * lse.abs().mean()],
        "square_of_mean": [coef * lse.mean().pow(2)],
        "sum": [coef * lse.pow(2).sum()],
        "no_coef": [lse.pow(2).mean()],
        "logits": [coef * z.pow(2).mean(), coef * z.pow(2).sum(-1).mean()],
        "max": [coef * z.max(-1).values.pow(2).mean()],
        "log_probs": [torch.zeros((), dtype=torch.float64)],
    }


Z_MISTAKES = {
    "axis": "the z-loss on the wrong axis: log Z = logsumexp over the vocabulary, the last axis (dim=-1), one per "
            "prediction; a logsumexp over the batch or time axis (or over everything) mixes predictions",
    "no_square": "forgot the square: the z-loss is the mean of (log Z)^2, which pulls log Z toward 0 from both sides",
    "square_of_mean": "squared the mean of log Z; the z-loss is the mean of the squares, (log Z)^2 per prediction",
    "sum": "summed over the predictions instead of taking the mean (the term would grow with the batch)",
    "no_coef": "ignored coef: the term is coef * mean((log Z)^2)",
    "logits": "penalized the logits themselves, not log Z = logsumexp of the logits",
    "max": "used the largest logit instead of log Z = logsumexp (the max is only its lower bound)",
    "log_probs": "computed log Z of the log-probabilities (always 0): apply logsumexp to the raw logits",
}


def _diagnose_z(got: torch.Tensor, logits: torch.Tensor, coef: float, name: str) -> str:
    if not torch.isfinite(got).all():
        return (f"case {name!r} (logits around {Z_CASES[name]['offset']:g}) gave {float(got.reshape(-1)[0])}: "
                f"log(sum(exp(z))) overflows in float32; use torch.logsumexp, which subtracts the max first")
    for mistake, candidates in z_mistakes(logits, coef).items():
        if got.numel() == 1 and any(_same_number(got, c) for c in candidates):
            return f"case {name!r}: {Z_MISTAKES[mistake]}"
    return (f"case {name!r}: returned {float(got.reshape(-1)[0]):.6g}, the z-loss is "
            f"{float(reference_z(logits, coef)):.6g}")


def probe_z_loss(fn) -> dict:
    out = {}
    for name in Z_CASES:
        logits, _, coef = z_case(name)
        out[name] = _run(fn, logits, coef)
    return out


def judge_z_loss(data: dict) -> None:
    for name in Z_CASES:
        result = _error_free(data.get(name), f"z_loss on case {name!r}")
        got = _decode(result["tensor"], f"case {name!r}")
        logits, _, coef = z_case(name)
        if got.numel() != 1:
            raise CheckFailed(f"case {name!r}: returned shape {list(got.shape)}; the z-loss is one number (a 0-d "
                              f"tensor): the mean over the predictions")
        if not _same_number(got, reference_z(logits, coef)):
            raise CheckFailed(_diagnose_z(got, logits, coef, name))


add(Check("stability.z_loss", 2, probe_z_loss, judge_z_loss,
          "coef * mean over predictions of logsumexp(logits, dim=-1)^2, stable for large logits"))


def _grad_case(fn, name: str, *extra) -> dict:
    logits, targets, coef = z_case(name)
    logits = logits.clone().requires_grad_(True)
    args = (logits, targets, coef) if extra == ("targets",) else (logits, coef)
    try:
        value = fn(*args)
        returned = _returned(value, "the function")
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value.sum().backward()
    except NotImplementedError:
        raise
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {**returned, "grad": None if logits.grad is None else _encode(logits.grad)}


GRAD_CASES = ("btv", "nv")


def probe_z_loss_grad(fn) -> dict:
    return {name: _grad_case(fn, name) for name in GRAD_CASES}


def judge_z_loss_grad(data: dict) -> None:
    for name in GRAD_CASES:
        result = _error_free(data.get(name), f"z_loss on case {name!r}")
        logits, _, coef = z_case(name)
        if result.get("grad") is None:
            raise CheckFailed(f"case {name!r}: no gradient reached the logits: the z-loss was computed detached "
                              f"(.item(), .detach(), NumPy or torch.no_grad), so it would be logged but not train")
        z = logits.double().requires_grad_(True)
        reference_z(z, coef).backward()
        # d/dz_i coef * mean(lse^2) = 2 coef lse softmax(z)_i / N: it pulls log Z toward 0
        if not _close(_decode(result["grad"], name), z.grad):
            raise CheckFailed(f"case {name!r}: the gradient differs from that of coef * mean(logsumexp(z, -1)^2) "
                              f"by up to {float((_decode(result['grad'], name) - z.grad).abs().max()):.3g}")


add(Check("stability.z_loss_grad", 1, probe_z_loss_grad, judge_z_loss_grad,
          "its gradient is that of coef * mean(log Z^2): 2 coef log Z softmax(z) / N"))


# --------------------------------------------------------------------------------------------------
# the training loss: what the trainer backpropagates and logs
# --------------------------------------------------------------------------------------------------

LOSS_CASES = ("btv", "nv")   # the z-loss term is 6 and 0.3 nats there: CE alone is far from CE + z


def reference_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.double().reshape(-1, logits.size(-1)), targets.reshape(-1))


def probe_training_loss(fn) -> dict:
    return {name: _grad_case(fn, name, "targets") for name in LOSS_CASES}


def _grads_of(f, logits: torch.Tensor) -> torch.Tensor:
    z = logits.double().requires_grad_(True)
    f(z).backward()
    return z.grad


def judge_training_loss(data: dict) -> None:
    for name in LOSS_CASES:
        result = _error_free(data.get(name), f"training_loss on case {name!r}")
        logits, targets, coef = z_case(name)
        got = _decode(result["tensor"], f"case {name!r}")
        if got.numel() != 1:
            raise CheckFailed(f"case {name!r}: returned shape {list(got.shape)}; the training loss is one number")
        got = got.reshape(())
        ce, z = reference_ce(logits, targets), reference_z(logits, coef)
        grad = None if result.get("grad") is None else _decode(result["grad"], name)
        full_grad = _grads_of(lambda t: reference_ce(t, targets) + reference_z(t, coef), logits)
        ce_grad = _grads_of(lambda t: reference_ce(t, targets), logits)
        if _same_number(got, ce + z):
            if grad is None:
                raise CheckFailed(f"case {name!r}: no gradient reached the logits: the loss was computed detached, "
                                  f"so nothing would train")
            if _close(grad, full_grad):
                continue
            if _close(grad, ce_grad):
                raise CheckFailed(f"case {name!r}: added the z-loss detached (.item() or .detach()): it shows in "
                                  f"the logged loss but its gradient is zero, so it does not train")
            raise CheckFailed(f"case {name!r}: the value is right but the gradient differs from that of CE + "
                              f"z-loss by up to {float((grad - full_grad).abs().max()):.3g}: what is logged must "
                              f"be what is trained")
        if _same_number(got, ce):
            raise CheckFailed(f"case {name!r}: forgot the z-loss in the logged loss: returned the cross-entropy "
                              f"alone ({float(ce):.6g}). The trainer logs and backpropagates the one number "
                              f"training_loss returns, so it must be CE + z_loss(logits, coef) = {float(ce + z):.6g}")
        for mistake, candidates in z_mistakes(logits, coef).items():
            if any(_same_number(got, ce + c) for c in candidates):
                raise CheckFailed(f"case {name!r}: the cross-entropy is right, the z-loss term is not: "
                                  f"{Z_MISTAKES[mistake]}")
        raise CheckFailed(f"case {name!r}: returned {float(got):.6g}; CE + z-loss is {float(ce + z):.6g} "
                          f"(CE {float(ce):.6g}, z-loss {float(z):.6g})")


add(Check("stability.training_loss", 2, probe_training_loss, judge_training_loss,
          "returns CE + z-loss, the number both backpropagated and logged, with the gradient of both terms"))


# --------------------------------------------------------------------------------------------------
# The open experiment: a design the student chose, run within the budget (no fixed answer)
# --------------------------------------------------------------------------------------------------

OPEN = add(open_check("stability"))   # reglab.experiments: the design ran within its budget (what it found is yours)


# --------------------------------------------------------------------------------------------------
# Shortcuts: the trainer's z-loss and stability readings are the answer key
# --------------------------------------------------------------------------------------------------

refuse("stability", "z_loss z_loss_grad training_loss",
       "the exercise is to compute log Z with torch.logsumexp and the z-loss term yourself",
       Shortcut("reglab.train.loss_fn", "with z_loss > 0 it is the trainer's training loss, the answer key",
                only_if=lambda local: bool(local.get("z_loss"))),
       Shortcut("reglab.train.z_loss_term", "it is the course's z-loss, the checks' answer key"),
       Shortcut("reglab.train.log_partition", "it is the course's log Z, half of the answer key"))
refuse("stability", "qk_norm_scores qk_norm_scale qk_norm_grads",
       "the exercise is to apply q_norm and k_norm and take the scaled dot product yourself",
       Shortcut("reglab.train.attention_logits", "it is the model's own qk-norm path, the checks' answer key"),
       Shortcut("reglab.train.stability_stats", "it reads the model's attention logits, the checks' answer key"))
