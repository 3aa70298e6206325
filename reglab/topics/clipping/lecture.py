"""Topic gradient clipping, lecture: scale the whole gradient down to norm c when it is longer; measure what that does.

- `clip_grad_norm` is the reference global-norm clipping (what `torch.nn.utils.clip_grad_norm_` does);
  `clip_grad_norm_per_tensor` and `clip_grad_value` are the variants that change the gradient's direction.
- `find_spikes` says precisely what a loss spike is; `fraction_clipped` and `clip_factors` read a recorded
  trace of pre-clip norms.
- `adam_spike_demo` and `decay_seen_by_clip` are the two small experiments of the lecture (Adam's moments
  after a spike; where weight decay sits relative to the clip).
The lab's experiment (settings per budget, the sweep over c, its summary and plots) is in
`reglab.topics.clipping.lab`.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from reglab.plots import colors_for

# --------------------------------------------------------------------------------------------------
# Clipping the gradient
# --------------------------------------------------------------------------------------------------


def _with_grads(parameters) -> list[torch.Tensor]:
    """The parameters that have a gradient, read in one pass (a generator can be read only once)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p for p in parameters if p.grad is not None]


def _norm(grad: torch.Tensor) -> torch.Tensor:
    """||grad||, computed in float32 for half-precision gradients and float64 for float64 ones."""
    return torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32))


