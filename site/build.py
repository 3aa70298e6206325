"""Build the course as a static website: `python site/build.py` (what `make site` runs).

The lectures (`notebooks/`), the student labs (`labs/`, never `solutions/`) and the README's course map
(the home page) are copied into `<out>/src/` with the repository's layout, so that the notebooks' relative
links still work, then Sphinx + myst-nb executes and renders them into `<out>/html/`. Executed notebooks are
cached per budget in `<out>/cache/<budget>/` (jupyter-cache: a notebook is re-executed only when its code
changes), and Sphinx's doctrees in `<out>/doctrees/<budget>/`.

The budget is `REGLAB_BUDGET` (default `cpu`; CI builds in `ci`). `--out DIR` builds elsewhere than
`build/site/` (the site test builds into a temporary folder). Nothing is fetched: the theme and MathJax come
from installed packages, and the pages load no file from another host.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "site"
PUBLISHED = ("notebooks", "labs")          # solutions/ is never published
LECTURE = re.compile(r"`(0\d_[a-z_]+?)`")  # `01_dropout`, `01_dropout_lab` in the course map


def home_page(readme: str) -> str:
    """The README's title, introduction and course map, with each notebook's name a link to its page."""
    title, rest = readme.split("\n", 1)
    intro = rest.split("\n## ", 1)[0].strip()
    course_map = readme.split("## Course map", 1)[1].split("\n## ", 1)[0].strip()
    table = course_map.split("\n\n", 1)[0]

    def link(match: re.Match) -> str:
        name = match.group(1)
        folder = "labs" if name.endswith("_lab") else "notebooks"
        if not (ROOT / folder / f"{name}.ipynb").exists():
            return match.group(0)
        return f"[`{name}`]({folder}/{name}.ipynb)"

    toctrees = "\n".join(
        f"```{{toctree}}\n:caption: {caption}\n:maxdepth: 1\n:hidden:\n\n" + "\n".join(docs) + "\n```\n"
        for caption, docs in [
            ("Lectures", [f"notebooks/{p.stem}" for p in sorted((ROOT / "notebooks").glob("*.ipynb"))
                          if "claims_ledger" not in p.name]),
            ("Labs", [f"labs/{p.stem}" for p in sorted((ROOT / "labs").glob("*.ipynb"))]),
            ("Claims ledger", [f"notebooks/{p.stem}" for p in sorted((ROOT / "notebooks").glob("*.ipynb"))
                               if "claims_ledger" in p.name]),
        ])
    return (f"{title}\n\n{intro}\n\n"
            "Every page is a notebook of the course, executed; the link at the top of each page downloads the "
            "notebook to run it yourself (`make lab` in a clone of the course opens it in JupyterLab).\n\n"
            f"## Course map\n\n{LECTURE.sub(link, table)}\n\n{toctrees}")


def published_copy(nb_text: str) -> str:
    """The notebook as published: links to a lab's solution point to the student lab instead, and slider
    cells are shown but not executed (myst-nb's `skip-execution` tag): a slider needs a person, and a
    headless nbclient run can hang on a cell that opens widget comms (jupyter/nbclient#312)."""
    nb = json.loads(nb_text)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and re.search(r"\binteract(ive)?\(", "".join(cell["source"])):
            tags = cell.setdefault("metadata", {}).setdefault("tags", [])
            tags.append("skip-execution")
        if cell["cell_type"] == "markdown":
            source = "".join(cell["source"])
            cell["source"] = re.sub(r"\]\((?:\.\./)?solutions/", "](../labs/", source)
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def write_if_changed(path: Path, text: str) -> None:
    """Sphinx rebuilds what changed by modification time: leave unchanged files untouched."""
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def prepare(src: Path) -> None:
    wanted = {Path("index.md"): home_page((ROOT / "README.md").read_text(encoding="utf-8"))}
    for folder in PUBLISHED:
        for nb in sorted((ROOT / folder).glob("*.ipynb")):
            wanted[Path(folder) / nb.name] = published_copy(nb.read_text(encoding="utf-8"))
    for rel, text in wanted.items():
        write_if_changed(src / rel, text)
    for stale in [p for p in src.rglob("*") if p.is_file() and p.relative_to(src) not in wanted]:
        stale.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "site",
                        help="build folder (default build/site): html/ is the site")
    args = parser.parse_args(argv)
    budget = os.environ.get("REGLAB_BUDGET") or "cpu"
    os.environ["REGLAB_BUDGET"] = budget      # the notebooks' `budget = "auto"` reads it (kernels inherit it)
    os.environ["REGLAB_PROGRESS"] = "0"       # no progress-bar widgets: nobody watches a headless run
    os.environ["REGLAB_SITE_CACHE"] = str(args.out.resolve() / "cache" / budget)
    src = args.out / "src"
    prepare(src)
    (args.out / "budget").write_text(budget + "\n")   # which cache the html/ was built from (the site test reads it)
    from sphinx.cmd.build import build_main
    print(f"building the site in the {budget!r} budget into {args.out / 'html'}", flush=True)
    return build_main(["-b", "html", "-c", str(SITE), "-d", str(args.out / "doctrees" / budget),
                       "-W", "--keep-going", str(src), str(args.out / "html")])


if __name__ == "__main__":
    sys.exit(main())
