"""The stability lecture's helpers and checks: each check passes on the lecture's measurement and fails when the
claim it checks is perturbed; PyTorch (autograd, torch.optim.AdamW, its schedulers) is the answer key."""
import math
from dataclasses import replace

import pytest
import torch

from reglab.budget import BUDGETS
from reglab.model import GPTConfig
from reglab.train import TrainConfig, attention_logits, new_model
from reglab.topics.stability import lecture as stability
from reglab.topics.weight_decay.lecture import retained


def _config(**changes):
    return GPTConfig(**{**dict(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=16), **changes})


def _tokens():
    return torch.randint(17, (4, 16), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("budget", BUDGETS)
def test_every_budget_runs_the_toys_for_several_ema_timescales(budget):
    settings = stability.settings_for(budget)
    tau = 1 / (stability.TOY_LR * stability.TOY_WD)
    assert settings.toy_steps >= 4 * tau and settings.toy_steps // 4 >= 1
    assert settings.n_embd % settings.n_head == 0 and settings.retention_steps >= 10


def test_toy_learning_rates_share_their_product_exactly():
    assert stability.TOY_LR * stability.TOY_WD == (2 * stability.TOY_LR) * (stability.TOY_WD / 2)


# ------------------------------------------------------------------------------------------ section 1
def test_logit_growth_check_passes_on_the_course_model_and_fails_for_a_linear_claim():
    growth = stability.logit_growth(new_model(_config()), _tokens(), (1, 3, 10))
    rtol = stability.float32_dot_rtol(16, 8)
    stability.check_logit_growth(growth, rtol)
    linear = [dict(row, first_layer_max=growth[0]["first_layer_max"] * row["c"]) for row in growth]
    with pytest.raises(AssertionError, match="not c\\^2 times"):
        stability.check_logit_growth(linear, rtol)
    rising = [dict(row, entropy=1.0 + i) for i, row in enumerate(growth)]
    with pytest.raises(AssertionError, match="entropy rose"):
        stability.check_logit_growth(rising, rtol)


def test_scale_qk_scales_only_q_and_k():
    model = new_model(_config())
    before = [t.clone() for t in model.blocks[0].attn.qkv.weight.detach().split(16)]
    stability.scale_qk(model, 3.0)
    after = model.blocks[0].attn.qkv.weight.detach().split(16)
    assert torch.allclose(after[0], 3 * before[0]) and torch.allclose(after[1], 3 * before[1])
    assert torch.equal(after[2], before[2])


def test_attention_entropy_is_log_t_for_uniform_attention_and_zero_for_one_key():
    T = 5
    future = ~torch.tril(torch.ones(T, T, dtype=torch.bool))
    uniform = torch.zeros(T, T).masked_fill(future, -math.inf)
    expected = torch.log(torch.arange(1, T + 1, dtype=torch.float32))
    assert torch.allclose(stability.attention_entropy(uniform), expected)
    one_key = torch.full((T, T), -math.inf)
    one_key[:, 0] = 0.0
    assert torch.equal(stability.attention_entropy(one_key), torch.zeros(T))


@pytest.mark.parametrize("norm, bias", [("layernorm", True), ("layernorm", False), ("rmsnorm", False)])
def test_qk_logit_bound_holds_for_trained_looking_gains(norm, bias):
    model = new_model(_config(qk_norm=True, norm=norm, bias=bias))
    torch.manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            for module in (block.attn.q_norm, block.attn.k_norm):
                module.weight.copy_(torch.randn(8) * 3)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn(8))
    stability.scale_qk(model, 100.0)
    per_layer, _ = attention_logits(model, _tokens())
    assert max(float(att.max()) for att in per_layer) <= stability.qk_logit_bound(model) * (1 + 1e-6)
    assert stability.qk_logit_bound(new_model(_config())) == math.inf


def test_qk_norm_bound_check_passes_and_fails_when_the_bound_or_the_entropy_is_perturbed():
    growth = stability.logit_growth(new_model(_config(qk_norm=True)), _tokens(), (1, 10, 100))
    stability.check_qk_norm_bound(growth)
    with pytest.raises(AssertionError, match="exceeds the qk-norm bound"):
        stability.check_qk_norm_bound([dict(row, bound=row["max_logit"] / 2) for row in growth])
    with pytest.raises(AssertionError, match="entropy moved"):
        stability.check_qk_norm_bound([dict(row, entropy=row["entropy"] + 0.1 * i) for i, row in enumerate(growth)])
    # without qk-norm the same scalings break the check: the logits run past sqrt(hs) and the entropy falls
    plain = stability.logit_growth(new_model(_config()), _tokens(), (1, 10, 100))
    with pytest.raises(AssertionError):
        stability.check_qk_norm_bound([dict(row, bound=math.sqrt(8)) for row in plain])


