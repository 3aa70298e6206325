"""The graded checks refuse PyTorch's implementation and the course's own reference of what a lab asks the
student to write (reglab.checks.refusing: the probe records the shortcuts as data, the judge refuses on it)."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.functional import dropout as aliased_dropout

from reglab.checks import REGISTRY, Shortcut, shortcuts_taken

import reglab.topics.capstone.checks  # noqa: F401  (registers the checks)
import reglab.topics.clipping.checks  # noqa: F401
import reglab.topics.dropout.checks  # noqa: F401
import reglab.topics.label_smoothing.checks  # noqa: F401
import reglab.topics.weight_decay.checks  # noqa: F401
from solution_code import check_message


refusal = check_message


def assert_refused(check_ids, obj, path: str, reason: str):
    for check_id in check_ids:
        message = refusal(check_id, obj)
        assert message is not None, f"{check_id} accepted a submission that uses {path}"
        assert f"uses {path}, which this lab refuses" in message and reason in message, (check_id, message)


# ------------------------------------------------------------------------------------------------ dropout
DROPOUT_CHECKS = [f"dropout.{name}" for name in ("keep_fraction", "scaling", "eval_identity", "backward_mask",
                                                 "moments", "fresh_masks", "any_shape")]


class FunctionalDropout(nn.Module):
    """The submission the issue reports at 17/17: forward returns PyTorch's dropout."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class AliasedDropout(FunctionalDropout):
    def forward(self, x):
        return aliased_dropout(x, self.p, self.training)       # bound at import: seen by its code object


class KernelDropout(FunctionalDropout):
    def forward(self, x):
        return torch.dropout(x, self.p, self.training)        # the C function itself


class WrappedModule(nn.Module):
    def __init__(self, p=0.5):
        super().__init__()
        self.inner = nn.Dropout(p)

    def forward(self, x):
        return self.inner(x)


class SubclassedModule(nn.Dropout):
    pass


def test_dropout_returning_f_dropout_is_refused_with_its_reason():
    assert_refused(DROPOUT_CHECKS, FunctionalDropout, "torch.nn.functional.dropout", "write inverted dropout yourself")


def test_dropout_calling_an_alias_of_f_dropout_is_refused():
    assert_refused(DROPOUT_CHECKS, AliasedDropout, "torch.nn.functional.dropout", "answer key")


def test_dropout_calling_torch_dropout_is_refused():
    assert_refused(DROPOUT_CHECKS, KernelDropout, "torch.dropout", "dropout kernel")


def test_dropout_wrapping_nn_dropout_is_refused():
    assert_refused(DROPOUT_CHECKS, WrappedModule, "torch.nn.Dropout", "nn.Dropout is PyTorch's dropout")


def test_nn_dropout_and_its_subclass_are_refused():
    assert_refused(DROPOUT_CHECKS, nn.Dropout, "torch.nn.Dropout", "answer key")
    assert_refused(DROPOUT_CHECKS, SubclassedModule, "torch.nn.Dropout", "answer key")


# ----------------------------------------------------------------------------------------------- clipping
CLIP_CHECKS = sorted(k for k in REGISTRY if k.startswith("clipping.") and k != "clipping.open_experiment")   # a design, not a clip


def test_the_lectures_clip_grad_norm_fails_the_clipping_checks():
    from reglab.topics.clipping.lecture import clip_grad_norm
    assert_refused(CLIP_CHECKS, clip_grad_norm, "reglab.topics.clipping.lecture.clip_grad_norm",
                   "course's own reference")


def test_a_wrapper_of_the_lectures_clip_grad_norm_is_refused():
    from reglab.topics.clipping import lecture

    def wrapper(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
        return lecture.clip_grad_norm(parameters, max_norm, eps, error_if_nonfinite)
    assert_refused(CLIP_CHECKS, wrapper, "reglab.topics.clipping.lecture.clip_grad_norm", "course's own reference")


def test_a_wrapper_of_torch_clip_grad_norm_is_refused():
    def wrapper(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, error_if_nonfinite=error_if_nonfinite)
    assert_refused(CLIP_CHECKS, wrapper, "torch.nn.utils.clip_grad_norm_", "answer key")


def test_torchs_get_total_norm_is_refused():
    @torch.no_grad()
    def half_written(parameters, max_norm, eps=1e-6, error_if_nonfinite=False):
        params = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], error_if_nonfinite=error_if_nonfinite)
        for p in params:
            p.grad.mul_(torch.clamp(max_norm / (norm + eps), max=1.0))
        return norm
    assert_refused(CLIP_CHECKS, half_written, "torch.nn.utils.get_total_norm", "the global norm")


# ---------------------------------------------------------------------------------------- label smoothing
LS_CHECKS = sorted(k for k in REGISTRY if k.startswith("label_smoothing.") and k != "label_smoothing.open_experiment")   # a design


