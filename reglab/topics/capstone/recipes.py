"""Topic capstone: the course's two training recipes as objects, pretraining (one pass over a large corpus) and
fine-tuning (many epochs over a small one), each setting with the published source it comes from.

A recipe says *which* regularizers to use and how strong; the caller says at what scale (steps, peak
learning rate), since those depend on the model and the data. `recipe.gpt_config(base)` gives the
model's dropout settings, `recipe.train_config(steps, lr)` the trainer's settings, and
`decay_per_step(train_config)` what the weight decay amounts to per step (lr * lambda), which is the
number to compare across recipes: lambda alone says little without the learning rate it multiplies.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from reglab.model import DROPOUT_SITES, GPTConfig
from reglab.topics.weight_decay.lecture import decay_over_run, half_life, retained
from reglab.train import TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    # --- dropout, per site (PyTorch's convention: the DROP probability) ---
    embd_dropout: float
    attn_dropout: float
    ffn_dropout: float
    resid_dropout: float
    lora_dropout: float | None       # on the LoRA adapters' input; None: the recipe trains no adapters
    # --- optimizer: AdamW, decay on matrices and embeddings only (reglab.train.param_groups) ---
    weight_decay: float              # AdamW lambda
    betas: tuple[float, float]
    grad_clip: float | None          # global-norm threshold
    # --- loss ---
    label_smoothing_lm: float        # alpha when the task is next-token prediction
    label_smoothing_classification: float  # alpha when the task is classification
    # --- schedule: linear warmup, then cosine down to min_lr_ratio * lr ---
    warmup_fraction: float
    min_lr_ratio: float
    lr_ratio: float                  # peak lr as a multiple of the pretraining peak lr
    lora_lr_ratio: float | None      # the same for LoRA adapters (they start at zero and need larger steps)
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # field -> paper and section

    def dropout(self) -> dict[str, float]:
        return {site: getattr(self, site) for site in DROPOUT_SITES}

    def gpt_config(self, base: GPTConfig) -> GPTConfig:
        """base with this recipe's dropout at every site (architecture untouched)."""
        return replace(base, **self.dropout())

    def train_config(self, steps: int, lr: float, task_kind: str = "lm", **overrides) -> TrainConfig:
        """The trainer's settings for a run of `steps` at peak learning rate `lr` (already scaled by the caller).

        overrides replaces any TrainConfig field (eval_every, seed, progress, ...).
        """
        if task_kind not in ("lm", "classification"):
            raise ValueError(f"task_kind must be 'lm' or 'classification', got {task_kind!r}")
        smoothing = self.label_smoothing_lm if task_kind == "lm" else self.label_smoothing_classification
        settings = dict(steps=steps, lr=lr, min_lr=self.min_lr_ratio * lr,
                        warmup_steps=max(1, round(self.warmup_fraction * steps)), schedule="cosine",
                        weight_decay=self.weight_decay, betas=self.betas, optimizer="adamw",
                        grad_clip=self.grad_clip, label_smoothing=smoothing)
        settings.update(overrides)
        return TrainConfig(**settings)

    def rows(self) -> list[tuple[str, str, str]]:
        """(setting, value, source) for every field with a source: what the notebooks print as a table."""
        return [(name, repr(getattr(self, name)), source) for name, source in self.sources.items()]


