"""Topic gradient clipping, lab: the course transformer at too high a learning rate, no warmup, swept over the clip c.

SGD with momentum at several thresholds c (the clip bounds its step), the same with a warmup instead,
and a pair of AdamW runs without and with c = 1; settings per budget (`SETTINGS`, picked with
`settings_for`), the runs (through `reglab.train.sweep`, which records a divergence instead of
raising), their summary and the lab's plots. Clipping itself and the spike detector are in the
lecture module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from reglab.budget import by_budget
from reglab.experiments import Design, record
from reglab.model import GPTConfig
from reglab.plots import colors_for, plot_highlighted
# SPIKE_FACTOR and SPIKE_WINDOW: the spike definition the lab's record states
from reglab.topics.clipping.lecture import SPIKE_FACTOR, SPIKE_WINDOW, find_spikes, fraction_clipped  # noqa: F401
from reglab.train import Run, TrainConfig, sweep


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
    open_budget: int           # optimizer steps the open experiment's runs may spend in all (one seed each)
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

    def train_config(self, grad_clip: float | None, warmup_steps: int = 0, optimizer: str = "sgd",
                     lr: float | None = None, steps: int | None = None) -> TrainConfig:
        """SGD with momentum (weight decay 0: coupled L2 at lr 1 would dominate the step), or AdamW.
        lr and steps default to the sweep's (the optimizer's own peak lr, settings.steps)."""
        steps = steps or self.steps
        if optimizer == "sgd":
            return TrainConfig(steps=steps, lr=lr or self.lr, warmup_steps=warmup_steps, schedule="cosine",
                               weight_decay=0.0, betas=(self.momentum, 0.999), optimizer=sgd_momentum,
                               grad_clip=grad_clip, eval_every=min(self.eval_every, steps))
        if optimizer == "adamw":
            return TrainConfig(steps=steps, lr=lr or self.adamw_lr, warmup_steps=warmup_steps, schedule="cosine",
                               weight_decay=self.adamw_weight_decay, betas=self.adamw_betas, optimizer="adamw",
                               grad_clip=grad_clip, eval_every=min(self.eval_every, steps))
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")


# The open experiment's budget: six runs of half the sweep's steps (a ladder of three learning rates per arm,
# with and without a clip), since a too-high lr without warmup diverges within the first steps (unclipped SGD
# at lr 1 on the cpu budget: steps 11 and 13) while the learning rate is still near its peak. That is 3 of
# the sweep's 8 settings x seeds runs in steps: the lab's time grows by about a fifth (counted in steps,
# not timed).
SETTINGS = {
    # seconds: the code paths of the cpu run at toy size; no effect is expected or asserted
    "ci": ClipLabSettings(n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=8, steps=24, eval_every=12,
                          seeds=1, open_budget=72, warmup_steps=6),
    # measured on 2 shared CPU cores (seeds 0, 1): unclipped SGD at lr 1 diverged at steps 11 and 13; c = 1
    # trained both seeds to val loss 2.51; a 50-step warmup without clipping only postponed it (steps 60, 103)
    "cpu": ClipLabSettings(n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=16, steps=400, eval_every=50,
                           seeds=2, open_budget=1200),
    # not measured yet: a wider, deeper model; 8 runs per seed of ~500 short steps on one GPU
    "gpu": ClipLabSettings(n_layer=4, n_embd=256, n_head=4, block_size=128, batch_size=32, steps=500,
                           eval_every=100, seeds=2, open_budget=1500),
}


def settings_for(budget: str) -> ClipLabSettings:
    return by_budget(budget, **SETTINGS)


def clip_label(grad_clip: float | None) -> str:
    return "none" if grad_clip is None else f"{grad_clip:g}"


def final_val_loss(run: Run) -> float | None:
    """The last evaluation's val loss; None for a run that diverged (or was never evaluated)."""
    return None if run.diverged_at is not None or not run.history.evals else run.history.final["val_loss"]


def run_one(label: str, gpt_config: GPTConfig, train_config: TrainConfig, task, seed: int,
            progress: bool = True) -> Run:
    """Train a fresh model; a NaN/inf loss ends the run and is recorded (Run.diverged_at), not raised."""
    return sweep({label: (gpt_config, train_config)}, task, seeds=(seed,), progress=progress,
                 diverged="record")[label][0]


