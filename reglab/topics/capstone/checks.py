"""Checks for the capstone lab: the student's LoRA layer (`LoRALinear`), the function that adds adapters to
the course model (`add_lora`), and one fine-tuning step (`finetune_step`).

The answer key is PyTorch: each judge rebuilds the expected values from the probe's data with
F.linear, autograd, torch.optim.AdamW and torch.nn.utils.clip_grad_norm_, in float64 where it can.
The LoRA layer's interface (the reference is reglab.topics.capstone.lora.LoRALinear): LoRALinear(base, r, alpha,
lora_dropout) with attributes `base` (the frozen nn.Linear), `lora_A` (r, in), `lora_B` (out, r),
`forward(x)` and `merge() -> nn.Linear`. The open experiment's check ("capstone.open_experiment", from
reglab.experiments) only confirms that the student's open_design(settings) ran within its budget of optimizer
steps: what it finds has no fixed answer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from reglab.checks import Check, CheckFailed, Shortcut, add, refuse
from reglab.experiments import open_check

ATOL = 1e-5      # float32 outputs of magnitude ~1 against a float64 recomputation


# ---------------------------------------------------------------------------- helpers (probe side)

def _base_layer(in_features: int, out_features: int, seed: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _adapter(layer):
    """(base, lora_A, lora_B) of a student's layer, or a CheckFailed naming the interface."""
    try:
        return layer.base, layer.lora_A, layer.lora_B
    except AttributeError as err:
        raise CheckFailed(f"LoRALinear needs the attributes base (the wrapped nn.Linear), lora_A (r, in) and "
                          f"lora_B (out, r): {err}") from None


def _set_adapter(layer, seed: int, scale: float = 0.5):
    """Give lora_A and lora_B known random values (B is zero at init, which would hide the adapter path)."""
    _, lora_a, lora_b = _adapter(layer)
    with torch.no_grad():
        lora_a.copy_(_randn(*lora_a.shape, seed=seed, scale=scale))
        lora_b.copy_(_randn(*lora_b.shape, seed=seed + 1, scale=scale))


def _make(cls, base, r, alpha, lora_dropout):
    return cls(base, r=r, alpha=alpha, lora_dropout=lora_dropout)


def _lists(**tensors) -> dict:
    return {name: (None if t is None else t.detach().double().tolist()) for name, t in tensors.items()}


# ---------------------------------------------------------------------------- helpers (judge side)

def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _close(a, b, atol: float = ATOL, rtol: float = 1e-4) -> bool:
    a, b = _t(a) if not isinstance(a, torch.Tensor) else a, _t(b) if not isinstance(b, torch.Tensor) else b
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=atol, rtol=rtol))


def _base_out(data) -> torch.Tensor:
    bias = None if data.get("b") is None else _t(data["b"])
    return F.linear(_t(data["x"]), _t(data["W"]), bias)


def _adapter_out(data, x=None) -> torch.Tensor:
    """B A x, unscaled: (N, out)."""
    x = _t(data["x"]) if x is None else x
    return F.linear(F.linear(x, _t(data["A"])), _t(data["B"]))


def _fitted_scale(out, data) -> float:
    """The scale s that best explains out = W x + b + s B A x (least squares). The checks other than
    capstone.scale use it, so that a wrong scale fails that check alone."""
    update = _adapter_out(data)
    residual = _t(out) - _base_out(data)
    return float((residual * update).sum() / (update * update).sum())


# ---------------------------------------------------------------------------- LoRALinear: initialization

def probe_zero_init(cls) -> dict:
    base = _base_layer(16, 24, seed=0)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = _make(cls, base, r=4, alpha=8.0, lora_dropout=0.0)
    _, lora_a, lora_b = _adapter(layer)
    x = _randn(5, 16, seed=1)
    layer.eval()
    out_eval = layer(x)
    layer.train()
    out_train = layer(x)
    return {"A_shape": list(lora_a.shape), "B_shape": list(lora_b.shape),
            **_lists(W=W, b=b, x=x, A=lora_a, B=lora_b, out_eval=out_eval, out_train=out_train)}


