"""Issue 14's corrections: every assert added there fails when its claim is false (each test perturbs the claim),
and the claims ledger gives the same verdict as the notebook cells that teach each claim."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from reglab.model import GPT, GPTConfig
from reglab.topics.capstone import lab as capstone
from reglab.topics.capstone.lora import lora_parameter_count
from reglab.topics.claims import CLAIMS, VERDICTS
from reglab.topics.dropout import lecture as dropout
from reglab.topics.label_smoothing import lecture as ls

ROOT = Path(__file__).resolve().parent.parent


# -------------------------------------------------------------- 01 layernorm-check: the direction noise
def test_layernorm_direction_check_passes_at_the_notebooks_rates():
    for p in (0.1, 0.3, 0.5):
        dropout.check_layernorm_modes(dropout.layernorm_direction_noise(p))


def test_layernorm_direction_check_fails_without_dropout():
    # p = 0: train and eval mode agree, so "the direction is noisier in training" is false
    with pytest.raises(AssertionError, match="adds no direction noise"):
        dropout.check_layernorm_modes(dropout.layernorm_direction_noise(0.0))


def test_layernorm_direction_check_fails_with_another_constant():
    result = dropout.layernorm_direction_noise(0.3)
    wrong = {**result, "derived_train_cos": 1 - 0.3}                 # 1 - p instead of sqrt(1 - p)
    with pytest.raises(AssertionError, match="is not the derived"):
        dropout.check_layernorm_modes(wrong)


# ------------------------------------------------------------------ 01 cost-flops: the memory claim
COST_MODEL = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, use_sdpa=False)


def saved_bytes(p: float) -> int:
    idx = torch.randint(64, (4, 32), generator=torch.Generator().manual_seed(0))
    return dropout.saved_tensor_bytes(GPT(COST_MODEL.with_dropout(p)).train(), idx)


def test_dropout_memory_check_passes_with_dropout_and_fails_without():
    bound = dropout.dropout_mask_bytes_lower_bound(COST_MODEL, 4, 32)
    plain = saved_bytes(0.0)
    dropout.check_dropout_memory(plain, saved_bytes(0.2), bound)
    with pytest.raises(AssertionError, match="fewer than its masks"):
        dropout.check_dropout_memory(plain, saved_bytes(0.0), bound)     # p = 0: no masks


# --------------------------------------------------------------- 01 cost-time-measure: the verdict
def test_timing_verdict_needs_every_round_on_one_side():
    assert dropout.timing_verdict([1.2, 1.1, 1.3]) == "slower"
    assert dropout.timing_verdict([0.9, 0.8, 0.95]) == "faster"
    assert dropout.timing_verdict([1.2, 0.9, 1.1]) == "not resolved"
    assert dropout.timing_verdict([]) == "not resolved"


def test_timing_verdict_with_a_fake_timer_that_sees_no_difference(monkeypatch):
    clock = iter(range(10**6))
    monkeypatch.setattr(dropout.time, "perf_counter", lambda: float(next(clock)))   # every step: 1 "second"
    tiny = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)
    cost = dropout.dropout_cost(tiny, p=0.2, batch_size=2, steps=2, rounds=3)
    assert cost["round_ratios"] == [1.0, 1.0, 1.0]
    assert dropout.timing_verdict(cost["round_ratios"]) == "not resolved"


# ----------------------------------------------------------------------- 06 regimes-table
def regimes_rows(sft_tokens=10_000 * 500, published=None):
    published = published or capstone.PUBLISHED_REGIMES
    lora_params = 32 * 4 * lora_parameter_count(4096, 4096, r=16)
    rows = [(name, params, tokens, 1.0) for name, (params, tokens, _) in published.items()]
    return rows + [("7B, full fine-tuning", 7e9, sft_tokens, 3.0), ("7B, LoRA r=16 on attention", lora_params, sft_tokens, 3.0)]


def test_regimes_check_passes_the_notebooks_table():
    ratios = capstone.check_regimes(regimes_rows())
    assert ratios["7B, full fine-tuning"] == pytest.approx(1400)


def test_regimes_check_fails_when_the_fine_tuning_set_is_large():
    with pytest.raises(AssertionError, match="not over 1000"):
        capstone.check_regimes(regimes_rows(sft_tokens=1e9))           # 7 parameters per token


def test_regimes_check_fails_with_another_chinchilla():
    published = {**capstone.PUBLISHED_REGIMES, "Chinchilla 70B": (70e9, 1.0e12, "perturbed")}
    with pytest.raises(AssertionError, match="not 1/20"):
        capstone.check_regimes(regimes_rows(published=published))


# --------------------------------------------------------------------- 03 erasure: the spread
START = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def spreads():
    return ls.wrong_logit_spread(START, 0.0), ls.wrong_logit_spread(START, 0.1)


def test_spread_check_passes_the_notebooks_runs(spreads):
    hard, smoothed = spreads
    ls.check_spread(hard, smoothed)
    assert hard["final"] == pytest.approx(1.01, abs=0.01) and hard["initial"] == pytest.approx(1.56, abs=0.01)


def test_spread_check_fails_if_hard_targets_froze_the_spread(spreads):
    hard, smoothed = spreads
    with pytest.raises(AssertionError, match="should shrink"):
        ls.check_spread({**hard, "final": hard["initial"]}, smoothed)


def test_spread_check_fails_if_hard_targets_erased_the_spread(spreads):
    hard, smoothed = spreads
    with pytest.raises(AssertionError, match="above the bound"):
        ls.check_spread({**hard, "final": smoothed["final"]}, smoothed)


def test_spread_check_fails_if_smoothing_were_too_weak_to_erase():
    hard, weak = ls.wrong_logit_spread(START, 0.0), ls.wrong_logit_spread(START, 0.001)
    with pytest.raises(AssertionError, match="did not decay|should erase"):
        ls.check_spread(hard, weak)


def test_the_spread_bound_holds_for_every_alpha():
    for alpha in (0.0, 0.05, 0.1, 0.3):
        result = ls.wrong_logit_spread(START, alpha, steps=300)
        assert result["lower_bound"] <= result["final"] <= result["initial"]


# ------------------------------------------------------------------ the ledger agrees with the notebooks
MARKER = re.compile(r"\[claim ([a-z0-9-]+): ([a-z]+)\]")


def notebook_markers(paths=None) -> dict[str, dict[str, list[str]]]:
    """{"notebooks/NN_x.ipynb#cell-id": {claim id: [verdicts stated there]}} for every marker in the notebooks."""
    found: dict[str, dict[str, list[str]]] = {}
    for path in paths or sorted([*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("solutions/*.ipynb")]):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            text = "".join(cell["source"])
            for claim_id, verdict in MARKER.findall(text):
                key = f"{path.relative_to(ROOT).as_posix()}#{cell['id']}"
                found.setdefault(key, {}).setdefault(claim_id, []).append(verdict)
    return found


def cell_ids(notebook: str) -> set[str]:
    return {cell["id"] for cell in json.loads((ROOT / notebook).read_text(encoding="utf-8"))["cells"]}


def ledger_disagreements(claims, markers) -> list[str]:
    """Every way the ledger and the notebooks disagree: a named cell missing or without the claim's marker, a
    marker whose verdict differs from the ledger's, or a marker in a cell the ledger does not name."""
    problems = []
    by_id = {claim.id: claim for claim in claims}
    for claim in claims:
        for place in claim.cells:
            notebook, _, cell = place.partition("#")
            if not (ROOT / notebook).exists() or cell not in cell_ids(notebook):
                problems.append(f"{claim.id}: no cell {place}")
            elif claim.id not in markers.get(place, {}):
                problems.append(f"{claim.id}: {place} has no [claim {claim.id}: ...] marker")
    for place, stated in markers.items():
        for claim_id, verdicts in stated.items():
            claim = by_id.get(claim_id)
            if claim is None:
                problems.append(f"{place}: marker for unknown claim {claim_id}")
                continue
            for verdict in verdicts:
                if verdict != claim.verdict:
                    problems.append(f"{place}: says {claim_id} is {verdict}, the ledger says {claim.verdict}")
            if place not in claim.cells:
                problems.append(f"{place}: marks {claim_id}, but the ledger does not name this cell")
    return problems


