"""Gradient clipping: the reference passes every check, each classic mistake fails with its named
message, and the topic's functions agree with PyTorch."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reglab.topics.clipping import lab as clip_lab
from reglab.topics.clipping import lecture as clipping
from reglab.checks import REGISTRY, CheckFailed, check, get
from reglab.topics.clipping import checks as clip_checks
from solution_code import solution_cells

# the checks of the student's implementation; "clipping.open_experiment" checks the open experiment's design
# instead (tests/test_open_experiments.py)
CHECK_IDS = sorted(k for k in REGISTRY if k.startswith("clipping.") and k != "clipping.open_experiment")


# ------------------------------------------------------------------------------------------------
# Classic mistakes, each a complete function with the student's signature
# ------------------------------------------------------------------------------------------------

# the solution notebook's clip_grad_norm (the checks refuse the lecture's copy: a shortcut)
solution_clip_grad_norm = solution_cells("04_clipping_lab.ipynb", "clip-grad-norm")["clip_grad_norm"]


def _grads(parameters):
    return [p for p in parameters if p.grad is not None]


def _norm(params, error_if_nonfinite):
    """The global norm, raising on a non-finite one when asked: every mistake below gets this part right."""
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError("the total norm is not finite")
    return norm


@torch.no_grad()
def per_tensor(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
    params = _grads(parameters)
    norm = _norm(params, error_if_nonfinite)
    clipping.clip_grad_norm_per_tensor(params, max_norm, eps)
    return norm


@torch.no_grad()
def returns_post_clip(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
    params = list(parameters)
    solution_clip_grad_norm(params, max_norm, eps, error_if_nonfinite)
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in _grads(params)]))


@torch.no_grad()
def clips_below_c(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
    params = _grads(parameters)
    norm = _norm(params, error_if_nonfinite)
    for p in params:
        p.grad.mul_(max_norm / (norm + eps))       # no min(1, .): short gradients get scaled up
    return norm


@torch.no_grad()
def no_eps(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
    params = _grads(parameters)
    norm = _norm(params, error_if_nonfinite)
    for p in params:
        p.grad.mul_(torch.clamp(max_norm / norm, max=1.0))
    return norm


@torch.no_grad()
def reads_twice(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
    norm = _norm([p for p in parameters if p.grad is not None], error_if_nonfinite)
    for p in parameters:                           # a generator is exhausted by now
        if p.grad is not None:
            p.grad.mul_(torch.clamp(max_norm / (norm + eps), max=1.0))
    return norm


@torch.no_grad()
def crashes_on_missing_grad(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
    params = list(parameters)
    norm = _norm(params, error_if_nonfinite)
    for p in params:
        p.grad.mul_(torch.clamp(max_norm / (norm + eps), max=1.0))
    return norm


@torch.no_grad()
def ignores_error_flag(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
    return solution_clip_grad_norm(parameters, max_norm, eps, error_if_nonfinite=False)


@torch.no_grad()
def skips_nonfinite(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
    params = _grads(parameters)
    norm = _norm(params, error_if_nonfinite)
    if not torch.isfinite(norm):
        return norm                                # "nothing sensible to do": leaves the gradients alone
    for p in params:
        p.grad.mul_(torch.clamp(max_norm / (norm + eps), max=1.0))
    return norm


@torch.no_grad()
def value_clipping(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
    params = list(parameters)
    norm = _norm(_grads(params), error_if_nonfinite)
    clipping.clip_grad_value(params, max_norm)
    return norm


@torch.no_grad()
def not_in_place(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
    params = _grads(parameters)
    norm = _norm(params, error_if_nonfinite)
    for p in params:
        p.grad = p.grad * torch.clamp(max_norm / (norm + eps), max=1.0)
    return norm


# mistake -> {check id: a phrase its message must contain}; every other check must pass
MISTAKES = {
    per_tensor: {"clipping.scaling": "clipped each tensor separately",
                 "clipping.direction": "clipped each tensor separately",
                 "clipping.generator": "clipped each tensor separately",
                 "clipping.skips_missing": "clipped each tensor separately",
                 "clipping.nonfinite_error": "clipped each tensor separately",
                 "clipping.eps": "clipped each tensor separately",
                 "clipping.nonfinite_scales": "differ from torch's"},
    returns_post_clip: {"clipping.total_norm": "returned the post-clip norm",
                        "clipping.skips_missing": "returned the post-clip norm",
                        "clipping.generator": "returned the post-clip norm",
                        "clipping.nonfinite_scales": "the pre-clip norm is inf"},
    clips_below_c: {"clipping.scaling": "clipped when norm < c"},
    no_eps: {"clipping.eps": "forgot eps"},
    reads_twice: {"clipping.generator": "read twice"},
    crashes_on_missing_grad: {"clipping.skips_missing": "raised AttributeError"},
    ignores_error_flag: {"clipping.nonfinite_error": "nothing was raised"},
    skips_nonfinite: {"clipping.nonfinite_scales": "left the gradients unchanged"},
    value_clipping: {"clipping.scaling": "value clipping", "clipping.direction": "value clipping",
                     "clipping.generator": "value clipping", "clipping.skips_missing": "value clipping",
                     "clipping.nonfinite_error": "value clipping", "clipping.eps": "left the gradients unchanged",
                     "clipping.nonfinite_scales": "differ from torch's"},
    not_in_place: {"clipping.scaling": "instead of scaling it in place",
                   "clipping.generator": "instead of scaling it in place",
                   "clipping.skips_missing": "instead of scaling it in place",
                   "clipping.nonfinite_error": "instead of scaling it in place"},
}


def _verdicts(fn, ignore_shortcuts: bool = False) -> dict[str, str | None]:
    """{check id: None if it passed, else the failure message}, judged from probed data as the grader does
    (ignore_shortcuts: drop the probe's record of refused shortcuts, to test the judge's numbers alone)."""
    out = {}
    for check_id in CHECK_IDS:
        spec = get(check_id)
        try:
            data = spec.probe(fn)
            if ignore_shortcuts:
                data.pop("shortcuts")
            spec.judge(data)
            out[check_id] = None
        except CheckFailed as err:
            out[check_id] = str(err)
    return out


def test_the_lab_has_its_checks():
    assert "clipping.open_experiment" in REGISTRY
    assert set(CHECK_IDS) == {"clipping.total_norm", "clipping.scaling", "clipping.direction",
                              "clipping.skips_missing", "clipping.generator", "clipping.eps",
                              "clipping.nonfinite_error", "clipping.nonfinite_scales"}


@pytest.mark.parametrize("check_id", CHECK_IDS)
def test_reference_passes_every_check(check_id, capsys):
    check(check_id, solution_clip_grad_norm)
    assert f"passed {check_id}" in capsys.readouterr().out


def test_torch_itself_agrees_with_every_judge_but_is_refused():
    def torch_clip(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
        params = list(parameters)
        if eps != 1e-6:   # torch's eps is fixed; rescale c so that c' / (n + 1e-6) = c / (n + eps)
            norm = float(torch.nn.utils.clip_grad_norm_(params, math.inf))
            max_norm = max_norm * (norm + 1e-6) / (norm + eps)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=error_if_nonfinite)
    assert _verdicts(torch_clip, ignore_shortcuts=True) == {k: None for k in CHECK_IDS}
    assert all("torch.nn.utils.clip_grad_norm_, which this lab refuses" in message
               for message in _verdicts(torch_clip).values())


@pytest.mark.parametrize("mistake", list(MISTAKES), ids=lambda f: f.__name__)
def test_each_mistake_fails_exactly_its_checks_with_its_message(mistake):
    verdicts = _verdicts(mistake)
    expected = MISTAKES[mistake]
    failed = {k for k, message in verdicts.items() if message is not None}
    assert failed == set(expected), verdicts
    for check_id, phrase in expected.items():
        assert phrase in verdicts[check_id], (check_id, verdicts[check_id])


def test_an_unfinished_stub_is_reported_as_not_implemented():
    def stub(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="not implemented yet"):
        check("clipping.scaling", stub)


def test_probe_data_is_json():
    import json
    for check_id in CHECK_IDS:
        text = json.dumps(get(check_id).probe(solution_clip_grad_norm), allow_nan=False)
        assert len(text) < 1_000_000


def test_judge_refuses_forged_data():
    spec = get("clipping.scaling")
    data = spec.probe(solution_clip_grad_norm)
    data["above"]["grads"][0][0] = 123.0
    with pytest.raises(CheckFailed):
        spec.judge(data)
    with pytest.raises(CheckFailed, match="malformed"):
        spec.judge({name: {"error": None, "grads": [[1.0]], "in_place": [True]} for name in clip_checks.SCALING_CASES})


# ------------------------------------------------------------------------------------------------
# The topic module against PyTorch
# ------------------------------------------------------------------------------------------------

def _model_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    (10 * torch.nn.functional.mse_loss(model(x), y)).backward()
    return model


@pytest.mark.parametrize("max_norm", [0.01, 0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    a, b = _model_grads(), _model_grads()
    got = clipping.clip_grad_norm(a.parameters(), max_norm)
    want = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
    assert torch.allclose(got, want, rtol=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-9)


def test_clip_grad_norm_turns_finite_gradients_to_zero_on_an_inf_like_torch():
    a, b = _model_grads(), _model_grads()
    for model in (a, b):
        model[0].weight.grad[0, 0] = math.inf
    got = clipping.clip_grad_norm(a.parameters(), 1.0)
    want = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    assert math.isinf(float(got)) and math.isinf(float(want))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad.isnan(), q.grad.isnan())
        assert torch.equal(p.grad.nan_to_num(), q.grad.nan_to_num())
    assert float(a[2].weight.grad.abs().max()) == 0.0


def test_clip_grad_norm_refuses_a_nonpositive_threshold():
    with pytest.raises(ValueError, match="max_norm must be positive, got 0"):
        clipping.clip_grad_norm(_model_grads().parameters(), 0)


def test_clip_grad_value_matches_torch():
    a, b = _model_grads(), _model_grads()
    clipping.clip_grad_value(a.parameters(), 0.05)
    torch.nn.utils.clip_grad_value_(b.parameters(), 0.05)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_global_norm_keeps_direction_and_the_variants_do_not():
    grads = [p.grad.clone() for p in _model_grads().parameters()]
    norm = float(clipping.flat(grads).norm())
    result = clipping.compare_clipping(grads, norm / 10)
    assert result["global norm"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert result["global norm"]["norm"] == pytest.approx(norm / 10, rel=1e-5)
    assert result["per tensor"]["cosine"] < 0.999
    assert result["value"]["cosine"] < 0.999


def test_find_spikes_flags_the_start_of_each_spike_only():
    losses = [3.0 - 0.01 * t for t in range(60)]
    losses[30] = losses[31] = 5.0               # one spike over two steps
    losses[45] = math.nan                       # a non-finite loss is a spike too
    assert clipping.find_spikes(losses, factor=1.3, window=20) == [30, 45]
    assert clipping.find_spikes([4.6, 3.5, 3.4, 3.5, 3.4, 9.0, 3.4]) == [5]   # early: a median of what there is
    assert clipping.find_spikes([4.0 * 0.9 ** t for t in range(80)]) == []   # a fast descent is not a spike


def test_find_spikes_refuses_a_factor_of_one_or_less():
    with pytest.raises(ValueError, match="factor must be > 1"):
        clipping.find_spikes([1.0] * 30, factor=1.0)


def test_clip_factors_and_fraction_clipped():
    norms = [0.5, 2.0, 4.0, 1.0]
    assert clipping.fraction_clipped(norms, 1.0) == 0.5
    assert clipping.fraction_clipped(norms, None) == 0.0
    np.testing.assert_allclose(clipping.clip_factors(norms, 1.0), [1, 0.5, 0.25, 1], rtol=1e-5)


def test_adam_update_is_invariant_to_the_gradient_scale():
    grads = clipping.spike_gradients(steps=50, dim=100, spike_step=0, spike_scale=1.0)
    a, b = clipping.adam_updates(grads), clipping.adam_updates(10 * grads)
    assert torch.allclose(a, b, rtol=1e-4)


def test_a_spike_shrinks_adams_later_steps_unless_clipped():
    demo = clipping.adam_spike_demo(spike_scale=100.0, steps=250, spike_step=50)
    assert demo["spike"][51] > 1.5 * demo["no spike"][51]      # first, m carries the spike: a longer step
    later = slice(50 + 20, 50 + 60)
    assert (demo["spike"][later] < 0.75 * demo["no spike"][later]).all()
    assert (demo["spike, clipped"][later] > 0.9 * demo["no spike"][later]).all()


def test_decay_is_clipped_only_when_it_is_in_the_loss():
    torch.manual_seed(0)
    weight, data_grad = torch.randn(50) * 5, torch.randn(50) * 0.01
    out = clipping.decay_seen_by_clip(weight, data_grad, weight_decay=0.1, max_norm=1.0)
    assert out["adamw"]["clip_factor"] == 1.0
    assert out["torch Adam(weight_decay)"]["clip_factor"] == 1.0
    assert out["l2 in the loss"]["clip_factor"] < 0.5
    assert out["l2 in the loss"]["decay_term_norm"] < out["adamw"]["decay_term_norm"]


def test_settings_exist_for_every_budget():
    for budget in ("ci", "cpu", "gpu"):
        settings = clip_lab.settings_for(budget)
        assert settings.clips[0] is None and 1.0 in settings.clips


def test_ci_sweep_runs_and_summarizes():
    from reglab.data import corpus_task
    from dataclasses import replace
    settings = replace(clip_lab.settings_for("ci"), steps=10, eval_every=5)
    corpus, task = corpus_task("builtin", settings.block_size, settings.batch_size)
    runs = clip_lab.clip_sweep(settings, task, corpus.vocab_size, progress=False)
    summary = clip_lab.summarize(runs)
    assert list(summary) == ["none", "1", "0.25", "0.05"]
    for label, row in summary.items():
        assert set(row) == {"spikes", "final_val_loss", "fraction_clipped", "diverged_at"}
        assert len(row["spikes"]) == settings.seeds
    assert summary["none"]["fraction_clipped"] == 0.0
