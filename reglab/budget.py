"""Core: budgets and devices, how big an experiment is allowed to be and where it runs.

- `ci`:  seconds on 2 CPU cores (CI and grading); the numbers are tiny, the code paths are real.
- `cpu`: minutes on a laptop; the lab's effect must already be visible.
- `gpu`: one modern GPU; full size, several seeds.
- `auto`: the environment variable REGLAB_BUDGET if set, else `gpu` when CUDA is available, else `cpu`.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

BUDGETS = ("ci", "cpu", "gpu")


def resolve_budget(budget: str = "auto") -> str:
    if budget == "auto":
        budget = os.environ.get("REGLAB_BUDGET", "") or ("gpu" if torch.cuda.is_available() else "cpu")
        source = "REGLAB_BUDGET" if os.environ.get("REGLAB_BUDGET") else "auto"
    else:
        source = "budget"
    if budget not in BUDGETS:
        raise ValueError(f"{source} must be one of {BUDGETS} (or 'auto' for the budget parameter), got {budget!r}")
    return budget


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU; an explicit device must exist."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU; use 'auto' or 'cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use 'auto' or 'cpu'")
    return dev


def by_budget(budget: str, **choices):
    """Pick the value for this budget: by_budget('cpu', ci=..., cpu=..., gpu=...)."""
    missing = [b for b in BUDGETS if b not in choices]
    if missing:
        raise TypeError(f"by_budget needs a value for every budget; missing {missing}")
    return choices[resolve_budget(budget)]


def seed_everything(seed: int) -> None:
    """Python, NumPy and PyTorch (all devices) from one integer."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Session:
    """What a notebook's setup cell resolved: every experiment in the notebook reads it."""
    budget: str
    device: torch.device
    seed: int

    def __str__(self):
        return f"reglab session: budget={self.budget}, device={self.device}, seed={self.seed}, torch {torch.__version__}"


def start(budget: str = "auto", seed: int = 0, device: str = "auto") -> Session:
    """The one call of every notebook's setup cell: resolve budget and device, seed everything."""
    session = Session(budget=resolve_budget(budget), device=resolve_device(device), seed=seed)
    seed_everything(seed)
    if session.budget == "ci":
        # CI runs two notebooks at once on two cores: one thread each avoids oversubscription.
        torch.set_num_threads(1)
    print(session)
    return session