PRETRAINING = Recipe(
    name="pretraining",
    # No dropout: PaLM "was trained without dropout" (Chowdhery et al. 2022, §5); the GPT-3 and Llama 2
    # papers state no dropout at all (Brown et al. 2020, App. B; Touvron et al. 2023, §2.2).
    embd_dropout=0.0, attn_dropout=0.0, ffn_dropout=0.0, resid_dropout=0.0,
    lora_dropout=None,
    weight_decay=0.1,        # GPT-3 (Brown et al. 2020, App. B), Llama 2 (Touvron et al. 2023, §2.2)
    betas=(0.9, 0.95),       # the same two sources
    grad_clip=1.0,           # the same two sources
    label_smoothing_lm=0.0,  # none reported by GPT-3 or Llama 2; PaLM: "without label smoothing" (§5)
    label_smoothing_classification=0.0,
    warmup_fraction=0.05,    # GPT-3 warms up over 375M tokens, Llama 2 over 2000 steps; 5% suits short runs
    min_lr_ratio=0.1,        # cosine to 10% of the peak: GPT-3 (App. B), Llama 2 (§2.2)
    lr_ratio=1.0,            # the reference the fine-tuning lr is measured against
    lora_lr_ratio=None,
    sources={
        "resid_dropout": "0 everywhere: PaLM trained without dropout (Chowdhery et al. 2022, §5); "
                         "GPT-3 (App. B) and Llama 2 (§2.2) state none",
        "weight_decay": "AdamW lambda 0.1: GPT-3 (Brown et al. 2020, App. B); Llama 2 (Touvron et al. 2023, §2.2)",
        "betas": "(0.9, 0.95): GPT-3 (App. B); Llama 2 (§2.2)",
        "grad_clip": "global norm 1.0: GPT-3 (App. B); Llama 2 (§2.2)",
        "label_smoothing_lm": "none: GPT-3 (App. B) and Llama 2 (§2.2) report none; PaLM computes the loss "
                              "\"without label smoothing\" (Chowdhery et al. 2022, §5)",
        "warmup_fraction": "linear warmup: GPT-3 375M tokens (App. B), Llama 2 2000 steps (§2.2); "
                           "the 5% fraction is the course's choice for short runs",
        "min_lr_ratio": "cosine decay to 10% of the peak: GPT-3 (App. B); Llama 2 (§2.2)",
    },
)

FINETUNING = Recipe(
    name="fine-tuning",
    embd_dropout=0.0, attn_dropout=0.0, ffn_dropout=0.0,
    # PaLM: "dropout of 0.1 is used for finetuning in most cases" (Chowdhery et al. 2022, §5);
    # GPT-1 (Radford et al. 2018, §4.1) and BERT (Devlin et al. 2019, App. A.2) train with 0.1.
    resid_dropout=0.1,
    # Hu et al. 2021 (App. D; loralib's E2E command): 0.1; QLoRA: 0.1 up to 13B, 0.05 for 33B and 65B
    # (Dettmers et al. 2023, App. B). Hugging Face PEFT's default is 0.0.
    lora_dropout=0.1,
    weight_decay=0.01,       # BERT (App. A.2; decoupled in its released optimizer); LoRA on E2E (Hu et al., App. D)
    betas=(0.9, 0.95),       # kept from pretraining; BERT and LoRA used 0.999
    grad_clip=1.0,           # BERT's released optimizer clips at 1.0; Hugging Face Trainer's max_grad_norm default
    label_smoothing_lm=0.0,  # the course evaluates plain NLL on text
    label_smoothing_classification=0.1,  # Szegedy et al. 2016, §7; Vaswani et al. 2017, §5.4
    warmup_fraction=0.05,
    min_lr_ratio=0.1,
    # Full fine-tuning at a fraction of the pretraining peak: BERT 1e-4 -> 2e-5..5e-5 (App. A.2, A.3),
    # GPT-1 2.5e-4 -> 6.25e-5 (§4.1), Llama 2 7B 3e-4 -> 2e-5 (§2.2, §3.1).
    lr_ratio=0.1,
    # LoRA at about the pretraining lr: QLoRA 2e-4 on LLaMA 7B (pretrained at 3e-4), LoRA 2e-4 on GPT-2 M.
    lora_lr_ratio=1.0,
    sources={
        "resid_dropout": "0.1: PaLM's fine-tuning dropout (Chowdhery et al. 2022, §5, which names no site: putting "
                         "it on the residual branches is the course's choice); GPT-1 (Radford et al. 2018, §4.1); "
                         "BERT (Devlin et al. 2019, App. A.2)",
        "lora_dropout": "0.1: Hu et al. 2021 (App. D, GPT-2 on E2E); QLoRA 0.1 (7B, 13B) / 0.05 (33B, 65B) "
                        "(Dettmers et al. 2023, App. B); PEFT's default is 0.0",
        "weight_decay": "0.01: BERT (Devlin et al. 2019, App. A.2); LoRA on E2E (Hu et al. 2021, App. D). "
                        "Llama 2's SFT kept 0.1 at lr 2e-5 (Touvron et al. 2023, §3.1)",
        "grad_clip": "1.0: BERT's released optimizer (optimization.py); Hugging Face Trainer default",
        "label_smoothing_classification": "0.1: Szegedy et al. 2016, §7; Vaswani et al. 2017, §5.4",
        "lr_ratio": "full fine-tuning lr well below the pretraining peak: BERT 1e-4 -> 2e-5..5e-5 (App. A.2-A.3); "
                    "GPT-1 2.5e-4 -> 6.25e-5 (§4.1); Llama 2 7B 3e-4 -> 2e-5 (§2.2, §3.1)",
        "lora_lr_ratio": "LoRA near the pretraining lr: QLoRA 2e-4 for 7B (Dettmers et al. 2023, App. B); "
                         "LoRA 2e-4 on GPT-2 M (Hu et al. 2021, App. D)",
    },
)

