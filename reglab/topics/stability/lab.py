"""Topic training stability, lab: the final loss against the learning rate, with and without qk-norm and z-loss.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities") reproduce
two instabilities of large runs in small models by raising the learning rate: attention logits that grow
until the softmax saturates (§3.1.1; qk-layernorm, Dehghani et al. 2023, removes it) and output logits
that drift away from log-probabilities (§3.1.2; the z-loss of PaLM, Chowdhery et al. 2022 §5, pins
them). The lab's experiments, all through `reglab.train.sweep` (a run that diverges is recorded, not
raised):
1. the final val loss against the peak lr, log-spaced over two decades and more, for three variants
   (baseline, qk-norm, qk-norm + z-loss) and several seeds; the LR sensitivity of each (§2.2) from it;
2. the max attention logit and log Z against step at the highest lr (the runs of 1, read at each evaluation);
3. the z-loss coefficient swept at the highest lr with qk-norm;
4. the open experiment: the largest stable lr with and without qk-norm within a budget of optimizer steps.
Warmup is short and there is neither clipping nor weight decay, so that only the two fixes differ.
Tune a budget by editing its entry in SETTINGS; nothing else in the lab holds a size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from reglab.budget import by_budget
from reglab.experiments import Design, record
from reglab.model import GPTConfig
from reglab.plots import colors_for, plot_highlighted
from reglab.train import Run, TrainConfig, sweep

BASELINE, QK_NORM, QK_NORM_Z = "baseline", "qk-norm", "qk-norm + z-loss"
VARIANTS = (BASELINE, QK_NORM, QK_NORM_Z)


@dataclass(frozen=True)
class StabilityLabSettings:
    """Everything the stability lab's experiments depend on, for one budget."""
    n_seeds: int                 # seeds per setting (seed, seed + 1, ...); min-max bands and verdicts need >= 2
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int              # characters of context
    batch_size: int              # windows per step
    steps: int                   # optimizer steps of every run
    eval_every: int              # the curves of experiment 2 have steps / eval_every points
    lrs: tuple[float, ...]       # the peak lrs swept, log-spaced; the last is experiment 2's "high lr"
    z_loss: float                # the z-loss coefficient of the "qk-norm + z-loss" variant
    z_coefs: tuple[float, ...]   # experiment 3: coefficients at the high lr with qk-norm (0 and z_loss come from 1)
    warmup_steps: int = 10       # short: a long warmup hides the instabilities (Wortsman et al. 2023, §3.2.1)
    open_budget: int = 0         # experiment 4's budget of optimizer steps, all runs together (one seed each)
    z_seeds: int = 1             # seeds of experiment 3's extra runs
    workers: int | str = 1       # runs trained at once, one process and one core each ("auto": every core);
                                 # ci stays at 1 (the grader's sandbox runs one process per submission)

    @property
    def high_lr(self) -> float:
        return max(self.lrs)

    def gpt(self, vocab_size: int, qk_norm: bool = False) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, qk_norm=qk_norm)

    def train_config(self, lr: float, z_loss: float = 0.0, steps: int | None = None) -> TrainConfig:
        """AdamW, warmup then cosine to lr / 10, no clipping and no weight decay: only the fixes differ."""
        steps = steps or self.steps
        return TrainConfig(steps=steps, lr=lr, warmup_steps=min(self.warmup_steps, steps), weight_decay=0.0,
                           grad_clip=None, z_loss=z_loss, eval_every=min(self.eval_every, steps))

    def variant(self, name: str) -> tuple[bool, float]:
        """(qk_norm, z_loss) of a variant of experiment 1."""
        table = {BASELINE: (False, 0.0), QK_NORM: (True, 0.0), QK_NORM_Z: (True, self.z_loss)}
        if name not in table:
            raise ValueError(f"unknown variant {name!r}; the lab's variants are {VARIANTS}")
        return table[name]


