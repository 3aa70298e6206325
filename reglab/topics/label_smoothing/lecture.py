"""Topic label smoothing, lecture: train against (1 - alpha) * onehot + alpha / V, whose optimum is a finite logit gap.

The loss and its closed forms (the smoothed target, the optimal gap log((1 - a + a/V) / (a/V)), the
gradient's limit a - a/V as the true class becomes certain), the calibration tools the lab measures
with (expected calibration error over equal-width confidence bins, reliability diagrams, temperature
scaling), the lecture's widget, and the synthetic task whose Bayes-optimal posterior is known
(`BagOfTokens`). The lab's settings, runs and figures are in `reglab.topics.label_smoothing.lab`.

Convention: V is the number of classes the softmax runs over, alpha the total mass moved to the
uniform distribution (Szegedy et al. 2016, §7), so every class, the true one included, gets alpha / V.
This is what `F.cross_entropy(..., label_smoothing=alpha)` computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def _check_alpha(alpha: float, allow_one: bool = True) -> None:
    high_ok = alpha <= 1.0 if allow_one else alpha < 1.0
    if not (0.0 <= alpha and high_ok):
        raise ValueError(f"alpha must be in [0, 1{']' if allow_one else ')'}, got {alpha!r}")


def _check_classes(n_classes: int) -> None:
    if int(n_classes) != n_classes or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------

def smoothed_target(target: torch.Tensor, n_classes: int, alpha: float, dtype=torch.float32) -> torch.Tensor:
    """The smoothed target distribution, shape target.shape + (n_classes,): each row sums to 1."""
    _check_alpha(alpha)
    _check_classes(n_classes)
    onehot = F.one_hot(target, n_classes).to(dtype)
    # y = (1 - a) * onehot + a / V: the true class gets 1 - a + a/V, every other class a/V
    return (1 - alpha) * onehot + alpha / n_classes


def label_smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, alpha: float,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against the smoothed target; equals F.cross_entropy(..., label_smoothing=alpha).

    logits (N, V) with target (N,), or (N, V, d1, ...) with target (N, d1, ...): the class dimension
    is 1, as in F.cross_entropy. Positions whose target is ignore_index contribute nothing, and the
    'mean' divides by the number of the other positions.
    """
    _check_alpha(alpha)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    log_probs = F.log_softmax(logits, dim=1)                              # (N, V, ...)
    keep = target != ignore_index                                         # (N, ...)
    safe_target = torch.where(keep, target, torch.zeros_like(target))     # any valid index; masked below
    nll = -log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)       # -log p_y, (N, ...)
    uniform = -log_probs.mean(dim=1)                                      # mean_k -log p_k, (N, ...)
    # L = -sum_k y_k log p_k with y = (1 - a) onehot + a/V  =  (1 - a) * nll + a * uniform
    loss = torch.where(keep, (1 - alpha) * nll + alpha * uniform, torch.zeros_like(nll))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum()


def optimal_true_probability(alpha: float, n_classes: int) -> float:
    """The probability the smoothed loss wants on the true class: 1 - alpha + alpha / V."""
    _check_alpha(alpha)
    _check_classes(n_classes)
    return 1 - alpha + alpha / n_classes


def optimal_logit_gap(alpha: float, n_classes: int) -> float:
    """Logit gap (true class minus each other class) that minimizes the smoothed loss.

    With the other classes equal, p_true / p_other = exp(gap), and the minimum puts p = y, so
    gap = log((1 - a + a/V) / (a/V)) = log(1 + V (1 - a) / a). Infinite for alpha = 0.
    """
    _check_alpha(alpha)
    _check_classes(n_classes)
    if alpha == 0:
        return math.inf
    return math.log1p(n_classes * (1 - alpha) / alpha)


def true_class_gradient_limit(alpha: float, n_classes: int) -> float:
    """dL/dz_true = p_true - y_true tends to 1 - (1 - a + a/V) = a - a/V as p_true -> 1 (0 without smoothing)."""
    _check_alpha(alpha)
    _check_classes(n_classes)
    return alpha - alpha / n_classes


