"""Core: the data every lab trains on, made or derived on the spot (nothing is downloaded).

- A character-level corpus built from English prose that ships with every Python installation
  (the standard library's help topics, `pydoc_data.topics`, about 465k characters), or any UTF-8
  text file the user passes.
- Deterministic synthetic tasks (modular addition to start).

Every task has the same small interface the trainer uses: `train_batch(step, generator)` gives one
(x, y) batch (sampled with `generator`, on the generator's device), `eval_batches(split)` the fixed
batches a split is evaluated on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN = "builtin"


def builtin_text() -> str:
    """The help topics of this Python's standard library, concatenated in sorted-key order."""
    from pydoc_data.topics import topics
    return "".join(topics[key] for key in sorted(topics))


@dataclass
class Corpus:
    """A text with its character vocabulary: encode maps characters to ids, decode the way back."""
    text: str
    chars: str          # the vocabulary, sorted
    source: str         # "builtin" or the path it was read from

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        stoi = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - set(stoi))
        if unknown:
            raise ValueError(f"{len(unknown)} characters are not in the vocabulary, e.g. {unknown[:5]}")
        return torch.tensor([stoi[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def load_corpus(corpus: str | Path = BUILTIN, vocab: str | None = None) -> Corpus:
    """The built-in corpus, or the UTF-8 text file at `corpus`.

    With `vocab` (for example another corpus's `chars`), characters outside it are dropped, so a model
    trained on one corpus can be evaluated or fine-tuned on another.
    """
    if str(corpus) == BUILTIN:
        text, source = builtin_text(), BUILTIN
    else:
        path = Path(corpus).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"corpus must be 'builtin' or a path to a text file; {str(path)!r} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        source = str(path)
    if vocab is not None:
        text = "".join(c for c in text if c in set(vocab))
    if len(text) < 1000:
        raise ValueError(f"corpus {source!r} has {len(text)} usable characters; the course needs at least 1000")
    return Corpus(text=text, chars=vocab if vocab is not None else "".join(sorted(set(text))), source=source)


def split_tokens(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split: the first (1 - val_fraction) of the stream trains, the rest validates."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_train = int(len(tokens) * (1 - val_fraction))
    return tokens[:n_train], tokens[n_train:]


def interleaved_split(tokens: torch.Tensor, chunk: int = 128, every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut tokens into chunks of `chunk`; every `every`-th chunk (from the middle one of each group)
    validates, the rest trains. Unlike a cut at 90%, validation text then comes from all over the text
    (e.g. from every module's docstrings), not from whatever happens to come last."""
    pieces = list(torch.split(tokens, chunk))
    val = [piece for i, piece in enumerate(pieces) if i % every == every // 2]
    train = [piece for i, piece in enumerate(pieces) if i % every != every // 2]
    return torch.cat(train), torch.cat(val)


class LMTask:
    """Next-token prediction on a token stream: x is a window of block_size tokens, y the same shifted by one.

    single_pass=True draws training windows without replacement (no token is seen twice: the
    underfitting regime of large-scale pretraining); otherwise windows are drawn at random.
    """
    kind = "lm"

    def __init__(self, train: torch.Tensor, val: torch.Tensor, block_size: int, batch_size: int,
                 single_pass: bool = False, eval_batches: int = 8, seed: int = 0, device="cpu"):
        for name, stream in (("train", train), ("val", val)):
            if len(stream) <= block_size + 1:
                raise ValueError(f"the {name} split has {len(stream)} tokens; block_size {block_size} needs more")
        self.block_size, self.batch_size, self.single_pass = block_size, batch_size, single_pass
        self.streams = {"train": train.to(device), "val": val.to(device)}
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        # Fixed evaluation windows, the same at every evaluation, so curves are not noisy by sampling.
        self._eval_starts = {
            split: torch.randint(len(s) - block_size - 1, (eval_batches, batch_size), generator=gen).to(device)
            for split, s in self.streams.items()}
        # Single pass: the non-overlapping windows of the train stream, in a fixed random order.
        n_windows = (len(train) - 1) // block_size
        self._pass_order = (torch.randperm(n_windows, generator=gen) * block_size).to(device)
        self._offsets = torch.arange(block_size + 1, device=self.device)

    @property
    def train_tokens(self) -> int:
        """Distinct tokens in the training stream: what an epoch goes through."""
        return len(self.streams["train"])

    @property
    def single_pass_steps(self) -> int:
        """How many steps one pass over the training stream lasts."""
        return len(self._pass_order) // self.batch_size

    def _windows(self, split, starts):
        chunk = self.streams[split][starts.to(self.device)[:, None] + self._offsets]   # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(self, step: int, generator: torch.Generator):
        if self.single_pass:
            if step >= self.single_pass_steps:
                raise ValueError(f"single pass exhausted: step {step} needs more than the "
                                 f"{self.single_pass_steps} steps of data the train split holds")
            starts = self._pass_order[step * self.batch_size:(step + 1) * self.batch_size]
        else:
            high = len(self.streams["train"]) - self.block_size - 1
            # sampled where the generator lives: a GPU generator keeps the step free of host syncs
            starts = torch.randint(high, (self.batch_size,), generator=generator, device=generator.device)
        return self._windows("train", starts)

    def eval_batches(self, split: str):
        for starts in self._eval_starts[split]:
            yield self._windows(split, starts)


class ClassificationTask:
    """Sequences x (N, T) with one label y (N,) each; the model reads x and predicts y.

    batch_size=None trains full-batch (as the grokking experiments do).
    """
    kind = "classification"

    def __init__(self, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int | None = None,
                 eval_chunk: int = 4096, device="cpu"):
        if "train" not in splits:
            raise ValueError(f"a classification task needs a 'train' split; got {sorted(splits)}")
        self.splits = {name: (x.to(device), y.to(device)) for name, (x, y) in splits.items()}
        self.batch_size, self.eval_chunk = batch_size, eval_chunk
        self.device = torch.device(device)

    @property
    def train_tokens(self) -> int:
        """Input tokens in the training split: what an epoch goes through."""
        return self.splits["train"][0].numel()

    def train_batch(self, step: int, generator: torch.Generator):
        x, y = self.splits["train"]
        if self.batch_size is None or self.batch_size >= len(x):
            return x, y
        idx = torch.randint(len(x), (self.batch_size,), generator=generator, device=generator.device).to(self.device)
        return x[idx], y[idx]

    def eval_batches(self, split: str):
        x, y = self.splits[split]
        for i in range(0, len(x), self.eval_chunk):
            yield x[i:i + self.eval_chunk], y[i:i + self.eval_chunk]


def corpus_task(corpus: str | Path = BUILTIN, block_size: int = 64, batch_size: int = 32,
                max_train_chars: int | None = None, single_pass: bool = False, eval_batches: int = 8,
                seed: int = 0, device="cpu", spread: bool = False) -> tuple[Corpus, LMTask]:
    """The character-level language-modelling task on a corpus (the labs' default).

    max_train_chars keeps only part of the train split: the small-data regime.
    eval_batches: how many fixed batches each split is evaluated on.
    spread=False: the first 90% of the text trains, the last 10% validates, and max_train_chars keeps the
    beginning of the train split. spread=True: every tenth chunk of SPREAD_CHUNK characters validates
    (`interleaved_split`) and max_train_chars is made of evenly spaced chunks of the rest (`spread_sample`),
    so both come from all over the text. A small sample cut from the beginning is about whatever the text
    starts with (one module's docs, say) and its val split about whatever it ends with, so the val loss
    then measures a change of topic as much as what the model learned.
    """
    text = load_corpus(corpus)
    tokens = text.encode(text.text)
    train, val = interleaved_split(tokens, SPREAD_CHUNK) if spread else split_tokens(tokens)
    if max_train_chars is not None:
        train = spread_sample(train, max_train_chars) if spread else train[:max_train_chars]
    return text, LMTask(train, val, block_size, batch_size, single_pass=single_pass, eval_batches=eval_batches,
                        seed=seed, device=device)


SPREAD_CHUNK = 1000      # characters: a paragraph or so, so few windows straddle two chunks


def spread_sample(tokens: torch.Tensor, n: int, chunk: int = SPREAD_CHUNK) -> torch.Tensor:
    """n tokens made of chunks of `chunk` at evenly spaced places from the start of `tokens` to its end
    (all of them if n >= len)."""
    pieces = [piece for piece in torch.split(tokens, chunk) if len(piece) == chunk]   # whole chunks: n exactly
    if math.ceil(n / chunk) >= len(pieces):
        return tokens[:n]                                  # nearly all of it: no room to spread
    kept = torch.linspace(0, len(pieces) - 1, math.ceil(n / chunk)).round().long().tolist()   # first to last
    return torch.cat([pieces[i] for i in kept])[:n]


def modular_addition(modulus: int = 97, train_fraction: float = 0.5, seed: int = 0,
                     device="cpu") -> ClassificationTask:
    """All pairs (a, b) with label (a + b) mod modulus, as sequences [a, b, '='] ('=' is token `modulus`).

    A random train_fraction of the modulus**2 pairs trains; the rest is the 'val' split (the
    grokking setup of Power et al. 2022). Vocabulary size: modulus + 1.
    """
    if modulus < 2:
        raise ValueError(f"modulus must be at least 2, got {modulus}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    a, b = torch.cartesian_prod(torch.arange(modulus), torch.arange(modulus)).T
    x = torch.stack([a, b, torch.full_like(a, modulus)], dim=1)                 # (P^2, 3)
    y = (a + b) % modulus                                                        # (P^2,)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = math.ceil(train_fraction * len(x))
    train, val = perm[:n_train], perm[n_train:]
    return ClassificationTask({"train": (x[train], y[train]), "val": (x[val], y[val])}, device=device)
