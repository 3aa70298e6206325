"""Tests of the dropout lab's verdict: the sentence the lab prints about dropout's effect is read from the
measured table, says 'lowers beyond the seed spread' only when it does, and refuses a table it cannot read."""
from __future__ import annotations

import pytest

from reglab.topics.dropout.lab import dropout_effect, effect_sentence, figures, seed_spread
from solution_code import check_message


def row(best_per_seed, gap=1.0, steps=(100, 100)):
    """One setting of a summarize() table, from its per-seed best val losses."""
    best_per_seed = list(best_per_seed)
    return {"best_val_loss": sum(best_per_seed) / len(best_per_seed), "best_step": sum(steps) / len(steps),
            "final_gap": gap, "final_val_loss": max(best_per_seed),
            "per_seed": {"best_val_loss": best_per_seed, "best_step": list(steps), "final_gap": [gap] * len(steps)}}


def test_seed_spread_is_highest_minus_lowest_seed():
    assert seed_spread(row([2.50, 2.53])) == pytest.approx(0.03)
    assert seed_spread(row([2.50], steps=(100,))) == 0.0


def test_a_drop_beyond_the_seed_spread_is_reported_as_lowering_the_loss():
    measured = {"p=0": row([2.60, 2.62], gap=1.6), "p=0.1": row([2.55, 2.56], gap=1.0),
                "p=0.2": row([2.50, 2.51], gap=0.5, steps=(600, 550))}
    effect = dropout_effect(measured)
    assert effect["verdict"] == "helped" and effect["setting"] == "p=0.2"
    assert effect["delta"] == pytest.approx(-0.105) and effect["noise"] == pytest.approx(0.02)
    sentence = effect_sentence(effect, last_step=600)
    assert sentence.startswith("p=0.2 lowers the best val loss from 2.610 (p=0) to 2.505 (-0.105): more than the seed spread 0.020 (2 seeds).")
    assert "final train-val gap is 0.500 against 1.600" in sentence
    assert "still improving" not in sentence          # its mean best step (575) is before the last step


def test_a_drop_within_the_seed_spread_is_no_clear_effect():
    measured = {"p=0": row([2.60, 2.66]), "p=0.2": row([2.58, 2.62])}   # -0.03, spread 0.06
    effect = dropout_effect(measured)
    assert effect["verdict"] == "no clear effect"
    sentence = effect_sentence(effect)
    assert sentence.startswith("No setting changes the best val loss beyond the seed spread 0.060 (2 seeds)")
    assert "lowers the best val loss" in sentence and "more than" not in sentence


def test_the_verdict_flips_when_the_measured_drop_is_perturbed_to_within_the_noise():
    helped = {"p=0": row([2.60, 2.62]), "p=0.2": row([2.50, 2.51])}
    assert dropout_effect(helped)["verdict"] == "helped"
    perturbed = {"p=0": row([2.60, 2.62]), "p=0.2": row([2.50, 2.70])}   # gain 0.01 within a seed spread of 0.20
    assert dropout_effect(perturbed)["verdict"] == "no clear effect"


def test_dropout_that_only_hurts_is_reported_as_raising_the_loss():
    measured = {"p=0": row([2.60, 2.61]), "p=0.1": row([2.70, 2.71]), "p=0.3": row([2.90, 2.91])}
    effect = dropout_effect(measured)
    assert effect["verdict"] == "hurt" and effect["setting"] == "p=0.1"
    assert effect_sentence(effect).startswith("Every setting does worse than p=0: p=0.1 raises the best val loss")


def test_one_seed_says_its_spread_is_unmeasured_and_a_late_best_says_so():
    measured = {"p=0": row([2.60], steps=(100,)), "p=0.2": row([2.55], steps=(600,))}
    effect = dropout_effect(measured)
    assert effect["verdict"] == "not judged (one seed)"
    sentence = effect_sentence(effect, last_step=600)
    assert "one seed has no seed spread to judge that by" in sentence and "more than" not in sentence
    assert "p=0.2 was still improving at the last step (600)" in sentence


