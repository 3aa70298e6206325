"""Grading a whole class: the Dask cluster path, the exports (Gradescope, Canvas, per-student CSV), the
roster's errors, the Gradescope bundle, and the labs as nbgrader source notebooks.

The cluster tests grade the toy lab of tests/grading (seconds a submission); the export tests build
gradebook records directly, without running anything."""
from __future__ import annotations

import csv
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import cloudpickle
import pytest

from reglab.grading import cluster, export, gradescope
from reglab.grading.cli import worker_failed
from reglab.grading.gradebook import Gradebook
from reglab.grading.judge import Verdict
from reglab.grading.lab import PlannedCheck, load_lab
from reglab.grading.nbgrader import nbgrader_source
from reglab.grading.paths import SOLUTIONS
from reglab.grading.run import Graded, Options
from reglab.grading.validate import Submission

ROOT = Path(__file__).resolve().parent.parent
GRADING = ROOT / "tests" / "grading"
TOY, PRIVATE = GRADING / "01_toy_lab.ipynb", GRADING / "private"
sys.path.insert(0, str(GRADING))
import toy_checks  # noqa: E402,F401  (registers the toy lab's checks, for load_lab of the toy lab here)
cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the fake tasks below travel to Dask workers


def grade_cli(*args, timeout=600, **popen):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(GRADING)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return subprocess.run([sys.executable, "-m", "reglab.grade", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **popen)


def read_rows(out: Path) -> dict:
    with open(out / "grades.csv", newline="", encoding="utf-8") as f:
        return {row["submission"]: row for row in csv.DictReader(f)}


def submissions(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    text = TOY.read_text(encoding="utf-8")
    for i in range(n):
        (folder / f"s{i}.ipynb").write_text(text if i != 1 else text.replace("/ (1 - p)", "/ p"),
                                            encoding="utf-8")
    return folder


# --- the cluster ------------------------------------------------------------------------------------

def test_a_local_cluster_gives_the_process_pools_gradebook_row_for_row(tmp_path):
    subs = submissions(tmp_path / "subs", 3)
    pool = grade_cli(TOY, subs, "--out", tmp_path / "pool", "--workers", 2, "--tests", PRIVATE)
    dask = grade_cli(TOY, subs, "--out", tmp_path / "dask", "--workers", 2, "--tests", PRIVATE, "--scheduler", "local")
    assert pool.returncode == 0 and dask.returncode == 0, pool.stderr[-2000:] + dask.stderr[-2000:]
    assert "on the Dask cluster local" in dask.stdout
    by_pool, by_dask = read_rows(tmp_path / "pool"), read_rows(tmp_path / "dask")
    assert sorted(by_pool) == sorted(by_dask) == ["s0", "s1", "s2"]
    timeless = lambda row: {k: v for k, v in row.items() if k != "reason"}   # the reason quotes seconds
    assert [timeless(by_pool[n]) for n in sorted(by_pool)] == [timeless(by_dask[n]) for n in sorted(by_dask)]
    assert by_dask["s0"]["score"] == "5" and by_dask["s1"]["score"] != "5"    # the 1/p mistake loses points
    records = export.read_records(tmp_path / "dask")
    assert sorted(records) == ["s0", "s1", "s2"] and records["s0"]["lab"] == "toy"


def _graded(submission, lab, options, private):
    return Graded(submission.name, "graded", "fake", [Verdict(c, c.points, "") for c in lab.checks],
                  submission.sha256, 0.1)


def flaky_task(submission, lab, options, private, marker: Path):
    """Kills its worker process the first time it runs a submission, then grades it (a fake grade)."""
    if not (marker / submission.name).exists():
        (marker / submission.name).touch()
        os._exit(1)
    return _graded(submission, lab, options, private)


def poison_task(submission, lab, options, private):
    """Kills every worker that runs the submission named 'poison'."""
    if submission.name == "poison":
        os._exit(1)
    return _graded(submission, lab, options, private)


def fake_todo(names) -> list:
    return [Submission(name, Path(f"{name}.ipynb"), sha256=f"{i:064x}", notebook={}) for i, name in enumerate(names)]


def test_a_worker_killed_mid_task_leaves_every_row_present_once(tmp_path):
    lab = load_lab(str(TOY))
    results = list(cluster.grade_many(fake_todo(["a", "b", "c"]), lab, Options(), "local", 2, worker_failed,
                                      task=functools.partial(flaky_task, marker=tmp_path)))
    assert sorted(g.name for g in results) == ["a", "b", "c"]             # each once
    assert [(g.status, g.score) for g in results] == [("graded", lab.max_score)] * 3, [g.reason for g in results]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]   # each task did kill a worker


def test_a_submission_that_kills_every_worker_ends_error_and_the_rest_are_graded(tmp_path):
    lab = load_lab(str(TOY))
    results = {g.name: g for g in cluster.grade_many(fake_todo(["ok", "poison"]), lab, Options(), "local", 2,
                                                     worker_failed, task=poison_task)}
    assert results["ok"].status == "graded"
    assert results["poison"].status == "error"
    assert f"killed {cluster.ALLOWED_FAILURES + 1} Dask workers" in results["poison"].reason
    assert all(v.earned is None for v in results["poison"].verdicts)


def test_the_cluster_grader_killed_mid_run_resumes(tmp_path):
    subs = submissions(tmp_path / "subs", 3)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(GRADING)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    grader = subprocess.Popen([sys.executable, "-m", "reglab.grade", str(TOY), str(subs), "--out", str(out),
                               "--workers", "1", "--scheduler", "local", "--tests", str(PRIVATE)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in grader.stdout:                 # wait for the first graded row, then stop the grader
            if line.startswith("[1/3]"):
                grader.send_signal(signal.SIGTERM)
                break
        grader.wait(timeout=120)
    finally:
        if grader.poll() is None:
            grader.kill()
    first = read_rows(out)
    assert 1 <= len(first) < 3
    rerun = grade_cli(TOY, subs, "--out", out, "--workers", 1, "--scheduler", "local", "--tests", PRIVATE)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert all(f"skipped {name}" in rerun.stdout for name in first)
    assert sorted(read_rows(out)) == ["s0", "s1", "s2"]


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path):
    run = grade_cli(TOY, TOY, "--out", tmp_path / "out", "--scheduler", "tcp://127.0.0.1:9", "--tests", PRIVATE,
                    timeout=120)
    assert run.returncode != 0
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in run.stderr + run.stdout


# --- exports ------------------------------------------------------------------------------------------

CHECKS = (PlannedCheck("toy.scale", "Dropout", 2, "kept entries are scaled", "public"),
          PlannedCheck("toy.hidden", "Dropout", 1, "a hidden case", "hidden"),
          PlannedCheck("toy.private", "Dropout", 1, "an instructor's case", "private"))


class FakeLab:
    name, checks, max_score = "toy", CHECKS, 4


def gradebook(out: Path) -> Path:
    book = Gradebook(out, FakeLab())
    book.record(Graded("alice", "graded", "ran", [Verdict(CHECKS[0], 2, ""), Verdict(CHECKS[1], 0, "wrong at p=0"),
                                                   Verdict(CHECKS[2], 1, "")], "a" * 64, 12.34))
    book.record(Graded("bob", "timeout", "timed out", [Verdict(c, None, "not run") for c in CHECKS], "b" * 64, 300.0))
    return out


def roster(path: Path, rows: list[str], header: str = "submission,student,id,sis_user_id,sis_login_id,section") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


ROSTER = ["alice,\"Liddell, Alice\",1001,A1,alice,S1", "bob,Bob,1002,,,S2", ",Carol,1003,,,S1"]


def test_gradescope_results_follow_the_autograder_specification(tmp_path):
    out = gradebook(tmp_path)
    written = export.export(out, "gradescope")
    assert sorted(p.parent.name for p in written) == ["alice", "bob"]
    results = json.loads((out / "gradescope" / "alice" / "results.json").read_text())
    assert isinstance(results["score"], float) and results["score"] == 3.0
    assert isinstance(results["execution_time"], float) and isinstance(results["output"], str)
    assert [t["name"] for t in results["tests"]] == ["toy.scale", "toy.hidden", "toy.private"]
    allowed = {"visible", "hidden", "after_due_date", "after_published"}
    for test in results["tests"]:
        assert set(test) >= {"name", "score", "max_score", "status", "output", "visibility"}
        assert isinstance(test["score"], float) and isinstance(test["max_score"], float)
        assert test["status"] in ("passed", "failed") and test["visibility"] in allowed
    assert [t["visibility"] for t in results["tests"]] == ["visible", "after_published", "after_published"]
    assert results["tests"][1] == {"name": "toy.hidden", "score": 0.0, "max_score": 1.0, "status": "failed",
                                   "output": "wrong at p=0", "visibility": "after_published"}
    bob = json.loads((out / "gradescope" / "bob" / "results.json").read_text())
    assert bob["score"] == 0.0 and all(t["status"] == "failed" for t in bob["tests"])


def test_canvas_csv_has_canvas_header_and_every_roster_student(tmp_path):
    out = gradebook(tmp_path)
    [path] = export.export(out, "canvas", roster(tmp_path / "roster.csv", ROSTER), "Toy lab (17)")
    rows = list(csv.reader(path.open(encoding="utf-8")))
    assert rows[0] == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", "Toy lab (17)"]
    assert rows[1][0] == "Points Possible" and rows[1][5] == "4"
    assert rows[2] == ["Liddell, Alice", "1001", "A1", "alice", "S1", "3"]
    assert rows[3] == ["Bob", "1002", "", "", "S2", "0"] and rows[4] == ["Carol", "1003", "", "", "S1", "0"]


def test_csv_export_lists_missing_students_with_score_zero(tmp_path):
    out = gradebook(tmp_path)
    [path] = export.export(out, "csv", roster(tmp_path / "roster.csv", ROSTER))
    rows = {r["student_id"]: r for r in csv.DictReader(path.open(encoding="utf-8"))}
    assert list(next(csv.reader(path.open()))) == ["student_id", "student", "submission", "status", "score", "max_score",
                                                    "percent", "toy.hidden", "toy.private", "toy.scale"]
    assert rows["1001"]["status"] == "graded" and rows["1001"]["percent"] == "75.0" and rows["1001"]["toy.hidden"] == "0"
    assert rows["1002"]["status"] == "timeout" and rows["1002"]["toy.scale"] == ""
    assert rows["1003"]["status"] == "missing" and rows["1003"]["score"] == "0" and rows["1003"]["submission"] == ""
    [bare] = export.export(out, "csv", destination=tmp_path / "bare.csv")      # no roster: one row per submission
    assert [r["submission"] for r in csv.DictReader(bare.open())] == ["alice", "bob"]


@pytest.mark.parametrize("rows, header, message", [
    (["alice,A,1", "bob,B,2", "carol,C,3"], None, "names no student for 0"),
    (["alice,A,1"], None, "names no student for 1 graded submission(s): bob"),
    (["alice,A,1", "bob,B,1"], None, "student id 1 is listed twice (also on line 2)"),
    (["alice,A,1", "alice,B,2", "bob,C,3"], None, "submission 'alice' is claimed twice"),
    (["alice,1", "bob,2"], "submission,id", "has no column student"),
    (["alice,A,", "bob,B,2"], None, "the student 'A' has no id"),
])
def test_bad_rosters_get_a_clear_error(tmp_path, rows, header, message):
    out = gradebook(tmp_path)
    path = roster(tmp_path / "roster.csv", rows, header or "submission,student,id")
    if message.startswith("names no student for 0"):        # 'carol' has no submission: that is fine
        export.export(out, "csv", path)
        return
    with pytest.raises(export.ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export.export(out, "csv", path)


def test_export_command_line_errors_name_the_problem(tmp_path):
    run = grade_cli("export", tmp_path, "--format", "canvas", timeout=120)
    assert run.returncode == 2 and "holds no gradebook records" in run.stderr
    gradebook(tmp_path)
    run = grade_cli("export", tmp_path, "--format", "canvas", timeout=120)
    assert run.returncode == 2 and "--format canvas needs --roster" in run.stderr


# --- Gradescope, inside ----------------------------------------------------------------------------

def test_the_gradescope_bundle_holds_setup_run_and_the_course(tmp_path):
    path = gradescope.write_bundle("dropout", ROOT, tmp_path / "bundle.zip", PRIVATE)
    with zipfile.ZipFile(path) as bundle:
        names = set(bundle.namelist())
        run = bundle.read("run_autograder").decode()
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in bundle.infolist()}
    assert {"setup.sh", "run_autograder", "course/pyproject.toml", "course/reglab/grading/cli.py",
            "course/solutions/01_dropout_lab.ipynb", "private/toy_private.py"} <= names
    assert not any("__pycache__" in n or n.startswith("course/tests/") for n in names)
    assert modes["setup.sh"] == modes["run_autograder"] == 0o755
    assert "-m reglab.grade gradescope-run dropout --tests /autograder/source/private" in run


def test_gradescope_run_without_a_notebook_writes_a_zero_score(tmp_path):
    (tmp_path / "submission").mkdir()
    (tmp_path / "submission" / "notes.txt").write_text("no notebook")
    assert gradescope.run("dropout", None, tmp_path / "submission", tmp_path / "results.json") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["score"] == 0.0 and "named 01_dropout_lab.ipynb" in results["output"]


# --- nbgrader -------------------------------------------------------------------------------------

def _cell(notebook, cell_id):
    return next(c for c in notebook["cells"] if c["id"] == cell_id)


def test_nbgrader_metadata_marks_answers_tests_and_read_only_cells():
    solution = json.loads((SOLUTIONS / "01_dropout_lab.ipynb").read_text(encoding="utf-8"))
    source = nbgrader_source(solution, "01_dropout_lab.ipynb")
    metas = [c["metadata"]["nbgrader"] for c in source["cells"]]
    assert all(m["schema_version"] == 3 and m["grade_id"] == c["id"] for m, c in zip(metas, source["cells"]))
    assert len({m["grade_id"] for m in metas}) == len(metas)                   # nbgrader needs unique ids
    tests = [m for m in metas if m["grade"] and not m["solution"]]
    answers = [m for m, c in zip(metas, source["cells"]) if m["solution"] and c["cell_type"] == "code"]
    assert tests and answers and all(m["locked"] for m in tests) and not any(m["locked"] for m in answers)
    lab = load_lab("dropout")
    assert sum(m["points"] for m in tests) == lab.max_score                    # the same points as our grader
    assert "nbgrader" not in solution["cells"][0].get("metadata", {})          # the input is not modified


@pytest.mark.skipif(importlib.util.find_spec("nbgrader") is None, reason="nbgrader is not installed")
def test_nbgrader_autogrades_the_solution_full_and_the_stub_zero(tmp_path):
    course = tmp_path / "course"
    assert subprocess.run([sys.executable, "-m", "reglab.labs", "--nbgrader", str(course)], cwd=ROOT,
                          capture_output=True).returncode == 0
    (course / "nbgrader_config.py").write_text(f"c = get_config()\nc.CourseDirectory.root = {str(course)!r}\n"
                                              "c.ExecutePreprocessor.timeout = 300\n")
    env = {**os.environ, "REGLAB_BUDGET": "ci", "REGLAB_PROGRESS": "0",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    nbgrader = lambda *a: subprocess.run([sys.executable, "-m", "nbgrader", *a], cwd=course, env=env,
                                         capture_output=True, text=True, timeout=900)
    made = nbgrader("generate_assignment", "dropout", "--force")
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    for student, source in (("sol", course / "source"), ("stub", course / "release")):
        (course / "submitted" / student / "dropout").mkdir(parents=True)
        (course / "submitted" / student / "dropout" / "01_dropout_lab.ipynb").write_bytes(
            (source / "dropout" / "01_dropout_lab.ipynb").read_bytes())
        nbgrader("db", "student", "add", student)
    graded = nbgrader("autograde", "dropout", "--force")
    assert graded.returncode == 0, graded.stdout[-2000:] + graded.stderr[-2000:]
    from nbgrader.api import Gradebook as NbgraderGradebook
    with NbgraderGradebook(f"sqlite:///{course / 'gradebook.db'}") as book:
        sol, stub = book.find_submission("dropout", "sol"), book.find_submission("dropout", "stub")
        assert sol.code_score == sol.max_code_score == load_lab("dropout").max_score
        assert stub.code_score == 0
