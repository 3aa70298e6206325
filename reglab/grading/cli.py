"""Grading room, the command line (`python -m reglab.grade`): many submissions in worker processes, or one self-check.

    python -m reglab.grade dropout submissions/ --out grades/ [--workers 2] [--tests private/]
    python -m reglab.grade dropout submissions/ --out grades/ --scheduler tcp://host:8786   # on a Dask cluster
    python -m reglab.grade --self-check labs/01_dropout_lab.ipynb      # a student's public checks
    python -m reglab.grade export grades/ --format gradescope|canvas|csv [--roster roster.csv]
    python -m reglab.grade gradescope-bundle dropout --out autograder.zip [--tests private/]

Each submission is validated here (no code runs), then one worker process runs it start to end
(`reglab.grading.run`) while this process keeps the gradebook; with --scheduler the runs are Dask
tasks on a cluster instead (`reglab.grading.cluster`).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

from reglab import checks as check_registry
from reglab.grading import cluster
from reglab.grading.gradebook import Gradebook, find_submissions, lock
from reglab.grading.judge import not_run, one_line
from reglab.grading.lab import Lab, infer_lab, load_lab, load_private_tests
from reglab.grading.run import Graded, Options, grade_submission, invalid_graded, run_submission
from reglab.grading.sandbox import DEFAULT_UID, choose_uid, skip_slow_optional_imports, unavailable
from reglab.grading.validate import Submission, validate_submission

DESCRIPTION = "Grading submitted labs: validate each notebook, run it in a sandbox, probe it there, judge here."


_WORKER: dict = {}


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)          # unwinds grade_submission, whose sandbox then kills the kernel


def _interrupt(signum, frame):
    raise KeyboardInterrupt                 # a terminated grader stops its workers the way Ctrl-C does


def _init_worker(lab: Lab, tests_dir: str | None, slots) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    skip_slow_optional_imports()
    importlib.import_module("nbformat")     # imported once here rather than inside the first timed submission
    if tests_dir:
        load_private_tests(Path(tests_dir), lab.prefixes)
    for check in lab.checks:                # import every judge before any student code runs
        check_registry.get(check.id)
    _WORKER.update(lab=lab, slot=slots.get() if slots is not None else 0)


def _grade_in_worker(submission: Submission, options: Options) -> Graded:
    return run_submission(submission, _WORKER["lab"], options, _WORKER["slot"])


def sandbox_uid(choice: str, sandboxed: bool = True) -> int | None:
    """The base uid of student code for --sandbox-uid choice (`reglab.grading.sandbox.choose_uid`)."""
    return choose_uid(choice, sandboxed)


def grade(lab: Lab, submissions: list[tuple[Path, str]], out: Path, options: Options, workers: int = 1,
          force: bool = False, tests_dir: Path | None = None, log=print, scheduler: str | None = None) -> list[Graded]:
    """Grade submissions into out; returns what was graded in this run (skipped ones excluded).
    scheduler: a Dask scheduler's address, or 'local' for a LocalCluster of `workers` processes
    (`reglab.grading.cluster`); None grades in a process pool here."""
    out = Path(out)
    problem = unavailable(DEFAULT_UID if options.uid is None else options.uid) if options.sandbox else ""
    if problem:                              # fail closed: no student code runs outside the sandbox unasked
        raise ValueError(problem)
    out.mkdir(parents=True, exist_ok=True)
    with lock(out):
        return _grade_unlocked(lab, submissions, out, options, workers, force, tests_dir, log, scheduler)


def _grade_unlocked(lab, submissions, out, options, workers, force, tests_dir, log, scheduler) -> list[Graded]:
    book = Gradebook(out, lab)
    for line in book.warnings:
        log(f"warning: {line}")
    todo, done = [], []
    for path, name in submissions:
        submission = validate_submission(path, name, lab)       # cheap, in this process: no code runs
        if not force and book.up_to_date(name, submission.sha256):
            row = book.rows[name]
            log(f"skipped {name}: already {row['status']} ({row['score']}/{lab.max_score}); --force regrades it")
        elif submission.invalid:
            graded = invalid_graded(submission, lab)
            book.record(graded)
            done.append(graded)
            log(f"{name}: invalid ({graded.reason})")
        else:
            todo.append(submission)
    if not todo:
        return done
    start, finished = time.perf_counter(), 0
    results = (cluster.grade_many(todo, lab, options, scheduler, workers, worker_failed) if scheduler
               else _pool(todo, lab, options, min(workers, len(todo)), tests_dir))
    try:
        for graded in results:
            book.record(graded)
            restore(book, log)
            done.append(graded)
            finished += 1
            log(f"[{finished}/{len(todo)}] {graded.name}: {graded.status}, {graded.score}/{lab.max_score} "
                f"in {graded.seconds:.1f} s ({graded.reason})")
    finally:
        results.close()                       # a generator: stops the workers if we leave early (Ctrl-C)
        restore(book, log)
    where = f"on the Dask cluster {scheduler}" if scheduler else f"with {min(workers, len(todo))} worker(s)"
    log(f"ran {len(todo)} submission(s) in {time.perf_counter() - start:.1f} s {where}; gradebook: {book.csv_path}")
    return done


def worker_failed(submission: Submission, lab: Lab, reason: str) -> Graded:
    """The `error` row of a submission whose worker (not its notebook) failed."""
    return Graded(submission.name, "error", reason, not_run(lab, "the grader failed"), submission.sha256, 0.0)


def _pool(todo: list[Submission], lab: Lab, options: Options, workers: int, tests_dir):
    """Grade in a pool of worker processes on this machine; yields each result as it finishes."""
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(workers):
        slots.put(slot)
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                                  initargs=(lab, str(tests_dir) if tests_dir else None, slots))
    try:
        futures = {pool.submit(_grade_in_worker, submission, options): submission for submission in todo}
        for future in concurrent.futures.as_completed(futures):
            try:
                yield future.result()
            except Exception as err:                 # noqa: BLE001 - the worker itself failed
                yield worker_failed(futures[future], lab, f"the grader's worker failed: {type(err).__name__}: "
                                                          f"{one_line(err, 200)}")
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):   # stop workers mid-submission
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def restore(book: Gradebook, log) -> None:
    """Rewrite any gradebook file a submission's code changed, saying so."""
    for path in book.restore():
        log(f"warning: restored {path}, which a submission's code had changed")