def test_the_ledger_and_the_notebooks_give_the_same_verdicts():
    markers = notebook_markers()
    assert ledger_disagreements(CLAIMS, markers) == []
    assert sum(len(claim.cells) for claim in CLAIMS) >= 8             # the corrected entries all carry cells


def test_a_changed_verdict_is_caught():
    markers = notebook_markers()
    claim = next(c for c in CLAIMS if c.id == "llm-label-smoothing")
    other = next(v for v in VERDICTS if v != claim.verdict)
    perturbed = [replace(c, verdict=other) if c.id == claim.id else c for c in CLAIMS]
    problems = ledger_disagreements(perturbed, markers)
    assert any("llm-label-smoothing is wrong, the ledger says" in p for p in problems), problems


def test_a_missing_cell_or_marker_is_caught():
    markers = notebook_markers()
    claim = next(c for c in CLAIMS if c.id == "llama-dropout")
    moved = [replace(c, cells=("notebooks/01_dropout.ipynb#no-such-cell",)) if c is claim else c for c in CLAIMS]
    problems = ledger_disagreements(moved, markers)
    assert "llama-dropout: no cell notebooks/01_dropout.ipynb#no-such-cell" in problems
    assert any("does not name this cell" in p for p in problems)


def test_the_corrected_entries_say_what_the_sources_say():
    claims = {c.id: c for c in CLAIMS}
    assert "without label smoothing" in claims["llm-label-smoothing"].source_says
    assert "checkpoints" in claims["llama-dropout"].source_says and "§3.4" in claims["llama-dropout"].source
    assert "global norm 1.0" in claims["bert-l2-in-adam"].source_says
    assert {"dropout-typical-values", "dropout-small-datasets"} <= set(claims)
    assert "§4.2" in claims["dropout-typical-values"].source and "§5.4" in claims["dropout-typical-values"].source


