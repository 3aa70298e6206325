"""Topic training stability, lecture: why attention and output logits run away at high learning rates, what
qk-norm and z-loss bound, and AdamW's weights as an exponential moving average of its updates.

- Attention logits (section 1): `scale_qk`, `attention_entropy`, `qk_logit_bound`, `logit_growth` and the
  two checks `check_logit_growth` and `check_qk_norm_bound`. The logits themselves come from
  `reglab.train.attention_logits`, the same hooks the trainer's `stability_stats` reads.
- z-loss (section 2): `z_loss_step`, `z_step_first_order`, `check_z_step`; the loss term is
  `reglab.train.z_loss_term`, the one the trainer uses.
- AdamW as an EMA (section 3): `adam_updates`, `adamw_path`, `unrolled_adamw`, `decay_with_updates`,
  `ema_norm_squared`, `normalized_classifier_run`, `measured_retention`, `independent_decay_config`;
  the retention formula over a schedule is `reglab.topics.weight_decay.lecture.retained`.
- Warmup and clipping (section 4): `adam_first_update`.
- The small measured demonstration (section 5): `demo_runs`, `plot_demo`.
The lab (learning-rate sensitivity curves) is in `reglab.topics.stability.lab`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from reglab.budget import by_budget
from reglab.model import GPT, GPTConfig
from reglab.train import TrainConfig, attention_logits, lr_at, z_loss_term


@dataclass(frozen=True)
class LectureSettings:
    """Sizes of the stability lecture's measurements, for one budget (the lab's are in its lab.py)."""
    n_layer: int             # the course model of sections 1 and 5
    n_embd: int
    n_head: int
    block_size: int
    batch_size: int
    toy_dim: int             # coordinates of the AdamW toys of section 3
    toy_steps: int           # their steps: several EMA timescales 1 / (lr * wd) = 128 (see `TOY_LR`, `TOY_WD`)
    sign_dim: int            # coordinates of the prescribed-update toy: its check's tolerance is 4 sqrt(2 / sign_dim)
    retention_steps: int     # the schedule of the decay-convention comparison
    demo_steps: int          # the high-lr pair of runs of section 5
    demo_eval_every: int
    demo_lr: float = 3e-2    # about 10x what this model trains best with: attention logits grow (measured)

    def gpt_config(self, vocab_size: int, qk_norm: bool = False) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, qk_norm=qk_norm)


SETTINGS = {
    "ci": LectureSettings(n_layer=2, n_embd=64, n_head=4, block_size=32, batch_size=8, toy_dim=1000,
                          toy_steps=512, sign_dim=20000, retention_steps=200, demo_steps=40, demo_eval_every=5),
    # the toys run on the CPU in float64 whatever the budget (paths of toy_steps x toy_dim are kept in memory)
    "cpu": LectureSettings(n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=16, toy_dim=4000,
                           toy_steps=1024, sign_dim=50000, retention_steps=300, demo_steps=200, demo_eval_every=10),
    "gpu": LectureSettings(n_layer=4, n_embd=256, n_head=8, block_size=128, batch_size=32, toy_dim=4000,
                           toy_steps=1024, sign_dim=50000, retention_steps=1000, demo_steps=500, demo_eval_every=25),
}

# The toys' learning rate and decay: powers of two, so that lr * wd and the runs at (2 lr, wd / 2) share
# lr * wd exactly in floating point; lr * wd = 2^-7 is an EMA timescale of 128 steps.
TOY_LR, TOY_WD = 2.0 ** -4, 2.0 ** -3


def settings_for(budget: str) -> LectureSettings:
    """The lecture notebook's settings for a budget ('ci', 'cpu', 'gpu' or 'auto')."""
    return by_budget(budget, **SETTINGS)


# --------------------------------------------------------------------------------------------------
# 1. Attention logits grow with ||q|| ||k||
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def scale_qk(model: GPT, c: float) -> GPT:
    """Multiply the q and the k rows of every layer's qkv projection (weight and bias) by c, in place.

    q = W_q x + b_q, so q becomes c q and k becomes c k: every logit q.k / sqrt(hs) becomes c^2 times itself.
    """
    C = model.config.n_embd
    for block in model.blocks:
        for param in (block.attn.qkv.weight, block.attn.qkv.bias):
            if param is not None:
                param[:2 * C] *= c           # rows [0, C) are q, [C, 2C) are k, [2C, 3C) are v
    return model