def self_check(notebook: Path, lab_name_or_path: str | None, options: Options, tests_dir: Path | None = None,
               log=print) -> int:
    """Run a student's notebook with the public checks only and print each verdict; 0 if all pass."""
    lab = load_lab(lab_name_or_path or infer_lab(notebook), tests_dir, kinds=("public",))
    options = dataclasses.replace(options, sandbox=False, uid=None)    # your own code, as your own user
    log(f"self-check of {notebook} against the {lab.name} lab (public checks only; budget {options.budget}, "
        f"device {options.device}); this takes about as long as running the notebook")
    graded = grade_submission(Path(notebook), Path(notebook).stem, lab, options)
    log(f"status: {graded.status} ({graded.reason})")
    for verdict in graded.verdicts:
        mark = "passed" if verdict.passed else "FAILED"
        log(f"  {mark}  {verdict.check.id} ({verdict.check.points} pt): {verdict.message or verdict.check.summary}")
    log(f"public checks: {graded.score} / {lab.max_score} points. The grade also counts hidden tests.")
    return 0 if graded.status == "graded" and graded.score == lab.max_score else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "export":
        from reglab.grading import export
        return export.main(argv[1:])
    if argv and argv[0] in ("gradescope-bundle", "gradescope-run"):
        from reglab.grading import gradescope
        return gradescope.main(argv)
    parser = argparse.ArgumentParser(prog="python -m reglab.grade", description=DESCRIPTION,
                                     epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab", nargs="?", help="a lab's short name (dropout, ...) or its solution notebook's path")
    parser.add_argument("submissions", nargs="*", help="notebook files or folders of them")
    parser.add_argument("--out", metavar="DIR", help="output folder: grades.csv, feedback/, executed/")
    parser.add_argument("--self-check", metavar="NOTEBOOK", help="run your own lab with its public checks only")
    parser.add_argument("--lab", dest="lab_option", metavar="LAB", help="the lab, for --self-check (default: inferred)")
    parser.add_argument("--tests", metavar="DIR", help="folder of private test files: each adds Checks and lists "
                        "CHECKS = [(check id, object name), ...]")
    parser.add_argument("--workers", type=int, metavar="N", default=1, help="submissions graded at once (default 1)")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="grade on a Dask cluster: a scheduler's address "
                        "(tcp://host:8786) or 'local' for a LocalCluster of --workers processes")
    parser.add_argument("--force", action="store_true", help="regrade submissions the gradebook already has")
    parser.add_argument("--timeout", type=float, metavar="S", default=300.0, help="seconds per submission (default 300)")
    parser.add_argument("--memory-mb", type=int, metavar="MB", default=4096, help="memory cap per process (default 4096)")
    parser.add_argument("--budget", default="ci", choices=["ci", "cpu", "gpu"], help="injected budget (default ci)")
    parser.add_argument("--seed", type=int, default=0, help="injected seed (default 0)")
    parser.add_argument("--device", default="cpu", help="injected device (default cpu)")
    parser.add_argument("--sandbox-uid", default="auto", metavar="UID",
                        help="uid for student code ('auto': 61000 + worker slot; 'self': the grader's own, not for root)")
    parser.add_argument("--no-sandbox", action="store_true", help="run student code without bubblewrap (no network "
                        "or filesystem isolation); printed, and recorded in every row's reason")
    args = parser.parse_args(argv)
    skip_slow_optional_imports()
    if args.workers < 1 or args.timeout <= 0 or args.memory_mb < 256:
        parser.error("--workers must be >= 1, --timeout > 0 and --memory-mb >= 256")
    tests_dir = Path(args.tests) if args.tests else None
    try:
        if args.self_check:
            if args.submissions or args.out:
                parser.error("--self-check takes one notebook and no --out")
            options = Options(args.budget, args.seed, args.device, args.timeout, args.memory_mb, None, sandbox=False)
            return self_check(Path(args.self_check), args.lab_option or args.lab, options, tests_dir)
        uid = sandbox_uid(args.sandbox_uid, sandboxed=not args.no_sandbox)
        options = Options(args.budget, args.seed, args.device, args.timeout, args.memory_mb, uid, sandbox=not args.no_sandbox)
        if not args.lab or not args.submissions or not args.out:
            parser.error("give LAB, at least one SUBMISSION and --out DIR (or --self-check NOTEBOOK)")
        lab = load_lab(args.lab, tests_dir)
        submissions = find_submissions(args.submissions, Path(args.out))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.no_sandbox:
        print(f"warning: --no-sandbox: student code runs without bubblewrap: it can reach the network and read what "
              f"uid {uid if uid is not None else os.getuid()} can read; every row's reason says so", file=sys.stderr)
    print(f"grading {len(submissions)} submission(s) of the {lab.name} lab: {len(lab.checks)} checks, "
          f"{lab.max_score} points; budget {options.budget}, timeout {options.timeout_s:g} s, memory {options.memory_mb} MB")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        grade(lab, submissions, Path(args.out), options, args.workers, args.force, tests_dir,
              scheduler=args.scheduler)
    except KeyboardInterrupt:
        print("interrupted: the gradebook holds every submission graded so far", file=sys.stderr)
        return 130
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