def judge_zero_init(data) -> None:
    if data["A_shape"] != [4, 16] or data["B_shape"] != [24, 4]:
        raise CheckFailed(f"with r=4 around nn.Linear(16, 24), lora_A must be (r, in) = (4, 16) and lora_B "
                          f"(out, r) = (24, 4); got {data['A_shape']} and {data['B_shape']}")
    A, B = _t(data["A"]), _t(data["B"])
    if not torch.isfinite(A).all():
        raise CheckFailed("lora_A holds NaN or inf at initialization")
    if B.abs().max() != 0:
        raise CheckFailed("lora_B must start at exactly zero (Hu et al. 2021, §4.1): then B A = 0 and the "
                          "wrapped layer starts as the pretrained one; a random B changes the model before "
                          "any training")
    if A.abs().max() == 0:
        raise CheckFailed("lora_A must start random, not zero: with A = 0 and B = 0 both gradients are zero "
                          "and the adapter never trains")
    expected = _base_out(data)
    for mode in ("eval", "train"):
        if not _close(data[f"out_{mode}"], expected):
            raise CheckFailed(f"at initialization the wrapped layer must give exactly the base layer's output "
                              f"(in {mode} mode): W x + b, since B = 0")


add(Check("capstone.zero_init", 2, probe_zero_init, judge_zero_init,
          "A random, B zero: the wrapped layer starts as the base layer"))


# ---------------------------------------------------------------------------- LoRALinear: scale alpha / r

SCALE_CASES = ((4, 8.0), (2, 3.0))      # alpha / r = 2 and 1.5: every wrong scale differs from both


def probe_scale(cls) -> dict:
    cases = []
    for index, (r, alpha) in enumerate(SCALE_CASES):
        base = _base_layer(16, 24, seed=10 + index)
        W, b = base.weight.detach().clone(), base.bias.detach().clone()
        layer = _make(cls, base, r=r, alpha=alpha, lora_dropout=0.0)
        _set_adapter(layer, seed=20 + index)
        _, lora_a, lora_b = _adapter(layer)
        x = _randn(6, 16, seed=30 + index)
        layer.eval()
        cases.append({"r": r, "alpha": alpha, **_lists(W=W, b=b, x=x, A=lora_a, B=lora_b, out=layer(x))})
    return {"cases": cases}


def judge_scale(data) -> None:
    for case in data["cases"]:
        r, alpha = case["r"], case["alpha"]
        update = _adapter_out(case)                                  # B A x
        # least-squares scale of what the layer added to W x + b: <residual, BAx> / ||BAx||^2
        fitted = _fitted_scale(case["out"], case)
        wrong = {alpha: "by alpha instead of alpha / r", 1.0 / r: "by 1 / r: alpha is missing",
                 1.0: "not at all: multiply B A x by alpha / r", alpha / math.sqrt(r):
                 "by alpha / sqrt(r) (that is rsLoRA); this lab uses LoRA's alpha / r",
                 r / alpha: "by r / alpha: the ratio is upside down"}
        if not math.isclose(fitted, alpha / r, rel_tol=1e-3):
            for scale, how in wrong.items():
                if math.isclose(fitted, scale, rel_tol=1e-3):
                    raise CheckFailed(f"the update is scaled {how} (r={r}, alpha={alpha:g}: expected "
                                      f"{alpha / r:g}, measured {fitted:.4g})")
            raise CheckFailed(f"the adapter's output is not (alpha / r) * B A x (r={r}, alpha={alpha:g}): "
                              f"best-fitting scale {fitted:.4g}; compute x -> A -> B, i.e. x A^T B^T")
        if not _close(case["out"], _base_out(case) + alpha / r * update):
            raise CheckFailed("the output is not W x + b + (alpha / r) B A x: check the order of A and B "
                              "(lora_A is (r, in) and acts first)")


add(Check("capstone.scale", 2, probe_scale, judge_scale, "the update is (alpha / r) * B A x"))


# ---------------------------------------------------------------------------- LoRALinear: merge

