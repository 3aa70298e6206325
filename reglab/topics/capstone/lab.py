"""Topic capstone, lab: pretrain in one pass, fine-tune for many epochs (fully and with LoRA), and place
every run on the regime map (times each token was seen x parameters per training token); the open
experiment at its end (the adapter rank and lora_dropout that forget least at full fine-tuning's val loss).

The settings per budget live in SETTINGS; the notebooks call the functions below and keep only the
plotting of what they show. The fine-tuning text is derived on the spot from the docstrings of a
fixed list of standard-library modules (nothing is downloaded), or read from a file.
"""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from reglab.budget import by_budget
from reglab.data import Corpus, LMTask, corpus_task, interleaved_split, load_corpus
from reglab.experiments import Design, record
from reglab.model import GPT, GPTConfig
from reglab.plots import colors_for, plot_highlighted
from reglab.topics.capstone.lora import add_lora
from reglab.topics.capstone.recipes import FINETUNING, PRETRAINING
from reglab.train import Run, evaluate, sweep

STDLIB_DOCSTRINGS = "stdlib-docstrings"
# Pure-Python modules whose docstrings are long and stable; the order fixes the text.
DOCSTRING_MODULES = ("textwrap", "heapq", "json", "csv", "difflib", "statistics", "argparse",
                     "contextlib", "functools", "dataclasses")


@dataclass(frozen=True)
class CapstoneSettings:
    # --- the course model ---
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    # --- pretraining: one pass over the first pretrain_chars of the corpus's train split ---
    pretrain_chars: int | None     # None: the whole train split
    batch_size: int
    lr: float                      # pretraining peak lr; fine-tuning scales it by the recipe's lr_ratio
    pretrain_eval_every: int
    # --- fine-tuning: many epochs over a small text ---
    finetune_chars: int            # size of the fine-tuning text (train + val)
    finetune_batch_size: int
    finetune_steps: int
    finetune_eval_every: int
    lora_r: int
    lora_alpha: float
    eval_batches: int              # fixed evaluation batches per split
    seeds: int                     # runs per setting: seed, seed + 1, ...
    open_budget: int               # optimizer steps the open experiment's fine-tuning runs may spend in all
    lora_dropouts: tuple[float, ...] = (0.0, 0.05, 0.1)
    finetune_dropout: float = FINETUNING.resid_dropout

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd)


# The open experiment's budget: four fine-tuning runs of the lab's length, one seed each (the lab's own
# fine-tuning is five runs per seed): room for the full-fine-tuning reference and three adapters. Counted in
# steps, not timed: at the cpu size it adds about 40% to the fine-tuning's 3,200 steps.
SETTINGS = {
    # seconds on one thread: a 1-layer model, a 10k-character pass, 30-step fine-tunes
    "ci": CapstoneSettings(n_layer=1, n_head=2, n_embd=32, block_size=32, pretrain_chars=10_000,
                           batch_size=8, lr=3e-3, pretrain_eval_every=13, finetune_chars=3_000,
                           finetune_batch_size=8, finetune_steps=30, finetune_eval_every=10,
                           lora_r=4, lora_alpha=8.0, eval_batches=2, seeds=1, open_budget=120),
    # minutes on 2 cores: the course model, the whole corpus once, ~60 epochs of a 6k-character text,
    # 2 seeds (about 85 s of single-thread CPU time per seed, estimated from measured step times)
    "cpu": CapstoneSettings(n_layer=2, n_head=4, n_embd=64, block_size=64, pretrain_chars=None,
                            batch_size=32, lr=3e-3, pretrain_eval_every=34, finetune_chars=6_000,
                            finetune_batch_size=16, finetune_steps=320, finetune_eval_every=32,
                            lora_r=8, lora_alpha=16.0, eval_batches=6, seeds=2, open_budget=1280),
    # one GPU, aimed at under 3 minutes (its time not yet measured on a GPU): a 4-layer, 128-wide model,
    # 2 seeds, ~110 epochs of a 16k-character text. Run on a CPU instead (fp32, 44 min on one thread):
    # pretraining dropout 0.1 hurt (2.197 vs 2.176); full fine-tuning forgot +0.51 nats, LoRA +0.28;
    # lora_dropout 0.05 / 0.1 had no clear effect (+0.31 / +0.25, seed spread up to 0.2)
    "gpu": CapstoneSettings(n_layer=4, n_head=4, n_embd=128, block_size=128, pretrain_chars=None,
                            batch_size=16, lr=2e-3, pretrain_eval_every=34, finetune_chars=16_000,
                            finetune_batch_size=16, finetune_steps=800, finetune_eval_every=40,
                            lora_r=8, lora_alpha=16.0, eval_batches=8, seeds=2, open_budget=3200),
}


