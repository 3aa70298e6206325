"""Checks of the student's label_smoothed_cross_entropy(logits, target, alpha, ignore_index=-100, reduction='mean').

The answer key is PyTorch's `F.cross_entropy(logits, target, label_smoothing=alpha, ignore_index=...,
reduction=...)`. Each probe builds its own inputs from a fixed seed (`_cases`) and returns only the
student's outputs; each judge rebuilds the same inputs, recomputes the answer, and when the outputs
differ compares them with the classic mistakes below to name the misconception. The open experiment's check
("label_smoothing.open_experiment", from reglab.experiments) only confirms that the student's
open_design(settings) ran within its budget of optimizer steps: what it finds has no fixed answer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reglab.checks import Check, CheckFailed, Shortcut, add, refuse
from reglab.experiments import open_check

LAB = "label_smoothing"
RTOL, ATOL = 1e-5, 1e-6       # float32 arithmetic inside the student's function passes; every mistake below misses by far more


# --------------------------------------------------------------------------------------------------
# Inputs: rebuilt identically by probe and judge from a seed
# --------------------------------------------------------------------------------------------------

def _case(seed: int, shape: tuple, alpha: float, reduction: str = "mean", ignore_fraction: float = 0.0,
          ignore_index: int = -100, scale: float = 3.0, dtype=torch.float64) -> dict:
    """Random logits of shape (N, C, d1, ...) and targets (N, d1, ...), some set to ignore_index."""
    generator = torch.Generator().manual_seed(seed)
    n_classes = shape[1]
    logits = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    target_shape = shape[:1] + shape[2:]
    target = torch.randint(n_classes, target_shape, generator=generator)
    if ignore_fraction > 0:
        ignored = torch.rand(target_shape, generator=generator) < ignore_fraction
        ignored.view(-1)[0] = True                # at least one ignored position
        ignored.view(-1)[-1] = False              # at least one kept position
        if 0 <= ignore_index < n_classes:
            # ignore_index is a real class here: avoid it among the kept targets, so it means "ignored"
            target = torch.where(target == ignore_index, (target + 1) % n_classes, target)
        target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    return {"logits": logits, "target": target, "alpha": alpha, "reduction": reduction,
            "ignore_index": ignore_index}


def _cases(kind: str) -> list[dict]:
    if kind == "matches_cross_entropy":
        return [_case(10, (8, 5), 0.1), _case(11, (16, 10), 0.3), _case(12, (4, 3), 0.05),
                _case(13, (32, 20), 0.2)]
    if kind == "reductions":
        return [_case(20 + i, (12, 7), 0.2, reduction=r) for i, r in enumerate(("none", "sum", "mean"))]
    if kind == "ignore_index":
        return [_case(30 + i, (16, 6), 0.15, reduction=r, ignore_fraction=0.3)
                for i, r in enumerate(("mean", "sum", "none"))] + [
                _case(33, (16, 6), 0.15, reduction="mean", ignore_fraction=0.3, ignore_index=2)]
    if kind == "alpha_range":
        return [_case(40, (10, 8), 0.0), _case(41, (10, 8), 0.99), _case(42, (10, 8), 1.0),
                _case(43, (10, 8), 0.0, reduction="none", ignore_fraction=0.2)]
    if kind == "class_dim":
        return [_case(50, (4, 6, 5), 0.1), _case(51, (3, 5, 4, 2), 0.2, reduction="none"),
                _case(52, (4, 6, 5), 0.1, ignore_fraction=0.25)]
    if kind == "gradient":
        return [_case(60, (8, 5), 0.2), _case(61, (12, 7), 0.1, ignore_fraction=0.3)]
    if kind == "large_logits":
        return [_case(70, (8, 6), 0.1, scale=300.0, dtype=torch.float32),
                _case(71, (8, 6), 0.1, scale=300.0, dtype=torch.float32, reduction="none")]
    if kind == "fresh_cases":
        return [_case(80, (64, 50), 0.15, ignore_fraction=0.1), _case(81, (64, 50), 0.15, reduction="sum"),
                _case(82, (5, 11, 7), 0.25, reduction="none", ignore_fraction=0.2, ignore_index=0),
                _case(83, (33, 2), 0.5)]
    raise KeyError(kind)


def _describe(case: dict) -> str:
    shape = tuple(case["logits"].shape)
    extra = "" if not (case["target"] == case["ignore_index"]).any() else f", ignore_index={case['ignore_index']}"
    return f"logits {shape}, alpha={case['alpha']}, reduction={case['reduction']!r}{extra}"


def _call(fn, case: dict, logits: torch.Tensor):
    return fn(logits, case["target"].clone(), case["alpha"], ignore_index=case["ignore_index"],
              reduction=case["reduction"])


def _run(fn, case: dict) -> dict:
    """The student's output on one case, as JSON data (or the error it raised)."""
    try:
        out = _call(fn, case, case["logits"].clone())
    except NotImplementedError:
        raise
    except Exception as err:          # noqa: BLE001 - the judge names the error
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    if not isinstance(out, torch.Tensor):
        return {"not_tensor": type(out).__name__, "value": float(out) if isinstance(out, (int, float)) else None}
    return {"shape": list(out.shape), "value": out.detach().double().reshape(-1).tolist()}