def test_higher_is_better_picks_the_highest_and_judges_its_gain():
    recall = {"p=0": {"recall": 0.95, "per_seed": {"recall": [0.94, 0.96]}},
              "p=0.2": {"recall": 0.20, "per_seed": {"recall": [0.18, 0.22]}}}
    effect = dropout_effect(recall, key="recall", higher_is_better=True)
    assert effect["verdict"] == "hurt" and effect["delta"] == pytest.approx(-0.75)
    assert effect_sentence(effect).startswith("p=0.2 does worse than p=0: p=0.2 lowers the recall from 0.950")


def test_the_published_record_gives_the_same_verdict_as_the_table():
    measured = {"p=0": row([2.60, 2.62]), "p=0.2": row([2.50, 2.51])}
    assert dropout_effect(figures(measured)) == dropout_effect(measured)


def test_a_table_without_the_baseline_or_anything_else_is_refused_with_a_message():
    with pytest.raises(ValueError, match="baseline 'p=0' is not in the table; it has \\['p=0.2'\\]"):
        dropout_effect({"p=0.2": row([2.5, 2.5])})
    with pytest.raises(ValueError, match="only the baseline"):
        dropout_effect({"p=0": row([2.5, 2.5])})


# ---------------------------------------------------------------------------------------------------
# The open experiment's check: the design runs within its budget; what it finds is not judged
# ---------------------------------------------------------------------------------------------------

def open_verdict(design):
    """None if the open experiment's check passes the design, else its message (data through JSON, as graded)."""
    return check_message("dropout.open_experiment", design)


def two_halves(settings):
    steps = settings.open_budget // 2
    return {f"p={p:g}": (p, steps) for p in (0.1, 0.2)}


def test_a_design_within_the_budget_passes_and_its_runs_are_recorded():
    from reglab.topics.dropout.checks import probe_open_experiment
    data = probe_open_experiment(two_halves)
    assert open_verdict(two_halves) is None
    assert set(data["record"]["runs"]) == {"p=0.1", "p=0.2"}
    assert data["record"]["steps_spent"] <= data["record"]["budget_steps"]


def test_a_design_over_the_budget_fails_with_its_total():
    def greedy(settings):
        return {"p=0": (0.0, settings.open_budget), "p=0.2": (0.2, 1)}
    budget = lab_settings_ci().open_budget
    assert open_verdict(greedy) == (f"the open experiment's design is refused: the design spends {budget + 1} "
                                    f"optimizer steps, over the budget of {budget}")


def test_a_single_run_or_a_bad_p_is_refused_with_a_message():
    assert "it needs at least 2" in open_verdict(lambda s: {"only": (0.1, 5)})
    assert "p must be in [0, 1), got 1.0" in open_verdict(lambda s: {"a": (1.0, 5), "b": (0.0, 5)})
    assert "must return a dict" in open_verdict(lambda s: [(0.1, 5)])


def test_probe_data_that_claims_fewer_steps_than_trained_fails():
    from reglab.topics.dropout.checks import judge_open_experiment, probe_open_experiment
    from reglab.checks import CheckFailed
    data = probe_open_experiment(two_halves)
    data["record"]["runs"]["p=0.1"]["steps_trained"] -= 1
    with pytest.raises(CheckFailed, match="trained .* steps, its design says"):
        judge_open_experiment(data)
    data = probe_open_experiment(two_halves)
    del data["record"]
    with pytest.raises(CheckFailed, match="was not run"):
        judge_open_experiment(data)


def test_the_open_experiment_refuses_an_over_budget_design_before_training():
    from reglab.topics.dropout.lab import open_experiment
    settings = lab_settings_ci()
    with pytest.raises(ValueError, match="over the budget of"):
        open_experiment(settings, None, None, None, lambda s: {"a": (0.0, s.open_budget), "b": (0.0, 1)})


def test_an_unwritten_design_reports_not_implemented():
    from reglab.checks import CheckFailed, check

    def stub(settings):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="not implemented yet"):
        check("dropout.open_experiment", stub)


def lab_settings_ci():
    from reglab.topics.dropout.lab import settings_for
    return settings_for("ci")


def test_a_change_and_spread_that_round_alike_are_printed_with_four_decimals():
    measured = {"p=0": row([2.7450, 2.7220]), "p=0.2": row([2.6913, 2.7193])}   # -0.0282 against 0.0280
    sentence = effect_sentence(dropout_effect(measured))
    assert "(-0.0282): more than the seed spread 0.0280 (2 seeds)" in sentence
