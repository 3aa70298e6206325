"""Shared fixtures. The suite runs in the `ci` budget on the CPU (the Makefile sets REGLAB_BUDGET=ci)."""
import pytest
import torch

from reglab.model import GPTConfig


@pytest.fixture
def tiny_config():
    """A model small enough that a forward pass takes milliseconds; every dropout site off."""
    return GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def tokens():
    return torch.randint(17, (4, 16), generator=torch.Generator().manual_seed(0))