def _probe_merge(cls, bias: bool) -> dict:
    base = _base_layer(16, 24, seed=40, bias=bias)
    W = base.weight.detach().clone()
    b = base.bias.detach().clone() if bias else None
    layer = _make(cls, base, r=4, alpha=8.0, lora_dropout=0.1)
    _set_adapter(layer, seed=41)
    layer_base, lora_a, lora_b = _adapter(layer)
    x = _randn(7, 16, seed=42)
    layer.eval()
    out_before, out_again = layer(x), layer(x)
    merged = layer.merge()
    if not isinstance(merged, nn.Linear):
        raise CheckFailed(f"merge() must return an nn.Linear, got {type(merged).__name__}")
    merged.eval()
    out_merged = merged(x)
    out_after = layer(x)
    return {"has_bias": merged.bias is not None,
            **_lists(W=W, b=b, x=x, A=lora_a, B=lora_b, out_before=out_before, out_again=out_again,
                     out_merged=out_merged,
                     out_after=out_after, merged_W=merged.weight, merged_b=merged.bias,
                     base_W_after=layer_base.weight)}


def probe_merge(cls) -> dict:
    return _probe_merge(cls, bias=True)


def probe_merge_no_bias(cls) -> dict:
    return _probe_merge(cls, bias=False)


def judge_merge(data) -> None:
    W = _t(data["W"])
    BA = _t(data["B"]) @ _t(data["A"])
    merged_W = _t(data["merged_W"])
    if not _close(data["out_again"], data["out_before"]):
        raise CheckFailed("two calls in eval mode gave different outputs: lora_dropout must be off in eval "
                          "mode (nn.Dropout follows model.eval()), or no merged matrix can reproduce the layer")
    # the scale the adapter path uses (capstone.scale checks that it is alpha / r)
    scale = _fitted_scale(data["out_before"], data)
    if not _close(data["out_before"], _base_out(data) + scale * _adapter_out(data)):
        raise CheckFailed("in eval mode the layer does not compute W x + b + s B A x for any scale s "
                          "(see capstone.scale)")
    if not _close(data["base_W_after"], W) or not _close(data["out_after"], data["out_before"]):
        raise CheckFailed("merge() changed the LoRA layer itself: it must return a new nn.Linear and leave "
                          "base and the adapters untouched (merging into base.weight in place makes the "
                          "layer add B A twice)")
    if merged_W.shape != W.shape:
        raise CheckFailed(f"the merged weight must have the base's shape {list(W.shape)}, got {list(merged_W.shape)}")
    if not _close(merged_W, W + scale * BA):
        if _close(merged_W, W + BA):
            raise CheckFailed("merge() forgot the alpha / r scale: the merged weight is W + B A, while the "
                              f"adapter path adds {scale:g} * B A x")
        if _close(merged_W, W):
            raise CheckFailed("merge() returned the base weight: the merged weight must be W + (alpha / r) B A")
        raise CheckFailed(f"the merged weight is not W + (alpha / r) B A (the adapter path uses the scale {scale:g})")
    if data["b"] is None:
        if data["has_bias"]:
            raise CheckFailed("the base layer has no bias, but the merged layer has one")
    elif not data["has_bias"] or not _close(data["merged_b"], data["b"]):
        raise CheckFailed("the merged layer must keep the base layer's bias unchanged")
    if not _close(data["out_merged"], data["out_before"], atol=1e-4):
        raise CheckFailed("the merged layer's outputs differ from the adapter path's outputs in eval mode")


add(Check("capstone.merge", 2, probe_merge, judge_merge,
          "merge() gives W + (alpha / r) B A, the same outputs as the adapter path"))
add(Check("capstone.merge_no_bias", 1, probe_merge_no_bias, judge_merge,
          "merge() works for a base layer without bias"))


# ---------------------------------------------------------------------------- LoRALinear: lora_dropout

DROPOUT_P, DROPOUT_ROWS, DROPOUT_IN = 0.25, 800, 8


