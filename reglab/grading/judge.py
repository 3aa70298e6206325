"""Grading room, the judge: each check's verdict, decided in the grader's own process from the probe data alone.

`Check.judge` recomputes what it needs with PyTorch as the answer key; a score never depends on anything
the notebook prints, displays or patches in its kernel. Malformed or oversized data is a failure with a
reason, never a crash of the grader.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from reglab import checks as check_registry
from reglab.grading.lab import Lab, PlannedCheck
from reglab.grading.probe import PROBE_SECONDS

MAX_CHECK_DATA_BYTES = 4 * 2**20      # the check protocol asks probes for < ~1 MB


@dataclass
class Verdict:
    check: PlannedCheck
    earned: int | None          # None: never judged (the submission did not run)
    message: str                # why it failed ("" when it passed)

    @property
    def passed(self) -> bool:
        return bool(self.earned is not None and self.earned == self.check.points and not self.message)


def one_line(text, limit: int) -> str:
    """text on one line, cut to at most limit characters (an ellipsis marks a cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def judge_entry(check: PlannedCheck, entry) -> Verdict:
    """Judge one check's probe entry; anything malformed is a failure, never a crash."""
    name = f"`{check.object_name}`"
    if not isinstance(entry, dict):
        return Verdict(check, 0, "no probe data for this check (the probe cell did not reach it)")
    if "unavailable" in entry:
        return Verdict(check, 0, "the check could not be loaded in the notebook's kernel (did the notebook change "
                                 "`reglab.checks`?); if your notebook did not, tell your instructor")
    if "missing" in entry:
        return Verdict(check, 0, f"{name} is not defined after running the notebook "
                                 "(renamed, deleted, or its cell failed?)")
    if "error" in entry:
        kind = entry.get("error")
        kind = kind if isinstance(kind, str) and kind.isidentifier() and len(kind) <= 80 else "an exception"
        if kind == "NotImplementedError":
            return Verdict(check, 0, f"not implemented: {name} still raises NotImplementedError")
        if kind == "ProbeTimeout":
            return Verdict(check, 0, f"{name} ran longer than {PROBE_SECONDS} s on the check's input (an infinite loop?)")
        if kind == "ProbeDataError":
            return Verdict(check, 0, "the probe's data could not be saved as JSON")
        message = entry.get("message")
        detail = f": {one_line(message, 300)}" if check.kind != "private" and isinstance(message, str) and message.strip() else ""
        return Verdict(check, 0, f"{name} raised {kind}{detail}")
    data = entry.get("data")
    if not isinstance(data, dict):
        return Verdict(check, 0, "the probe data is malformed (not a JSON object); this counts as a failure")
    try:
        if len(json.dumps(data, allow_nan=True)) > MAX_CHECK_DATA_BYTES:
            return Verdict(check, 0, f"the probe data exceeds {MAX_CHECK_DATA_BYTES // 2**20} MB; this counts as a failure")
        check_registry.get(check.id).judge(data)
    except check_registry.CheckFailed as err:
        return Verdict(check, 0, one_line(err, 1500) or "failed")
    except Exception as err:                           # noqa: BLE001 - malformed data must never crash the grader
        return Verdict(check, 0, f"the probe data is malformed ({type(err).__name__} while judging it); "
                                 "this counts as a failure")
    return Verdict(check, check.points, "")


def judge_all(lab: Lab, results: dict | None, why_missing: str) -> list[Verdict]:
    if results is None:
        return [Verdict(c, 0, f"not checked: {why_missing}") for c in lab.checks]
    return [judge_entry(c, results.get(c.id)) for c in lab.checks]


def not_run(lab: Lab, why: str) -> list[Verdict]:
    """A verdict for every check of a submission that was never judged (invalid, or the grader failed)."""
    return [Verdict(c, None, f"not run: {why}") for c in lab.checks]