@dataclass(frozen=True)
class DecaySummary:
    """What AdamW's decay amounts to over a schedule (torch.optim.AdamW: theta <- theta * (1 - lr_t * lambda))."""
    peak_per_step: float       # lr * lambda at the peak
    half_life_steps: float     # ln 2 / -ln(1 - lr * lambda): steps for an un-reinforced weight to halve at the peak lr
    integrated: float          # sum over steps of lr_t * lambda
    retained: float            # prod over steps of (1 - lr_t * lambda): what is left of a weight no gradient touches


def decay_per_step(config: TrainConfig) -> DecaySummary:
    """Per-step and total decay that config's learning-rate schedule and weight_decay imply
    (reglab.topics.weight_decay.lecture's `half_life` and `decay_over_run`)."""
    integrated, kept = decay_over_run(config)
    return DecaySummary(peak_per_step=config.lr * config.weight_decay,
                        half_life_steps=half_life(config.lr, config.weight_decay), integrated=integrated,
                        retained=kept)


# Published (peak lr, lambda) pairs, to compare per-step decay: lr * lambda.
PUBLISHED_DECAY = {
    "GPT-3 175B pretraining": (0.6e-4, 0.1, "Brown et al. 2020, Table 2.1 and App. B"),
    "Llama 2 7B pretraining": (3.0e-4, 0.1, "Touvron et al. 2023, Table 1 and §2.2"),
    "Llama 2-Chat SFT": (2.0e-5, 0.1, "Touvron et al. 2023, §3.1"),
    "BERT pretraining": (1.0e-4, 0.01, "Devlin et al. 2019, App. A.2"),
    "BERT fine-tuning (lr 2e-5)": (2.0e-5, 0.01, "Devlin et al. 2019, App. A.3"),
    "LoRA on GPT-2 M (E2E)": (2.0e-4, 0.01, "Hu et al. 2021, App. D"),
}


def show_recipe_decay(lr: float, weight_decay: float, steps: int = 10_000):
    """Plot what AdamW's decay leaves of a weight no gradient reinforces over warmup + cosine (the widget).

    The recipes' own settings are drawn for comparison at the same schedule: pretraining (lambda 0.1 at
    lr) and fine-tuning (lambda 0.01 at lr_ratio * lr).
    """
    import matplotlib.pyplot as plt

    def schedule(peak_lr, wd):   # warmup over 5% of the steps, then cosine down to peak_lr / 10
        return TrainConfig(steps=steps, lr=peak_lr, warmup_steps=steps // 20, weight_decay=wd)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    chosen = retained(schedule(lr, weight_decay))
    ax.plot(chosen, lw=2.5, label=f"lr {lr:.0e}, lambda {weight_decay:g}")
    ax.plot(retained(schedule(lr, PRETRAINING.weight_decay)), ls="--",
            label=f"pretraining recipe (lambda {PRETRAINING.weight_decay:g})")
    ax.plot(retained(schedule(FINETUNING.lr_ratio * lr, FINETUNING.weight_decay)), ls=":",
            label=f"fine-tuning recipe (lr x {FINETUNING.lr_ratio:g}, lambda {FINETUNING.weight_decay:g})")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of the weight left")
    ax.set_title("AdamW decay of a weight no gradient reinforces (warmup + cosine)")
    ax.legend(fontsize=8)
    plt.show()
    print(f"per-step decay lr * lambda = {lr * weight_decay:.2e}; half-life at the peak "
          f"{half_life(lr, weight_decay):,.0f} steps; after {steps:,} steps {chosen[-1]:.3f} of the weight is left")