def _probe_values(kind: str):
    def probe(fn) -> dict:
        return {"outputs": [_run(fn, case) for case in _cases(kind)]}
    return probe


# --------------------------------------------------------------------------------------------------
# The answer key and the classic mistakes, computed by the judge on its own copy of the inputs
# --------------------------------------------------------------------------------------------------

def _answer(case: dict) -> torch.Tensor:
    return F.cross_entropy(case["logits"].double(), case["target"], label_smoothing=case["alpha"],
                           ignore_index=case["ignore_index"], reduction=case["reduction"])


def _soft_loss(log_probs, case, soft_target, keep, mean_over=None):
    """-sum_k y_k log p_k per position from an explicit target (N, C, ...), then the case's reduction."""
    per_position = -(soft_target * log_probs).sum(1)
    per_position = torch.where(keep, per_position, torch.zeros_like(per_position))
    return _reduce(per_position, case, keep, mean_over)


def _reduce(per_position, case, keep, mean_over=None):
    if case["reduction"] == "none":
        return per_position
    if case["reduction"] == "sum":
        return per_position.sum()
    return per_position.sum() / (keep.sum() if mean_over is None else mean_over)


def _parts(case, class_dim: int = 1):
    logits, target, V = case["logits"].double(), case["target"], case["logits"].size(1)
    keep = target != case["ignore_index"]
    safe = torch.where(keep, target, torch.zeros_like(target))
    onehot = F.one_hot(safe, V).movedim(-1, 1).double()                 # (N, C, ...)
    log_probs = F.log_softmax(logits, dim=class_dim)
    return logits, onehot, keep, log_probs, V


