"""Checks of the gradient-clipping lab: a student's clip_grad_norm against torch.nn.utils.clip_grad_norm_.

The student's function has the signature `clip_grad_norm(parameters, max_norm, eps=1e-6,
error_if_nonfinite=False)` and must behave like PyTorch's: return the pre-clip global norm, scale every
gradient in place by min(1, max_norm / (norm + eps)), skip parameters without a gradient, read
`parameters` once (it may be a generator), and on a non-finite norm either raise (error_if_nonfinite)
or scale anyway, which turns the finite gradients into zeros. The open experiment's check
("clipping.open_experiment", from reglab.experiments) only confirms that the student's open_design(settings)
ran within its budget of optimizer steps: what it finds has no fixed answer.

Every probe builds its inputs itself from a named case below; every judge rebuilds the same case and
runs PyTorch's function on it, so the data the probe returns holds only what the student's code did.
"""
from __future__ import annotations

import math

import torch

from reglab.checks import Check, CheckFailed, Shortcut, add, refuse
from reglab.experiments import open_check

EPS = 1e-6                   # torch's constant in clip_grad_norm_: scale = max_norm / (norm + 1e-6)
RTOL, ATOL = 1e-4, 1e-7      # float32 sums in another order differ by ~1e-7 relative; 1e-4 leaves room
SHAPES = [(4, 3), (5,), (2, 3, 2), (3, 3)]

# Each case: the norm of each tensor's gradient (None: the parameter has no gradient), the threshold c,
# and optionally an entry set to inf or nan. Per-tensor norms differ so that clipping each tensor on its
# own gives a different answer from clipping the whole vector.
CASES = {
    "above":   dict(norms=[3.0, 0.2, 1.5], max_norm=1.0),       # total 3.36 > c: scaled by c / 3.36
    "between": dict(norms=[0.8, 0.7, 0.6], max_norm=1.0),       # every tensor < c, total 1.22 > c
    "below":   dict(norms=[0.3, 0.2, 0.25], max_norm=1.0),      # total 0.44 < c: untouched
    "single":  dict(norms=[4.0], max_norm=2.0),
    "some_without_grad": dict(norms=[2.0, None, 1.0, None], max_norm=1.0),
    "inf":     dict(norms=[2.0, 1.0, 0.5], max_norm=1.0, poison=(1, math.inf)),
    "nan":     dict(norms=[2.0, 1.0, 0.5], max_norm=1.0, poison=(1, math.nan)),
    "tiny":    dict(norms=[2e-6], max_norm=1e-6),                # c / (norm + eps) = 1/3; without eps 1/2
    "eps_arg": dict(norms=[1.0, 0.5], max_norm=1.0, eps=0.5),    # an explicit eps must be used
}


def make_case(name: str) -> tuple[list[torch.nn.Parameter], float, dict]:
    """Fresh parameters with the case's gradients (the same numbers every time), c, and call kwargs."""
    case = CASES[name]
    gen = torch.Generator().manual_seed(sorted(CASES).index(name) + 1)
    params = []
    for i, norm in enumerate(case["norms"]):
        shape = SHAPES[i % len(SHAPES)]
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        g = torch.randn(shape, generator=gen)
        if norm is not None:
            p.grad = g * (norm / g.norm())
        params.append(p)
    if "poison" in case:
        index, value = case["poison"]
        params[index].grad.view(-1)[0] = value
    kwargs = {"eps": case["eps"]} if "eps" in case else {}
    return params, case["max_norm"], kwargs


# --------------------------------------------------------------------------------------------------
# data encoding: numbers, with non-finite values as strings ("inf", "-inf", "nan") so the data is JSON
# --------------------------------------------------------------------------------------------------

def _num(x: float):
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def _unnum(x) -> float:
    if isinstance(x, str):
        if x not in ("nan", "inf", "-inf"):
            raise CheckFailed(f"malformed probe data: {x!r} is not a number")
        return float(x)
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        raise CheckFailed(f"malformed probe data: {x!r} is not a number")
    return float(x)


