"""Checks of the toy lab that tests/test_grade.py grades: inverted dropout on a vector, judged against
`torch.nn.functional.dropout`. Importing this module registers them (the toy lab's setup cell does)."""
import math

import torch
import torch.nn.functional as F

from reglab.checks import Check, CheckFailed, add

P = 0.25        # the drop probability every probe uses
N = 4096        # entries per probe: the drop-rate check's sigma is sqrt(P (1 - P) / N) ~ 0.0068


def _inputs() -> torch.Tensor:
    """Positive inputs in [0.5, 1.5), the same in the kernel (probe) and in the grader (judge)."""
    return torch.rand(N, generator=torch.Generator().manual_seed(0)) + 0.5


def _outputs(data: dict) -> torch.Tensor:
    y = torch.tensor(data["y"], dtype=torch.float32)
    if y.shape != (N,):
        raise CheckFailed(f"a vector of {N} entries came back with shape {tuple(y.shape)}: dropout keeps the shape")
    return y


def probe_outputs(dropout) -> dict:
    y = dropout(_inputs(), P, torch.Generator().manual_seed(1))
    return {"y": [float(v) for v in y]}


def judge_scale(data: dict) -> None:
    x, y = _inputs(), _outputs(data)
    kept = y != 0
    if not kept.any():
        raise CheckFailed("every entry was dropped: nothing to compare")
    oracle = F.dropout(x, P, training=True)                       # PyTorch's kept entries are x * scale
    scale = (oracle[oracle != 0] / x[oracle != 0]).mean().item()
    ratio = y[kept] / x[kept]
    if torch.allclose(ratio, torch.full_like(ratio, scale), rtol=1e-5):
        return
    if torch.allclose(ratio, torch.full_like(ratio, 1 / P), rtol=1e-5):
        raise CheckFailed(f"kept entries were scaled by 1/p = {1 / P:g} instead of 1/(1-p) = {scale:g}")
    if torch.allclose(ratio, torch.ones_like(ratio), rtol=1e-5):
        raise CheckFailed("kept entries were not rescaled: inverted dropout divides them by 1 - p")
    raise CheckFailed(f"kept entries are x times {ratio.mean().item():.4g} on average, expected x / (1 - p) = {scale:g} x")


def judge_rate(data: dict) -> None:
    y = _outputs(data)
    dropped = (y == 0).float().mean().item()
    sigma = math.sqrt(P * (1 - P) / N)
    if abs(dropped - P) <= 4 * sigma:        # two-sided 4-sigma band: a correct dropout fails ~6e-5 of the time
        return
    if abs(dropped - (1 - P)) <= 4 * sigma:
        raise CheckFailed(f"dropped {dropped:.3f} of the entries, about 1 - p: p is the drop probability, not the keep probability")
    raise CheckFailed(f"dropped {dropped:.3f} of the entries, expected p = {P} within {4 * sigma:.3f}")


def probe_p_zero(dropout) -> dict:
    return {"y": [float(v) for v in dropout(_inputs(), 0.0, torch.Generator().manual_seed(2))]}


def judge_p_zero(data: dict) -> None:
    x, y = _inputs(), _outputs(data)
    if not torch.equal(y, F.dropout(x, 0.0, training=True)):
        raise CheckFailed("with p = 0 the output must equal the input exactly (nothing dropped, scale 1)")


add(Check("toy.scale", 2, probe_outputs, judge_scale, "kept entries are scaled by 1/(1-p)"))
add(Check("toy.drop_rate", 1, probe_outputs, judge_rate, "entries are dropped with probability p"))
add(Check("toy.p_zero_identity", 1, probe_p_zero, judge_p_zero, "p = 0 returns the input unchanged"))
