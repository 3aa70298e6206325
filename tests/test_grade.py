"""The grader (`python -m reglab.grade`): every bad or hostile submission gets a clear status and reason
and leaves the other rows and the gradebook intact; the solution gets full marks, the untouched lab zero,
and a classic mistake loses exactly the points of the checks it breaks.

Most cases run through one `grade` call with two workers on the toy lab in tests/grading/ (its checks:
tests/grading/toy_checks.py, its private test: tests/grading/private/), so the file does not depend on
the course's labs; the real labs are graded too once they exist.
"""
import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reglab.grading.generate import dumps, make_lab

ROOT = Path(__file__).resolve().parent.parent
GRADING = ROOT / "tests" / "grading"
TOY, QUIZ, PRIVATE = GRADING / "01_toy_lab.ipynb", GRADING / "02_quiz_lab.ipynb", GRADING / "private"
CHECK_IDS = ["toy.scale", "toy.drop_rate", "toy.p_zero_identity", "toy.keeps_shape"]
SLEEPER = str(1000 + os.getpid() % 1000)     # `sleep SLEEPER` marks the process the infinite loop leaves behind


def grade_cli(*args, timeout=900):
    """Run the grader as an instructor would; tests/grading is importable (toy_checks) in it and in kernels,
    and so is the reglab under test when the test run put it on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(GRADING)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return subprocess.run([sys.executable, "-m", "reglab.grade", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def read_rows(out: Path) -> dict:
    with open(out / "grades.csv", newline="", encoding="utf-8") as f:
        return {row["submission"]: row for row in csv.DictReader(f)}


def solution() -> dict:
    return json.loads(TOY.read_text(encoding="utf-8"))


def student_lab() -> dict:
    return make_lab(solution(), TOY.name)


def index_of(notebook: dict, cell_id: str) -> int:
    return [c["id"] for c in notebook["cells"]].index(cell_id)


def with_cell(notebook: dict, after: str, source: str, cell_id: str) -> dict:
    """A copy of notebook with a code cell the student added after the cell `after`."""
    notebook = copy.deepcopy(notebook)
    cell = {"cell_type": "code", "id": cell_id, "metadata": {}, "source": source, "outputs": [], "execution_count": None}
    notebook["cells"].insert(index_of(notebook, after) + 1, cell)
    return notebook


def edited(notebook: dict, cell_id: str, old: str, new: str) -> dict:
    notebook = copy.deepcopy(notebook)
    cell = notebook["cells"][index_of(notebook, cell_id)]
    assert old in cell["source"]
    cell["source"] = cell["source"].replace(old, new)
    return notebook


def without(notebook: dict, cell_id: str) -> dict:
    notebook = copy.deepcopy(notebook)
    del notebook["cells"][index_of(notebook, cell_id)]
    return notebook


def hostile_sources(out: Path, escape: Path) -> dict:
    return {
        "sys_exit": "import sys\nsys.exit(3)",
        "os_exit": "import os\nos._exit(0)",
        "kill_kernel": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "kill_runner": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "memory_bomb": ("import torch\n\ndef bomb():\n    chunks = []\n    while True:\n"
                        "        chunks.append(torch.empty(2**28))  # 1 GiB more each time\n\nbomb()"),
        "write_outside": (f"from pathlib import Path\nout = Path({str(out)!r})\n"
                          f"for target in [out / 'grades.csv', out / 'feedback' / 'solution.md', "
                          f"out / 'executed' / 'solution.ipynb', Path({str(escape)!r})]:\n"
                          "    try:\n        target.write_text('submission,status,score\\nsolution,invalid,999\\n')\n"
                          "    except OSError as err:\n        print('refused:', err)"),
        "fake_scores": ("print('Score: 5 / 5 -- all tests passed')\nfrom IPython.display import display\n"
                        "display({'application/vnd.reglab.result+json': {'score': 5, 'max_score': 5, 'status': 'graded'},"
                        " 'text/plain': 'score 5/5'}, raw=True)\n"
                        "from reglab.results import publish\npublish({'score': 5, 'toy.scale': 2})"),
        "monkeypatch": ("import torch\nimport reglab.checks as checks\n"
                        "torch.allclose = lambda *args, **kwargs: True\ntorch.equal = lambda *args, **kwargs: True\n"
                        "checks.check = lambda check_id, obj: print('passed', check_id)\ncheck = checks.check\n"
                        "forged = {'y': [1.0] * 4096}\n"
                        "def forge(spec):\n"
                        "    return spec.__class__(spec.id, spec.points, lambda obj: forged, lambda data: None, spec.summary)\n"
                        "for spec in list(checks.REGISTRY.values()):\n    checks.REGISTRY[spec.id] = forge(spec)\n"
                        "real_add = checks.add\nchecks.add = lambda spec: real_add(forge(spec))"),
    }


def build_submissions(folder: Path, out: Path) -> None:
    folder.mkdir(parents=True)
    lab, sol = student_lab(), solution()
    hostile = hostile_sources(out, folder.parent / "escaped.txt")
    notebooks = {
        "solution": sol,
        "lab": lab,
        "mistake": edited(sol, "dropout-function", "/ (1 - p)", "/ p"),
        "syntax_error": edited(sol, "dropout-function", "/ (1 - p)", "/ (1 - p"),
        "exception": with_cell(sol, "experiment", "raise RuntimeError('a bug in my experiment')", "my-bug"),
        "sys_exit": with_cell(sol, "dropout-function", hostile["sys_exit"], "my-exit"),
        "os_exit": with_cell(lab, "parameters", hostile["os_exit"], "my-exit"),
        "kill_kernel": with_cell(lab, "parameters", hostile["kill_kernel"], "my-kill"),
        "kill_runner": with_cell(lab, "parameters", hostile["kill_runner"], "my-kill"),
        "memory_bomb": with_cell(sol, "dropout-function", hostile["memory_bomb"], "my-bomb"),
        "write_outside": with_cell(sol, "experiment", hostile["write_outside"], "my-writes"),
        "fake_scores": with_cell(lab, "check-rate", hostile["fake_scores"], "my-fakes"),
        "monkeypatch": with_cell(lab, "setup", hostile["monkeypatch"], "my-patches"),
        "other_lab": make_lab(json.loads(QUIZ.read_text(encoding="utf-8")), QUIZ.name),
        "deleted_cell": without(lab, "check-rate"),
        "missing_parameters": without(lab, "parameters"),
    }
    renamed = copy.deepcopy(lab)
    renamed["cells"][index_of(renamed, "dropout-function")]["id"] = "my-dropout"
    reordered = copy.deepcopy(lab)
    i, j = index_of(reordered, "dropout-function"), index_of(reordered, "check-scale")
    reordered["cells"][i], reordered["cells"][j] = reordered["cells"][j], reordered["cells"][i]
    notebooks.update(renamed_cell=renamed, reordered_cells=reordered)
    for name, notebook in notebooks.items():
        (folder / f"{name}.ipynb").write_text(dumps(notebook), encoding="utf-8")
    (folder / "not_a_notebook.ipynb").write_text("import torch\nprint('my lab')\n", encoding="utf-8")
    (folder / "malformed_json.ipynb").write_text(dumps(lab)[:300], encoding="utf-8")
    (folder / "empty.ipynb").write_bytes(b"")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """One grading run of every case; returns (output folder, rows, the run's output)."""
    base = tmp_path_factory.mktemp("grading")
    out = base / "out"
    build_submissions(base / "submissions", out)
    run = grade_cli("tests/grading/01_toy_lab.ipynb", base / "submissions", "--out", out, "--workers", 2,
                    "--tests", PRIVATE, "--timeout", 240, "--memory-mb", 3072)
    assert run.returncode == 0, run.stdout + run.stderr
    return out, read_rows(out), run.stdout + run.stderr


def scores(row: dict) -> dict:
    return {check_id: row[check_id] for check_id in CHECK_IDS}


def test_solution_gets_full_marks(toy):
    _, rows, _ = toy
    assert rows["solution"]["status"] == "graded", rows["solution"]["reason"]
    assert (rows["solution"]["score"], rows["solution"]["max_score"]) == ("5", "5")
    assert scores(rows["solution"]) == {"toy.scale": "2", "toy.drop_rate": "1", "toy.p_zero_identity": "1",
                                        "toy.keeps_shape": "1"}


def test_untouched_lab_gets_zero_for_every_check(toy):
    out, rows, _ = toy
    assert rows["lab"]["status"] == "graded" and rows["lab"]["score"] == "0"
    assert set(scores(rows["lab"]).values()) == {"0"}
    assert "still raises NotImplementedError" in (out / "feedback" / "lab.md").read_text()


def test_classic_mistake_loses_exactly_the_checks_it_breaks(toy):
    out, rows, _ = toy
    # 1/p instead of 1/(1-p): wrong scale, and p = 0 divides by zero; the drop rate and shape stay right.
    assert scores(rows["mistake"]) == {"toy.scale": "0", "toy.drop_rate": "1", "toy.p_zero_identity": "0",
                                       "toy.keeps_shape": "1"}
    assert rows["mistake"]["score"] == "2"
    assert "scaled by 1/p = 4 instead of 1/(1-p)" in (out / "feedback" / "mistake.md").read_text()


def test_feedback_shows_hidden_and_private_checks_by_summary_only(toy):
    out, _, _ = toy
    text = (out / "feedback" / "mistake.md").read_text()
    assert "toy.p_zero_identity** (hidden test)" in text and "p = 0 returns the input unchanged" in text
    for secret in ("BEGIN HIDDEN", "probe_p_zero", "def ", "_reglab_grader_probes", "toy_private"):
        assert secret not in text
    executed = (out / "executed" / "mistake.ipynb").read_text()
    assert "_reglab_grader_probes" not in executed and "reglab.grading.probe" not in executed
    assert "toy.keeps_shape" not in executed


@pytest.mark.parametrize("name, reason", [
    ("not_a_notebook", "not a notebook: the file is not JSON (it begins 'import torch'"),
    ("malformed_json", "malformed JSON at line"),
    ("empty", "empty file"),
    ("other_lab", "a notebook of the 'quiz' lab, not the 'toy' lab"),
    ("deleted_cell", "deleted cells: 'check-rate'"),
    ("renamed_cell", "renamed cells: 'dropout-function' is now 'my-dropout'"),
    ("reordered_cells", "reordered cells: 'dropout-function' (the lab has it right after 'setup')"),
    ("missing_parameters", "missing parameters cell: the lab's cell 'parameters'"),
])
def test_invalid_submissions_are_refused_with_the_reason(toy, name, reason):
    out, rows, _ = toy
    assert rows[name]["status"] == "invalid"
    assert reason in rows[name]["reason"]
    assert rows[name]["score"] == "0" and set(scores(rows[name]).values()) == {""}
    assert reason in (out / "feedback" / f"{name}.md").read_text()
    assert not (out / "executed" / f"{name}.ipynb").exists()


def test_syntax_errors_and_exceptions_are_graded_with_the_cell_named(toy):
    out, rows, _ = toy
    assert rows["syntax_error"]["status"] == "graded" and rows["syntax_error"]["score"] == "0"
    assert "'dropout-function' (SyntaxError)" in rows["syntax_error"]["reason"]
    assert "`dropout` is not defined after running the notebook" in (out / "feedback" / "syntax_error.md").read_text()
    # An exception in an unrelated cell costs nothing: the cells after it still run.
    assert rows["exception"]["status"] == "graded" and rows["exception"]["score"] == "5"
    assert "'my-bug' (RuntimeError)" in rows["exception"]["reason"]


def test_sys_exit_is_an_error_and_the_rest_still_runs(toy):
    _, rows, _ = toy
    assert rows["sys_exit"]["status"] == "error"
    assert "cell 'my-exit' called sys.exit() (SystemExit: 3)" in rows["sys_exit"]["reason"]
    assert rows["sys_exit"]["score"] == "5"


@pytest.mark.parametrize("name", ["os_exit", "kill_kernel"])
def test_a_kernel_that_ends_itself_is_an_error(toy, name):
    _, rows, _ = toy
    assert rows[name]["status"] == "error"
    assert "the kernel died" in rows[name]["reason"]
    assert rows[name]["score"] == "0"


def test_killing_the_runner_is_an_error(toy):
    _, rows, _ = toy
    assert rows["kill_runner"]["status"] == "error"
    assert "the notebook's runner stopped" in rows["kill_runner"]["reason"] and "signal 9" in rows["kill_runner"]["reason"]


def test_a_memory_bomb_is_stopped_by_the_memory_cap(toy):
    _, rows, _ = toy
    assert rows["memory_bomb"]["status"] == "error"
    assert "out of memory in cell 'my-bomb'" in rows["memory_bomb"]["reason"]
    assert "3072 MB cap" in rows["memory_bomb"]["reason"]


def test_writing_outside_the_working_directory_corrupts_nothing(toy):
    out, rows, _ = toy
    assert rows["write_outside"]["status"] == "graded" and rows["write_outside"]["score"] == "5"
    assert rows["solution"]["score"] == "5"                      # the row it tried to overwrite
    assert "# Feedback on `solution`" in (out / "feedback" / "solution.md").read_text()
    assert json.loads((out / "executed" / "solution.ipynb").read_text())["cells"]
    assert not list(out.glob(".*.tmp"))                         # no temporary file left by the atomic writes


def test_printed_scores_and_fake_result_records_do_not_count(toy):
    _, rows, _ = toy
    assert rows["fake_scores"]["status"] == "graded" and rows["fake_scores"]["score"] == "0"
    assert set(scores(rows["fake_scores"]).values()) == {"0"}


def test_monkeypatching_torch_or_the_checks_does_not_pass(toy):
    out, rows, _ = toy
    assert rows["monkeypatch"]["status"] == "graded" and rows["monkeypatch"]["score"] == "0"
    executed = json.loads((out / "executed" / "monkeypatch.ipynb").read_text())
    printed = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
    assert "passed toy.scale" in printed                        # the kernel believed it; the grader did not
    assert "kept entries are x times 1" in (out / "feedback" / "monkeypatch.md").read_text()


def test_every_row_has_a_status_and_a_reason(toy):
    out, rows, _ = toy
    assert len(rows) == 21
    for name, row in rows.items():
        assert row["status"] in ("graded", "error", "timeout", "invalid"), name
        assert row["reason"].strip(), name
        assert row["max_score"] == "5", name
        assert (out / "feedback" / f"{name}.md").exists(), name


def sleepers() -> list[str]:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.split("\n")
    return [line for line in listing if line.strip() == f"sleep {SLEEPER}"]


def test_an_infinite_loop_times_out_kills_everything_and_keeps_the_other_rows(toy, tmp_path):
    out, before, _ = toy
    loop = with_cell(student_lab(), "parameters", "import subprocess\n"
                     f"subprocess.Popen(['sleep', '{SLEEPER}'], start_new_session=True)  # escapes the process group\n"
                     "while True:\n    pass", "my-loop")
    (tmp_path / "infinite_loop.ipynb").write_text(dumps(loop), encoding="utf-8")
    run = grade_cli(TOY, tmp_path / "infinite_loop.ipynb", out / ".." / "submissions" / "solution.ipynb",
                    "--out", out, "--tests", PRIVATE, "--timeout", 15)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = read_rows(out)
    assert rows["infinite_loop"]["status"] == "timeout"
    assert "timed out: cell 'my-loop' was still running after 15 s" in rows["infinite_loop"]["reason"]
    assert "skipped solution: already graded (5/5)" in run.stdout
    assert {k: v for k, v in rows.items() if k != "infinite_loop"} == before
    assert not sleepers(), "a process the notebook started outlived the grading"


def test_force_regrades_and_a_changed_file_is_regraded(toy, tmp_path):
    out, before, _ = toy
    empty = out / ".." / "submissions" / "empty.ipynb"
    run = grade_cli(TOY, empty, "--out", out, "--tests", PRIVATE)
    assert "skipped empty: already invalid" in run.stdout
    run = grade_cli(TOY, empty, "--out", out, "--tests", PRIVATE, "--force")
    assert "skipped" not in run.stdout and read_rows(out)["empty"] == before["empty"]


def test_self_check_runs_the_public_checks_only(tmp_path):
    notebook = tmp_path / "my_lab.ipynb"
    notebook.write_text(dumps(edited(student_lab(), "dropout-function", "raise NotImplementedError()",
                                     "return x * (torch.rand(x.shape, generator=generator) >= p) / p")))
    run = grade_cli("--self-check", notebook, "--lab", TOY, "--tests", PRIVATE)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAILED  toy.scale (2 pt): kept entries were scaled by 1/p = 4 instead of 1/(1-p)" in run.stdout
    assert "passed  toy.drop_rate (1 pt)" in run.stdout
    assert "public checks: 1 / 3 points" in run.stdout
    assert "p_zero" not in run.stdout and "keeps_shape" not in run.stdout


def test_bad_command_lines_are_refused_with_a_message(tmp_path):
    run = grade_cli("no_such_lab", tmp_path, "--out", tmp_path / "out")
    assert run.returncode == 2 and "unknown lab 'no_such_lab'" in run.stderr
    run = grade_cli(TOY, tmp_path / "missing.ipynb", "--out", tmp_path / "out", "--tests", PRIVATE)
    assert run.returncode == 2 and "no such file or folder" in run.stderr


def test_student_code_runs_as_another_user_when_the_grader_is_root(tmp_path):
    from reglab.grading.cli import sandbox_uid
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        pytest.skip("needs a root grader")
    uid = sandbox_uid("auto")                  # in the sandbox even a Python under /root runs as this uid
    target = tmp_path / "written-by-the-submission.txt"
    tmp_path.chmod(0o755)
    notebook = with_cell(student_lab(), "parameters", f"import os\nprint('uid', os.getuid())\n"
                         f"open({str(target)!r}, 'w').write('x')", "my-write")
    (tmp_path / "as_user.ipynb").write_text(dumps(notebook), encoding="utf-8")
    run = grade_cli(TOY, tmp_path / "as_user.ipynb", "--out", tmp_path / "out", "--tests", PRIVATE)
    assert run.returncode == 0, run.stdout + run.stderr
    reason = read_rows(tmp_path / "out")["as_user"]["reason"]
    assert "'my-write' (PermissionError)" in reason or "'my-write' (FileNotFoundError)" in reason   # not even visible
    assert f"uid {uid}" in (tmp_path / "out" / "executed" / "as_user.ipynb").read_text()
    assert not target.exists()


# every lab with checks, so each new answer cell (an open experiment's design, say) is graded full in the
# solution and zero in the untouched lab
REAL_LABS = [name for name in ["dropout", "weight_decay", "label_smoothing", "clipping", "stability", "capstone"]
             if (ROOT / "reglab" / "topics" / name / "checks.py").exists()
             and list((ROOT / "solutions").glob(f"*_{name}_lab.ipynb"))]


@pytest.mark.parametrize("name", REAL_LABS or [pytest.param("dropout", marks=pytest.mark.skip(reason="no dropout lab yet"))])
def test_a_real_lab_gives_the_solution_full_marks_and_the_lab_zero(name, tmp_path):
    solution_path = next((ROOT / "solutions").glob(f"*_{name}_lab.ipynb"))
    folder = tmp_path / "submissions"
    folder.mkdir()
    (folder / "solution.ipynb").write_bytes(solution_path.read_bytes())
    lab = make_lab(json.loads(solution_path.read_text(encoding="utf-8")), solution_path.name)
    (folder / "lab.ipynb").write_text(dumps(lab), encoding="utf-8")
    run = grade_cli(name, folder, "--out", tmp_path / "out", "--workers", 2, "--timeout", 300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = read_rows(tmp_path / "out")
    check_ids = [c for c in rows["solution"] if "." in c]
    assert rows["solution"]["status"] == "graded", rows["solution"]["reason"]
    assert rows["solution"]["score"] == rows["solution"]["max_score"] != "0"
    assert rows["lab"]["status"] == "graded" and {rows["lab"][c] for c in check_ids} == {"0"}


# each misconception of the stability lab, written into its solution: the checks it breaks, the points it loses
STABILITY_MISCONCEPTIONS = {
    "normalized_after": ("qk-norm-scores", "    q, k = q_norm(q), k_norm(k)",
                         "    return F.layer_norm(q @ k.transpose(-2, -1) / math.sqrt(k.size(-1)), (q.size(-2),))",
                         {"stability.qk_norm_scores", "stability.qk_norm_grads"}),
    "wrong_axis": ("z-loss", "torch.logsumexp(logits.float(), dim=-1)", "torch.logsumexp(logits.float(), dim=0)",
                   {"stability.z_loss", "stability.z_loss_grad", "stability.training_loss"}),
    "not_in_logged_loss": ("z-loss", "    return ce + z_loss(logits, coef)", "    return ce",
                           {"stability.training_loss"}),
}


def test_each_stability_misconception_loses_exactly_the_points_of_its_checks(tmp_path):
    from reglab.checks import get
    solution_path = next((ROOT / "solutions").glob("*_stability_lab.ipynb"))
    solution = json.loads(solution_path.read_text(encoding="utf-8"))
    folder = tmp_path / "submissions"
    folder.mkdir()
    for name, (cell_id, old, new, _) in STABILITY_MISCONCEPTIONS.items():
        notebook = copy.deepcopy(solution)
        cell = notebook["cells"][index_of(notebook, cell_id)]
        source = "".join(cell["source"])
        assert old in source, (name, old)
        cell["source"] = source.replace(old, new, 1)
        (folder / f"{name}.ipynb").write_text(dumps(notebook), encoding="utf-8")
    run = grade_cli("stability", folder, "--out", tmp_path / "out", "--workers", 2, "--timeout", 300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = read_rows(tmp_path / "out")
    for name, (_, _, _, broken) in STABILITY_MISCONCEPTIONS.items():
        row = rows[name]
        assert row["status"] == "graded", row["reason"]
        check_ids = [c for c in row if c.startswith("stability.")]
        assert {c for c in check_ids if row[c] == "0"} == broken, (name, row)
        lost = sum(get(c).points for c in broken)
        assert float(row["score"]) == float(row["max_score"]) - lost, (name, row)


@pytest.mark.parametrize("content, reason", [
    (b"PK\x03\x04\xff\xfe binary", "not a notebook: the file is not UTF-8 text"),
    (b'{"cells": [], "metadata": {}, "nbformat": 3, "nbformat_minor": 0}', "nbformat 3 notebook"),
    (b'{"a": 1}', "not a notebook: valid JSON, but without a notebook's 'nbformat' and 'cells'"),
    (b'{"cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [], "execution_count": null}],'
     b' "metadata": {}, "nbformat": 4, "nbformat_minor": 4}', "its cells have no ids (nbformat 4.4)"),
    (b"   \n", "empty file: only whitespace"),
])
def test_unreadable_files_are_named_for_what_they_are(content, reason):
    from reglab.grading.validate import Invalid, read_notebook
    with pytest.raises(Invalid) as caught:
        read_notebook(content)
    assert reason in str(caught.value)


def test_duplicated_cell_ids_are_refused():
    from reglab.grading.validate import Invalid, read_notebook
    lab = student_lab()
    lab["cells"][2]["id"] = lab["cells"][3]["id"]
    with pytest.raises(Invalid) as caught:
        read_notebook(dumps(lab).encode())
    assert f"cell ids '{lab['cells'][3]['id']}' appear more than once" in str(caught.value)


def test_a_lost_parameters_tag_is_restored_not_refused():
    sys.path.insert(0, str(GRADING))
    try:
        from reglab.grading.lab import load_lab
        from reglab.grading.run import prepare
        from reglab.grading.validate import check_structure
        lab = load_lab(str(TOY), PRIVATE)
    finally:
        sys.path.remove(str(GRADING))
    notebook = student_lab()
    notebook["cells"][index_of(notebook, "parameters")]["metadata"] = {}
    assert "lost its `parameters` tag" in check_structure(notebook, lab)[0]
    prepared = prepare(notebook, lab, Path("/nonexistent"))
    assert prepared["cells"][index_of(prepared, "parameters")]["metadata"]["tags"] == ["parameters"]
    assert prepared["cells"][-1]["id"] == "reglab-grader-probes"


@pytest.mark.parametrize("solution_path", sorted((ROOT / "solutions").glob("*_lab.ipynb")), ids=lambda p: p.stem)
def test_slider_cells_are_tagged_and_not_run_by_the_grader(solution_path):
    """A headless nbclient run can hang on a cell that opens widget comms (jupyter/nbclient#312): the
    grader empties every cell the solution tags `widget`, and every `interact(` cell carries that tag."""
    from reglab.grading.lab import WIDGET_SKIPPED, load_lab
    from reglab.grading.run import prepare
    notebook = json.loads(solution_path.read_text(encoding="utf-8"))
    sliders = {c["id"] for c in notebook["cells"] if c["cell_type"] == "code" and "interact(" in "".join(c["source"])}
    lab = load_lab(str(solution_path))
    assert sliders and lab.widget_ids == sliders
    prepared = prepare(make_lab(notebook, solution_path.name), lab, Path("/nonexistent"))
    sources = {c["id"]: "".join(c["source"]) for c in prepared["cells"]}
    assert all(sources[i] == WIDGET_SKIPPED for i in sliders)
    assert sum(s == WIDGET_SKIPPED for s in sources.values()) == len(sliders)


def test_folders_are_searched_but_not_the_output_folder(tmp_path):
    from reglab.grading.gradebook import find_submissions
    for path in ["alice/01_dropout_lab.ipynb", "bob.ipynb", "grades/executed/bob.ipynb", ".ipynb_checkpoints/x.ipynb"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("{}")
    found = find_submissions([str(tmp_path)], tmp_path / "grades")
    assert [name for _, name in found] == ["alice__01_dropout_lab", "bob"]


def test_the_lab_is_inferred_from_the_generated_note(tmp_path):
    from reglab.grading.lab import infer_lab
    from reglab.grading.paths import lab_name
    solutions = sorted((ROOT / "solutions").glob("*_lab.ipynb"))
    if not solutions:
        pytest.skip("no solutions yet")
    path = tmp_path / "my_work.ipynb"
    path.write_text(dumps(make_lab(json.loads(solutions[0].read_text()), solutions[0].name)))
    assert infer_lab(path) == lab_name(solutions[0])


def _toy_lab_and_probe_cell(workdir: Path):
    sys.path.insert(0, str(GRADING))
    try:
        from reglab.grading.lab import load_lab
        from reglab.grading.probe import probe_cell
        lab = load_lab(str(TOY), PRIVATE)
    finally:
        sys.path.remove(str(GRADING))
    return lab, probe_cell(lab, workdir)


@pytest.mark.parametrize("mistake, score", [(False, 5), (True, 2)])
def test_the_probe_cell_is_a_call_of_importable_code_whose_data_is_judged_here(tmp_path, mistake, score):
    """The appended cell calls reglab.grading.probe (no grader code pasted into the notebook); run here
    on the toy dropout, with and without the 1/p mistake, its file judges like a graded notebook."""
    import signal

    import torch

    from reglab.grading.judge import judge_all
    from reglab.grading.probe import PROBE_FILE, read_probe_results
    lab, cell = _toy_lab_and_probe_cell(tmp_path)
    assert len(cell["source"].strip().split("\n")) <= 4 and "def " not in cell["source"]
    (tmp_path / ".reglab-tests").mkdir()
    (tmp_path / ".reglab-tests" / "toy_private.py").write_bytes((PRIVATE / "toy_private.py").read_bytes())

    def dropout(x, p, generator=None):
        keep = torch.rand(x.shape, generator=generator) >= p
        return x * keep / (p if mistake else 1 - p)

    namespace, alarm, path = {"dropout": dropout}, signal.getsignal(signal.SIGALRM), list(sys.path)
    try:
        exec(cell["source"], namespace)
    finally:
        signal.signal(signal.SIGALRM, alarm)
        sys.path[:] = path                          # the probe puts the private tests' folder on it
    assert set(namespace) == {"dropout", "__builtins__"}          # the cell leaves no name behind
    verdicts = judge_all(lab, *read_probe_results(tmp_path / PROBE_FILE))
    assert sum(v.earned for v in verdicts) == score
    assert [v.check.id for v in verdicts if not v.passed] == ([] if not mistake else ["toy.scale", "toy.p_zero_identity"])


def test_a_probe_that_runs_past_its_time_is_stopped_and_judged_a_failure(tmp_path):
    import signal

    from reglab.grading.judge import judge_all
    from reglab.grading.probe import PROBE_FILE, read_probe_results, run_probes
    lab, _ = _toy_lab_and_probe_cell(tmp_path)

    def dropout(x, p, generator=None):
        while True:
            pass

    plan = [[c.id, c.object_name, c.kind] for c in lab.checks if c.kind == "public"][:1]
    alarm = signal.getsignal(signal.SIGALRM)
    try:
        run_probes({"dropout": dropout}, plan, str(tmp_path), [], str(tmp_path / PROBE_FILE), 0.2)
    finally:
        signal.signal(signal.SIGALRM, alarm)
    results, why = read_probe_results(tmp_path / PROBE_FILE)
    assert results == {plan[0][0]: {"error": "ProbeTimeout", "message": ""}}
    assert "ran longer than 60 s" in judge_all(lab, results, why)[0].message