def settings_for(budget: str) -> CapstoneSettings:
    return by_budget(budget, **SETTINGS)


# ---------------------------------------------------------------------------- the fine-tuning text

def stdlib_docstrings(modules=DOCSTRING_MODULES) -> str:
    """The docstrings of each module and of its public functions and classes, in a fixed order."""
    parts = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        parts.append(inspect.getdoc(module) or "")
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue                      # private, or imported from elsewhere
            if inspect.isfunction(obj) or inspect.isclass(obj):
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(part for part in parts if part)


def finetune_corpus(source: str | Path, vocab: str, max_chars: int) -> Corpus:
    """The fine-tuning text restricted to vocab (the pretraining corpus's characters), cut to max_chars.

    source: STDLIB_DOCSTRINGS, or a path to any UTF-8 text file.
    """
    if str(source) == STDLIB_DOCSTRINGS:
        allowed = set(vocab)
        text = "".join(c for c in stdlib_docstrings() if c in allowed)
        corpus = Corpus(text=text, chars=vocab, source=STDLIB_DOCSTRINGS)
    else:
        corpus = load_corpus(source, vocab=vocab)
    if len(corpus.text) < max_chars:
        raise ValueError(f"the fine-tuning text {corpus.source!r} has {len(corpus.text)} usable characters; "
                         f"this budget needs {max_chars}")
    return replace(corpus, text=corpus.text[:max_chars])


def finetune_task(corpus: Corpus, settings: CapstoneSettings, seed: int = 0, device="cpu") -> LMTask:
    """Random windows of the fine-tuning text (drawn with replacement: many epochs); 10% held out."""
    train_tokens, val_tokens = interleaved_split(corpus.encode(corpus.text))
    return LMTask(train_tokens, val_tokens, settings.block_size, settings.finetune_batch_size,
                  eval_batches=settings.eval_batches, seed=seed, device=device)


# ---------------------------------------------------------------------------- runs

@dataclass
class Pretraining:
    corpus: Corpus
    task: LMTask
    runs: dict[str, list[Run]]                                  # label -> one Run per seed
    models: dict[str, list[GPT]] = field(repr=False, default_factory=dict)


PRETRAIN_LABELS = ("dropout 0", "dropout 0.1")


def pretrain(settings: CapstoneSettings, corpus: str | Path = "builtin", seed: int = 0, device="cpu",
             progress: bool = False) -> Pretraining:
    """The pretraining recipe for one pass over the corpus, with dropout 0 and 0.1 at every site, per seed."""
    text, task = corpus_task(corpus, settings.block_size, settings.batch_size, max_train_chars=settings.pretrain_chars,
                             single_pass=True, eval_batches=settings.eval_batches, seed=seed, device=device)
    base = PRETRAINING.gpt_config(settings.gpt_config(text.vocab_size))
    steps = task.single_pass_steps                 # the same steps, hence the same compute, for both
    config = PRETRAINING.train_config(steps, settings.lr, eval_every=settings.pretrain_eval_every)
    runs = sweep({label: (gpt, config) for label, gpt in zip(PRETRAIN_LABELS, (base, base.with_dropout(0.1)))},
                 task, seeds=range(seed, seed + settings.seeds), progress=progress, keep_models=True)
    models = {label: [run.model for run in per_seed] for label, per_seed in runs.items()}
    return Pretraining(corpus=text, task=task, runs=runs, models=models)