SETTINGS = {
    # seconds on one CPU thread: a toy model, three lrs, every code path of the cpu run; no effect expected
    "ci": StabilityLabSettings(n_seeds=2, n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=8, steps=30,
                               eval_every=10, lrs=(3e-3, 3e-2, 3e-1), z_loss=1e-2, z_coefs=(1e-1,),
                               warmup_steps=3, open_budget=60),
    # 2 layers x 64, 300 steps (warmup 30), 5 lrs x 3 variants x 2 seeds + 3 z-loss runs + a 600-step open
    # experiment: 10,500 optimizer steps. Tried on a loaded 2-core machine (one thread, other jobs running;
    # the lead times it idle), seeds 0 and 1, final val loss at lr 3e-3 / 1e-2 / 3e-2 / 1e-1 / 3e-1:
    #   baseline         2.283 2.434 2.577 2.861 3.219  |  2.300 2.474 2.751 2.860 3.217   LR sensitivity 0.39 / 0.42
    #   qk-norm          2.239 2.409 2.395 2.461 2.626  |  2.242 2.417 2.624 2.498 2.816   0.19 / 0.28
    #   qk-norm + z 1e-2 2.251 2.352 2.396 2.500 2.525  |  2.247 2.438 2.445 2.602 2.841   0.15 / 0.27
    # so qk-norm lowers the LR sensitivity beyond the seed spread and z-loss does not change it clearly; at
    # lr 3e-1 the final max attention logit is ~1e5 without qk-norm and ~20 with it, and |log Z| 5.6-6.3 with
    # qk-norm alone against 0.1-0.5 with z-loss 1e-2. (Also tried: 200 steps, where qk-norm's gain in LR
    # sensitivity stayed within the seed spread; lr 1.0, where log Z reached ~400 and neither fix rescued the
    # run; z-loss 1e-4 and 1e-3, which left log Z near 4-6 within 300 steps; lr 1e-3, 2.38 / 2.39 and 2.34 /
    # 2.35, above both optima, left out to save time.) A 300-step run took 10-30 s there, with the load.
    "cpu": StabilityLabSettings(n_seeds=2, n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=16, steps=300,
                                eval_every=50, lrs=(3e-3, 1e-2, 3e-2, 1e-1, 3e-1), z_loss=1e-2,
                                z_coefs=(1e-4, 1e-3, 1e-1), warmup_steps=30, open_budget=600, workers="auto"),
    # not measured: nanoGPT's baby-GPT shape (6 layers, 384 wide, 10.7M parameters), the same lrs and three
    # seeds: 54 runs of 1000 steps, expected to take tens of minutes on one GPU
    "gpu": StabilityLabSettings(n_seeds=3, n_layer=6, n_embd=384, n_head=6, block_size=256, batch_size=64,
                                steps=1000, eval_every=50, lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), z_loss=1e-2,
                                z_coefs=(1e-4, 1e-3, 1e-1), warmup_steps=50, open_budget=4000, z_seeds=2),
}


def settings_for(budget: str) -> StabilityLabSettings:
    """The lab's settings for a budget ('ci', 'cpu', 'gpu' or 'auto')."""
    return by_budget(budget, **SETTINGS)


def lr_label(lr: float) -> str:
    return f"lr={lr:g}"


# ---------------------------------------------------------------------------------------------------
# Runners: each returns {label: [Run per seed]} of one reglab.train.sweep
# ---------------------------------------------------------------------------------------------------

def _seeds(n: int, seed: int) -> list[int]:
    return [seed + i for i in range(n)]


def lr_sweep(settings: StabilityLabSettings, task, vocab_size: int, seed: int = 0,
             progress: bool = True) -> dict[tuple[str, float], list[Run]]:
    """Experiment 1: every variant at every lr of settings.lrs; {(variant, lr): [Run per seed]}."""
    runs = {}
    for name in VARIANTS:
        qk_norm, z_loss = settings.variant(name)
        for lr in settings.lrs:
            runs[name, lr] = (settings.gpt(vocab_size, qk_norm), settings.train_config(lr, z_loss))
    return sweep(runs, task, seeds=_seeds(settings.n_seeds, seed), progress=progress, diverged="record",
                 workers=settings.workers)


