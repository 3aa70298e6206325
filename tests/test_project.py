"""Repository hygiene: clean notebooks, one parameters cell, and set-up files that agree."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for folder in ("notebooks", "solutions", "labs") for p in (ROOT / folder).glob("*.ipynb"))
ALLOWED_NB_METADATA = {"kernelspec", "language_info"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_is_committed_clean(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert set(nb["metadata"]) <= ALLOWED_NB_METADATA, f"stray notebook metadata {set(nb['metadata']) - ALLOWED_NB_METADATA}"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    ids = [c.get("id") for c in nb["cells"]]
    assert all(ids) and len(ids) == len(set(ids)), "every cell needs a unique id"
    for cell in nb["cells"]:
        assert set(cell.get("metadata", {})) <= {"tags"}, f"cell {cell['id']} has stray metadata {cell['metadata']}"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {cell['id']} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_opens_with_a_parameters_cell_then_one_setup_cell(path):
    cells = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged == [0], "the first code cell, and only it, is tagged 'parameters'"
    params = "".join(cells[0]["source"])
    for name in ("budget", "seed", "device"):
        assert re.search(rf"^{name}\s*=", params, re.M), f"parameters cell lacks {name}"
    assert "start(budget, seed, device)" in "".join(cells[1]["source"]), "the second code cell is the setup cell"


def _requirements(text):
    return sorted(re.sub(r"\s+", "", r) for r in text)


def test_environment_yml_lists_the_same_packages_as_pyproject():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    env = (ROOT / "environment.yml").read_text()
    pip_section = env.split("- pip:", 1)[1]
    pip_lines = re.findall(r"^\s+- ([A-Za-z][\w.-]*[<>=!~].*)$", pip_section, re.M)
    assert _requirements(pip_lines) == _requirements(declared)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make lab" in readme
    assert re.search(r"^make test$", (ROOT / ".ci/run").read_text(), re.M)