def probe_lora_dropout(cls) -> dict:
    base = _base_layer(DROPOUT_IN, 6, seed=50)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = _make(cls, base, r=3, alpha=6.0, lora_dropout=DROPOUT_P)
    _set_adapter(layer, seed=51, scale=1.0)
    _, lora_a, lora_b = _adapter(layer)
    # Row i is the one-hot vector e_(i mod in): input dropout then keeps or drops the whole adapter row.
    x = torch.eye(DROPOUT_IN).repeat(DROPOUT_ROWS // DROPOUT_IN, 1)
    torch.manual_seed(52)
    layer.train()
    out_train = layer(x)
    layer.eval()
    out_eval, out_eval_again = layer(x), layer(x)
    return _lists(W=W, b=b, x=x, A=lora_a, B=lora_b, out_train=out_train, out_eval=out_eval,
                  out_eval_again=out_eval_again)


def judge_lora_dropout(data) -> None:
    p = DROPOUT_P
    base = _base_out(data)
    if not _close(data["out_eval"], data["out_eval_again"]):
        raise CheckFailed("two calls in eval mode gave different outputs: dropout is still active in eval mode "
                          "(use nn.Dropout, which follows train()/eval())")
    scale = _fitted_scale(data["out_eval"], data)               # capstone.scale checks it is alpha / r
    full = scale * _adapter_out(data)                          # (N, out): the adapter with nothing dropped
    if not _close(data["out_eval"], base + full):
        raise CheckFailed("in eval mode the output must be W x + b + s B A x with nothing dropped")
    delta = _t(data["out_train"]) - base                       # what the adapter added, per row
    tol = 1e-4 * (1 + full.abs().max())
    if bool(((_t(data["out_train"]) - _t(data["b"])).abs() <= tol).all(dim=1).any()):
        raise CheckFailed("rows whose input was dropped lost the base output too: lora_dropout must act on "
                          "the adapter's input only, base(x) + s * B A dropout(x); the pretrained path "
                          "never sees dropout")
    # Each row has one non-zero input feature, so input dropout keeps or drops its whole adapter output:
    # delta = c * full with c = 0 (dropped) or one common factor c (kept).
    dropped = (delta.abs() <= tol).all(dim=1)
    factor = (delta * full).sum(dim=1) / (full * full).sum(dim=1)            # per row
    whole_row = ((delta - factor[:, None] * full).abs() <= tol).all(dim=1)
    if not bool(whole_row.all()):
        raise CheckFailed("in train mode each row must get either all of its adapter output (scaled) or none "
                          "of it, since its single input feature is kept or dropped: dropout belongs on the "
                          "adapter's input x, not on A x or on the adapter's output")
    kept = ~dropped
    if not bool(kept.any()):
        raise CheckFailed(f"every input was dropped in train mode with lora_dropout={p}")
    c = float(factor[kept].mean())
    if not bool(((factor[kept] - c).abs() <= 1e-4 * abs(c)).all()):
        raise CheckFailed("kept inputs are rescaled by different factors: inverted dropout scales every kept "
                          "entry by the same 1 / (1 - p)")
    # kept fraction ~ binomial(n, 1 - p) / n; 4 sigma two-sided -> false failure ~6e-5
    n, kept_fraction = len(kept), float(kept.double().mean())
    sigma = math.sqrt(p * (1 - p) / n)
    if abs(kept_fraction - p) <= 4 * sigma and math.isclose(c, 1 / p, rel_tol=1e-3):
        raise CheckFailed(f"about {kept_fraction:.2f} of the inputs kept and scaled by 1/{p}: p was used as the "
                          f"keep probability; PyTorch's p (and lora_dropout) is the probability of dropping")
    if abs(kept_fraction - (1 - p)) > 4 * sigma:
        raise CheckFailed(f"with lora_dropout={p} a fraction {1 - p} of the inputs should be kept, measured "
                          f"{kept_fraction:.3f} over {n} rows")
    if math.isclose(c, 1.0, rel_tol=1e-3):
        raise CheckFailed("kept inputs are not rescaled by 1 / (1 - p): use inverted dropout (nn.Dropout) "
                          "so the adapter's expected output is unchanged")
    if not math.isclose(c, 1 / (1 - p), rel_tol=1e-3):
        raise CheckFailed(f"kept inputs are scaled by {c:.4g}; inverted dropout scales them by "
                          f"1 / (1 - p) = {1 / (1 - p):.4g}")


add(Check("capstone.lora_dropout", 3, probe_lora_dropout, judge_lora_dropout,
          "dropout on the adapter's input only, only in train mode, rescaled by 1 / (1 - p)"))


# ---------------------------------------------------------------------------- LoRALinear: gradients

def probe_adapter_grads(cls) -> dict:
    base = _base_layer(16, 24, seed=60)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = _make(cls, base, r=4, alpha=8.0, lora_dropout=0.0)
    _set_adapter(layer, seed=61)
    layer_base, lora_a, lora_b = _adapter(layer)
    x, upstream = _randn(5, 16, seed=62), _randn(5, 24, seed=63)
    layer.train()
    out = layer(x)
    (out * upstream).sum().backward()
    return {"trainable": sorted(name for name, p in layer.named_parameters() if p.requires_grad),
            "base_has_grad": any(p.grad is not None for p in layer_base.parameters()),
            **_lists(W=W, b=b, x=x, upstream=upstream, A=lora_a, B=lora_b, out=out, grad_A=lora_a.grad,
                     grad_B=lora_b.grad)}


def judge_adapter_grads(data) -> None:
    if data["trainable"] != ["lora_A", "lora_B"]:
        extra = [n for n in data["trainable"] if n not in ("lora_A", "lora_B")]
        raise CheckFailed(f"only lora_A and lora_B may be trainable; trainable here: {data['trainable']}"
                          + (f" - freeze the base layer ({', '.join(extra)}: requires_grad_(False))" if extra else ""))
    if data["base_has_grad"]:
        raise CheckFailed("a gradient reached the frozen base layer: its parameters need requires_grad=False")
    scale = _fitted_scale(data["out"], data)                   # capstone.scale checks it is alpha / r
    A = _t(data["A"]).requires_grad_()
    B = _t(data["B"]).requires_grad_()
    out = _base_out(data) + scale * F.linear(F.linear(_t(data["x"]), A), B)
    (out * _t(data["upstream"])).sum().backward()
    for name, expected in (("A", A.grad), ("B", B.grad)):
        got = data[f"grad_{name}"]
        if got is None or not _close(got, expected, atol=1e-4):
            raise CheckFailed(f"the gradient of lora_{name} does not match autograd of "
                              f"W x + b + s B A x (s = {scale:.4g}, fitted from the layer's output)")


add(Check("capstone.adapter_grads", 2, probe_adapter_grads, judge_adapter_grads,
          "only lora_A and lora_B get gradients, and they match autograd"))


# ---------------------------------------------------------------------------- add_lora on the course model

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def _tiny_model(seed: int = 0, n_layer: int = 2):
    from reglab.model import GPTConfig
    from reglab.train import new_model
    return new_model(GPTConfig(**{**TINY, "n_layer": n_layer}), seed=seed)


def probe_add_lora(fn) -> dict:
    model = _tiny_model()
    original = sum(p.numel() for p in model.parameters())
    x = torch.randint(TINY["vocab_size"], (3, TINY["block_size"]), generator=torch.Generator().manual_seed(70))
    model.eval()
    before = model(x)
    wrapped = fn(model, r=2, alpha=4.0, lora_dropout=0.1)
    if wrapped is None:
        wrapped = model
    wrapped.eval()
    after = wrapped(x)
    wrapped.train()
    wrapped(x).pow(2).mean().backward()
    return {"params": [[name, list(p.shape), p.requires_grad] for name, p in wrapped.named_parameters()],
            "with_grad": sorted(name for name, p in wrapped.named_parameters() if p.grad is not None),
            "original_count": original, **_lists(before=before, after=after)}


def _expected_adapters(n_layer: int, n_embd: int, r: int) -> dict[str, list[int]]:
    shapes = {}
    for i in range(n_layer):
        for name, out in (("qkv", 3 * n_embd), ("proj", n_embd)):
            shapes[f"blocks.{i}.attn.{name}.lora_A"] = [r, n_embd]
            shapes[f"blocks.{i}.attn.{name}.lora_B"] = [out, r]
    return shapes


def judge_add_lora(data) -> None:
    expected = _expected_adapters(TINY["n_layer"], TINY["n_embd"], r=2)
    trainable = {name: shape for name, shape, grad in data["params"] if grad}
    missing = sorted(set(expected) - set(trainable))
    if missing:
        layers = sorted({name.rsplit(".", 1)[0] for name in missing})
        raise CheckFailed(f"no trainable adapter at {', '.join(layers)}: wrap both attention projections "
                          f"(qkv and proj) in every block")
    extra = sorted(set(trainable) - set(expected))
    if extra:
        adapters = [n for n in extra if "lora_" in n]
        if adapters:
            raise CheckFailed(f"adapters outside the attention projections: {', '.join(adapters)} (this lab "
                              f"wraps only CausalSelfAttention.qkv and .proj)")
        raise CheckFailed(f"still trainable after add_lora: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}"
                          f" - freeze every pretrained parameter (requires_grad_(False)); only lora_A and lora_B train")
    for name, shape in expected.items():
        if trainable[name] != shape:
            raise CheckFailed(f"{name} has shape {trainable[name]}, expected {shape} (lora_A is (r, in), "
                              f"lora_B is (out, r))")
    adapter_count = sum(math.prod(shape) for shape in expected.values())
    total = sum(math.prod(shape) for _, shape, _ in data["params"])
    if total != data["original_count"] + adapter_count:
        raise CheckFailed(f"the wrapped model has {total} parameters; expected the original "
                          f"{data['original_count']} plus {adapter_count} in the adapters (were weights copied "
                          f"or dropped?)")
    if not _close(data["after"], data["before"], atol=1e-5):
        raise CheckFailed("right after add_lora the model must compute exactly what the pretrained model did "
                          "(every B starts at zero)")
    stray = [name for name in data["with_grad"] if name not in expected]
    if stray:
        raise CheckFailed(f"gradients reached frozen parameters: {', '.join(stray[:4])}")


add(Check("capstone.add_lora", 3, probe_add_lora, judge_add_lora,
          "adapters on every qkv and proj, everything else frozen, the model unchanged at start"))


# ---------------------------------------------------------------------------- one fine-tuning step

STEP_LR, STEP_WD, STEP_BETAS, STEP_STEPS = 0.05, 0.01, (0.9, 0.95), 3


def _lora_tiny(seed: int = 0):
    """A 1-layer tiny GPT with reference adapters whose B is non-zero (so every adapter gets a gradient)."""
    from reglab.topics.capstone.lora import LoRALinear, add_lora
    model = add_lora(_tiny_model(seed, n_layer=1), r=2, alpha=4.0, lora_dropout=0.0)
    for index, module in enumerate(m for m in model.modules() if isinstance(m, LoRALinear)):
        with torch.no_grad():
            module.lora_B.copy_(_randn(*module.lora_B.shape, seed=80 + index, scale=0.1))
    return model


def _optimizer(model):
    from reglab.train import param_groups
    return torch.optim.AdamW(param_groups(model, STEP_WD), lr=STEP_LR, betas=STEP_BETAS, eps=1e-8)


def _batches():
    gen = torch.Generator().manual_seed(90)
    return [(torch.randint(TINY["vocab_size"], (4, TINY["block_size"]), generator=gen),
             torch.randint(TINY["vocab_size"], (4, TINY["block_size"]), generator=gen)) for _ in range(STEP_STEPS)]


def reference_finetune_step(model, optimizer, x, y, grad_clip=1.0, label_smoothing=0.0,
                            clip=True, zero_grad=True, smoothing=True):
    """The answer key (and, with a flag off, one classic mistake): loss -> backward -> clip -> step."""
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                           label_smoothing=label_smoothing if smoothing else 0.0)
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if (clip and grad_clip is not None) else float("inf"))
    optimizer.step()
    return float(loss.detach()), float(norm)