def _encode_returned(value):
    """The student's return value as data: a number, or a description of what it was."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _num(float(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _num(float(value))
    return {"type": type(value).__name__}


def _run(fn, name: str, as_generator: bool = False, **extra) -> dict:
    """Call the student's function on a case; what it returned, raised, and left in each p.grad."""
    params, max_norm, kwargs = make_case(name)
    originals = [p.grad for p in params]
    try:
        returned = fn((p for p in params) if as_generator else params, max_norm, **kwargs, **extra)
    except NotImplementedError:
        raise
    except Exception as err:                       # an error is data too: the judge decides if it was right
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    grads = [None if p.grad is None else [_num(v) for v in p.grad.detach().reshape(-1).tolist()]
             for p in params]
    return {"error": None, "returned": _encode_returned(returned), "grads": grads,
            "in_place": [o is None or p.grad is o for p, o in zip(params, originals)]}


def _expected(name: str, **extra) -> tuple[float, list]:
    """PyTorch's answer on the case: (returned norm, gradients after) computed by clip_grad_norm_."""
    params, max_norm, kwargs = make_case(name)
    if "eps" in kwargs:
        # torch's eps is fixed at 1e-6; c' = c (n + 1e-6) / (n + eps) gives the scale c / (n + eps)
        copies, _, _ = make_case(name)
        norm = float(torch.nn.utils.clip_grad_norm_(copies, math.inf))     # max_norm inf: the norm only
        max_norm = max_norm * (norm + EPS) / (norm + kwargs["eps"])
    returned = torch.nn.utils.clip_grad_norm_(params, max_norm, **extra)
    return float(returned), [None if p.grad is None else p.grad.reshape(-1).clone() for p in params]


def _grads(data: dict, name: str) -> list:
    """Decode the gradients of a probe's result, checking they have the case's shapes."""
    params, _, _ = make_case(name)
    grads = data.get("grads")
    if not isinstance(grads, list) or len(grads) != len(params):
        raise CheckFailed(f"malformed probe data for case {name!r}: expected {len(params)} gradients")
    out = []
    for p, g in zip(params, grads):
        if g is None:
            out.append(None)
            continue
        if not isinstance(g, list) or len(g) != p.numel():
            raise CheckFailed(f"malformed probe data for case {name!r}: a gradient has the wrong size")
        out.append(torch.tensor([_unnum(v) for v in g]))
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True)


def _original(name: str) -> list:
    params, _, _ = make_case(name)
    return [None if p.grad is None else p.grad.reshape(-1).clone() for p in params]


def _scaled(name: str, scale_of) -> list:
    """The case's gradients scaled by scale_of(tensor norm, total norm, c) per tensor: a wrong answer's shape."""
    params, c, kwargs = make_case(name)
    eps = kwargs.get("eps", EPS)
    grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
    total = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    return [None if p.grad is None else p.grad.reshape(-1) * scale_of(float(p.grad.norm()), total, c, eps)
            for p in params]


def _matches(got: list, want: list) -> bool:
    return len(got) == len(want) and all(
        (g is None and w is None) or (g is not None and w is not None and _close(g, w)) for g, w in zip(got, want))


def _error_free(data: dict, name: str, what: str):
    if not isinstance(data, dict):
        raise CheckFailed(f"malformed probe data for case {name!r}")
    if data.get("error"):
        raise CheckFailed(f"{what} raised {data['error']}")


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------

NORM_CASES = ("above", "between", "below", "single")


def probe_total_norm(fn) -> dict:
    return {name: _run(fn, name) for name in NORM_CASES}


