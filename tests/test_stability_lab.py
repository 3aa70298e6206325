"""The stability lab's checks and experiments: the solution passes every check, the stub is not implemented, each
misconception (normalizing after the dot product, the z-loss on the wrong axis, forgetting it in the logged loss,
...) fails exactly its checks with a message naming it; the LR sensitivity and the open experiment."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from reglab.checks import CheckFailed, check, get
from reglab.topics.stability import checks as stability_checks
from reglab.topics.stability import lab as stability
from solution_code import check_message, solution_cells

SOLUTION = solution_cells("05_stability_lab.ipynb", "qk-norm-scores", "z-loss")
qk_norm_scores, z_loss, training_loss = (SOLUTION[name] for name in ("qk_norm_scores", "z_loss", "training_loss"))

QK_CHECKS = ["stability.qk_norm_scores", "stability.qk_norm_scale", "stability.qk_norm_grads"]
Z_CHECKS = ["stability.z_loss", "stability.z_loss_grad"]
LOSS_CHECKS = ["stability.training_loss"]


def verdicts(check_ids, obj) -> dict:
    """{check id: its message, or None when obj passes}, data through JSON as in the grader."""
    return {check_id: check_message(check_id, obj) for check_id in check_ids}


def test_the_lab_has_its_checks_with_points():
    from reglab.checks import REGISTRY
    ids = {cid for cid in REGISTRY if cid.startswith("stability.")}
    assert ids == {*QK_CHECKS, *Z_CHECKS, *LOSS_CHECKS, "stability.open_experiment"}
    assert all(get(cid).points > 0 for cid in ids)


@pytest.mark.parametrize("check_id, obj", [*((c, qk_norm_scores) for c in QK_CHECKS), *((c, z_loss) for c in Z_CHECKS),
                                           ("stability.training_loss", training_loss)])
def test_the_solution_passes_every_check(check_id, obj, capsys):
    check(check_id, obj)
    assert f"passed {check_id}" in capsys.readouterr().out
    assert check_message(check_id, obj) is None


@pytest.mark.parametrize("check_id", [*QK_CHECKS, *Z_CHECKS, *LOSS_CHECKS, "stability.open_experiment"])
def test_an_unfinished_stub_is_reported_as_not_implemented(check_id):
    def stub(*args):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="not implemented yet"):
        check(check_id, stub)


def test_the_answer_key_is_the_models_own_qk_norm_path():
    """The judge's float64 logits agree with reglab.train.attention_logits (the trainer's reading) below the mask."""
    from reglab.train import attention_logits
    for name in stability_checks.QK_CASES:
        model, x = stability_checks.qk_case(name)
        per_layer, _ = attention_logits(model, x)
        answer = stability_checks.reference_scores(name)["answer"]
        T = x.size(1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        assert torch.allclose(per_layer[0][..., causal].double(), answer[..., causal], rtol=1e-4, atol=1e-5), name


# ------------------------------------------------------------------------------------------ qk-norm mistakes

def _hs(q):
    return math.sqrt(q.size(-1))


def normalized_after_the_product(q, k, q_norm, k_norm):
    return F.layer_norm(q @ k.transpose(-2, -1) / _hs(q), (q.size(-2),))


def norms_on_the_scores(q, k, q_norm, k_norm):
    """The same misconception with the layer's own modules (it runs only where T == hs)."""
    return k_norm(q_norm(q @ k.transpose(-2, -1) / _hs(q)))


def not_normalized(q, k, q_norm, k_norm):
    return q @ k.transpose(-2, -1) / _hs(q)


def without_the_scale(q, k, q_norm, k_norm):
    return q_norm(q) @ k_norm(k).transpose(-2, -1)


def only_q(q, k, q_norm, k_norm):
    return q_norm(q) @ k.transpose(-2, -1) / _hs(q)


def swapped_norms(q, k, q_norm, k_norm):
    return k_norm(q) @ q_norm(k).transpose(-2, -1) / _hs(q)


def without_gain(q, k, q_norm, k_norm):
    hs = q.size(-1)
    return F.layer_norm(q, (hs,)) @ F.layer_norm(k, (hs,)).transpose(-2, -1) / _hs(q)