def _probe_step(fn, grad_clip, label_smoothing) -> dict:
    model = _lora_tiny()
    state0 = {name: t.detach().clone() for name, t in model.state_dict().items() if not name.endswith("causal_mask")}
    optimizer = _optimizer(model)
    losses, norms = [], []
    for x, y in _batches():
        result = fn(model, optimizer, x, y, grad_clip=grad_clip, label_smoothing=label_smoothing)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise CheckFailed(f"finetune_step must return (loss, pre-clip gradient norm) as two floats, got {result!r}")
        losses.append(float(result[0]))
        norms.append(float(result[1]))
    after = {name: t.detach() for name, t in model.state_dict().items() if name in state0}
    return {"grad_clip": grad_clip, "label_smoothing": label_smoothing, "losses": losses, "norms": norms,
            "before": {k: v.tolist() for k, v in state0.items()}, "after": {k: v.tolist() for k, v in after.items()},
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}


def probe_finetune_step(fn) -> dict:
    return _probe_step(fn, grad_clip=0.02, label_smoothing=0.1)     # below every step's norm: clipping acts


def probe_step_no_clip(fn) -> dict:
    return _probe_step(fn, grad_clip=None, label_smoothing=0.0)


def _replay(data, **variant):
    """Run the reference steps from the probe's starting weights; returns (losses, norms, final state)."""
    model = _lora_tiny()
    model.load_state_dict({k: torch.tensor(v) for k, v in data["before"].items()}, strict=False)
    optimizer = _optimizer(model)
    losses, norms = [], []
    for x, y in _batches():
        loss, norm = reference_finetune_step(model, optimizer, x, y, data["grad_clip"], data["label_smoothing"],
                                             **variant)
        losses.append(loss)
        norms.append(norm)
    return losses, norms, {k: v.detach() for k, v in model.state_dict().items() if k in data["after"]}


