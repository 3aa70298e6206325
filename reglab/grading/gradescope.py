"""Grading: the same lab graded inside Gradescope, by the same code — the autograder bundle and its run.

    python -m reglab.grade gradescope-bundle dropout --out dropout_autograder.zip [--tests private/]

writes a zip to upload as a Gradescope "autograder" (Gradescope's autograder specification: the zip's
contents land in /autograder/source, `setup.sh` runs once when the image is built, `run_autograder`
runs for each submission with the student's files in /autograder/submission and must leave
/autograder/results/results.json). The bundle holds the course (package, solutions, project file),
the instructor's private tests, and a `run_autograder` that calls `python -m reglab.grade
gradescope-run LAB`: grade the submitted notebook with the usual grader, then write results.json from
the gradebook record (`reglab.grading.export.gradescope_results`), or a zero score with the reason
when there is nothing to grade.

Gradescope runs each submission in its own container, which is the isolation there: bubblewrap cannot
create its namespaces inside an unprivileged Docker container, so the run passes `--no-sandbox`.
"""
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

SOURCE = Path("/autograder/source")
SUBMISSION = Path("/autograder/submission")
RESULTS = Path("/autograder/results/results.json")
COURSE_FILES = ("pyproject.toml", "README.md")
COURSE_FOLDERS = ("reglab", "solutions")

SETUP_SH = """#!/usr/bin/env bash
# Runs once, when Gradescope builds the autograder image: Python, then the course and its dependencies.
set -euo pipefail
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install -q /autograder/source/course
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Runs for each submission: grade it with reglab's grader, write /autograder/results/results.json.
cd /autograder/source
REGLAB_BUDGET=ci exec /autograder/venv/bin/python -m reglab.grade gradescope-run {lab}{tests}
"""


def write_bundle(lab_name: str, repository: Path, out: Path, tests_dir: Path | None = None) -> Path:
    """The autograder zip for one lab: setup.sh, run_autograder, the course, the private tests."""
    out = Path(out)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bundle:
        def add(name: str, data: bytes, mode: int = 0o644):
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16            # a regular file with these permissions
            info.compress_type = zipfile.ZIP_DEFLATED
            bundle.writestr(info, data)

        for name in COURSE_FILES:
            add(f"course/{name}", (repository / name).read_bytes())
        for folder in COURSE_FOLDERS:
            for path in sorted((repository / folder).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and ".ipynb_checkpoints" not in path.parts:
                    add(f"course/{path.relative_to(repository).as_posix()}", path.read_bytes())
        tests = ""
        if tests_dir is not None:
            for path in sorted(Path(tests_dir).glob("*.py")):
                add(f"private/{path.name}", path.read_bytes())
            tests = " --tests /autograder/source/private"
        add("setup.sh", SETUP_SH.encode(), 0o755)
        add("run_autograder", RUN_AUTOGRADER.format(lab=lab_name, tests=tests).encode(), 0o755)
    return out


def zero_results(reason: str) -> dict:
    """results.json when nothing could be graded."""
    return {"score": 0.0, "execution_time": 0.0, "output": reason, "visibility": "visible", "tests": []}


def write_results(results: dict, path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def run(lab_name: str, tests_dir: str | None, submission_dir: Path = SUBMISSION, results_path: Path = RESULTS,
        extra: tuple[str, ...] = ("--no-sandbox",)) -> int:
    """Inside Gradescope: grade the one submitted notebook and write results.json (always)."""
    import tempfile
    from reglab.grading import cli
    from reglab.grading.export import gradescope_results, read_records
    from reglab.grading.gradebook import find_submissions
    from reglab.grading.lab import load_lab
    lab = load_lab(lab_name)
    found = find_submissions([str(submission_dir)]) if Path(submission_dir).is_dir() else []
    named = [(path, name) for path, name in found if path.name == lab.solution.name]
    chosen = named[:1] or (found if len(found) == 1 else [])
    if not chosen:
        names = ", ".join(path.name for path, _ in found) or "none"
        write_results(zero_results(f"Submit one notebook of the {lab.name} lab, named {lab.solution.name} "
                                   f"(notebooks found: {names})."), results_path)
        return 0
    with tempfile.TemporaryDirectory(prefix="reglab-gradescope-") as out:
        argv = [lab_name, str(chosen[0][0]), "--out", out, *extra] + (["--tests", tests_dir] if tests_dir else [])
        code = cli.main(argv)
        records = read_records(Path(out)) if (Path(out) / "results").is_dir() else {}
        if code != 0 or len(records) != 1:
            write_results(zero_results(f"the grader could not grade the submission (exit status {code})"), results_path)
            return 0
        write_results(gradescope_results(next(iter(records.values()))), results_path)
    return 0


def main(argv: list[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m reglab.grade gradescope-bundle|gradescope-run",
                                     description="Grade a lab inside Gradescope with the same code.")
    parser.add_argument("command", choices=["gradescope-bundle", "gradescope-run"])
    parser.add_argument("lab", help="the lab's short name (dropout, ...)")
    parser.add_argument("--out", metavar="ZIP", help="gradescope-bundle: the zip to write")
    parser.add_argument("--tests", metavar="DIR", help="folder of private test files to include / use")
    args = parser.parse_args(argv)
    from reglab.grading.paths import ROOT, find_solution, lab_name
    try:
        name = lab_name(find_solution(args.lab))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "gradescope-run":
        return run(name, args.tests)
    if not args.out:
        parser.error("gradescope-bundle needs --out ZIP")
    path = write_bundle(name, ROOT, Path(args.out), Path(args.tests) if args.tests else None)
    print(f"wrote {path}: upload it as the assignment's autograder in Gradescope "
          "(Configure Autograder -> Zip file upload)")
    return 0
