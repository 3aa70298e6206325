"""Grading: the gradebook in the formats other tools read — Gradescope, Canvas, and one row per student.

    python -m reglab.grade export grades/ --format gradescope            # grades/gradescope/<submission>/results.json
    python -m reglab.grade export grades/ --format canvas --roster roster.csv [--assignment "Dropout lab"]
    python -m reglab.grade export grades/ --format csv [--roster roster.csv]

Every format is built from the records the gradebook keeps beside grades.csv (`results/<submission>.json`:
status, reason, and each check's id, kind, points, earned points and message), so an export needs
neither the lab nor a rerun.

The roster (`--roster`) is a CSV that maps submissions to students, one row per student:

    submission,student,id,sis_user_id,sis_login_id,section
    alice__01_dropout_lab,"Liddell, Alice",1001,A1001,alice,Section 1

`submission`, `student` and `id` are required (`submission` may be empty: a student who submitted
nothing); the others are optional and are passed through to Canvas. A student listed with no graded
submission is exported as `missing` with score 0; a graded submission no student claims, a student or
submission listed twice, or a missing column is an error that names the row.

Sources for the formats: Gradescope's autograder specification ("Autograder Specifications" in
Gradescope's help center: `/autograder/results/results.json` with top-level `score`, `execution_time`,
`output`, and `tests[]` entries with `name`, `score`, `max_score`, `status`, `output`, `visibility`
among `visible`, `hidden`, `after_due_date`, `after_published`); Canvas's gradebook import ("How do I
import grades in the Gradebook?" in the Canvas Instructor Guide: a CSV whose first columns are
`Student`, `ID`, `SIS User ID`, `SIS Login ID`, `Section`, then one column per assignment).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = "results"            # beside grades.csv: one JSON record per submission
FORMATS = ("gradescope", "canvas", "csv")
ROSTER_REQUIRED = ("submission", "student", "id")
ROSTER_OPTIONAL = ("sis_user_id", "sis_login_id", "section")
CANVAS_COLUMNS = ("Student", "ID", "SIS User ID", "SIS Login ID", "Section")
# What a student may see of a check in Gradescope: public checks at once, hidden tests and an
# instructor's private tests only once the grades are published.
VISIBILITY = {"public": "visible", "hidden": "after_published", "private": "after_published"}


class ExportError(ValueError):
    """A gradebook or roster that cannot be exported; the message names the file and the row."""


@dataclass(frozen=True)
class Student:
    submission: str              # "" when the student submitted nothing
    name: str
    id: str
    sis_user_id: str = ""
    sis_login_id: str = ""
    section: str = ""


def read_records(out: Path) -> dict[str, dict]:
    """The gradebook's per-submission records, by submission name."""
    folder = Path(out) / RESULTS_DIR
    if not folder.is_dir():
        raise ExportError(f"{out} holds no gradebook records ({RESULTS_DIR}/): grade into it first "
                          "with `python -m reglab.grade LAB SUBMISSIONS --out DIR`")
    records = {}
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ExportError(f"{path} is not a gradebook record: {err}") from None
        if not isinstance(record, dict) or not {"submission", "status", "score", "max_score", "checks"} <= set(record):
            raise ExportError(f"{path} is not a gradebook record (fields submission, status, score, max_score, checks)")
        records[record["submission"]] = record
    return records


