"""Topic dropout, lab: the lab's experiments, with per-budget settings in one place and the runners its cells call.

Four experiments on the course model (reglab.model.GPT, whose dropout is PyTorch's):
1. small data, many epochs: sweep p, watch train and val loss part (the overfitting regime);
2. the same at one site at a time;
3. one pass over more data, no token seen twice (the underfitting regime of pretraining);
4. exact recall of random facts (reglab.topics.dropout.recall) with and without dropout at the same budget.
Tune a budget by editing its entry in SETTINGS; nothing else in the lab holds a size.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import numpy as np

from reglab.budget import by_budget
from reglab.data import corpus_task
from reglab.experiments import Design, record
from reglab.model import DROPOUT_SITES, GPTConfig
from reglab.plots import colors_for, plot_highlighted
from reglab.topics.dropout.recall import recall_metrics, recall_task
from reglab.train import TrainConfig, histories, sweep


@dataclass(frozen=True)
class LabSettings:
    """Everything the dropout lab's experiments depend on, for one budget."""
    n_seeds: int                 # seeds per setting (seed, seed + 1, ...); min-max bands need >= 2
    # --- the course model and optimizer for the text experiments ---
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int              # characters of context
    batch_size: int              # windows per step
    lr: float                    # AdamW peak learning rate (warmup, then cosine to lr / 10)
    # --- 1. small data, many epochs (2. reuses it, one site at a time) ---
    train_chars: int             # train_chars of the train split, in chunks from all over it: small enough to overfit
    steps: int                   # optimizer steps; epochs = steps * batch_size * block_size / train_chars
    eval_every: int
    # --- 3. single pass: each training window is seen once ---
    single_pass_batch: int       # smaller batches give more steps from the same one pass
    single_pass_max_steps: int   # the pass is cut here if the corpus holds more
    # --- 4. exact recall of random facts ---
    recall_facts: int            # facts to memorize (keys of 4 tokens -> values of 2 tokens, 16 symbols)
    recall_n_layer: int
    recall_n_embd: int
    recall_steps: int
    recall_batch: int
    # --- what is swept ---
    ps: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)    # the sweep; p = 0 is the baseline
    site_p: float = 0.2          # p at the one active site in experiment 2
    compare_p: float = 0.2       # the dropout setting of experiments 3 and 4 (against p = 0)
    recall_lr: float = 3e-3
    weight_decay: float = 0.0    # off, so dropout is the only regularizer (the weight-decay lab adds it)
    # --- 7. the open experiment: the student's runs share this many optimizer steps (one seed each) ---
    open_steps: int | None = None    # None: the steps of one sweep run (see open_budget)
    site_seeds: int | None = None    # seeds of experiment 2; None: n_seeds (cpu runs one, to stay in 5 minutes)
    workers: int | str = 1       # runs trained at once, one process and one core each ("auto": every core);
                                 # ci stays at 1 (the grader's sandbox runs one process per submission)

    @property
    def open_budget(self) -> int:
        """Optimizer steps the open experiment's runs may spend in all."""
        return self.open_steps if self.open_steps is not None else self.steps

    def gpt(self, vocab_size: int, p: float = 0.0, sites=DROPOUT_SITES) -> GPTConfig:
        """The text model with dropout p at the named sites."""
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd).with_dropout(p, sites)

    def train_config(self, steps: int | None = None, lr: float | None = None) -> TrainConfig:
        steps = steps or self.steps
        return TrainConfig(steps=steps, lr=lr or self.lr, warmup_steps=max(1, steps // 20),
                           weight_decay=self.weight_decay, eval_every=min(self.eval_every, steps))


SETTINGS = {
    # seconds on one CPU thread: tiny numbers, every code path of the gpu run
    "ci": LabSettings(n_seeds=1, n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=8, lr=3e-3,
                      train_chars=4_000, steps=30, eval_every=10, single_pass_batch=8, single_pass_max_steps=15,
                      recall_facts=32, recall_n_layer=1, recall_n_embd=32, recall_steps=30, recall_batch=32),
    # Minutes on 2 CPU cores (the runs two at a time: workers="auto"; the README quotes the measured time).
    # 63k parameters, 6.3 per training character, 102 epochs of 10k characters (spread over the corpus) in
    # 1000 steps of 32 windows of 32 characters; p = 0 peaks near step 500, the dropout runs near the end.
    # Dropout's masks dominate a CPU step (PyTorch's CPU random numbers): measured, 23 ms per step at p = 0
    # and 46 ms at p = 0.1 on one thread; the attention mask (B, nh, T, T) grows with T^2, so 32 characters
    # of context in windows of 32 cost less than 64 in windows of 16 (the same characters per step), and
    # show the effect more clearly. Searched with the lab's sweep on 2 workers (ps 0 and 0.1, best val loss
    # per seed, p = 0 vs p = 0.1):
    #   this setting, built-in corpus, seeds 0/1: 2.482 / 2.448 vs 2.385 / 2.389: -0.078 against a seed
    #     spread of 0.035; seeds 2/3: 2.510 / 2.511 vs 2.462 / 2.476: -0.042 against 0.014; 560 kB of stdlib
    #     docstrings passed as corpus, seeds 0/1:
    #     2.694 / 2.710 vs 2.633 / 2.638: -0.067 against 0.016;
    #   1200 steps: -0.099 against 0.033 (seeds 0/1), -0.056 against 0.020 (seeds 2/3), -0.066 against 0.024
    #     (docstrings), but 5.7 min; 1000 steps at lr 4e-3: -0.088 / 0.045 and -0.073 / 0.038;
    #   800 steps: -0.054 against 0.063 (built-in): no clear effect;
    #   64 characters in windows of 16 at 1200 steps (the previous setting; 7 min): -0.057 against 0.039
    #     (built-in), -0.077 against 0.022 (docstrings), about the seed spread on other seed pairs;
    #   32 in windows of 16 at 1200 steps: -0.053 against 0.018 (built-in), -0.024 against 0.024 (docstrings):
    #     too close; windows of 24: -0.053 / 0.028 and -0.061 / 0.054.
    # (Tried before, not better: 500 or 900 steps; 64 or 128 wide; 3 layers; 15k-30k characters; the first
    # 10k characters of the train split instead of chunks from all over it, on which dropout only hurt.)
    "cpu": LabSettings(n_seeds=2, n_layer=2, n_embd=48, n_head=4, block_size=32, batch_size=32, lr=3e-3,
                       train_chars=10_000, steps=1000, eval_every=50, single_pass_batch=16,
                       single_pass_max_steps=300, recall_facts=512, recall_n_layer=2, recall_n_embd=64,
                       recall_steps=500, recall_batch=64, ps=(0.0, 0.1, 0.2), site_seeds=1, workers="auto"),
    # nanoGPT's shakespeare_char baby GPT (6 layers, 384 wide, 256 characters of context, batch 64, lr 1e-3:
    # 10.7M parameters, dropout 0.2; its README reports a val loss of about 1.47 on 1M characters) trained
    # on the corpus's whole train split (418k characters of the built-in one: about 25 parameters per
    # character, 117 epochs in 3000 steps). Not measured: about 16 runs of 3000 steps, tens of minutes on
    # one H100; to trim time lower steps (p = 0 is expected to peak within the first third) or n_seeds.
    "gpu": LabSettings(n_seeds=2, n_layer=6, n_embd=384, n_head=6, block_size=256, batch_size=64, lr=1e-3,
                       train_chars=1_000_000, steps=3000, eval_every=100, single_pass_batch=16,
                       single_pass_max_steps=400, recall_facts=4096, recall_n_layer=2, recall_n_embd=128,
                       recall_steps=1000, recall_batch=256),
}


def settings_for(budget: str) -> LabSettings:
    """The lab's settings for a budget ('ci', 'cpu', 'gpu' or 'auto')."""
    return by_budget(budget, **SETTINGS)


def label(p: float) -> str:
    return f"p={p:g}"


# ---------------------------------------------------------------------------------------------------
# Runners: each returns {label: [History per seed]} of a reglab.train.sweep
# ---------------------------------------------------------------------------------------------------

def small_data_task(settings: LabSettings, corpus: str, session):
    """train_chars of the corpus in evenly spaced chunks, validated on chunks from all over it (`corpus_task`
    with spread=True), windows drawn at random (many epochs). Cut from the beginning instead, a small sample is
    about whatever the text starts with and the val split about whatever it ends with. Measured on a 560 kB
    text of stdlib docstrings (cpu model, 900 steps, seeds 0 and 1, best val loss): cut from the beginning,
    p = 0 2.91 and p = 0.2 2.96; spread, 2.73 and 2.73, and the val loss measures what the model learned."""
    return corpus_task(corpus, settings.block_size, settings.batch_size, max_train_chars=settings.train_chars,
                       spread=True, seed=session.seed, device=session.device)


def _seeds(settings: LabSettings, session) -> list[int]:
    return [session.seed + i for i in range(settings.n_seeds)]


def p_sweep(settings: LabSettings, text, task, session) -> dict:
    """Experiment 1: dropout p at every site, for each p in settings.ps."""
    runs = {label(p): (settings.gpt(text.vocab_size, p), settings.train_config()) for p in settings.ps}
    return histories(sweep(runs, task, seeds=_seeds(settings, session), workers=settings.workers))


def site_sweep(settings: LabSettings, text, task, session) -> dict:
    """Experiment 2: dropout site_p at one site at a time (the sweep's p = 0 and all-sites runs are the references)."""
    runs = {site: (settings.gpt(text.vocab_size, settings.site_p, [site]), settings.train_config())
            for site in DROPOUT_SITES}
    return histories(sweep(runs, task, seeds=_seeds(settings, session), workers=settings.workers))


def single_pass_sweep(settings: LabSettings, corpus: str, session) -> dict:
    """Experiment 3: p = 0 vs compare_p, each training window seen exactly once."""
    text, task = corpus_task(corpus, settings.block_size, settings.single_pass_batch, single_pass=True,
                             seed=session.seed, device=session.device)
    steps = min(task.single_pass_steps, settings.single_pass_max_steps)
    config = replace(settings.train_config(steps), eval_every=max(1, steps // 8))
    runs = {label(p): (settings.gpt(text.vocab_size, p), config) for p in (0.0, settings.compare_p)}
    return histories(sweep(runs, task, seeds=_seeds(settings, session), workers=settings.workers))


def recall_sweep(settings: LabSettings, session):
    """Experiment 4: exact recall of random facts, p = 0 vs compare_p, same steps; returns (task, results)."""
    task = recall_task(n_facts=settings.recall_facts, batch_size=settings.recall_batch, seed=session.seed,
                       device=session.device)
    base = GPTConfig(vocab_size=task.vocab_size, block_size=task.block_size, n_layer=settings.recall_n_layer,
                     n_head=4, n_embd=settings.recall_n_embd)
    config = replace(settings.train_config(settings.recall_steps, settings.recall_lr),
                     eval_every=max(1, settings.recall_steps // 10))
    runs = {label(p): (base.with_dropout(p), config) for p in (0.0, settings.compare_p)}
    return task, histories(sweep(runs, task, seeds=_seeds(settings, session), on_eval=recall_metrics(task),
                                  workers=settings.workers))


# ---------------------------------------------------------------------------------------------------
# Figures: what the lab reports and plots
# ---------------------------------------------------------------------------------------------------

def summarize(results: dict) -> dict:
    """Per setting, the mean over seeds of: best val loss, the step it was reached, the final train-val
    gap, and the final val loss; plus the per-seed values of the first three."""
    table = {}
    for name, runs in results.items():
        best = [h.best("val_loss") for h in runs]
        row = {"best_val_loss": float(np.mean([b[1] for b in best])),
               "best_step": float(np.mean([b[0] for b in best])),
               "final_gap": float(np.mean([h.final_gap for h in runs])),
               "final_val_loss": float(np.mean([h.final["val_loss"] for h in runs])),
               "per_seed": {"best_val_loss": [b[1] for b in best], "best_step": [b[0] for b in best],
                            "final_gap": [h.final_gap for h in runs]}}
        if "recall" in runs[0].final:
            row["recall"] = float(np.mean([h.final["recall"] for h in runs]))
            row["heldout_recall"] = float(np.mean([h.final["heldout_recall"] for h in runs]))
            row["per_seed"]["recall"] = [h.final["recall"] for h in runs]
        table[name] = row
    return table


def figures(table: dict, keys=("best_val_loss", "best_step", "final_gap")) -> dict:
    """The chosen figures of a summarize() table for the lab's record: means over seeds and per-seed values."""
    return {name: {**{key: row[key] for key in keys},
                   "per_seed": {key: values for key, values in row["per_seed"].items() if key in keys}}
            for name, row in table.items()}


def print_summary(table: dict, title: str) -> None:
    print(title)
    print(f"{'setting':>14} {'best val loss':>14} {'at step':>8} {'final gap':>10} {'final val':>10}"
          + (f" {'recall':>7}" if any("recall" in row for row in table.values()) else ""))
    for name, row in table.items():
        print(f"{name:>14} {row['best_val_loss']:14.3f} {row['best_step']:8.0f} {row['final_gap']:10.3f} "
              f"{row['final_val_loss']:10.3f}" + (f" {row['recall']:7.1%}" if "recall" in row else ""))


def plot_train_val(ax, results: dict, colors: dict, title: str, highlight: str | None = None):
    """Val loss (solid) and train loss (dashed) per setting: the mean over seeds, with the min-max band
    when there are several. With highlight, every other setting is drawn faded and without its band."""
    for key, style in (("val_loss", "-"), ("train_loss", "--")):
        means = {}
        for name, per_seed in results.items():
            steps = per_seed[0].series(key)[0]
            values = np.array([h.series(key)[1] for h in per_seed], dtype=float)     # (seeds, evals)
            means[name] = [(steps, values.mean(0))]
            if len(per_seed) > 1 and highlight in (None, name):
                ax.fill_between(steps, values.min(0), values.max(0), color=colors[name], alpha=0.15)
        plot_highlighted(ax, means, highlight, colors, style, legend="{} " + key.split("_")[0])
    ax.set(title=title, xlabel="step", ylabel="loss (nats per character)")
    ax.legend(fontsize=7, ncol=2)
    return ax


def plot_table_points(table: dict, colors: dict, title: str, keys=("best_val_loss", "final_gap")) -> None:
    """One panel per figure of a summarize() table (e.g. best val loss, final gap): a point per setting at
    the mean over seeds, with a bar from the lowest to the highest seed."""
    names = list(table)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.4))
    for ax, key in zip(np.atleast_1d(axes), keys):
        for i, name in enumerate(names):
            per_seed = table[name]["per_seed"][key]
            mean = table[name][key]
            ax.errorbar(i, mean, yerr=[[mean - min(per_seed)], [max(per_seed) - mean]], fmt="o", capsize=4,
                        color=colors[name])
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set(title=key.replace("_", " "), ylabel="nats per character")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    plt.show()


def show_sweep(results: dict, p: float, colors: dict | None = None) -> None:
    """The slider's view: every p's curves faded, the chosen p's train and val curves in full, and its numbers."""
    colors = colors or colors_for(results)
    chosen = label(p)
    if chosen not in results:
        raise ValueError(f"p={p} was not swept; the sweep has {list(results)}")
    fig, ax = plt.subplots(figsize=(7, 4))
    plot_train_val(ax, results, colors, f"small data, many epochs: {chosen} highlighted", highlight=chosen)
    plt.show()
    row = summarize({chosen: results[chosen]})[chosen]
    print(f"{chosen}: best val loss {row['best_val_loss']:.3f} at step {row['best_step']:.0f}, "
          f"final train-val gap {row['final_gap']:.3f}")


# ---------------------------------------------------------------------------------------------------
# What the measurements show: sentences read from a summarize() table (or its figures() record), so the
# lab's text stays true on another corpus, budget or seed
# ---------------------------------------------------------------------------------------------------

def seed_spread(row: dict, key: str = "best_val_loss") -> float:
    """Highest minus lowest seed of one setting's figure: 0 with a single seed."""
    values = row["per_seed"][key]
    return float(max(values) - min(values))


def dropout_effect(table: dict, baseline: str = "p=0", key: str = "best_val_loss",
                   higher_is_better: bool = False) -> dict:
    """The setting with the best `key` against `baseline`, from a summarize() table or figures() record.

    delta is that setting's mean minus the baseline's; the noise floor is the larger seed spread of the two
    (as in the capstone's effects); the verdict is 'helped' when the setting beats the baseline by more than
    the noise, 'hurt' when even the best setting is worse by more, else 'no clear effect'. With one seed
    there is no spread to judge by, and the verdict says so ('not judged (one seed)').
    """
    from reglab.topics.capstone.lab import verdict
    if baseline not in table:
        raise ValueError(f"baseline {baseline!r} is not in the table; it has {list(table)}")
    others = [name for name in table if name != baseline]
    if not others:
        raise ValueError(f"the table has only the baseline {baseline!r}; nothing to compare it with")
    sign = -1.0 if higher_is_better else 1.0
    best = min(others, key=lambda name: sign * table[name][key])
    delta = table[best][key] - table[baseline][key]
    noise = max(seed_spread(table[best], key), seed_spread(table[baseline], key))
    seeds = min(len(table[name]["per_seed"][key]) for name in (best, baseline))
    row = {"key": key, "baseline": baseline, "setting": best, "others": len(others),
           "baseline_value": table[baseline][key], "value": table[best][key], "delta": delta, "noise": noise,
           "seeds": seeds, "verdict": verdict(sign * delta, noise) if seeds > 1 else "not judged (one seed)"}
    if key == "best_val_loss" and "best_step" in table[best]:
        row["best_step"] = table[best]["best_step"]
        row["baseline_best_step"] = table[baseline]["best_step"]
    if key.endswith("val_loss") and "final_gap" in table[best] and "final_gap" in table[baseline]:
        row["final_gap"], row["baseline_final_gap"] = table[best]["final_gap"], table[baseline]["final_gap"]
    return row


def effect_sentence(effect: dict, last_step: int | None = None) -> str:
    """One sentence saying what a dropout_effect() row shows, numbers included."""
    what = effect["key"].replace("_", " ")
    # 4 decimals where 3 would print the change and the spread as equal, so "more than" reads true
    digits = 4 if f"{abs(effect['delta']):.3f}" == f"{effect['noise']:.3f}" else 3
    spread = f"the seed spread {effect['noise']:.{digits}f} ({effect['seeds']} seeds)"
    lowers = "raises" if effect["delta"] > 0 else "lowers"
    numbers = (f"{effect['setting']} {lowers} the {what} from {effect['baseline_value']:.3f} ({effect['baseline']}) "
               f"to {effect['value']:.3f} ({effect['delta']:+.{digits}f})")
    if effect["seeds"] < 2:
        sentence = f"{numbers}; one seed has no seed spread to judge that by (run 2 or more)."
    elif effect["verdict"] == "helped":
        sentence = f"{numbers}: more than {spread}."
    elif effect["verdict"] == "hurt":
        worse = "Every setting does" if effect.get("others", 2) > 1 else f"{effect['setting']} does"
        sentence = f"{worse} worse than {effect['baseline']}: {numbers}, more than {spread}."
    else:
        sentence = f"No setting changes the {what} beyond {spread}: the best, {numbers}."
    if "final_gap" in effect:
        sentence += (f" Its final train-val gap is {effect['final_gap']:.3f} against {effect['baseline_final_gap']:.3f}"
                     f" at {effect['baseline']}.")
    if last_step is not None and effect.get("best_step", 0) >= last_step:
        sentence += (f" {effect['setting']} was still improving at the last step ({last_step}): more steps "
                     f"could lower it further.")
    return sentence


# ---------------------------------------------------------------------------------------------------
# The open experiment: the student's design, run with the lab's sweep within a budget of optimizer steps
# ---------------------------------------------------------------------------------------------------

def p_problems(p) -> list[str]:
    """What is wrong with a run's dropout p; [] when nothing is."""
    return [] if isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0 else [
        f"p must be in [0, 1), got {p!r}"]


OPEN_DESIGN = Design(knobs=("p",), knob_problems=p_problems, finite_keys=("best_val_loss",))


def open_experiment(settings: LabSettings, text, task, session, design, progress: bool = True) -> dict:
    """Run the student's design (a function of the settings returning {label: (p, steps)}) on the lab's
    small-data task with the lab's sweep, one seed (session.seed) per run, dropout p at every site.

    Refuses a design that spends more than settings.open_budget optimizer steps in all. Returns
    {label: [History]} like the other runners."""
    runs = OPEN_DESIGN.planned(design, settings)
    configs = {name: (settings.gpt(text.vocab_size, float(p)), settings.train_config(steps))
               for name, (p, steps) in runs.items()}
    return histories(sweep(configs, task, seeds=[session.seed], progress=progress, workers=settings.workers))


def open_graded(settings: LabSettings, design) -> dict:
    """The design as the grader runs it (one seed, the built-in corpus, the CPU, no progress bars): its record."""
    import torch
    from reglab.budget import Session
    session = Session(budget="ci", device=torch.device("cpu"), seed=0)
    text, task = small_data_task(settings, "builtin", session)
    return open_record(settings, design(settings), open_experiment(settings, text, task, session, design, progress=False))


def open_record(settings: LabSettings, runs: dict, results: dict) -> dict:
    """The open experiment for the lab's record: the budget, what the design spent, each run's p, steps and
    best val loss (with the step it was reached), and the run that reached the lowest."""
    found = {name: {"p": float(p), "steps": steps, "steps_trained": len(results[name][0].loss),
                    "best_val_loss": results[name][0].best("val_loss")[1],
                    "best_step": results[name][0].best("val_loss")[0]}
             for name, (p, steps) in runs.items()}
    return record(settings.open_budget, found, lowest=min(found, key=lambda name: found[name]["best_val_loss"]))