def _sweep(runs: dict, settings: ClipLabSettings, task, seed: int, progress: bool) -> dict[str, list[Run]]:
    return sweep(runs, task, seeds=range(seed, seed + settings.seeds), progress=progress, diverged="record")


def clip_sweep(settings: ClipLabSettings, task, vocab_size: int, seed: int = 0,
               progress: bool = True) -> dict[str, list[Run]]:
    """SGD at every c of settings.clips, no warmup: {label ('none', '1', ...): [Run per seed]}."""
    gpt = settings.gpt_config(vocab_size)
    return _sweep({clip_label(c): (gpt, settings.train_config(c)) for c in settings.clips}, settings, task, seed,
                  progress)


def warmup_runs(settings: ClipLabSettings, task, vocab_size: int, seed: int = 0,
                progress: bool = True) -> dict[str, list[Run]]:
    """SGD with a warmup instead of clipping, and with both: {'warmup, none': ..., 'warmup, 1': ...}."""
    gpt = settings.gpt_config(vocab_size)
    return _sweep({f"warmup, {clip_label(c)}": (gpt, settings.train_config(c, settings.warmup_steps))
                   for c in (None, 1.0)}, settings, task, seed, progress)


def adamw_runs(settings: ClipLabSettings, task, vocab_size: int, seed: int = 0,
               progress: bool = True) -> dict[str, list[Run]]:
    """AdamW at its high lr, no warmup, without and with c = 1: {'AdamW, none': ..., 'AdamW, 1': ...}."""
    gpt = settings.gpt_config(vocab_size)
    return _sweep({f"AdamW, {clip_label(c)}": (gpt, settings.train_config(c, optimizer="adamw"))
                   for c in (None, 1.0)}, settings, task, seed, progress)


# --------------------------------------------------------------------------------------------------
# The open experiment: the largest stable learning rate with and without clipping, within a step budget
# --------------------------------------------------------------------------------------------------

def lr_clip_problems(lr, clip) -> list[str]:
    """What is wrong with a run's (lr, clip); [] when nothing is."""
    problems = []
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        problems.append(f"lr must be a positive number, got {lr!r}")
    if not (clip is None or (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0)):
        problems.append(f"clip must be None (no clipping) or a positive threshold, got {clip!r}")
    return problems


def both_arms(runs: dict) -> list[str]:
    """The question compares with and without clipping: a design needs a run of each."""
    clips = [clip for _, clip, _ in runs.values()]
    missing = [arm for arm, present in (("without clipping (clip None)", None in clips),
                                        ("with clipping (a threshold)", any(c is not None for c in clips)))
               if not present]
    return [f"the design needs a run {arm}" for arm in missing]


# a run may end early: at its first non-finite loss (sweep(..., diverged="record"))
OPEN_DESIGN = Design(knobs=("lr", "clip"), knob_problems=lr_clip_problems, design_rules=both_arms,
                     may_stop_early=True)


def open_experiment(settings: ClipLabSettings, task, vocab_size: int, design, seed: int = 0,
                    progress: bool = True) -> dict[str, list[Run]]:
    """Run the student's design (a function of the settings returning {label: (lr, clip, steps)}): SGD with
    momentum as in the sweep, no warmup, one seed each; a divergence ends a run and is recorded.

    Refuses a design that spends more than settings.open_budget optimizer steps in all, before training."""
    runs = OPEN_DESIGN.planned(design, settings)
    gpt = settings.gpt_config(vocab_size)
    configs = {name: (gpt, settings.train_config(None if clip is None else float(clip), lr=float(lr), steps=steps))
               for name, (lr, clip, steps) in runs.items()}
    return sweep(configs, task, seeds=(seed,), progress=progress, diverged="record")


def open_record(settings: ClipLabSettings, runs: dict, results: dict[str, list[Run]]) -> dict:
    """Each run's lr, clip, steps, the step it diverged at (None: it finished) and final val loss; and per clip
    ('none', '1', ...) the largest lr that did not diverge (None: every run of that clip diverged)."""
    found = {}
    for name, (lr, clip, steps) in runs.items():
        run = results[name][0]
        found[name] = {"lr": float(lr), "clip": None if clip is None else float(clip), "steps": steps,
                       "steps_trained": len(run.history.loss), "diverged_at": run.diverged_at,
                       "final_val_loss": final_val_loss(run)}
    largest = {}
    for row in found.values():
        arm = clip_label(row["clip"])
        stable = row["diverged_at"] is None
        largest[arm] = max(largest.get(arm) or 0.0, row["lr"]) if stable else largest.get(arm)
    return record(settings.open_budget, found, largest_stable_lr=largest)


