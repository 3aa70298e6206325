"""Topic dropout: exact recall of random facts (keys mapped to random values) that a model must reproduce token for token.

A fact is a key of `key_len` random tokens followed by a value of `value_len` random tokens, e.g.
`[7, 2, 9, 4 | 11, 3]`. The model reads the key and must continue it with exactly the value. Nothing
links a key to its value except memory, so there is no rule to generalize: held-out facts score at
chance, and the only question is how many training facts the model stores within its budget.

The task is a language-modelling task on the fact strings: x is the fact without its last token, y
the fact shifted by one, with the targets at key positions set to -100 (PyTorch's `ignore_index`), so
the loss counts only the value tokens. The trainer's `train_acc` therefore understates recall (it
divides by every position); use `recall_accuracy`, which decodes each value and counts exact matches.
"""
from __future__ import annotations

import functools

from collections import Counter

import torch

from reglab.data import ClassificationTask

IGNORE = -100   # F.cross_entropy's default ignore_index: key positions carry no loss


class RecallTask(ClassificationTask):
    """Facts to memorize: the 'train' split holds the facts to learn, 'val' unseen keys with random values."""

    def __init__(self, keys: dict[str, torch.Tensor], values: dict[str, torch.Tensor], vocab_size: int,
                 batch_size: int | None = None, device="cpu"):
        splits = {}
        for split in keys:
            fact = torch.cat([keys[split], values[split]], dim=1)         # (N, key_len + value_len)
            x, y = fact[:, :-1], fact[:, 1:].clone()                       # (N, L - 1) each
            y[:, : keys[split].size(1) - 1] = IGNORE                       # the loss counts the value only
            splits[split] = (x, y)
        super().__init__(splits, batch_size=batch_size, device=device)
        self.keys = {split: k.to(device) for split, k in keys.items()}       # (N, key_len)
        self.values = {split: v.to(device) for split, v in values.items()}   # (N, value_len)
        self.vocab_size = vocab_size
        self.key_len, self.value_len = keys["train"].size(1), values["train"].size(1)

    @property
    def block_size(self) -> int:
        """The context a model needs: the key and all but the last value token."""
        return self.key_len + self.value_len - 1

    @property
    def n_facts(self) -> int:
        return len(self.keys["train"])


def recall_task(n_facts: int = 256, key_len: int = 4, value_len: int = 2, vocab_size: int = 16,
                n_heldout: int = 256, batch_size: int | None = 64, seed: int = 0, device="cpu") -> RecallTask:
    """n_facts distinct random keys, each mapped to a random value; the same seed gives the same facts.

    Keys are drawn without repetition from the vocab_size ** key_len possible keys, values uniformly
    from the vocab_size ** value_len possible values. n_heldout more keys form the 'val' split.
    """
    if n_facts < 1 or n_heldout < 1:
        raise ValueError(f"n_facts and n_heldout must be at least 1, got {n_facts} and {n_heldout}")
    if key_len < 1 or value_len < 1:
        raise ValueError(f"key_len and value_len must be at least 1, got {key_len} and {value_len}")
    n_keys = vocab_size ** key_len
    if n_facts + n_heldout > n_keys:
        raise ValueError(f"{n_facts} + {n_heldout} distinct keys asked for, but vocab_size ** key_len = {n_keys}")
    gen = torch.Generator().manual_seed(seed)
    # distinct key numbers, written in base vocab_size: the digits are the key's tokens
    numbers = torch.randperm(n_keys, generator=gen)[: n_facts + n_heldout]
    digits = vocab_size ** torch.arange(key_len - 1, -1, -1)
    all_keys = numbers[:, None] // digits % vocab_size                            # (N, key_len)
    all_values = torch.randint(vocab_size, (n_facts + n_heldout, value_len), generator=gen)
    keys = {"train": all_keys[:n_facts], "val": all_keys[n_facts:]}
    values = {"train": all_values[:n_facts], "val": all_values[n_facts:]}
    return RecallTask(keys, values, vocab_size, batch_size=batch_size, device=device)


@torch.no_grad()
def recall_accuracy(model, task: RecallTask, split: str = "train", temperature: float = 0.0,
                    top_k: int | None = None, votes: int = 1, seed: int = 0) -> float:
    """Fraction of a split's facts whose value the model reproduces exactly, in eval mode.

    temperature 0 decodes greedily (deterministic). With temperature > 0 each fact's value is sampled
    `votes` times and the most common sampled value is the answer (majority voting; ties go to the
    value sampled first).
    """
    if votes < 1:
        raise ValueError(f"votes must be at least 1, got {votes}")
    was_training = model.training
    model.eval()
    keys, values = task.keys[split], task.values[split]
    generator = torch.Generator(device=keys.device).manual_seed(seed)
    n_draws = 1 if temperature == 0 else votes
    prompts = keys.repeat(n_draws, 1)                                            # (draws * N, key_len)
    out = model.generate(prompts, task.value_len, temperature=temperature, top_k=top_k, generator=generator)
    answers = out[:, task.key_len:].view(n_draws, len(keys), task.value_len)     # (draws, N, value_len)
    model.train(was_training)
    if n_draws == 1:
        return float((answers[0] == values).all(dim=1).float().mean())
    correct = 0
    for i, truth in enumerate(values.tolist()):
        votes_for = Counter(tuple(answer) for answer in answers[:, i].tolist())
        correct += list(votes_for.most_common(1)[0][0]) == truth
    return correct / len(keys)


def recall_metrics(task: RecallTask):
    """An `on_eval` callback for `reglab.train.train`: greedy exact recall on the facts and on held-out keys
    (a partial of a module-level function, so a sweep can send it to its worker processes)."""
    return functools.partial(_recall_on_eval, task)


def _recall_on_eval(task: RecallTask, model) -> dict:
    return {"recall": recall_accuracy(model, task, "train"), "heldout_recall": recall_accuracy(model, task, "val")}
