"""The training-stability topic: its lecture helpers (and, alongside, its lab's experiments and checks)."""
