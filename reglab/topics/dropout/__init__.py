"""The dropout topic: its lecture helpers, its lab's experiments and its lab's checks, side by side."""
