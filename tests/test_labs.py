"""The lab generator: stubs for solutions, hidden tests removed, outputs cleared, and a staleness check."""
import json
import subprocess
import sys

import pytest

from reglab.grading import generate as labs
from reglab.grading import paths


def _cell(source, cell_type="code", tags=None, cell_id=None):
    cell = {"cell_type": cell_type, "id": cell_id or f"c{abs(hash(source)) % 10**8}", "metadata": {}, "source": source}
    if tags:
        cell["metadata"]["tags"] = tags
    if cell_type == "code":
        cell.update(outputs=[{"output_type": "stream", "name": "stdout", "text": "hi"}], execution_count=3)
    return cell


def _notebook(*cells):
    return {"cells": list(cells), "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                              "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


SOLUTION = _notebook(
    _cell("budget = 'auto'", tags=["parameters"]),
    _cell("def f(x):\n    \"\"\"Double x.\"\"\"\n    ### BEGIN SOLUTION\n    y = 2 * x\n    return y\n    ### END SOLUTION\n"),
    _cell("check('lab.f', f)\n### BEGIN HIDDEN TESTS\ncheck('lab.hidden', f)\n### END HIDDEN TESTS", tags=["raises-in-lab"]),
    _cell("### BEGIN HIDDEN TESTS\nsecret = 1\n### END HIDDEN TESTS"),
    _cell("Why?\n\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION", cell_type="markdown"),
)


def test_solution_code_becomes_an_indented_stub():
    lab = labs.make_lab(SOLUTION, "01_x_lab.ipynb")
    source = lab["cells"][2]["source"]
    assert "    # YOUR CODE HERE\n    raise NotImplementedError()" in source
    assert "2 * x" not in source and "BEGIN SOLUTION" not in source and '"""Double x."""' in source


def test_hidden_tests_are_removed_and_empty_cells_dropped():
    lab = labs.make_lab(SOLUTION, "01_x_lab.ipynb")
    text = json.dumps(lab)
    assert "hidden" not in text and "secret" not in text
    assert len(lab["cells"]) == len(SOLUTION["cells"])   # note added, hidden-only cell dropped


def test_markdown_answers_become_placeholders_and_outputs_are_cleared():
    lab = labs.make_lab(SOLUTION, "01_x_lab.ipynb")
    assert lab["cells"][-1]["source"] == "Why?\n\n*Your answer here.*"
    code = [c for c in lab["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert SOLUTION["cells"][1]["outputs"], "the input must not be modified"


def test_cells_that_call_student_code_expect_an_exception_in_the_lab():
    lab = labs.make_lab(SOLUTION, "01_x_lab.ipynb")
    assert lab["cells"][3]["metadata"]["tags"] == ["raises-exception"]
    assert lab["cells"][0]["id"] == labs.NOTE_ID and "Student version" in lab["cells"][0]["source"]


@pytest.mark.parametrize("source,message", [
    ("### BEGIN SOLUTION\nx = 1\n", "is never closed"),
    ("x = 1\n### END SOLUTION\n", "without an opening marker"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside an open region"),
])
def test_unbalanced_markers_are_refused_with_the_cell(source, message):
    with pytest.raises(labs.LabSourceError, match=message) as info:
        labs.make_lab(_notebook(_cell(source, cell_id="broken")), "01_x_lab.ipynb")
    assert "01_x_lab.ipynb, cell 0 (broken)" in str(info.value)


def test_check_catches_a_stale_missing_or_orphan_lab(tmp_path):
    solutions, lab_dir = tmp_path / "solutions", tmp_path / "labs"
    solutions.mkdir()
    (solutions / "01_x_lab.ipynb").write_text(json.dumps(SOLUTION))
    assert labs.stale_labs(solutions, lab_dir) == ["labs/01_x_lab.ipynb is missing"]
    labs.write_labs(solutions, lab_dir)
    assert labs.stale_labs(solutions, lab_dir) == []
    edited = json.loads(json.dumps(SOLUTION))
    edited["cells"][0]["source"] = "budget = 'ci'"
    (solutions / "01_x_lab.ipynb").write_text(json.dumps(edited))
    assert labs.stale_labs(solutions, lab_dir) == ["labs/01_x_lab.ipynb differs from what solutions/01_x_lab.ipynb generates"]
    (lab_dir / "02_orphan_lab.ipynb").write_text("{}")
    assert "labs/02_orphan_lab.ipynb has no solution in solutions/" in labs.stale_labs(solutions, lab_dir)


def test_the_repository_labs_are_up_to_date():
    result = subprocess.run([sys.executable, "-m", "reglab.labs", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lab_names_and_lookup():
    assert paths.lab_name(paths.SOLUTIONS / "01_dropout_lab.ipynb") == "dropout"
    assert paths.lab_name(paths.SOLUTIONS / "02_weight_decay_lab.ipynb") == "weight_decay"
    with pytest.raises(ValueError, match="unknown lab 'nope'; the labs are"):
        paths.find_solution("nope")
