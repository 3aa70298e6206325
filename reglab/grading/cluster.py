"""Grading: many submissions on a Dask cluster, when one machine is not enough (`--scheduler ADDRESS`).

    python -m reglab.grade dropout submissions/ --out grades/ --scheduler tcp://scheduler:8786
    python -m reglab.grade dropout submissions/ --out grades/ --scheduler local --workers 4

Each Dask task grades one submission with the same function the process pool calls (`run_submission`:
the sandbox, the probe in the student's kernel, the judge in the worker's own process). The task
carries everything it needs — the validated notebook, the lab, and the bytes of the instructor's
private test files — so a worker needs only the course installed (and bubblewrap), not the grader's
files. Results come back as they finish and the grader records each in the gradebook at once
(atomic, resumable), exactly as with `--workers`.

A worker that dies mid-task (killed, out of memory, its machine lost) makes the scheduler run the task
again on another worker; after `ALLOWED_FAILURES` deaths Dask gives up on it (`KilledWorker`), and that
submission ends `error` with a reason that says so. Dask's own tools start the cluster: `dask scheduler`
and `dask worker ADDRESS --nworkers N --nthreads 1` (the `distributed` package), dask-jobqueue on
Slurm, dask-kubernetes on Kubernetes; `local` starts a `LocalCluster` of `--workers` processes here.
"""
from __future__ import annotations

import fcntl
import logging
import hashlib
import itertools
import os
import tempfile
from dataclasses import replace
from pathlib import Path

ALLOWED_FAILURES = 2               # worker deaths per task before Dask reports KilledWorker (LocalCluster)
# A grading task waits on its sandboxed kernel, which needs every core: Dask's statistical profiler
# (a stack sample every 10 ms in each worker) and its 0.5 s system monitor only take CPU from it. Idle, a
# LocalCluster of 2 workers used 4.1 CPU-seconds in 20 s with Dask's defaults and 2.0 with these (measured
# with psutil, distributed 2026.8). Workers of a remote cluster: DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False.
QUIET_WORKERS = {"distributed.worker.profile.enabled": False, "distributed.admin.system-monitor.interval": "5s",
                 "distributed.worker.memory.monitor-interval": "1s"}
SLOT_LOCKS = Path(tempfile.gettempdir()) / "reglab-grader-slots"
MAX_SLOTS = 1000

_PROCESS: dict = {}                # per worker process: its sandbox slot, the private tests it loaded


def worker_slot() -> int:
    """This worker process's sandbox slot: the lowest one no other process on this machine holds.

    The sandbox runs student code as uid base + slot, and sweeps that uid's processes when a
    submission ends, so two workers on one machine must never share a slot. A slot is held by an
    exclusive lock on a file, which the kernel releases when the process dies.
    """
    if "slot" not in _PROCESS:
        SLOT_LOCKS.mkdir(mode=0o700, exist_ok=True)
        for slot in range(MAX_SLOTS):
            handle = open(SLOT_LOCKS / f"{slot}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            _PROCESS.update(slot=slot, slot_handle=handle)
            break
        else:
            raise RuntimeError(f"all {MAX_SLOTS} grading slots on this machine are taken")
    return _PROCESS["slot"]


def _private_tests_here(lab, files: dict[str, bytes]):
    """The lab with its private test files written on this worker (once per set of files) and registered."""
    if not files:
        return lab
    from reglab.grading.lab import load_private_tests
    key = hashlib.sha256(b"".join(name.encode() + b"\0" + data for name, data in sorted(files.items()))).hexdigest()
    folder = Path(tempfile.gettempdir()) / f"reglab-private-tests-{os.getpid()}-{key[:16]}"
    if _PROCESS.get("tests") != key:
        folder.mkdir(mode=0o700, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        load_private_tests(folder, lab.prefixes)
        _PROCESS["tests"] = key
    return replace(lab, private_files=tuple(folder / name for name in sorted(files)))


def grade_task(submission, lab, options, private_files: dict[str, bytes]):
    """One Dask task: grade one submission on whichever worker runs it."""
    from reglab import checks as check_registry
    from reglab.grading.run import run_submission
    from reglab.grading.sandbox import skip_slow_optional_imports
    skip_slow_optional_imports()
    lab = _private_tests_here(lab, private_files)
    for check in lab.checks:                     # import every judge before any student code runs
        check_registry.get(check.id)
    return run_submission(submission, lab, options, worker_slot())


def connect(address: str, workers: int):
    """A Dask client for `address` ('local': a LocalCluster of `workers` one-thread processes)."""
    import dask
    from distributed import Client, LocalCluster
    if address == "local":
        with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES, **QUIET_WORKERS}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR)
        return Client(cluster), cluster
    try:
        return Client(address, timeout="30s"), None
    except (OSError, TimeoutError) as err:
        raise ValueError(f"cannot reach the Dask scheduler at {address}: {err}. Start one with "
                         "`dask scheduler` and workers with `dask worker ADDRESS --nthreads 1`") from None


def grade_many(todo, lab, options, address: str, workers: int, failed, task=grade_task):
    """Grade each submission of `todo` on the cluster; yields each result as it finishes.

    failed(submission, lab, reason) builds the `error` row of a submission whose task could not finish.
    """
    from distributed import as_completed
    from distributed.scheduler import KilledWorker
    private = {path.name: Path(path).read_bytes() for path in lab.private_files}
    client, cluster = connect(address, workers)
    try:
        try:
            client.wait_for_workers(1, timeout=120)
        except TimeoutError:
            raise ValueError(f"the Dask scheduler at {address} has no workers; start some with "
                             f"`dask worker {address} --nthreads 1`") from None
        # As many tasks in flight as the cluster has threads: a worker then holds only the task it runs,
        # and when it dies the scheduler blames that task alone (a queued task would count a death too).
        window = max(1, sum(w["nthreads"] for w in client.scheduler_info()["workers"].values()))
        waiting, futures = iter(todo), {}

        def submit(submission):
            future = client.submit(task, submission, lab, options, private, pure=False, retries=1,
                                   key=f"grade-{submission.name}-{submission.sha256[:12]}")
            futures[future] = submission
            return future

        running = as_completed([submit(s) for s in itertools.islice(waiting, window)])
        for future in running:
            submission = futures.pop(future)
            try:
                graded = future.result()
            except KilledWorker:
                graded = failed(submission, lab, f"the submission's run killed {ALLOWED_FAILURES + 1} Dask workers "
                                                 "in a row (or their machines were lost); it was not graded")
            except Exception as err:                        # noqa: BLE001 - the task itself failed
                graded = failed(submission, lab, f"the grading task failed on the cluster: {type(err).__name__}: {err}")
            following = next(waiting, None)
            if following is not None:
                running.add(submit(following))
            yield graded
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
