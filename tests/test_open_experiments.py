"""The open experiment at the end of every lab (reglab.experiments, each topic's OPEN_DESIGN): the solution's
design passes its check and the lab's record of it has the lab's fields; a design over the budget, or a
malformed one, is refused with a message naming the problem, before anything trains; an unwritten design
reports not implemented. What a design finds is never judged. (Dropout's own cases are in
tests/test_dropout_effect.py, stability's in tests/test_stability_lab.py.)"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import pytest

from solution_code import SOLUTIONS, check_message, solution_cells


@dataclass
class OpenLab:
    run_fields: set                    # what the record keeps per run
    answer: str                        # the record's key for what the lab's rule picks
    over_budget: Callable              # settings -> a design one step over the budget
    without_task: Callable             # (settings, design) -> the lab's runner called with no task, data or model
    malformed: list = field(default_factory=list)   # (design, a part of the message that names its problem)


def lab_module(lab: str):
    import importlib
    return importlib.import_module(f"reglab.topics.{lab}.lab")


LABS = {
    "clipping": OpenLab(
        {"lr", "clip", "steps", "steps_trained", "diverged_at", "final_val_loss"},
        "largest_stable_lr",
        over_budget=lambda s: {"a": (1.0, None, s.open_budget), "b": (1.0, 1.0, 1)},
        without_task=lambda s, design: lab_module("clipping").open_experiment(s, None, None, design),
        malformed=[(lambda s: {"a": (-1.0, None, 5), "b": (1.0, 1.0, 5)}, "run 'a': lr must be a positive number, got -1.0"),
                   (lambda s: {"a": (1.0, 0.0, 5), "b": (1.0, None, 5)},
                    "run 'a': clip must be None (no clipping) or a positive threshold, got 0.0"),
                   (lambda s: {"a": (1.0, 1.0, 5), "b": (0.5, 1.0, 5)}, "the design needs a run without clipping (clip None)"),
                   (lambda s: {"a": (1.0, 5), "b": (1.0, None, 5)}, "run 'a' must be (lr, clip, steps), got (1.0, 5)"),
                   (lambda s: {"a": (1.0, None, 2.5), "b": (1.0, 1.0, 5)}, "run 'a': steps must be a positive integer")]),
    "label_smoothing": OpenLab(
        {"alpha", "steps", "steps_trained", "ece", "acc"}, "lowest_ece",
        over_budget=lambda s: {"a": (0.0, s.open_budget), "b": (0.1, 1)},
        without_task=lambda s, design: lab_module("label_smoothing").open_experiment(s, design),
        malformed=[(lambda s: {"a": (0.0, 5), "b": (1.0, 5)}, "run 'b': alpha must be in [0, 1), got 1.0"),
                   (lambda s: {"a": (0.1, 5), "b": (0.2, 5)}, "the design needs an alpha = 0 run"),
                   (lambda s: {"a": (0.0, 5), "b": (0.1, 0)}, "run 'b': steps must be a positive integer, got 0"),
                   (lambda s: {"a": (0.0, 5)}, "the design has 1 run, it needs at least 2")]),
    "weight_decay": OpenLab(
        {"weight_decay", "lr", "steps", "steps_trained", "grok_step", "final_test_acc"},
        "fastest",
        over_budget=lambda s: {"a": (1.0, s.lr, s.open_budget), "b": (0.0, s.lr, 1)},
        without_task=lambda s, design: lab_module("weight_decay").open_experiment(s, design),
        malformed=[(lambda s: {"a": (-1.0, s.lr, 5), "b": (1.0, s.lr, 5)},
                    "run 'a': weight_decay must be a number >= 0, got -1.0"),
                   (lambda s: {"a": (1.0, 0, 5), "b": (1.0, s.lr, 5)}, "run 'a': lr must be a positive number, got 0"),
                   (lambda s: {"a": (1.0, 5), "b": (1.0, s.lr, 5)}, "run 'a' must be (weight_decay, lr, steps)"),
                   (lambda s: {}, "a design is a non-empty dict {label: (weight_decay, lr, steps)}, got dict {}")]),
    "stability": OpenLab(
        {"qk_norm", "lr", "steps", "steps_trained", "final_val_loss", "diverged_at", "max_attn_logit"},
        "largest_stable_lr",
        over_budget=lambda s: {"a": (False, 0.1, s.open_budget), "b": (True, 0.1, 1)},
        without_task=lambda s, design: lab_module("stability").open_experiment(s, None, None, design),
        malformed=[(lambda s: {"a": (True, -1, 5), "b": (False, 0.1, 5)}, "run 'a': lr must be a number in (0, 10], got -1"),
                   (lambda s: {"a": (True, 0.1, 5), "b": (False, 20.0, 5)},
                    "run 'b': lr must be a number in (0, 10], got 20.0"),
                   (lambda s: {"a": (1, 0.1, 5), "b": (False, 0.1, 5)}, "run 'a': qk_norm must be True or False, got 1"),
                   (lambda s: {"a": (True, 0.1, 5), "b": (True, 0.3, 5)},
                    "the design needs runs with qk_norm=True and with qk_norm=False"),
                   (lambda s: {"a": (True, 5), "b": (False, 0.1, 5)}, "run 'a' must be (qk_norm, lr, steps), got (True, 5)")]),
    "capstone": OpenLab(
        {"r", "lora_dropout", "steps", "steps_trained", "final_val_loss", "forgetting"},
        "least_forgetting",
        over_budget=lambda s: {"full": (None, 0.0, s.open_budget), "LoRA": (4, 0.0, 1)},
        without_task=lambda s, design: lab_module("capstone").open_experiment(s, None, None, None, design),
        malformed=[(lambda s: {"a": (4, 0.0, 5), "b": (8, 0.1, 5)}, "the design needs a full fine-tuning run (r None)"),
                   (lambda s: {"a": (None, 0.1, 5), "b": (4, 0.0, 5)},
                    "run 'a': a full fine-tuning run (r None) has no adapter: its lora_dropout must be 0, got 0.1"),
                   (lambda s: {"a": (None, 0.0, 5), "b": (2.5, 0.0, 5)},
                    "run 'b': r must be None (full fine-tuning) or a positive integer rank, got 2.5"),
                   (lambda s: {"a": (None, 0.0, 5), "b": (4, 1.0, 5)}, "run 'b': lora_dropout must be in [0, 1), got 1.0")]),
}


def ci_settings(lab: str):
    return lab_module(lab).settings_for("ci")


def solution_design(lab: str) -> Callable:
    """open_design(settings) as the solution notebook's cell "open-design" writes it."""
    names = {"settings": ci_settings(lab), "clipping": lab_module("clipping"), "ls": lab_module("label_smoothing"),
             "capstone": lab_module("capstone")}
    notebook = next(SOLUTIONS.glob(f"*_{lab}_lab.ipynb")).name      # by topic: lab numbers may change
    return solution_cells(notebook, "open-design", **names)["open_design"]