def _same_state(data, state) -> bool:
    return all(_close(data["after"][k], state[k].double(), atol=1e-5) for k in data["after"])


def judge_finetune_step(data) -> None:
    frozen = [k for k in data["before"] if k not in data["trainable"]]
    moved = [k for k in frozen if not _close(data["after"][k], data["before"][k], atol=0, rtol=0)]
    if moved:
        raise CheckFailed(f"the base weights changed during fine-tuning ({', '.join(moved[:3])}): only the "
                          f"adapters (lora_A, lora_B) may be updated")
    losses, norms, state = _replay(data)
    if not _close(data["losses"][:1], losses[:1], atol=1e-5):
        plain, _, _ = _replay(data, smoothing=False)
        if data["label_smoothing"] and _close(data["losses"][:1], plain[:1], atol=1e-5):
            raise CheckFailed("the loss ignores label_smoothing: pass it to F.cross_entropy(..., label_smoothing=...)")
        raise CheckFailed(f"the first step's loss {data['losses'][0]:.6f} is not the cross-entropy "
                          f"{losses[0]:.6f} of the model's logits (flatten (B, T, V) logits and (B, T) targets)")
    if not _close(data["norms"][:1], norms[:1], atol=1e-5):
        clip = data["grad_clip"]
        if clip is not None and math.isclose(data["norms"][0], min(norms[0], clip), rel_tol=1e-4):
            raise CheckFailed("the returned norm is the post-clip norm: return the norm before clipping (what "
                              "clip_grad_norm_ returns); it is what tells you how often clipping acts")
        raise CheckFailed(f"the returned gradient norm {data['norms'][0]:.6g} is not the global norm "
                          f"{norms[0]:.6g} of the trainable parameters' gradients")
    if _close(data["losses"], losses, atol=1e-5) and _same_state(data, state):
        return
    if data["grad_clip"] is not None:
        _, _, unclipped = _replay(data, clip=False)
        if _same_state(data, unclipped):
            raise CheckFailed("the gradients were not clipped before optimizer.step() (clip after backward, "
                              "before the step)")
    _, _, accumulated = _replay(data, zero_grad=False)
    if _same_state(data, accumulated):
        raise CheckFailed("gradients accumulate across steps: zero them each step (optimizer.zero_grad())")
    raise CheckFailed("after 3 steps the adapters differ from AdamW's: one step is forward, loss, zero_grad, "
                      "backward, clip, optimizer.step()")


add(Check("capstone.finetune_step", 3, probe_finetune_step, judge_finetune_step,
          "one step matches AdamW with clipping and label smoothing; the base weights do not move"))
add(Check("capstone.step_no_clip", 1, probe_step_no_clip, judge_finetune_step,
          "finetune_step with grad_clip=None and no label smoothing"))


# ---------------------------------------------------------------------------- shortcuts
# The LoRA layer and add_lora are the exercise, so the course's reference (reglab.topics.capstone.lora) is
# refused there. finetune_step assembles course pieces, so it may call clip_grad_norm_ and F.cross_entropy.
refuse("capstone", "zero_init scale merge lora_dropout adapter_grads add_lora merge_no_bias",
       "the exercise is to write the adapter yourself",
       *(Shortcut(f"reglab.topics.capstone.lora.{name}", "it is the course's own reference")
         for name in ("add_lora", "LoRALinear", "merge_lora")))


# ---------------------------------------------------------------------------- the open experiment
# A design the student chose, run within the budget (no fixed answer); not refused above, since its runs
# use the course's own adapters.
OPEN = add(open_check("capstone"))    # reglab.experiments: the design ran within its budget (what it found is yours)
