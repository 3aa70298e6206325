"""The toy lab's private test: the kind of file an instructor keeps out of the public repository and
passes with `python -m reglab.grade toy ... --tests tests/grading/private`."""
import torch
import torch.nn.functional as F

import toy_checks  # noqa: F401  (registers the public and hidden toy checks, so the grader can judge them)
from reglab.checks import Check, CheckFailed, add


def probe_shape(dropout) -> dict:
    y = dropout(torch.ones(2, 3, 5), 0.5, torch.Generator().manual_seed(0))
    return {"shape": list(y.shape)}


def judge_shape(data: dict) -> None:
    expected = list(F.dropout(torch.ones(2, 3, 5), 0.5, training=True).shape)
    if data.get("shape") != expected:
        raise CheckFailed(f"a (2, 3, 5) input came back with shape {data.get('shape')}: dropout keeps the shape")


add(Check("toy.keeps_shape", 1, probe_shape, judge_shape, "keeps the shape of a 3-D input"))
CHECKS = [("toy.keeps_shape", "dropout")]