FULL_LABELS = ("full", "full + dropout")


def lora_label(p: float) -> str:
    return f"LoRA p={p:g}"


def finetune_labels(settings: CapstoneSettings) -> list[str]:
    return [*FULL_LABELS, *(lora_label(p) for p in settings.lora_dropouts)]


def finetune_model(pretrained: GPT, label: str, settings: CapstoneSettings) -> GPT:
    """A copy of the pretrained model set up for one fine-tuning run (the pretrained model is untouched)."""
    config = pretrained.config
    if label == "full + dropout":
        config = replace(config, resid_dropout=settings.finetune_dropout)
    model = GPT(config).to(next(pretrained.parameters()).device)
    model.load_state_dict(pretrained.state_dict())          # dropout modules hold no weights
    if label.startswith("LoRA"):
        p = float(label.split("=")[1])
        add_lora(model, r=settings.lora_r, alpha=settings.lora_alpha, lora_dropout=p)
    elif label not in FULL_LABELS:
        raise ValueError(f"unknown fine-tuning run {label!r}; known: {finetune_labels(settings)}")
    return model


def finetune(pretraining: Pretraining, ft_task: LMTask, settings: CapstoneSettings, seed: int = 0,
             progress: bool = False) -> dict[str, list[Run]]:
    """Every fine-tuning run, per seed, from that seed's dropout-0 pretrained model.

    Each evaluation also records `orig_loss`, the loss on the pretraining corpus's validation split:
    how much of the original text the model forgets. Seeds outer, runs inner: a LoRA adapter's
    initial A is drawn from the global generator, so this order is part of what a seed reproduces.
    """
    runs: dict[str, list[Run]] = {label: [] for label in finetune_labels(settings)}
    for index, pretrained in enumerate(pretraining.models["dropout 0"]):
        setups = {label: (lambda s, label=label, pretrained=pretrained: finetune_model(pretrained, label, settings),
                          finetune_config(settings, label.startswith("LoRA")))
                  for label in runs}
        for label, done in sweep(setups, ft_task, seeds=(seed + index,), on_eval=forgetting(pretraining.task),
                                 progress=progress).items():
            runs[label] += done
    return runs


def forgetting(original: LMTask):
    """A sweep's on_eval: `orig_loss`, the loss on the pretraining corpus's validation split."""
    return lambda model: {"orig_loss": evaluate(model, original, "val")["val_loss"]}


def finetune_config(settings: CapstoneSettings, lora: bool, steps: int | None = None):
    """The fine-tuning recipe's TrainConfig; LoRA adapters train at their own lr ratio. steps defaults to
    settings.finetune_steps."""
    steps = steps or settings.finetune_steps
    lr = (FINETUNING.lora_lr_ratio if lora else FINETUNING.lr_ratio) * settings.lr
    return FINETUNING.train_config(steps, lr, eval_every=min(settings.finetune_eval_every, steps))


# ---------------------------------------------------------------------------- the open experiment

