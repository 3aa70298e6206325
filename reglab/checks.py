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


# ------------------------------------------------------------------------ shortcuts a submission may not take
# Where a lab asks the student to write something (dropout, clipping, a label-smoothed loss, AdamW, LoRA),
# PyTorch's implementation of it and the course's own reference are the answer key, not a submission. One
# mechanism refuses them for every lab: `refusing(shortcuts, check)` wraps a check so that its probe
# records, as data, which forbidden callables the student's object is (or subclasses) and which of them ran
# while the probe ran it; its judge refuses on that data before judging anything else. The record is made
# with `sys.setprofile`, which sees every call of a Python function (by its code object, so an alias bound
# by `from torch.nn.functional import dropout as drop` is seen too) and of a builtin (by identity). A
# hostile kernel can forge probe data, as it can any; the aim is to stop honest shortcut submissions.

@dataclass(frozen=True)
class Shortcut:
    path: str                                          # dotted path of a forbidden function or class
    why: str                                           # what the exercise asks for instead, shown to the student
    only_if: Callable[[dict], bool] | None = None      # a test of the call's arguments; None: every call counts


def resolve(path: str):
    """The object at a dotted path, importing the longest module prefix ("torch.nn.functional.dropout")."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ValueError(f"cannot import any module of {path!r}")


def _watched(shortcuts) -> tuple[dict, dict, list]:
    """Code objects and builtins to watch, each mapped to its shortcut; and (class or function, shortcut)."""
    import inspect
    by_code, by_builtin, objects = {}, {}, []
    for shortcut in shortcuts:
        obj = resolve(shortcut.path)
        objects.append((obj, shortcut))
        # a class: the methods it defines itself (nn.Dropout.forward, Adam.step, LoRALinear.__init__, ...)
        members = [m for m in vars(obj).values()] if isinstance(obj, type) else [obj]
        for member in members:
            member = getattr(member, "__func__", member)                 # staticmethod, classmethod
            if not callable(member):
                continue
            inner = inspect.unwrap(member)
            code = getattr(inner, "__code__", None)
            if code is not None:
                # only the function itself, never a decorator's generic wrapper (torch.no_grad's is shared)
                if code.co_name == getattr(inner, "__name__", None):
                    by_code[code] = shortcut
            elif not isinstance(obj, type):
                by_builtin[id(member)] = shortcut                        # torch.dropout: a C function
    return by_code, by_builtin, objects


def _is_or_subclasses(obj, forbidden) -> bool:
    import inspect
    if obj is forbidden or (callable(obj) and inspect.unwrap(obj) is forbidden):
        return True
    if isinstance(forbidden, type):
        return (isinstance(obj, type) and issubclass(obj, forbidden)) or isinstance(obj, forbidden)
    return False


def shortcuts_taken(obj, shortcuts, run: Callable[[], Any]) -> tuple[Any, list[str]]:
    """(run(), paths of the shortcuts that obj is, or that were called while run() ran), in that order."""
    import sys
    by_code, by_builtin, objects = _watched(shortcuts)
    taken = {s.path for forbidden, s in objects if _is_or_subclasses(obj, forbidden)}

    def profiler(frame, event, arg):
        if event == "call":
            shortcut = by_code.get(frame.f_code)
            if shortcut is not None and (shortcut.only_if is None or shortcut.only_if(frame.f_locals)):
                taken.add(shortcut.path)
        elif event == "c_call":
            shortcut = by_builtin.get(id(arg))
            if shortcut is not None:
                taken.add(shortcut.path)

    previous = sys.getprofile()
    sys.setprofile(profiler)
    try:
        result = run()
    finally:
        sys.setprofile(previous)
    return result, sorted(taken)


def refuse_shortcuts(data: dict, shortcuts, what: str) -> None:
    """Raise CheckFailed if the probe's data says the submission is, or called, one of the shortcuts."""
    taken = data.get("shortcuts", []) if isinstance(data, dict) else []
    for shortcut in shortcuts:
        if shortcut.path in taken:
            raise CheckFailed(f"{what} uses {shortcut.path}, which this lab refuses: {shortcut.why}")


def refuse(lab: str, names: str, exercise: str, *shortcuts: Shortcut) -> None:
    """Re-register the checks "<lab>.<name>" (names: space-separated) so that they refuse the shortcuts;
    the student reads each one's why, then what the exercise asks for instead."""
    shortcuts = tuple(Shortcut(s.path, f"{s.why}; {exercise}", s.only_if) for s in shortcuts)
    for name in names.split():
        add(refusing(shortcuts, REGISTRY[f"{lab}.{name}"]))


def refusing(shortcuts, check: Check) -> Check:
    """The same check, whose probe also records the shortcuts taken and whose judge refuses them first."""
    shortcuts = tuple(shortcuts)
    probe, judge = check.probe, check.judge

    def guarded_probe(obj) -> dict:
        data, taken = shortcuts_taken(obj, shortcuts, lambda: probe(obj))
        return {**data, "shortcuts": taken}

    def guarded_judge(data: dict) -> None:
        refuse_shortcuts(data, shortcuts, "the submission")
        judge(data)

    return Check(check.id, check.points, guarded_probe, guarded_judge, check.summary)
