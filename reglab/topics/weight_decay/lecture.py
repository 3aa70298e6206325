"""Topic weight decay, lecture: why L2 and decoupled decay differ under Adam, and how much a lambda removes over a run.

- `simulate_decay` / `show_decay`: weights whose loss gradient is zero-mean noise of very different
  scales, trained with Adam + L2 and with AdamW (PyTorch's own optimizers), so the only pull on them
  is the decay; the widget draws their trajectories.
- `retained` / `decay_over_run` / `integrated_decay_estimate` / `half_life`: what AdamW's factor
  (1 - lr_t * lambda) per step leaves of a weight no gradient reinforces over a schedule. These are the
  course's one implementation; the capstone's recipes use them too.
The lab's grokking experiment is in `reglab.topics.weight_decay.lab`.
"""
from __future__ import annotations

import math

import torch

from reglab.train import TrainConfig, lr_at

OPTIMIZERS = ("adamw", "adam_l2", "sgd_l2", "sgdw")


# ------------------------------------------------------------------ decay of weights the loss does not pull
def simulate_decay(optimizer: str, weight_decay: float, lr: float, steps: int = 1000,
                   grad_scales=(1e-3, 10.0), copies: int = 256, theta0: float = 1.0,
                   betas=(0.9, 0.999), eps: float = 1e-8, seed: int = 0) -> torch.Tensor:
    """Trajectories of weights whose loss gradient is pure noise: g = scale * N(0, 1), no net pull.

    Each column of grad_scales is a group of `copies` independent weights, all starting at theta0.
    optimizer: "adamw" (torch.optim.AdamW), "adam_l2" (torch.optim.Adam(weight_decay=...)),
    "sgd_l2" (torch.optim.SGD(weight_decay=...)) or "sgdw" (theta *= 1 - lr * wd, then plain SGD).
    Returns theta over time, shape (steps + 1, len(grad_scales), copies), in float64.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if weight_decay < 0 or not lr > 0:
        raise ValueError(f"need weight_decay >= 0 and lr > 0, got weight_decay={weight_decay}, lr={lr}")
    scales = torch.tensor(grad_scales, dtype=torch.float64)[:, None]          # (groups, 1)
    theta = torch.full((len(grad_scales), copies), float(theta0), dtype=torch.float64, requires_grad=True)
    if optimizer == "adamw":
        opt = torch.optim.AdamW([theta], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    elif optimizer == "adam_l2":
        opt = torch.optim.Adam([theta], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    elif optimizer == "sgd_l2":
        opt = torch.optim.SGD([theta], lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD([theta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    path = [theta.detach().clone()]
    for _ in range(steps):
        theta.grad = scales * torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        if optimizer == "sgdw":
            with torch.no_grad():
                theta.mul_(1 - lr * weight_decay)      # decay theta_{t-1} first, then the gradient step
        opt.step()
        path.append(theta.detach().clone())
    return torch.stack(path)                                                  # (steps + 1, groups, copies)


def show_decay(weight_decay: float = 0.1, lr: float = 1e-2, steps: int = 1000, grad_scales=(1e-3, 10.0)):
    """The widget: mean trajectory of a small-gradient and a large-gradient weight under AdamW and
    Adam + L2, against pure decay (1 - lr * wd)^t. Prints each group's retained fraction."""
    import matplotlib.pyplot as plt

    from reglab.plots import colors_for
    labels = [f"gradient scale {s:g}" for s in grad_scales]
    colors = colors_for(labels)
    fig, ax = plt.subplots(figsize=(7, 4))
    t = torch.arange(steps + 1)
    final = {}
    for optimizer, style, name in (("adamw", "-", "AdamW"), ("adam_l2", "--", "Adam + L2")):
        mean = simulate_decay(optimizer, weight_decay, lr, steps, grad_scales).mean(-1)   # (steps + 1, groups)
        for i, label in enumerate(labels):
            ax.plot(t, mean[:, i], style, color=colors[label], label=f"{name}, {label}")
            final[(name, label)] = float(mean[-1, i])
    ax.plot(t, (1 - lr * weight_decay) ** t.double(), ":", color="black", label=r"pure decay $(1-\eta\lambda)^t$")
    ax.set(xlabel="step", ylabel=r"mean weight $\theta_t$ (started at 1)", ylim=(-0.1, 1.1),
           title=f"Decay of weights the loss does not pull: $\\lambda$={weight_decay:g}, $\\eta$={lr:g}")
    ax.legend(fontsize=8, loc="lower left")
    plt.show()
    for (name, label), value in final.items():
        print(f"{name:>9}, {label:>20}: keeps {value:6.1%} after {steps} steps")
    print(f"pure decay keeps {(1 - lr * weight_decay) ** steps:.1%}")


# ------------------------------------------------------------------------- how strong is a lambda
def retained(config: TrainConfig) -> list[float]:
    """After each step of config's schedule (`lr_at`), the fraction left of a weight no gradient reinforces.

    torch.optim.AdamW multiplies every decayed weight by (1 - lr_t * lambda) at step t, so after step t
    the weight keeps prod_{s <= t} (1 - lr_s * lambda), summed here as logs: exp(sum_s log1p(-lr_s * lambda)).
    """
    kept, log_kept = [], 0.0
    for step in range(config.steps):
        log_kept += math.log1p(-lr_at(step, config) * config.weight_decay)
        kept.append(math.exp(log_kept))
    return kept


def decay_over_run(config: TrainConfig) -> tuple[float, float]:
    """(lambda * sum_t lr_t, prod_t (1 - lr_t * lambda)) over the run's schedule (`lr_at`).

    The first is the integrated decay, the exponent of what decay alone does over the run; the second
    is the fraction of a weight that no gradient reinforces left at the end (~ exp(-first)), `retained`'s last value.
    """
    total_lr = sum(lr_at(step, config) for step in range(config.steps))
    return config.weight_decay * total_lr, retained(config)[-1]


def integrated_decay_estimate(config: TrainConfig) -> float:
    """lambda * (lr_max + lr_min) * T / 2: the cosine's mean lr times the steps (warmup ignored)."""
    return config.weight_decay * (config.lr + config.lr_floor) * config.steps / 2


def half_life(lr: float, weight_decay: float) -> float:
    """Steps until decay alone halves a weight at a constant lr.

    Each step multiplies the weight by (1 - lr * wd), so n steps leave (1 - lr * wd)^n = 1/2 at
    n = ln 2 / -ln(1 - lr * wd), which is ~ ln 2 / (lr * wd) (= 0.69 / (lr * wd)) while lr * wd << 1.
    Infinite without decay.
    """
    if lr * weight_decay == 0:
        return math.inf
    if not 0 < lr * weight_decay < 1:
        raise ValueError(f"need 0 <= lr * weight_decay < 1, got {lr * weight_decay}")
    return math.log(2) / -math.log1p(-lr * weight_decay)
