"""Core: the one training loop of every lab, and the one sweep runner over settings and seeds.

The loop: AdamW with decay/no-decay groups, warmup + cosine, clipping, evaluation. A step, in order:
set lr -> forward -> loss -> backward -> clip (log the pre-clip norm) -> optimizer step.
Per step the history keeps the loss, the pre-clip gradient norm and the learning rate; per evaluation
the train and val loss and accuracy, the total weight norm and, for a language model, two stability
numbers on one val batch (`stability_stats`: the largest attention logit and the mean log Z). Per-step
values stay on the device until an evaluation, so a small model on a GPU is not slowed by a host sync
every step. On CUDA the same step is replayed as one CUDA graph (`reglab.graphs`, which a first reading
can skip).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Hashable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from reglab.graphs import GraphedStep, can_graph
from reglab.model import GPT, GPTConfig, RMSNorm


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
    z_loss: float = 0.0              # weight of mean(log^2 Z) added to the training loss (PaLM, Chowdhery et al.
                                     # 2022 §5, uses 1e-4); evaluation still reports plain NLL
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
        if not self.z_loss >= 0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1, got {self.eval_every}")
        if isinstance(self.optimizer, str) and self.optimizer not in ("adamw", "adam_l2"):
            raise ValueError(f"optimizer must be 'adamw', 'adam_l2' or an Optimizer class, got {self.optimizer!r}")

    @property
    def lr_floor(self) -> float:
        """Where the cosine ends: min_lr, or lr / 10 when min_lr is None (the one place that default lives)."""
        return self.lr / 10 if self.min_lr is None else self.min_lr


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine from lr down to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    min_lr = config.lr_floor
    # progress in [0, 1] over the steps after warmup
    progress = (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)
    return min_lr + 0.5 * (config.lr - min_lr) * (1 + math.cos(math.pi * progress))


# minGPT's rule, by module type: the weights of these modules decay ...
DECAY_MODULES = (nn.Linear, nn.Embedding)
# ... and the gains of these do not (nor does any bias).
NO_DECAY_MODULES = (nn.LayerNorm, RMSNorm)


def decays(module: nn.Module, name: str, p: torch.Tensor, decay_modules=DECAY_MODULES,
           no_decay_modules=NO_DECAY_MODULES) -> bool:
    """Whether parameter `name` of `module` (its own, not a submodule's) gets weight decay, by module type.

    Biases never decay; Linear and Embedding weights do; norm gains do not. A parameter of any other
    module (a LoRA adapter's A and B, say) has no type to go by and follows nanoGPT's rule, p.dim() >= 2.
    """
    if name.endswith("bias"):
        return False
    if isinstance(module, decay_modules):
        return True
    if isinstance(module, no_decay_modules):
        return False
    return p.dim() >= 2


def param_groups(model: torch.nn.Module, weight_decay: float, decay_modules=DECAY_MODULES,
                 no_decay_modules=NO_DECAY_MODULES) -> list[dict]:
    """Two AdamW groups: [decayed (Linear and Embedding weights), not decayed (biases, norm gains)].

    Each parameter is classified by the type of the module that owns it (`decays`, minGPT's rule) and
    the result is checked against the dimension rule (decay iff p.dim() >= 2, nanoGPT's): a parameter
    the two rules disagree on raises, as does one that lands in both groups. The tied LM head
    (`head.weight is tok_emb.weight`) is one parameter owned by an Embedding and a Linear: both say
    decay, so it is classified once and listed once. Frozen parameters (requires_grad=False) are in
    neither group. Both groups keep the order of model.parameters().
    """
    decided: dict[int, bool] = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full_name = f"{module_name}.{name}" if module_name else name
            decay = decays(module, name, p, decay_modules, no_decay_modules)
            if decided.setdefault(id(p), decay) != decay:
                raise AssertionError(f"{full_name} is in both the decay and the no-decay group (a shared parameter "
                                     f"whose owners' types disagree)")
            if decay != (p.dim() >= 2):
                raise AssertionError(f"{full_name} ({type(module).__name__}, {p.dim()}-D) is classified "
                                     f"{'decay' if decay else 'no decay'} by its module type, but the dimension "
                                     f"rule (decay iff p.dim() >= 2) says {'no decay' if decay else 'decay'}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(id(p) in decided for p in trainable), "a trainable parameter is in no group"
    return [{"params": [p for p in trainable if decided[id(p)]], "weight_decay": weight_decay},
            {"params": [p for p in trainable if not decided[id(p)]], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer over param_groups. capturable=True (CUDA graphs) keeps lr as a device tensor."""
    groups = param_groups(model, config.weight_decay)
    device = next(model.parameters()).device
    lr = torch.tensor(config.lr, device=device) if capturable else config.lr    # the model's device, not "cuda"
    extra = {"fused": device.type == "cuda", "capturable": capturable}
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


def log_partition(logits: torch.Tensor) -> torch.Tensor:
    """log Z = logsumexp_i z_i of each prediction, in float32 (float64 stays float64): (..., V) -> (N,)."""
    logits = logits.reshape(-1, logits.size(-1))
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def z_loss_term(logits: torch.Tensor) -> torch.Tensor:
    """mean over predictions of log^2 Z (PaLM §5). Its gradient is d/dz_i = 2 log Z softmax(z)_i / N:
    it pulls log Z toward 0 and, since CE ignores a shift of all logits, is the only term that pins it."""
    return log_partition(logits).pow(2).mean()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
            z_loss: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over every prediction: (B, T, V) with (B, T), or (B, C) with (B,);
    plus z_loss * mean(log^2 Z) when z_loss > 0 (the training loss; evaluation calls it with 0)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * z_loss_term(logits)
    return loss


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


@torch.no_grad()
def _queries_and_keys(model: GPT, x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One eval-mode forward of x (B, T): each layer's (q, k), (B, nh, T, hs) as they leave q_norm / k_norm
    (forward hooks; Identity modules when qk_norm is off, so the fused SDPA path needs no change), and the
    model's output logits; under no_grad, so nothing computed from them keeps a graph."""
    captured: dict[nn.Module, torch.Tensor] = {}
    attentions = [block.attn for block in model.blocks]
    hooks = [norm.register_forward_hook(lambda module, inputs, output: captured.__setitem__(module, output))
             for attn in attentions for norm in (attn.q_norm, attn.k_norm)]
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [(captured[attn.q_norm], captured[attn.k_norm]) for attn in attentions], logits


def _masked_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q k^T / sqrt(hs) in float32, (B, nh, T, T), the future masked to -inf."""
    T = q.size(-2)
    future = ~torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))
    att = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(k.size(-1))      # (B, nh, T, T)
    return att.masked_fill(future, -math.inf)


def attention_logits(model: GPT, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One eval-mode forward of x (B, T): each layer's pre-softmax logits q k^T / sqrt(hs), (B, nh, T, T) in
    float32 with the future masked to -inf, and the model's output logits.

    q and k are read as they leave q_norm / k_norm (forward hooks), so the fused SDPA path needs no change.
    Every layer's (B, nh, T, T) is kept: for a plot or a check; `stability_stats` keeps one at a time.
    """
    qk, logits = _queries_and_keys(model, x)
    return [_masked_logits(q, k) for q, k in qk], logits


def stability_stats(model: GPT, x: torch.Tensor) -> dict[str, float]:
    """The two quantities Wortsman et al. 2023 watch diverge, on one batch x (B, T), in eval mode, float32:

    "max_attn_logit": the largest pre-softmax attention logit q.k / sqrt(hs) over layers, heads and causal
    positions (the logits of `attention_logits`, one layer's (B, nh, T, T) in memory at a time); "log_z": the
    mean over predictions of log Z = logsumexp of the output logits.
    """
    qk, logits = _queries_and_keys(model, x)
    return {"max_attn_logit": max(float(_masked_logits(q, k).max()) for q, k in qk),
            "log_z": float(log_partition(logits).mean())}


def _autocast(device: torch.device, amp: bool):
    # no weight-cast cache: a CUDA graph must recompute the casts on every replay
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda", cache_enabled=False)


def _step(forward, optimizer, params, x, y, config: TrainConfig, device):
    """forward -> loss -> backward -> clip (returns the pre-clip norm) -> optimizer step."""
    with _autocast(device, config.amp):
        logits = forward(x)
    loss = loss_fn(logits, y, config.label_smoothing, config.z_loss)   # what is backpropagated (and logged)
    loss.backward()
    # total norm = sqrt(sum over tensors of ||g||^2); grads scaled by min(1, c / (norm + 1e-6)) when clipping
    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip is not None else float("inf"))
    optimizer.step()
    return loss.detach(), norm


def eager_step(forward, optimizer, params, task, config: TrainConfig, device) -> Callable:
    """The step as plain PyTorch: step(x, y, lr) sets lr, zeroes the gradients, runs `_step`."""
    def step(x, y, lr: float):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        return _step(forward, optimizer, params, x, y, config, device)
    return step


def graphed_step(forward, optimizer, params, task, config: TrainConfig, device) -> Callable:
    """The same step captured once as a CUDA graph (reglab.graphs); step(x, y, lr) replays it."""
    x, y = task.train_batch(0, torch.Generator(device=device).manual_seed(0))   # shapes only
    return GraphedStep(lambda x, y: _step(forward, optimizer, params, x, y, config, device), optimizer, x, y)


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
    graphed = can_graph(device, config)
    optimizer = make_optimizer(model, config, capturable=graphed)
    params = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model) if config.compile else model
    model.train()
    make_step = graphed_step if graphed else eager_step      # chosen once: the loop below has one path
    train_step = make_step(forward, optimizer, params, task, config, device)
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
        losses[step], norms[step] = train_step(x, y, lr)
        history.tokens_seen += x.numel()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            sync_and_check(step + 1)
            record = {"step": step + 1, **evaluate(forward, task, "train", config.amp),
                      **evaluate(forward, task, "val", config.amp), "weight_norm": weight_norm(model)}
            if isinstance(model, GPT) and model.config.n_classes is None:    # a language model
                record.update(stability_stats(model, next(iter(task.eval_batches("val")))[0]))
            if on_eval is not None:
                record.update(on_eval(model))
            history.evals.append(record)
            bar.set_postfix(train=f"{record['train_loss']:.3f}", val=f"{record['val_loss']:.3f}")
            if stop_when is not None and stop_when(history):
                break
    bar.close()
    history.wall_time = time.perf_counter() - start
    return history


@dataclass
class Run:
    """One run of a sweep: its setting and seed, what it recorded, and what the caller asked to keep."""
    label: Hashable
    seed: int
    config: TrainConfig              # as trained (seed and progress filled in)
    history: History                 # up to the divergence where the run diverged
    trainable_params: int            # parameters the optimizer updated
    train_tokens: int                # distinct input tokens in the task's training split
    diverged_at: int | None = None   # first step with a non-finite loss (sweep(..., diverged="record"))
    model: nn.Module | None = field(default=None, repr=False)   # the trained model (keep_models=True)
    outputs: dict = field(default_factory=dict, repr=False)     # after(model), computed when training ended

    @property
    def epochs(self) -> float:
        """How many times each training token was seen, on average."""
        return self.history.tokens_seen / self.train_tokens

    @property
    def params_per_token(self) -> float:
        return self.trainable_params / self.train_tokens


def sweep(runs: dict, task, seeds=(0,), on_eval=None, progress: bool = True, stop_when=None,
          after: Callable[[nn.Module], dict] | None = None, keep_models: bool = False,
          diverged: str = "raise", workers: int | str = 1) -> dict[Hashable, list[Run]]:
    """Train one model per (setting, seed); returns {label: [Run per seed]}, settings outer, seeds inner.

    runs maps a label to (model, TrainConfig). model is a GPTConfig (a fresh model whose init follows
    the seed) or a function seed -> nn.Module (e.g. a copy of a pretrained model); the batches and the
    dropout masks follow the seed too. on_eval and stop_when go to `train`. after(model), if given,
    reads the trained model (its logits, say) into Run.outputs; keep_models=True keeps the model itself.
    diverged="record" ends a run at its first non-finite loss and records it in Run.diverged_at;
    "raise" (the default) lets NonFiniteLossError through.
    workers: runs trained at once, each in its own process on one CPU thread (`parallel_runs`); "auto"
    is one per core on a CPU task and 1 on a GPU. The runs and their results are the same either way.
    """
    if diverged not in ("raise", "record"):
        raise ValueError(f"diverged must be 'raise' or 'record', got {diverged!r}")
    jobs = [(label, model_spec, train_config, seed) for label, (model_spec, train_config) in runs.items()
            for seed in seeds]
    workers = min(resolve_workers(workers, task.device), len(jobs))
    common = (task, on_eval, stop_when, after, keep_models)
    done = (parallel_runs(jobs, common, workers, progress) if workers > 1
            else (train_run(*job, *common, progress=progress) for job in jobs))   # one at a time, lazily
    results = {label: [] for label in runs}
    for run in done:
        if run.diverged_at is not None and diverged == "raise":
            raise NonFiniteLossError(run.diverged_at, run.history.loss[run.diverged_at], run.history)
        results[run.label].append(run)
    return results


def train_run(label, model_spec, train_config: TrainConfig, seed: int, task, on_eval=None, stop_when=None,
              after=None, keep_models: bool = False, progress: bool = True) -> Run:
    """One (setting, seed) of a sweep: a fresh model (or model_spec(seed)) trained with the seed filled in."""
    model = (new_model(model_spec, seed=seed, device=task.device) if isinstance(model_spec, GPTConfig)
             else model_spec(seed))
    config = replace(train_config, seed=seed, progress=progress)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        history, diverged_at = train(model, task, config, on_eval=on_eval, desc=f"{label} seed {seed}",
                                     stop_when=stop_when), None
    except NonFiniteLossError as err:
        history, diverged_at = err.history, err.step
    return Run(label, seed, config, history, trainable, task.train_tokens, diverged_at,
               model if keep_models else None, after(model) if after else {})


def resolve_workers(workers: int | str, device) -> int:
    """sweep's workers: a positive int, or "auto" (one per core this process may use on a CPU, else 1)."""
    if workers == "auto":
        if torch.device(device).type != "cpu":
            return 1
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or 'auto', got {workers!r}")
    return workers


def _one_thread() -> None:
    import signal
    torch.set_num_threads(1)             # each worker one core: the runs, not the ops, are parallel
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C (a kernel interrupt) is the parent's: it stops the workers


_POOLS: dict = {}                        # workers -> a process pool kept for the next sweep (spawning costs seconds)


def _pool(workers: int):
    """A pool of `workers` fresh one-thread processes, started once and kept until this process exits."""
    import atexit
    import concurrent.futures
    import multiprocessing
    pool = _POOLS.get(workers)
    if pool is None or getattr(pool, "_broken", False):
        context = multiprocessing.get_context("spawn")    # not fork: a forked PyTorch can hang in OpenMP
        pool = _POOLS[workers] = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                                         initializer=_one_thread)
        atexit.register(pool.shutdown, wait=False, cancel_futures=True)
    return pool


def parallel_runs(jobs: list, common: tuple, workers: int, progress: bool) -> list[Run]:
    """sweep's jobs in `workers` processes at once, returned in the jobs' order. Everything a job needs
    travels by pickle, so the model functions and callbacks must be importable (module-level functions,
    partials of them, GPTConfigs), not lambdas or closures."""
    import concurrent.futures
    import pickle
    try:
        pickle.dumps((jobs, common))
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise TypeError(f"sweep(workers={workers}) sends each run to another process, and a run spec or callback "
                        f"cannot be pickled ({err}); pass module-level functions, or workers=1") from None
    pool = _pool(workers)
    futures = [pool.submit(train_run, *job, *common, progress=False) for job in jobs]
    show = progress and os.environ.get("REGLAB_PROGRESS", "1") != "0"
    try:
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), disable=not show,
                           desc=f"{len(jobs)} runs, {workers} at once", leave=False):
            future.result()                                  # a worker's error surfaces here
    except BaseException:                                    # interrupted, or a run failed: stop the rest now
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        _POOLS.pop(workers, None)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return [future.result() for future in futures]


def histories(results: dict[Hashable, list[Run]]) -> dict[Hashable, list[History]]:
    """{label: [History per seed]} of a sweep's results: what the plots and summaries read."""
    return {label: [run.history for run in runs] for label, runs in results.items()}