# ------------------------------------------------------------------------------------------ section 2
def test_z_loss_step_follows_the_gradient_two_log_z_softmax():
    z = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 3
    step = 1e-3
    expected = z - step * 2 * torch.logsumexp(z, -1) * torch.softmax(z, -1)
    assert torch.allclose(stability.z_loss_step(z, step), expected, rtol=1e-12)


def test_z_step_check_passes_and_fails_for_the_pure_shift_claim(monkeypatch):
    z = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 2
    result = stability.check_z_step(z, 1e-2)
    assert result["log_z_after"] < result["log_z"] and result["max_dp"] > 1e-3
    real = stability.z_step_first_order

    def pure_shift(z, step):         # the claim "z-loss only shifts the logits": p would not move
        d_log_z, d_p = real(z, step)
        return d_log_z, torch.zeros_like(d_p)
    monkeypatch.setattr(stability, "z_step_first_order", pure_shift)
    with pytest.raises(AssertionError, match="softmax error"):
        stability.check_z_step(z, 1e-2)

    def uniform_log_z(z, step):      # d log Z as if the gradient were 2 log Z / V on every logit
        _, d_p = real(z, step)
        return float(-2 * step * torch.logsumexp(z, -1) / z.numel()), d_p
    monkeypatch.setattr(stability, "z_step_first_order", uniform_log_z)
    with pytest.raises(AssertionError, match="log Z error"):
        stability.check_z_step(z, 1e-2)


def test_z_step_on_uniform_logits_is_a_pure_shift():
    z = torch.full((20,), 1.5, dtype=torch.float64)
    stability.check_z_step(z, 1e-2)
    moved = torch.softmax(stability.z_loss_step(z, 1e-2), -1) - torch.softmax(z, -1)
    assert float(moved.abs().max()) < 1e-15


# ------------------------------------------------------------------------------------------ section 3
def test_unrolled_adamw_matches_torch_adamw_and_a_wrong_decay_factor_does_not():
    grads = stability.noise_gradients(200, 50)
    theta0 = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lr, wd = 0.05, 0.2
    path = stability.adamw_path(grads, lr, wd, theta0)
    updates = stability.adam_updates(grads)
    assert torch.allclose(stability.unrolled_adamw(theta0, updates, lr, wd), path[-1], rtol=0, atol=1e-12)
    assert torch.allclose(stability.decay_with_updates(updates, lr, wd, theta0), path[-1], rtol=0, atol=1e-12)
    # the paper-style (1 - wd) per step, not PyTorch's (1 - lr wd): far off
    keep = 1 - wd
    wrong = keep ** 200 * theta0 - lr * (keep ** torch.arange(199, -1, -1, dtype=torch.float64)[:, None] * updates).sum(0)
    assert not torch.allclose(wrong, path[-1], atol=1e-3)


def test_adamw_path_is_torch_adamw_step_by_step():
    grads = stability.noise_gradients(20, 7)
    theta = torch.nn.Parameter(torch.ones(7, dtype=torch.float64))
    optimizer = torch.optim.AdamW([theta], lr=0.1, weight_decay=0.5, betas=(0.9, 0.95))
    for g in grads:
        theta.grad = g.clone()
        optimizer.step()
    assert torch.equal(stability.adamw_path(grads, 0.1, 0.5, torch.ones(7))[-1], theta.detach())


def test_equal_lr_wd_product_scales_the_weights_with_lr_not_equal_weights():
    grads = stability.noise_gradients(300, 200)
    lr, wd = stability.TOY_LR, stability.TOY_WD
    one = stability.adamw_path(grads, lr, wd, torch.zeros(200))[-1]
    two = stability.adamw_path(grads, 2 * lr, wd / 2, torch.zeros(200))[-1]
    assert torch.allclose(two, 2 * one, rtol=1e-12)          # weights proportional to lr ...
    assert float(two.norm()) / float(one.norm()) == pytest.approx(2.0, rel=1e-12)   # ... not the same weights


def test_equilibrium_norm_formula_on_random_sign_updates_and_a_wrong_formula_fails():
    """Fixed seed; the tolerance 4 sqrt(2/n) is four standard deviations of the relative spread."""
    n, steps = 20000, 512
    lr, wd = stability.TOY_LR, stability.TOY_WD
    theta = stability.decay_with_updates(stability.sign_updates(steps, n), lr, wd, torch.zeros(n))
    ratio = float(theta.pow(2).sum()) / stability.ema_norm_squared(n, lr, wd, steps)
    assert abs(ratio - 1) <= 4 * math.sqrt(2 / n)
    # lr / wd (the equilibrium norm without the 1/2) is refuted by the same data
    assert abs(float(theta.pow(2).sum()) / (n * lr / wd) - 1) > 4 * math.sqrt(2 / n)


