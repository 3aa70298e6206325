"""Core: the check protocol, a check of a student's implementation split so that nothing the student's code runs can forge a pass.

A check has two halves:
- `probe(obj) -> dict`: runs the student's object (class or function) on inputs the probe makes
  itself and returns plain JSON data (numbers, lists of numbers) describing what it did.
- `judge(data) -> None`: decides from that data alone, recomputing whatever it needs with PyTorch's
  own implementation as the answer key, and raises `CheckFailed` with a message that names the
  likely misconception ("scaled by 1/p instead of 1/(1-p)").

In a lab notebook `check("dropout.mask_values", Dropout)` runs both halves in the kernel and prints a
line. The grader runs each probe in the student's kernel but each judge in its own process, so a
score never depends on anything the notebook prints or patches. Checks live in one module per lab
(`reglab/topics/dropout/checks.py`, ...), registered under ids "<lab>.<name>".
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


class CheckFailed(AssertionError):
    """A check's verdict: the message names what went wrong and, where it can, the misconception."""


@dataclass(frozen=True)
class Check:
    id: str                          # "<lab>.<name>", e.g. "dropout.mask_values"
    points: int                      # what passing it is worth to the grader
    probe: Callable[[Any], dict]     # runs the student's object; returns JSON data only
    judge: Callable[[dict], None]    # raises CheckFailed; never sees the student's object
    summary: str                     # one line: what a pass means


REGISTRY: dict[str, Check] = {}


def add(check: Check) -> Check:
    """Register a check (each lab's module calls this once per check at import)."""
    lab, _, name = check.id.partition(".")
    if not lab or not name:
        raise ValueError(f"check ids look like '<lab>.<name>', got {check.id!r}")
    if check.points < 0:
        raise ValueError(f"points must be >= 0, got {check.points} for {check.id}")
    REGISTRY[check.id] = check
    return check


def get(check_id: str) -> Check:
    """The registered check, importing its lab's module on first use."""
    if check_id not in REGISTRY:
        lab = check_id.partition(".")[0]
        try:
            importlib.import_module(f"reglab.topics.{lab}.checks")
        except ModuleNotFoundError:
            raise KeyError(f"no checks module for lab {lab!r} (from check id {check_id!r})") from None
    if check_id not in REGISTRY:
        raise KeyError(f"unknown check {check_id!r}; {lab!r} has {sorted(k for k in REGISTRY if k.startswith(lab + '.'))}")
    return REGISTRY[check_id]


def check(check_id: str, obj) -> None:
    """Run a check in this process: probe the object, judge the data, print the verdict or raise CheckFailed."""
    spec = get(check_id)
    try:
        data = spec.probe(obj)
    except NotImplementedError:
        raise CheckFailed(f"{check_id}: not implemented yet (the stub raises NotImplementedError)") from None
    spec.judge(data)
    print(f"passed {check_id}: {spec.summary}")