def _judge_returned(result: dict, name: str, context: str) -> None:
    """The returned value must be torch's pre-clip norm on the case; otherwise name the likely mistake."""
    returned = result.get("returned")
    if returned is None or isinstance(returned, dict):
        kind = "None" if returned is None else returned.get("type", "?")
        raise CheckFailed(f"{context}: returned {kind}; return the total norm before clipping (a number or a "
                          f"0-d tensor)")
    got = _unnum(returned)
    want, _ = _expected(name)
    if math.isclose(got, want, rel_tol=RTOL):
        return
    c = CASES[name]["max_norm"]
    norms = [n for n in CASES[name]["norms"] if n is not None]
    if math.isclose(got, min(want, c), rel_tol=1e-3):
        raise CheckFailed(f"{context}: returned the post-clip norm ({got:.4g}, about c = {c:g}); return the norm "
                          f"measured before scaling ({want:.4g}), as torch does: it is what you log to see spikes")
    if math.isclose(got, sum(norms), rel_tol=1e-3):
        raise CheckFailed(f"{context}: summed the per-tensor norms ({got:.4g}); the global norm is the square root "
                          f"of the sum of squares over all tensors ({want:.4g})")
    if math.isclose(got, want ** 2, rel_tol=1e-3):
        raise CheckFailed(f"{context}: returned the squared norm ({got:.4g}); take the square root ({want:.4g})")
    if math.isclose(got, max(norms), rel_tol=1e-3):
        raise CheckFailed(f"{context}: returned the largest per-tensor norm ({got:.4g}), not the global norm "
                          f"({want:.4g})")
    raise CheckFailed(f"{context}: returned {got:.6g}; torch's clip_grad_norm_ returns the pre-clip global norm "
                      f"{want:.6g}")


def judge_total_norm(data: dict) -> None:
    for name in NORM_CASES:
        _error_free(data.get(name), name, f"clip_grad_norm on case {name!r}")
        _judge_returned(data[name], name, f"case {name!r}")


add(Check("clipping.total_norm", 2, probe_total_norm, judge_total_norm,
          "returns the pre-clip global norm sqrt(sum of squares), like torch.nn.utils.clip_grad_norm_"))


def _diagnose_scaling(name: str, got: list, want: list) -> str:
    """A message naming the mistake whose answer matches what the student's function did."""
    if _matches(got, _scaled(name, lambda n, total, c, eps: min(1.0, c / (n + eps)))):
        return ("clipped each tensor separately: the global norm is taken over all gradients as one vector, and "
                "every tensor is scaled by the same factor min(1, c / (norm + eps)), which keeps the direction")
    if _matches(got, _scaled(name, lambda n, total, c, eps: c / (total + eps))):
        return ("clipped when norm < c: the factor is min(1, c / (norm + eps)), so a gradient already shorter "
                "than c is left as it is, never scaled up")
    if _matches(got, _original(name)):
        return "left the gradients unchanged: scale each p.grad in place (p.grad.mul_(factor))"
    params, c, _ = make_case(name)
    value_clipped = [None if p.grad is None else p.grad.reshape(-1).clamp(-c, c) for p in params]
    if _matches(got, value_clipped):
        return "clamped each entry to [-c, c] (value clipping); global-norm clipping scales the whole vector"
    worst = max(float((g - w).abs().max()) for g, w in zip(got, want) if g is not None and w is not None)
    return f"the gradients after clipping differ from torch.nn.utils.clip_grad_norm_'s by up to {worst:.3g}"


def _judge_grads(data: dict, name: str, **extra):
    _, want = _expected(name, **extra)
    got = _grads(data, name)
    if any((g is None) != (w is None) for g, w in zip(got, want)):
        raise CheckFailed(f"case {name!r}: a parameter without a gradient got one (or one lost its gradient); "
                          f"skip parameters whose .grad is None and leave them as they are")
    if not _matches(got, want):
        raise CheckFailed(f"case {name!r}: {_diagnose_scaling(name, got, want)}")
    if not all(data.get("in_place", [])):
        raise CheckFailed(f"case {name!r}: replaced p.grad with a new tensor instead of scaling it in place; "
                          f"use p.grad.mul_(factor), as torch does (code holding the gradient sees the change)")


SCALING_CASES = ("above", "between", "below", "single")


def probe_scaling(fn) -> dict:
    return {name: _run(fn, name) for name in SCALING_CASES}


def judge_scaling(data: dict) -> None:
    for name in SCALING_CASES:
        _error_free(data.get(name), name, f"clip_grad_norm on case {name!r}")
        _judge_grads(data[name], name)


