"""The claims ledger: every factual claim the course makes about published models, papers and libraries,
with what the source actually says, a verdict, and where the course discusses it.

A claim is written the way it is commonly stated (in blog posts, course notes, answers to interview
questions); `source_says` is what the paper, code or documentation says; `verdict` compares the two:
- "correct": the source says so;
- "wrong": the source says otherwise;
- "unsupported": the source (or every source the entry names) is silent on it.
`basis` says whether the entry rests on a published source or on a measurement the course makes
itself (then the number is the reader's device's, and the verdict is the direction the course finds).
`where` names a course notebook by its number ("01" is notebooks/01_*.ipynb) and a section; `cells`
names the notebook cells (by id) that state the claim's verdict, each with the marker
"[claim <id>: <verdict>]" in its text, which tests/test_corrections.py compares with this ledger.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

VERDICTS = ("correct", "wrong", "unsupported")
BASES = ("published", "measured by the course")
TOPICS = ("dropout", "weight decay", "label smoothing", "gradient clipping", "fine-tuning", "training stability")


@dataclass(frozen=True)
class Claim:
    id: str            # short, stable: "gpt3-dropout"
    topic: str         # one of TOPICS
    claim: str         # as commonly stated
    source_says: str   # what the source says (paraphrased, never quoted at length)
    verdict: str       # one of VERDICTS
    source: str        # paper / code / docs, with section
    where: str         # "NN: section" in the course's notebooks
    basis: str = "published"
    cells: tuple[str, ...] = ()   # "notebooks/01_dropout.ipynb#pretraining": cells carrying the verdict marker

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"claim {self.id!r}: verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.basis not in BASES:
            raise ValueError(f"claim {self.id!r}: basis must be one of {BASES}, got {self.basis!r}")
        if self.topic not in TOPICS:
            raise ValueError(f"claim {self.id!r}: topic must be one of {TOPICS}, got {self.topic!r}")
        for name in ("claim", "source_says", "source", "where"):
            if not getattr(self, name).strip():
                raise ValueError(f"claim {self.id!r} has an empty {name}")


CLAIMS: list[Claim] = [
    # ------------------------------------------------------------------ dropout
    Claim("dropout-wasted-compute", "dropout",
          "Dropout wastes a fraction p of the compute, because the dropped units are not computed.",
          "Every unit is computed and then multiplied by a random mask (inverted dropout scales the kept "
          "ones by 1/(1-p)): the course checks that the same matrix multiplies are done and asserts that the "
          "masks add memory; drawing and applying them is extra work, and the step time is measured and "
          "printed with its verdict, not asserted. What dropout really costs is slower convergence per step.",
          "wrong", "PyTorch torch.nn.functional.dropout (masks after the computation); the course's FLOP, "
          "memory and step-time measurements", "01: What it costs, measured; 06 lab: Pretraining in one pass",
          basis="measured by the course", cells=("notebooks/01_dropout.ipynb#cost-time",)),
    Claim("dropout-p-convention", "dropout",
          "The dropout rate p is the probability of keeping a unit.",
          "In PyTorch p is the probability of zeroing an element. Srivastava et al. use p for the "
          "probability of retaining a unit (p = 0.5 for hidden units), and TensorFlow 1's tf.nn.dropout "
          "took keep_prob: the same number means opposite things in different sources.",
          "wrong", "PyTorch docs, torch.nn.Dropout; Srivastava et al. 2014 (JMLR), §1",
          "01: Mechanism"),
    Claim("dropout-batchnorm-variance-shift", "dropout",
          "Dropout placed before BatchNorm makes the statistics BatchNorm collects in training differ from "
          "what it sees at test time.",
          "Li et al. name this the variance shift: dropout's 1/(1-p) scaling changes the variance in "
          "training but not in inference, so BatchNorm's running variance is wrong at test time.",
          "correct", "Li, Chen, Hu & Yang 2019 (CVPR), abstract", "01: Dropout before BatchNorm"),
    Claim("gpt1-dropout", "dropout",
          "GPT-1 used dropout 0.1.",
          "Residual, embedding and attention dropout with rate 0.1 (and 0.1 on the classifier when "
          "fine-tuning).",
          "correct", "Radford et al. 2018 (GPT-1), §4.1 (which also gives 100 epochs of pretraining)",
          "01: Why large-scale pretraining uses none", cells=("notebooks/01_dropout.ipynb#pretraining",)),
    Claim("gpt2-dropout", "dropout",
          "GPT-2 was trained with dropout 0.1.",
          "The GPT-2 paper states no dropout value. 0.1 is the default of common library configurations "
          "(Hugging Face GPT2Config: resid_pdrop = embd_pdrop = attn_pdrop = 0.1) and GPT-1's setting.",
          "unsupported", "Radford et al. 2019 (GPT-2), §2.3 (model); Hugging Face GPT2Config defaults",
          "01: Why large-scale pretraining uses none"),
    Claim("gpt3-dropout", "dropout",
          "GPT-3 was trained with dropout 0.1.",
          "The training details list Adam's betas and epsilon, clipping at 1.0, cosine decay to 10%, "
          "warmup and weight decay 0.1; no dropout value is given anywhere in the paper.",
          "unsupported", "Brown et al. 2020 (GPT-3), §2.1 (model), §2.3 (training) and App. B",
          "01: Why large-scale pretraining uses none"),
    Claim("palm-dropout", "dropout",
          "PaLM was pretrained without dropout and fine-tuned with dropout 0.1.",
          "The model was trained without dropout; dropout 0.1 is used for fine-tuning in most cases (PaLM "
          "names no site: the course's fine-tuning recipe puts it on the residual branches by its own choice).",
          "correct", "Chowdhery et al. 2022 (PaLM), §5 (Training setup)",
          "01: Why large-scale pretraining uses none; 06: The two recipes"),
    Claim("llama-dropout", "dropout",
          "Llama 2 and Llama 3 use dropout 0.1 (or: state that they use none).",
          "Neither paper mentions dropout. Llama 2's pretraining details give AdamW, the schedule, weight "
          "decay 0.1 and clipping 1.0; Llama 3's state neither of those two, and its one regularizer-like "
          "step is averaging checkpoints during the final annealing of the learning rate (§3.4).",
          "unsupported", "Touvron et al. 2023 (Llama 2), §2.2; Llama 3 team 2024 (The Llama 3 Herd of "
          "Models), §3.4", "01: Why large-scale pretraining uses none",
          cells=("notebooks/01_dropout.ipynb#pretraining",)),
    Claim("nanogpt-dropout", "dropout",
          "nanoGPT pretrains with dropout 0 and suggests 0.1 or more for fine-tuning.",
          "train.py sets dropout = 0.0 with the comment that 0 is good for pretraining and 0.1+ worth "
          "trying for fine-tuning; weight_decay = 0.1 and grad_clip = 1.0 in the same file.",
          "correct", "karpathy/nanoGPT, train.py (default config)", "06: The two recipes"),
    Claim("dropout-typical-values", "dropout",
          "Typical values: p = 0.5 for fully connected layers, 0.1-0.2 for convolutional layers, 0.1 for "
          "transformers.",
          "Partly sourced: AlexNet used 0.5 in its first two fully connected layers and the original "
          "Transformer 0.1 on residual branches and embeddings. No source cited here states 0.1-0.2 for "
          "convolutional layers (folklore), and large-scale transformer pretraining today uses none.",
          "unsupported", "Krizhevsky et al. 2012 (AlexNet), §4.2; Vaswani et al. 2017, §5.4",
          "01: Why large-scale pretraining uses none", cells=("notebooks/01_dropout.ipynb#pretraining",)),
    Claim("dropout-small-datasets", "dropout",
          "Don't use dropout on small datasets, where the model needs its full capacity.",
          "The opposite of the regime the course measures: on a small dataset seen for many epochs dropout "
          "closes the train-validation gap; in a single pass over a large corpus it only costs.",
          "wrong", "the course's dropout lab (small data, many epochs vs. a single pass)",
          "01: Why large-scale pretraining uses none; 01 lab", basis="measured by the course",
          cells=("notebooks/01_dropout.ipynb#pretraining",)),
    # ------------------------------------------------------------------ weight decay
    Claim("l2-equals-weight-decay", "weight decay",
          "L2 regularization and weight decay are the same thing.",
          "They coincide for plain SGD (after rescaling by the learning rate) but not for adaptive methods "
          "such as Adam, where the L2 gradient is divided by the running RMS of the gradient.",
          "wrong", "Loshchilov & Hutter 2019 (ICLR), abstract and §2", "02: L2 vs weight decay"),
    Claim("adamw-imagenet-figure", "weight decay",
          "Decoupling weight decay (AdamW) improves Adam by 0.5-1% on ImageNet.",
          "The paper's experiments are on CIFAR-10 and ImageNet32x32 (a 32x32 downsampled ImageNet), and "
          "its gains are stated as relative reductions of test error (about 15%), not as an absolute "
          "figure on full-resolution ImageNet, which the paper does not train on.",
          "wrong", "Loshchilov & Hutter 2019 (ICLR), §4 (experimental validation); the abstract gives no figure", "02: Published settings"),
    Claim("pytorch-adamw-lr-times-wd", "weight decay",
          "PyTorch's AdamW multiplies each weight by (1 - lr * weight_decay) every step.",
          "torch.optim.AdamW applies theta <- theta - lr * lambda * theta before the Adam step, so the "
          "decay follows the learning-rate schedule; the paper's Algorithm 2 scales lambda by the "
          "schedule multiplier eta_t only, not by the base learning rate.",
          "correct", "PyTorch docs, torch.optim.AdamW (algorithm); Loshchilov & Hutter 2019, Algorithm 2",
          "02: AdamW and PyTorch's exact semantics"),
    Claim("gpt3-adamw", "weight decay",
          "GPT-3 used AdamW with weight decay 0.1.",
          "Adam with beta1 = 0.9, beta2 = 0.95, eps = 1e-8, and weight decay 0.1 citing Loshchilov & "
          "Hutter's decoupled decay.",
          "correct", "Brown et al. 2020 (GPT-3), App. B", "02: Published settings; 06: The two recipes"),
    Claim("llama2-adamw", "weight decay",
          "Llama 2 used AdamW with weight decay 0.1 and gradient clipping 1.0.",
          "AdamW (beta1 0.9, beta2 0.95, eps 1e-5), cosine schedule with 2000 warmup steps down to 10% "
          "of the peak, weight decay 0.1, gradient clipping 1.0.",
          "correct", "Touvron et al. 2023 (Llama 2), §2.2", "02: Published settings; 06: The two recipes"),
    Claim("palm-adamw", "weight decay",
          "PaLM was trained with AdamW and weight decay 0.1.",
          "PaLM used Adafactor without factorization (in effect Adam with parameter scaling) and a "
          "dynamic weight decay of lr^2.0, where lr is the current learning rate.",
          "wrong", "Chowdhery et al. 2022 (PaLM), §5 (Training setup)", "02: Published settings"),
    Claim("chinchilla-adamw", "weight decay",
          "Chinchilla switched from Gopher's Adam to AdamW.",
          "Chinchilla is trained with AdamW instead of Adam because it improved the language-modelling "
          "loss and the downstream performance after fine-tuning.",
          "correct", "Hoffmann et al. 2022 (Chinchilla), §4.1", "02: Published settings"),
    Claim("bert-l2-in-adam", "weight decay",
          "BERT used L2 regularization 0.01 added to the loss inside Adam.",
          "The paper writes 'L2 weight decay of 0.01'; the released optimizer (AdamWeightDecayOptimizer) "
          "adds the decay to the update outside Adam's moments, i.e. decoupled, exempts LayerNorm "
          "and bias parameters, and clips gradients at global norm 1.0.",
          "wrong", "Devlin et al. 2019 (BERT), App. A.2; google-research/bert optimization.py "
          "(AdamWeightDecayOptimizer)", "02: Published settings; 03: Where it is used; 06: The two recipes",
          cells=("notebooks/03_label_smoothing.ipynb#where-used",)),
    Claim("finetuning-lowers-wd", "weight decay",
          "Fine-tuning recipes always lower the weight decay.",
          "Llama 2-Chat's supervised fine-tuning kept weight decay 0.1 but at lr 2e-5 (pretraining peak "
          "3e-4 for 7B), so the decay per step, lr * lambda, still fell 15-fold. BERT and LoRA's GPT-2 "
          "runs used 0.01; QLoRA used 0.",
          "wrong", "Touvron et al. 2023, §3.1 and Table 1; Devlin et al. 2019, App. A.2; Dettmers et al. "
          "2023, App. B", "06: What the decay amounts to per step"),
    # ------------------------------------------------------------------ label smoothing
    Claim("transformer-label-smoothing", "label smoothing",
          "The original Transformer used label smoothing 0.1.",
          "epsilon_ls = 0.1; it hurt perplexity (the model learns to be more unsure) but improved "
          "accuracy and BLEU.",
          "correct", "Vaswani et al. 2017, §5.4", "03: Where it is used"),
    Claim("bert-label-smoothing", "label smoothing",
          "BERT was pretrained with label smoothing.",
          "The pretraining and fine-tuning settings list none, and the released code computes the "
          "masked-LM loss against one-hot labels.",
          "wrong", "Devlin et al. 2019 (BERT), App. A.2-A.3; google-research/bert run_pretraining.py",
          "03: Where it is used"),
    Claim("llm-label-smoothing", "label smoothing",
          "Large language models (GPT-3, Llama, PaLM) are pretrained with label smoothing.",
          "GPT-3 and Llama report no label smoothing; PaLM states that the loss is computed without label "
          "smoothing, and adds a different auxiliary loss, z-loss (1e-4 * log^2 Z), to keep the softmax "
          "normalizer near 1.",
          "wrong", "Brown et al. 2020, App. B; Touvron et al. 2023, §2.2; Chowdhery et al. 2022, §5",
          "03: Where it is used", cells=("notebooks/03_label_smoothing.ipynb#where-used",)),
    Claim("inception-label-smoothing", "label smoothing",
          "Label smoothing was introduced with Inception-v3 at epsilon = 0.1 on ImageNet.",
          "Szegedy et al. propose it as label-smoothing regularization, mixing the one-hot target with a "
          "uniform distribution over the K = 1000 classes with epsilon = 0.1, for about 0.2% absolute "
          "improvement in top-1 and top-5 error.",
          "correct", "Szegedy et al. 2016 (Rethinking the Inception Architecture), §7", "03: Target and loss"),
    Claim("label-smoothing-target", "label smoothing",
          "With label smoothing alpha the true class gets 1 - alpha and the others share alpha/(V-1).",
          "The standard definition (Szegedy et al.; PyTorch's label_smoothing) mixes in a uniform "
          "distribution over all V classes: the true class gets 1 - alpha + alpha/V, every other alpha/V.",
          "wrong", "Szegedy et al. 2016, §7; PyTorch docs, torch.nn.CrossEntropyLoss (label_smoothing)",
          "03: Target and loss"),
    Claim("muller-calibration", "label smoothing",
          "Label smoothing improves calibration (a Transformer on EN-DE: ECE 0.056 -> 0.019) but hurts "
          "knowledge distillation.",
          "Label smoothing improves calibration, including for a Transformer on English-German "
          "translation (Table 3: ECE 0.056 -> 0.019, about what temperature scaling gives on the same model, "
          "0.018), and a teacher trained with it distils worse, because it erases information about "
          "similarities between classes from the logits.",
          "correct", "Müller, Kornblith & Hinton 2019, abstract, §3 and Table 3 (calibration), §4 (distillation)",
          "03: Confidence and calibration"),
    # ------------------------------------------------------------------ gradient clipping
    Claim("gpt3-clip", "gradient clipping",
          "GPT-3 clips the global gradient norm at 1.0.",
          "The global norm of the gradient is clipped at 1.0.",
          "correct", "Brown et al. 2020 (GPT-3), App. B", "04: Published thresholds"),
    Claim("llama2-clip", "gradient clipping",
          "Llama 2 clips the gradient norm at 1.0.",
          "Gradient clipping of 1.0.",
          "correct", "Touvron et al. 2023 (Llama 2), §2.2", "04: Published thresholds"),
    Claim("deepseek-v3-clip", "gradient clipping",
          "DeepSeek-V3 clips the gradient norm at 1.0.",
          "The gradient clipping norm is 1.0 (AdamW, beta1 0.9, beta2 0.95, weight decay 0.1).",
          "correct", "DeepSeek-AI 2024 (DeepSeek-V3 Technical Report), §4.2", "04: Published thresholds"),
    Claim("global-norm-keeps-direction", "gradient clipping",
          "Clipping the global norm changes the direction of the update.",
          "Global-norm clipping multiplies every gradient by the same factor min(1, c/||g||), so the "
          "direction is kept; clipping each tensor or each value separately changes it.",
          "wrong", "PyTorch docs, torch.nn.utils.clip_grad_norm_ (norm over all gradients as one vector)",
          "04: Global-norm clipping"),
    Claim("smoothness-grows-with-gradient", "gradient clipping",
          "Loss spikes happen where the loss surface is sharp, and sharpness grows with the gradient norm.",
          "Zhang et al. observe that smoothness varies along training and correlates with the gradient "
          "norm, and show that clipped gradient descent can converge faster under that relaxed condition.",
          "correct", "Zhang, He, Sra & Jadbabaie 2020 (ICLR), abstract", "04: Why spikes happen"),
    Claim("small-model-instabilities", "gradient clipping",
          "Training instabilities of large transformers can be studied in small models at high learning rates.",
          "Wortsman et al. reproduce attention-logit growth and output-logit divergence in small models "
          "trained at high learning rates and study mitigations there.",
          "correct", "Wortsman et al. 2023 (Small-scale proxies for large-scale Transformer training "
          "instabilities), abstract", "04: Why spikes happen"),
    # ------------------------------------------------------------------ fine-tuning and LoRA
    Claim("peft-lora-dropout-default", "fine-tuning",
          "PEFT's LoRA uses lora_dropout 0.05 (or 0.1) by default.",
          "LoraConfig's defaults are r = 8, lora_alpha = 8, lora_dropout = 0.0: dropout is off unless "
          "you set it.",
          "wrong", "Hugging Face PEFT, src/peft/tuners/lora/config.py (LoraConfig)",
          "06: LoRA; 06 lab: Fine-tuning"),
    Claim("lora-paper-dropout", "fine-tuning",
          "The LoRA paper fine-tuned GPT-2 with lora_dropout 0.1.",
          "GPT-2 Medium on E2E: r = 4, alpha = 32, dropout 0.1, weight decay 0.01, label smoothing 0.1, "
          "lr 2e-4, 5 epochs (the authors' command passes --lora_dropout 0.1).",
          "correct", "Hu et al. 2021 (LoRA), App. D; microsoft/LoRA examples/NLG/README.md", "06: The two recipes"),
    Claim("qlora-dropout", "fine-tuning",
          "QLoRA used lora_dropout 0.05.",
          "0.1 for the 7B and 13B models and 0.05 for 33B and 65B (with weight decay 0 and max_grad_norm "
          "0.3 in the released scripts).",
          "wrong", "Dettmers et al. 2023 (QLoRA), App. B; artidoro/qlora scripts/finetune_guanaco_*.sh",
          "06: The two recipes"),
    Claim("lora-init-and-scale", "fine-tuning",
          "LoRA starts B at zero and A at random, and scales the update by alpha / r.",
          "A random Gaussian, B zero, so BA = 0 at the start; the update BAx is scaled by alpha/r, and "
          "alpha is set once and not tuned (with Adam, tuning alpha is roughly tuning the learning rate); "
          "the scaling reduces retuning when r changes, it does not make the update's size independent of "
          "r: rsLoRA shows alpha/r slows learning at large r and alpha/sqrt(r) is stable (PEFT: use_rslora).",
          "correct", "Hu et al. 2021 (LoRA), §4.1; Kalajdzievski 2023 (rsLoRA); Hugging Face PEFT LoraConfig",
          "06: LoRA", cells=("notebooks/06_capstone.ipynb#lora",)),
    Claim("lora-no-latency", "fine-tuning",
          "A LoRA model is slower at inference than the base model.",
          "W + BA can be computed and stored once, after which inference runs a plain linear layer with "
          "no extra latency; the course checks that the merged layer gives the same outputs.",
          "wrong", "Hu et al. 2021 (LoRA), §4.1 (No additional inference latency)", "06: LoRA"),
    Claim("chinchilla-tokens-per-parameter", "fine-tuning",
          "Compute-optimal training uses about 20 tokens per parameter.",
          "Model size and tokens should grow in equal proportion; the estimated compute-optimal token "
          "counts are about 20 per parameter (1B parameters: about 20B tokens), and Chinchilla itself "
          "has 70B parameters trained on 1.4T tokens.",
          "correct", "Hoffmann et al. 2022 (Chinchilla), Table 3 and §4", "06: The regime map"),
    Claim("single-pass-dropout-hurts", "fine-tuning",
          "Dropout 0.1 is a harmless default when pretraining on data seen once.",
          "At equal steps on data seen once, the course's dropout-0.1 run ends at a higher validation "
          "loss than the dropout-0 run: with no repeated data there is nothing to overfit, and dropout "
          "only slows learning (and each step is slower).",
          "wrong", "the course's runs: 06 lab, record keys pretraining.*",
          "06 lab: Pretraining in one pass", basis="measured by the course"),
    Claim("lora-no-forgetting", "fine-tuning",
          "LoRA does not forget what the base model knew.",
          "In the course's runs the loss of a LoRA-fine-tuned model on the original corpus still rises: "
          "the adapters change the function, only within a low-rank subspace of the attention weights. "
          "(On average it rose less than with full fine-tuning; whether by more than the seed-to-seed "
          "spread depends on the budget: see the record's effects.)",
          "wrong", "the course's runs: 06 lab, record keys finetuning.*.forgetting",
          "06 lab: Fine-tuning", basis="measured by the course"),
    # ------------------------------------------------------------------ training stability
    Claim("palm-z-loss", "training stability",
          "PaLM added a z-loss of 1e-4 * log^2 Z to keep the softmax normalizer near 1.",
          "PaLM's training setup adds the auxiliary loss 10^-4 * log^2 Z, which encourages log Z to stay "
          "close to 0 and which the authors found to increase the stability of training.",
          "correct", "Chowdhery et al. 2022 (PaLM), §5 (training setup, loss function)", "05: z-loss",
          cells=("notebooks/05_stability.ipynb#z-intro",)),
    Claim("qk-layernorm-logit-growth", "training stability",
          "qk-layernorm removes the attention-logit growth that destabilizes training at high learning rates.",
          "Wortsman et al. reproduce attention-logit growth in small models at high learning rates and find "
          "that with qk-layernorm it no longer occurs and the models train at learning rates where the plain "
          "ones diverge; Dehghani et al. introduced it for ViT-22B. The course derives what it bounds: the "
          "logit is at most (max|g_q| sqrt(h) + ||b_q||)(max|g_k| sqrt(h) + ||b_k||) / sqrt(h), which the "
          "trained gains can still raise.",
          "correct", "Wortsman et al. 2023 (arXiv 2309.14322), §3.1 (section number not verified here); "
          "Dehghani et al. 2023 (ViT-22B), §2 (architecture; section number not verified here)", "05: Attention logits grow",
          cells=("notebooks/05_stability.ipynb#qk-norm-intro",)),
    Claim("z-loss-only-shifts-logits", "training stability",
          "The z-loss only shifts all logits together, so it never changes the predicted probabilities.",
          "Its gradient 2 log Z softmax(z) sums to 2 log Z but is proportional to the probabilities, not "
          "uniform: a step of size s changes p by -2 s log Z p * (p - ||p||^2) to first order (flattening the "
          "prediction when log Z > 0). Only for a uniform p is it a pure shift.",
          "wrong", "the course's derivation and check against autograd (05, section 2)", "05: z-loss",
          basis="measured by the course", cells=("notebooks/05_stability.ipynb#z-shift",)),
    Claim("adamw-ema-timescale", "training stability",
          "AdamW's weights are an exponential moving average of its recent updates, with a timescale of "
          "1/(lr * weight decay) iterations.",
          "Wang & Aitchison show that the weights AdamW learns are an EMA of recent updates and that its "
          "timescale is the hyperparameter to hold (roughly constant in epochs as model and data grow); the "
          "course unrolls torch.optim.AdamW's step theta <- (1 - lr wd) theta - lr u into that EMA and checks it.",
          "correct", "Wang & Aitchison 2024 (arXiv 2405.13698), abstract; PyTorch docs, torch.optim.AdamW "
          "(algorithm)", "05: AdamW's weights are a moving average",
          cells=("notebooks/05_stability.ipynb#ema-intro",)),
    Claim("equal-lr-wd-same-weights", "training stability",
          "Two AdamW runs with the same product lr * weight decay end with the same weights.",
          "Equal lr * wd gives the same EMA timescale and the same memory of the initialization, but the EMA "
          "averages -u / wd, so the weights built from the updates scale with lr (||theta||^2 ~ n lr / (2 wd) "
          "for unit random updates). Only for scale-invariant weights, with the initialization scaled along, do "
          "the runs compute the same function, and then up to Adam's eps.",
          "wrong", "the course's derivation and AdamW runs (05, section 3); Wang & Aitchison 2024, abstract",
          "05: AdamW's weights are a moving average", basis="measured by the course",
          cells=("notebooks/05_stability.ipynb#equal-product",)),
]


def by_id() -> dict[str, Claim]:
    """{id: claim}; ids are unique."""
    table = {}
    for claim in CLAIMS:
        if claim.id in table:
            raise ValueError(f"duplicate claim id {claim.id!r}")
        table[claim.id] = claim
    return table


def notebook_numbers(claim: Claim) -> list[str]:
    """The course notebooks a claim's `where` names, as two-digit numbers ("01", "05")."""
    return sorted(set(re.findall(r"\b(0\d)\b", claim.where)))


def markdown_table(claims, links: dict[str, str] | None = None) -> str:
    """The claims as a Markdown table; links maps a notebook number ("01") to the file to link."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    def where(claim: Claim) -> str:
        text = cell(claim.where)
        for number, target in (links or {}).items():
            text = re.sub(rf"\b{number}\b", f"[{number}]({target})", text)
        return text

    marks = {"correct": "correct", "wrong": "**wrong**", "unsupported": "*unsupported*"}
    rows = ["| claim (as commonly stated) | what the source says | verdict | source | where |",
            "|---|---|---|---|---|"]
    for claim in claims:
        basis = "" if claim.basis == "published" else " (measured by the course)"
        rows.append(f"| {cell(claim.claim)} | {cell(claim.source_says)} | {marks[claim.verdict]}{basis} | "
                    f"{cell(claim.source)} | {where(claim)} |")
    return "\n".join(rows)
