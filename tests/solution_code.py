"""The tests' one way to use a lab's answer (run some cells of a solution notebook and return what they
define) and to grade an object with a check as the grader does (`check_message`).

The checks refuse PyTorch's implementation and the course's own reference (shortcuts), so the tests pass
the solution notebook's implementation through them instead, and build the classic mistakes on it."""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SOLUTIONS = Path(__file__).resolve().parent.parent / "solutions"


def solution_cells(notebook: str, *cell_ids: str, **names) -> dict:
    """Execute the cells (by id, in this order) of solutions/<notebook> in a namespace holding the setup's
    usual imports (math, torch, nn, F) and `names` (what the setup would have made: settings, a lab module);
    return that namespace."""
    path = SOLUTIONS / notebook
    cells = {c["id"]: "".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]}
    namespace = {"math": math, "torch": torch, "nn": nn, "F": F, **names}
    for cell_id in cell_ids:
        exec(compile(cells[cell_id], f"{path.name}:{cell_id}", "exec"), namespace)
    return namespace


def check_message(check_id: str, obj) -> str | None:
    """A check's message for obj (its judge refused or failed it), None if it passes; the probe's data goes
    through JSON on the way to the judge, as in the grader."""
    from reglab.checks import CheckFailed, get
    spec = get(check_id)
    data = json.loads(json.dumps(spec.probe(obj)))
    try:
        spec.judge(data)
    except CheckFailed as failure:
        return str(failure)
    return None
