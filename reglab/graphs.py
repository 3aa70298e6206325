"""Core, safe to skip on a first reading: the training step replayed as one CUDA graph, fast but not different.

A small model on a GPU is launch-bound: a step is ~150 short kernels, each paying a launch. Capturing
the whole step (forward, backward, clipping, optimizer) once as a CUDA graph and replaying it costs one
launch a step. `reglab.train` uses it on CUDA when `TrainConfig.cuda_graph` is on; the step it replays
is the one `reglab.train.eager_step` spells out.
"""
from __future__ import annotations

from typing import Callable

import torch


def can_graph(device: torch.device, config) -> bool:
    """Graphs replay fixed kernels on fixed buffers: CUDA only, no torch.compile, built-in optimizers only
    (their `capturable=True` keeps the step count and the lr on the device)."""
    return (config.cuda_graph and device.type == "cuda" and not config.compile
            and isinstance(config.optimizer, str))


class GraphedStep:
    """The whole step captured once as a CUDA graph, then replayed: one launch instead of ~150.

    step(x, y) -> (loss, pre-clip norm) runs forward, backward, clip and optimizer step on the given
    batch. Capture needs a warm-up step; it runs with lr = 0 (parameters unchanged), and afterwards the
    optimizer's moments and step counts are zeroed and the device's random-number state is put back, so
    the replays draw the same dropout masks and take the same steps as the eager run.
    """

    def __init__(self, step: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
        self.optimizer = optimizer
        self.x, self.y = x.clone(), y.clone()            # static input buffers, refilled before each replay
        device = x.device
        rng_state = torch.cuda.get_rng_state(device)     # dropout masks: replay 0 must draw what eager step 0 draws
        self._set_lr(0.0)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step(self.x, self.y)                         # warm-up: allocates the gradients and optimizer state
        torch.cuda.current_stream(device).wait_stream(side)
        optimizer.zero_grad(set_to_none=True)            # backward in the graph writes fresh gradients
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.norm = step(self.x, self.y)
        for state in optimizer.state.values():           # forget the warm-up step
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()
        torch.cuda.set_rng_state(rng_state, device)

    def _set_lr(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)                        # a device tensor (capturable optimizer)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float):
        self.x.copy_(x)
        self.y.copy_(y)
        self._set_lr(lr)
        self.graph.replay()
        return self.loss, self.norm