def test_f_cross_entropy_with_label_smoothing_is_refused():
    def torch_loss(logits, target, alpha, ignore_index=-100, reduction="mean"):
        return F.cross_entropy(logits, target, label_smoothing=alpha, ignore_index=ignore_index, reduction=reduction)
    assert_refused(LS_CHECKS, torch_loss, "torch.nn.functional.cross_entropy", "label_smoothing=")


def test_cross_entropy_loss_module_with_label_smoothing_is_refused():
    def module_loss(logits, target, alpha, ignore_index=-100, reduction="mean"):
        return nn.CrossEntropyLoss(ignore_index=ignore_index, reduction=reduction, label_smoothing=alpha)(logits, target)
    assert_refused(LS_CHECKS, module_loss, "torch.nn.functional.cross_entropy", "answer key")


def test_the_lectures_label_smoothed_loss_is_refused():
    from reglab.topics.label_smoothing.lecture import label_smoothed_cross_entropy
    assert_refused(LS_CHECKS, label_smoothed_cross_entropy,
                   "reglab.topics.label_smoothing.lecture.label_smoothed_cross_entropy", "course's own reference")


def test_plain_cross_entropy_inside_a_written_loss_is_allowed():
    # (1 - alpha) * CE + alpha * mean_k(-log p_k): plain F.cross_entropy (no smoothing) is not the answer key
    def written(logits, target, alpha, ignore_index=-100, reduction="mean"):
        nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
        keep = target != ignore_index
        uniform = torch.where(keep, -F.log_softmax(logits, dim=1).mean(1), torch.zeros_like(nll))
        loss = (1 - alpha) * nll + alpha * uniform
        if reduction == "none":
            return loss
        return loss.sum() if reduction == "sum" else loss.sum() / keep.sum()
    assert {k: refusal(k, written) for k in LS_CHECKS} == {k: None for k in LS_CHECKS}


# ------------------------------------------------------------------------------------------- weight decay
WD_CHECKS = ["weight_decay.adamw", "weight_decay.adam_l2", "weight_decay.adamw_missing_grads"]


class WrapsTorchAdamW(torch.optim.Optimizer):
    """Composition, not inheritance: an optimizer that steps a torch.optim.AdamW it holds."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.inner = torch.optim.AdamW(self.param_groups)

    def step(self, closure=None):
        return self.inner.step(closure)


def test_torch_adamw_subclass_is_refused():
    class Mine(torch.optim.AdamW):
        pass
    assert_refused(WD_CHECKS, Mine, "torch.optim.AdamW", "write the update yourself")


def test_an_optimizer_that_steps_torch_adamw_is_refused():
    assert_refused(WD_CHECKS, WrapsTorchAdamW, "torch.optim.AdamW", "write the update yourself")


# ----------------------------------------------------------------------------------------------- capstone
LORA_CHECKS = ["capstone.zero_init", "capstone.scale", "capstone.merge", "capstone.lora_dropout",
               "capstone.adapter_grads", "capstone.merge_no_bias"]


def test_the_course_lora_reference_and_its_subclass_are_refused():
    from reglab.topics.capstone.lora import LoRALinear

    class Mine(LoRALinear):
        pass
    for obj in (LoRALinear, Mine):
        assert_refused(LORA_CHECKS, obj, "reglab.topics.capstone.lora.LoRALinear", "course's own reference")


def test_the_course_add_lora_is_refused():
    from reglab.topics.capstone.lora import add_lora
    assert_refused(["capstone.add_lora"], add_lora, "reglab.topics.capstone.lora.add_lora", "course's own reference")


def test_finetune_step_may_use_the_course_pieces():
    from reglab.topics.capstone.checks import reference_finetune_step
    assert refusal("capstone.finetune_step", reference_finetune_step) is None


# --------------------------------------------------------------------------------------------- mechanism
def test_only_calls_made_while_the_probe_runs_are_recorded_and_the_profiler_is_restored():
    shortcuts = (Shortcut("torch.nn.functional.dropout", "test"),)
    before = sys.getprofile()
    F.dropout(torch.ones(3), 0.5)                                       # outside: not recorded
    result, taken = shortcuts_taken(None, shortcuts, lambda: 7)
    assert (result, taken) == (7, [])
    _, taken = shortcuts_taken(None, shortcuts, lambda: F.dropout(torch.ones(3), 0.5))
    assert taken == ["torch.nn.functional.dropout"]
    assert sys.getprofile() is before


def test_a_function_merely_decorated_like_a_shortcut_is_not_mistaken_for_it():
    # torch.no_grad wraps functions with a shared generic wrapper; only the shortcut's own code counts
    @torch.no_grad()
    def mine(x):
        return x * 2
    shortcuts = (Shortcut("torch.optim.Adam", "test"),)
    assert shortcuts_taken(None, shortcuts, lambda: mine(torch.ones(2)))[1] == []
