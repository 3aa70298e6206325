"""Checks of the weight-decay lab: a from-scratch AdamW, Adam with L2, and the decay / no-decay split.

The optimizer probes run the student's class on the parameters of a tiny course model for 120 steps,
feeding gradients from a seeded generator (so the inputs do not depend on the trajectory and the
comparison is not chaotic), with a warmup + cosine learning rate set on every group before each step,
as `reglab.train` does. They return the final parameters. Each judge rebuilds the same inputs in its
own process, runs `torch.optim.AdamW` or `torch.optim.Adam(weight_decay=...)` on them as the answer
key, and on a mismatch replays the usual mistakes (decay inside the moments, decay without the
learning rate, no bias correction, ...) to name the one the data matches.

Tolerance. Every step rounds each float32 parameter once and its update a few times, so an exact
implementation written in another order drifts from PyTorch's by at most about
steps * k * 2**-24 * (|theta| + lr * |update|) with k a small constant: for 120 steps, |theta| <= 1,
|update| <= 1 and k = 8, about 6e-5 * |theta| + 6e-7. We allow |diff| <= 1e-4 * |theta| + 1e-6.
Measured (tests/test_weight_decay.py): PyTorch's for-loop, foreach and fused implementations and a
float64 run all stay within 3% of that allowance, while the subtlest mistake named here (decaying
after the Adam step instead of before) exceeds it 13-fold and every other one at least 19-fold.

The open experiment's check ("weight_decay.open_experiment", from reglab.experiments) only confirms that the
student's open_design(settings) ran within its budget of optimizer steps: what it finds has no fixed answer.
"""
from __future__ import annotations

import functools
import math

import torch

from reglab.checks import Check, CheckFailed, Shortcut, add, refuse
from reglab.experiments import open_check
from reglab.model import GPTConfig

STEPS = 120                                    # >= 100 steps, as the lab promises
RTOL, ATOL = 1e-4, 1e-6                        # derived in the module docstring

# A tiny course model: ~780 parameters, so the probe's JSON stays small (~20 kB).
PROBE_MODEL = GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=8, mlp_ratio=2, n_classes=5)

# Gradient scale per parameter: spans 1e-8 (where epsilon matters) to 10, so groups differ by decades.
GRAD_SCALE = {"tok_emb.weight": 1e-3, "pos_emb.weight": 1e-8, "attn.qkv.weight": 1.0, "attn.proj.weight": 10.0,
              "mlp.up.weight": 1e-2, "mlp.down.weight": 1.0, "head.weight": 0.1}
UNSEEN_TOKENS = 3                              # rows 0..2 of the token embedding never get a gradient

# Hyperparameters of the public scenario and of a hidden one with other values (no hard-coded defaults).
SCENARIOS = {
    "main": dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, warmup=10, schedule="cosine"),
    "other": dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1.0, warmup=0, schedule="constant"),
}


# ------------------------------------------------------------------------------------------ inputs
def _scale(name: str) -> float:
    for key, scale in GRAD_SCALE.items():
        if name.endswith(key):
            return scale
    return 0.3                                 # biases and norm gains