def graded(lab: str, design) -> dict:
    """The check's probe data for design (through JSON, as the grader passes it); its judge must pass it."""
    from reglab.checks import get
    spec = get(f"{lab}.open_experiment")
    data = json.loads(json.dumps(spec.probe(design)))
    spec.judge(data)
    return data


@pytest.mark.parametrize("lab", LABS)
def test_the_solutions_design_passes_and_its_record_has_the_labs_fields(lab):
    design, settings = solution_design(lab), ci_settings(lab)
    found = graded(lab, design)["record"]
    assert set(found["runs"]) == set(design(settings))
    for run in found["runs"].values():
        assert LABS[lab].run_fields <= set(run), set(run)
    assert LABS[lab].answer in found
    assert found["budget_steps"] == settings.open_budget and 0 < found["steps_spent"] <= settings.open_budget


@pytest.mark.parametrize("lab", LABS)
def test_a_design_over_the_budget_is_refused_with_its_total(lab):
    budget = ci_settings(lab).open_budget
    assert check_message(f"{lab}.open_experiment", LABS[lab].over_budget) == (
        f"the open experiment's design is refused: the design spends {budget + 1} optimizer steps, "
        f"over the budget of {budget}")


@pytest.mark.parametrize("lab, index", [(lab, i) for lab in LABS for i in range(len(LABS[lab].malformed))])
def test_a_malformed_design_is_refused_with_a_message_naming_the_problem(lab, index):
    design, problem = LABS[lab].malformed[index]
    message = check_message(f"{lab}.open_experiment", design)
    assert message.startswith("the open experiment's design is refused: ") and problem in message, message