def at_lr(results: dict, lr: float) -> dict[str, list[Run]]:
    """The runs of lr_sweep at one lr: {variant: [Run per seed]} (experiment 2 reads the high lr)."""
    found = {name: runs for (name, run_lr), runs in results.items() if run_lr == lr}
    if not found:
        raise ValueError(f"lr {lr:g} was not swept; the sweep has {sorted({l for _, l in results})}")
    return found


def z_sweep(settings: StabilityLabSettings, task, vocab_size: int, results: dict, seed: int = 0,
            progress: bool = True) -> dict[float, list[Run]]:
    """Experiment 3: qk-norm at the high lr with each z-loss coefficient; {coef: [Run per seed]}, sorted.

    Coefficients 0 and settings.z_loss are the runs of experiment 1 (their first z_seeds seeds); the
    others are trained here."""
    lr = settings.high_lr
    runs = {coef: (settings.gpt(vocab_size, True), settings.train_config(lr, coef))
            for coef in settings.z_coefs if coef not in (0.0, settings.z_loss)}
    found = sweep(runs, task, seeds=_seeds(settings.z_seeds, seed), progress=progress, diverged="record",
                 workers=settings.workers)
    found[0.0] = results[QK_NORM, lr][:settings.z_seeds]
    found[settings.z_loss] = results[QK_NORM_Z, lr][:settings.z_seeds]
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------------------------------
# What a run ended with, and the LR sensitivity (Wortsman et al. 2023, §2.2)
# ---------------------------------------------------------------------------------------------------

def initial_loss(vocab_size: int) -> float:
    """ln V: the loss of a uniform prediction, which a freshly initialized model (logits ~ 0) makes."""
    return math.log(vocab_size)


def final_loss(run: Run) -> float | None:
    """The last evaluation's val loss; None for a run that diverged or ended with a non-finite loss."""
    if run.diverged_at is not None or not run.history.evals:
        return None
    value = run.history.final["val_loss"]
    return value if math.isfinite(value) else None


def capped_loss(run: Run, loss_at_init: float) -> float:
    """min(final loss, loss at initialization); a diverged run counts as the loss at initialization."""
    value = final_loss(run)
    return loss_at_init if value is None else min(value, loss_at_init)


def lr_sensitivity(losses, loss_at_init: float) -> float:
    """Wortsman et al. 2023 (§2.2): E over the lr grid of [min(loss(lr), loss_0) - loss*], where loss* is the
    lowest loss over the grid and loss_0 the loss at initialization; losses: the final loss per lr, None
    for a diverged run (it counts as loss_0). 0 means every lr reaches the best loss."""
    capped = [loss_at_init if x is None or not math.isfinite(x) else min(x, loss_at_init) for x in losses]
    best = min(capped)
    return float(np.mean([x - best for x in capped]))


def final_stat(run: Run, key: str) -> float | None:
    """The last evaluation's value of key ("max_attn_logit", "log_z"); None when absent or not finite."""
    if not run.history.evals or key not in run.history.final:
        return None
    value = run.history.final[key]
    return value if math.isfinite(value) else None


