"""Topic dropout, lecture: dropout derived and measured (the mask's statistics, dropout before a norm layer,
where the course model drops, and what a dropout step costs on the reader's device).

Everything here uses PyTorch's own dropout (`torch.nn.functional.dropout`, `nn.Dropout` and the dropout
inside `scaled_dot_product_attention`); the lab asks the student to write one and checks it against these.
Convention throughout, as in PyTorch: p is the probability of DROPPING a unit, 1 - p of keeping it.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

from reglab.budget import by_budget
from reglab.model import DROPOUT_SITES, GPT, GPTConfig
from reglab.train import TrainConfig, loss_fn, make_optimizer, new_model


@dataclass(frozen=True)
class NotebookSettings:
    """Sizes of the dropout notebook's measurements, for one budget (the lab's are in reglab.topics.dropout.lab)."""
    cost_n_layer: int        # the model whose step is timed with and without dropout
    cost_n_embd: int
    cost_block_size: int
    cost_batch_size: int
    cost_steps: int          # timed steps per round and setting
    cost_rounds: int         # rounds alternating no-dropout / dropout
    sampler_facts: int       # facts the sampling demo's model memorizes (reglab.topics.dropout.recall)
    sampler_n_embd: int
    sampler_steps: int
    sampler_p: float = 0.1   # the demo model trains with dropout, to show that eval mode turns it off
    votes: int = 9           # samples per answer for majority voting


SETTINGS = {
    "ci": NotebookSettings(cost_n_layer=1, cost_n_embd=32, cost_block_size=32, cost_batch_size=8, cost_steps=3,
                           cost_rounds=1, sampler_facts=32, sampler_n_embd=32, sampler_steps=120),
    "cpu": NotebookSettings(cost_n_layer=2, cost_n_embd=64, cost_block_size=64, cost_batch_size=16, cost_steps=10,
                            cost_rounds=3, sampler_facts=128, sampler_n_embd=64, sampler_steps=400),
    "gpu": NotebookSettings(cost_n_layer=6, cost_n_embd=384, cost_block_size=256, cost_batch_size=64, cost_steps=20,
                            cost_rounds=3, sampler_facts=512, sampler_n_embd=128, sampler_steps=1000),
}


def settings_for(budget: str) -> NotebookSettings:
    """The lecture notebook's settings for a budget ('ci', 'cpu', 'gpu' or 'auto')."""
    return by_budget(budget, **SETTINGS)


