"""Grading room: where the labs live (`solutions/`, the single source; `labs/`, generated) and how a lab is named and found.

The generator writes these folders and the grader reads them; both import the paths from here (and
neither from the other), so the lab loader may use the generator without an import cycle.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS, LABS = ROOT / "solutions", ROOT / "labs"


def lab_name(path: Path) -> str:
    """Short name of a lab from its file name: solutions/01_dropout_lab.ipynb -> 'dropout'."""
    return re.sub(r"^\d+_|_lab$", "", path.stem)


def find_solution(name_or_path: str) -> Path:
    """A solution notebook by short name ('dropout') or by path."""
    path = Path(name_or_path)
    if path.suffix == ".ipynb":
        if not path.is_file():
            raise FileNotFoundError(f"no solution notebook at {str(path)!r}")
        return path
    found = {lab_name(p): p for p in sorted(SOLUTIONS.glob("*.ipynb"))}
    if name_or_path not in found:
        raise ValueError(f"unknown lab {name_or_path!r}; the labs are {sorted(found)} (or give a solution's path)")
    return found[name_or_path]