def _variant(name: str, case: dict) -> torch.Tensor:
    a = case["alpha"]
    logits, onehot, keep, log_probs, V = _parts(case)
    if name == "other_classes_only":
        # true class 1 - a, every other class a / (V - 1)
        return _soft_loss(log_probs, case, (1 - a) * onehot + a / (V - 1) * (1 - onehot), keep)
    if name == "smoothed_twice":
        a2 = 1 - (1 - a) ** 2
        return _soft_loss(log_probs, case, (1 - a2) * onehot + a2 / V, keep)
    if name == "wrong_sign":
        return -_answer(case)
    if name == "logits_as_log_probs":
        return _soft_loss(logits, case, (1 - a) * onehot + a / V, keep)
    if name == "uniform_not_divided":
        return _soft_loss(log_probs, case, (1 - a) * onehot + a, keep)
    if name == "weights_swapped":
        return _soft_loss(log_probs, case, a * onehot + (1 - a) / V, keep)
    if name == "plain_cross_entropy":
        return _soft_loss(log_probs, case, onehot, keep)
    if name == "only_uniform_term_weighted":
        # (nll + a * uniform): forgot the (1 - a) on the true-class term
        return _soft_loss(log_probs, case, onehot + a / V, keep)
    if name == "normalized_over_last_dim":
        _, _, _, last_log_probs, _ = _parts(case, class_dim=-1)
        return _soft_loss(last_log_probs, case, (1 - a) * onehot + a / V, keep)
    # ignore_index mistakes
    target = (1 - a) * onehot + a / V
    nll_part = -(onehot * log_probs).sum(1) * (1 - a)
    uniform_part = -log_probs.mean(1) * a
    zero = torch.zeros_like(nll_part)
    if name == "ignored_in_denominator":
        return _soft_loss(log_probs, case, target, keep, mean_over=keep.numel())
    if name == "ignored_keep_uniform_term":
        return _reduce(torch.where(keep, nll_part, zero) + uniform_part, case, keep)
    if name == "ignored_keep_uniform_term_and_denominator":
        return _reduce(torch.where(keep, nll_part, zero) + uniform_part, case, keep, mean_over=keep.numel())
    if name == "ignored_not_masked":
        return _reduce(nll_part + uniform_part, case, keep, mean_over=keep.numel())
    if name == "hardcoded_ignore_index":
        return F.cross_entropy(logits, case["target"], label_smoothing=a, reduction=case["reduction"])
    if name == "sum_for_mean":
        return _soft_loss(log_probs, case, target, keep, mean_over=1)
    if name == "mean_for_sum":
        return (torch.where(keep, nll_part + uniform_part, zero)).sum() / keep.sum()
    raise KeyError(name)


MISTAKES = {
    "other_classes_only": "spreads alpha over the V-1 other classes only (alpha/(V-1) each, the true class "
                          "keeps 1-alpha; fairseq's convention). F.cross_entropy(label_smoothing=alpha) spreads "
                          "alpha over all V classes, the true one included: y = (1-alpha)*onehot + alpha/V",
    "smoothed_twice": "applies the smoothing twice (the effective alpha is 1-(1-alpha)^2), e.g. builds the "
                      "smoothed target and also passes label_smoothing=alpha, or mixes alpha/V in two places",
    "wrong_sign": "has the wrong sign: cross-entropy is -sum_k y_k log p_k, which is >= 0",
    "logits_as_log_probs": "uses the logits as log-probabilities; take log_softmax over the class dimension first",
    "uniform_not_divided": "weights the uniform term by alpha * sum_k(-log p_k) instead of alpha * mean_k(-log p_k): "
                           "each class gets alpha/V, so the sum must be divided by V",
    "weights_swapped": "swaps the weights: the true class keeps 1-alpha (plus its alpha/V share), not alpha",
    "plain_cross_entropy": "ignores alpha: this is the plain cross-entropy (alpha = 0)",
    "only_uniform_term_weighted": "forgets the (1-alpha) factor on the true-class term: L = (1-alpha)*NLL + "
                                  "alpha*mean_k(-log p_k)",
    "normalized_over_last_dim": "normalizes over the last dimension; the class dimension is dim 1, as in "
                                "F.cross_entropy: logits (N, C, d1, ...) with target (N, d1, ...)",
    "ignored_in_denominator": "counts ignored positions in the mean's denominator; F.cross_entropy's mean "
                              "divides by the number of positions whose target is not ignore_index",
    "ignored_keep_uniform_term": "masks the NLL term at ignored positions but keeps their smoothing term; an "
                                 "ignored position contributes nothing at all",
    "ignored_keep_uniform_term_and_denominator": "keeps the smoothing term of ignored positions and counts them "
                                                 "in the mean; an ignored position contributes nothing and is not "
                                                 "counted",
    "hardcoded_ignore_index": "ignores the targets equal to -100 instead of those equal to the ignore_index "
                              "argument",
    "ignored_not_masked": "does not mask ignored positions (the target ignore_index was treated as a class)",
    "sum_for_mean": "returns the sum for reduction='mean'; the mean divides by the number of non-ignored positions",
    "mean_for_sum": "returns the mean for reduction='sum'; 'sum' adds the per-position losses",
}


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return got.shape == expected.shape and bool(torch.allclose(got, expected, rtol=RTOL, atol=ATOL))


