"""Weight decay and AdamW: the lab's reference solution passes every check, each classic mistake fails
with its named message, and the topic's functions agree with PyTorch."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib
import pytest
import torch

from reglab.topics.weight_decay import lab as wd_lab
from reglab.topics.weight_decay import lecture as wd
from reglab.checks import REGISTRY, CheckFailed, check, get
from reglab.topics.weight_decay import checks as wd_checks
from reglab.model import GPT, GPTConfig
from reglab.train import TrainConfig, new_model, param_groups, train
from solution_code import solution_cells

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parent.parent
# the checks of the student's implementation; "weight_decay.open_experiment" checks the open experiment's design
# instead (tests/test_open_experiments.py)
CHECK_IDS = sorted(k for k in REGISTRY if k.startswith("weight_decay.") and k != "weight_decay.open_experiment")
ADAMW_IDS = [i for i in CHECK_IDS if i.startswith("weight_decay.adamw")]
ADAM_L2_IDS = [i for i in CHECK_IDS if i.startswith("weight_decay.adam_l2")]
SPLIT_IDS = [i for i in CHECK_IDS if i.startswith("weight_decay.decay_split")]


def solution_objects() -> dict:
    """AdamW, AdamL2 and decay_param_groups exactly as the solution notebook defines them."""
    namespace = solution_cells("02_weight_decay_lab.ipynb", "adamw", "adam-l2", "split")
    return {name: namespace[name] for name in ("AdamW", "AdamL2", "decay_param_groups")}


# ------------------------------------------------------------------------------------------------
# An Adam written out once, with a switch for each classic mistake (independent of the judge's replay)
# ------------------------------------------------------------------------------------------------
def mistaken_adam(decoupled: bool, mistake: str | None = None):
    class Mistaken(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
            super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
            self.initial_lr, self.global_t = lr, 0

        @torch.no_grad()
        def step(self, closure=None):
            self.global_t += 1
            for group in self.param_groups:
                lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
                wd = self.defaults["weight_decay"] if mistake == "group_wd_ignored" else group["weight_decay"]
                for p in group["params"]:
                    if p.grad is None:
                        if mistake == "decay_without_grad":
                            p.mul_(1 - lr * wd)
                        continue
                    state = self.state[p]
                    if not state:
                        state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                    state["t"] += 1
                    t = self.global_t if mistake == "global_step" else state["t"]
                    g = p.grad
                    if decoupled:
                        if mistake == "decay_in_moments":
                            g = g + wd * p
                        elif mistake == "decay_without_lr":
                            p.mul_(1 - wd)
                        elif mistake == "initial_lr":
                            p.mul_(1 - self.initial_lr * wd)
                        elif mistake != "decay_after_step":
                            p.mul_(1 - lr * wd)
                    g_first = g if decoupled or mistake == "decoupled" else g + (lr * wd if mistake == "l2_times_lr" else wd) * p
                    g_second = g if mistake == "l2_first_moment_only" else g_first
                    if mistake == "decoupled":
                        p.mul_(1 - lr * wd)
                    state["m"].mul_(b1).add_(g_first, alpha=1 - b1)
                    state["v"].mul_(b2).addcmul_(g_second, g_second, value=1 - b2)
                    m, v = state["m"], state["v"]
                    if mistake == "no_bias_correction":
                        denom = v.sqrt() + eps
                    elif mistake == "eps_inside_sqrt":
                        m, denom = m / (1 - b1 ** t), (v / (1 - b2 ** t) + eps).sqrt()
                    elif mistake == "eps_before_bias_correction":
                        m, denom = m / (1 - b1 ** t), (v.sqrt() + eps) / math.sqrt(1 - b2 ** t)
                    else:
                        m, denom = m / (1 - b1 ** t), (v / (1 - b2 ** t)).sqrt() + eps
                    p.addcdiv_(m, denom, value=-lr)
                    if decoupled and mistake == "decay_after_step":
                        p.mul_(1 - lr * wd)
    Mistaken.__name__ = f"{'AdamW' if decoupled else 'AdamL2'}_{mistake}"
    return Mistaken


# (check id, mistake, words the message must contain)
ADAMW_CASES = [
    ("weight_decay.adamw", "decay_in_moments", "passes through Adam's moments"),
    ("weight_decay.adamw", "decay_without_lr", "ignores the learning rate"),
    ("weight_decay.adamw", "initial_lr", "not the group's current lr"),
    ("weight_decay.adamw", "decay_after_step", "after the Adam step"),
    ("weight_decay.adamw", "no_bias_correction", "bias correction is missing"),
    ("weight_decay.adamw", "eps_inside_sqrt", "inside the square root"),
    ("weight_decay.adamw", "eps_before_bias_correction", "before the bias correction"),
    ("weight_decay.adamw", "group_wd_ignored", "no-decay group was decayed"),
    ("weight_decay.adamw_missing_grads", "global_step", "shared by all parameters"),
    ("weight_decay.adamw_missing_grads", "decay_without_grad", "grad is None were decayed"),
]
ADAM_L2_CASES = [
    ("weight_decay.adam_l2", "decoupled", "this is decoupled decay"),
    ("weight_decay.adam_l2", "l2_first_moment_only", "first moment only"),
    ("weight_decay.adam_l2", "l2_times_lr", "scaled by the learning rate"),
    ("weight_decay.adam_l2", "no_bias_correction", "bias correction is missing"),
    ("weight_decay.adam_l2", "eps_inside_sqrt", "inside the square root"),
    ("weight_decay.adam_l2", "group_wd_ignored", "no-decay group got the L2 term"),
    ("weight_decay.adam_l2_other_settings", "eps_before_bias_correction", "before the bias correction"),
    ("weight_decay.adam_l2_missing_grads", "global_step", "shared by all parameters"),
]


# ------------------------------------------------------------------------------------------------
# The reference passes; each mistake fails with its message
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def solution():
    return solution_objects()


@pytest.mark.parametrize("check_id", CHECK_IDS)
def test_solution_passes_every_check(check_id, solution):
    obj = {"adamw": solution["AdamW"], "adam_l2": solution["AdamL2"],
           "decay_split": solution["decay_param_groups"]}
    key = next(k for k in ("adamw", "adam_l2", "decay_split") if check_id.startswith(f"weight_decay.{k}"))
    check(check_id, obj[key])


def test_every_check_is_exercised_by_a_mistake_or_the_solution():
    assert len(CHECK_IDS) == 8 and all(get(i).points > 0 for i in CHECK_IDS)
    named = {i for i, _, _ in ADAMW_CASES + ADAM_L2_CASES}
    assert {"weight_decay.adamw", "weight_decay.adam_l2"} <= named


@pytest.mark.parametrize("decoupled, ids", [(True, ADAMW_IDS), (False, ADAM_L2_IDS)])
def test_the_mistake_free_test_optimizer_passes(decoupled, ids):
    for check_id in ids:
        check(check_id, mistaken_adam(decoupled))


@pytest.mark.parametrize("check_id, mistake, words", ADAMW_CASES + ADAM_L2_CASES)
def test_classic_mistake_fails_with_its_message(check_id, mistake, words):
    decoupled = check_id.startswith("weight_decay.adamw")
    with pytest.raises(CheckFailed, match=words):
        check(check_id, mistaken_adam(decoupled, mistake))


def test_adamw_passed_as_adam_l2_is_named_and_vice_versa(solution):
    with pytest.raises(CheckFailed, match="this is decoupled decay"):
        check("weight_decay.adam_l2", solution["AdamW"])
    with pytest.raises(CheckFailed, match="passes through Adam's moments"):
        check("weight_decay.adamw", solution["AdamL2"])


@pytest.mark.parametrize("check_id", ADAMW_IDS + ADAM_L2_IDS)
def test_pytorchs_own_optimizer_matches_but_is_refused_as_a_submission(check_id):
    oracle = torch.optim.AdamW if check_id.startswith("weight_decay.adamw") else torch.optim.Adam
    with pytest.raises(CheckFailed, match=r"uses torch\.optim\.Adam.*write the update yourself"):
        check(check_id, oracle)


def test_a_stub_reports_not_implemented():
    class Stub(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
            super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

        def step(self, closure=None):
            raise NotImplementedError()
    with pytest.raises(CheckFailed, match="not implemented yet"):
        check("weight_decay.adamw", Stub)


def test_an_unnamed_error_still_fails_and_says_where():
    class SignFlip(mistaken_adam(True)):
        @torch.no_grad()
        def step(self, closure=None):
            super().step()
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(1 + 1e-3)
    with pytest.raises(CheckFailed, match="matches none of the usual mistakes"):
        check("weight_decay.adamw", SignFlip)


# --- the decay / no-decay split ------------------------------------------------------------------
def split_decaying_biases(model, weight_decay):
    return [{"params": list(model.parameters()), "weight_decay": weight_decay}]


def split_decaying_norms(model, weight_decay):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 or "norm" in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 or "norm" in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def split_min_gpt(model, weight_decay):
    """minGPT's rule: only Linear weights decay; embeddings, norms and biases do not."""
    decay = [m.weight for m in model.modules()
             if isinstance(m, torch.nn.Linear) and m.weight is not model.tok_emb.weight]
    ids = {id(p) for p in decay}
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": 0.0}]