def attention_entropy(att: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each query's attention weights softmax(att), (..., T, T) -> (..., T).

    Masked logits (-inf) get weight 0 and add 0 (torch.special.entr(0) = 0). A query attending to one
    key has entropy 0; one attending evenly to its t + 1 visible keys has log(t + 1).
    """
    return torch.special.entr(torch.softmax(att, dim=-1)).sum(-1)


def qk_logit_bound(model: GPT) -> float:
    """The largest |q.k| / sqrt(hs) qk-norm allows, over the layers: inf without qk-norm.

    After LayerNorm q = g * q_hat + b with q_hat = (q - mean) / sqrt(var + eps), so ||q_hat||^2 =
    hs var / (var + eps) <= hs (RMSNorm: the same with the mean square); hence ||q|| <= max|g| sqrt(hs) + ||b||,
    and by Cauchy-Schwarz |q.k| / sqrt(hs) <= ||q|| ||k|| / sqrt(hs). The gains g are trained parameters:
    the bound holds at every step, but it moves with them.
    """
    bound = 0.0
    for block in model.blocks:
        norms = (block.attn.q_norm, block.attn.k_norm)
        if any(isinstance(norm, nn.Identity) for norm in norms):
            return math.inf
        hs = norms[0].weight.numel()

        def longest(norm) -> float:
            bias = getattr(norm, "bias", None)
            return (float(norm.weight.detach().abs().max()) * math.sqrt(hs)
                    + (float(bias.detach().norm()) if bias is not None else 0.0))
        bound = max(bound, longest(norms[0]) * longest(norms[1]) / math.sqrt(hs))
    return bound


def logit_growth(model: GPT, x: torch.Tensor, scales) -> list[dict]:
    """For each c in scales, a copy of model with q and k scaled by c (`scale_qk`): its first layer's logits
    (B, nh, T, T), their max, the mean entropy of its attention, the max over all layers and `qk_logit_bound`.

    The first layer is the one whose logits are exactly c^2 times the unscaled ones: later layers see an input
    that the earlier attention (now sharper) has changed.
    """
    rows = []
    for c in scales:
        scaled = scale_qk(copy.deepcopy(model), c)
        per_layer, _ = attention_logits(scaled, x)
        first = per_layer[0]
        rows.append({"c": float(c), "first_layer_logits": first, "first_layer_max": float(first.max()),
                     "entropy": float(attention_entropy(first).mean()),
                     "max_logit": max(float(att.max()) for att in per_layer), "bound": qk_logit_bound(scaled)})
    return rows


def float32_dot_rtol(n_embd: int, head_size: int) -> float:
    """Relative float32 error of a logit: q and k are sums of n_embd products and q.k of head_size, each
    addition rounding by at most 2^-24 relative (worst case, errors adding up): 2 (n_embd + head_size) 2^-24."""
    return 2 * (n_embd + head_size) * 2.0 ** -24


def check_logit_growth(growth: list[dict], rtol: float) -> None:
    """Without qk-norm: the first layer's max logit is c^2 times the unscaled one (to rtol), and its mean
    attention entropy does not rise as c grows (d H(b z) / d b = -b Var_p(z) <= 0 for every query)."""
    base = growth[0]
    for row in growth[1:]:
        expected = base["first_layer_max"] * (row["c"] / base["c"]) ** 2
        if not math.isclose(row["first_layer_max"], expected, rel_tol=rtol):
            raise AssertionError(f"at c = {row['c']:g} the max logit is {row['first_layer_max']:.6g}, "
                                 f"not c^2 times the unscaled one ({expected:.6g})")
    for before, after in zip(growth, growth[1:]):
        if after["entropy"] > before["entropy"] * (1 + rtol):
            raise AssertionError(f"the attention entropy rose from {before['entropy']:.4f} at c = {before['c']:g} "
                                 f"to {after['entropy']:.4f} at c = {after['c']:g}")


def check_qk_norm_bound(growth: list[dict]) -> None:
    """With qk-norm: every max logit is within its bound, and the entropy stays where it was at the first c.

    The entropy tolerance: H is a smooth function of the logits with dH/dz_i = -p_i (log p_i + H), so
    |dH| <= max|dz| sum_i p_i |log p_i + H| <= 2 H max|dz| <= 2 log(T) max|dz| (mean absolute deviation of
    -log p, which is >= 0 with mean H, is at most 2H; H <= log T). max|dz| is measured: the logits differ
    between scales only through LayerNorm's eps (var + eps versus c^2 var + eps).
    """
    base = growth[0]
    T = base["first_layer_logits"].size(-1)
    finite = torch.isfinite(base["first_layer_logits"])
    for row in growth:
        if row["max_logit"] > row["bound"] * (1 + 1e-6):
            raise AssertionError(f"at c = {row['c']:g} the max logit {row['max_logit']:.4g} exceeds the qk-norm "
                                 f"bound {row['bound']:.4g}")
        shift = float((row["first_layer_logits"] - base["first_layer_logits"])[finite].abs().max())
        allowed = 2 * math.log(T) * shift + 1e-6       # + 1e-6: float32 rounding of the entropies themselves
        if abs(row["entropy"] - base["entropy"]) > allowed:
            raise AssertionError(f"at c = {row['c']:g} the entropy moved by {abs(row['entropy'] - base['entropy']):.3g}, "
                                 f"more than 2 log(T) max|dz| = {allowed:.3g}")


# --------------------------------------------------------------------------------------------------
# 2. z-loss
# --------------------------------------------------------------------------------------------------


def z_loss_step(z: torch.Tensor, step: float) -> torch.Tensor:
    """One gradient step of size `step` on log^2 Z alone, for one prediction's logits z (V,).

    The gradient is autograd's, of the course's `z_loss_term` (mean of log^2 Z over predictions: here one).
    """
    z = z.detach().clone().requires_grad_()
    z_loss_term(z[None]).backward()
    return (z - step * z.grad).detach()


def z_step_first_order(z: torch.Tensor, step: float) -> tuple[float, torch.Tensor]:
    """The first-order change of (log Z, softmax(z)) under `z_loss_step`.

    The gradient is g = 2 log Z p (p = softmax(z)). d log Z = sum_i p_i dz_i = -2 s log Z ||p||^2, and
    dp = (diag(p) - p p^T) dz = -2 s log Z p * (p - ||p||^2): zero only when p is uniform.
    """
    log_z = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    square = (p * p).sum()
    return float(-2 * step * log_z * square), -2 * step * log_z * p * (p - square)


def z_step_residuals(z: torch.Tensor, step: float) -> tuple[float, float]:
    """How far the measured step is from `z_step_first_order`: (|log Z error|, max |softmax error|)."""
    after = z_loss_step(z, step)
    d_log_z, d_p = z_step_first_order(z, step)
    measured_log_z = float(torch.logsumexp(after, -1) - torch.logsumexp(z, -1))
    measured_p = torch.softmax(after, -1) - torch.softmax(z, -1)
    return abs(measured_log_z - d_log_z), float((measured_p - d_p).abs().max())


def check_z_step(z: torch.Tensor, step: float) -> dict:
    """A z-loss step lowers |log Z| and changes softmax(z) as `z_step_first_order` says, with an error of
    second order: halving the step divides the error by 4 (checked to lie in [3, 5], the O(s^3) terms
    being a fraction s of the O(s^2) ones). Returns the measured changes."""
    after = z_loss_step(z, step)
    log_z, log_z_after = float(torch.logsumexp(z, -1)), float(torch.logsumexp(after, -1))
    if not abs(log_z_after) < abs(log_z):
        raise AssertionError(f"a z-loss step moved log Z from {log_z:.6g} to {log_z_after:.6g}, not toward 0")
    full, half = z_step_residuals(z, step), z_step_residuals(z, step / 2)
    for name, big, small in (("log Z", full[0], half[0]), ("softmax", full[1], half[1])):
        if big < 1e-12:             # float64 rounding: the formula is exact here (p uniform: a pure shift)
            continue
        if not 3 <= big / small <= 5:
            raise AssertionError(f"the {name} error of the first-order formula shrinks by {big / small:.3g} when the "
                                 f"step halves, not by ~4: the formula is not right to first order")
    dp = torch.softmax(after, -1) - torch.softmax(z, -1)
    return {"log_z": log_z, "log_z_after": log_z_after, "max_dp": float(dp.abs().max()),
            "predicted_max_dp": float(z_step_first_order(z, step)[1].abs().max()), "ratio": (full[0] / half[0],
                                                                                              full[1] / half[1])}


# --------------------------------------------------------------------------------------------------
# 3. AdamW's weights as an exponential moving average of its updates
# --------------------------------------------------------------------------------------------------


def noise_gradients(steps: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Gradients (steps, dim) of i.i.d. N(0, 1) entries that do not depend on the weights, float64."""
    return torch.randn(steps, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def adamw_path(grads: torch.Tensor, lr, weight_decay: float, theta0: torch.Tensor, betas=(0.9, 0.95),
               eps: float = 1e-8, adam: str = "adamw") -> torch.Tensor:
    """torch.optim.AdamW (or "adam", no decay) fed the gradient sequence grads (steps, dim) from theta0.

    lr is a number or a list with one learning rate per step (a schedule). Returns theta after every step,
    (steps + 1, dim), row 0 being theta0. The gradients do not depend on theta, so Adam's normalized update
    u_t = m_hat / (sqrt(v_hat) + eps) is the same in every run fed the same grads, whatever lr and decay.
    """
    theta = torch.nn.Parameter(theta0.detach().clone().to(torch.float64))
    lrs = [lr] * len(grads) if isinstance(lr, (int, float)) else list(lr)
    if adam == "adamw":
        optimizer = torch.optim.AdamW([theta], lr=lrs[0], betas=betas, eps=eps, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.Adam([theta], lr=lrs[0], betas=betas, eps=eps)
    path = [theta.detach().clone()]
    for g, lr_t in zip(grads, lrs):
        optimizer.param_groups[0]["lr"] = lr_t
        theta.grad = g.clone()
        optimizer.step()
        path.append(theta.detach().clone())
    return torch.stack(path)


def adam_updates(grads: torch.Tensor, betas=(0.9, 0.95), eps: float = 1e-8) -> torch.Tensor:
    """Adam's normalized updates u_t (steps, dim) on grads: theta_t = theta_{t-1} - lr u_t, read off a run of
    torch.optim.Adam with lr 1 and no decay (u does not depend on lr)."""
    path = adamw_path(grads, 1.0, 0.0, torch.zeros(grads.shape[1], dtype=torch.float64), betas, eps, adam="adam")
    return -(path[1:] - path[:-1])


def unrolled_adamw(theta0: torch.Tensor, updates: torch.Tensor, lr: float, weight_decay: float) -> torch.Tensor:
    """theta_t = (1 - lr wd)^t theta_0 - lr sum_{s=1}^t (1 - lr wd)^{t-s} u_s, the unrolled AdamW recursion
    theta_t = (1 - lr wd) theta_{t-1} - lr u_t, as an explicit weighted sum: theta_T for updates (T, dim)."""
    T = len(updates)
    keep = 1 - lr * weight_decay
    weights = keep ** torch.arange(T - 1, -1, -1, dtype=torch.float64)        # (1 - a)^{T-s}, s = 1..T
    return keep ** T * theta0 - lr * (weights[:, None] * updates).sum(0)


def decay_with_updates(updates: torch.Tensor, lr: float, weight_decay: float, theta0: torch.Tensor) -> torch.Tensor:
    """The AdamW recursion theta <- (1 - lr wd) theta - lr u with a prescribed update sequence (T, dim): theta_T."""
    theta = theta0.clone().to(torch.float64)
    for u in updates:
        theta = (1 - lr * weight_decay) * theta - lr * u.to(torch.float64)
    return theta


def ema_norm_squared(dim: int, lr: float, weight_decay: float, steps: int) -> float:
    """E ||theta_t||^2 from theta_0 = 0 for updates of independent random signs (|u_i| = 1):
    theta_t,i = -lr sum_s (1 - a)^{t-s} u_s,i with a = lr wd, so its variance is
    lr^2 (1 - (1 - a)^{2t}) / (1 - (1 - a)^2), which tends to lr^2 / (a (2 - a)) ~ lr / (2 wd)."""
    keep = 1 - lr * weight_decay
    return dim * lr ** 2 * (1 - keep ** (2 * steps)) / (1 - keep ** 2)


def sign_updates(steps: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A prescribed update sequence of independent random signs, (steps, dim), int8 (+1 or -1) to save memory."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (steps, dim), generator=gen, dtype=torch.int8) * 2 - 1).to(torch.int8)


def normalized_classifier_run(lr: float, weight_decay: float, init_scale: float, steps: int, seed: int = 0,
                              n: int = 256, dim: int = 32, classes: int = 8, eps: float = 0.0) -> dict:
    """A scale-invariant model trained by torch.optim.AdamW: logits = 5 X (W / ||W||)^T, so the loss depends on
    W's direction only, on a random teacher's labels. W starts at init_scale times the same random matrix.

    Returns the final W and the logits on the data. Scale invariance gives grad L(cW) = grad L(W) / c, and
    Adam's update ignores a gradient scale except through eps, so a run from c W_0 at (c lr, wd / c) stays c
    times this one at every step. With eps = 0 and c a power of two every operation scales exactly, so the
    two runs agree bit for bit; with eps > 0 they depart by about eps / sqrt(v_hat) a step, and the departure
    grows from there if the dynamics amplify small differences (the lecture measures how fast).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y = (x @ torch.randn(dim, classes, generator=gen, dtype=torch.float64)).argmax(-1)
    w = torch.nn.Parameter(init_scale * torch.randn(classes, dim, generator=gen, dtype=torch.float64))
    optimizer = torch.optim.AdamW([w], lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), eps=eps)

    def logits():
        return 5 * x @ (w / w.norm()).T

    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits(), y).backward()
        optimizer.step()
    with torch.no_grad():
        return {"weights": w.detach().clone(), "logits": logits()}


def independent_decay_config(config: TrainConfig, independent_wd: float) -> TrainConfig:
    """The coupled-decay config that applies independent decay independent_wd.

    Independent decay multiplies by (1 - s_t independent_wd), with s_t = lr_t / lr the schedule's multiplier
    (Loshchilov & Hutter 2019, Algorithm 2: the eta_t there); PyTorch's AdamW multiplies by (1 - lr_t wd).
    They agree when wd = independent_wd / lr, which is how independent decay is had from torch.optim.AdamW.
    """
    return replace(config, weight_decay=independent_wd / config.lr)


def measured_retention(config: TrainConfig, dim: int = 64, seed: int = 0) -> list[float]:
    """What AdamW under config's schedule (`lr_at`) keeps of a weight's initial value, read off two runs.

    Both runs get the same weight-independent noise gradients, so Adam's updates are identical and cancel
    in the difference of the runs from theta_0 and theta_0 + 1: what is left is prod_s (1 - lr_s wd) exactly.
    Returns it after every step (the mean over dim coordinates, all equal up to rounding).
    """
    grads = noise_gradients(config.steps, dim, seed)
    lrs = [lr_at(step, config) for step in range(config.steps)]
    base = adamw_path(grads, lrs, config.weight_decay, torch.zeros(dim), config.betas, config.eps)
    moved = adamw_path(grads, lrs, config.weight_decay, torch.ones(dim), config.betas, config.eps)
    return (moved - base)[1:].mean(-1).tolist()


# --------------------------------------------------------------------------------------------------
# 4. Warmup and clipping
# --------------------------------------------------------------------------------------------------


def adam_first_update(grad: torch.Tensor, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8) -> torch.Tensor:
    """The first step of torch.optim.Adam from theta = 0 with gradient grad: -lr g / (|g| + eps), since
    m_hat_1 = g and v_hat_1 = g^2 after the bias corrections."""
    return adamw_path(grad[None], lr, 0.0, torch.zeros_like(grad, dtype=torch.float64), betas, eps, adam="adam")[1]


# --------------------------------------------------------------------------------------------------
# 5. A small measured demonstration
# --------------------------------------------------------------------------------------------------


def demo_runs(settings: LectureSettings, task, vocab_size: int, seed: int = 0) -> dict:
    """The course model at settings.demo_lr without warmup, without and with qk-norm, through the sweep runner.

    Each evaluation records max_attn_logit and log_z (the trainer's `stability_stats`) and, with qk-norm,
    the bound of `qk_logit_bound` at that step ("qk_bound"), since the gains it depends on are trained.
    """
    from reglab.train import sweep
    config = TrainConfig(steps=settings.demo_steps, lr=settings.demo_lr, warmup_steps=0,
                         eval_every=settings.demo_eval_every)
    runs = {f"qk_norm={qk}": (settings.gpt_config(vocab_size, qk_norm=qk), config) for qk in (False, True)}

    def bound(model):
        return {"qk_bound": qk_logit_bound(model)} if model.config.qk_norm else {}
    return sweep(runs, task, seeds=(seed,), on_eval=bound, progress=False, diverged="record")


def plot_demo(results: dict, ax=None):
    """max_attn_logit against step for each run (log axis), and the qk-norm bound as a dashed line."""
    import matplotlib.pyplot as plt

    from reglab.plots import colors_for
    ax = ax or plt.subplots(figsize=(7, 3.6))[1]
    colors = colors_for(list(results))
    for label, runs in results.items():
        history = runs[0].history
        ax.semilogy(*history.series("max_attn_logit"), "o-", color=colors[label], label=label)
        if "qk_bound" in history.final:
            ax.semilogy(*history.series("qk_bound"), "--", color=colors[label], label=f"{label}: bound")
    ax.set(xlabel="step", ylabel="largest attention logit q.k/sqrt(hs) (log)",
           title="Attention logits at a high learning rate, without and with qk-norm")
    ax.legend(fontsize=8)
    return ax
