"""One training loop for every lab: AdamW with decay/no-decay groups, warmup + cosine, clipping, evaluation.

A step, in order:  set lr -> forward -> loss -> backward -> clip (log the pre-clip norm) -> optimizer step.
Per step the history keeps the loss, the pre-clip gradient norm and the learning rate; per evaluation
the train and val loss and accuracy and the total weight norm. Per-step values stay on the device until
an evaluation, so a small model on a GPU is not slowed by a host sync every step.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reglab.model import GPT, GPTConfig


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; `step` says when, `history` holds the run up to that point."""

    def __init__(self, step: int, loss: float, history: "History"):
        self.step, self.loss, self.history = step, loss, history
        lr = history.lr[step] if step < len(history.lr) else float("nan")
        super().__init__(f"loss became {loss} at step {step} (lr {lr:.3g}); lower the learning rate, "
                         f"add warmup or clip the gradient norm")


@dataclass
class TrainConfig:
    steps: int = 300                 # optimizer steps
    lr: float = 1e-3                 # peak learning rate, reached at the end of warmup
    min_lr: float | None = None      # floor of the cosine; None means lr / 10 (Chinchilla, Hoffmann et al. 2022 §3)
    warmup_steps: int = 30           # linear warmup from 0; 0 starts at the peak
    schedule: str = "cosine"         # "cosine" (decays to min_lr at the last step) or "constant"
    weight_decay: float = 0.1        # AdamW lambda on >=2-D weights (GPT-3, Brown et al. 2020 App. B)
    betas: tuple[float, float] = (0.9, 0.95)  # GPT-3's Adam betas (App. B)
    eps: float = 1e-8                # Adam's epsilon
    optimizer: str | Callable = "adamw"  # "adamw", "adam_l2" (Adam with wd added to the gradient), or a class
    grad_clip: float | None = 1.0    # global-norm threshold (GPT-3, Llama 2); None: log the norm, clip nothing
    label_smoothing: float = 0.0     # alpha of the training loss; evaluation always reports plain NLL
    eval_every: int = 50             # steps between evaluations (the last step is always evaluated)
    seed: int = 0                    # batches and dropout masks; model init is seeded by new_model
    amp: bool = True                 # bf16 autocast on CUDA (ignored elsewhere)
    compile: bool = False            # torch.compile the model (worth it on a GPU for runs of many steps)
    cuda_graph: bool = True          # on CUDA, replay the whole step as one CUDA graph (small models are
                                     # launch-bound: ~150 kernel launches a step); built-in optimizers only
    progress: bool = True            # a tqdm progress bar (a widget in Jupyter); REGLAB_PROGRESS=0 turns
                                     # every bar off: headless runs (grader, bench) set it, since widget
                                     # comms can hang a headless nbclient run (jupyter/nbclient#312)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be None or positive, got {self.grad_clip}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1, got {self.eval_every}")
        if isinstance(self.optimizer, str) and self.optimizer not in ("adamw", "adam_l2"):
            raise ValueError(f"optimizer must be 'adamw', 'adam_l2' or an Optimizer class, got {self.optimizer!r}")


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine from lr down to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
    # progress in [0, 1] over the steps after warmup
    progress = (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)
    return min_lr + 0.5 * (config.lr - min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay only tensors with >= 2 dimensions (matrices, embeddings); never biases or norm gains.

    Frozen parameters (requires_grad=False) are left out of both groups.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    decay_params = [p for p in params.values() if p.dim() >= 2]
    no_decay_params = [p for p in params.values() if p.dim() < 2]
    decay_ids, no_decay_ids = {id(p) for p in decay_params}, {id(p) for p in no_decay_params}
    assert not decay_ids & no_decay_ids, "a parameter is in both the decay and the no-decay group"
    assert decay_ids | no_decay_ids == {id(p) for p in params.values()}, "a trainable parameter is in no group"
    return [{"params": decay_params, "weight_decay": weight_decay},
            {"params": no_decay_params, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer over param_groups. capturable=True (CUDA graphs) keeps lr as a device tensor."""
    groups = param_groups(model, config.weight_decay)
    on_cuda = next(model.parameters()).is_cuda
    lr = torch.tensor(config.lr, device="cuda") if capturable else config.lr
    extra = {"fused": on_cuda, "capturable": capturable}
    if config.optimizer == "adamw":
        # torch.optim.AdamW: theta <- theta * (1 - lr * wd), then the Adam step (decoupled decay)
        return torch.optim.AdamW(groups, lr=lr, betas=config.betas, eps=config.eps, **extra)
    if config.optimizer == "adam_l2":
        # torch.optim.Adam(weight_decay=wd): g <- g + wd * theta, so the decay passes through Adam's moments
        return torch.optim.Adam(groups, lr=lr, betas=config.betas, eps=config.eps, **extra)
    return config.optimizer(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def new_model(config: GPTConfig, seed: int = 0, device="cpu") -> GPT:
    """A freshly initialized model; the same seed gives the same weights on every run."""
    torch.manual_seed(seed)
    return GPT(config).to(device)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over every prediction: (B, T, V) with (B, T), or (B, C) with (B,)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           label_smoothing=label_smoothing)


def weight_norm(model: torch.nn.Module) -> float:
    """||theta||_2 over every parameter: what weight decay pulls down."""
    return math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in model.parameters()))


@torch.no_grad()
def evaluate(model: torch.nn.Module, task, split: str, amp: bool = True) -> dict[str, float]:
    """Plain (unsmoothed) NLL and accuracy on a split's fixed evaluation batches, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in task.eval_batches(split):
        with _autocast(x.device, amp):
            logits = model(x)
        n = y.numel()
        total_loss += float(loss_fn(logits, y)) * n
        correct += int((logits.argmax(-1) == y).sum())
        count += n
    model.train(was_training)
    return {f"{split}_loss": total_loss / count, f"{split}_acc": correct / count}


def _autocast(device: torch.device, amp: bool):
    # no weight-cast cache: a CUDA graph must recompute the casts on every replay
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda", cache_enabled=False)


def _step(forward, optimizer, params, x, y, config: TrainConfig, device):
    """forward -> loss -> backward -> clip (returns the pre-clip norm) -> optimizer step."""
    with _autocast(device, config.amp):
        logits = forward(x)
    loss = loss_fn(logits, y, config.label_smoothing)
    loss.backward()
    # total norm = sqrt(sum over tensors of ||g||^2); grads scaled by min(1, c / (norm + 1e-6)) when clipping
    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip is not None else float("inf"))
    optimizer.step()
    return loss.detach(), norm


class _GraphedStep:
    """The whole step captured once as a CUDA graph, then replayed: one launch instead of ~150.

    Capture needs a warm-up step; it runs with lr = 0 (parameters unchanged) and the optimizer's
    moments and step counts are reset afterwards, so the run is the same as the eager one.
    """

    def __init__(self, forward, optimizer, params, task, config, device):
        self.optimizer = optimizer
        x, y = task.train_batch(0, torch.Generator(device=device).manual_seed(0))   # shapes only
        self.x, self.y = x.clone(), y.clone()
        self._set_lr(0.0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _step(forward, optimizer, params, self.x, self.y, config, device)
        torch.cuda.current_stream().wait_stream(side)
        optimizer.zero_grad(set_to_none=True)      # backward in the graph writes fresh gradients
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.norm = _step(forward, optimizer, params, self.x, self.y, config, device)
        for state in optimizer.state.values():     # forget the warm-up step
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()

    def _set_lr(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)

    def __call__(self, x, y, lr: float):
        self.x.copy_(x)
        self.y.copy_(y)
        self._set_lr(lr)
        self.graph.replay()
        return self.loss, self.norm


@dataclass
class History:
    """What a run recorded: per step (loss, pre-clip gradient norm, lr) and per evaluation (a dict each)."""
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    wall_time: float = 0.0           # seconds, evaluation included
    tokens_seen: int = 0             # input tokens through the model in training

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of an evaluated quantity, e.g. history.series('val_loss')."""
        return [e["step"] for e in self.evals], [e[key] for e in self.evals]

    def best(self, key: str = "val_loss", mode: str = "min") -> tuple[int, float]:
        """(step, value) of the best evaluation by key."""
        pick = min if mode == "min" else max
        best = pick(self.evals, key=lambda e: e[key])
        return best["step"], best[key]

    @property
    def final(self) -> dict:
        return self.evals[-1]

    @property
    def final_gap(self) -> float:
        """val loss - train loss at the last evaluation: how much the model overfits."""
        return self.final["val_loss"] - self.final["train_loss"]

    def to_dict(self) -> dict:
        return asdict(self)


def train(model: torch.nn.Module, task, config: TrainConfig,
          on_eval: Callable[[torch.nn.Module], dict] | None = None, desc: str = "train",
          stop_when: Callable[["History"], bool] | None = None) -> History:
    """Train model on task; returns its History. Raises NonFiniteLossError naming the first bad step.

    on_eval(model) may return extra metrics (floats) to store with each evaluation.
    stop_when(history), asked after each evaluation, may end the run early by returning True (the
    learning-rate schedule is still the one of config.steps; the history just ends sooner).
    """
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)                      # dropout masks
    generator = torch.Generator(device=device).manual_seed(config.seed)   # batches, sampled on the device
    graphed = (config.cuda_graph and device.type == "cuda" and not config.compile
               and isinstance(config.optimizer, str))
    optimizer = make_optimizer(model, config, capturable=graphed)
    params = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model) if config.compile else model
    model.train()
    graphed_step = _GraphedStep(forward, optimizer, params, task, config, device) if graphed else None
    history = History()
    losses = torch.zeros(config.steps, device=device)        # on the device: no sync per step
    norms = torch.zeros(config.steps, device=device)
    start, synced = time.perf_counter(), 0

    def sync_and_check(upto: int):
        nonlocal synced
        new_losses = losses[synced:upto].tolist()
        history.loss += new_losses
        history.grad_norm += norms[synced:upto].tolist()
        for i, value in enumerate(new_losses):
            if not math.isfinite(value):
                history.wall_time = time.perf_counter() - start
                raise NonFiniteLossError(synced + i, value, history)
        synced = upto

    show = config.progress and os.environ.get("REGLAB_PROGRESS", "1") != "0"
    bar = tqdm(range(config.steps), desc=desc, disable=not show, leave=False)
    for step in bar:
        x, y = task.train_batch(step, generator)
        lr = lr_at(step, config)
        history.lr.append(lr)
        if graphed_step is not None:
            losses[step], norms[step] = graphed_step(x, y, lr)
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            losses[step], norms[step] = _step(forward, optimizer, params, x, y, config, device)
        history.tokens_seen += x.numel()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            sync_and_check(step + 1)
            record = {"step": step + 1, **evaluate(forward, task, "train", config.amp),
                      **evaluate(forward, task, "val", config.amp), "weight_norm": weight_norm(model)}
            if on_eval is not None:
                record.update(on_eval(model))
            history.evals.append(record)
            bar.set_postfix(train=f"{record['train_loss']:.3f}", val=f"{record['val_loss']:.3f}")
            if stop_when is not None and stop_when(history):
                break
    bar.close()
    history.wall_time = time.perf_counter() - start
    return history


def sweep(runs: dict, task, seeds=(0,), on_eval=None, progress: bool = True,
          stop_when=None) -> dict[str, list[History]]:
    """Train one fresh model per (setting, seed): runs maps a label to (GPTConfig, TrainConfig).

    Returns {label: [History per seed]}. The model's init and the batches both follow the seed.
    stop_when(history) may end each run early (see `train`).
    """
    results = {}
    device = task.device
    for label, (gpt_config, train_config) in runs.items():
        results[label] = []
        for seed in seeds:
            model = new_model(gpt_config, seed=seed, device=device)
            config = replace(train_config, seed=seed, progress=progress)
            results[label].append(train(model, task, config, on_eval=on_eval, desc=f"{label} seed {seed}",
                                        stop_when=stop_when))
    return results
