"""Data: built from what ships with Python, deterministic, and strict about bad input."""
import pytest
import torch

from reglab.data import (LMTask, builtin_text, corpus_task, interleaved_split, load_corpus, modular_addition,
                         split_tokens, spread_sample)


def test_builtin_corpus_is_python_help_text_and_round_trips():
    corpus = load_corpus()
    assert corpus.source == "builtin" and len(corpus.text) > 400_000
    sample = corpus.text[:500]
    assert corpus.decode(corpus.encode(sample)) == sample
    assert builtin_text() == corpus.text, "the corpus must be deterministic"


def test_user_corpus_file_is_read_and_bad_files_are_refused(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello world. " * 200, encoding="utf-8")
    assert load_corpus(good).chars == " .dehlorw"
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_corpus(tmp_path / "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00" * 1000)
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_corpus(binary)
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    with pytest.raises(ValueError, match="has 9 usable characters; the course needs at least 1000"):
        load_corpus(short)


def test_vocab_filter_drops_unknown_characters(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcé" * 500, encoding="utf-8")
    corpus = load_corpus(path, vocab="abc")
    assert set(corpus.text) == set("abc") and len(corpus.text) == 1500
    with pytest.raises(ValueError, match="not in the vocabulary"):
        corpus.encode("é")


def test_split_is_deterministic_and_disjoint():
    tokens = torch.arange(100)
    train, val = split_tokens(tokens, 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 0"):
        split_tokens(tokens, 0)


def test_lm_batches_are_shifted_windows_and_seeded():
    stream = torch.arange(1000)
    task = LMTask(stream[:900], stream[900:], block_size=8, batch_size=4)
    x, y = task.train_batch(0, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    x2, _ = task.train_batch(0, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    first, second = list(task.eval_batches("val")), list(task.eval_batches("val"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second)), "eval batches must be fixed"


def test_single_pass_sees_no_token_twice_and_stops_at_the_end():
    stream = torch.arange(1001)
    task = LMTask(stream, stream[:100], block_size=10, batch_size=5, single_pass=True)
    assert task.single_pass_steps == 20
    seen = torch.cat([task.train_batch(s, None)[0].flatten() for s in range(task.single_pass_steps)])
    assert len(seen) == len(set(seen.tolist())) == 1000
    with pytest.raises(ValueError, match="single pass exhausted: step 20"):
        task.train_batch(20, None)


def test_modular_addition_labels_and_split():
    task = modular_addition(modulus=7, train_fraction=0.5, seed=0)
    (xt, yt), (xv, yv) = task.splits["train"], task.splits["val"]
    assert len(xt) == 25 and len(xv) == 24
    x, y = torch.cat([xt, xv]), torch.cat([yt, yv])
    assert torch.equal(y, (x[:, 0] + x[:, 1]) % 7) and (x[:, 2] == 7).all()
    assert len({tuple(r) for r in x.tolist()}) == 49, "every pair exactly once"


def test_corpus_task_limits_training_characters():
    corpus, task = corpus_task(block_size=16, batch_size=2, max_train_chars=5000)
    assert len(task.streams["train"]) == 5000 and corpus.vocab_size > 50


def test_corpus_task_evaluates_on_the_batches_it_is_given():
    _, task = corpus_task(block_size=16, batch_size=4, eval_batches=3, seed=0)
    batches = list(task.eval_batches("val"))
    assert len(batches) == 3 and all(x.shape == (4, 16) for x, _ in batches)
    again = list(corpus_task(block_size=16, batch_size=4, eval_batches=3, seed=0)[1].eval_batches("val"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))      # fixed: the same every time
    assert task.train_tokens == len(task.streams["train"])


def test_interleaved_split_holds_out_every_tenth_chunk_and_loses_nothing():
    tokens = torch.arange(1000)
    train, val = interleaved_split(tokens, chunk=10, every=10)
    assert len(train) + len(val) == 1000 and len(val) == 100
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert val[:10].tolist() == list(range(50, 60))          # the middle chunk of the first group


def test_a_spread_sample_takes_evenly_spaced_chunks_and_validates_on_text_from_everywhere():
    tokens = torch.arange(100_500)
    sample = spread_sample(tokens, 10_000, chunk=1000)
    assert len(sample) == 10_000 and torch.equal(sample[:1000], tokens[:1000])
    starts = sample[::1000].tolist()                   # 10 chunks spaced from the first to the last
    assert starts[0] == 0 and starts[-1] == 99_000 and len(set(b - a for a, b in zip(starts, starts[1:]))) <= 2
    assert torch.equal(spread_sample(tokens, 200_000), tokens)
    corpus, task = corpus_task(block_size=16, batch_size=2, max_train_chars=5000, spread=True)
    train_split, val_split = interleaved_split(corpus.encode(corpus.text), 1000)
    assert torch.equal(task.streams["train"], spread_sample(train_split, 5000))
    assert torch.equal(task.streams["val"], val_split)
    last_whole = len(train_split) // 1000 * 1000
    assert torch.equal(task.streams["train"][-1000:], train_split[last_whole - 1000:last_whole])   # the end trains too