def make_params(dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The probe model's initial parameters by name (fixed seed), as fresh leaf tensors."""
    from reglab.train import new_model
    model = new_model(PROBE_MODEL, seed=0)
    return {name: p.detach().to(dtype).clone().requires_grad_(True) for name, p in model.named_parameters()}


@functools.lru_cache(maxsize=None)
def _gradients() -> tuple[dict[str, torch.Tensor], ...]:
    """Every step's gradients in float64, from one seeded generator: seeded noise plus a steady pull,
    times the parameter's scale. Cached; callers get copies."""
    shapes = {name: p.shape for name, p in make_params().items()}
    gen = torch.Generator().manual_seed(1234)
    steps = []
    for _ in range(STEPS):
        grads = {}
        for name, shape in shapes.items():
            g = (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5) * _scale(name)
            if name == "tok_emb.weight":
                g[:UNSEEN_TOKENS] = 0.0        # tokens the batch never shows: a zero gradient
            grads[name] = g
        steps.append(grads)
    return tuple(steps)


def gradient(name: str, step: int, dtype=torch.float32) -> torch.Tensor:
    """The gradient fed to parameter `name` at `step` (a fresh tensor: an optimizer may write to it)."""
    return _gradients()[step][name].to(dtype, copy=True)


def lr_schedule(scenario: dict) -> list[float]:
    """The learning rate set on every group before each step: linear warmup, then cosine to lr / 10."""
    lr, warmup = scenario["lr"], scenario["warmup"]
    out = []
    for t in range(STEPS):
        if t < warmup:
            out.append(lr * (t + 1) / warmup)
        elif scenario["schedule"] == "constant":
            out.append(lr)
        else:
            progress = (t - warmup) / (STEPS - 1 - warmup)
            out.append(lr / 10 + 0.5 * (lr - lr / 10) * (1 + math.cos(math.pi * progress)))
    return out


def is_decayed(name: str, shape) -> bool:
    """The course's rule: decay tensors with >= 2 dimensions (matrices, embeddings), not biases or gains."""
    return len(shape) >= 2


def skipped(name: str, step: int, sparse: bool) -> bool:
    """In the sparse scenario the head gets no gradient (grad None) on every third step."""
    return sparse and name == "head.weight" and step % 3 == 1


def run_optimizer(cls, scenario: dict, dtype=torch.float32, sparse: bool = False, **extra) -> dict[str, torch.Tensor]:
    """Run an optimizer class over the probe's inputs; returns the final parameters by name.

    Groups as `reglab.train.param_groups` makes them: wd on >= 2-D tensors, 0 on the rest.
    """
    params = make_params(dtype)
    wd = scenario["weight_decay"]
    groups = [{"params": [p for n, p in params.items() if is_decayed(n, p.shape)], "weight_decay": wd},
              {"params": [p for n, p in params.items() if not is_decayed(n, p.shape)], "weight_decay": 0.0}]
    optimizer = cls(groups, lr=scenario["lr"], betas=scenario["betas"], eps=scenario["eps"], weight_decay=wd, **extra)
    names = list(params)
    for step, lr in enumerate(lr_schedule(scenario)):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for name, p in params.items():
            p.grad = None if skipped(name, step, sparse) else gradient(name, step, dtype)
        optimizer.step()
    return {name: params[name].detach().clone() for name in names}


# ------------------------------------------------------------------- the mistakes, replayed in float64
def adam_family(scenario: dict, decoupled: bool, sparse: bool = False, mistake: str | None = None) -> dict[str, torch.Tensor]:
    """Adam with L2 (decoupled=False) or with decoupled decay (True), in float64, optionally with one
    of the named mistakes. Written out here, independent of torch.optim, to name what a student did."""
    params = {n: p.detach() for n, p in make_params(torch.float64).items()}
    beta1, beta2 = scenario["betas"]
    eps, wd0 = scenario["eps"], scenario["weight_decay"]
    state = {n: (torch.zeros_like(p), torch.zeros_like(p), 0) for n, p in params.items()}
    for step, lr in enumerate(lr_schedule(scenario)):
        for name, theta in params.items():
            if skipped(name, step, sparse) and mistake != "decay_without_grad":
                continue
            wd = wd0 if (is_decayed(name, theta.shape) or mistake == "group_wd_ignored") else 0.0
            if skipped(name, step, sparse):    # mistake "decay_without_grad": only the decay happens
                if decoupled:
                    params[name] = theta * (1 - lr * wd)
                continue
            g = gradient(name, step, torch.float64)
            m, v, t = state[name]
            t = (step + 1) if mistake == "global_step" else t + 1
            decay_lr = scenario["lr"] if mistake == "initial_lr" else lr
            if decoupled and mistake == "decay_in_moments":
                g = g + wd * theta
            if decoupled and mistake not in ("decay_in_moments", "decay_after_step"):
                theta = theta * (1 - (wd if mistake == "decay_without_lr" else decay_lr * wd))
            g_first = g if decoupled else g + wd * theta
            g_second = g if mistake == "l2_first_moment_only" else g_first
            if not decoupled and mistake == "l2_times_lr":
                g_first = g_second = g + lr * wd * theta
            m = beta1 * m + (1 - beta1) * g_first
            v = beta2 * v + (1 - beta2) * g_second * g_second
            if mistake == "no_bias_correction":
                m_hat, v_hat = m, v
            else:
                m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
            if mistake == "eps_inside_sqrt":
                update = m_hat / torch.sqrt(v_hat + eps)
            elif mistake == "eps_before_bias_correction":
                update = m_hat / ((v.sqrt() + eps) / math.sqrt(1 - beta2 ** t))
            else:
                update = m_hat / (v_hat.sqrt() + eps)
            new_theta = theta - lr * update
            if decoupled and mistake == "decay_after_step":
                new_theta = new_theta * (1 - lr * wd)
            params[name] = new_theta
            state[name] = (m, v, t)
    return params


ADAMW_MISTAKES = {
    "decay_in_moments": "the decay passes through Adam's moments: you add wd*theta to the gradient, which is "
                        "Adam + L2 (torch.optim.Adam(weight_decay=...)), not AdamW. Decoupled decay shrinks "
                        "the weights directly: theta <- theta * (1 - lr * wd), outside m and v",
    "decay_without_lr": "the decay ignores the learning rate: theta <- theta * (1 - wd) instead of "
                        "theta * (1 - lr * wd), so every step removes a whole wd of each weight",
    "initial_lr": "the decay uses the lr given to the constructor, not the group's current lr: in PyTorch "
                  "the decay theta * (1 - lr * wd) follows the schedule the trainer writes into group['lr']",
    "decay_after_step": "the decay is applied after the Adam step, to the updated weights; PyTorch (and the "
                        "paper) decay theta_{t-1}: theta <- theta * (1 - lr * wd) first, then the Adam step",
    "no_bias_correction": "bias correction is missing: divide m by (1 - beta1**t) and v by (1 - beta2**t), "
                          "or the first steps are far too small",
    "global_step": "the step count t is shared by all parameters instead of kept per parameter in "
                   "self.state[p]: a parameter that had no gradient on some steps gets the wrong bias correction",
    "eps_inside_sqrt": "epsilon sits inside the square root: PyTorch divides by sqrt(v_hat) + eps",
    "eps_before_bias_correction": "epsilon is added before the bias correction of v: PyTorch divides by "
                                  "sqrt(v / (1 - beta2**t)) + eps",
    "group_wd_ignored": "the no-decay group was decayed too (biases and norm gains): read weight_decay from "
                        "each param group (group['weight_decay']), not from the constructor's default",
    "decay_without_grad": "parameters whose .grad is None were decayed anyway: PyTorch skips them entirely "
                          "(no decay, no moment update) on steps without a gradient",
}
ADAM_L2_MISTAKES = {
    "decoupled": "this is decoupled decay (AdamW: theta * (1 - lr * wd), or lr * wd * theta added after the "
                 "moments, which is the same), but Adam + L2 was asked: add wd * theta to the gradient, so the "
                 "decay passes through m and v",
    "l2_first_moment_only": "the L2 term enters the first moment only: torch.optim.Adam adds wd * theta to the "
                            "gradient itself, so it is in both m and v",
    "l2_times_lr": "the L2 term is scaled by the learning rate: the gradient of (wd/2)*||theta||^2 is wd * theta",
    "no_bias_correction": ADAMW_MISTAKES["no_bias_correction"],
    "global_step": ADAMW_MISTAKES["global_step"],
    "eps_inside_sqrt": ADAMW_MISTAKES["eps_inside_sqrt"],
    "eps_before_bias_correction": ADAMW_MISTAKES["eps_before_bias_correction"],
    "group_wd_ignored": "the no-decay group got the L2 term too (biases and norm gains): read weight_decay from "
                        "each param group (group['weight_decay']), not from the constructor's default",
}


# ------------------------------------------------------------------------------------ probe and judge
def _probe_optimizer(scenario_name: str, sparse: bool = False):
    def probe(cls) -> dict:
        final = run_optimizer(cls, SCENARIOS[scenario_name], sparse=sparse)
        return {"final": {name: t.reshape(-1).tolist() for name, t in final.items()}}
    return probe


@functools.lru_cache(maxsize=None)
def torch_reference(decoupled: bool, scenario_name: str, sparse: bool) -> dict[str, torch.Tensor]:
    """The answer key: torch.optim.AdamW or torch.optim.Adam(weight_decay=...) on the probe's inputs
    (cached: the inputs are fixed, so a grader judging many submissions computes it once)."""
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return run_optimizer(cls, SCENARIOS[scenario_name], sparse=sparse, foreach=False)


@functools.lru_cache(maxsize=None)
def mistaken(decoupled: bool, scenario_name: str, sparse: bool, mistake: str) -> dict[str, torch.Tensor]:
    """What a named mistake produces on the probe's inputs (cached like the answer key)."""
    if mistake == "decoupled":
        return adam_family(SCENARIOS[scenario_name], decoupled=True, sparse=sparse)
    return adam_family(SCENARIOS[scenario_name], decoupled=decoupled, sparse=sparse, mistake=mistake)


def _read_final(data: dict, like: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    try:
        final = data["final"]
        out = {name: torch.tensor(final[name], dtype=torch.float64).reshape(ref.shape) for name, ref in like.items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckFailed(f"{what}: the probe's data is malformed ({type(err).__name__}: {err})") from None
    return out


def blown_up(params: dict[str, torch.Tensor]) -> set[str]:
    """Names of parameters that are NaN, infinite, or beyond float32's range."""
    return {n for n, t in params.items() if not (torch.isfinite(t) & (t.abs() < 3.4e38)).all()}


def mismatch(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """(largest |got - want| / (ATOL + RTOL * |want|), name of the parameter where it happens); <= 1 is a match."""
    worst, where = 0.0, ""
    for name, w in want.items():
        w = w.double()
        ratio = float(((got[name] - w).abs() / (ATOL + RTOL * w.abs())).max())
        if ratio > worst:
            worst, where = ratio, name
    return worst, where


def _judge_optimizer(decoupled: bool, scenario_name: str, sparse: bool = False):
    what = "AdamW" if decoupled else "Adam + L2"
    oracle = "torch.optim.AdamW" if decoupled else "torch.optim.Adam(weight_decay=...)"
    mistakes = ADAMW_MISTAKES if decoupled else ADAM_L2_MISTAKES

    def judge(data: dict) -> None:
        want = torch_reference(decoupled, scenario_name, sparse)
        got = _read_final(data, want, what)
        bad = blown_up(got)
        if bad:
            named = [message for mistake, message in mistakes.items()
                     if blown_up(mistaken(decoupled, scenario_name, sparse, mistake)) == bad]
            raise CheckFailed(f"{what}: parameters became NaN or infinite ({', '.join(sorted(bad))}); "
                              + (named[0] if named else "look for a division by a v that can be 0 (eps "
                                 "missing) or a first moment that grows without its second"))
        error, where = mismatch(got, want)
        if error <= 1.0:
            return
        for mistake, message in mistakes.items():
            if mismatch(got, mistaken(decoupled, scenario_name, sparse, mistake))[0] <= 1.0:
                raise CheckFailed(f"{what} differs from {oracle} after {STEPS} steps: {message}")
        decayed = is_decayed(where, want[where].shape)
        raise CheckFailed(
            f"{what} differs from {oracle} after {STEPS} steps: largest difference in {where} "
            f"({'decay' if decayed else 'no-decay'} group, {error:.3g} x the float32 round-off tolerance) and it "
            "matches none of the usual mistakes; compare your step with the update rule line by line")
    return judge


# ------------------------------------------------------------------------------ the decay / no-decay split
SPLIT_MODELS = {
    "lm": GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=8, mlp_ratio=2),   # tied head
    "llama_like": GPTConfig(vocab_size=11, block_size=4, n_layer=2, n_head=2, n_embd=8, mlp_ratio=2,
                            norm="rmsnorm", mlp="swiglu", bias=False, n_classes=5),
}
SPLIT_WD = 0.1


def _probe_split(model_keys):
    def probe(split_fn) -> dict:
        from reglab.train import new_model
        out = {}
        for key in model_keys:
            model = new_model(SPLIT_MODELS[key], seed=0)
            names = {id(p): name for name, p in model.named_parameters()}
            groups = split_fn(model, SPLIT_WD)
            if isinstance(groups, dict) or not isinstance(groups, (list, tuple)):
                raise CheckFailed(f"the split must return a list of param-group dicts, got {type(groups).__name__}")
            described = []
            for group in groups:
                if not isinstance(group, dict) or "params" not in group:
                    raise CheckFailed("each group must be a dict with 'params' (and 'weight_decay'), "
                                      f"got {type(group).__name__}")
                described.append({"names": [names.get(id(p), "<not a parameter of the model>")
                                            for p in list(group["params"])],
                                  "weight_decay": float(group.get("weight_decay", float("nan")))})
            out[key] = described
        return {"groups": out}
    return probe


def _split_messages(wrong: dict[str, float], shapes: dict) -> list[str]:
    """One message per kind of misplaced parameter, biases first, each naming an example."""
    kinds = {"bias": [], "gain": [], "embedding": [], "matrix": []}
    for name, wd in wrong.items():
        kind = ("bias" if name.endswith("bias") else "gain" if len(shapes[name]) == 1
                else "embedding" if "emb" in name else "matrix")
        kinds[kind].append((name, wd))
    texts = {
        "bias": "biases are decayed ({} gets weight_decay {}): a bias shifts, it does not scale, and shrinking "
                "it toward 0 only fights the loss; give biases 0",
        "gain": "normalization gains are decayed ({} gets weight_decay {}): decay pulls a gain toward 0, not "
                "toward its neutral value 1; give norms 0",
        "embedding": "embeddings are not decayed ({} gets weight_decay {}): this course decays every tensor with "
                     ">= 2 dimensions, embeddings included (as nanoGPT does; minGPT leaves them out)",
        "matrix": "a weight matrix has the wrong decay ({} gets weight_decay {}): matrices take the decay, "
                  f"weight_decay={SPLIT_WD}",
    }
    return [texts[kind].format(*found[0]) for kind, found in kinds.items() if found]


def _judge_split(model_keys):
    def judge(data: dict) -> None:
        from reglab.train import new_model
        for key in model_keys:
            model = new_model(SPLIT_MODELS[key], seed=0)
            shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
            try:
                groups = data["groups"][key]
            except (KeyError, TypeError):
                raise CheckFailed("the probe's data is malformed") from None
            seen: dict[str, float] = {}
            for group in groups:
                wd = group["weight_decay"]
                if wd is None or not math.isfinite(wd):
                    raise CheckFailed("a group has no 'weight_decay': give every group its own value "
                                      f"({SPLIT_WD} for the decay group, 0.0 for the no-decay group)")
                for name in group["names"]:
                    if name not in shapes:
                        raise CheckFailed("a group holds a tensor that is not a parameter of the model")
                    if name in seen:
                        tied = " (the tied LM head and token embedding are one tensor)" if "emb" in name else ""
                        raise CheckFailed(f"{name} is listed twice{tied}: every parameter belongs to exactly one "
                                          "group (torch.optim refuses duplicates)")
                    seen[name] = wd
            missing = sorted(set(shapes) - set(seen))
            if missing:
                raise CheckFailed(f"{missing[0]} is in no group: the optimizer would never update it "
                                  f"(missing: {', '.join(missing)})")
            wrong = {name: wd for name, wd in seen.items()
                     if wd != (SPLIT_WD if is_decayed(name, shapes[name]) else 0.0)}
            if wrong:
                raise CheckFailed("; ".join(_split_messages(wrong, shapes)))
    return judge


# --------------------------------------------------------------------------------------- registration
add(Check("weight_decay.adamw", 3, _probe_optimizer("main"), _judge_optimizer(True, "main"),
          f"AdamW matches torch.optim.AdamW to float32 round-off over {STEPS} steps with a schedule"))
add(Check("weight_decay.adam_l2", 3, _probe_optimizer("main"), _judge_optimizer(False, "main"),
          f"Adam + L2 matches torch.optim.Adam(weight_decay=...) over {STEPS} steps"))
add(Check("weight_decay.decay_split", 2, _probe_split(["lm"]), _judge_split(["lm"]),
          "matrices and embeddings decay; biases and norm gains do not; each parameter once"))
# hidden tests (the grader runs these; the student lab does not show them)
add(Check("weight_decay.adamw_other_settings", 1, _probe_optimizer("other"), _judge_optimizer(True, "other"),
          "AdamW also matches with other betas, eps, weight decay and a constant lr"))
add(Check("weight_decay.adam_l2_other_settings", 1, _probe_optimizer("other"), _judge_optimizer(False, "other"),
          "Adam + L2 also matches with other betas, eps, weight decay and a constant lr"))
add(Check("weight_decay.adamw_missing_grads", 1, _probe_optimizer("main", sparse=True),
          _judge_optimizer(True, "main", sparse=True),
          "AdamW skips parameters without a gradient, as torch.optim.AdamW does"))
add(Check("weight_decay.adam_l2_missing_grads", 1, _probe_optimizer("main", sparse=True),
          _judge_optimizer(False, "main", sparse=True),
          "Adam + L2 skips parameters without a gradient, as torch.optim.Adam does"))
add(Check("weight_decay.decay_split_llama_like", 1, _probe_split(["llama_like"]), _judge_split(["llama_like"]),
          "the split also holds for RMSNorm, SwiGLU, no biases and two layers"))


# --------------------------------------------------------------------------------------- shortcuts
# torch.optim's Adam and AdamW are the answer key: a subclass, a wrapped instance, or a call of their
# functional form is refused (through the check protocol's one mechanism, reglab.checks.refusing).
refuse("weight_decay", "adamw adam_l2 adamw_other_settings adam_l2_other_settings adamw_missing_grads "
       "adam_l2_missing_grads", "subclass torch.optim.Optimizer and write the update yourself",
       Shortcut("torch.optim.AdamW", "it is PyTorch's own optimizer, the checks' answer key"),
       Shortcut("torch.optim.Adam", "it is PyTorch's own optimizer, the checks' answer key"),
       Shortcut("torch.optim.adam.adam", "it is the functional form of torch.optim.Adam"),
       Shortcut("torch.optim.adamw.adamw", "it is the functional form of torch.optim.AdamW"))


# --------------------------------------------------------------------------------------------------
# The open experiment: a design the student chose, run within the budget (no fixed answer); not refused
# above, since the sweep trains with torch.optim.AdamW
# --------------------------------------------------------------------------------------------------

OPEN = add(open_check("weight_decay"))    # reglab.experiments: the design ran within its budget (what it found is yours)