def _global_norm(tensor_norms: list[torch.Tensor]) -> torch.Tensor:
    """sqrt(sum_i ||g_i||^2) from the per-tensor norms, in the widest of their dtypes."""
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in tensor_norms) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.to(tensor_norms[0].device, dtype) for n in tensor_norms]))


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float, eps: float = 1e-6,
                   error_if_nonfinite: bool = False) -> torch.Tensor:
    """Scale every gradient in place by min(1, max_norm / (||g|| + eps)); return the pre-clip norm ||g||.

    ||g|| is the global norm: sqrt of the sum of squares over all gradients, as if they were one vector,
    so the direction of the whole gradient is kept. Parameters without a gradient are skipped. A
    non-finite norm raises with error_if_nonfinite; otherwise the scale c / (inf + eps) = 0 turns the
    finite gradients into zeros and the infinite entries into NaN (0 * inf), exactly as PyTorch does.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    params = _with_grads(parameters)
    if not params:
        return torch.tensor(0.0)
    # ||g|| = sqrt(sum_i ||g_i||^2) over the tensors g_i, summed in at least float32
    total_norm = _global_norm([_norm(p.grad) for p in params])
    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(f"the total gradient norm is {float(total_norm)}, so it cannot be clipped; "
                           f"set error_if_nonfinite=False to scale by it anyway")
    # g <- g * min(1, c / (||g|| + eps)); a tensor, so no host sync on a GPU
    scale = torch.clamp(max_norm / (total_norm + eps), max=1.0)
    for p in params:
        p.grad.mul_(scale.to(p.grad.dtype))
    return total_norm


@torch.no_grad()
def clip_grad_norm_per_tensor(parameters, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """The common mistake: clip each tensor to norm max_norm on its own. Returns the global pre-clip norm.

    Each tensor's scale differs, so the concatenated gradient changes direction, and the clipped
    gradient can be up to sqrt(number of tensors) * max_norm long.
    """
    params = _with_grads(parameters)
    tensor_norms = [_norm(p.grad) for p in params]
    for p, norm in zip(params, tensor_norms):
        p.grad.mul_(torch.clamp(max_norm / (norm + eps), max=1.0))
    return _global_norm(tensor_norms) if params else torch.tensor(0.0)


@torch.no_grad()
def clip_grad_value(parameters, clip_value: float) -> None:
    """Clamp every gradient entry to [-clip_value, clip_value] (torch.nn.utils.clip_grad_value_)."""
    for p in _with_grads(parameters):
        p.grad.clamp_(-clip_value, clip_value)


CLIPPERS = {"global norm": clip_grad_norm, "per tensor": clip_grad_norm_per_tensor, "value": clip_grad_value}


def flat(tensors) -> torch.Tensor:
    """Tensors concatenated into one float64 vector."""
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def cosine(a, b) -> float:
    """Cosine of the angle between two lists of tensors seen as one vector each."""
    a, b = flat(a), flat(b)
    return float(a @ b / (a.norm() * b.norm()))


def compare_clipping(grads: list[torch.Tensor], threshold: float) -> dict[str, dict]:
    """Apply each clipping method (threshold c) to copies of grads; the norm after and the cosine to the original.

    One threshold for all three methods is the usual way the knob is offered, though it means a norm
    for two of them and a per-entry bound for value clipping.
    """
    out = {}
    for name, clip in CLIPPERS.items():
        params = [torch.nn.Parameter(g.detach().clone()) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.detach().clone()
        clip(params, threshold)
        clipped = [p.grad for p in params]
        out[name] = {"norm": float(flat(clipped).norm()), "cosine": cosine(grads, clipped)}
    return out


# --------------------------------------------------------------------------------------------------
# Reading a run: spikes, clipped steps
# --------------------------------------------------------------------------------------------------

# A spike is a step whose training loss exceeds SPIKE_FACTOR times the median of the previous
# SPIKE_WINDOW steps' losses (or is not finite). The factor: the minibatch loss of the lab's cpu runs
# (16 x 64 characters) scatters by about 6 % (one standard deviation, measured) around its trend, so
# 1.3 (30 % above the recent median, about 5 standard deviations) is far outside the noise. The window:
# a median over 20 steps ignores a single outlier but follows the descent of the loss; while the loss
# falls, the median of the past lies above the present, so a fast descent is never taken for a spike.
# Consecutive flagged steps are one spike, counted at its first step.
SPIKE_FACTOR = 1.3
SPIKE_WINDOW = 20
SPIKE_MIN_HISTORY = 5          # a step needs at least this many earlier losses to be judged


def find_spikes(losses, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW,
                min_history: int = SPIKE_MIN_HISTORY) -> list[int]:
    """Steps where a spike starts: loss[t] > factor * median(loss[t - window : t]) or loss[t] not finite.

    In the first steps the median is over the min_history..window losses there are; the first
    min_history steps are never flagged. A run of consecutive flagged steps counts once.
    """
    if factor <= 1:
        raise ValueError(f"factor must be > 1 (a spike lies above the recent median), got {factor}")
    if window < 1 or not 1 <= min_history <= window:
        raise ValueError(f"need window >= 1 and 1 <= min_history <= window, got window={window}, "
                         f"min_history={min_history}")
    losses = np.asarray(losses, dtype=float)
    starts, previous = [], False
    for t in range(min_history, len(losses)):
        baseline = np.median(losses[max(0, t - window):t])
        flagged = not np.isfinite(losses[t]) or losses[t] > factor * baseline
        if flagged and not previous:
            starts.append(t)
        previous = flagged
    return starts


def clip_factors(grad_norms, max_norm: float | None, eps: float = 1e-6) -> np.ndarray:
    """Per step, what clipping multiplied the gradient by: min(1, c / (||g|| + eps)); all ones for None."""
    norms = np.asarray(grad_norms, dtype=float)
    if max_norm is None:
        return np.ones_like(norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.minimum(1.0, max_norm / (norms + eps))


def fraction_clipped(grad_norms, max_norm: float | None) -> float:
    """Fraction of steps whose pre-clip norm exceeded c (0 without clipping)."""
    if max_norm is None or len(grad_norms) == 0:
        return 0.0
    return float(np.mean(np.asarray(grad_norms, dtype=float) > max_norm))


def show_clip_threshold(max_norm: float, grad_norms, lr=None) -> dict:
    """Widget: the pre-clip norm trace with the threshold c drawn in, and what the clip does at each step.

    Left: ||g|| per step on a log axis, clipped steps marked. Right: the clip factor min(1, c/||g||) and,
    for plain SGD, the effective learning rate lr * min(1, c/||g||). Returns the figures it prints.
    """
    norms = np.asarray(grad_norms, dtype=float)
    steps = np.arange(len(norms))
    factors = clip_factors(norms, max_norm)
    clipped = norms > max_norm
    summary = {"c": max_norm, "fraction_clipped": float(clipped.mean()),
               "mean_factor": float(factors.mean()), "min_factor": float(factors.min())}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
    left.semilogy(steps, norms, lw=0.8, color="0.4", label="pre-clip norm")
    left.scatter(steps[clipped], norms[clipped], s=8, color="C3", label="clipped steps", zorder=3)
    left.axhline(max_norm, color="C3", ls="--", label=f"c = {max_norm:g}")
    left.set(title=f"{100 * summary['fraction_clipped']:.1f} % of steps clipped at c = {max_norm:g}",
             xlabel="step", ylabel="gradient norm ||g|| (log)")
    left.legend(loc="upper right", fontsize=8)
    right.plot(steps, factors, color="C3", lw=0.9, label="clip factor min(1, c/||g||)")
    right.set(title=f"mean factor {summary['mean_factor']:.3f}, smallest {summary['min_factor']:.3g}",
              xlabel="step", ylabel="factor", ylim=(0, 1.05))
    if lr is not None:
        effective = np.asarray(lr, dtype=float) * factors
        twin = right.twinx()
        twin.plot(steps, effective, color="C0", lw=0.9, label="SGD effective lr = lr x factor")
        twin.set_ylabel("effective learning rate")
        twin.set_ylim(0, 1.05 * max(float(np.max(lr)), 1e-12))
        twin.legend(loc="lower right", fontsize=8)
    right.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    plt.show()
    print(f"c = {max_norm:g}: {summary['fraction_clipped']:.1%} of {len(norms)} steps clipped; "
          f"mean factor {summary['mean_factor']:.3f}, smallest {summary['min_factor']:.3g}")
    return summary


# --------------------------------------------------------------------------------------------------
# The lecture's two small experiments
# --------------------------------------------------------------------------------------------------


def adam_updates(grads: torch.Tensor, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 max_norm: float | None = None) -> torch.Tensor:
    """Feed torch.optim.Adam a fixed sequence of gradients (steps, dim); the norm of each step's update.

    With max_norm, each gradient is clipped to that norm before the step (as in a training loop).
    """
    theta = torch.nn.Parameter(torch.zeros(grads.shape[1], dtype=torch.float64))
    optimizer = torch.optim.Adam([theta], lr=lr, betas=betas, eps=eps)
    sizes = []
    for g in grads:
        theta.grad = g.clone()
        if max_norm is not None:
            clip_grad_norm([theta], max_norm)
        before = theta.detach().clone()
        optimizer.step()
        sizes.append(float((theta.detach() - before).norm()))
    return torch.tensor(sizes)


def spike_gradients(steps: int = 400, dim: int = 1000, typical_norm: float = 0.3, spike_step: int = 100,
                    spike_scale: float = 100.0, seed: int = 0) -> torch.Tensor:
    """Gradients (steps, dim) of i.i.d. Gaussian entries with norm about typical_norm; one step multiplied
    by spike_scale (spike_scale 1 gives the same sequence with no spike)."""
    if not 0 <= spike_step < steps:
        raise ValueError(f"spike_step must be in [0, steps={steps}), got {spike_step}")
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(steps, dim, generator=gen, dtype=torch.float64) * typical_norm / math.sqrt(dim)
    grads[spike_step] *= spike_scale
    return grads


def adam_recovery_steps(spike_scale: float, beta2: float) -> float:
    """Steps until a spike's share of Adam's second moment falls back to the size of the normal one.

    After a spike of S times the usual gradient, v holds an extra (1 - beta2) * S^2 * g^2 that decays
    as beta2^k; it matches the usual g^2 when (1 - beta2) * S^2 * beta2^k = 1, so
    k = ln((1 - beta2) * S^2) / ln(1 / beta2).
    """
    return math.log((1 - beta2) * spike_scale ** 2) / math.log(1 / beta2)


def adam_spike_demo(spike_scale: float = 100.0, max_norm: float = 1.0, betas=(0.9, 0.95), steps: int = 400,
                    spike_step: int = 100, typical_norm: float = 0.3, dim: int = 1000, lr: float = 1e-3,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Adam's update sizes on the same gradient stream: without a spike, with one, and with one clipped at c.

    Returns {'no spike', 'spike', 'spike, clipped'} -> update norm per step, plus 'spike_step'.
    """
    kwargs = dict(steps=steps, dim=dim, typical_norm=typical_norm, spike_step=spike_step, seed=seed)
    calm, spiky = spike_gradients(spike_scale=1.0, **kwargs), spike_gradients(spike_scale=spike_scale, **kwargs)
    return {"no spike": adam_updates(calm, lr, betas).numpy(),
            "spike": adam_updates(spiky, lr, betas).numpy(),
            "spike, clipped": adam_updates(spiky, lr, betas, max_norm=max_norm).numpy(),
            "spike_step": spike_step}