def attention_weights(q, k, q_norm, k_norm):
    T = q.size(-2)
    att = qk_norm_scores(q, k, q_norm, k_norm).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    return att.softmax(-1)


def masked(q, k, q_norm, k_norm):
    T = q.size(-2)
    return qk_norm_scores(q, k, q_norm, k_norm).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)


QK_MISTAKES = {
    normalized_after_the_product: {"stability.qk_norm_scores": "normalized after the dot product",
                                   "stability.qk_norm_grads": "no gradient reached q_norm's gain"},
    norms_on_the_scores: {"stability.qk_norm_scores": "normalized after the dot product",
                          "stability.qk_norm_scale": "raised RuntimeError",
                          "stability.qk_norm_grads": "raised RuntimeError"},
    not_normalized: {"stability.qk_norm_scores": "did not normalize q and k",
                     "stability.qk_norm_scale": "the largest logit grew",
                     "stability.qk_norm_grads": "no gradient reached q_norm's gain"},
    without_the_scale: {"stability.qk_norm_scores": "forgot the 1 / sqrt(hs) scale",
                        "stability.qk_norm_grads": "differs from the model's"},
    only_q: {"stability.qk_norm_scores": "normalized q only",
             "stability.qk_norm_scale": "the largest logit grew",
             "stability.qk_norm_grads": "no gradient reached k_norm's gain"},
    swapped_norms: {"stability.qk_norm_scores": "swapped the norms",
                    "stability.qk_norm_grads": "differs from the model's"},
    without_gain: {"stability.qk_norm_scores": "without the norms' learned gain and bias",
                   "stability.qk_norm_grads": "no gradient reached q_norm's gain"},
    attention_weights: {"stability.qk_norm_scores": "returned the attention weights",
                        "stability.qk_norm_grads": "differs from the model's"},
    masked: {"stability.qk_norm_scores": "applied the causal mask",
             "stability.qk_norm_grads": "differs from the model's"},
}


@pytest.mark.parametrize("mistake", list(QK_MISTAKES), ids=lambda f: f.__name__)
def test_each_qk_norm_mistake_fails_exactly_its_checks_with_its_message(mistake):
    found = verdicts(QK_CHECKS, mistake)
    expected = QK_MISTAKES[mistake]
    assert {c for c, message in found.items() if message is not None} == set(expected), found
    for check_id, phrase in expected.items():
        assert phrase in found[check_id], (check_id, found[check_id])


# ------------------------------------------------------------------------------------------ z-loss mistakes

def over_the_batch_axis(logits, coef):
    return coef * torch.logsumexp(logits, dim=0).pow(2).mean()


def over_every_logit(logits, coef):
    return coef * torch.logsumexp(logits.reshape(-1), dim=0).pow(2)


def without_the_square(logits, coef):
    return coef * torch.logsumexp(logits, dim=-1).mean()


def square_of_the_mean(logits, coef):
    return coef * torch.logsumexp(logits, dim=-1).mean().pow(2)


def summed(logits, coef):
    return coef * torch.logsumexp(logits, dim=-1).pow(2).sum()


def without_coef(logits, coef):
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def on_the_logits(logits, coef):
    return coef * logits.pow(2).mean()


def naive_log_sum_exp(logits, coef):
    return coef * torch.log(torch.exp(logits).sum(-1)).pow(2).mean()


def of_the_log_probs(logits, coef):
    return coef * torch.logsumexp(torch.log_softmax(logits, -1), dim=-1).pow(2).mean()


def detached_z(logits, coef):
    return torch.tensor(z_loss(logits, coef).item())