def read_roster(path: Path, submissions) -> list[Student]:
    """The roster's students; every graded submission must belong to exactly one of them."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ExportError(f"cannot read the roster {path}: {err}") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in ROSTER_REQUIRED if c not in header]
    if missing:
        raise ExportError(f"the roster {path} has no column {', '.join(missing)} (its header: {', '.join(header) or 'empty'}); "
                          f"required: {', '.join(ROSTER_REQUIRED)}; optional: {', '.join(ROSTER_OPTIONAL)}")
    students, by_id, by_submission = [], {}, {}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        student = Student(row["submission"], row["student"], row["id"], *(row.get(c, "") for c in ROSTER_OPTIONAL))
        if not student.id:
            raise ExportError(f"roster {path}, line {line}: the student {student.name!r} has no id")
        if student.id in by_id:
            raise ExportError(f"roster {path}, line {line}: student id {student.id} is listed twice "
                              f"(also on line {by_id[student.id]})")
        if student.submission and student.submission in by_submission:
            raise ExportError(f"roster {path}, line {line}: submission {student.submission!r} is claimed twice "
                              f"(also on line {by_submission[student.submission]})")
        by_id[student.id] = line
        if student.submission:
            by_submission[student.submission] = line
        students.append(student)
    unknown = sorted(set(submissions) - set(by_submission))
    if unknown:
        raise ExportError(f"the roster {path} names no student for {len(unknown)} graded submission(s): "
                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; add them to its `submission` column")
    return students


def gradescope_results(record: dict) -> dict:
    """One submission's results.json, as Gradescope's autograder specification lays it out."""
    tests = []
    for check in record["checks"]:
        earned = check.get("earned")
        passed = earned is not None and earned == check["points"] and not check.get("message")
        output = check["summary"] if passed else (check.get("message") or "not run")
        tests.append({"name": check["id"], "score": float(earned or 0), "max_score": float(check["points"]),
                      "status": "passed" if passed else "failed", "output": output,
                      "visibility": VISIBILITY[check["kind"]]})
    return {"score": float(record["score"]), "execution_time": round(float(record.get("seconds", 0.0)), 1),
            "output": f"{record['status']}: {record['reason']}", "visibility": "visible",
            "stdout_visibility": "hidden", "tests": tests}


def _percent(score, max_score) -> str:
    return f"{100.0 * float(score) / float(max_score):.1f}" if float(max_score) else ""


def student_rows(records: dict[str, dict], students: list[Student] | None) -> tuple[list[str], list[dict]]:
    """One row per student (or per submission, without a roster): the `csv` format."""
    check_ids = sorted({c["id"] for r in records.values() for c in r["checks"]})
    max_score = max((r["max_score"] for r in records.values()), default=0)
    columns = ["student_id", "student", "submission", "status", "score", "max_score", "percent", *check_ids]
    if students is None:
        students = [Student(name, "", "") for name in sorted(records)]
    rows = []
    for student in students:
        record = records.get(student.submission)
        row = {"student_id": student.id, "student": student.name, "submission": student.submission}
        if record is None:
            row.update(status="missing", score="0", max_score=str(max_score), percent=_percent(0, max_score) if max_score else "")
            row.update({c: "0" for c in check_ids})
        else:
            row.update(status=record["status"], score=str(record["score"]), max_score=str(record["max_score"]),
                       percent=_percent(record["score"], record["max_score"]))
            earned = {c["id"]: c.get("earned") for c in record["checks"]}
            row.update({c: "" if earned.get(c) is None else str(earned[c]) for c in check_ids})
        rows.append(row)
    return columns, rows


def canvas_rows(records: dict[str, dict], students: list[Student], assignment: str) -> tuple[list[str], list[dict]]:
    """Canvas's gradebook import: the five identity columns, then the assignment's points."""
    columns = [*CANVAS_COLUMNS, assignment]
    max_score = max((r["max_score"] for r in records.values()), default=0)
    rows = [{"Student": "Points Possible", assignment: str(max_score)}]   # the second row of Canvas's own export
    for s in students:
        record = records.get(s.submission)
        rows.append({"Student": s.name, "ID": s.id, "SIS User ID": s.sis_user_id, "SIS Login ID": s.sis_login_id,
                     "Section": s.section, assignment: "0" if record is None else str(record["score"])})
    return columns, rows


def _csv_text(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def export(out: Path, fmt: str, roster: Path | None = None, assignment: str | None = None,
           destination: Path | None = None) -> list[Path]:
    """Write the export of the gradebook in `out`; returns the files written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; the formats are {', '.join(FORMATS)}")
    out = Path(out)
    records = read_records(out)
    students = read_roster(roster, records) if roster else None
    if fmt == "gradescope":
        folder = Path(destination or out / "gradescope")
        written = []
        for name, record in records.items():
            path = folder / name / "results.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(gradescope_results(record), indent=1) + "\n", encoding="utf-8")
            written.append(path)
        return written
    if fmt == "canvas":
        if students is None:
            raise ExportError("--format canvas needs --roster: Canvas matches rows by its students' ids")
        labs = sorted({r.get("lab", "") for r in records.values()} - {""})
        columns, rows = canvas_rows(records, students, assignment or (f"{labs[0]} lab" if len(labs) == 1 else "lab"))
    else:
        columns, rows = student_rows(records, students)
    path = Path(destination or out / f"{fmt}.csv")
    path.write_text(_csv_text(columns, rows), encoding="utf-8")
    return [path]


def main(argv: list[str]) -> int:
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="python -m reglab.grade export",
                                     description="Export a gradebook for Gradescope, Canvas, or as one row per student.")
    parser.add_argument("out", metavar="DIR", help="the grader's output folder (--out of the grading run)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--roster", metavar="CSV", help="submission,student,id[,sis_user_id,sis_login_id,section]")
    parser.add_argument("--assignment", metavar="NAME", help="canvas: the assignment column's name, e.g. "
                        "'Dropout lab (1234)' to update Canvas's assignment 1234 (default: '<lab> lab')")
    parser.add_argument("--to", metavar="PATH", help="where to write (default: DIR/gradescope/, DIR/canvas.csv, DIR/csv.csv)")
    args = parser.parse_args(argv)
    try:
        written = export(Path(args.out), args.format, Path(args.roster) if args.roster else None, args.assignment,
                         Path(args.to) if args.to else None)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    where = written[0] if len(written) == 1 else Path(args.to or Path(args.out) / "gradescope")
    print(f"wrote {len(written)} file(s): {where}")
    return 0