def logit_gap(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per example: the true class's logit minus the mean of the other logits. logits (N, V), target (N,)."""
    true_logit = logits.gather(1, target[:, None])[:, 0]                         # (N,)
    others_mean = (logits.sum(1) - true_logit) / (logits.size(1) - 1)           # (N,)
    return true_logit - others_mean


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------

@dataclass
class ReliabilityData:
    """Predictions grouped by confidence (the top softmax probability) into equal-width bins on [0, 1].

    Bin m holds confidences in ((m-1)/M, m/M]. Empty bins have count 0 and NaN confidence and accuracy.
    """
    edges: np.ndarray        # (M + 1,) bin edges 0, 1/M, ..., 1
    confidence: np.ndarray   # (M,) mean confidence in each bin
    accuracy: np.ndarray     # (M,) fraction of correct top-1 predictions in each bin
    count: np.ndarray        # (M,) examples in each bin

    @property
    def ece(self) -> float:
        """ECE = sum_m (n_m / N) |acc_m - conf_m| (Guo et al. 2017, §2; Naeini et al. 2015)."""
        filled = self.count > 0
        weights = self.count[filled] / self.count.sum()
        return float(np.sum(weights * np.abs(self.accuracy[filled] - self.confidence[filled])))

    def noise_bound(self, failure_rate: float = 1e-3) -> float:
        """An ECE that a perfectly calibrated predictor stays below with probability >= 1 - failure_rate.

        Given the confidences, bin m's accuracy is a mean of n_m independent 0/1 outcomes whose mean
        is the bin's confidence; Hoeffding bounds |acc_m - conf_m| by sqrt(log(2M / rate) / (2 n_m))
        for all M bins at once (union bound). Finite samples alone make the ECE positive.
        """
        filled = self.count > 0
        n_bins = len(self.count)
        per_bin = np.sqrt(np.log(2 * n_bins / failure_rate) / (2 * self.count[filled]))
        return float(np.sum(self.count[filled] / self.count.sum() * per_bin))


def reliability_data(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> ReliabilityData:
    """Bin the top-1 predictions of logits (N, V) by confidence into n_bins equal-width bins.

    15 bins as in Guo et al. 2017 (§5). Log-probabilities work as logits (softmax returns the probabilities).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits (N, V) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    probs = torch.softmax(logits.detach().double(), dim=1)
    confidence, prediction = probs.max(dim=1)                                   # (N,), (N,)
    correct = (prediction == labels).double()
    # bin m (0-based) holds ((m)/M, (m+1)/M]: index ceil(conf * M) - 1
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    conf_sum = torch.bincount(index, weights=confidence, minlength=n_bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ReliabilityData(edges=np.linspace(0.0, 1.0, n_bins + 1),
                               confidence=(conf_sum / count).cpu().numpy(),
                               accuracy=(correct_sum / count).cpu().numpy(),
                               count=count.cpu().numpy())


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE of the top-1 predictions over n_bins equal-width confidence bins (0 = perfectly calibrated)."""
    return reliability_data(logits, labels, n_bins).ece


def plot_reliability(ax, data: ReliabilityData, color: str = "C0", label: str | None = None,
                     title: str | None = None):
    """Reliability diagram: accuracy per confidence bin as bars, the diagonal as perfect calibration."""
    width = data.edges[1] - data.edges[0]
    filled = data.count > 0
    ax.bar(data.edges[:-1][filled], data.accuracy[filled], width=width, align="edge", color=color,
           alpha=0.7, edgecolor="black", linewidth=0.5,
           label=f"{label}: ECE {data.ece:.3f}" if label else f"ECE {data.ece:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top softmax probability)")
    ax.set_ylabel("accuracy in bin")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    return ax


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 minimizing the NLL of softmax(logits / T) on (logits, labels) (Guo et al. 2017, §4.2).

    Fit it on a validation split, never on the data reported. Optimizes log T with L-BFGS: the NLL is
    convex in 1/T, so the minimum is unique; dividing by T never changes the argmax, so accuracy is kept.
    """
    logits, labels = logits.detach().double(), labels.detach()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


# --------------------------------------------------------------------------------------------------
# The lecture's widget
# --------------------------------------------------------------------------------------------------

def show_label_smoothing(alpha: float = 0.1, n_classes: int = 10) -> None:
    """Draw the smoothed target, the optimal logit gap against alpha, and the true-class gradient near certainty."""
    _check_alpha(alpha, allow_one=False)
    _check_classes(n_classes)
    V = int(n_classes)
    target = smoothed_target(torch.tensor(0), V, alpha, torch.float64).numpy()
    gap, limit = optimal_logit_gap(alpha, V), true_class_gradient_limit(alpha, V)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))

    ax = axes[0]
    ax.bar(np.arange(V), target, color=["C1"] + ["C0"] * (V - 1))
    ax.set_ylim(0, 1.05)
    ax.set_title(f"smoothed target, alpha={alpha:.2f}, V={V}")
    ax.set_xlabel("class (0 = the true class)")
    ax.set_ylabel("target probability")

    ax = axes[1]
    alphas = np.linspace(0.005, 0.99, 200)
    ax.plot(alphas, np.log1p(V * (1 - alphas) / alphas), color="C0", label=f"V={V}")
    if alpha > 0:
        ax.plot([alpha], [gap], "o", color="C1", label=f"alpha={alpha:.2f}: gap {gap:.2f}")
    ax.set_yscale("log")
    ax.set_title("optimal logit gap log(1 + V(1-a)/a)")
    ax.set_xlabel("alpha")
    ax.set_ylabel("logit gap (nats)")
    ax.legend(fontsize="small")

    ax = axes[2]
    p_true = np.linspace(0.5, 0.9999, 400)
    ax.plot(p_true, p_true - 1.0, color="gray", label="hard target: p - 1 -> 0")
    ax.plot(p_true, p_true - (1 - alpha + alpha / V), color="C1", label=f"smoothed: -> {limit:.3f}")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.axvline(1 - alpha + alpha / V, color="C1", linestyle=":", label="optimum p = 1 - a + a/V")
    ax.set_ylim(-0.55, 0.55)
    ax.set_title("true-class gradient dL/dz = p - y")
    ax.set_xlabel("p of the true class")
    ax.set_ylabel("dL/dz_true")
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    plt.show()
    gap_text = "infinite (no finite optimum)" if math.isinf(gap) else f"{gap:.3f} nats"
    print(f"alpha={alpha:.2f}, V={V}: true class target {target[0]:.4f}, each other class {alpha / V:.4f}; "
          f"optimal logit gap {gap_text}; true-class gradient as p -> 1: {limit:+.4f}")


# --------------------------------------------------------------------------------------------------
# A task whose class is ambiguous, with uniform label noise: the best calibration is known exactly
# --------------------------------------------------------------------------------------------------

@dataclass
class BagOfTokens:
    """A synthetic sequence-classification task whose Bayes-optimal posterior is known exactly.

    Draw a class c uniformly, then seq_len tokens i.i.d. from the class's token distribution pi_c;
    with probability label_noise the label is then redrawn uniformly over all classes. So
    p(y | x) = (1 - noise) * posterior(c | x) + noise / C: the best any model can do is known.
    """
    token_log_probs: torch.Tensor    # (C, vocab) log pi_c
    seq_len: int
    label_noise: float

    @property
    def n_classes(self) -> int:
        return self.token_log_probs.size(0)

    @property
    def vocab_size(self) -> int:
        return self.token_log_probs.size(1)

    @classmethod
    def make(cls, n_classes: int, vocab_size: int, seq_len: int, sharpness: float, label_noise: float,
             seed: int) -> "BagOfTokens":
        """Class token distributions softmax(sharpness * g_c), g_c ~ N(0, I): sharper is easier."""
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
        generator = torch.Generator().manual_seed(seed)
        scores = torch.randn(n_classes, vocab_size, generator=generator, dtype=torch.float64)
        return cls(torch.log_softmax(sharpness * scores, dim=1), seq_len, label_noise)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n sequences x (n, seq_len) and their (noisy) labels y (n,)."""
        c = torch.randint(self.n_classes, (n,), generator=generator)
        x = torch.multinomial(self.token_log_probs.exp()[c], self.seq_len, replacement=True, generator=generator)
        relabel = torch.rand(n, generator=generator) < self.label_noise
        y = torch.where(relabel, torch.randint(self.n_classes, (n,), generator=generator), c)
        return x, y

    def log_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """log p(y | x) for x (n, seq_len): the Bayes-optimal, perfectly calibrated prediction, (n, C)."""
        # log p(c | x) = sum_t log pi_c[x_t] - logsumexp_c(...): tokens are independent given the class
        class_log_post = torch.log_softmax(self.token_log_probs[:, x.cpu()].sum(-1).T, dim=1)   # (n, C)
        noise = self.label_noise
        return torch.log((1 - noise) * class_log_post.exp() + noise / self.n_classes)


# ---------------------------------------------------------------------------------------------------
# What smoothing erases: the spread of the wrong-class logits (notebook 03, "What smoothing costs")
# ---------------------------------------------------------------------------------------------------

def wrong_logit_spread(start_logits: torch.Tensor, alpha: float, steps: int = 1000, lr: float = 1.0) -> dict:
    """Gradient descent on one logit vector (class 0 true) against the alpha-smoothed target; the standard
    deviation of the wrong-class logits at the start and after `steps` steps, and a lower bound on it.

    The bound. The gradient on a wrong class k is p_k - alpha/V, so alpha/V cancels in every difference:
    z_j - z_k changes by -lr (p_j - p_k) = -lr e^xi / Z (z_j - z_k) for some xi between z_j and z_k (mean
    value theorem), and e^xi / Z <= p_max, the largest wrong-class probability. Each difference, hence the
    standard deviation, shrinks per step by a factor in [1 - lr p_max(t), 1] (lr p_max <= 1): after T steps
    it is at least initial * prod_t (1 - lr p_max(t)). With hard targets p_max(t) vanishes (roughly like 1/t),
    so the spread keeps shrinking but slowly; with smoothing p_max(t) -> alpha/V and the spread decays like
    (1 - lr alpha/V)^t.
    """
    _check_alpha(alpha)
    V = start_logits.numel()
    z = start_logits.detach().to(torch.float64).clone().requires_grad_(True)
    optimizer = torch.optim.SGD([z], lr=lr)
    target = smoothed_target(torch.tensor(0), V, alpha, torch.float64)[None]              # (1, V)
    log_factor = 0.0
    for _ in range(steps):
        p_max = float(torch.softmax(z.detach(), dim=0)[1:].max())
        log_factor += math.log1p(-lr * p_max)
        loss = F.cross_entropy(z[None], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    initial = float(start_logits[1:].double().std())
    return {"alpha": alpha, "steps": steps, "lr": lr, "initial": initial, "final": float(z.detach()[1:].std()),
            "lower_bound": initial * math.exp(log_factor),
            "smoothed_decay": initial * (1 - lr * alpha / V) ** steps}


def check_spread(hard: dict, smoothed: dict) -> None:
    """Assert what the derivation says: with hard targets the spread shrinks (no freezing) but stays above its
    bound; with smoothing it falls below a thousandth of the start (its derived decay (1 - lr alpha/V)^T is
    e^-10 = 4.5e-5 for lr 1, alpha 0.1, V 10, T 1000; the factor 20 leaves room for the first steps,
    before p_max has settled at alpha/V)."""
    assert hard["alpha"] == 0.0 < smoothed["alpha"], "compare a hard-target run with a smoothed one"
    assert hard["lower_bound"] <= hard["final"] < hard["initial"], (
        f"hard targets: spread {hard['final']:.3f} should shrink from {hard['initial']:.3f} but stay above the "
        f"bound {hard['lower_bound']:.3f}")
    assert smoothed["final"] < max(1e-3 * smoothed["initial"], 20 * smoothed["smoothed_decay"]), (
        f"alpha = {smoothed['alpha']}: spread {smoothed['final']:.2e} did not decay like (1 - lr alpha/V)^T")
    assert smoothed["final"] < hard["lower_bound"], "smoothing should erase what hard targets provably keep"
