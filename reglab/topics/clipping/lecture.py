"""Gradient clipping: scale the whole gradient down to norm c when it is longer, and measure what that does.

- `clip_grad_norm` is the reference global-norm clipping (what `torch.nn.utils.clip_grad_norm_` does);
  `clip_grad_norm_per_tensor` and `clip_grad_value` are the variants that change the gradient's direction.
- `find_spikes` says precisely what a loss spike is; `fraction_clipped` and `clip_factors` read a recorded
  trace of pre-clip norms.
- `adam_spike_demo` and `decay_seen_by_clip` are the two small experiments of the lecture (Adam's moments
  after a spike; where weight decay sits relative to the clip).
- `SETTINGS` (per budget), `clip_sweep`, `warmup_runs`, `adamw_runs` and `summarize` run the lab's
  experiment: the course transformer on characters, no warmup, at a learning rate too high for it;
  SGD with momentum at several thresholds c, and a pair of AdamW runs without and with c = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import numpy as np
import torch

from reglab.budget import by_budget
from reglab.model import GPTConfig
from reglab.plots import colors_for
from reglab.train import History, NonFiniteLossError, TrainConfig, new_model, train

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


# --------------------------------------------------------------------------------------------------
# The lab's experiment: a sweep over c at a high learning rate without warmup
# --------------------------------------------------------------------------------------------------


def sgd_momentum(groups, lr, betas, eps):
    """SGD with heavy-ball momentum betas[0], in the trainer's optimizer interface (eps is not used).

    Its step is lr times the (clipped) gradient's running sum, so the clip bounds the step directly: the
    setting of Zhang et al. (2020), where clipping is what lets a large learning rate survive sharp regions.
    """
    return torch.optim.SGD(groups, lr=lr, momentum=betas[0])


@dataclass(frozen=True)
class ClipLabSettings:
    """One budget's experiment: the course transformer on the character corpus, no warmup, cosine decay.

    The sweep over c uses SGD with momentum, whose step the clip bounds; a pair of AdamW runs at a high
    learning rate shows what the same clip changes for Adam, whose step it does not bound (lecture, section 4).
    """
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    batch_size: int
    steps: int
    eval_every: int
    seeds: int                 # runs per setting: seed, seed + 1, ...
    lr: float = 1.0            # SGD's peak lr: unclipped, the first large gradients throw the run out (measured)
    momentum: float = 0.9      # heavy-ball momentum of SGD
    warmup_steps: int = 50     # only in the warmup comparison; the sweep starts at the peak lr
    clips: tuple = (None, 1.0, 0.25, 0.05)   # the thresholds c swept; None means no clipping
    adamw_lr: float = 5e-2     # about 10x what this model trains best with: early spikes without warmup
    adamw_betas: tuple = (0.9, 0.95)          # GPT-3's betas (Brown et al. 2020, App. B)
    adamw_weight_decay: float = 0.1           # GPT-3's lambda (App. B)

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd)

    def train_config(self, grad_clip: float | None, warmup_steps: int = 0, optimizer: str = "sgd") -> TrainConfig:
        """SGD with momentum (weight decay 0: coupled L2 at lr 1 would dominate the step), or AdamW."""
        if optimizer == "sgd":
            return TrainConfig(steps=self.steps, lr=self.lr, warmup_steps=warmup_steps, schedule="cosine",
                               weight_decay=0.0, betas=(self.momentum, 0.999), optimizer=sgd_momentum,
                               grad_clip=grad_clip, eval_every=self.eval_every)
        if optimizer == "adamw":
            return TrainConfig(steps=self.steps, lr=self.adamw_lr, warmup_steps=warmup_steps, schedule="cosine",
                               weight_decay=self.adamw_weight_decay, betas=self.adamw_betas, optimizer="adamw",
                               grad_clip=grad_clip, eval_every=self.eval_every)
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")


SETTINGS = {
    # seconds: the code paths of the cpu run at toy size; no effect is expected or asserted
    "ci": ClipLabSettings(n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=8, steps=24, eval_every=12,
                          seeds=1, warmup_steps=6),
    # measured on 2 shared CPU cores (seeds 0, 1): unclipped SGD at lr 1 diverged at steps 11 and 13; c = 1
    # trained both seeds to val loss 2.51; a 50-step warmup without clipping only postponed it (steps 60, 103)
    "cpu": ClipLabSettings(n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=16, steps=400, eval_every=50,
                           seeds=2),
    # not measured yet: a wider, deeper model; 8 runs per seed of ~500 short steps on one GPU
    "gpu": ClipLabSettings(n_layer=4, n_embd=256, n_head=4, block_size=128, batch_size=32, steps=500,
                           eval_every=100, seeds=2),
}


def settings_for(budget: str) -> ClipLabSettings:
    return by_budget(budget, **SETTINGS)


def clip_label(grad_clip: float | None) -> str:
    return "none" if grad_clip is None else f"{grad_clip:g}"


@dataclass
class ClipRun:
    """One training run: its history (up to the divergence if it diverged) and what it was."""
    label: str
    seed: int
    grad_clip: float | None
    warmup_steps: int
    history: History
    diverged_at: int | None    # first step with a non-finite loss, None if the run finished

    @property
    def spikes(self) -> list[int]:
        return find_spikes(self.history.loss)

    @property
    def fraction_clipped(self) -> float:
        return fraction_clipped(self.history.grad_norm, self.grad_clip)

    @property
    def final_val_loss(self) -> float | None:
        return None if self.diverged_at is not None or not self.history.evals else self.history.final["val_loss"]


def run_one(label: str, gpt_config: GPTConfig, train_config: TrainConfig, task, seed: int,
            progress: bool = True) -> ClipRun:
    """Train a fresh model; a NaN/inf loss ends the run and is recorded, not raised."""
    model = new_model(gpt_config, seed=seed, device=task.device)
    config = replace(train_config, seed=seed, progress=progress)
    try:
        history, diverged_at = train(model, task, config, desc=f"{label} seed {seed}"), None
    except NonFiniteLossError as err:
        history, diverged_at = err.history, err.step
    return ClipRun(label, seed, train_config.grad_clip, train_config.warmup_steps, history, diverged_at)


def clip_sweep(settings: ClipLabSettings, task, vocab_size: int, seed: int = 0,
               progress: bool = True) -> dict[str, list[ClipRun]]:
    """SGD at every c of settings.clips, no warmup: {label ('none', '1', ...): [ClipRun per seed]}."""
    gpt = settings.gpt_config(vocab_size)
    return {clip_label(c): [run_one(clip_label(c), gpt, settings.train_config(c), task, seed + i, progress)
                            for i in range(settings.seeds)]
            for c in settings.clips}


def warmup_runs(settings: ClipLabSettings, task, vocab_size: int, seed: int = 0,
                progress: bool = True) -> dict[str, list[ClipRun]]:
    """SGD with a warmup instead of clipping, and with both: {'warmup, none': ..., 'warmup, 1': ...}."""
    gpt = settings.gpt_config(vocab_size)
    out = {}
    for c in (None, 1.0):
        label = f"warmup, {clip_label(c)}"
        out[label] = [run_one(label, gpt, settings.train_config(c, settings.warmup_steps), task, seed + i,
                              progress) for i in range(settings.seeds)]
    return out


def adamw_runs(settings: ClipLabSettings, task, vocab_size: int, seed: int = 0,
               progress: bool = True) -> dict[str, list[ClipRun]]:
    """AdamW at its high lr, no warmup, without and with c = 1: {'AdamW, none': ..., 'AdamW, 1': ...}."""
    gpt = settings.gpt_config(vocab_size)
    out = {}
    for c in (None, 1.0):
        label = f"AdamW, {clip_label(c)}"
        out[label] = [run_one(label, gpt, settings.train_config(c, optimizer="adamw"), task, seed + i, progress)
                      for i in range(settings.seeds)]
    return out


def summarize(results: dict[str, list[ClipRun]]) -> dict[str, dict]:
    """Per setting: spikes per seed, final val loss (mean over the seeds that finished), fraction clipped,
    and the step each seed diverged at (None where it finished)."""
    out = {}
    for label, runs in results.items():
        finals = [r.final_val_loss for r in runs if r.final_val_loss is not None]
        out[label] = {"spikes": [len(r.spikes) for r in runs],
                      "final_val_loss": float(np.mean(finals)) if finals else None,
                      "fraction_clipped": float(np.mean([r.fraction_clipped for r in runs])),
                      "diverged_at": [r.diverged_at for r in runs]}
    return out


def plot_sweep(results: dict[str, list[ClipRun]], colors: dict | None = None):
    """Left: training loss per step (every seed); right: the pre-clip gradient norm per step (log axis)."""
    colors = colors or colors_for(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    for label, runs in results.items():
        for i, run in enumerate(runs):
            loss = np.asarray(run.history.loss, dtype=float)
            name = f"c = {label}" if i == 0 else None
            left.plot(loss, color=colors[label], lw=0.8, alpha=0.85, label=name)
            left.scatter(run.spikes, loss[run.spikes] if run.spikes else [], color=colors[label], marker="v",
                         s=30, zorder=3)
            right.semilogy(run.history.grad_norm, color=colors[label], lw=0.7, alpha=0.85, label=name)
    left.set(title="training loss (triangles: spikes)", xlabel="step", ylabel="loss (nats per character)")
    finite = [x for runs in results.values() for r in runs for x in r.history.loss if math.isfinite(x)]
    if finite:
        left.set_ylim(min(finite) * 0.95, min(max(finite), 2 * np.median(finite)) * 1.05)
    right.set(title="pre-clip gradient norm", xlabel="step", ylabel="||g|| (log)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def show_sweep_result(label: str, results: dict[str, list[ClipRun]], colors: dict | None = None) -> dict:
    """Widget: one setting of the sweep highlighted over the others, with its figures printed."""
    colors = colors or colors_for(results)
    runs = results[label]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6))
    for other, other_runs in results.items():
        highlight = other == label
        for run in other_runs:
            kwargs = dict(color=colors[other] if highlight else "0.8", lw=1.0 if highlight else 0.6,
                          zorder=3 if highlight else 1)
            left.plot(run.history.loss, **kwargs)
            right.semilogy(run.history.grad_norm, **kwargs)
    c = runs[0].grad_clip
    if c is not None:
        right.axhline(c, color=colors[label], ls="--", label=f"c = {c:g}")
        right.legend(fontsize=8)
    summary = summarize({label: runs})[label]
    left.set(title=f"c = {label}: spikes {summary['spikes']}, final val loss "
                   f"{summary['final_val_loss'] if summary['final_val_loss'] is None else round(summary['final_val_loss'], 3)}",
             xlabel="step", ylabel="training loss (nats per character)")
    finite = [x for rs in results.values() for r in rs for x in r.history.loss if math.isfinite(x)]
    if finite:
        left.set_ylim(min(finite) * 0.95, min(max(finite), 2 * np.median(finite)) * 1.05)
    right.set(title=f"pre-clip norm: {summary['fraction_clipped']:.1%} of steps clipped", xlabel="step",
              ylabel="||g|| (log)")
    fig.tight_layout()
    plt.show()
    print(f"c = {label}: {summary}")
    return summary
