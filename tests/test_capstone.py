"""The capstone's package code: LoRA against a direct computation, merging, the checks (the reference passes,
each classic mistake fails exactly the checks it should, with a message naming it), the recipes and the
claims ledger."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reglab.topics.capstone import lab as capstone
from reglab.checks import REGISTRY, CheckFailed, get
from reglab.topics.capstone import checks as capstone_checks
from reglab.topics.claims import BASES, CLAIMS, VERDICTS, by_id, notebook_numbers
from reglab.topics.capstone.lora import LoRALinear, add_lora, merge_lora, trainable_parameters
from reglab.model import DROPOUT_SITES, GPT, GPTConfig
from reglab.topics.capstone.recipes import FINETUNING, PRETRAINING, PUBLISHED_DECAY, decay_per_step
from reglab.train import TrainConfig
from solution_code import solution_cells

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


def layer_and_input(r=4, alpha=8.0, p=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(12, 20, bias=bias)
    layer = LoRALinear(base, r=r, alpha=alpha, lora_dropout=p)
    with torch.no_grad():                         # a non-zero B so the adapter path shows
        layer.lora_B.normal_(0, 0.5)
    return layer, torch.randn(7, 12)


# ---------------------------------------------------------------------------- LoRA vs a direct computation

def test_lora_output_is_w_x_plus_scaled_b_a_x():
    layer, x = layer_and_input(r=4, alpha=8.0)
    layer.eval()
    W, b, A, B = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + (8.0 / 4) * (x @ A.T @ B.T)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_lora_dropout_masks_the_adapter_input_like_torch_dropout():
    layer, x = layer_and_input(p=0.3)
    layer.train()
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)                        # the same mask from PyTorch's own dropout
    dropped = F.dropout(x, 0.3, training=True)
    expected = layer.base(x) + layer.scaling * F.linear(F.linear(dropped, layer.lora_A), layer.lora_B)
    assert torch.allclose(out, expected, atol=1e-6)


def test_lora_is_deterministic_in_eval_mode():
    layer, x = layer_and_input(p=0.5)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_b_starts_at_zero_so_the_wrapped_layer_equals_the_base():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    layer = LoRALinear(base, r=4, alpha=8.0)
    x = torch.randn(3, 12)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(layer(x), base(x))


def test_only_the_adapters_are_trainable():
    layer, _ = layer_and_input()
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["lora_A", "lora_B"]
    assert trainable_parameters(layer) == 4 * (12 + 20)


def test_bad_arguments_are_refused_with_the_value():
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\), got 1.0"):
        LoRALinear(nn.Linear(4, 4), lora_dropout=1.0)
    with pytest.raises(TypeError, match="wraps an nn.Linear, got Conv1d"):
        LoRALinear(nn.Conv1d(4, 4, 1))


# ---------------------------------------------------------------------------- merging

@pytest.mark.parametrize("bias", [True, False])
def test_merged_layer_gives_the_adapter_outputs_in_eval_mode(bias):
    layer, x = layer_and_input(p=0.2, bias=bias)
    layer.eval()
    merged = layer.merge()
    assert isinstance(merged, nn.Linear)
    assert torch.allclose(merged.weight, layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A)
    assert torch.allclose(merged(x), layer(x), atol=1e-5)
    assert (merged.bias is None) == (not bias)


def test_merge_leaves_the_adapter_layer_unchanged():
    layer, x = layer_and_input()
    layer.eval()
    before = layer(x)
    layer.merge()
    assert torch.equal(layer(x), before)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**capstone_checks.TINY, **overrides}))


def test_add_lora_wraps_every_attention_projection_and_freezes_the_rest():
    model = tiny_gpt()
    x = torch.randint(11, (2, 8))
    model.eval()
    before = model(x)
    add_lora(model, r=2, alpha=4.0)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert trainable_parameters(model) == 2 * (2 * (8 + 24) + 2 * (8 + 8))
    assert torch.equal(model(x), before)


def test_merge_lora_gives_a_plain_model_with_the_same_logits():
    model = add_lora(tiny_gpt(), r=2, alpha=4.0, lora_dropout=0.1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.normal_(0, 0.3)
    x = torch.randint(11, (2, 8))
    merged = merge_lora(model)
    model.eval(), merged.eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert torch.allclose(merged(x), model(x), atol=1e-5)


def test_add_lora_refuses_unknown_targets():
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['up'\]"):
        add_lora(tiny_gpt(), targets=("qkv", "up"))


# ---------------------------------------------------------------------------- checks: the reference passes

LAYER_CHECKS = ["capstone.zero_init", "capstone.scale", "capstone.merge", "capstone.lora_dropout",
                "capstone.adapter_grads", "capstone.merge_no_bias"]
STEP_CHECKS = ["capstone.finetune_step", "capstone.step_no_clip"]


def run_check(check_id, obj):
    """None if the check passes, else its message; the data makes a JSON round trip, as in the grader."""
    spec = get(check_id)
    try:
        data = json.loads(json.dumps(spec.probe(obj)))
        spec.judge(data)
    except CheckFailed as err:
        return str(err)
    return None


def failures(check_ids, obj) -> dict:
    return {cid: msg for cid in check_ids if (msg := run_check(cid, obj)) is not None}


def test_every_capstone_check_is_registered_with_points():
    ids = {cid for cid in REGISTRY if cid.startswith("capstone.")}
    assert ids == {*LAYER_CHECKS, *STEP_CHECKS, "capstone.add_lora", "capstone.open_experiment"}
    assert all(REGISTRY[cid].points > 0 for cid in ids)


# LoRALinear and add_lora as the solution notebook defines them (the checks refuse the course's reference)


SOLUTION = solution_cells("06_capstone_lab.ipynb", "lora-linear", "add-lora")
SolutionLoRA, solution_add_lora = SOLUTION["LoRALinear"], SOLUTION["add_lora"]


def test_reference_passes_every_check():
    assert failures(LAYER_CHECKS, SolutionLoRA) == {}
    assert failures(["capstone.add_lora"], solution_add_lora) == {}
    assert failures(STEP_CHECKS, capstone_checks.reference_finetune_step) == {}


def test_probe_data_is_small_json():
    for cid, obj in [*((c, SolutionLoRA) for c in LAYER_CHECKS), ("capstone.add_lora", solution_add_lora),
                     *((c, capstone_checks.reference_finetune_step) for c in STEP_CHECKS)]:
        assert len(json.dumps(get(cid).probe(obj))) < 1_000_000, cid


# ---------------------------------------------------------------------------- classic mistakes of the layer

class RandomB(SolutionLoRA):
    def __init__(self, base, r=8, alpha=16.0, lora_dropout=0.0):
        super().__init__(base, r, alpha, lora_dropout)
        nn.init.normal_(self.lora_B, std=0.02)


class BothZero(SolutionLoRA):
    def __init__(self, base, r=8, alpha=16.0, lora_dropout=0.0):
        super().__init__(base, r, alpha, lora_dropout)
        nn.init.zeros_(self.lora_A)


def with_scale(rule):
    class Scaled(SolutionLoRA):
        def __init__(self, base, r=8, alpha=16.0, lora_dropout=0.0):
            super().__init__(base, r, alpha, lora_dropout)
            self.scaling = rule(alpha, r)
    return Scaled


class MergeWithoutScale(SolutionLoRA):
    @torch.no_grad()
    def merge(self):
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        merged.weight.copy_(self.base.weight + self.lora_B @ self.lora_A)
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged


class MergeInPlace(SolutionLoRA):
    @torch.no_grad()
    def merge(self):
        self.base.weight += self.scaling * self.lora_B @ self.lora_A
        return self.base


class DropoutOnOutput(SolutionLoRA):
    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_dropout(F.linear(F.linear(x, self.lora_A), self.lora_B))


class DropoutOnBaseToo(SolutionLoRA):
    def forward(self, x):
        x = self.lora_dropout(x)
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


class DropoutAlsoInEval(SolutionLoRA):
    def forward(self, x):
        dropped = F.dropout(x, self.lora_dropout.p, training=True)
        return self.base(x) + self.scaling * F.linear(F.linear(dropped, self.lora_A), self.lora_B)


class KeepProbability(SolutionLoRA):
    def __init__(self, base, r=8, alpha=16.0, lora_dropout=0.0):
        super().__init__(base, r, alpha, lora_dropout)
        self.lora_dropout = nn.Dropout(1 - lora_dropout) if lora_dropout > 0 else nn.Identity()


class NoRescale(SolutionLoRA):
    def forward(self, x):
        if self.training and self.lora_dropout.p > 0:
            x_adapter = x * (torch.rand_like(x) >= self.lora_dropout.p)
        else:
            x_adapter = x
        return self.base(x) + self.scaling * F.linear(F.linear(x_adapter, self.lora_A), self.lora_B)


class BaseNotFrozen(SolutionLoRA):
    def __init__(self, base, r=8, alpha=16.0, lora_dropout=0.0):
        super().__init__(base, r, alpha, lora_dropout)
        self.base.requires_grad_(True)


LAYER_MISTAKES = [
    (RandomB, {"capstone.zero_init": "must start at exactly zero"}),
    (BothZero, {"capstone.zero_init": "A must start random"}),
    (with_scale(lambda alpha, r: alpha), {"capstone.scale": "by alpha instead of alpha / r"}),
    (with_scale(lambda alpha, r: 1 / r), {"capstone.scale": "1 / r: alpha is missing"}),
    (with_scale(lambda alpha, r: alpha / math.sqrt(r)), {"capstone.scale": "rsLoRA"}),
    (MergeWithoutScale, {"capstone.merge": "forgot the alpha / r scale",
                         "capstone.merge_no_bias": "forgot the alpha / r scale"}),
    (MergeInPlace, {"capstone.merge": "changed the LoRA layer itself",
                    "capstone.merge_no_bias": "changed the LoRA layer itself"}),
    (DropoutOnOutput, {"capstone.lora_dropout": "not on A x or on the adapter's output"}),
    (DropoutOnBaseToo, {"capstone.lora_dropout": "lost the base output too"}),
    (DropoutAlsoInEval, {"capstone.lora_dropout": "still active in eval mode",
                         "capstone.merge": "lora_dropout must be off in eval mode",
                         "capstone.merge_no_bias": "lora_dropout must be off in eval mode"}),
    (KeepProbability, {"capstone.lora_dropout": "used as the keep probability"}),
    (NoRescale, {"capstone.lora_dropout": "not rescaled by 1 / (1 - p)"}),
    (BaseNotFrozen, {"capstone.adapter_grads": "freeze the base layer"}),
]


@pytest.mark.parametrize("mistake, expected", LAYER_MISTAKES, ids=lambda v: getattr(v, "__name__", ""))
def test_each_layer_mistake_fails_exactly_its_checks_with_a_named_message(mistake, expected):
    found = failures(LAYER_CHECKS, mistake)
    assert set(found) == set(expected), found
    for cid, phrase in expected.items():
        assert phrase in found[cid], (cid, found[cid])


# ---------------------------------------------------------------------------- classic mistakes of add_lora

def add_lora_without_freezing(model, r=8, alpha=16.0, lora_dropout=0.0):
    solution_add_lora(model, r, alpha, lora_dropout)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def add_lora_qkv_only(model, r=8, alpha=16.0, lora_dropout=0.0):
    solution_add_lora(model, r, alpha, lora_dropout)
    for block in model.blocks:
        block.attn.proj = block.attn.proj.base
    return model


def add_lora_everywhere(model, r=8, alpha=16.0, lora_dropout=0.0):
    solution_add_lora(model, r, alpha, lora_dropout)
    for block in model.blocks:
        block.mlp.up = SolutionLoRA(block.mlp.up, r, alpha, lora_dropout)
    return model


@pytest.mark.parametrize("mistake, phrase", [
    (add_lora_without_freezing, "still trainable after add_lora"),
    (add_lora_qkv_only, "no trainable adapter at blocks.0.attn.proj"),
    (add_lora_everywhere, "adapters outside the attention projections"),
], ids=lambda v: getattr(v, "__name__", ""))
def test_each_add_lora_mistake_fails_with_a_named_message(mistake, phrase):
    message = run_check("capstone.add_lora", mistake)
    assert message is not None and phrase in message, message


# ---------------------------------------------------------------------------- classic mistakes of the step

def step(**flags):
    def finetune_step(model, optimizer, x, y, grad_clip=1.0, label_smoothing=0.0):
        return capstone_checks.reference_finetune_step(model, optimizer, x, y, grad_clip, label_smoothing, **flags)
    return finetune_step


def step_returning_post_clip_norm(model, optimizer, x, y, grad_clip=1.0, label_smoothing=0.0):
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), label_smoothing=label_smoothing)
    optimizer.zero_grad()
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    optimizer.step()
    return float(loss.detach()), float(norm)


def step_clipping_after_the_update(model, optimizer, x, y, grad_clip=1.0, label_smoothing=0.0):
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), label_smoothing=label_smoothing)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
    return float(loss.detach()), float(norm)


def step_training_everything(model, optimizer, x, y, grad_clip=1.0, label_smoothing=0.0):
    for p in model.parameters():
        p.requires_grad_(True)
    result = capstone_checks.reference_finetune_step(model, optimizer, x, y, grad_clip, label_smoothing)
    with torch.no_grad():                               # a hand-made SGD step on every weight
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad
    return result


@pytest.mark.parametrize("mistake, expected", [
    (step(zero_grad=False), {"capstone.finetune_step": "gradients accumulate",
                             "capstone.step_no_clip": "gradients accumulate"}),
    (step(smoothing=False), {"capstone.finetune_step": "ignores label_smoothing"}),
    (step_returning_post_clip_norm, {"capstone.finetune_step": "post-clip norm"}),
    (step_clipping_after_the_update, {"capstone.finetune_step": "not clipped before optimizer.step()"}),
    (step_training_everything, {"capstone.finetune_step": "the base weights changed",
                                "capstone.step_no_clip": "the base weights changed"}),
], ids=["no-zero-grad", "no-smoothing", "post-clip-norm", "clip-after-step", "trains-base"])
def test_each_step_mistake_fails_exactly_its_checks_with_a_named_message(mistake, expected):
    found = failures(STEP_CHECKS, mistake)
    assert set(found) == set(expected), found
    for cid, phrase in expected.items():
        assert phrase in found[cid], (cid, found[cid])


# ---------------------------------------------------------------------------- recipes

def test_pretraining_recipe_uses_no_dropout_decay_point_one_and_clip_one():
    base = GPTConfig(resid_dropout=0.3, attn_dropout=0.2)
    config = PRETRAINING.gpt_config(base)
    assert all(getattr(config, site) == 0.0 for site in DROPOUT_SITES)
    tc = PRETRAINING.train_config(steps=200, lr=6e-4)
    assert (tc.weight_decay, tc.grad_clip, tc.label_smoothing, tc.optimizer) == (0.1, 1.0, 0.0, "adamw")
    assert tc.schedule == "cosine" and tc.warmup_steps == 10 and math.isclose(tc.min_lr, 6e-5)
    assert tc.betas == (0.9, 0.95)


def test_finetuning_recipe_uses_residual_dropout_small_decay_and_smoothing_for_classification():
    config = FINETUNING.gpt_config(GPTConfig())
    assert config.resid_dropout == 0.1 and config.attn_dropout == config.embd_dropout == config.ffn_dropout == 0.0
    assert 0.05 <= FINETUNING.lora_dropout <= 0.1
    lm = FINETUNING.train_config(steps=100, lr=FINETUNING.lr_ratio * 6e-4)
    classifier = FINETUNING.train_config(steps=100, lr=6e-5, task_kind="classification")
    assert (lm.weight_decay, lm.grad_clip, lm.label_smoothing) == (0.01, 1.0, 0.0)
    assert classifier.label_smoothing == 0.1
    assert FINETUNING.lr_ratio < 1 and lm.lr < 6e-4


def test_every_recipe_source_names_a_section_or_a_file():
    for recipe in (PRETRAINING, FINETUNING):
        assert recipe.sources, recipe.name
        for field_name, source in recipe.sources.items():
            assert hasattr(recipe, field_name), field_name
            assert "§" in source or "App." in source or ".py" in source or "Trainer" in source, source


def test_recipe_overrides_and_bad_task_kind():
    assert PRETRAINING.train_config(50, 1e-3, eval_every=7, seed=3).eval_every == 7
    with pytest.raises(ValueError, match="task_kind must be 'lm' or 'classification', got 'seq2seq'"):
        PRETRAINING.train_config(50, 1e-3, task_kind="seq2seq")


def test_decay_per_step_matches_the_closed_form_and_torchs_adamw(adamw_retained):
    config = TrainConfig(steps=1000, lr=6e-4, min_lr=6e-5, warmup_steps=0, weight_decay=0.1)
    summary = decay_per_step(config)
    assert math.isclose(summary.peak_per_step, 6e-5)
    assert math.isclose((1 - 6e-5) ** summary.half_life_steps, 0.5)       # halves under AdamW's factor
    # cosine from lr to min_lr over 999 intervals: sum = T (lr + min_lr) / 2 exactly (the cosine terms cancel)
    assert math.isclose(summary.integrated, 0.1 * (6e-4 + 6e-5) / 2 * 1000, rel_tol=1e-12)
    assert math.isclose(summary.retained, adamw_retained(config)[-1], rel_tol=1e-9)


def test_published_decay_table_has_a_source_per_row():
    assert all(lr > 0 and wd >= 0 and "20" in source for lr, wd, source in PUBLISHED_DECAY.values())


# ---------------------------------------------------------------------------- ledger

def test_ledger_entries_are_complete_and_ids_unique():
    table = by_id()
    assert len(table) == len(CLAIMS)
    for claim in CLAIMS:
        assert claim.verdict in VERDICTS and claim.basis in BASES
        assert claim.source.strip() and claim.where.strip() and claim.source_says.strip()
        assert notebook_numbers(claim), f"{claim.id}: 'where' names no course notebook"


@pytest.mark.parametrize("claim_id", [
    "palm-adamw", "palm-dropout", "bert-label-smoothing", "gpt2-dropout", "gpt3-dropout", "dropout-wasted-compute",
    "adamw-imagenet-figure", "peft-lora-dropout-default", "lora-paper-dropout", "llama-dropout", "gpt3-clip",
    "llama2-clip", "gpt3-adamw", "llama2-adamw", "chinchilla-adamw", "transformer-label-smoothing",
    "muller-calibration"])
def test_ledger_holds_every_correction_the_issues_name(claim_id):
    assert claim_id in by_id()


def test_ledger_verdicts_on_the_named_corrections():
    table = by_id()
    assert table["palm-adamw"].verdict == "wrong" and "lr^2" in table["palm-adamw"].source_says
    assert table["gpt2-dropout"].verdict == table["gpt3-dropout"].verdict == "unsupported"
    assert table["peft-lora-dropout-default"].verdict == "wrong" and "0.0" in table["peft-lora-dropout-default"].source_says
    assert table["dropout-wasted-compute"].basis == "measured by the course"


def test_bad_ledger_entries_are_refused():
    from reglab.topics.claims import Claim
    with pytest.raises(ValueError, match="verdict must be one of"):
        Claim("x", "dropout", "c", "s", "probably", "src §1", "01: x")
    with pytest.raises(ValueError, match="has an empty source"):
        Claim("x", "dropout", "c", "s", "correct", " ", "01: x")


# ---------------------------------------------------------------------------- the fine-tuning text

def test_finetuning_text_is_deterministic_and_inside_the_vocabulary():
    vocab = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,()\n")))
    first = capstone.finetune_corpus(capstone.STDLIB_DOCSTRINGS, vocab, 3000)
    second = capstone.finetune_corpus(capstone.STDLIB_DOCSTRINGS, vocab, 3000)
    assert first.text == second.text and len(first.text) == 3000
    assert set(first.text) <= set(vocab) and first.chars == vocab


def test_finetuning_text_that_is_too_short_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("hello world. " * 100, encoding="utf-8")
    with pytest.raises(ValueError, match="has 1300 usable characters; this budget needs 5000"):
        capstone.finetune_corpus(path, "".join(sorted(set("hello world. "))), 5000)


def test_verdicts_compare_against_the_seed_noise():
    assert capstone.verdict(-0.05, 0.01) == "helped"
    assert capstone.verdict(0.05, 0.01) == "hurt"
    assert capstone.verdict(0.005, 0.01) == "no clear effect"



def test_effects_judge_the_val_loss_and_forgetting_against_the_seed_spread():
    settings = capstone.settings_for("ci")
    row = dict(epochs=1.0, params_per_token=1.0, val_loss_spread=0.0)
    pre = {"dropout 0": {**row, "val_loss": 2.0}, "dropout 0.1": {**row, "val_loss": 2.1}}
    fine_row = dict(epochs=50.0, params_per_token=10.0, final_val_loss_spread=0.01, forgetting_spread=0.01)
    fine = {label: {**fine_row, "final_val_loss": 2.5, "forgetting": 0.3} for label in capstone.finetune_labels(settings)}
    fine["full + dropout"].update(final_val_loss=2.45, forgetting=0.305)
    rows = {row["run"]: row for row in capstone.effects(settings, pre, fine)}
    assert rows["dropout 0.1"]["val_verdict"] == "hurt" and "forgetting_verdict" not in rows["dropout 0.1"]
    assert rows["full + dropout"]["val_verdict"] == "helped"
    assert rows["full + dropout"]["forgetting_verdict"] == "no clear effect"
    points = {p["label"]: p for p in capstone.regime_points(settings, pre, fine)}
    assert points["full"]["verdict"] == "baseline" and points["dropout 0.1 (pretrain)"]["verdict"] == "hurt"