add(Check("clipping.scaling", 3, probe_scaling, judge_scaling,
          "scales every gradient in place by min(1, c / (norm + eps)), one factor for all tensors"))


DIRECTION_CASES = ("above", "between")


def probe_direction(fn) -> dict:
    return {name: _run(fn, name) for name in DIRECTION_CASES}


def judge_direction(data: dict) -> None:
    for name in DIRECTION_CASES:
        _error_free(data.get(name), name, f"clip_grad_norm on case {name!r}")
        got, before = _grads(data[name], name), _original(name)
        if any(g is None for g in got) or not all(torch.isfinite(g).all() for g in got):
            raise CheckFailed(f"case {name!r}: the clipped gradients are missing or not finite")
        a, b = torch.cat(before).double(), torch.cat(got).double()
        cos = float(a @ b / (a.norm() * b.norm()))
        c = CASES[name]["max_norm"]
        # float32 rounding moves the cosine by ~1e-7; a real change of direction moves it by far more
        if cos < 1 - 1e-5:
            _, want = _expected(name)
            raise CheckFailed(f"case {name!r}: the clipped gradient points elsewhere (cosine {cos:.6f} with the "
                              f"original): {_diagnose_scaling(name, got, want)}")
        if float(b.norm()) > c * (1 + 1e-4):
            raise CheckFailed(f"case {name!r}: the clipped gradient has norm {float(b.norm()):.4g} > c = {c:g}")


add(Check("clipping.direction", 1, probe_direction, judge_direction,
          "the clipped gradient points the same way (cosine 1) and has norm <= c"))


def probe_skips_missing(fn) -> dict:
    return {"some_without_grad": _run(fn, "some_without_grad")}


def judge_skips_missing(data: dict) -> None:
    name = "some_without_grad"
    _error_free(data.get(name), name, "with parameters whose .grad is None, clip_grad_norm")
    _judge_returned(data[name], name, "with parameters without gradients (their norm counts as 0)")
    _judge_grads(data[name], name)


add(Check("clipping.skips_missing", 1, probe_skips_missing, judge_skips_missing,
          "parameters without a gradient are skipped and left without one"))


def probe_generator(fn) -> dict:
    return {"above": _run(fn, "above", as_generator=True)}


def judge_generator(data: dict) -> None:
    _error_free(data.get("above"), "above", "given a generator of parameters, clip_grad_norm")
    got = _grads(data["above"], "above")
    if _matches(got, _original("above")):
        raise CheckFailed("given a generator (model.parameters() is one), the gradients were left unchanged: "
                          "`parameters` was read twice and a generator is empty the second time; read it "
                          "once into a list")
    _judge_returned(data["above"], "above", "given a generator")
    _judge_grads(data["above"], "above")


add(Check("clipping.generator", 1, probe_generator, judge_generator,
          "works when `parameters` is a generator (reads it once)"))


def probe_nonfinite_error(fn) -> dict:
    return {name: _run(fn, name, error_if_nonfinite=True) for name in ("inf", "nan", "above")}


def judge_nonfinite_error(data: dict) -> None:
    for name in ("inf", "nan"):
        result = data.get(name)
        if not isinstance(result, dict) or not result.get("error"):
            raise CheckFailed(f"with error_if_nonfinite=True and an {name} in a gradient, nothing was raised; "
                              f"raise (torch raises RuntimeError) when the total norm is not finite")
    if data.get("above", {}).get("error"):
        raise CheckFailed(f"with error_if_nonfinite=True and a finite norm, raised {data['above']['error']}; "
                          f"raise only when the norm is inf or nan")
    _judge_grads(data["above"], "above", error_if_nonfinite=True)


add(Check("clipping.nonfinite_error", 1, probe_nonfinite_error, judge_nonfinite_error,
          "error_if_nonfinite=True raises on an inf or nan norm and only then"))


def probe_nonfinite_scales(fn) -> dict:
    return {name: _run(fn, name, error_if_nonfinite=False) for name in ("inf", "nan")}


