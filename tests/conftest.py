"""Shared fixtures. The suite runs in the `ci` budget on the CPU (the Makefile sets REGLAB_BUDGET=ci)."""
import pytest
import torch

from reglab.model import GPTConfig
from reglab.train import TrainConfig


def _torch_scheduler(optimizer, config: TrainConfig):
    """The course's schedule from PyTorch's own schedulers: LinearLR from lr / W up to lr over the warmup,
    then CosineAnnealingLR from lr down to the floor at the last step (or a constant lr)."""
    W = config.warmup_steps
    after = (torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
             if config.schedule == "constant" else
             torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps - 1 - W, eta_min=config.lr_floor))
    if W == 0:
        return after
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / W, end_factor=1.0, total_iters=W - 1)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, after], milestones=[W])


@pytest.fixture
def torch_schedule():
    """config -> the lr of every step, from PyTorch's schedulers (an answer key for reglab.train.lr_at)."""
    def schedule(config: TrainConfig) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
        scheduler, lrs = _torch_scheduler(optimizer, config), []
        for _ in range(config.steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs
    return schedule


@pytest.fixture
def adamw_retained():
    """config -> after each step, what torch.optim.AdamW under PyTorch's schedulers leaves of a weight that
    starts at 1 and whose gradient is always zero (Adam's update is then 0, so only the decoupled decay
    acts): an answer key for the decay formulas."""
    def retained(config: TrainConfig) -> list[float]:
        theta = torch.ones(1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.AdamW([theta], lr=config.lr, weight_decay=config.weight_decay)
        scheduler, curve = _torch_scheduler(optimizer, config), []
        for _ in range(config.steps):
            theta.grad = torch.zeros_like(theta)
            optimizer.step()
            scheduler.step()
            curve.append(float(theta.detach()))
        return curve
    return retained


@pytest.fixture
def tiny_config():
    """A model small enough that a forward pass takes milliseconds; every dropout site off."""
    return GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def tokens():
    return torch.randint(17, (4, 16), generator=torch.Generator().manual_seed(0))