def test_sign_updates_are_plus_or_minus_one():
    signs = stability.sign_updates(10, 100)
    assert signs.dtype == torch.int8 and set(signs.unique().tolist()) == {-1, 1}


def test_scale_invariant_runs_at_equal_product_agree_bit_for_bit_only_without_eps():
    base = stability.normalized_classifier_run(stability.TOY_LR, stability.TOY_WD, 1.0, 40)
    twice = stability.normalized_classifier_run(2 * stability.TOY_LR, stability.TOY_WD / 2, 2.0, 40)
    assert torch.equal(twice["weights"], 2 * base["weights"]) and torch.equal(twice["logits"], base["logits"])
    # the same pair from the same (unscaled) init: different weights and a different function
    same_init = stability.normalized_classifier_run(2 * stability.TOY_LR, stability.TOY_WD / 2, 1.0, 40)
    assert not torch.allclose(same_init["logits"], base["logits"], atol=1e-3)
    # with Adam's eps the exact covariance is broken (by a little)
    with_eps = [stability.normalized_classifier_run(r, w, s, 40, eps=1e-8)
                for r, w, s in ((stability.TOY_LR, stability.TOY_WD, 1.0), (2 * stability.TOY_LR, stability.TOY_WD / 2, 2.0))]
    assert not torch.equal(with_eps[0]["logits"], with_eps[1]["logits"])


def test_measured_retention_matches_pytorch_schedulers_and_the_weight_decay_formula(adamw_retained):
    config = TrainConfig(steps=60, lr=1e-2, warmup_steps=6, weight_decay=1.0)
    measured = stability.measured_retention(config, dim=8)
    assert max(abs(m - r) for m, r in zip(measured, adamw_retained(config))) < 1e-12
    assert max(abs(m - r) for m, r in zip(measured, retained(config))) < 1e-12
    # a constant per-step decay (1 - lr wd)^t, ignoring the schedule, is not what AdamW does
    assert abs(measured[-1] - (1 - config.lr * config.weight_decay) ** config.steps) > 1e-2


def test_independent_decay_keeps_the_same_retention_across_learning_rates_and_coupled_does_not():
    configs = [TrainConfig(steps=100, lr=lr, warmup_steps=10, weight_decay=1.0) for lr in (1e-2, 3e-2)]
    independent = [retained(stability.independent_decay_config(c, 1e-2))[-1] for c in configs]
    coupled = [retained(c)[-1] for c in configs]
    assert independent[0] == pytest.approx(independent[1], rel=1e-12)
    assert coupled[0] > coupled[1] * 2
    measured = stability.measured_retention(stability.independent_decay_config(configs[1], 1e-2), dim=4)
    assert measured[-1] == pytest.approx(independent[1], rel=1e-12)
    assert stability.independent_decay_config(configs[0], 1e-2).weight_decay == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ section 4
def test_adams_first_update_is_lr_per_coordinate_whatever_the_gradient():
    g = torch.tensor([1e-4, -1e-2, 1.0, -1e2, 1e4], dtype=torch.float64)
    first = stability.adam_first_update(g, lr=1e-3, eps=1e-8)
    assert torch.allclose(first, -1e-3 * g / (g.abs() + 1e-8), rtol=1e-12)
    assert float((first.abs() / 1e-3 - 1).abs().max()) <= 1e-8 / 1e-4
    # clipped by s: the same step except where s|g| nears eps; the derived bound holds, a bound of 0 does not
    s = 1e-6
    clipped = stability.adam_first_update(s * g, lr=1e-3, eps=1e-8)
    gap = (clipped - first).abs()
    assert bool((gap <= 1e-3 * 1e-8 / (s * g.abs() + 1e-8) * (1 + 1e-9)).all()) and float(gap.max()) > 1e-5


# ------------------------------------------------------------------------------------------ section 5
def test_demo_runs_log_the_stability_numbers_and_the_normed_run_stays_under_its_bound():
    from reglab.data import corpus_task
    settings = replace(stability.settings_for("ci"), n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=4,
                       demo_steps=6, demo_eval_every=3)
    corpus, task = corpus_task("builtin", settings.block_size, settings.batch_size)
    demo = stability.demo_runs(settings, task, corpus.vocab_size)
    assert set(demo) == {"qk_norm=False", "qk_norm=True"}
    normed = demo["qk_norm=True"][0].history
    assert all(e["max_attn_logit"] <= e["qk_bound"] * (1 + 1e-6) for e in normed.evals)
    assert "qk_bound" not in demo["qk_norm=False"][0].history.final
    assert {"max_attn_logit", "log_z"} <= set(demo["qk_norm=False"][0].history.final)