def _error_hint(error: str, case: dict) -> str:
    hints = []
    if (case["target"] == case["ignore_index"]).any() and ("index" in error.lower() or "bound" in error.lower()):
        hints.append("positions whose target is ignore_index must be masked before indexing "
                     "(gather / one_hot cannot take it)")
    if case["logits"].dim() > 2:
        hints.append("the class dimension is dim 1, as in F.cross_entropy: logits (N, C, d1, ...) with "
                     "target (N, d1, ...)")
    return ("; " + "; ".join(hints)) if hints else ""


def _judge_outputs(kind: str, data: dict) -> None:
    cases = _cases(kind)
    outputs = data.get("outputs", [])
    if len(outputs) != len(cases):
        raise CheckFailed(f"{LAB}.{kind}: expected {len(cases)} outputs, got {len(outputs)}")
    for case, out in zip(cases, outputs):
        where = _describe(case)
        if "error" in out:
            raise CheckFailed(f"{where}: raised {out['error']}{_error_hint(out['error'], case)}")
        if "not_tensor" in out:
            raise CheckFailed(f"{where}: returned a {out['not_tensor']}, not a tensor; keep the loss a tensor "
                              f"(no .item() or NumPy) so that it can be backpropagated")
        expected = _answer(case)
        got = torch.tensor(out["value"], dtype=torch.float64).reshape(out["shape"])
        if got.shape != expected.shape:
            if case["reduction"] == "none":
                raise CheckFailed(f"{where}: reduction='none' must return one loss per position, shape "
                                  f"{tuple(expected.shape)} (the target's shape); got {tuple(got.shape)}")
            raise CheckFailed(f"{where}: reduction={case['reduction']!r} must return a scalar (shape ()), "
                              f"got shape {tuple(got.shape)}")
        if not torch.isfinite(got).all():
            raise CheckFailed(f"{where}: the loss is not finite ({got.flatten()[:4].tolist()} ...) where "
                              f"F.cross_entropy gives {expected.flatten()[:4].tolist()}; compute log-probabilities "
                              f"with log_softmax (it subtracts the max), not log(softmax(...))")
        if _close(got, expected):
            continue
        for name, message in MISTAKES.items():
            if _close(got, _variant(name, case)):
                raise CheckFailed(f"{where}: {message}")
        error = float((got - expected).abs().max())
        raise CheckFailed(f"{where}: differs from F.cross_entropy(label_smoothing={case['alpha']}) by up to "
                          f"{error:.3g} (expected {expected.flatten()[:3].tolist()}..., got "
                          f"{got.flatten()[:3].tolist()}...)")


def _values_check(kind: str, points: int, summary: str) -> Check:
    return add(Check(id=f"{LAB}.{kind}", points=points, probe=_probe_values(kind),
                     judge=lambda data: _judge_outputs(kind, data), summary=summary))


_values_check("matches_cross_entropy", 3,
              "matches F.cross_entropy(label_smoothing=alpha) on (N, C) logits with the mean reduction")
_values_check("reductions", 2, "reduction='none', 'sum' and 'mean' match F.cross_entropy")
_values_check("ignore_index", 2, "positions whose target is ignore_index contribute nothing and are not counted")
_values_check("alpha_range", 1, "alpha = 0 is the plain cross-entropy; alpha = 0.99 and 1 match F.cross_entropy")
_values_check("class_dim", 1, "logits (N, C, d1, ...) with targets (N, d1, ...) match F.cross_entropy")
# hidden (grader only)
_values_check("large_logits", 1, "float32 logits of scale 300 give a finite loss that matches F.cross_entropy")
_values_check("fresh_cases", 1, "matches F.cross_entropy on unseen shapes, alphas and ignore indices")


# --------------------------------------------------------------------------------------------------
# Gradient: dL/dz = (p - y) / n_kept, checked against autograd through F.cross_entropy
# --------------------------------------------------------------------------------------------------

