"""Label smoothing: the reference passes every check, each classic mistake fails with its named message,
and the closed forms and calibration tools agree with independent computations (PyTorch as the oracle)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reglab.topics.label_smoothing.checks as checks_module
from reglab.checks import REGISTRY, CheckFailed, check
from reglab.topics.label_smoothing.lab import SETTINGS, model_config
from reglab.topics.label_smoothing.lecture import (
    BagOfTokens, expected_calibration_error, fit_temperature, label_smoothed_cross_entropy, logit_gap,
    optimal_logit_gap, optimal_true_probability, reliability_data, smoothed_target, true_class_gradient_limit)
from solution_code import solution_cells

# the checks of the student's implementation; "label_smoothing.open_experiment" checks the open experiment's design
# instead (tests/test_open_experiments.py)
CHECK_IDS = sorted(k for k in REGISTRY if k.startswith("label_smoothing.") and k != "label_smoothing.open_experiment")


def run_split(check_id, fn, ignore_shortcuts: bool = False):
    """As the grader does: probe in one place, JSON across, judge from the data alone (ignore_shortcuts:
    drop the probe's record of refused shortcuts, to test the judge's numbers alone)."""
    spec = REGISTRY[check_id]
    data = json.loads(json.dumps(spec.probe(fn)))
    if ignore_shortcuts:
        data.pop("shortcuts")
    spec.judge(data)


def failing(fn, ignore_shortcuts: bool = False) -> dict[str, str]:
    """{check id: failure message} for every check fn fails."""
    failures = {}
    for check_id in CHECK_IDS:
        try:
            run_split(check_id, fn, ignore_shortcuts)
        except CheckFailed as err:
            failures[check_id] = str(err)
    return failures


# --------------------------------------------------------------------------------------------------
# the solution notebook's loss (the checks refuse the lecture's reference: a shortcut)
solution_loss = solution_cells("03_label_smoothing_lab.ipynb", "student-loss")["label_smoothed_cross_entropy"]


# Student-style implementations: one classic mistake each, correct in every other respect
# --------------------------------------------------------------------------------------------------

def _reduce(loss, keep, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum()


def _terms(logits, target, ignore_index):
    log_probs = F.log_softmax(logits, dim=1)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    nll = -log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
    return log_probs, keep, nll


def other_classes_only(logits, target, alpha, ignore_index=-100, reduction="mean"):
    log_probs, keep, nll = _terms(logits, target, ignore_index)
    V = logits.size(1)
    others = -log_probs.sum(1) - nll                              # sum over k != y of -log p_k
    loss = (1 - alpha) * nll + alpha / (V - 1) * others
    return _reduce(torch.where(keep, loss, torch.zeros_like(loss)), keep, reduction)


def smoothed_twice(logits, target, alpha, ignore_index=-100, reduction="mean"):
    V = logits.size(1)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    soft = (1 - alpha) * F.one_hot(safe, V).movedim(-1, 1).to(logits.dtype) + alpha / V
    soft = (1 - alpha) * soft + alpha / V                         # the smoothed target smoothed again
    per = -(soft * F.log_softmax(logits, dim=1)).sum(1)
    return _reduce(torch.where(keep, per, torch.zeros_like(per)), keep, reduction)


def wrong_sign(logits, target, alpha, ignore_index=-100, reduction="mean"):
    return -solution_loss(logits, target, alpha, ignore_index, reduction)


def logits_as_log_probs(logits, target, alpha, ignore_index=-100, reduction="mean"):
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    loss = -(1 - alpha) * logits.gather(1, safe.unsqueeze(1)).squeeze(1) - alpha * logits.mean(1)
    return _reduce(torch.where(keep, loss, torch.zeros_like(loss)), keep, reduction)


def uniform_not_divided(logits, target, alpha, ignore_index=-100, reduction="mean"):
    log_probs, keep, nll = _terms(logits, target, ignore_index)
    loss = (1 - alpha) * nll + alpha * (-log_probs.sum(1))
    return _reduce(torch.where(keep, loss, torch.zeros_like(loss)), keep, reduction)


def ignores_alpha(logits, target, alpha, ignore_index=-100, reduction="mean"):
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


def ignored_in_denominator(logits, target, alpha, ignore_index=-100, reduction="mean"):
    loss = solution_loss(logits, target, alpha, ignore_index, reduction="none")
    return loss.mean() if reduction == "mean" else _reduce(loss, None, reduction)


def ignored_keep_uniform_term(logits, target, alpha, ignore_index=-100, reduction="mean"):
    log_probs, keep, nll = _terms(logits, target, ignore_index)
    loss = (1 - alpha) * torch.where(keep, nll, torch.zeros_like(nll)) + alpha * (-log_probs.mean(1))
    return _reduce(loss, keep, reduction)


def gather_without_mask(logits, target, alpha, ignore_index=-100, reduction="mean"):
    log_probs = F.log_softmax(logits, dim=1)
    keep = target != ignore_index
    nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)    # -100 is out of range
    loss = (1 - alpha) * nll - alpha * log_probs.mean(1)
    return _reduce(torch.where(keep, loss, torch.zeros_like(loss)), keep, reduction)


def hardcoded_minus_100(logits, target, alpha, ignore_index=-100, reduction="mean"):
    return solution_loss(logits, target, alpha, ignore_index=-100, reduction=reduction)


def class_dim_last(logits, target, alpha, ignore_index=-100, reduction="mean"):
    log_probs = F.log_softmax(logits, dim=-1)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    nll = -log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = (1 - alpha) * nll - alpha * log_probs.mean(1)
    return _reduce(torch.where(keep, loss, torch.zeros_like(loss)), keep, reduction)


def log_of_softmax(logits, target, alpha, ignore_index=-100, reduction="mean"):
    log_probs = torch.log(torch.softmax(logits, dim=1))           # -inf once a probability underflows
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    nll = -log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = (1 - alpha) * nll - alpha * log_probs.mean(1)
    return _reduce(torch.where(keep, loss, torch.zeros_like(loss)), keep, reduction)


def detached(logits, target, alpha, ignore_index=-100, reduction="mean"):
    return solution_loss(logits.detach(), target, alpha, ignore_index, reduction)


def mean_for_sum(logits, target, alpha, ignore_index=-100, reduction="mean"):
    return solution_loss(logits, target, alpha, ignore_index,
                                        reduction="mean" if reduction == "sum" else reduction)


def none_returns_mean(logits, target, alpha, ignore_index=-100, reduction="mean"):
    return solution_loss(logits, target, alpha, ignore_index,
                                        reduction="mean" if reduction == "none" else reduction)


def not_implemented(logits, target, alpha, ignore_index=-100, reduction="mean"):
    raise NotImplementedError()


ALL = set(CHECK_IDS)
IGNORE_CASES = {"label_smoothing.ignore_index", "label_smoothing.class_dim", "label_smoothing.gradient",
                "label_smoothing.fresh_cases"}

# mistake -> (the checks it must fail, a phrase each failure message must contain)
MISTAKES = {
    other_classes_only: (ALL, "V-1 other classes"),
    smoothed_twice: (ALL, "smoothing twice"),
    wrong_sign: (ALL, "wrong sign"),
    logits_as_log_probs: (ALL, "logits as log-probabilities"),
    uniform_not_divided: (ALL, "divided by V"),
    ignores_alpha: (ALL, "ignores alpha"),
    ignored_in_denominator: (IGNORE_CASES, "denominator"),
    ignored_keep_uniform_term: (IGNORE_CASES, "keeps their smoothing term"),
    gather_without_mask: (IGNORE_CASES | {"label_smoothing.alpha_range"}, "masked before indexing"),
    hardcoded_minus_100: ({"label_smoothing.ignore_index", "label_smoothing.fresh_cases"},
                          "instead of those equal to the ignore_index"),
    class_dim_last: ({"label_smoothing.class_dim", "label_smoothing.fresh_cases"}, "dim 1"),
    log_of_softmax: ({"label_smoothing.large_logits"}, "log_softmax"),
    detached: ({"label_smoothing.gradient"}, "does not reach the logits"),
    mean_for_sum: ({"label_smoothing.reductions", "label_smoothing.ignore_index", "label_smoothing.fresh_cases"},
                   "returns the mean for reduction='sum'"),
    none_returns_mean: ({"label_smoothing.reductions", "label_smoothing.ignore_index", "label_smoothing.alpha_range",
                         "label_smoothing.class_dim", "label_smoothing.large_logits", "label_smoothing.fresh_cases"},
                        "one loss per position"),
}


def test_reference_passes_every_check(capsys):
    for check_id in CHECK_IDS:
        check(check_id, solution_loss)
        run_split(check_id, solution_loss)
    assert capsys.readouterr().out.count("passed") == len(CHECK_IDS)


def test_torch_itself_agrees_with_every_judge_but_is_refused():
    def torch_version(logits, target, alpha, ignore_index=-100, reduction="mean"):
        return F.cross_entropy(logits, target, label_smoothing=alpha, ignore_index=ignore_index, reduction=reduction)
    assert failing(torch_version, ignore_shortcuts=True) == {}
    assert all("F.cross_entropy(label_smoothing=...)" in message for message in failing(torch_version).values())
    assert set(failing(torch_version)) == set(CHECK_IDS)


@pytest.mark.parametrize("mistake", list(MISTAKES), ids=lambda f: f.__name__)
def test_each_classic_mistake_fails_exactly_its_checks_with_its_message(mistake):
    expected_ids, phrase = MISTAKES[mistake]
    failures = failing(mistake)
    assert set(failures) == expected_ids, f"{mistake.__name__} failed {sorted(failures)}"
    for check_id, message in failures.items():
        assert phrase in message, f"{check_id}: {message}"


def test_unfinished_stub_is_reported_as_not_implemented():
    with pytest.raises(CheckFailed, match="not implemented yet"):
        check("label_smoothing.matches_cross_entropy", not_implemented)


def test_judge_refuses_truncated_data():
    with pytest.raises(CheckFailed, match="expected 4 outputs"):
        REGISTRY["label_smoothing.matches_cross_entropy"].judge({"outputs": []})


def test_judge_rebuilds_its_inputs_and_ignores_forged_ones():
    """The data carries outputs only; a forged answer for other inputs cannot pass."""
    data = REGISTRY["label_smoothing.reductions"].probe(solution_loss)
    data["outputs"][1]["value"] = [data["outputs"][1]["value"][0] + 1e-3]
    with pytest.raises(CheckFailed):
        REGISTRY["label_smoothing.reductions"].judge(data)


# --------------------------------------------------------------------------------------------------
# The loss and its closed forms
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 5), (4, 6, 3), (2, 3, 4, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_loss_equals_torch_cross_entropy(shape, reduction):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=generator, dtype=torch.float64)
    target = torch.randint(shape[1], shape[:1] + shape[2:], generator=generator)
    target.view(-1)[::3] = -100
    for alpha in (0.0, 0.1, 0.7, 1.0):
        ours = label_smoothed_cross_entropy(logits, target, alpha, reduction=reduction)
        theirs = F.cross_entropy(logits, target, label_smoothing=alpha, reduction=reduction)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_smoothed_target_sums_to_one_and_gives_the_true_class_one_minus_alpha_plus_alpha_over_v():
    target = smoothed_target(torch.tensor([0, 3, 9]), 10, 0.1)
    torch.testing.assert_close(target.sum(1), torch.ones(3))
    assert target[1, 3].item() == pytest.approx(optimal_true_probability(0.1, 10)) == pytest.approx(0.91)
    assert target[1, 0].item() == pytest.approx(0.01)


def test_bad_alpha_and_reduction_are_refused_with_what_was_given():
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        label_smoothed_cross_entropy(logits, target, 1.5)
    with pytest.raises(ValueError, match="reduction must be one of .* got 'avg'"):
        label_smoothed_cross_entropy(logits, target, 0.1, reduction="avg")
    with pytest.raises(ValueError, match="n_classes must be an integer >= 2, got 1"):
        optimal_logit_gap(0.1, 1)


@pytest.mark.parametrize("alpha,V", [(0.1, 10), (0.05, 2), (0.3, 100)])
def test_optimal_gap_matches_a_logit_vector_optimized_directly(alpha, V):
    z = torch.zeros(V, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([z], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z[None], torch.tensor([0]), label_smoothing=alpha)
        loss.backward()
        return loss
    optimizer.step(closure)
    gaps = (z[0] - z[1:]).detach()
    assert torch.allclose(gaps, torch.full_like(gaps, optimal_logit_gap(alpha, V)), atol=1e-5)
    assert math.isclose(optimal_logit_gap(alpha, V), math.log((1 - alpha + alpha / V) / (alpha / V)))


def test_optimal_gap_is_infinite_without_smoothing():
    assert optimal_logit_gap(0.0, 10) == math.inf


def test_true_class_gradient_tends_to_alpha_minus_alpha_over_v():
    alpha, V, gap = 0.1, 10, 30.0
    z = torch.zeros(1, V, dtype=torch.float64)
    z[0, 0] = gap
    z.requires_grad_(True)
    F.cross_entropy(z, torch.tensor([0]), label_smoothing=alpha).backward()
    p_true = torch.softmax(z.detach(), 1)[0, 0].item()
    # dL/dz_true = p_true - (1 - a + a/V) = (a - a/V) - (1 - p_true), exactly
    assert abs(z.grad[0, 0].item() - true_class_gradient_limit(alpha, V)) <= (1 - p_true) + 1e-15


def test_logit_gap_is_true_logit_minus_mean_of_the_others():
    logits = torch.tensor([[3.0, 1.0, -1.0], [0.0, 2.0, 4.0]])
    torch.testing.assert_close(logit_gap(logits, torch.tensor([0, 2])), torch.tensor([3.0, 3.0]))


# --------------------------------------------------------------------------------------------------
# Calibration tools against independent computations
# --------------------------------------------------------------------------------------------------

def ece_by_loop(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """ECE written out bin by bin over ((m-1)/M, m/M] (bin 0 also takes confidence 0)."""
    confidence, prediction = probs.max(1), probs.argmax(1)
    total = 0.0
    for m in range(n_bins):
        low, high = m / n_bins, (m + 1) / n_bins
        inside = (confidence > low) & (confidence <= high) if m > 0 else (confidence <= high)
        if inside.any():
            total += inside.mean() * abs((prediction[inside] == labels[inside]).mean() - confidence[inside].mean())
    return total


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_a_bin_by_bin_computation(n_bins):
    generator = torch.Generator().manual_seed(1)
    logits = 2.5 * torch.randn(3000, 7, generator=generator, dtype=torch.float64)
    labels = torch.randint(7, (3000,), generator=generator)
    expected = ece_by_loop(torch.softmax(logits, 1).numpy(), labels.numpy(), n_bins)
    assert expected_calibration_error(logits, labels, n_bins) == pytest.approx(expected, abs=1e-12)


def test_ece_is_zero_for_a_predictor_whose_confidence_equals_its_accuracy():
    # two classes; every prediction says 0.75 for class 0, and 3 of every 4 labels are 0
    logits = torch.log(torch.tensor([[0.75, 0.25]], dtype=torch.float64)).repeat(400, 1)
    labels = torch.tensor([0, 0, 0, 1]).repeat(100)
    assert expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-12)
    data = reliability_data(logits, labels, 4)
    assert data.count.tolist() == [0, 0, 400, 0]      # 0.75 lies in (0.5, 0.75]


def test_exact_posterior_is_calibrated_within_the_sampling_bound_and_sharpened_logits_are_not():
    source = BagOfTokens.make(n_classes=5, vocab_size=16, seq_len=8, sharpness=1.0, label_noise=0.1, seed=0)
    x, y = source.sample(20000, torch.Generator().manual_seed(1))
    data = reliability_data(source.log_posterior(x), y, 15)
    # Hoeffding per bin and a union bound over the bins: false-failure rate below 1e-3
    assert data.ece <= data.noise_bound(1e-3)
    sharpened = reliability_data(3 * source.log_posterior(x), y, 15)     # same ranking, overconfident
    assert sharpened.ece > sharpened.noise_bound(1e-3)


def test_fitted_temperature_minimizes_the_nll_found_by_a_grid_search():
    generator = torch.Generator().manual_seed(2)
    logits = 4.0 * torch.randn(2000, 6, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / 2.5, 1), 1, generator=generator)[:, 0]
    fitted = fit_temperature(logits, labels)
    grid = torch.exp(torch.linspace(math.log(0.2), math.log(20), 20001, dtype=torch.float64))
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    best = grid[nll.argmin()].item()
    assert fitted == pytest.approx(best, rel=1e-3)
    assert F.cross_entropy(logits / fitted, labels) <= nll.min() + 1e-12


def test_temperature_scaling_keeps_accuracy():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 4, generator=generator)
    labels = torch.randint(4, (500,), generator=generator)
    t = fit_temperature(logits, labels)
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))


def test_exact_posterior_is_a_distribution_with_the_label_noise_floor():
    source = BagOfTokens.make(n_classes=4, vocab_size=8, seq_len=5, sharpness=2.0, label_noise=0.2, seed=0)
    x, _ = source.sample(100, torch.Generator().manual_seed(0))
    probs = source.log_posterior(x).exp()
    torch.testing.assert_close(probs.sum(1), torch.ones(100, dtype=torch.float64))
    assert (probs >= 0.2 / 4 - 1e-12).all()


@pytest.mark.parametrize("budget", ["ci", "cpu", "gpu"])
def test_every_budget_builds_a_valid_classifier_config(budget):
    config = model_config(SETTINGS[budget])
    assert config.n_classes == SETTINGS[budget].n_classes and config.pool == "mean"


CASE_KINDS = ("matches_cross_entropy", "reductions", "ignore_index", "alpha_range", "class_dim", "large_logits",
              "fresh_cases")


def test_every_named_mistake_computes_something_other_than_torchs_loss():
    """The judge names a mistake when the student's output matches that mistake's variant; a variant that
    equalled F.cross_entropy(label_smoothing=...) on every probe case could never be told apart, so each
    must differ from PyTorch's answer on some case (and the answer itself is PyTorch's)."""
    cases = [case for kind in CASE_KINDS for case in checks_module._cases(kind)]
    for case in cases:
        torch.testing.assert_close(checks_module._answer(case), F.cross_entropy(
            case["logits"].double(), case["target"], label_smoothing=case["alpha"],
            ignore_index=case["ignore_index"], reduction=case["reduction"]))
    for name, message in checks_module.MISTAKES.items():
        assert message.strip(), name
        assert any(not torch.allclose(checks_module._variant(name, case).double(),
                                      checks_module._answer(case).double(), equal_nan=True)
                   for case in cases), f"mistake {name!r} gives PyTorch's answer on every case"
