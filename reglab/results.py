"""Core: a lab's key figures as a machine-readable record, published from the notebook and read back from it.

`publish(record)` displays a JSON object under the MIME type `application/vnd.reglab.result+json`;
the grader, the benchmark and the README's figures read it back from the executed notebook with
`read_results`. Non-finite floats become None (JSON has no NaN); keys must be strings.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

MIME = "application/vnd.reglab.result+json"


def to_json_safe(value, path="record"):
    """A copy of value with tuples as lists, NumPy/torch scalars as Python numbers and NaN/inf as None."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path} has a non-string key {key!r}; JSON objects need string keys")
            out[key] = to_json_safe(item, f"{path}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json_safe(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if hasattr(value, "item") and callable(value.item):      # NumPy or torch scalar
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"{path} is a {type(value).__name__}; a result record holds numbers, strings, lists and dicts")


def publish(record: dict) -> dict:
    """Display record as this notebook's result (and a readable text version); returns the safe copy."""
    from IPython.display import display
    if not isinstance(record, dict):
        raise TypeError(f"a result record is a dict, got {type(record).__name__}")
    safe = to_json_safe(record)
    display({MIME: safe, "text/plain": "reglab result record:\n" + json.dumps(safe, indent=1)}, raw=True)
    return safe


def read_results(notebook) -> dict:
    """Merge every result record in an executed notebook (a path or an nbformat node), later keys winning."""
    if isinstance(notebook, (str, Path)):
        notebook = json.loads(Path(notebook).read_text(encoding="utf-8"))
    merged = {}
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            record = output.get("data", {}).get(MIME)
            if isinstance(record, dict):
                merged.update(record)
    return merged