def summarize(results: dict, settings: StabilityLabSettings, vocab_size: int) -> dict:
    """Per variant, from lr_sweep's results: the final val loss per lr and seed (None: diverged), the step
    each diverged at, the LR sensitivity per seed and its mean, and at the high lr the final max attention
    logit and |log Z| per seed and their means. Tables for `dropout_effect` (reglab.topics.dropout.lab)."""
    loss_at_init = initial_loss(vocab_size)
    table = {}
    for name in VARIANTS:
        per_lr = [results[name, lr] for lr in settings.lrs]             # [lr][seed]
        n_seeds = len(per_lr[0])
        finals = [[final_loss(run) for run in runs] for runs in per_lr]
        sensitivity = [lr_sensitivity([finals[i][s] for i in range(len(settings.lrs))], loss_at_init)
                       for s in range(n_seeds)]
        mean_capped = [np.mean([loss_at_init if x is None else min(x, loss_at_init) for x in row]) for row in finals]
        high = results[name, settings.high_lr]
        logits = [final_stat(run, "max_attn_logit") for run in high]
        log_z = [final_stat(run, "log_z") for run in high]
        table[name] = {
            "lrs": list(settings.lrs), "final_val_loss": finals,
            "diverged_at": [[run.diverged_at for run in runs] for runs in per_lr],
            "lr_sensitivity": float(np.mean(sensitivity)),
            "best_lr": settings.lrs[int(np.argmin(mean_capped))],
            "max_attn_logit": _mean(logits), "abs_log_z": _mean([None if z is None else abs(z) for z in log_z]),
            "per_seed": {"lr_sensitivity": sensitivity, "max_attn_logit": logits,
                         "abs_log_z": [None if z is None else abs(z) for z in log_z]}}
    return table


def _mean(values) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if len(finite) == len(values) and finite else None


def effects(table: dict) -> dict:
    """The lab's three verdicts, each by `dropout_effect` (the course's one verdict rule, against the seed
    spread): qk-norm against the baseline on the LR sensitivity and on the high lr's max attention logit;
    z-loss (added to qk-norm) against qk-norm alone on the high lr's |log Z|."""
    from reglab.topics.dropout.lab import dropout_effect
    out = {}
    for key, (baseline, setting) in (("lr_sensitivity", (BASELINE, QK_NORM)),
                                     ("max_attn_logit", (BASELINE, QK_NORM)),
                                     ("abs_log_z", (QK_NORM, QK_NORM_Z))):
        pair = {name: table[name] for name in (baseline, setting)}
        if any(pair[name][key] is None for name in pair):       # a run diverged before its last evaluation
            out[key] = None
            continue
        out[key] = dropout_effect(pair, baseline=baseline, key=key)
    return out


def effect_lines(found: dict) -> list[str]:
    """One sentence per verdict of `effects` (reglab.topics.dropout.lab.effect_sentence), or why there is none."""
    from reglab.topics.dropout.lab import effect_sentence
    names = {"lr_sensitivity": "LR sensitivity", "max_attn_logit": "max attention logit at the high lr",
             "abs_log_z": "|log Z| at the high lr"}
    return [f"{names[key]}: " + (effect_sentence(effect) if effect is not None else
                                 "not judged: a run diverged, so it has no final value")
            for key, effect in found.items()]


# ---------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------

def plot_lr_curves(ax, table: dict, colors: dict, vocab_size: int, highlight: str | None = None):
    """Final val loss against lr (log axis) per variant: the mean over seeds, the min-max band, and an x at
    ln V for each diverged run (a diverged run counts as the loss at initialization, as in the LR sensitivity)."""
    loss_at_init = initial_loss(vocab_size)
    for name, row in table.items():
        lrs = np.array(row["lrs"])
        capped = np.array([[loss_at_init if x is None else min(x, loss_at_init) for x in seeds]
                           for seeds in row["final_val_loss"]], dtype=float)          # (lrs, seeds)
        faded = highlight is not None and name != highlight
        alpha = 0.25 if faded else 1.0
        ax.plot(lrs, capped.mean(1), "o-", color=colors[name], alpha=alpha,
                label=f"{name} (LR sensitivity {row['lr_sensitivity']:.3f})")
        if capped.shape[1] > 1 and not faded:
            ax.fill_between(lrs, capped.min(1), capped.max(1), color=colors[name], alpha=0.15)
        diverged = [(lr, loss_at_init) for lr, seeds in zip(lrs, row["final_val_loss"]) for x in seeds if x is None]
        if diverged:
            ax.scatter(*zip(*diverged), marker="x", s=60, color=colors[name], alpha=alpha, zorder=3)
    ax.axhline(loss_at_init, color="grey", ls=":", lw=1, label=f"ln V = {loss_at_init:.2f} (x: a diverged run)")
    ax.set_xscale("log")
    ax.set(title="final val loss against the peak learning rate", xlabel="peak learning rate (log)",
           ylabel="final val loss (nats per character)")
    ax.legend(fontsize=7)
    return ax


