"""Grading room, the gradebook: feedback, grades.csv and executed notebooks, written atomically, resumed on a rerun.

Results in DIR: `grades.csv` (one row per submission: submission, status, score, max_score, reason,
sha256, then the points earned per check), `feedback/<submission>.md` (each failed check with the
misconception its judge names; hidden and private checks show their summary and verdict, never their
code), `executed/<submission>.ipynb`, and `results/<submission>.json` (the row with each check's kind,
points and message: what `reglab.grading.export` turns into Gradescope's, Canvas's and other formats). The grader keeps the gradebook in memory and rewrites it
atomically after each submission (and any of its files a submission changed); a rerun skips rows
already graded (or invalid) for the same file unless --force; one grader at a time writes to an output
folder (a lock file).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from reglab.grading.lab import Lab
from reglab.grading.run import STATUSES, Graded

BASE_COLUMNS = ["submission", "status", "score", "max_score", "reason", "sha256"]
_UMASK = os.umask(0o022)              # read the process's umask (the only way is to set it) ...
os.umask(_UMASK)                      # ... and put it back


def feedback(graded: Graded, lab: Lab) -> str:
    """The student's feedback: status, score, every failed check with its judge's message."""
    kinds = {"public": "", "hidden": " (hidden test)", "private": " (instructor's test)"}
    lines = [f"# Feedback on `{graded.name}`: the {lab.name} lab", "",
             f"- **Status:** {graded.status} ({graded.reason})",
             f"- **Score:** {graded.score} / {lab.max_score}" + ("" if graded.status != "invalid" else " (nothing was run)"), ""]
    for note in graded.notes:
        lines.append(f"- Note: {note}")
    failed = [v for v in graded.verdicts if not v.passed]
    passed = [v for v in graded.verdicts if v.passed]
    if graded.status != "invalid":
        lines += ["", f"## Failed checks ({len(failed)})", ""]
        for v in failed:
            lines.append(f"- **{v.check.id}**{kinds[v.check.kind]}, 0 / {v.check.points}: {v.check.summary}.  ")
            lines.append(f"  {v.message}")
        if not failed:
            lines.append("None: every check passed.")
        lines += ["", f"## Passed checks ({len(passed)})", ""]
        lines += [f"- {v.check.id}{kinds[v.check.kind]}, {v.earned} / {v.check.points}: {v.check.summary}" for v in passed]
        if graded.cell_errors:
            lines += ["", "## Cells that raised errors", ""]
            lines += [f"- `{cell}`: {text}" for cell, text in graded.cell_errors]
    else:
        lines += ["", "The notebook was not run. Fix the problem above and submit again."]
    return "\n".join(lines) + "\n"


def result_record(graded: Graded, lab: Lab) -> dict:
    """One submission's machine-readable record: its row, and each check with its kind and message."""
    return {"submission": graded.name, "lab": lab.name, "status": graded.status, "reason": graded.reason,
            "score": graded.score, "max_score": lab.max_score, "sha256": graded.sha256,
            "seconds": round(graded.seconds, 2),
            "checks": [{"id": v.check.id, "kind": v.check.kind, "points": v.check.points, "earned": v.earned,
                        "summary": v.check.summary, "message": v.message} for v in graded.verdicts]}


def slug(relative: Path) -> str:
    """A submission's name in the gradebook and in file names: its path under the argument, no suffix."""
    parts = list(relative.with_suffix("").parts) if relative.suffix == ".ipynb" else list(relative.parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(parts)).strip("._") or "submission"


def find_submissions(arguments: list[str], out: Path | None = None) -> list[tuple[Path, str]]:
    """(path, name) of each submission: files as given, folders searched for *.ipynb (except inside
    the output folder out, which holds the executed notebooks)."""
    found, names = [], {}
    skip = Path(out).resolve() if out else None
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            items = [(p, p.relative_to(path)) for p in sorted(path.rglob("*.ipynb"))
                     if ".ipynb_checkpoints" not in p.parts and p.is_file()
                     and not (skip and p.resolve().is_relative_to(skip))]
        elif path.exists():
            items = [(path, Path(path.name))]
        else:
            raise ValueError(f"no such file or folder: {argument!r}")
        for item, relative in items:
            name = slug(relative)
            if name in names and names[name] != item.resolve():
                raise ValueError(f"two submissions would share the name {name!r}: {names[name]} and {item}; "
                                 "grade them in separate runs or rename one")
            if name not in names:
                names[name] = item.resolve()
                found.append((item, name))
    return found