@pytest.mark.parametrize("lab", LABS)
def test_the_labs_runner_refuses_a_bad_design_before_it_trains(lab, monkeypatch):
    """The runner gets no task or model where it takes them, and its sweep fails if called: it can only pass
    by refusing before it trains anything."""
    def no_training(*args, **kwargs):
        raise AssertionError("the runner trained a design it should have refused")
    monkeypatch.setattr(lab_module(lab), "sweep", no_training)
    settings = ci_settings(lab)
    for design, problem in [(LABS[lab].over_budget, "over the budget of"), *LABS[lab].malformed]:
        with pytest.raises(ValueError, match="the open experiment's design is refused") as refused:
            LABS[lab].without_task(settings, design)
        assert problem in str(refused.value)


@pytest.mark.parametrize("lab", LABS)
def test_an_unwritten_design_reports_not_implemented(lab):
    from reglab.checks import CheckFailed, check

    def stub(settings):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="not implemented yet"):
        check(f"{lab}.open_experiment", stub)


@pytest.mark.parametrize("lab", LABS)
def test_probe_data_claiming_more_steps_than_planned_or_no_runs_fails(lab):
    from reglab.checks import CheckFailed, get
    judge = get(f"{lab}.open_experiment").judge
    data = graded(lab, solution_design(lab))
    name = next(iter(data["record"]["runs"]))
    forged = json.loads(json.dumps(data))
    forged["record"]["runs"][name]["steps_trained"] = forged["design"][name][-1] + 1
    with pytest.raises(CheckFailed, match="trained .* steps, its design says"):
        judge(forged)
    del data["record"]
    with pytest.raises(CheckFailed, match="was not run"):
        judge(data)


def test_a_diverged_clipping_run_may_end_early_but_a_dropout_run_may_not():
    """Design.may_stop_early: clipping's runs end at a divergence; dropout's always train every planned step."""
    from reglab.checks import CheckFailed, get
    data = graded("clipping", solution_design("clipping"))
    name = next(iter(data["record"]["runs"]))
    data["record"]["runs"][name]["steps_trained"] -= 1
    get("clipping.open_experiment").judge(data)          # fewer steps than planned: a divergence, accepted
    dropout = {"design": {"a": [0.0, 3], "b": [0.1, 3]},
               "record": {"runs": {"a": {"steps_trained": 2, "best_val_loss": 2.0},
                                   "b": {"steps_trained": 3, "best_val_loss": 2.0}}}}
    with pytest.raises(CheckFailed, match="run 'a' trained 2 steps, its design says 3"):
        get("dropout.open_experiment").judge(dropout)


def test_label_smoothings_rule_picks_the_lowest_ece_among_runs_that_kept_alpha_0s_accuracy(monkeypatch):
    """The record's pick: a lower ECE bought with a drop beyond the tolerance does not count."""
    from types import SimpleNamespace
    ls = lab_module("label_smoothing")
    settings = ci_settings("label_smoothing")
    tolerance = settings.accuracy_tolerance
    metrics = {"alpha=0": {"acc": 0.80, "ece": 0.20}, "alpha=0.1": {"acc": 0.80 - 1.5 * tolerance, "ece": 0.05},
               "alpha=0.2": {"acc": 0.80 - 0.5 * tolerance, "ece": 0.10}, "alpha=0.3": {"acc": 0.81, "ece": 0.15}}
    monkeypatch.setattr(ls, "run_metrics", lambda run, n_bins: {**metrics[run.label], "nll": 1.0})
    runs = {name: (float(name.split("=")[1]), 10) for name in metrics}
    results = {name: [SimpleNamespace(label=name, history=SimpleNamespace(loss=[1.0] * 10))] for name in runs}
    found = ls.open_record(settings, runs, results)
    assert found["reference_acc"] == 0.80 and found["unchanged_accuracy"] == ["alpha=0", "alpha=0.2", "alpha=0.3"]
    assert found["lowest_ece"] == "alpha=0.2"