def plot_stability_curves(runs: dict, colors: dict, title: str, highlight=None):
    """Max attention logit (log axis) and log Z against step, one line per seed, for {label: [Run per seed]}."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6))
    for ax, key in ((left, "max_attn_logit"), (right, "log_z")):
        curves = {label: [r.history.series(key) for r in per_seed if r.history.evals]
                  for label, per_seed in runs.items()}
        plot_highlighted(ax, curves, highlight, colors, "-", legend="{}")
    left.set_yscale("log")
    left.set(title="largest attention logit q.k / sqrt(hs)", xlabel="step", ylabel="max attention logit (log)")
    right.axhline(0.0, color="grey", ls=":", lw=1)
    right.set(title="log Z of the output logits (z-loss pulls it to 0)", xlabel="step", ylabel="mean log Z (nats)")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_lr(lr: float, results: dict, colors: dict) -> dict:
    """Widget: the three variants at one swept lr: training loss, max attention logit and log Z against
    step (every seed), and each variant's final figures printed and returned."""
    runs = at_lr(results, lr)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    for ax, key in zip(axes, ("loss", "max_attn_logit", "log_z")):
        for name, per_seed in runs.items():
            for i, run in enumerate(per_seed):
                x, y = ((np.arange(len(run.history.loss)), run.history.loss) if key == "loss"
                        else run.history.series(key))
                ax.plot(x, y, color=colors[name], lw=1, label=name if i == 0 else None)
        ax.set(xlabel="step", title={"loss": "training loss", "max_attn_logit": "max attention logit (log)",
                                     "log_z": "mean log Z"}[key])
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"peak lr {lr:g}")
    fig.tight_layout()
    plt.show()
    shown = {name: {"final_val_loss": [final_loss(r) for r in per_seed],
                    "max_attn_logit": [final_stat(r, "max_attn_logit") for r in per_seed],
                    "log_z": [final_stat(r, "log_z") for r in per_seed],
                    "diverged_at": [r.diverged_at for r in per_seed]} for name, per_seed in runs.items()}
    for name, row in shown.items():
        print(f"{name:>17}: {row}")
    return shown


def show_z_coef(coef: float, z_results: dict, colors: dict | None = None) -> dict:
    """Widget: experiment 3 with one z-loss coefficient highlighted (log Z and training loss against step);
    its final log Z and val loss printed and returned."""
    labels = {c: f"z={c:g}" for c in z_results}
    colors = colors or colors_for(labels.values())
    if coef not in z_results:
        raise ValueError(f"coefficient {coef:g} was not swept; the sweep has {list(z_results)}")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.4))
    log_z = {labels[c]: [r.history.series("log_z") for r in runs] for c, runs in z_results.items()}
    loss = {labels[c]: [(np.arange(len(r.history.loss)), r.history.loss) for r in runs]
            for c, runs in z_results.items()}
    plot_highlighted(left, log_z, labels[coef], colors)
    plot_highlighted(right, loss, labels[coef], colors, lw=0.8)
    left.axhline(0.0, color="grey", ls=":", lw=1)
    left.set(title=f"log Z, z-loss coefficient {coef:g} highlighted", xlabel="step", ylabel="mean log Z (nats)")
    right.set(title="training loss (CE + z-loss term)", xlabel="step", ylabel="loss (nats per character)")
    left.legend(fontsize=7)
    fig.tight_layout()
    plt.show()
    runs = z_results[coef]
    shown = {"coef": coef, "final_log_z": [final_stat(r, "log_z") for r in runs],
             "final_val_loss": [final_loss(r) for r in runs]}
    print(shown)
    return shown


def z_record(z_results: dict) -> dict:
    """Experiment 3 for the record: per coefficient, the final log Z and val loss per seed."""
    return {f"{coef:g}": {"final_log_z": [final_stat(r, "log_z") for r in runs],
                          "final_val_loss": [final_loss(r) for r in runs],
                          "diverged_at": [r.diverged_at for r in runs]} for coef, runs in z_results.items()}