def split_by_modules_with_tied_head_twice(model, weight_decay):
    decay = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    ids = {id(p) for p in decay}
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": 0.0}]


def split_forgetting_no_decay_group(model, weight_decay):
    return [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": weight_decay}]


def split_without_weight_decay_key(model, weight_decay):
    return [{"params": [p for p in model.parameters() if p.dim() >= 2]},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def split_returning_a_dict(model, weight_decay):
    return {"decay": [], "no_decay": []}


@pytest.mark.parametrize("split, words", [
    (split_decaying_biases, "biases are decayed.*; normalization gains are decayed"),
    (split_decaying_norms, "normalization gains are decayed"),
    (split_min_gpt, "embeddings are not decayed"),
    (split_by_modules_with_tied_head_twice, "listed twice"),
    (split_forgetting_no_decay_group, "is in no group"),
    (split_without_weight_decay_key, "has no 'weight_decay'"),
    (split_returning_a_dict, "must return a list of param-group dicts"),
])
def test_split_mistakes_fail_with_their_message(split, words):
    with pytest.raises(CheckFailed, match=words):
        check("weight_decay.decay_split", split)


def test_split_check_accepts_the_trainers_own_groups_and_any_grouping():
    check("weight_decay.decay_split", param_groups)
    check("weight_decay.decay_split_llama_like", param_groups)

    def one_group_per_tensor(model, weight_decay):
        return [{"params": [p], "weight_decay": weight_decay if p.dim() >= 2 else 0.0} for p in model.parameters()]
    check("weight_decay.decay_split", one_group_per_tensor)


# ------------------------------------------------------------------------------------------------
# The judge's answer key and its tolerance
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoupled", [True, False])
def test_the_judges_float64_replay_without_mistakes_agrees_with_pytorch(decoupled):
    for scenario in wd_checks.SCENARIOS:
        replay = wd_checks.adam_family(wd_checks.SCENARIOS[scenario], decoupled)
        assert wd_checks.mismatch(replay, wd_checks.torch_reference(decoupled, scenario, False))[0] < 0.1


@pytest.mark.parametrize("decoupled", [True, False])
def test_pytorchs_own_implementations_sit_well_inside_the_tolerance(decoupled):
    """for-loop, foreach, fused and a float64 run agree to < 10% of the allowed difference."""
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    scenario = wd_checks.SCENARIOS["main"]
    reference = wd_checks.torch_reference(decoupled, "main", False)
    for variant in (dict(foreach=True), dict(fused=True)):
        assert wd_checks.mismatch(wd_checks.run_optimizer(cls, scenario, **variant), reference)[0] < 0.1
    float64 = wd_checks.run_optimizer(cls, scenario, dtype=torch.float64, foreach=False)
    assert wd_checks.mismatch(float64, reference)[0] < 0.1


def test_probe_data_is_small_json():
    data = get("weight_decay.adamw").probe(torch.optim.AdamW)
    assert len(json.dumps(data)) < 100_000


def test_judge_refuses_malformed_data():
    with pytest.raises(CheckFailed, match="malformed"):
        get("weight_decay.adamw").judge({"final": {}})


# ------------------------------------------------------------------------------------------------
# The topic's functions against PyTorch and against the math
# ------------------------------------------------------------------------------------------------
def test_sgd_l2_and_sgdw_are_the_same_update():
    l2 = wd.simulate_decay("sgd_l2", 0.1, 1e-2, 300, copies=16)
    decoupled = wd.simulate_decay("sgdw", 0.1, 1e-2, 300, copies=16)
    assert torch.allclose(l2, decoupled, rtol=0, atol=1e-12)


def test_zero_gradient_weight_under_adamw_decays_geometrically():
    path = wd.simulate_decay("adamw", 0.5, 1e-2, 200, grad_scales=(0.0,), copies=1)
    expected = (1 - 1e-2 * 0.5) ** torch.arange(201, dtype=torch.float64)
    assert torch.allclose(path[:, 0, 0], expected, rtol=1e-12, atol=0)


def test_zero_gradient_weight_under_adam_l2_moves_about_a_full_lr_per_step():
    """Exactly lr on the first step; a little less later, as v_hat remembers the larger past theta."""
    path = wd.simulate_decay("adam_l2", 0.5, 1e-2, 50, grad_scales=(0.0,), copies=1)[:, 0, 0]
    steps = path[:-1] - path[1:]
    assert float(steps[0]) == pytest.approx(1e-2, rel=1e-6)
    assert ((steps > 0.75e-2) & (steps <= 1e-2 * (1 + 1e-9))).all()


def test_simulate_decay_refuses_unknown_optimizer_with_message():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        wd.simulate_decay("lion", 0.1, 1e-3)


def test_decay_over_run_matches_the_closed_form_and_torchs_adamw(adamw_retained):
    config = TrainConfig(steps=1000, lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.1)
    integrated, kept = wd.decay_over_run(config)
    closed = 0.1 * (1e-3 * 51 / 2 + 950 * (1e-3 + 1e-4) / 2)      # warmup + cosine samples averaging (max+min)/2
    assert integrated == pytest.approx(closed, rel=1e-12)
    assert wd.integrated_decay_estimate(config) == pytest.approx(0.1 * 1.1e-3 * 1000 / 2)
    oracle = adamw_retained(config)
    assert wd.retained(config) == pytest.approx(oracle, rel=1e-9)
    assert kept == pytest.approx(oracle[-1], rel=1e-9)


def test_half_life_halves_a_weight_and_approaches_ln2_over_lr_wd():
    h = wd.half_life(1e-3, 0.1)
    assert (1 - 1e-4) ** h == pytest.approx(0.5, rel=1e-12)       # AdamW's factor per step, h times
    assert h == pytest.approx(math.log(2) / 1e-4, rel=1e-4)       # ln 2 / (lr wd) while lr wd << 1
    assert wd.half_life(0.5, 1.0) == pytest.approx(1.0)          # (1 - 0.5)^1 = 1/2: the exact formula, not 1.39
    assert wd.half_life(1e-3, 0.0) == math.inf
    with pytest.raises(ValueError, match="need 0 <= lr \\* weight_decay < 1, got 2.0"):
        wd.half_life(1.0, 2.0)


def test_grokking_settings_cover_every_budget_and_runs_are_labelled():
    for budget in ("ci", "cpu", "gpu"):
        settings = wd_lab.settings_for(budget)
        runs = wd_lab.grokking_runs(settings)
        assert list(runs) == ["AdamW λ=0", "AdamW λ=0.1", "AdamW λ=1", "Adam+L2 λ=1", "Adam+L2 λ=0.01"]
        assert [c.weight_decay for _, c in runs.values()] == [0.0, 0.1, 1.0, 1.0, 0.01]
        assert [c.optimizer for _, c in runs.values()] == ["adamw"] * 3 + ["adam_l2"] * 2
        assert all(c.steps == settings.max_steps and c.grad_clip is None for _, c in runs.values())
    assert len(wd_lab.settings_for("gpu").seeds) >= 2


def test_held_above_stops_a_run_early():
    settings = wd_lab.settings_for("ci")
    from reglab.data import modular_addition
    task = modular_addition(settings.modulus, settings.train_fraction)
    model = new_model(wd_lab.grokking_model(settings))
    config = TrainConfig(steps=100, eval_every=5, progress=False)
    history = train(model, task, config, stop_when=wd_lab.held_above("train_acc", 0.0, 2))
    assert history.final["step"] == 10 and len(history.loss) == 10


def test_run_grokking_in_workers_matches_one_thread():
    """workers=2 (the cpu setting's "auto" on 2 cores) sends held_above and matrix_norm to worker processes:
    the same histories as one at a time on one thread, stopping at the same steps."""
    from dataclasses import replace
    settings = wd_lab.settings_for("ci")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = wd_lab.run_grokking(settings, progress=False)
    finally:
        torch.set_num_threads(threads)
    parallel = wd_lab.run_grokking(replace(settings, workers=2), progress=False)
    assert list(parallel) == list(serial)
    for label in serial:
        for one, other in zip(serial[label], parallel[label]):
            assert one.loss == other.loss and one.evals == other.evals, label
    assert wd_lab.settings_for("cpu").workers == "auto" and wd_lab.settings_for("ci").workers == 1


def test_run_grokking_ci_summary_and_plots():
    settings = wd_lab.settings_for("ci")
    results = wd_lab.run_grokking(settings, progress=False)
    summary = wd_lab.grokking_summary(results, settings)
    assert set(summary) == set(results)
    for label, row in summary.items():
        assert len(row["grok_step"]) == len(settings.seeds)
        assert all(isinstance(s, int) or s.startswith("not within") for s in row["grok_step"])
        assert all(n > 0 for n in row["final_matrix_norm"])
    wd_lab.plot_grokking(results)
    wd_lab.show_grokking(results, "AdamW λ=1")
    with pytest.raises(ValueError, match="setting must be one of"):
        wd_lab.show_grokking(results, "SGD")


def test_show_decay_prints_that_adamw_decays_every_weight_alike_and_adam_l2_does_not(capsys):
    """The widget's printed figures, against (1 - lr wd)^T computed here: AdamW keeps about that much of a
    weight whatever its gradient scale (4 standard errors of a mean of 256 random walks of step <= lr);
    Adam + L2 barely decays the large-gradient weight and shrinks the small-gradient one far faster."""
    lr, weight_decay, steps = 1e-2, 0.2, 50
    wd.show_decay(weight_decay, lr, steps=steps)
    out = capsys.readouterr().out
    kept = {(name.strip(), float(scale)): float(value) / 100 for name, scale, value in
            re.findall(r"^\s*(.+?),\s+gradient scale ([\d.e+-]+): keeps\s+([\d.]+)%", out, re.M)}
    pure = (1 - lr * weight_decay) ** steps
    assert float(re.search(r"pure decay keeps ([\d.]+)%", out).group(1)) / 100 == pytest.approx(pure, abs=5e-4)
    tolerance = 4 * lr * math.sqrt(steps) / math.sqrt(256)
    assert abs(kept[("AdamW", 1e-3)] - pure) < tolerance and abs(kept[("AdamW", 10.0)] - pure) < tolerance
    assert kept[("Adam + L2", 10.0)] > 0.98
    assert kept[("Adam + L2", 1e-3)] < pure - 0.2


def test_matrix_norm_counts_only_decayed_tensors():
    model = GPT(GPTConfig(vocab_size=5, block_size=3, n_layer=1, n_head=1, n_embd=4))
    expected = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in model.parameters() if p.dim() >= 2))
    assert wd_lab.matrix_norm(model)["matrix_norm"] == pytest.approx(expected, rel=1e-6)
