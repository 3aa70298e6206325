"""Topic label smoothing, lab: sweep alpha on a noisy classification task; measure calibration (ECE) and the logit gap.

Per-budget settings (`SETTINGS`, picked with `settings_for`), the lab's task (`calibration_task`, a
`BagOfTokens` split three ways), the sweep (through `reglab.train.sweep`), its metrics and record, and
the lab's figures. The loss, its closed forms and the calibration tools are in the lecture module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from reglab.budget import by_budget
from reglab.data import ClassificationTask
from reglab.experiments import Design, record
from reglab.model import GPTConfig
from reglab.plots import colors_for
from reglab.topics.label_smoothing.lecture import (BagOfTokens, expected_calibration_error, fit_temperature, logit_gap,
                                                   optimal_logit_gap, plot_reliability, reliability_data)
from reglab.train import Run, TrainConfig, sweep


def calibration_task(settings: "LabSettings", seed: int = 0, device="cpu") -> tuple[ClassificationTask, BagOfTokens]:
    """The lab's task: 'train' (small: the model can memorize it), 'val' (fits the temperature), 'test' (held out)."""
    source = BagOfTokens.make(settings.n_classes, settings.vocab_size, settings.seq_len, settings.sharpness,
                              settings.label_noise, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    splits = {name: source.sample(n, generator) for name, n in
              (("train", settings.n_train), ("val", settings.n_val), ("test", settings.n_test))}
    return ClassificationTask(splits, batch_size=settings.batch_size, device=device), source


# --------------------------------------------------------------------------------------------------
# Per-budget settings and runners
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabSettings:
    # --- the task: small and noisy, so that training many epochs memorizes it ---
    n_classes: int = 10          # V of the smoothed target
    vocab_size: int = 32         # tokens per sequence are drawn from this many symbols
    seq_len: int = 16            # tokens per sequence: more tokens, less ambiguity
    sharpness: float = 1.0       # how distinct the classes' token distributions are (Bayes accuracy ~0.86)
    label_noise: float = 0.1     # fraction of labels redrawn uniformly (train, val and test alike)
    n_train: int = 512           # few examples: the model can fit every (noisy) label
    n_val: int = 1024            # fits the temperature
    n_test: int = 2048           # held out: accuracy, NLL and ECE are reported here
    # --- the model: the course transformer as a classifier over mean-pooled positions ---
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    # --- training: many epochs over the small train split (400 steps of 64 = 50 epochs) ---
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1    # the course default (AdamW, decoupled)
    warmup_steps: int = 30
    eval_every: int = 50
    seeds: int = 2               # seeds seed, seed + 1, ...: model init and batch order
    n_bins: int = 15             # ECE bins (Guo et al. 2017, §5)
    # --- the open experiment: one seed of four alphas at the sweep's steps (half the sweep's cost at 2 seeds) ---
    open_budget: int = 1600      # optimizer steps the open experiment's runs may spend in all

    @property
    def accuracy_tolerance(self) -> float:
        """How far below alpha = 0's test accuracy a run may fall and still count as unchanged: two binomial
        standard errors of a test accuracy at their largest (p = 1/2), 2 sqrt(0.25 / n_test) = 1 / sqrt(n_test)."""
        return 1.0 / math.sqrt(self.n_test)


SETTINGS = {
    # seconds on one thread: real code paths, numbers too small to show the effect
    "ci": LabSettings(n_train=256, n_val=256, n_test=512, n_layer=1, n_head=2, n_embd=32, steps=60,
                      batch_size=64, warmup_steps=10, eval_every=30, lr=3e-3, seeds=1, n_bins=10, open_budget=240),
    # minutes on 2 cores: 4 alphas x 2 seeds x 400 steps (about 15 s per run on one free core); the open
    # experiment's 1600 steps are 4 more such runs
    "cpu": LabSettings(),
    # one H100, aimed at under 2 minutes (its time not yet measured on a GPU): twice the data, a wider
    # model, bigger held-out splits, 3 seeds; 4 alphas x 3 seeds x 1000 steps of 128 (125 epochs). Run on a
    # CPU instead (fp32, 36 min on one thread): test ECE 0.208 / 0.062 / 0.080 / 0.128 for the 4 alphas,
    # alpha = 0.1 below alpha = 0 in all 3 seeds
    "gpu": LabSettings(n_train=1024, n_val=4096, n_test=8192, n_embd=128, steps=1000, batch_size=128,
                       warmup_steps=50, eval_every=100, seeds=3, open_budget=4000),
}

ALPHAS = (0.0, 0.05, 0.1, 0.2)   # the lab's sweep; 0.1 is Vaswani et al. 2017 (§5.4) and Szegedy et al. 2016 (§7)


def settings_for(budget: str) -> LabSettings:
    """The lab's settings for a budget ('ci', 'cpu', 'gpu' or 'auto')."""
    return by_budget(budget, **SETTINGS)


def model_config(settings: LabSettings) -> GPTConfig:
    return GPTConfig(vocab_size=settings.vocab_size, block_size=settings.seq_len, n_layer=settings.n_layer,
                     n_head=settings.n_head, n_embd=settings.n_embd, n_classes=settings.n_classes, pool="mean")


def train_config(settings: LabSettings, alpha: float, seed: int, progress: bool = False,
                 steps: int | None = None) -> TrainConfig:
    """The sweep's training at smoothing alpha; steps defaults to settings.steps (the warmup is cut to fit)."""
    steps = steps or settings.steps
    return TrainConfig(steps=steps, lr=settings.lr, warmup_steps=min(settings.warmup_steps, steps),
                       weight_decay=settings.weight_decay, label_smoothing=alpha,
                       eval_every=min(settings.eval_every, steps), seed=seed, progress=progress)


@torch.no_grad()
def predict(model: torch.nn.Module, task: ClassificationTask, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a split on the CPU, in float32 and eval mode (no autocast: calibration needs the tails)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in task.eval_batches(split):
        logits.append(model(x).float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


@dataclass
class AlphaSweep:
    """Runs per alpha (one per seed), the settings they used, and the task's Bayes-optimal reference.

    Each Run's outputs hold every split's final (logits, labels) on the CPU: run.outputs["test"].
    """
    settings: LabSettings
    runs: dict[float, list[Run]] = field(default_factory=dict)
    bayes: dict[str, float] = field(default_factory=dict)    # acc, nll, ece of the exact posterior on 'test'


def run_alpha_sweep(settings: LabSettings, alphas=ALPHAS, seed: int = 0, device="cpu",
                    progress: bool = False) -> AlphaSweep:
    """Train one classifier per (alpha, seed) on the lab's task; keep every split's final logits.

    Each evaluation also records the test ECE and the mean train-set logit gap, so both can be
    plotted against the step.
    """
    task, source = calibration_task(settings, seed=seed, device=device)
    test_logits = source.log_posterior(task.splits["test"][0])
    test_labels = task.splits["test"][1].cpu()
    bayes = {"acc": float((test_logits.argmax(1) == test_labels).double().mean()),
             "nll": float(F.cross_entropy(test_logits, test_labels)),
             "ece": expected_calibration_error(test_logits, test_labels, settings.n_bins)}

    def on_eval(model):
        test = predict(model, task, "test")
        train_logits, train_labels = predict(model, task, "train")
        return {"test_ece": expected_calibration_error(*test, settings.n_bins),
                "train_gap": float(logit_gap(train_logits, train_labels).mean())}

    runs = {alpha: (model_config(settings), train_config(settings, alpha, seed, progress)) for alpha in alphas}
    results = sweep(runs, task, seeds=range(seed, seed + settings.seeds), on_eval=on_eval, progress=progress,
                    after=final_outputs(task))
    return AlphaSweep(settings, results, bayes)


def final_outputs(task: ClassificationTask):
    """A sweep's after(model): every split's final (logits, labels), what run_metrics reads."""
    return lambda model: {split: predict(model, task, split) for split in ("train", "val", "test")}


def run_metrics(run: Run, n_bins: int) -> dict[str, float]:
    """A run's held-out figures, its train-set gap, and the same after temperature scaling fitted on 'val'."""
    logits, labels = run.outputs["test"]
    temperature = fit_temperature(*run.outputs["val"])
    return {
        "acc": float((logits.argmax(1) == labels).double().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": expected_calibration_error(logits, labels, n_bins),
        "mean_confidence": float(torch.softmax(logits, 1).max(1).values.mean()),
        "train_gap": float(logit_gap(*run.outputs["train"]).mean()),
        "temperature": temperature,
        "ts_nll": float(F.cross_entropy(logits / temperature, labels)),
        "ts_ece": expected_calibration_error(logits / temperature, labels, n_bins),
    }


def sweep_metrics(sweep: AlphaSweep) -> dict[float, dict]:
    """Per alpha: the mean over seeds of every run metric, the per-seed values, and the optimal gap."""
    n_classes = sweep.settings.n_classes
    table = {}
    for alpha, runs in sweep.runs.items():
        per_seed = [run_metrics(run, sweep.settings.n_bins) for run in runs]
        row = {key: float(np.mean([m[key] for m in per_seed])) for key in per_seed[0]}
        row["per_seed"] = {key: [m[key] for m in per_seed] for key in per_seed[0]}
        row["optimal_gap"] = optimal_logit_gap(alpha, n_classes)
        table[alpha] = row
    return table


def result_record(sweep: AlphaSweep, table: dict[float, dict]) -> dict:
    """The lab's published record: per alpha the held-out figures and the gap against its optimum."""
    per_alpha = {}
    for alpha, row in table.items():
        gap, optimum = row["train_gap"], row["optimal_gap"]
        per_alpha[f"{alpha:g}"] = {
            "test_acc": row["acc"], "test_nll": row["nll"], "test_ece": row["ece"],
            "test_ece_per_seed": row["per_seed"]["ece"], "train_gap": gap,
            "optimal_gap": None if math.isinf(optimum) else optimum,
            "gap_over_optimum": None if math.isinf(optimum) else gap / optimum,
            "temperature": row["temperature"], "ts_test_ece": row["ts_ece"]}
    base = table[min(table)]
    return {
        "setting": {"n_classes": sweep.settings.n_classes, "n_train": sweep.settings.n_train,
                    "label_noise": sweep.settings.label_noise, "steps": sweep.settings.steps,
                    "seeds": sweep.settings.seeds, "ece_bins": f"{sweep.settings.n_bins} equal-width"},
        "per_alpha": per_alpha,
        "temperature_scaled_alpha0": {"temperature": base["temperature"], "test_ece": base["ts_ece"],
                                      "test_nll": base["ts_nll"]},
        "bayes_optimal_test": sweep.bayes,
    }


# --------------------------------------------------------------------------------------------------
# The open experiment: the alpha with the lowest test ECE at unchanged accuracy, within a step budget
# --------------------------------------------------------------------------------------------------

def alpha_problems(alpha) -> list[str]:
    """What is wrong with a run's alpha; [] when nothing is."""
    return [] if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0.0 <= alpha < 1.0 else [
        f"alpha must be in [0, 1), got {alpha!r}"]


def has_reference(runs: dict) -> list[str]:
    """The rule compares accuracy with alpha = 0's: a design needs an alpha = 0 run."""
    return [] if any(alpha == 0 for alpha, _ in runs.values()) else [
        "the design needs an alpha = 0 run: the accuracy the rule compares with"]


OPEN_DESIGN = Design(knobs=("alpha",), knob_problems=alpha_problems, design_rules=has_reference,
                     finite_keys=("ece", "acc"))


def open_experiment(settings: LabSettings, design, seed: int = 0, device="cpu", progress: bool = False) -> dict[str, list[Run]]:
    """Run the student's design (a function of the settings returning {label: (alpha, steps)}) on the lab's task
    with the lab's sweep, one seed (seed) per run; each Run keeps every split's final logits.

    Refuses a design that spends more than settings.open_budget optimizer steps in all, before training."""
    runs = OPEN_DESIGN.planned(design, settings)
    task, _ = calibration_task(settings, seed=seed, device=device)
    configs = {name: (model_config(settings), train_config(settings, float(alpha), seed, progress, steps))
               for name, (alpha, steps) in runs.items()}
    return sweep(configs, task, seeds=(seed,), progress=progress, after=final_outputs(task))


def open_record(settings: LabSettings, runs: dict, results: dict[str, list[Run]]) -> dict:
    """Each run's alpha, steps, test ECE and accuracy; the reference accuracy (the best alpha = 0 run's), the
    tolerance, and the run with the lowest ECE among those within the tolerance of it (the rule's pick)."""
    found = {}
    for name, (alpha, steps) in runs.items():
        run = results[name][0]
        metrics = run_metrics(run, settings.n_bins)
        found[name] = {"alpha": float(alpha), "steps": steps, "steps_trained": len(run.history.loss),
                       "ece": metrics["ece"], "acc": metrics["acc"], "nll": metrics["nll"]}
    reference = max(row["acc"] for row in found.values() if row["alpha"] == 0)
    tolerance = settings.accuracy_tolerance
    unchanged = [name for name, row in found.items() if row["acc"] >= reference - tolerance]
    return record(settings.open_budget, found, reference_acc=reference, accuracy_tolerance=tolerance,
                  unchanged_accuracy=unchanged, lowest_ece=min(unchanged, key=lambda name: found[name]["ece"]))


def open_graded(settings: LabSettings, design) -> dict:
    """The design as the grader runs it (the CPU, seed 0, no progress bars): its record."""
    return open_record(settings, design(settings), open_experiment(settings, design))


# --------------------------------------------------------------------------------------------------
# The lab's figures
# --------------------------------------------------------------------------------------------------

def plot_reliability_row(sweep: AlphaSweep, seed_index: int = 0):
    """One reliability diagram per alpha (test split, one seed), and the temperature-scaled alpha = 0."""
    alphas = list(sweep.runs)
    colors = colors_for(alphas)
    fig, axes = plt.subplots(1, len(alphas) + 1, figsize=(3.4 * (len(alphas) + 1), 3.4), sharey=True)
    for ax, alpha in zip(axes, alphas):
        data = reliability_data(*sweep.runs[alpha][seed_index].outputs["test"], sweep.settings.n_bins)
        plot_reliability(ax, data, colors[alpha], title=f"alpha = {alpha:g} (test)")
    outputs = sweep.runs[alphas[0]][seed_index].outputs
    temperature = fit_temperature(*outputs["val"])
    test_logits, test_labels = outputs["test"]
    data = reliability_data(test_logits / temperature, test_labels, sweep.settings.n_bins)
    plot_reliability(axes[-1], data, "gray", title=f"alpha = {alphas[0]:g}, T = {temperature:.2f} (test)")
    for ax in axes[1:]:
        ax.set_ylabel("")
    fig.tight_layout()
    plt.show()


def plot_sweep_summary(table: dict[float, dict], n_classes: int, bayes: dict[str, float] | None = None):
    """Held-out ECE, NLL and accuracy against alpha (dots: seeds), and the train-set gap against its optimum."""
    alphas = list(table)
    colors = colors_for(alphas)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, name in zip(axes, ("ece", "nll", "acc"), ("test ECE", "test NLL (nats)", "test accuracy")):
        for i, alpha in enumerate(alphas):
            seeds = table[alpha]["per_seed"][key]
            ax.bar(i, np.mean(seeds), color=colors[alpha], alpha=0.7)
            ax.plot([i] * len(seeds), seeds, "k.")
        if key == "ece":
            ts = [table[a]["ts_ece"] for a in alphas]
            ax.plot(range(len(alphas)), ts, "s--", color="gray", label="after temperature scaling")
        if bayes is not None:
            ax.axhline(bayes[key], color="black", linestyle=":", label="Bayes-optimal")
        if key == "ece" or bayes is not None:
            ax.legend(fontsize="small")
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("alpha")
        ax.set_ylabel(name)
        ax.set_title(name)
    ax = axes[3]
    smoothed = [a for a in alphas if a > 0]
    if smoothed:
        grid = np.linspace(0.6 * min(smoothed), 1.1 * max(smoothed), 100)
        ax.plot(grid, np.log1p(n_classes * (1 - grid) / grid), "k--", label="optimum log(1 + V(1-a)/a)")
    for alpha in alphas:
        ax.plot([alpha] * len(table[alpha]["per_seed"]["train_gap"]), table[alpha]["per_seed"]["train_gap"], "o",
                color=colors[alpha], label=f"alpha = {alpha:g}")
    ax.set_xlabel("alpha")
    ax.set_ylabel("mean train logit gap (nats)")
    ax.set_title("train-set gap vs the derived optimum")
    ax.legend(fontsize="small")
    fig.tight_layout()
    plt.show()


def show_sweep_result(sweep: AlphaSweep, table: dict[float, dict], alpha: float) -> None:
    """The slider's view of one alpha: its reliability diagram, its train-set gaps against the optimum, its figures."""
    run = sweep.runs[alpha][0]
    colors = colors_for(list(sweep.runs))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    plot_reliability(axes[0], reliability_data(*run.outputs["test"], sweep.settings.n_bins),
                     colors[alpha], title=f"alpha = {alpha:g}: test reliability (seed {run.seed})")
    gaps = logit_gap(*run.outputs["train"]).numpy()
    axes[1].hist(gaps, bins=40, color=colors[alpha], alpha=0.7)
    optimum = table[alpha]["optimal_gap"]
    if not math.isinf(optimum):
        axes[1].axvline(optimum, color="black", linestyle="--", label=f"optimum {optimum:.2f}")
    axes[1].axvline(gaps.mean(), color=colors[alpha], label=f"mean {gaps.mean():.2f}")
    axes[1].set_xlabel("true logit minus mean other logit (nats)")
    axes[1].set_ylabel("training examples")
    axes[1].set_title("train-set logit gaps")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    plt.show()
    row = table[alpha]
    n_seeds = len(sweep.runs[alpha])
    print(f"alpha={alpha:g} ({'mean of ' + str(n_seeds) + ' seeds' if n_seeds > 1 else 'one seed'}): test acc {row['acc']:.3f}, "
          f"NLL {row['nll']:.3f}, ECE {row['ece']:.3f}; train gap {row['train_gap']:.2f} "
          f"(optimum {optimum:.2f}); fitted T {row['temperature']:.2f} -> ECE {row['ts_ece']:.3f}")