def open_graded(settings: ClipLabSettings, design) -> dict:
    """The design as the grader runs it (the built-in corpus, the CPU, seed 0, no progress bars): its record."""
    from reglab.data import corpus_task
    text, task = corpus_task("builtin", settings.block_size, settings.batch_size, device="cpu")
    return open_record(settings, design(settings), open_experiment(settings, task, text.vocab_size, design,
                                                                   progress=False))


def summarize(results: dict[str, list[Run]]) -> dict[str, dict]:
    """Per setting: spikes per seed, final val loss (mean over the seeds that finished), fraction clipped,
    and the step each seed diverged at (None where it finished)."""
    out = {}
    for label, runs in results.items():
        finals = [final_val_loss(r) for r in runs if final_val_loss(r) is not None]
        out[label] = {"spikes": [len(find_spikes(r.history.loss)) for r in runs],
                      "final_val_loss": float(np.mean(finals)) if finals else None,
                      "fraction_clipped": float(np.mean([fraction_clipped(r.history.grad_norm, r.config.grad_clip)
                                                         for r in runs])),
                      "diverged_at": [r.diverged_at for r in runs]}
    return out


def _loss_limits(ax, results: dict[str, list[Run]]):
    """y-limits that show the finite losses but cut the divergences off at twice the median."""
    finite = [x for runs in results.values() for r in runs for x in r.history.loss if math.isfinite(x)]
    if finite:
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 2 * np.median(finite)) * 1.05)


def _plot_loss_and_norm(left, right, results: dict[str, list[Run]], colors: dict, chosen=None):
    """Training loss (left) and pre-clip gradient norm (right, log axis) per step, every seed."""
    for ax, key in ((left, "loss"), (right, "grad_norm")):
        curves = {label: [(np.arange(len(getattr(r.history, key))), getattr(r.history, key)) for r in runs]
                  for label, runs in results.items()}
        plot_highlighted(ax, curves, chosen, colors, legend=None if chosen else "c = {}", lw=0.8)
    right.set_yscale("log")
    _loss_limits(left, results)


def plot_sweep(results: dict[str, list[Run]], colors: dict | None = None):
    """Left: training loss per step (every seed; triangles: spikes); right: pre-clip gradient norm (log axis)."""
    colors = colors or colors_for(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    _plot_loss_and_norm(left, right, results, colors)
    for label, runs in results.items():
        for run in runs:
            spikes = find_spikes(run.history.loss)
            left.scatter(spikes, np.asarray(run.history.loss, dtype=float)[spikes] if spikes else [],
                         color=colors[label], marker="v", s=30, zorder=3)
    left.set(title="training loss (triangles: spikes)", xlabel="step", ylabel="loss (nats per character)")
    right.set(title="pre-clip gradient norm", xlabel="step", ylabel="||g|| (log)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def show_sweep_result(label: str, results: dict[str, list[Run]], colors: dict | None = None) -> dict:
    """Widget: one setting of the sweep highlighted over the others, with its figures printed."""
    colors = colors or colors_for(results)
    runs = results[label]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6))
    _plot_loss_and_norm(left, right, results, colors, chosen=label)
    c = runs[0].config.grad_clip
    if c is not None:
        right.axhline(c, color=colors[label], ls="--", label=f"c = {c:g}")
        right.legend(fontsize=8)
    summary = summarize({label: runs})[label]
    left.set(title=f"c = {label}: spikes {summary['spikes']}, final val loss "
                   f"{summary['final_val_loss'] if summary['final_val_loss'] is None else round(summary['final_val_loss'], 3)}",
             xlabel="step", ylabel="training loss (nats per character)")
    right.set(title=f"pre-clip norm: {summary['fraction_clipped']:.1%} of steps clipped", xlabel="step",
              ylabel="||g|| (log)")
    fig.tight_layout()
    plt.show()
    print(f"c = {label}: {summary}")
    return summary
