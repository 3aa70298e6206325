"""Core: the open experiment every lab ends with: a student's design {label: (knobs..., steps)}, refused before any training when it is malformed or spends more optimizer steps than its budget, and the check that it ran within that budget.

A topic describes its experiment once, as a `Design`: the knobs a run sets before its step count, its own
checks of one run's knobs, and any rule about the design as a whole (label smoothing needs an alpha = 0 run
to compare accuracy with). The lab's runner asks `Design.planned` for the runs, which refuses a bad design
with a ValueError before anything trains, and then trains them with `reglab.train.sweep`. The topic's checks
module registers `open_check(...)`: its probe runs the student's `open_design(settings)` at the grader's
budget and returns the design and what the runs recorded; its judge recomputes the budget and the design's
problems itself and fails only on a design that is missing, refused, not run, or whose runs failed. What the
experiment found is the student's: no answer is judged.

What a topic provides, by name, in its `lab.py` (the check imports it only when it runs, as every check
keeps the lab's plotting imports out of the judge): `OPEN_DESIGN`, a `Design`; `settings_for(budget)`, whose
settings have `open_budget`, the optimizer steps a design may spend in all (one seed per run); and
`open_graded(settings, design)`, which runs the design as the grader does (CPU, built-in data, seed 0, no
progress bars) and returns its `record`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from reglab.checks import Check, CheckFailed

REFUSED = "the open experiment's design is refused: "


def no_design_rules(runs: dict) -> list[str]:
    """The default: any set of well-formed runs makes a design."""
    return []


@dataclass(frozen=True)
class Design:
    """How one lab's open experiment is written, and what makes a design of it malformed."""
    knobs: tuple[str, ...]                         # what a run sets before its steps, e.g. ("p",) or ("lr", "clip")
    knob_problems: Callable[..., list[str]]        # knob values (in knobs' order) -> what is wrong with them; [] if nothing
    design_rules: Callable[[dict], list[str]] = no_design_rules   # well-formed runs -> problems of the design as a whole
    finite_keys: tuple[str, ...] = ()              # per-run figures a run that did not fail records as finite floats
    may_stop_early: bool = False                   # a run may train fewer steps than planned (it diverged, or met
                                                   # the lab's stopping rule), never more
    min_runs: int = 2                              # an experiment compares

    @property
    def shape(self) -> str:
        """How one run is written, for messages: '(p, steps)'."""
        return "(" + ", ".join((*self.knobs, "steps")) + ")"

    def problems(self, runs, budget_steps: int) -> list[str]:
        """What is wrong with a design {label: (knobs..., steps)} for a budget of budget_steps optimizer steps
        in all (summed over its runs, one seed each); [] when nothing is."""
        if not isinstance(runs, dict) or not runs:
            return [f"a design is a non-empty dict {{label: {self.shape}}}, got {type(runs).__name__} {runs!r:.80}"]
        problems = []
        if len(runs) < self.min_runs:
            problems.append(f"an experiment compares: the design has {len(runs)} run, it needs at least {self.min_runs}")
        total, well_formed = 0, {}
        for name, run in runs.items():
            if not (isinstance(run, (tuple, list)) and len(run) == len(self.knobs) + 1):
                problems.append(f"run {name!r} must be {self.shape}, got {run!r:.80}")
                continue
            *knobs, steps = run
            knob_problems = self.knob_problems(*knobs)
            problems += [f"run {name!r}: {problem}" for problem in knob_problems]
            if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
                problems.append(f"run {name!r}: steps must be a positive integer, got {steps!r}")
                continue
            total += steps
            if not knob_problems:
                well_formed[name] = tuple(run)
        if len(well_formed) == len(runs):
            problems += self.design_rules(well_formed)
        if total > budget_steps:
            problems.append(f"the design spends {total} optimizer steps, over the budget of {budget_steps}")
        return problems

    def planned(self, design: Callable[[Any], dict], settings) -> dict:
        """The runs design(settings) asks for; a ValueError naming every problem, before anything trains,
        when they are malformed or do not fit in settings.open_budget."""
        runs = design(settings)
        problems = self.problems(runs, settings.open_budget)
        if problems:
            raise ValueError(REFUSED + "; ".join(problems))
        return runs


def record(budget_steps: int, runs: dict[str, dict], **answer) -> dict:
    """An open experiment for the lab's record: the budget, the steps its runs trained in all, each run's
    knobs and figures (each with "steps" and "steps_trained"), and what the topic's rule picks (answer)."""
    return {"budget_steps": budget_steps, "steps_spent": sum(run["steps_trained"] for run in runs.values()),
            "runs": runs, **answer}


def _plain(value):
    """A knob as JSON can carry it (numbers, strings, None, bools); anything else as its repr."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)[:80]


def open_check(lab: str, budget: str = "ci") -> Check:
    """The check "<lab>.open_experiment" (1 point) of the student's open_design(settings): the probe runs
    the design at this budget's settings, as the grader runs the lab."""
    def topic():
        import importlib
        return importlib.import_module(f"reglab.topics.{lab}.lab")

    def probe(open_design) -> dict:
        import torch
        module = topic()
        settings = module.settings_for(budget)
        runs = open_design(settings)
        if not isinstance(runs, dict):
            return {"design": repr(runs)[:200]}
        described = {str(name): [_plain(v) for v in run] if isinstance(run, (tuple, list)) else repr(run)[:80]
                     for name, run in runs.items()}
        if module.OPEN_DESIGN.problems(runs, settings.open_budget):
            return {"design": described}                  # refused: the judge says why, nothing trains
        with torch.random.fork_rng(devices=[]):
            return {"design": described, "record": module.open_graded(settings, open_design)}

    def judge(data: dict) -> None:
        design = topic().OPEN_DESIGN
        budget_steps = topic().settings_for(budget).open_budget    # the grader's budget, not the probe's word for it
        described = data["design"]
        if not isinstance(described, dict):
            raise CheckFailed(f"open_design(settings) must return a dict {{label: {design.shape}}}; it returned "
                              f"{described}")
        runs = {name: tuple(run) if isinstance(run, list) else run for name, run in described.items()}
        problems = design.problems(runs, budget_steps)
        if problems:
            raise CheckFailed(REFUSED + "; ".join(problems))
        found = data.get("record")
        if not isinstance(found, dict) or set(found.get("runs", {})) != set(runs):
            raise CheckFailed("the design was not run: the probe found no result for each of its runs")
        for name, result in found["runs"].items():
            trained, planned = result.get("steps_trained"), runs[name][-1]
            if not isinstance(trained, int) or trained > planned or (trained < planned and not design.may_stop_early):
                raise CheckFailed(f"run {name!r} trained {trained} steps, its design says {planned}")
            for key in design.finite_keys:
                if not (isinstance(result.get(key), float) and math.isfinite(result[key])):
                    raise CheckFailed(f"run {name!r} recorded no finite {key.replace('_', ' ')} ({result.get(key)!r})")
        spent = sum(result["steps_trained"] for result in found["runs"].values())
        if spent > budget_steps:
            raise CheckFailed(f"the runs trained {spent} optimizer steps, over the budget of {budget_steps}")

    return Check(f"{lab}.open_experiment", 1, probe, judge,
                 "your open experiment's design runs within its budget of optimizer steps (what it finds is yours)")
