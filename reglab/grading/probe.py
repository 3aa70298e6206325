"""Grading room, the probe: the grader's only code in the student's kernel, the cell that calls it, and reading its data back.

The grader appends one cell to the submission, a call of `run_probes` (see `probe_cell`). In the
kernel, after the student's code, it runs each check's probe on the student's object and writes the
JSON data to a file; the grader reads that file back (`read_probe_results`, size-capped) and judges the
data in its own process (`reglab.grading.judge`). The kernel can patch anything it imports, this module
included, so nothing here is trusted: a forged probe or forged data only reaches a judge that decides
from the data alone. This module imports nothing of the grader, so the kernel can import it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

PROBE_CELL_ID = "reglab-grader-probes"
PROBE_FILE = ".reglab-probes.json"
PRIVATE_DIR = ".reglab-tests"
PROBE_SECONDS = 60                    # one probe may run this long before it counts as hanging
MAX_PROBE_FILE_BYTES = 16 * 2**20


class ProbeTimeout(BaseException):
    """A probe ran past its time (a BaseException, so that the student's `except Exception` cannot swallow it)."""


def _on_alarm(signum, frame):
    raise ProbeTimeout()


def _load_private_tests(private_dir: str, private_files: list[str]) -> None:
    """Import the instructor's test files copied beside the notebook (they register the private checks)."""
    sys.path.insert(0, private_dir)
    for file in private_files:
        module_name = "reglab_private_tests." + file[:-3]
        try:
            spec = importlib.util.spec_from_file_location(module_name, os.path.join(private_dir, file))
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except BaseException:
            pass


def _probe_one(probe, obj, seconds: float, alarm: bool) -> dict:
    """One check's entry: {"data": ...}, or {"error": kind, "message": ...} whatever the student's object does."""
    try:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            data = probe(obj)
        finally:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            json.dumps(data, allow_nan=True)
            return {"data": data}
        except BaseException:
            return {"error": "ProbeDataError", "message": "the probe returned data that is not JSON"}
    except ProbeTimeout:
        return {"error": "ProbeTimeout", "message": ""}
    except BaseException as err:
        try:
            return {"error": type(err).__name__, "message": str(err)[:500]}
        except BaseException:
            return {"error": "Exception", "message": ""}


def run_probes(namespace: dict, plan: list, private_dir: str, private_files: list[str], out_path: str,
               seconds: float) -> None:
    """In the kernel: probe namespace[object name] for each (check id, object name, kind) of the plan and
    write {"results": {check id: entry}} to out_path (atomically). Private test files are imported only
    after every public probe ran."""
    import reglab.checks as checks

    try:
        signal.signal(signal.SIGALRM, _on_alarm)
        alarm = True
    except (ValueError, OSError):
        alarm = False
    results, private_loaded = {}, False
    for check_id, name, kind in plan:
        if kind == "private" and not private_loaded:
            private_loaded = True
            _load_private_tests(private_dir, private_files)
        try:
            probe = checks.get(check_id).probe
        except BaseException as err:
            results[check_id] = {"unavailable": type(err).__name__}
            continue
        results[check_id] = _probe_one(probe, namespace[name], seconds, alarm) if name in namespace else {"missing": name}
    with open(out_path + ".part", "w", encoding="utf-8") as f:
        json.dump({"results": results}, f, allow_nan=True)
    os.replace(out_path + ".part", out_path)


def probe_cell(lab, workdir: Path) -> dict:
    """The cell the grader appends to a submission (a `reglab.grading.lab.Lab`): a call of `run_probes`."""
    plan = [[c.id, c.object_name, c.kind] for c in lab.checks]
    arguments = [plan, str(workdir / PRIVATE_DIR), [p.name for p in lab.private_files], str(workdir / PROBE_FILE),
                 PROBE_SECONDS]
    source = ("# Appended by the reglab grader: probe the notebook's objects; the grader judges the data elsewhere.\n"
              "from reglab.grading.probe import run_probes as _reglab_grader_probes\n"
              f"_reglab_grader_probes(globals(), {', '.join(map(repr, arguments))})\n"
              "del _reglab_grader_probes\n")
    return {"cell_type": "code", "id": PROBE_CELL_ID, "metadata": {"tags": ["reglab-grader"]},
            "source": source, "outputs": [], "execution_count": None}


def read_probe_results(path: Path) -> tuple[dict | None, str]:
    """In the grader: the probe file's per-check entries, or None and why it could not be used."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROBE_FILE_BYTES + 1)
    except OSError:
        return None, "the grader's probe cell wrote no results"
    if len(raw) > MAX_PROBE_FILE_BYTES:
        return None, f"the probe results exceed {MAX_PROBE_FILE_BYTES // 2**20} MB"
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, "the probe results are not valid JSON"
    if not isinstance(parsed, dict) or not isinstance(parsed.get("results"), dict):
        return None, "the probe results do not have the grader's layout"
    return parsed["results"], ""