Z_MISTAKES = {
    over_the_batch_axis: {"stability.z_loss": "the z-loss on the wrong axis",
                          "stability.z_loss_grad": "gradient differs"},
    over_every_logit: {"stability.z_loss": "the z-loss on the wrong axis", "stability.z_loss_grad": "gradient differs"},
    without_the_square: {"stability.z_loss": "forgot the square", "stability.z_loss_grad": "gradient differs"},
    square_of_the_mean: {"stability.z_loss": "squared the mean", "stability.z_loss_grad": "gradient differs"},
    summed: {"stability.z_loss": "summed over the predictions", "stability.z_loss_grad": "gradient differs"},
    without_coef: {"stability.z_loss": "ignored coef", "stability.z_loss_grad": "gradient differs"},
    on_the_logits: {"stability.z_loss": "penalized the logits themselves", "stability.z_loss_grad": "gradient differs"},
    naive_log_sum_exp: {"stability.z_loss": "overflows in float32"},
    of_the_log_probs: {"stability.z_loss": "log Z of the log-probabilities",
                       "stability.z_loss_grad": "gradient differs"},
    detached_z: {"stability.z_loss_grad": "no gradient reached the logits"},
}


@pytest.mark.parametrize("mistake", list(Z_MISTAKES), ids=lambda f: f.__name__)
def test_each_z_loss_mistake_fails_exactly_its_checks_with_its_message(mistake):
    found = verdicts(Z_CHECKS, mistake)
    expected = Z_MISTAKES[mistake]
    assert {c for c, message in found.items() if message is not None} == set(expected), found
    for check_id, phrase in expected.items():
        assert phrase in found[check_id], (check_id, found[check_id])


def _ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def cross_entropy_only(logits, targets, coef):
    return _ce(logits, targets)


def z_added_detached(logits, targets, coef):
    return _ce(logits, targets) + z_loss(logits, coef).item()


def z_trained_but_not_logged(logits, targets, coef):
    z = z_loss(logits, coef)
    return _ce(logits, targets) + (z - z.detach())


def z_on_the_wrong_axis(logits, targets, coef):
    return _ce(logits, targets) + over_the_batch_axis(logits, coef)


def smoothed(logits, targets, coef):
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), label_smoothing=0.1)
    return ce + z_loss(logits, coef)


LOSS_MISTAKES = {
    cross_entropy_only: "forgot the z-loss in the logged loss",
    z_trained_but_not_logged: "forgot the z-loss in the logged loss",
    z_added_detached: "added the z-loss detached",
    z_on_the_wrong_axis: "the z-loss on the wrong axis",
    smoothed: "CE + z-loss is",
}


@pytest.mark.parametrize("mistake", list(LOSS_MISTAKES), ids=lambda f: f.__name__)
def test_each_training_loss_mistake_fails_with_its_message(mistake):
    message = check_message("stability.training_loss", mistake)
    assert message is not None and LOSS_MISTAKES[mistake] in message, message


# ------------------------------------------------------------------------------------------ refusals

def trainer_z_loss(logits, coef):
    from reglab.train import z_loss_term
    return coef * z_loss_term(logits)


def trainer_loss(logits, targets, coef):
    from reglab.train import loss_fn
    return loss_fn(logits, targets, z_loss=coef)


def trainer_cross_entropy_and_own_z(logits, targets, coef):
    from reglab.train import loss_fn
    return loss_fn(logits, targets) + z_loss(logits, coef)


def test_the_trainers_z_loss_is_refused_but_its_plain_cross_entropy_is_not():
    for check_id in Z_CHECKS:
        message = check_message(check_id, trainer_z_loss)
        assert "uses reglab.train.z_loss_term, which this lab refuses" in message, message
    assert "uses reglab.train.loss_fn, which this lab refuses" in check_message("stability.training_loss", trainer_loss)
    assert check_message("stability.training_loss", trainer_cross_entropy_and_own_z) is None


def test_probe_data_is_json_and_forged_data_fails():
    for check_id, obj in [*((c, qk_norm_scores) for c in QK_CHECKS), *((c, z_loss) for c in Z_CHECKS),
                          ("stability.training_loss", training_loss)]:
        json.dumps(get(check_id).probe(obj), allow_nan=False)
    spec = get("stability.z_loss")
    data = json.loads(json.dumps(spec.probe(z_loss)))
    data["btv"]["tensor"]["values"][0] *= 1.01
    with pytest.raises(CheckFailed, match="case 'btv'"):
        spec.judge(data)
    with pytest.raises(CheckFailed, match="malformed"):
        spec.judge({name: {"tensor": {"shape": [2], "values": [1.0]}} for name in stability_checks.Z_CASES})


