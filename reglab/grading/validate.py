"""Grading room, validation: is a submitted file a notebook of this lab, with the lab's cells where the lab has them?

A valid submission is a notebook (nbformat 4.5, cell ids), of this lab, with every code cell and answer
cell of the lab still there under its id, in the lab's order (added cells, edited cells and deleted
prose are fine); anything else is `invalid`, with the reason. Nothing of the file runs here.
"""
from __future__ import annotations

import collections
import copy
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from reglab.grading.generate import NOTE_ID, cell_source
from reglab.grading.lab import Lab

MAX_SUBMISSION_BYTES = 32 * 2**20     # a lab notebook with its outputs is well under 1 MB


class Invalid(Exception):
    """A submission the grader will not run; the message is the reason shown to instructor and student."""


def _quote(ids) -> str:
    return ", ".join(f"'{i}'" for i in ids)


def read_notebook(raw: bytes) -> dict:
    """Parse a submitted file into a notebook dict, or raise Invalid saying what it is instead."""
    if not raw.strip():
        raise Invalid("empty file: nothing was submitted (0 bytes)" if not raw else "empty file: only whitespace")
    if len(raw) > MAX_SUBMISSION_BYTES:
        raise Invalid(f"file too large: {len(raw) / 2**20:.0f} MB (a lab notebook is well under "
                      f"{MAX_SUBMISSION_BYTES // 2**20} MB; clear its outputs)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Invalid("not a notebook: the file is not UTF-8 text (a binary file, e.g. a zip or a PDF?)") from None
    start = text.lstrip()[:40].split("\n")[0]
    if not text.lstrip().startswith(("{", "[")):
        raise Invalid(f"not a notebook: the file is not JSON (it begins {start!r}; "
                      "submit the .ipynb file saved by Jupyter, not a script or an export)")
    try:
        notebook = json.loads(text)
    except json.JSONDecodeError as err:
        raise Invalid(f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg} "
                      "(a truncated or hand-edited file?)") from None
    except RecursionError:
        raise Invalid("malformed JSON: nested too deeply to be a notebook") from None
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list) or "nbformat" not in notebook:
        raise Invalid("not a notebook: valid JSON, but without a notebook's 'nbformat' and 'cells'")
    major, minor = notebook.get("nbformat"), notebook.get("nbformat_minor", 0)
    if major != 4:
        raise Invalid(f"nbformat {major} notebook: the grader reads nbformat 4 (open and save it in Jupyter)")
    cells = notebook["cells"]
    if not all(isinstance(c, dict) for c in cells):
        raise Invalid("not a valid notebook: a cell is not a JSON object")
    if (isinstance(minor, int) and minor < 5) or any(not isinstance(c.get("id"), str) for c in cells):
        raise Invalid(f"its cells have no ids (nbformat 4.{minor}), so they cannot be matched to the lab's: "
                      "download the lab again and copy your work into it")
    counts = collections.Counter(c["id"] for c in cells)
    duplicated = sorted(i for i, n in counts.items() if n > 1)
    if duplicated:
        raise Invalid(f"not a valid notebook: cell ids {_quote(duplicated)} appear more than once")
    import nbformat
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nbformat.validate(nbformat.from_dict(copy.deepcopy(notebook)))
    except nbformat.ValidationError as err:
        first = str(err).strip().split("\n")[0][:200]
        raise Invalid(f"not a valid notebook: {first}") from None
    return notebook


def _moved(positions: list[int]) -> set[int]:
    """Indices (into positions) not on one longest increasing run: the cells that were moved."""
    n = len(positions)
    best, back = [1] * n, [-1] * n
    for i in range(n):
        for j in range(i):
            if positions[j] < positions[i] and best[j] + 1 > best[i]:
                best[i], back[i] = best[j] + 1, j
    keep, i = set(), max(range(n), key=best.__getitem__) if n else -1
    while i >= 0:
        keep.add(i)
        i = back[i]
    return set(range(n)) - keep


def check_structure(notebook: dict, lab: Lab) -> list[str]:
    """Raise Invalid unless notebook is this lab with its required cells in order; return notes on
    what was tolerated."""
    cells = notebook["cells"]
    ids = [c["id"] for c in cells]
    present = set(ids)
    required = [c.id for c in lab.cells]
    mine = {c.id for c in lab.cells}
    share = len(present & mine) / len(mine)
    for other, other_ids in lab.others:
        distinctive = other_ids - mine
        if distinctive and share < 0.5 and len(present & distinctive) / len(distinctive) > share:
            raise Invalid(f"a notebook of the {other!r} lab, not the {lab.name!r} lab "
                          f"({len(present & distinctive)} of its cells come from {other!r})")
    if share == 0 or not (present & (mine - {lab.parameters_id})):
        raise Invalid(f"none of its cells come from the {lab.name!r} lab: is this the right file?")
    if lab.parameters_id not in present:
        raise Invalid(f"missing parameters cell: the lab's cell '{lab.parameters_id}' (tagged `parameters`) was "
                      "deleted, so the grader cannot set budget, seed and device")
    missing = [c for c in lab.cells if c.id not in present]
    if missing:
        lab_ids = mine | {NOTE_ID}
        renamed, deleted = [], []
        for cell in missing:
            match = next((c for c in cells if c["id"] not in lab_ids and c.get("cell_type") == cell.cell_type and cell.anchor
                          and cell.anchor in [line.strip() for line in cell_source(c).split("\n")]), None)
            (renamed if match else deleted).append(f"'{cell.id}'" + (f" is now '{match['id']}'" if match else ""))
        parts = []
        if renamed:
            parts.append(f"renamed cells: {', '.join(renamed)} (a cell must keep the lab's id: put your work "
                         "back into the original cell)")
        if deleted:
            parts.append(f"deleted cells: {', '.join(deleted)} (restore them from the lab)")
        raise Invalid("; ".join(parts))
    order = [i for i in ids if i in mine]
    moved = _moved([required.index(i) for i in order])
    if moved:
        described = []
        for k in sorted(moved):
            position = required.index(order[k])
            before = required[position - 1] if position else None
            described.append(f"'{order[k]}'" + (f" (the lab has it right after '{before}')" if before else " (the lab has it first)"))
        raise Invalid(f"reordered cells: {', '.join(described)}; move them back to the lab's order")
    notes = []
    parameters_cell = cells[ids.index(lab.parameters_id)]
    if "parameters" not in parameters_cell.get("metadata", {}).get("tags", []):
        notes.append(f"the cell '{lab.parameters_id}' had lost its `parameters` tag; the grader restored it")
    return notes


@dataclass
class Submission:
    """A submitted file after validation: its notebook when valid, else the reason it is not."""
    name: str
    path: Path
    sha256: str = ""
    notebook: dict | None = None
    notes: list[str] = field(default_factory=list)
    invalid: str = ""


def validate_submission(path: Path, name: str, lab: Lab) -> Submission:
    """Read and validate one file (cheap, no code runs)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        return Submission(name, path, invalid=f"could not read the file: {err.strerror}")
    sha = hashlib.sha256(raw).hexdigest()
    try:
        notebook = read_notebook(raw)
        notes = check_structure(notebook, lab)
    except Invalid as err:
        return Submission(name, path, sha, invalid=str(err))
    return Submission(name, path, sha, notebook, notes)