def _probe_gradient(fn) -> dict:
    outputs = []
    for case in _cases("gradient"):
        logits = case["logits"].clone().requires_grad_(True)
        try:
            loss = _call(fn, case, logits)
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                outputs.append({"no_grad": True})
                continue
            loss.backward()
        except NotImplementedError:
            raise
        except Exception as err:          # noqa: BLE001
            outputs.append({"error": f"{type(err).__name__}: {err}"[:300]})
            continue
        grad = logits.grad
        outputs.append({"no_grad": True} if grad is None else
                       {"shape": list(grad.shape), "value": grad.double().reshape(-1).tolist()})
    return {"outputs": outputs}


def _judge_gradient(data: dict) -> None:
    cases = _cases("gradient")
    outputs = data.get("outputs", [])
    if len(outputs) != len(cases):
        raise CheckFailed(f"{LAB}.gradient: expected {len(cases)} gradients, got {len(outputs)}")
    for case, out in zip(cases, outputs):
        where = _describe(case)
        if "error" in out:
            raise CheckFailed(f"{where}: raised {out['error']}{_error_hint(out['error'], case)}")
        if out.get("no_grad"):
            raise CheckFailed(f"{where}: the loss does not reach the logits through autograd (detached, "
                              f".item(), NumPy, or computed under torch.no_grad())")
        logits = case["logits"].double().clone().requires_grad_(True)
        F.cross_entropy(logits, case["target"], label_smoothing=case["alpha"],
                        ignore_index=case["ignore_index"], reduction=case["reduction"]).backward()
        got = torch.tensor(out["value"], dtype=torch.float64).reshape(out["shape"])
        if _close(got, logits.grad):
            continue
        for name, message in MISTAKES.items():
            if _close(got, _variant_gradient(name, case)):
                raise CheckFailed(f"{where}: the gradient {message}")
        error = float((got - logits.grad).abs().max()) if got.shape == logits.grad.shape else float("nan")
        raise CheckFailed(f"{where}: the gradient with respect to the logits differs from (p - y) / n_kept "
                          f"(autograd through F.cross_entropy) by up to {error:.3g}")


def _variant_gradient(name: str, case: dict) -> torch.Tensor:
    """d(mistake)/d(logits): what autograd gives through a classic mistake (the gradient cases are scalar)."""
    logits = case["logits"].double().clone().requires_grad_(True)
    _variant(name, {**case, "logits": logits}).backward()
    return logits.grad


add(Check(id=f"{LAB}.gradient", points=1, probe=_probe_gradient, judge=_judge_gradient,
          summary="autograd through your loss gives dL/dz = (p - y) / n_kept, as through F.cross_entropy"))


# --------------------------------------------------------------------------------------------------
# Shortcuts: F.cross_entropy with label_smoothing is the answer key; plain F.cross_entropy is allowed
# (a loss written as (1 - alpha) * CE + alpha * mean(-log p) may use it for the first term)
# --------------------------------------------------------------------------------------------------

def _smoothing_asked(args: dict) -> bool:
    try:
        return float(args.get("label_smoothing", 0.0)) != 0.0
    except (TypeError, ValueError):
        return True


refuse(LAB, "matches_cross_entropy reductions ignore_index class_dim alpha_range large_logits fresh_cases gradient",
       "the exercise is to write the smoothed target's cross-entropy yourself",
       Shortcut("torch.nn.functional.cross_entropy", "F.cross_entropy(label_smoothing=...) (or nn.CrossEntropyLoss "
                "with it) is the checks' answer key", only_if=_smoothing_asked),
       Shortcut("reglab.topics.label_smoothing.lecture.label_smoothed_cross_entropy", "it is the course's own reference"))


# --------------------------------------------------------------------------------------------------
# The open experiment: a design the student chose, run within the budget (no fixed answer); not refused
# above, since the trainer's smoothed loss is F.cross_entropy's
# --------------------------------------------------------------------------------------------------

OPEN = add(open_check(LAB))    # reglab.experiments: the design ran within its budget (what it found is yours)