# ------------------------------------------------- solutions/02 adam-l2-matched: lambda_L2 = lambda_W sqrt(v_hat)
def decay_after(optimizer_cls, weight_decay: float, rms: float, steps: int = 200, lr: float = 1e-3) -> float:
    """How far a weight of 0.02 moves in `steps` steps under a loss gradient that alternates +-rms (RMS rms, mean 0)."""
    theta = torch.nn.Parameter(torch.tensor([0.02], dtype=torch.float64))
    optimizer = optimizer_cls([theta], lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    for step in range(steps):
        theta.grad = torch.tensor([rms if step % 2 == 0 else -rms], dtype=torch.float64)
        optimizer.step()
    return 0.02 - float(theta.detach())


def test_matched_l2_lambda_gives_adamws_decay_and_the_same_lambda_does_not():
    from reglab.topics.weight_decay.lab import matched_l2_weight_decay
    rms = 4e-3
    adamw = decay_after(torch.optim.AdamW, 1.0, rms) - decay_after(torch.optim.AdamW, 0.0, rms)
    matched = decay_after(torch.optim.Adam, matched_l2_weight_decay(1.0, rms), rms) - decay_after(torch.optim.Adam, 0.0, rms)
    # the L2 term is 2% of the gradient here (lambda theta / rms), so v_hat is the gradient's: agreement to ~10%
    assert matched == pytest.approx(adamw, rel=0.1)
    # the same lambda moves the weight about lr per step (1/rms = 250 times AdamW's), until it reaches 0: 10 steps
    same = decay_after(torch.optim.Adam, 1.0, rms, steps=10) - decay_after(torch.optim.Adam, 0.0, rms, steps=10)
    adamw_10 = decay_after(torch.optim.AdamW, 1.0, rms, steps=10) - decay_after(torch.optim.AdamW, 0.0, rms, steps=10)
    assert same > 10 * adamw_10


def test_the_measured_gradient_scale_is_a_few_thousandths_on_the_ci_task():
    from reglab.data import modular_addition
    from reglab.topics.weight_decay.lab import adam_gradient_scale, grokking_model, settings_for
    settings = settings_for("ci")
    task = modular_addition(settings.modulus, settings.train_fraction, seed=0)
    scale = adam_gradient_scale(grokking_model(settings), task, settings.lr, settings.betas, steps=30)
    assert scale["q1"] <= scale["median"] <= scale["q3"] and 1e-4 < scale["median"] < 1e-1
