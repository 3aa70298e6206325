"""Write what the course derives into data/generated/, so you can read it (the course itself derives it
in memory and never needs these files).

    python data/make_data.py

- builtin_corpus.txt: the built-in character corpus (reglab.data.builtin_text)
- finetune_stdlib_docstrings.txt: the capstone's fine-tuning text (reglab.capstone.stdlib_docstrings)
- modular_addition_97.csv: the grokking task's pairs and labels (reglab.data.modular_addition)
"""
from pathlib import Path

from reglab.capstone import stdlib_docstrings
from reglab.data import builtin_text, modular_addition

OUT = Path(__file__).resolve().parent / "generated"


def main():
    OUT.mkdir(exist_ok=True)
    (OUT / "builtin_corpus.txt").write_text(builtin_text(), encoding="utf-8")
    (OUT / "finetune_stdlib_docstrings.txt").write_text(stdlib_docstrings(), encoding="utf-8")
    task = modular_addition(modulus=97, train_fraction=0.5, seed=0)
    rows = ["split,a,b,label"]
    for split, (x, y) in task.splits.items():
        rows += [f"{split},{a},{b},{label}" for (a, b, _), label in zip(x.tolist(), y.tolist())]
    (OUT / "modular_addition_97.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    for path in sorted(OUT.iterdir()):
        print(f"{path.relative_to(OUT.parent.parent)}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