def _check_p(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    return float(p)


# ---------------------------------------------------------------------------------------------------
# The mechanism: y = m * h / (1 - p) with m ~ Bernoulli(1 - p)
# ---------------------------------------------------------------------------------------------------

def derived_moments(p: float, h: float = 1.0) -> dict[str, float]:
    """What the math says about one dropped-out unit y = m h / (1 - p), m ~ Bernoulli(1 - p).

    y - h is -h with probability p and h p / (1 - p) with probability 1 - p, which gives every moment:
    the fourth central moment sets the Monte-Carlo error of a measured variance.
    """
    p = _check_p(p)
    return {
        "mean": h,                                              # E[y] = (1 - p) * h / (1 - p) = h
        "var": p / (1 - p) * h ** 2,                            # Var[y] = E[y^2] - h^2 = h^2 / (1 - p) - h^2
        "kept": 1 - p,                                          # P(m = 1)
        "mu4": p * h ** 4 + (1 - p) * (h * p / (1 - p)) ** 4,   # E[(y - h)^4]
        "kept_value": h / (1 - p),                              # the only value besides 0
    }


def variance_standard_error(p: float, h: float, n: int) -> float:
    """Standard error of the sample variance of n dropped-out copies of h:
    Var[s^2] = mu4 / n - sigma^4 (n - 3) / (n (n - 1)) for n independent draws."""
    d = derived_moments(p, h)
    return math.sqrt(max(0.0, d["mu4"] / n - d["var"] ** 2 * (n - 3) / (n * (n - 1))))


def dropout_statistics(p: float, h: float = 1.0, n: int = 100_000, seed: int = 0) -> dict[str, float]:
    """n draws of one unit h through torch.nn.functional.dropout: the measured mean, variance and kept
    fraction, the distinct values seen, and the derived values beside them (keys `derived_*`)."""
    p = _check_p(p)
    gen = torch.Generator().manual_seed(seed)
    # F.dropout takes no generator: a forked global RNG keeps this function from disturbing the caller's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
        y = F.dropout(torch.full((n,), float(h), dtype=torch.float64), p=p, training=True)
    derived = derived_moments(p, h)
    return {"p": p, "h": h, "n": n, "mean": float(y.mean()), "var": float(y.var(unbiased=True)),
            "kept": float((y != 0).double().mean()), "values": sorted(set(y.unique().tolist())),
            **{f"derived_{key}": value for key, value in derived.items()}}


def show_dropout(p: float = 0.3, h: float = 1.0, n: int = 20_000, seed: int = 0) -> None:
    """The widget: one unit h dropped out n times. Left, where the draws land; right, the variance
    p/(1-p) h^2 against p with this p's measured value; a printed line compares measured and derived."""
    s = dropout_statistics(p, h, n, seed)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    right_edge = max(5.5, 1.1 / (1 - p)) * abs(h)          # fixed for p <= 0.8, so a slider shows the bar move
    left.bar([0.0, s["derived_kept_value"]], [1 - s["kept"], s["kept"]], width=0.15 * abs(h),
             color=["tab:gray", "tab:blue"])
    left.axvline(s["mean"], color="tab:orange", ls="--", label=f"measured mean {s['mean']:.3f}")
    left.axvline(h, color="black", lw=0.8, label=f"h = {h:g}")
    left.set(title=f"p = {p:.2f}: y is 0 or h/(1-p) = {s['derived_kept_value']:.2f}", xlabel="value of y",
             ylabel="fraction of draws", xlim=(-0.3 * abs(h), right_edge), ylim=(0, 1.05))
    left.legend(loc="upper right", fontsize=8)
    grid = torch.linspace(0.01, 0.9, 90)
    right.plot(grid, grid / (1 - grid) * h ** 2, color="black", label="derived p/(1-p) h²")
    right.plot([p], [s["var"]], "o", color="tab:blue", label=f"measured {s['var']:.3f}")
    right.set(title="variance of y", xlabel="drop probability p", ylabel="Var[y] (units of h²)", yscale="log",
              ylim=(1e-2, 20))
    right.legend(fontsize=8)
    fig.tight_layout()
    plt.show()
    print(f"p = {p:.2f}: kept {s['kept']:.1%} of {n} draws (derived {1 - p:.1%}), "
          f"mean {s['mean']:.3f} (derived {h:g}), variance {s['var']:.3f} (derived {s['derived_var']:.3f})")


# ---------------------------------------------------------------------------------------------------
# Dropout before a norm layer: BatchNorm's variance shift (Li et al. 2019) and why LayerNorm escapes it
# ---------------------------------------------------------------------------------------------------

def derived_batchnorm_shift(p: float, mean: float = 0.0, std: float = 1.0) -> float:
    """Variance of BatchNorm's output in eval mode after it learned its statistics behind dropout p.

    In training BatchNorm sees y = m x / (1 - p): Var[y] = std^2 + p/(1-p) (std^2 + mean^2). It stores
    that as its running variance; in eval dropout is off, x arrives with variance std^2 only, so
    Var[(x - mean) / sqrt(Var[y])] = std^2 / (std^2 + p/(1-p) (std^2 + mean^2)). For mean 0 this is 1 - p.
    """
    p = _check_p(p)
    train_var = std ** 2 + p / (1 - p) * (std ** 2 + mean ** 2)
    return std ** 2 / train_var


def norm_variance_shift(p: float, norm: str = "batchnorm", n_features: int = 64, batch_size: int = 256,
                        train_batches: int = 100, mean: float = 0.0, std: float = 1.0, seed: int = 0) -> dict:
    """Feed x ~ N(mean, std^2) through dropout(p) and a fresh norm layer, in train mode for train_batches
    (BatchNorm's running statistics fill up), then in eval mode (dropout off, stored statistics used).

    Returns the per-feature variance of the norm's output in train mode and in eval mode (lists of
    n_features floats, measured on one fresh batch each), and the derived eval variance.
    """
    p = _check_p(p)
    if norm not in ("batchnorm", "layernorm"):
        raise ValueError(f"norm must be 'batchnorm' or 'layernorm', got {norm!r}")
    gen = torch.Generator().manual_seed(seed)
    layer = nn.BatchNorm1d(n_features, affine=False) if norm == "batchnorm" else \
        nn.LayerNorm(n_features, elementwise_affine=False)
    drop = nn.Dropout(p)

    def batch():
        return mean + std * torch.randn(batch_size, n_features, generator=gen)   # (B, features)

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer.train(), drop.train()
        for _ in range(train_batches):
            out_train = layer(drop(batch()))
        layer.eval(), drop.eval()
        out_eval = layer(drop(batch()))
    derived = derived_batchnorm_shift(p, mean, std) if norm == "batchnorm" else 1.0
    return {"p": p, "norm": norm, "train_var": out_train.var(0).tolist(), "eval_var": out_eval.var(0).tolist(),
            "derived_eval_var": derived, "batch_size": batch_size}


# ---------------------------------------------------------------------------------------------------
# Where the course model drops: hooks on its dropout modules
# ---------------------------------------------------------------------------------------------------

def dropped_fraction_by_site(model: GPT, idx: torch.Tensor) -> dict[str, tuple[int, int]]:
    """One forward of model on idx; for each dropout site, (units zeroed by it, nonzero units it received).

    Needs config.use_sdpa=False, so that the attention weights pass through an nn.Dropout module too
    (the fused kernel drops inside itself, where no hook can see). Zeros the input already had (the
    causal mask's) are not counted.
    """
    if model.config.use_sdpa:
        raise ValueError("dropped_fraction_by_site needs a model with use_sdpa=False (the fused kernel hides its mask)")
    counts = {site: [0, 0] for site in DROPOUT_SITES}

    def hook_for(site):
        def hook(module, inputs, output):
            nonzero = inputs[0] != 0
            counts[site][0] += int((nonzero & (output == 0)).sum())
            counts[site][1] += int(nonzero.sum())
        return hook

    handles = [module.register_forward_hook(hook_for(name.rsplit(".", 1)[-1]))
               for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in DROPOUT_SITES]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for handle in handles:
            handle.remove()
    return {site: (dropped, seen) for site, (dropped, seen) in counts.items()}


# ---------------------------------------------------------------------------------------------------
# What it costs: work, memory and time of a training step
# ---------------------------------------------------------------------------------------------------

def training_step_flops(model: nn.Module, idx: torch.Tensor) -> int:
    """Floating-point operations of one forward + backward of the LM loss, as PyTorch's FLOP counter
    counts them (matrix multiplies; elementwise work such as a dropout mask is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model(idx), idx).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def saved_tensor_bytes(model: nn.Module, idx: torch.Tensor) -> int:
    """Bytes autograd keeps from one forward for the backward pass (each storage counted once).

    Dropout adds its mask to them: PyTorch's CUDA kernel keeps one byte (a bool) per unit, its CPU
    kernel a scaled mask in the activation's dtype (4 bytes per unit in float32).
    """
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(model(idx), idx)
    del loss
    return sum(storages.values())


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def step_times(config: GPTConfig, batch_size: int = 16, steps: int = 10, warmup: int = 2,
               device="cpu", seed: int = 0) -> list[float]:
    """Seconds of each of `steps` training steps (forward, loss, backward, clip, AdamW step) of a fresh
    model on random tokens, after `warmup` untimed steps. The device is synchronized around each step."""
    device = torch.device(device)
    model = new_model(config, seed=seed, device=device).train()
    optimizer = make_optimizer(model, TrainConfig())
    gen = torch.Generator().manual_seed(seed)
    times = []
    for step in range(warmup + steps):
        idx = torch.randint(config.vocab_size, (batch_size, config.block_size + 1), generator=gen).to(device)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(idx[:, :-1])
        loss = loss_fn(logits, idx[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def dropout_cost(config: GPTConfig, p: float = 0.2, batch_size: int = 16, steps: int = 10, rounds: int = 3,
                 device="cpu") -> dict[str, float]:
    """Median step time without dropout and with dropout p at every site, and their ratio.

    The two settings alternate for `rounds` rounds, so that a change in the machine's load (other
    programs, clock speed) falls on both alike; the median ignores the odd slow step.
    """
    p = _check_p(p)
    off, on, round_ratios = [], [], []
    for round_ in range(rounds):
        off_round = step_times(config.with_dropout(0.0), batch_size, steps, device=device, seed=round_)
        on_round = step_times(config.with_dropout(p), batch_size, steps, device=device, seed=round_)
        off, on = off + off_round, on + on_round
        round_ratios.append(statistics.median(on_round) / statistics.median(off_round))
    step_off, step_on = statistics.median(off), statistics.median(on)
    return {"p": p, "step_s_off": step_off, "step_s_on": step_on, "ratio": step_on / step_off,
            "steps_timed": len(off), "round_ratios": round_ratios}


# ---------------------------------------------------------------------------------------------------
# The checks of notebook 01 that must be able to fail (tests/test_corrections.py perturbs each claim)
# ---------------------------------------------------------------------------------------------------

def layernorm_direction_noise(p: float, n_features: int = 64, n_tokens: int = 4096, seed: int = 0) -> dict:
    """What dropout before a LayerNorm changes between the modes: each token's normalized direction.

    For x ~ N(0, 1)^d and y = m x / (1 - p), the cosine between LN(y) and LN(x) is, up to O(1/d) terms from
    the centering, sqrt(sum_i m_i x_i^2 / sum_i x_i^2) -> sqrt(1 - p) (the 1/(1-p) scale cancels in the
    norm). In eval mode dropout is the identity and the cosine is exactly 1. Per token,
    Var[sum m x^2 / sum x^2] ~ 3 p (1 - p) / d (E[x^4] = 3), so Var[cosine] ~ 3 p / (4 d) (delta method).
    Returns the mean train- and eval-mode cosines over n_tokens tokens, their standard error (measured),
    and the derived value.
    """
    p = _check_p(p)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, n_features, generator=gen, dtype=torch.float64)              # (N, d)
    keep = (torch.rand(n_tokens, n_features, generator=gen, dtype=torch.float64) >= p).to(x.dtype)
    norm = nn.LayerNorm(n_features, elementwise_affine=False, dtype=torch.float64)
    reference = norm(x)
    train_cos = F.cosine_similarity(norm(keep * x / (1 - p)), reference, dim=-1)             # (N,)
    eval_cos = F.cosine_similarity(norm(x), reference, dim=-1)
    return {"p": p, "n_features": n_features, "n_tokens": n_tokens,
            "train_cos": float(train_cos.mean()), "train_cos_se": float(train_cos.std() / n_tokens ** 0.5),
            "eval_cos": float(eval_cos.mean()), "derived_train_cos": math.sqrt(1 - p)}


def layernorm_check_tolerance(result: dict) -> float:
    """5 standard errors (two-sided normal tail 5.7e-7) plus 1/d for the O(1/d) bias of the square root
    (3p / (8 d (1-p)^1.5) <= 0.27/d for p <= 0.5) and of the centering (mean of d values: O(1/d))."""
    return 5 * result["train_cos_se"] + 1 / result["n_features"]


def check_layernorm_modes(result: dict) -> None:
    """Assert what differs between the modes: in train mode the direction is off by the derived
    sqrt(1 - p), in eval mode not at all; so the two differ by more than the tolerance."""
    tol = layernorm_check_tolerance(result)
    assert abs(result["eval_cos"] - 1) < 1e-9, f"eval-mode LayerNorm output moved: cosine {result['eval_cos']}"
    assert abs(result["train_cos"] - result["derived_train_cos"]) <= tol, (
        f"train-mode cosine {result['train_cos']:.4f} is not the derived sqrt(1 - p) = "
        f"{result['derived_train_cos']:.4f} (tolerance {tol:.4f})")
    assert result["eval_cos"] - result["train_cos"] > tol, (
        f"train and eval mode give the same direction (cosines {result['train_cos']:.4f}, "
        f"{result['eval_cos']:.4f}): at p = {result['p']} dropout adds no direction noise")


def dropout_mask_bytes_lower_bound(config: GPTConfig, batch_size: int, seq_len: int) -> int:
    """The fewest bytes the dropout masks of one training forward add to what autograd saves: one byte (a
    bool, PyTorch's CUDA kernel; the CPU kernel keeps 4) per unit at the embedding, the two residual and
    the FFN sites of every layer. The attention-weights mask is left out: the fused attention kernel
    keeps it in its own form."""
    tokens = batch_size * seq_len
    hidden = int(config.mlp_ratio * config.n_embd)
    return tokens * config.n_embd + config.n_layer * tokens * (2 * config.n_embd + hidden)


def check_dropout_memory(bytes_plain: int, bytes_dropped: int, lower_bound: int) -> None:
    """Assert the memory claim: dropout's masks add at least `lower_bound` bytes to the saved tensors."""
    assert bytes_dropped - bytes_plain >= lower_bound, (
        f"dropout added {bytes_dropped - bytes_plain} saved bytes, fewer than its masks' {lower_bound}")


def timing_verdict(round_ratios) -> str:
    """What the alternating rounds resolve about (step time with dropout) / (without): 'slower' if every
    round's ratio is above 1, 'faster' if every one is below, otherwise 'not resolved'. With k rounds and no
    real difference, all k land on one side with probability 2 * 2**-k (0.25 for 3 rounds): a printed
    verdict, not an assert, since a loaded machine can reorder rounds."""
    ratios = list(round_ratios)
    if ratios and min(ratios) > 1:
        return "slower"
    if ratios and max(ratios) < 1:
        return "faster"
    return "not resolved"