# ---------------------------------------------------------------------------------------------------
# The open experiment: the largest lr that stays stable, with and without qk-norm, within a step budget
# ---------------------------------------------------------------------------------------------------

STABLE_MARGIN = 0.1   # nats: a run is stable if it finished within this of the best final loss of its kind


def qk_lr_problems(qk_norm, lr) -> list[str]:
    """What is wrong with a run's (qk_norm, lr); [] when nothing is."""
    problems = []
    if not isinstance(qk_norm, bool):
        problems.append(f"qk_norm must be True or False, got {qk_norm!r}")
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr <= 10):
        problems.append(f"lr must be a number in (0, 10], got {lr!r}")
    return problems


def both_kinds(runs: dict) -> list[str]:
    """The question compares with and without qk-norm: a design needs a run of each."""
    if {qk_norm for qk_norm, _, _ in runs.values()} != {True, False}:
        return ["the question compares: the design needs runs with qk_norm=True and with qk_norm=False"]
    return []


# a run may end early: at its first non-finite loss (sweep(..., diverged="record"))
OPEN_DESIGN = Design(knobs=("qk_norm", "lr"), knob_problems=qk_lr_problems, design_rules=both_kinds,
                     may_stop_early=True)


def open_experiment(settings: StabilityLabSettings, task, vocab_size: int, design, seed: int = 0,
                    progress: bool = True) -> dict[str, list[Run]]:
    """Run the student's design (a function of the settings returning {label: (qk_norm, lr, steps)}) with the
    lab's sweep, one seed each, no z-loss; a divergence ends a run and is recorded. Returns {label: [Run]}
    like the other runners.

    Refuses a design that spends more than settings.open_budget optimizer steps in all, before training."""
    runs = OPEN_DESIGN.planned(design, settings)
    configs = {name: (settings.gpt(vocab_size, qk_norm), settings.train_config(float(lr), steps=steps))
               for name, (qk_norm, lr, steps) in runs.items()}
    return sweep(configs, task, seeds=[seed], progress=progress, diverged="record",
                 workers=settings.workers)


def open_record(settings: StabilityLabSettings, runs: dict, results: dict) -> dict:
    """The open experiment for the record: the budget, the steps spent, each run's setting and outcome, and
    per kind (qk-norm or not) the largest lr whose run is stable: it did not diverge and its final val loss
    is within STABLE_MARGIN of the lowest final loss among the design's runs of that kind."""
    found = {}
    for name, (qk_norm, lr, steps) in runs.items():
        run = results[name][0]
        found[name] = {"qk_norm": qk_norm, "lr": float(lr), "steps": steps, "steps_trained": len(run.history.loss),
                       "final_val_loss": final_loss(run), "diverged_at": run.diverged_at,
                       "max_attn_logit": final_stat(run, "max_attn_logit")}
    largest = {}
    for kind, key in ((True, QK_NORM), (False, BASELINE)):
        mine = [row for row in found.values() if row["qk_norm"] is kind]
        finished = [row["final_val_loss"] for row in mine if row["final_val_loss"] is not None]
        stable = [row["lr"] for row in mine if row["final_val_loss"] is not None
                  and row["final_val_loss"] <= min(finished) + STABLE_MARGIN]
        largest[key] = max(stable) if stable else None
    return record(settings.open_budget, found, stable_margin=STABLE_MARGIN, largest_stable_lr=largest)


def open_graded(settings: StabilityLabSettings, design) -> dict:
    """The design as the grader runs it (the built-in corpus, the CPU, seed 0, no progress bars): its record."""
    from reglab.data import corpus_task
    text, task = corpus_task("builtin", settings.block_size, settings.batch_size, seed=0, device="cpu")
    return open_record(settings, design(settings), open_experiment(settings, task, text.vocab_size, design,
                                                                   progress=False))