def plot_adam_spike(demo: dict, ax=None):
    """Update norm relative to the no-spike run, per step, for the spike with and without clipping."""
    ax = ax or plt.subplots(figsize=(7, 3.4))[1]
    base = demo["no spike"]
    colors = colors_for(["spike", "spike, clipped"])
    for label in ("spike", "spike, clipped"):
        ax.semilogy(demo[label] / base, color=colors[label], label=label)
    ax.axvline(demo["spike_step"], color="0.5", ls=":", label="spike step")
    ax.set(title="Adam's update size after one gradient spike", xlabel="step",
           ylabel="||update|| / ||update without spike|| (log)")
    ax.legend()
    return ax


def decay_seen_by_clip(weight: torch.Tensor, data_grad: torch.Tensor, weight_decay: float,
                       max_norm: float) -> dict[str, dict]:
    """Where the decay term is when the clip runs, for the three ways of adding weight decay.

    - 'adamw': p.grad holds the data gradient only; decay is applied by the step: theta *= 1 - lr * wd.
    - 'l2 in the loss': loss + wd/2 ||theta||^2, so backward puts g + wd * theta in p.grad and the clip
      scales the decay with the data gradient.
    - 'torch Adam(weight_decay)': p.grad holds g at the clip; Adam adds wd * theta inside step(), after
      the clip, so the decay passes through Adam's moments but is not clipped.
    For each: the norm the clip saw, its factor, and the size of the decay term that reaches the optimizer.
    """
    out = {}
    for name in ("adamw", "l2 in the loss", "torch Adam(weight_decay)"):
        theta = torch.nn.Parameter(weight.detach().clone())
        data_loss = (theta * data_grad).sum()              # d/dtheta = data_grad
        loss = data_loss + weight_decay / 2 * theta.pow(2).sum() if name == "l2 in the loss" else data_loss
        loss.backward()
        seen = float(clip_grad_norm([theta], max_norm))
        factor = min(1.0, max_norm / (seen + 1e-6))
        # the decay term the optimizer receives: scaled by the clip only where it was in p.grad
        decay = weight_decay * float(weight.norm()) * (factor if name == "l2 in the loss" else 1.0)
        out[name] = {"norm_seen_by_clip": seen, "clip_factor": factor, "decay_term_norm": decay,
                     "clipped_grad": theta.grad.detach().clone()}
    return out