def rank_dropout_problems(r, lora_dropout) -> list[str]:
    """What is wrong with a run's (r, lora_dropout), r None meaning full fine-tuning; [] when nothing is."""
    problems = []
    if not (r is None or (isinstance(r, int) and not isinstance(r, bool) and r >= 1)):
        problems.append(f"r must be None (full fine-tuning) or a positive integer rank, got {r!r}")
    if not (isinstance(lora_dropout, (int, float)) and not isinstance(lora_dropout, bool) and 0 <= lora_dropout < 1):
        problems.append(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    elif r is None and lora_dropout != 0:
        problems.append(f"a full fine-tuning run (r None) has no adapter: its lora_dropout must be 0, got {lora_dropout!r}")
    return problems


def has_full_run(runs: dict) -> list[str]:
    """The rule compares with full fine-tuning's val loss: a design needs a run with r None."""
    return [] if any(r is None for r, _, _ in runs.values()) else [
        "the design needs a full fine-tuning run (r None): the val loss the rule compares with"]


OPEN_DESIGN = Design(knobs=("r", "lora_dropout"), knob_problems=rank_dropout_problems, design_rules=has_full_run,
                     finite_keys=("final_val_loss", "forgetting"))


def open_model(pretrained: GPT, r: int | None, lora_dropout: float, settings: CapstoneSettings) -> GPT:
    """A copy of the pretrained model; with rank r, adapters whose alpha / r is the lab's (settings.lora_alpha /
    settings.lora_r), so r changes the rank and not the scale of the update."""
    model = GPT(pretrained.config).to(next(pretrained.parameters()).device)
    model.load_state_dict(pretrained.state_dict())
    if r is not None:
        add_lora(model, r=r, alpha=r * settings.lora_alpha / settings.lora_r, lora_dropout=lora_dropout)
    return model


@torch.no_grad()
def val_loss_error(model: GPT, task: LMTask) -> dict:
    """A sweep's after(model): the standard error of the mean per-character val loss, sd / sqrt(n), over the
    task's n evaluated characters."""
    import torch.nn.functional as F
    was_training = model.training
    model.eval()
    losses = torch.cat([F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none")
                        for x, y in task.eval_batches("val")])                     # (n,)
    model.train(was_training)
    return {"val_loss_error": float(losses.std() / math.sqrt(losses.numel()))}


def open_experiment(settings: CapstoneSettings, pretrained: GPT, ft_task: LMTask, original: LMTask, design,
                    seed: int = 0, progress: bool = False) -> dict[str, list[Run]]:
    """Run the student's design (a function of the settings returning {label: (r, lora_dropout, steps)}, r None
    for full fine-tuning) from the pretrained model with the fine-tuning recipe and the lab's sweep, one seed each.

    Refuses a design that spends more than settings.open_budget optimizer steps in all, before training."""
    runs = OPEN_DESIGN.planned(design, settings)
    setups = {name: (lambda s, r=r, p=p: open_model(pretrained, r, float(p), settings),
                     finetune_config(settings, r is not None, steps))
              for name, (r, p, steps) in runs.items()}
    return sweep(setups, ft_task, seeds=(seed,), on_eval=forgetting(original), progress=progress,
                 after=lambda model: val_loss_error(model, ft_task))


def open_record(settings: CapstoneSettings, runs: dict, results: dict[str, list[Run]], orig_before: float) -> dict:
    """Each run's r, lora_dropout, steps, final val loss on the new text and forgetting (the rise of the loss
    on the original corpus from orig_before); the reference (the full run with the lowest final val loss), the
    tolerance (two standard errors of that run's mean val loss), and, of the runs whose final val loss is at
    most the reference's + tolerance, the one that forgot least (the rule's pick)."""
    found = {}
    for name, (r, p, steps) in runs.items():
        run = results[name][0]
        found[name] = {"r": r, "lora_dropout": float(p), "steps": steps, "steps_trained": len(run.history.loss),
                       "trainable_params": run.trainable_params, "final_val_loss": run.history.final["val_loss"],
                       "forgetting": run.history.final["orig_loss"] - orig_before,
                       "val_loss_error": run.outputs["val_loss_error"]}
    reference = min((name for name, row in found.items() if row["r"] is None),
                    key=lambda name: found[name]["final_val_loss"])
    tolerance = 2 * found[reference]["val_loss_error"]
    limit = found[reference]["final_val_loss"] + tolerance
    no_worse = [name for name, row in found.items() if row["final_val_loss"] <= limit]
    return record(settings.open_budget, found, reference=reference, val_loss_tolerance=tolerance,
                  no_worse_than_full=no_worse, least_forgetting=min(no_worse, key=lambda name: found[name]["forgetting"]))


def open_graded(settings: CapstoneSettings, design) -> dict:
    """The design as the grader runs it (the built-in corpus and stdlib docstrings, the CPU, seed 0): its record."""
    pretraining = pretrain(replace(settings, seeds=1), "builtin", seed=0)
    pretrained = pretraining.models["dropout 0"][0]
    ft_task = finetune_task(finetune_corpus(STDLIB_DOCSTRINGS, pretraining.corpus.chars, settings.finetune_chars),
                            settings, seed=0)
    results = open_experiment(settings, pretrained, ft_task, pretraining.task, design)
    return open_record(settings, design(settings), results, pretraining.runs["dropout 0"][0].history.final["val_loss"])


# ---------------------------------------------------------------------------- summaries

def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def spread(values) -> float:
    values = list(values)
    return max(values) - min(values)


def pretraining_summary(pretraining: Pretraining) -> dict:
    """Per label: final val loss (mean and spread over seeds), train loss, wall seconds per step
    (evaluations included)."""
    out = {}
    for label, runs in pretraining.runs.items():
        finals = [run.history.final["val_loss"] for run in runs]
        out[label] = {
            "val_loss": mean(finals), "val_loss_spread": spread(finals),
            "train_loss": mean(run.history.final["train_loss"] for run in runs),
            # the fastest seed: the first run of a session also pays one-off costs (imports, allocator warm-up)
            "seconds_per_step": min(run.history.wall_time / len(run.history.loss) for run in runs),
            "steps": len(runs[0].history.loss), "epochs": runs[0].epochs,
            "params_per_token": runs[0].params_per_token,
        }
    return out


def finetuning_summary(runs: dict[str, list[Run]], orig_loss_before: list[float]) -> dict:
    """Per label: best and final val loss on the new text, forgetting (rise of the loss on the original
    corpus from before fine-tuning to the end), epochs and trainable parameters per token."""
    out = {}
    for label, per_seed in runs.items():
        best = [run.history.best("val_loss")[1] for run in per_seed]
        final = [run.history.final["val_loss"] for run in per_seed]
        forgetting = [run.history.final["orig_loss"] - before for run, before in zip(per_seed, orig_loss_before)]
        out[label] = {
            "best_val_loss": mean(best), "best_val_loss_spread": spread(best),
            "final_val_loss": mean(final), "final_val_loss_spread": spread(final),
            "final_gap": mean(run.history.final_gap for run in per_seed),
            "forgetting": mean(forgetting), "forgetting_spread": spread(forgetting),
            "epochs": per_seed[0].epochs, "trainable_params": per_seed[0].trainable_params,
            "params_per_token": per_seed[0].params_per_token,
        }
    return out


# Which runs compare a regularizer against its baseline: (run, baseline, what the run adds).
def comparisons(settings: CapstoneSettings) -> list[tuple[str, str, str, str]]:
    """(phase, run, baseline, regularizer) for every effect the regime map marks."""
    rows = [("pretraining", "dropout 0.1", "dropout 0", "dropout 0.1 (all sites)"),
            ("fine-tuning", "full + dropout", "full", f"residual dropout {settings.finetune_dropout:g}"),
            ("fine-tuning", lora_label(0.0), "full", f"LoRA rank {settings.lora_r} (frozen base)")]
    rows += [("fine-tuning", lora_label(p), lora_label(0.0), f"lora_dropout {p:g}")
             for p in settings.lora_dropouts if p > 0]
    return rows


def verdict(delta: float, noise: float) -> str:
    """'helped' if the regularizer lowered the loss by more than the seed-to-seed noise, 'hurt' if it
    raised it by more, else 'no clear effect'."""
    if delta < -noise:
        return "helped"
    if delta > noise:
        return "hurt"
    return "no clear effect"


def effects(settings: CapstoneSettings, pre: dict, fine: dict, metric: str = "final_val_loss") -> list[dict]:
    """For each comparison, the change each regularizer caused and its verdict, from the runs' summaries.

    Two criteria: the validation loss (pretraining: final val loss on the corpus, since in one pass the
    final loss is what you get; fine-tuning: `metric` of the new text's val loss) and, for fine-tuning,
    forgetting (the rise of the loss on the original corpus). The noise floor is the larger seed spread of
    the two runs (0 with one seed, so a single seed gives a verdict on any difference).
    """
    rows = []
    for phase, run, baseline, regularizer in comparisons(settings):
        table, key = (pre, "val_loss") if phase == "pretraining" else (fine, metric)
        row = {"phase": phase, "run": run, "baseline": baseline, "regularizer": regularizer,
               "epochs": table[run]["epochs"], "params_per_token": table[run]["params_per_token"]}
        keys = [("val", key)] + ([("forgetting", "forgetting")] if phase == "fine-tuning" else [])
        for name, column in keys:
            delta = table[run][column] - table[baseline][column]
            noise = max(table[run][column + "_spread"], table[baseline][column + "_spread"])
            row.update({f"{name}_delta": delta, f"{name}_noise": noise, f"{name}_verdict": verdict(delta, noise)})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- the regime map

# Published pretraining runs, placed by parameters / training tokens (x: about one pass over most data).
PUBLISHED_REGIMES = {
    "GPT-3 175B": (175e9, 300e9, "Brown et al. 2020, Table 2.2 / §2.2"),
    "Chinchilla 70B": (70e9, 1.4e12, "Hoffmann et al. 2022, §4.1"),
    "Llama 2 7B": (7e9, 2.0e12, "Touvron et al. 2023, Table 1"),
}

VERDICT_COLORS = {"helped": "tab:green", "hurt": "tab:red", "no clear effect": "tab:gray", "baseline": "black"}


def plot_regime_map(ax, points: list[dict], published: bool = True):
    """Each point: {label, epochs, params_per_token, verdict[, forgetting_verdict]}; log-log axes, colored
    by the validation-loss verdict; the forgetting verdict, where there is one, is written beside it.

    Runs at the same coordinates (same epochs and trainable parameters) share a marker position; their
    labels are stacked beside it.
    """
    stacked: dict[tuple[float, float], int] = {}
    for point in points:
        color = VERDICT_COLORS[point["verdict"]]
        where = (point["epochs"], point["params_per_token"])
        baseline = point["verdict"] == "baseline"
        ax.scatter(*where, color=color, marker="o" if baseline else "s", s=90 if baseline else 40, zorder=3,
                   facecolors="none" if baseline else color)
        row = stacked.get(where, 0)
        stacked[where] = row + 1
        text = f"{point['label']}: {point['verdict']}"
        if point.get("forgetting_verdict"):
            text += f" (forgetting: {point['forgetting_verdict']})"
        ax.annotate(text, where, textcoords="offset points",
                    xytext=(8, 6 - 11 * row), fontsize=8, color=color)
    if published:
        for name, (params, tokens, _source) in PUBLISHED_REGIMES.items():
            ax.scatter(1.0, params / tokens, color="tab:blue", marker="^", s=40, alpha=0.6, zorder=2)
            ax.annotate(name, (1.0, params / tokens), textcoords="offset points", xytext=(6, -10),
                        fontsize=8, color="tab:blue")
    ax.set_xscale("log")
    ax.set_yscale("log")
    largest = max([point["epochs"] for point in points] + [1.0])
    ax.set_xlim(0.3, largest * 100)              # room for the labels right of the points
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("times each training token was seen (epochs, log)")
    ax.set_ylabel("trainable parameters per training token (log)")
    for verdict_name, color in VERDICT_COLORS.items():
        if not any(point["verdict"] == verdict_name for point in points):
            continue
        ax.scatter([], [], color=color, marker="o" if verdict_name == "baseline" else "s", label=verdict_name,
                   facecolors="none" if verdict_name == "baseline" else color)
    if published:
        ax.scatter([], [], color="tab:blue", marker="^", label="published pretraining")
    ax.legend(fontsize=8, loc="lower right")
    return ax


def regime_points(settings: CapstoneSettings, pre: dict, fine: dict, metric: str = "final_val_loss") -> list[dict]:
    """The regime map's points: each baseline run, and each regularized run marked helped / hurt (on the
    validation loss, and for fine-tuning also on forgetting)."""
    marked = {row["run"]: row for row in effects(settings, pre, fine, metric)}
    points = []
    for phase, table in (("pretraining", pre), ("fine-tuning", fine)):
        for label, row in table.items():
            effect = marked.get(label, {})
            points.append({"label": f"{label} (pretrain)" if phase == "pretraining" else label,
                           "epochs": row["epochs"], "params_per_token": row["params_per_token"],
                           "verdict": effect.get("val_verdict", "baseline"),
                           "forgetting_verdict": effect.get("forgetting_verdict")})
    return points


def show_finetune_run(runs: dict[str, list[Run]], label: str, orig_before: float):
    """The slider's view: one fine-tuning run's curves in full color, the others faint (first seed each).

    Left: the new text's train and val loss; right: the loss on the original corpus (forgetting).
    """
    import matplotlib.pyplot as plt

    colors = colors_for(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key in ((left, "val_loss"), (right, "orig_loss")):
        plot_highlighted(ax, {name: [per_seed[0].history.series(key)] for name, per_seed in runs.items()}, label,
                         colors)
    left.plot(*runs[label][0].history.series("train_loss"), color=colors[label], ls=":", lw=2.0,
              label=f"{label} (train)")
    right.axhline(orig_before, color="black", lw=0.8, ls="--", label="before fine-tuning")
    left.set(title=f"new text: {label}", xlabel="step", ylabel="loss (nats per character)")
    right.set(title="original corpus (forgetting)", xlabel="step", ylabel="val loss (nats per character)")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    plt.show()
    best_step, best = runs[label][0].history.best("val_loss")
    final = runs[label][0].history.final
    print(f"{label}: best val loss {best:.3f} at step {best_step}, final {final['val_loss']:.3f}; "
          f"original corpus {orig_before:.3f} -> {final['orig_loss']:.3f}")


# ------------------------------------------------------------------ the regimes table of notebook 06
CHINCHILLA_TOKENS_PER_PARAMETER = 20      # Hoffmann et al. 2022: compute-optimal at about 20 tokens per parameter


def check_regimes(rows) -> dict[str, float]:
    """Parameters per training token of each (name, params, tokens, epochs) row, with the table's claims
    asserted: every published pretraining run has fewer parameters than tokens (< 1: one pass cannot
    memorize), Chinchilla sits at 1/20 within the rounding of its published figures (70B and 1.4T are given
    to 2 significant digits: +-5% each, so 10% on the ratio), and full fine-tuning of the 7B scenario at over
    1000 parameters per token (many epochs, memorization within reach). Returns the ratios by name."""
    ratios = {name: params / tokens for name, params, tokens, _epochs in rows}
    for name in PUBLISHED_REGIMES:
        assert ratios[name] < 1, f"{name}: {ratios[name]:.3g} parameters per token is not a one-pass regime"
    chinchilla = ratios["Chinchilla 70B"] * CHINCHILLA_TOKENS_PER_PARAMETER
    assert abs(chinchilla - 1) <= 0.10, f"Chinchilla at {ratios['Chinchilla 70B']:.3g} parameters per token, not 1/20"
    full = ratios["7B, full fine-tuning"]
    assert full > 1000, f"full fine-tuning at {full:.3g} parameters per token, not over 1000"
    return ratios