def judge_nonfinite_scales(data: dict) -> None:
    for name in ("inf", "nan"):
        result = data.get(name)
        if not isinstance(result, dict):
            raise CheckFailed(f"malformed probe data for case {name!r}")
        if result.get("error"):
            raise CheckFailed(f"with error_if_nonfinite=False and an {name} in a gradient, raised "
                              f"{result['error']}; torch scales by the non-finite norm without complaint")
        returned = result.get("returned")
        if returned != name:
            raise CheckFailed(f"with an {name} entry in a gradient, returned {returned!r}; the pre-clip norm is {name}")
    # inf: c / (inf + eps) = 0, so every finite entry becomes 0 and the inf entry 0 * inf = nan
    _, want = _expected("inf")
    got = _grads(data["inf"], "inf")
    if not _matches(got, want):
        if _matches(got, _original("inf")):
            raise CheckFailed("with an inf gradient and error_if_nonfinite=False, left the gradients unchanged; "
                              "torch scales by c / (inf + eps) = 0: the finite gradients become 0 and the inf "
                              "entry nan (0 * inf), a step that changes nothing but poisons Adam's moments")
        raise CheckFailed("with an inf gradient and error_if_nonfinite=False, the gradients differ from torch's: "
                          "the factor min(1, c / (inf + eps)) = 0 makes the finite ones 0 and the inf entry nan")
    # nan: the entry that was nan must stay nan (what the others become depends on how min is written)
    got_nan = _grads(data["nan"], "nan")
    index, _ = CASES["nan"]["poison"]
    if got_nan[index] is None or not math.isnan(float(got_nan[index][0])):
        raise CheckFailed("with a nan gradient, the nan entry came out as a number; nothing can make nan finite "
                          "honestly: did the code replace non-finite values?")


add(Check("clipping.nonfinite_scales", 1, probe_nonfinite_scales, judge_nonfinite_scales,
          "error_if_nonfinite=False scales by the non-finite norm like torch (finite gradients become 0)"))


def probe_eps(fn) -> dict:
    return {name: _run(fn, name) for name in ("tiny", "eps_arg")}


def judge_eps(data: dict) -> None:
    for name in ("tiny", "eps_arg"):
        _error_free(data.get(name), name, f"clip_grad_norm on case {name!r}")
        _, want = _expected(name)
        got = _grads(data[name], name)
        if _matches(got, want):
            continue
        if _matches(got, _scaled(name, lambda n, total, c, eps: min(1.0, c / total))):
            which = "the default eps=1e-6" if name == "tiny" else "the eps argument"
            raise CheckFailed(f"forgot eps (case {name!r}): the factor is min(1, c / (norm + eps)) with "
                              f"{which}; eps keeps the division finite when the norm is 0, and torch uses 1e-6")
        raise CheckFailed(f"case {name!r}: {_diagnose_scaling(name, got, want)}")


add(Check("clipping.eps", 1, probe_eps, judge_eps,
          "divides by norm + eps (default 1e-6, as torch), and uses the eps it is given"))


# --------------------------------------------------------------------------------------------------
# Shortcuts: PyTorch's clipping is the answer key, and the course's lecture function is its copy
# --------------------------------------------------------------------------------------------------

refuse("clipping", "total_norm scaling direction skips_missing generator eps nonfinite_error nonfinite_scales",
       "the exercise is to compute the global norm and scale the gradients yourself",
       Shortcut("torch.nn.utils.clip_grad_norm_", "it is the checks' answer key"),
       Shortcut("torch.nn.utils.clip_grads_with_norm_", "it is half of the answer key (the scaling)"),
       Shortcut("torch.nn.utils.get_total_norm", "it is half of the answer key (the global norm)"),
       Shortcut("reglab.topics.clipping.lecture.clip_grad_norm", "it is the course's own reference"))


# --------------------------------------------------------------------------------------------------
# The open experiment: a design the student chose, run within the budget (no fixed answer); not refused
# above, since the trainer clips with torch's function
# --------------------------------------------------------------------------------------------------

OPEN = add(open_check("clipping"))    # reglab.experiments: the design ran within its budget (what it found is yours)