# ------------------------------------------------------------------------------------------ the experiments

def test_lr_sensitivity_is_the_mean_excess_over_the_best_with_divergences_at_the_initial_loss():
    # losses 2.0 (best), 2.5, diverged (None -> ln V = 4.0), 5.0 capped at 4.0: mean of 0, 0.5, 2, 2
    assert stability.lr_sensitivity([2.0, 2.5, None, 5.0], 4.0) == pytest.approx(1.125)
    assert stability.lr_sensitivity([3.0, 3.0], 4.0) == 0.0
    assert stability.lr_sensitivity([float("nan"), 2.0], 4.0) == pytest.approx(1.0)


def test_settings_exist_for_every_budget_and_span_a_decade():
    for budget in ("ci", "cpu", "gpu"):
        settings = stability.settings_for(budget)
        assert max(settings.lrs) / min(settings.lrs) >= 10 and list(settings.lrs) == sorted(settings.lrs)
        assert settings.n_seeds >= 2 and settings.open_budget >= 2
        assert settings.variant(stability.QK_NORM_Z) == (True, settings.z_loss)
    with pytest.raises(ValueError, match="unknown variant"):
        stability.settings_for("ci").variant("qk")


def _fake_run(final, diverged_at=None, max_logit=10.0, log_z=3.0):
    from reglab.train import History, Run, TrainConfig
    history = History(loss=[3.0], evals=[] if final is None else
                      [{"step": 1, "val_loss": final, "max_attn_logit": max_logit, "log_z": log_z}])
    return Run("x", 0, TrainConfig(steps=1, warmup_steps=0), history, 1, 1, diverged_at)


def test_summarize_and_effects_read_the_verdicts_from_the_runs():
    settings = stability.settings_for("ci")
    lrs = settings.lrs
    finals = {stability.BASELINE: [(2.0, 2.02), (2.5, 2.6), (None, None)],
              stability.QK_NORM: [(2.0, 2.01), (2.05, 2.07), (2.2, 2.25)],
              stability.QK_NORM_Z: [(2.0, 2.01), (2.05, 2.06), (2.1, 2.15)]}
    stats = {stability.BASELINE: (5000.0, 6.0), stability.QK_NORM: (12.0, 6.0), stability.QK_NORM_Z: (12.0, 0.2)}
    results = {}
    for name, rows in finals.items():
        for lr, row in zip(lrs, rows):
            results[name, lr] = [_fake_run(f, None if f is not None else 3, stats[name][0] + i,
                                           stats[name][1] + 0.01 * i) for i, f in enumerate(row)]
    table = stability.summarize(results, settings, vocab_size=50)
    assert table[stability.BASELINE]["final_val_loss"][2] == [None, None]
    assert table[stability.BASELINE]["max_attn_logit"] is None        # diverged at the high lr: no final value
    found = stability.effects(table)
    assert found["lr_sensitivity"]["verdict"] == "helped" and found["lr_sensitivity"]["setting"] == stability.QK_NORM
    assert found["max_attn_logit"] is None
    assert found["abs_log_z"]["verdict"] == "helped"
    lines = stability.effect_lines(found)
    assert "qk-norm lowers the lr sensitivity" in lines[0] and "not judged: a run diverged" in lines[1]
    json.dumps(table, allow_nan=False)


def test_the_ci_sweep_runs_every_variant_and_records_the_stability_readings():
    from reglab.data import corpus_task
    settings = stability.settings_for("ci")
    text, task = corpus_task("builtin", settings.block_size, settings.batch_size)
    results = stability.lr_sweep(settings, task, text.vocab_size, progress=False)
    assert set(results) == {(v, lr) for v in stability.VARIANTS for lr in settings.lrs}
    run = results[stability.QK_NORM_Z, settings.high_lr][0]
    assert run.config.z_loss == settings.z_loss and run.config.grad_clip is None and run.config.weight_decay == 0
    assert {"max_attn_logit", "log_z"} <= set(run.history.final)
    z_results = stability.z_sweep(settings, task, text.vocab_size, results, progress=False)
    assert list(z_results) == sorted({0.0, settings.z_loss, *settings.z_coefs})