def fake_run(steps: int, val_loss: float = 2.0, diverged_at=None, **extra):
    """What the records read of a Run: its history (per-step losses, evaluations) and outputs."""
    from types import SimpleNamespace
    from reglab.train import History
    evals = extra.pop("evals", [{"step": steps, "val_loss": val_loss, **extra.pop("final", {})}])
    return SimpleNamespace(history=History(loss=[1.0] * steps, evals=evals), diverged_at=diverged_at, **extra)


def test_clippings_record_keeps_the_largest_lr_that_did_not_diverge_per_clip():
    clip_lab = lab_module("clipping")
    runs = {"none 0.3": (0.3, None, 10), "none 1": (1.0, None, 10), "none 3": (3.0, None, 10),
            "c=1 0.3": (0.3, 1.0, 10), "c=1 1": (1.0, 1.0, 10), "c=1 3": (3.0, 1.0, 10), "c=0.25 3": (3.0, 0.25, 10)}
    diverged = {"none 1": 4, "none 3": 2, "c=1 3": 7, "c=0.25 3": 5}
    results = {name: [fake_run(diverged.get(name, 10), diverged_at=diverged.get(name))] for name in runs}
    found = clip_lab.open_record(ci_settings("clipping"), runs, results)
    assert found["largest_stable_lr"] == {"none": 0.3, "1": 1.0, "0.25": None}
    assert found["runs"]["none 1"]["final_val_loss"] is None and found["runs"]["c=1 1"]["final_val_loss"] == 2.0
    assert found["steps_spent"] == 10 * 3 + 4 + 2 + 7 + 5


def test_weight_decays_record_names_the_run_that_grokked_first_or_none():
    wd_lab = lab_module("weight_decay")
    settings = ci_settings("weight_decay")

    def grokking(*accuracies):
        evals = [{"step": 10 * (i + 1), "val_acc": a} for i, a in enumerate(accuracies)]
        return [fake_run(10 * len(accuracies), evals=evals).history]          # the lab's runner returns histories
    runs = {"λ=1": (1.0, 3e-3, 30), "λ=2": (2.0, 3e-3, 30), "λ=0": (0.0, 3e-3, 30)}
    results = {"λ=1": grokking(0.5, 0.995, 1.0), "λ=2": grokking(0.99, 1.0), "λ=0": grokking(0.4, 0.5, 0.5)}
    found = wd_lab.open_record(settings, runs, results)
    assert [found["runs"][name]["grok_step"] for name in runs] == [20, 10, None] and found["fastest"] == "λ=2"
    del runs["λ=1"], runs["λ=2"]
    assert wd_lab.open_record(settings, runs, results)["fastest"] is None


def test_capstones_record_picks_the_least_forgetting_among_runs_no_worse_than_full():
    """A run that forgets less but whose val loss exceeds full's by more than two standard errors does not count."""
    capstone = lab_module("capstone")
    runs = {"full": (None, 0.0, 10), "LoRA r=4": (4, 0.0, 10), "LoRA r=2": (2, 0.0, 10)}

    def run(val_loss, orig_loss):
        return [fake_run(10, val_loss, final={"orig_loss": orig_loss}, trainable_params=100,
                         outputs={"val_loss_error": 0.01})]
    results = {"full": run(3.00, 2.5), "LoRA r=4": run(3.015, 2.1), "LoRA r=2": run(3.05, 2.0)}
    found = capstone.open_record(ci_settings("capstone"), runs, results, orig_before=2.0)
    assert found["reference"] == "full" and found["val_loss_tolerance"] == pytest.approx(0.02)
    assert found["no_worse_than_full"] == ["full", "LoRA r=4"] and found["least_forgetting"] == "LoRA r=4"
    assert found["runs"]["LoRA r=2"]["forgetting"] == pytest.approx(0.0)