class Gradebook:
    """grades.csv, feedback/ and executed/ under the output folder. The rows and every file the grader
    wrote live here in memory; files are written atomically, and `restore` rewrites any that something
    else (a submission's code) changed."""

    def __init__(self, out: Path, lab: Lab):
        self.out, self.lab = Path(out), lab
        self.rows: dict[str, dict[str, str]] = {}
        self.files: dict[Path, bytes] = {}
        self.columns = BASE_COLUMNS + [c.id for c in lab.checks]
        self.warnings: list[str] = []
        self._load()

    @property
    def csv_path(self) -> Path:
        return self.out / "grades.csv"

    def _load(self) -> None:
        if not self.csv_path.exists():
            return
        try:
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                rows = list(reader)
            if header[: len(BASE_COLUMNS)] != BASE_COLUMNS:
                raise ValueError("unexpected header")
        except (OSError, ValueError, csv.Error, UnicodeDecodeError):
            aside = self.csv_path.with_name(f"grades.csv.unreadable-{int(time.time())}")
            os.replace(self.csv_path, aside)
            self.warnings.append(f"{self.csv_path} was not a gradebook; moved it to {aside.name} and started a new one")
            return
        self.columns += [c for c in header if c not in self.columns]
        for row in rows:
            if row.get("status") in STATUSES and row.get("submission"):
                self.rows[row["submission"]] = {k: v or "" for k, v in row.items() if k}
                name = row["submission"]
                for rel in (Path("feedback") / f"{name}.md", Path("executed") / f"{name}.ipynb", Path("results") / f"{name}.json"):
                    try:
                        self.files[self.out / rel] = (self.out / rel).read_bytes()
                    except OSError:
                        pass
        self.files[self.csv_path] = self._csv_bytes()

    def up_to_date(self, name: str, sha: str) -> bool:
        row = self.rows.get(name)
        return bool(row and row.get("sha256") == sha and row.get("status") in ("graded", "invalid")
                    and row.get("max_score") == str(self.lab.max_score)
                    and all(c.id in row for c in self.lab.checks))

    def _csv_bytes(self) -> bytes:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for name in sorted(self.rows):
            writer.writerow({k: self.rows[name].get(k, "") for k in self.columns})
        return buffer.getvalue().encode("utf-8")

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(handle, 0o666 & ~_UMASK)                 # mkstemp makes 0600; keep the user's umask
            with os.fdopen(handle, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        self.files[path] = data

    def record(self, graded: Graded) -> None:
        """Add one submission's row, feedback and executed notebook, then rewrite the gradebook."""
        row = {"submission": graded.name, "status": graded.status, "score": str(graded.score),
               "max_score": str(self.lab.max_score), "reason": graded.reason, "sha256": graded.sha256}
        row.update({v.check.id: "" if v.earned is None else str(v.earned) for v in graded.verdicts})
        self.rows[graded.name] = row
        self._write(self.out / "feedback" / f"{graded.name}.md", feedback(graded, self.lab).encode("utf-8"))
        self._write(self.out / "results" / f"{graded.name}.json",
                    (json.dumps(result_record(graded, self.lab), indent=1) + "\n").encode("utf-8"))
        executed = self.out / "executed" / f"{graded.name}.ipynb"
        if graded.executed is not None:
            self._write(executed, graded.executed.encode("utf-8"))
        elif executed in self.files or executed.exists():
            self.files.pop(executed, None)
            executed.unlink(missing_ok=True)
        self._write(self.csv_path, self._csv_bytes())

    def restore(self) -> list[str]:
        """Rewrite every file of ours that no longer holds what we wrote; return their names."""
        restored = []
        for path, data in list(self.files.items()):
            try:
                same = path.read_bytes() == data and not path.is_symlink()
            except OSError:
                same = False
            if not same:
                if path.is_symlink() or path.is_dir():
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                self._write(path, data)
                restored.append(str(path.relative_to(self.out)))
        return restored


def lock(out: Path):
    """An exclusive lock on out (held while the returned file stays open): one grader per gradebook."""
    handle = open(out / ".grader.lock", "a")
    try:
        import fcntl
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:                      # not POSIX: no lock
        pass
    except OSError:
        handle.close()
        raise ValueError(f"another grader is writing to {out}; wait for it or choose another --out") from None
    return handle