# ------------------------------------------------------------------------------------------ the open experiment

def two_by_two(settings):
    steps = settings.open_budget // 4
    return {f"{qk}, {lr:g}": (qk, lr, steps) for qk in (False, True) for lr in (1e-2, 1e-1)}


def test_a_design_within_the_budget_passes_and_its_largest_stable_lrs_are_recorded():
    data = json.loads(json.dumps(stability_checks.OPEN.probe(two_by_two)))
    stability_checks.OPEN.judge(data)
    record = data["record"]
    assert record["budget_steps"] == stability.settings_for("ci").open_budget
    assert 0 < record["steps_spent"] <= record["budget_steps"]
    assert record["stable_margin"] == stability.STABLE_MARGIN
    assert set(record["largest_stable_lr"]) == {"qk-norm", "baseline"}
    fields = {"qk_norm", "lr", "steps", "steps_trained", "final_val_loss", "diverged_at", "max_attn_logit"}
    assert all(fields <= set(run) for run in record["runs"].values())


def test_a_design_over_the_budget_or_of_one_kind_is_refused_with_a_message():
    budget = stability.settings_for("ci").open_budget
    greedy = check_message("stability.open_experiment", lambda s: {"a": (False, 0.1, budget), "b": (True, 0.1, 1)})
    assert greedy == (f"the open experiment's design is refused: the design spends {budget + 1} optimizer steps, "
                      f"over the budget of {budget}")
    one_kind = check_message("stability.open_experiment", lambda s: {"a": (True, 0.1, 5), "b": (True, 0.3, 5)})
    assert "the question compares: the design needs runs with qk_norm=True and with qk_norm=False" in one_kind
    assert "run 'a': lr must be a number in (0, 10], got -1" in check_message(
        "stability.open_experiment", lambda s: {"a": (True, -1, 5), "b": (False, 0.1, 5)})
    assert "run 'a': qk_norm must be True or False, got 1" in check_message(
        "stability.open_experiment", lambda s: {"a": (1, 0.1, 5), "b": (False, 0.1, 5)})
    assert "must return a dict" in check_message("stability.open_experiment", lambda s: [(True, 0.1, 5)])
    with pytest.raises(ValueError, match="over the budget of"):
        stability.open_experiment(stability.settings_for("ci"), None, None,
                                  lambda s: {"a": (False, 0.1, budget), "b": (True, 0.1, 1)})


def test_a_run_may_end_early_at_a_divergence_but_never_train_more_than_designed():
    """OPEN_DESIGN.may_stop_early: a diverged run trains fewer steps than planned; more is forged data."""
    data = json.loads(json.dumps(stability_checks.OPEN.probe(two_by_two)))
    name = next(iter(data["record"]["runs"]))
    data["record"]["runs"][name]["steps_trained"] -= 1
    stability_checks.OPEN.judge(data)
    data["record"]["runs"][name]["steps_trained"] += 2
    with pytest.raises(CheckFailed, match="trained .* steps, its design says"):
        stability_checks.OPEN.judge(data)
    del data["record"]
    with pytest.raises(CheckFailed, match="was not run"):
        stability_checks.OPEN.judge(data)


def test_the_stable_rule_takes_the_largest_lr_within_the_margin_of_the_best_of_its_kind():
    settings = stability.settings_for("ci")
    runs = {"b1": (False, 0.01, 5), "b2": (False, 0.1, 5), "q1": (True, 0.01, 5), "q2": (True, 0.1, 5),
            "q3": (True, 1.0, 5)}
    results = {"b1": [_fake_run(2.0)], "b2": [_fake_run(2.3)], "q1": [_fake_run(2.0)], "q2": [_fake_run(2.05)],
               "q3": [_fake_run(None, diverged_at=2)]}
    found = stability.open_record(settings, runs, results)
    assert found["largest_stable_lr"] == {"qk-norm": 0.1, "baseline": 0.01}
