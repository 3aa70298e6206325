"""Tests of the dropout topic: the lab's checks accept the solution and name each classic mistake, and the
topic modules (reglab.topics.dropout.lecture, reglab.topics.dropout.lab, reglab.topics.dropout.recall) agree with PyTorch and with the math.

The reference implementation is the lab solution itself: its code cells are executed from
solutions/01_dropout_lab.ipynb, so these tests check what students are graded against.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

matplotlib.use("Agg")

from reglab.checks import CheckFailed, get  # noqa: E402
from reglab.topics.dropout.lecture import (  # noqa: E402
    derived_batchnorm_shift, derived_moments, dropout_cost, dropout_statistics, dropped_fraction_by_site,
    norm_variance_shift, saved_tensor_bytes, show_dropout, step_times, training_step_flops,
    variance_standard_error)
from reglab.topics.dropout.lab import SETTINGS, figures, settings_for, show_sweep, summarize  # noqa: E402
from reglab.model import DROPOUT_SITES, GPT, GPTConfig  # noqa: E402
from reglab.topics.dropout.recall import IGNORE, recall_accuracy, recall_metrics, recall_task  # noqa: E402
from reglab.train import TrainConfig, new_model, train  # noqa: E402
from solution_code import solution_cells

SOLUTION = Path(__file__).resolve().parent.parent / "solutions" / "01_dropout_lab.ipynb"
REFERENCE_CELLS = ("dropout-function", "dropout-module", "dropout-block")
DROPOUT_CHECKS = ("dropout.keep_fraction", "dropout.scaling", "dropout.eval_identity", "dropout.backward_mask",
                  "dropout.moments", "dropout.fresh_masks", "dropout.any_shape")
BLOCK_CHECKS = ("dropout.block_eval", "dropout.block_sites", "dropout.block_all_sites")




REF = solution_cells(SOLUTION.name, *REFERENCE_CELLS)


def verdicts(obj, check_ids, ignore_shortcuts: bool = False) -> dict[str, str | None]:
    """{check id: None if it passes, else the CheckFailed message}, probing and judging as the grader does
    (the probe's data goes through JSON, as it does between the student's kernel and the judge;
    ignore_shortcuts drops the probe's record of refused shortcuts, to test the judge's numbers alone)."""
    out = {}
    for check_id in check_ids:
        spec = get(check_id)
        data = json.loads(json.dumps(spec.probe(obj)))
        if ignore_shortcuts:
            data.pop("shortcuts", None)
        try:
            spec.judge(data)
            out[check_id] = None
        except CheckFailed as failure:
            out[check_id] = str(failure)
    return out


def assert_fails_exactly(obj, check_ids, expected: dict[str, str]):
    """The checks in `expected` fail with a message containing the given text; every other one passes."""
    result = verdicts(obj, check_ids)
    for check_id, message in result.items():
        if check_id in expected:
            assert message is not None, f"{check_id} should fail but passed"
            assert expected[check_id] in message, f"{check_id}: {message!r} lacks {expected[check_id]!r}"
        else:
            assert message is None, f"{check_id} should pass but failed: {message}"


# ---------------------------------------------------------------------------------------------------
# The reference passes everything; the probes return small JSON data
# ---------------------------------------------------------------------------------------------------

def test_solution_passes_every_dropout_and_block_check():
    assert_fails_exactly(REF["Dropout"], DROPOUT_CHECKS, {})
    assert_fails_exactly(REF["DropoutBlock"], BLOCK_CHECKS, {})


def test_torch_nn_dropout_agrees_with_every_judge_but_is_refused():
    # PyTorch's own module is the answer key: a judge that failed it would be wrong; as a submission it is refused
    assert verdicts(nn.Dropout, DROPOUT_CHECKS, ignore_shortcuts=True) == {k: None for k in DROPOUT_CHECKS}
    assert_fails_exactly(nn.Dropout, DROPOUT_CHECKS, {k: "torch.nn.Dropout, which this lab refuses" for k in DROPOUT_CHECKS})


def test_probe_data_is_small_json():
    for check_id in DROPOUT_CHECKS + BLOCK_CHECKS:
        obj = REF["DropoutBlock"] if check_id in BLOCK_CHECKS else REF["Dropout"]
        size = len(json.dumps(get(check_id).probe(obj)))
        assert size < 1_000_000, f"{check_id} probe returns {size} bytes"


def test_probes_leave_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get("dropout.keep_fraction").probe(REF["Dropout"])
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------------
# Classic mistakes in the Dropout module
# ---------------------------------------------------------------------------------------------------

def dropout_variant(train_forward, eval_forward=lambda self, x: x):
    """A Dropout class whose train-mode forward is train_forward(self, x) (autograd derives the backward)."""
    class Variant(nn.Module):
        def __init__(self, p=0.5):
            super().__init__()
            self.p = p

        def forward(self, x):
            return train_forward(self, x) if self.training else eval_forward(self, x)
    return Variant


def keep_mask(x, p):
    return (torch.rand_like(x) >= p).to(x.dtype)


def function_variant(backward):
    """A Dropout class built on an autograd.Function whose backward(mask, scale, grad) is given."""
    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p):
            mask = keep_mask(x, p)
            ctx.save_for_backward(mask)
            ctx.p = p
            return x * mask / (1 - p)

        @staticmethod
        def backward(ctx, grad):
            (mask,) = ctx.saved_tensors
            return backward(mask, ctx.p, grad), None
    return dropout_variant(lambda self, x: Function.apply(x, self.p))


def test_keep_probability_confusion_is_named():
    # keeps a fraction p and scales by 1/p: right for the keep convention, wrong for PyTorch's p
    variant = dropout_variant(lambda self, x: x * (torch.rand_like(x) < self.p) / self.p)
    assert_fails_exactly(variant, DROPOUT_CHECKS, {
        "dropout.keep_fraction": "KEEP probability", "dropout.scaling": "KEEP probability",
        "dropout.moments": "variance", "dropout.backward_mask": "instead of 1/(1-p)",
        "dropout.any_shape": "not x/(1-p)", "dropout.eval_identity": "division by p"})


def test_one_over_p_scaling_is_named():
    variant = dropout_variant(lambda self, x: x * keep_mask(x, self.p) / self.p)
    assert_fails_exactly(variant, DROPOUT_CHECKS, {
        "dropout.scaling": "1/p instead of 1/(1-p)", "dropout.moments": "mean must stay h",
        "dropout.backward_mask": "instead of 1/(1-p)", "dropout.any_shape": "not x/(1-p)",
        "dropout.eval_identity": "division by p"})


def test_missing_scale_is_named():
    variant = dropout_variant(lambda self, x: x * keep_mask(x, self.p))
    assert_fails_exactly(variant, DROPOUT_CHECKS, {
        "dropout.scaling": "not scaled", "dropout.moments": "mean must stay h",
        "dropout.backward_mask": "instead of 1/(1-p)", "dropout.any_shape": "not x/(1-p)"})


def test_inference_rescaling_in_training_is_named():
    variant = dropout_variant(lambda self, x: x * keep_mask(x, self.p) * (1 - self.p))
    assert_fails_exactly(variant, DROPOUT_CHECKS, {
        "dropout.scaling": "inference-time rule of standard", "dropout.moments": "mean must stay h",
        "dropout.backward_mask": "instead of 1/(1-p)", "dropout.any_shape": "not x/(1-p)"})


def test_dropout_active_in_eval_mode_is_named():
    variant = dropout_variant(lambda self, x: x * keep_mask(x, self.p) / (1 - self.p),
                              eval_forward=lambda self, x: x * keep_mask(x, self.p) / (1 - self.p))
    assert_fails_exactly(variant, DROPOUT_CHECKS, {"dropout.eval_identity": "active in eval mode"})


def test_standard_dropout_eval_rule_is_named():
    # standard dropout: unscaled in training, times (1 - p) at inference
    variant = dropout_variant(lambda self, x: x * keep_mask(x, self.p), eval_forward=lambda self, x: x * (1 - self.p))
    result = verdicts(variant, ["dropout.eval_identity", "dropout.scaling"])
    assert "standard dropout's inference rule" in result["dropout.eval_identity"]
    assert "not scaled" in result["dropout.scaling"]


def test_new_mask_in_backward_is_named():
    variant = function_variant(lambda mask, p, grad: grad * keep_mask(grad, p) / (1 - p))
    assert_fails_exactly(variant, DROPOUT_CHECKS, {"dropout.backward_mask": "reuse the mask drawn in the forward"})


def test_unmasked_backward_is_named():
    variant = function_variant(lambda mask, p, grad: grad / (1 - p))
    assert_fails_exactly(variant, DROPOUT_CHECKS, {"dropout.backward_mask": "multiply the gradient by the saved mask"})


def test_unscaled_backward_is_named():
    variant = function_variant(lambda mask, p, grad: grad * mask)
    assert_fails_exactly(variant, DROPOUT_CHECKS, {"dropout.backward_mask": "scales by 1 instead of 1/(1-p)"})


def test_no_gradient_is_named():
    def no_grad_forward(self, x):
        with torch.no_grad():
            return x * keep_mask(x, self.p) / (1 - self.p)
    assert_fails_exactly(dropout_variant(no_grad_forward), DROPOUT_CHECKS,
                         {"dropout.backward_mask": "no gradient reached the input"})


def test_mask_drawn_once_is_named():
    def fixed_seed_forward(self, x):
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        return x * (u >= self.p) / (1 - self.p)
    assert_fails_exactly(dropout_variant(fixed_seed_forward), DROPOUT_CHECKS,
                         {"dropout.fresh_masks": "drawn once"})


def test_whole_rows_dropped_together_is_named():
    def row_forward(self, x):
        mask = (torch.rand(*x.shape[:-1], 1) >= self.p).to(x.dtype)          # one draw per row
        return x * mask / (1 - self.p)
    result = verdicts(dropout_variant(row_forward), ["dropout.fresh_masks"])
    assert "dropped together" in result["dropout.fresh_masks"]


def test_in_place_dropout_is_named():
    def in_place_forward(self, x):
        with torch.no_grad():
            return x.mul_(keep_mask(x, self.p) / (1 - self.p))
    result = verdicts(dropout_variant(in_place_forward), ["dropout.any_shape"])
    assert "modified its input in place" in result["dropout.any_shape"]


def test_unimplemented_stub_reports_not_implemented():
    from reglab.checks import check

    class Stub(nn.Module):
        def __init__(self, p=0.5):
            super().__init__()

        def forward(self, x):
            raise NotImplementedError()

    with pytest.raises(CheckFailed, match="not implemented yet"):
        check("dropout.keep_fraction", Stub)


# ---------------------------------------------------------------------------------------------------
# Classic mistakes in the block: a dropout site missing, misplaced, or active in eval mode
# ---------------------------------------------------------------------------------------------------

def block_variant(attention=None, mlp=None, embed=None):
    """The solution's block with one stage replaced. attention(self, normed) -> (B, T, C) branch output before
    resid dropout; mlp(self, normed) -> branch output before resid dropout; embed(self, idx) -> x."""
    Base = REF["DropoutBlock"]

    def heads(self, t, B, T, C):
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def default_embed(self, idx):
        pos = self.pos_emb(torch.arange(idx.size(1)))
        return self.embd_dropout(self.tok_emb(idx) + pos)

    def default_attention(self, normed):
        B, T, C = normed.shape
        q, k, v = (heads(self, t, B, T, C) for t in self.qkv(normed).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = self.attn_dropout(F.softmax(att.masked_fill(~self.causal[:T, :T], float("-inf")), dim=-1))
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, C))

    def default_mlp(self, normed):
        return self.down(self.ffn_dropout(F.gelu(self.up(normed))))

    class Variant(Base):
        def forward(self, idx):
            x = (embed or default_embed)(self, idx)
            x = x + self.resid_dropout((attention or default_attention)(self, self.norm1(x)))
            return x + self.resid_dropout((mlp or default_mlp)(self, self.norm2(x)))

    Variant.heads = heads
    return Variant


def attention_with(weights_fn=None, output_fn=None, scores_fn=None):
    """An attention stage whose scores, weights or output pass through the given function."""
    def attention(self, normed):
        B, T, C = normed.shape
        q, k, v = (self.heads(t, B, T, C) for t in self.qkv(normed).split(C, dim=2))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        if scores_fn:
            scores = scores_fn(self, scores)
        weights = F.softmax(scores.masked_fill(~self.causal[:T, :T], float("-inf")), dim=-1)
        if weights_fn:
            weights = weights_fn(self, weights)
        y = weights @ v
        if output_fn:
            y = output_fn(self, y)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
    return attention


def test_block_variant_without_changes_passes():
    assert_fails_exactly(block_variant(), BLOCK_CHECKS, {})


def test_scaled_dot_product_attention_block_passes():
    def sdpa(self, normed):
        B, T, C = normed.shape
        q, k, v = (self.heads(t, B, T, C) for t in self.qkv(normed).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attn_dropout.p if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
    assert_fails_exactly(block_variant(attention=sdpa), BLOCK_CHECKS, {})


def test_missing_attention_dropout_is_named():
    assert_fails_exactly(block_variant(attention=attention_with(weights_fn=lambda self, w: w)), BLOCK_CHECKS, {
        "dropout.block_sites": "nothing was dropped at the attention-weights site",
        "dropout.block_all_sites": "nothing was dropped at the attention-weights site"})


def test_dropout_on_scores_before_softmax_is_named():
    variant = block_variant(attention=attention_with(weights_fn=lambda self, w: w,
                                                     scores_fn=lambda self, s: self.attn_dropout(s)))
    assert_fails_exactly(variant, BLOCK_CHECKS, {
        "dropout.block_sites": "dropout acted before the softmax",
        "dropout.block_all_sites": "dropout acted before the softmax"})


def test_dropout_on_attention_output_is_named():
    variant = block_variant(attention=attention_with(weights_fn=lambda self, w: w,
                                                     output_fn=lambda self, y: self.attn_dropout(y)))
    assert_fails_exactly(variant, BLOCK_CHECKS, {
        "dropout.block_sites": "not on the output att @ v", "dropout.block_all_sites": "not on the output att @ v"})


def test_attention_dropout_with_the_residual_probability_is_named():
    variant = block_variant(attention=attention_with(
        weights_fn=lambda self, w: F.dropout(w, self.resid_dropout.p, self.training)))
    assert_fails_exactly(variant, BLOCK_CHECKS, {
        "dropout.block_sites": "nothing was dropped at the attention-weights site",
        "dropout.block_all_sites": "drops with p=0.3 (resid_p)"})


def test_residual_dropout_after_the_add_is_named():
    attention = attention_with(weights_fn=lambda self, w: self.attn_dropout(w))

    class AfterAdd(block_variant()):
        def forward(self, idx):
            x = self.embd_dropout(self.tok_emb(idx) + self.pos_emb(torch.arange(idx.size(1))))
            x = self.resid_dropout(x + attention(self, self.norm1(x)))            # drops the skip path too
            return self.resid_dropout(x + self.down(self.ffn_dropout(F.gelu(self.up(self.norm2(x))))))

    assert_fails_exactly(AfterAdd, BLOCK_CHECKS, {
        "dropout.block_sites": "dropping after the add", "dropout.block_all_sites": "dropping after the add"})


def test_ffn_dropout_before_the_activation_is_named():
    variant = block_variant(mlp=lambda self, h: self.down(F.gelu(self.ffn_dropout(self.up(h)))))
    assert_fails_exactly(variant, BLOCK_CHECKS, {
        "dropout.block_sites": "not before the activation", "dropout.block_all_sites": "not before the activation"})


def test_swapped_residual_and_ffn_dropout_is_named():
    variant = block_variant(mlp=lambda self, h: self.down(self.resid_dropout(F.gelu(self.up(h)))))
    result = verdicts(variant, BLOCK_CHECKS)
    assert result["dropout.block_eval"] is None
    assert "applied at the wrong site" in result["dropout.block_sites"]


def test_embedding_dropout_on_tokens_only_is_named():
    def tokens_only(self, idx):
        return self.embd_dropout(self.tok_emb(idx)) + self.pos_emb(torch.arange(idx.size(1)))
    assert_fails_exactly(block_variant(embed=tokens_only), BLOCK_CHECKS, {
        "dropout.block_sites": "not on one of the two alone", "dropout.block_all_sites": "not on one of the two alone"})


def test_attention_dropout_active_in_eval_mode_is_named():
    def always_drops(self, normed):
        B, T, C = normed.shape
        q, k, v = (self.heads(t, B, T, C) for t in self.qkv(normed).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.attn_dropout.p)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
    assert_fails_exactly(block_variant(attention=always_drops), BLOCK_CHECKS,
                         {"dropout.block_eval": "dropout is active in eval mode"})


def test_wrong_block_computation_is_named():
    # tanh-approximate GELU: close, but not the reference block
    variant = block_variant(mlp=lambda self, h: self.down(self.ffn_dropout(F.gelu(self.up(h), approximate="tanh"))))
    result = verdicts(variant, ["dropout.block_eval"])
    assert "differs from the reference block" in result["dropout.block_eval"]


def test_renamed_layers_are_refused_with_a_message():
    class Renamed(nn.Module):
        def __init__(self, vocab_size, block_size, n_embd, n_head, **ps):
            super().__init__()
            self.embedding = nn.Embedding(vocab_size, n_embd)

        def forward(self, idx):
            return self.embedding(idx)
    result = verdicts(Renamed, ["dropout.block_eval"])
    assert "keep the given __init__" in result["dropout.block_eval"]


# ---------------------------------------------------------------------------------------------------
# The topic module against PyTorch and the math
# ---------------------------------------------------------------------------------------------------

Z = 5.0   # standard errors; a two-sided false-failure rate of 5.7e-7 per comparison


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_statistics_match_the_derivation(p):
    h, n = 1.7, 200_000
    stats = dropout_statistics(p, h, n, seed=3)
    derived = derived_moments(p, h)
    assert stats["values"] == pytest.approx([0.0, h / (1 - p)])
    assert abs(stats["kept"] - (1 - p)) <= Z * math.sqrt(p * (1 - p) / n)
    assert abs(stats["mean"] - h) <= Z * math.sqrt(derived["var"] / n)
    assert abs(stats["var"] - derived["var"]) <= Z * variance_standard_error(p, h, n)


def test_derived_moments_match_the_two_point_distribution():
    p, h = 0.3, -2.0
    d = derived_moments(p, h)
    values, probs = torch.tensor([0.0, h / (1 - p)], dtype=torch.float64), torch.tensor([p, 1 - p], dtype=torch.float64)
    mean = float((values * probs).sum())
    assert mean == pytest.approx(d["mean"])
    assert float(((values - mean) ** 2 * probs).sum()) == pytest.approx(d["var"])
    assert float(((values - mean) ** 4 * probs).sum()) == pytest.approx(d["mu4"])


def test_drop_probability_outside_range_is_refused_with_its_value():
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        dropout_statistics(1.0)


@pytest.mark.parametrize("mean", [0.0, 1.0])
def test_batchnorm_after_dropout_shifts_the_eval_variance_as_derived(mean):
    p = 0.5
    result = norm_variance_shift(p, "batchnorm", mean=mean, seed=1)
    eval_var = torch.tensor(result["eval_var"])
    standard_error = float(eval_var.std() / math.sqrt(len(eval_var)))
    assert abs(float(eval_var.mean()) - derived_batchnorm_shift(p, mean)) <= Z * standard_error
    assert float(torch.tensor(result["train_var"]).mean()) == pytest.approx(1.0, abs=0.05)


def test_layernorm_after_dropout_has_no_variance_shift():
    result = norm_variance_shift(0.5, "layernorm", seed=1)
    train_var, eval_var = torch.tensor(result["train_var"]).mean(), torch.tensor(result["eval_var"]).mean()
    assert float(eval_var) == pytest.approx(float(train_var), abs=0.05)


def test_each_site_drops_only_where_its_p_is_set():
    config = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_embd=32, use_sdpa=False)
    idx = torch.randint(32, (4, 16), generator=torch.Generator().manual_seed(0))
    for site in DROPOUT_SITES:
        torch.manual_seed(1)
        counts = dropped_fraction_by_site(GPT(config.with_dropout(0.3, [site])).train(), idx)
        for other, (dropped, seen) in counts.items():
            if other == site:
                assert abs(dropped / seen - 0.3) <= Z * math.sqrt(0.21 / seen)
            else:
                assert dropped == 0
        assert all(d == 0 for d, _ in dropped_fraction_by_site(GPT(config.with_dropout(0.3)).eval(), idx).values())


def test_site_counting_refuses_the_fused_attention_with_a_message():
    with pytest.raises(ValueError, match="use_sdpa=False"):
        dropped_fraction_by_site(GPT(GPTConfig(vocab_size=8, block_size=4)), torch.zeros(1, 4, dtype=torch.long))


def test_dropout_skips_no_flops_and_stores_its_masks():
    config = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_embd=32, use_sdpa=False)
    idx = torch.randint(32, (2, 16), generator=torch.Generator().manual_seed(0))
    off, on = GPT(config).train(), GPT(config.with_dropout(0.2)).train()
    assert training_step_flops(off, idx) == training_step_flops(on, idx)
    assert saved_tensor_bytes(on, idx) > saved_tensor_bytes(off, idx)


def test_step_times_brackets_each_timed_step_and_skips_the_warmup(monkeypatch):
    """A clock that returns call_index**2. The warm-up step reads it once (call 0, its start) and is not
    timed; timed step k = 1, 2, 3 reads it at calls 2k - 1 and 2k, so it lasts (2k)^2 - (2k - 1)^2 = 4k - 1.
    Timing the warm-up, or reading the clock anywhere else in the step, would change these numbers."""
    from types import SimpleNamespace

    import reglab.topics.dropout.lecture as lecture
    calls = iter(range(10_000))
    monkeypatch.setattr(lecture, "time", SimpleNamespace(perf_counter=lambda: float(next(calls)) ** 2))
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_embd=16)
    assert step_times(config, batch_size=2, steps=3, warmup=1) == [3.0, 7.0, 11.0]


def test_dropout_cost_alternates_the_settings_and_compares_medians(monkeypatch):
    """With step_times replaced by fixed times, the cost is the ratio of the two medians, and the settings
    alternate round by round (off, on, off, on, ...) so that a change of load falls on both."""
    import reglab.topics.dropout.lecture as lecture
    order, times = [], {0.0: [[1.0, 9.0, 1.0], [2.0, 1.0, 1.0]], 0.2: [[3.0, 3.0, 30.0], [2.5, 3.0, 3.0]]}

    def fake_step_times(config, batch_size, steps, device="cpu", seed=0):
        order.append((config.resid_dropout, seed))
        return times[config.resid_dropout][seed]

    monkeypatch.setattr(lecture, "step_times", fake_step_times)
    cost = dropout_cost(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_embd=16), 0.2, steps=3, rounds=2)
    assert order == [(0.0, 0), (0.2, 0), (0.0, 1), (0.2, 1)]
    assert (cost["step_s_off"], cost["step_s_on"], cost["steps_timed"]) == (1.0, 3.0, 6)
    assert cost["ratio"] == 3.0


def test_show_dropout_prints_measured_and_derived(capsys):
    show_dropout(0.4, n=2000)
    out = capsys.readouterr().out
    assert "p = 0.40" in out and "derived 60.0%" in out


# ---------------------------------------------------------------------------------------------------
# The exact-recall task
# ---------------------------------------------------------------------------------------------------

def test_recall_task_is_deterministic_with_distinct_keys_and_value_only_targets():
    a, b = recall_task(n_facts=50, n_heldout=20, seed=4), recall_task(n_facts=50, n_heldout=20, seed=4)
    assert torch.equal(a.keys["train"], b.keys["train"]) and torch.equal(a.values["val"], b.values["val"])
    keys = torch.cat([a.keys["train"], a.keys["val"]])
    assert len({tuple(k) for k in keys.tolist()}) == 70
    x, y = a.splits["train"]
    assert x.shape == (50, a.block_size) and (y[:, : a.key_len - 1] == IGNORE).all()
    assert torch.equal(y[:, a.key_len - 1:], a.values["train"])


def test_recall_task_refuses_more_facts_than_keys_with_a_message():
    with pytest.raises(ValueError, match=r"vocab_size \*\* key_len = 16"):
        recall_task(n_facts=10, n_heldout=10, key_len=1, vocab_size=16)


class LookupModel(nn.Module):
    """Answers every key from a table, right with probability `right` when sampling (a stand-in model)."""

    def __init__(self, task, right=1.0):
        super().__init__()
        self.table = {tuple(k): v for split in task.keys for k, v in zip(task.keys[split].tolist(), task.values[split])}
        self.right, self.task = right, task

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        answers = torch.stack([self.table[tuple(k)] for k in idx.tolist()])
        if temperature > 0:
            wrong = torch.rand(len(idx), generator=generator) >= self.right
            answers = torch.where(wrong[:, None], (answers + 1) % self.task.vocab_size, answers)
        return torch.cat([idx, answers], dim=1)


def test_recall_accuracy_counts_exact_matches_and_majority_votes():
    task = recall_task(n_facts=400, n_heldout=10, seed=0)
    assert recall_accuracy(LookupModel(task), task) == 1.0
    noisy = LookupModel(task, right=0.7)
    single = recall_accuracy(noisy, task, temperature=1.0, votes=1)
    voted = recall_accuracy(noisy, task, temperature=1.0, votes=9)
    assert abs(single - 0.7) <= Z * math.sqrt(0.21 / 400)
    assert voted > single


def test_trainer_accepts_the_recall_task_and_reports_recall():
    task = recall_task(n_facts=16, n_heldout=8, batch_size=8)
    model = new_model(GPTConfig(vocab_size=16, block_size=task.block_size, n_layer=1, n_embd=16))
    history = train(model, task, TrainConfig(steps=3, warmup_steps=0, eval_every=3, progress=False), on_eval=recall_metrics(task))
    assert 0.0 <= history.final["recall"] <= 1.0 and "heldout_recall" in history.final


# ---------------------------------------------------------------------------------------------------
# The lab's settings and figures
# ---------------------------------------------------------------------------------------------------

def test_every_budget_has_settings_that_make_the_labs_comparisons():
    for budget in ("ci", "cpu", "gpu"):
        s = settings_for(budget)
        assert 0.0 in s.ps and s.site_p in s.ps and s.compare_p in s.ps
    assert SETTINGS["gpu"].n_seeds >= 2


def test_summary_and_sweep_browser_report_best_step_and_gap(capsys):
    from reglab.train import History
    history = History(evals=[{"step": 10, "train_loss": 2.0, "val_loss": 2.2}, {"step": 20, "train_loss": 1.0, "val_loss": 2.5}])
    table = summarize({"p=0": [history]})
    assert table["p=0"]["best_val_loss"] == 2.2 and table["p=0"]["best_step"] == 10
    assert table["p=0"]["final_gap"] == pytest.approx(1.5)
    assert figures(table, ("best_val_loss",)) == {"p=0": {"best_val_loss": 2.2, "per_seed": {"best_val_loss": [2.2]}}}
    with pytest.raises(ValueError, match="was not swept"):
        show_sweep({"p=0": [history]}, 0.5)
    show_sweep({"p=0": [history]}, 0.0)
    assert "final train-val gap 1.500" in capsys.readouterr().out
