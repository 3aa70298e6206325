"""Running one untrusted notebook so that its code cannot hurt the grader that runs it.

`execute(notebook, workdir, parameters, limits)` writes the notebook into a private working
directory and executes it with papermill in a child process that

- runs in its own session, with a minimal environment (no secrets from the grader's variables);
- caps its address space (`RLIMIT_AS`, inherited by the kernel: a memory bomb gets MemoryError),
  the size of any file it writes and its core dumps;
- is killed, kernel and every process it started included, when the wall-clock limit passes or the
  run ends: the caller becomes a "child subreaper" (Linux), so whatever the notebook forks, even
  into a new session, is re-parented to the caller and swept up. (jupyter_client starts the kernel in
  a session of its own, so killing the child's process group alone would leave the kernel running,
  and papermill's own cell timeout can fire while a cell still reports no exception: the wall clock
  here is the one that counts);
- runs, when the grader is root and `limits.uid` is set, as that unprivileged user, so it can write
  nothing outside its working directory and the world-writable temporary folders.

The child reports how papermill ended through a pipe of its own that the kernel does not inherit;
the executed notebook is read back from the working directory, size-limited, and trusted for
nothing but its text. Linux gives the full isolation; elsewhere (a student's self-check on macOS)
the time and memory limits still apply.

    python -m reglab.sandbox SPEC.json FD    # the child's entry point; not for direct use
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

INPUT_NAME, OUTPUT_NAME, SPEC_NAME = "submission.ipynb", "executed.ipynb", ".reglab-sandbox.json"
MAX_NOTEBOOK_BYTES = 64 * 2**20      # an executed notebook larger than this is not read back
MAX_REPORT_BYTES = 64 * 2**10
PR_SET_CHILD_SUBREAPER = 36          # prctl option, <linux/prctl.h>


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 300.0         # wall clock for the whole run, kernel start-up included
    memory_mb: int = 4096            # address space of each process (RLIMIT_AS); a ci lab kernel needs ~1.5 GB
    max_file_mb: int = 512           # largest file the notebook may write (RLIMIT_FSIZE)
    uid: int | None = None           # run as this user id (needs a root grader); None: the grader's own user
    max_processes: int = 256         # RLIMIT_NPROC for that user (threads count); only applied with uid
    python: str = sys.executable     # interpreter of the child; its folder goes first on PATH for the kernel


@dataclass
class Execution:
    outcome: str                     # "finished" | "timeout" | "kernel-died" | "crashed"
    message: str                     # papermill's or the operating system's words, for the reason column
    wall_s: float
    notebook: dict | None            # the executed notebook as papermill last saved it (None: unreadable)


def sandbox_env(workdir: Path, python: str = sys.executable) -> dict[str, str]:
    """The child's whole environment: paths into its working directory, one thread, no progress bars, nothing else."""
    env = {
        "PATH": os.pathsep.join([str(Path(python).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(workdir), "TMPDIR": str(workdir / "tmp"),
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "MPLCONFIGDIR": str(workdir / ".config" / "matplotlib"), "IPYTHONDIR": str(workdir / ".ipython"),
        "JUPYTER_CONFIG_DIR": str(workdir / ".jupyter"), "JUPYTER_DATA_DIR": str(workdir / ".local" / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(workdir / ".local" / "jupyter" / "runtime"),
        "REGLAB_PROGRESS": "0",                # no progress-bar widgets: nobody watches, and widget comms
    }                                          # can hang a headless nbclient run (jupyter/nbclient#312)
    if os.environ.get("PYTHONPATH"):           # what the instructor made importable stays importable
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
    return env


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux), so none can escape the sweep."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _process_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, state)} from /proc (empty where there is no /proc)."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()          # after "pid (comm) "; comm may hold spaces
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def kill_tree(root: subprocess.Popen, keep: set[int]) -> None:
    """SIGKILL the child, its process group, every descendant and every orphan re-parented here
    (except the children in keep, which existed before the run), and reap them."""
    me = os.getpid()
    try:
        os.killpg(root.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(200):
        table = _process_table()
        orphans = {p for p, (pp, _) in table.items() if pp == me and p not in keep and p != root.pid}
        # root.pid only while not yet reaped: after that the number may belong to someone else
        found, frontier = set(), orphans | ({root.pid} if root.returncode is None else set())
        while frontier:                                      # every descendant of those
            found |= frontier
            frontier = {p for p, (pp, _) in table.items() if pp in frontier} - found
        found.discard(me)
        alive = {p for p in found if p in table and table[p][1] != "Z"}
        for pid in alive:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        ours = {p for p in found if p in table and table[p][0] == me}
        for pid in ours:
            if pid == root.pid:
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if root.poll() is None and root.pid in alive:
            try:
                root.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if not alive and not (ours - {root.pid}):
            break
        time.sleep(0.05)
    root.poll()


def _read_limited(path: Path, limit: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    return data if len(data) <= limit else None


def _chown_tree(path: Path, uid: int) -> None:
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.lchown(name, uid, uid)


def remove_tree(path: Path) -> None:
    """Delete a working directory, even one whose notebook removed its own permissions."""
    def retry(func, name, _exc):
        try:
            os.chmod(os.path.dirname(name), 0o700)
            os.chmod(name, 0o700)
            func(name)
        except OSError:
            pass
    shutil.rmtree(path, onerror=retry)


def execute(notebook: dict, workdir: Path, parameters: dict, limits: Limits) -> Execution:
    """Execute notebook (an nbformat dict) in workdir (an empty private folder) under limits."""
    workdir = Path(workdir)
    for sub in ("tmp", ".config/matplotlib", ".ipython", ".jupyter", ".local/jupyter/runtime"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    (workdir / INPUT_NAME).write_text(json.dumps(notebook), encoding="utf-8")
    spec = {"input": str(workdir / INPUT_NAME), "output": str(workdir / OUTPUT_NAME), "cwd": str(workdir),
            "parameters": parameters, "limits": asdict(limits)}
    (workdir / SPEC_NAME).write_text(json.dumps(spec), encoding="utf-8")
    user = {}
    if limits.uid is not None and limits.uid != os.getuid():
        _chown_tree(workdir, limits.uid)
        user = {"user": limits.uid, "group": limits.uid, "extra_groups": []}
    become_subreaper()
    keep = {p for p, (pp, _) in _process_table().items() if pp == os.getpid()}
    read_end, write_end = os.pipe()
    start = time.perf_counter()
    try:
        child = subprocess.Popen(
            [limits.python, "-m", "reglab.grading.sandbox", str(workdir / SPEC_NAME), str(write_end)],
            pass_fds=(write_end,), cwd=workdir, env=sandbox_env(workdir, limits.python),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, **user)
    except OSError as err:
        os.close(read_end)
        os.close(write_end)
        return Execution("crashed", f"could not start the notebook's process: {err}", 0.0, None)
    os.close(write_end)
    timed_out = False
    try:
        child.wait(timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        kill_tree(child, keep)                               # also on KeyboardInterrupt / SystemExit
    wall = time.perf_counter() - start
    os.set_blocking(read_end, False)
    try:
        raw = os.read(read_end, MAX_REPORT_BYTES)
    except BlockingIOError:
        raw = b""
    finally:
        os.close(read_end)
    try:
        report = json.loads(raw.decode("utf-8")) if raw else {}
        report = report if isinstance(report, dict) else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        report = {}
    text = _read_limited(workdir / OUTPUT_NAME, MAX_NOTEBOOK_BYTES)
    try:
        executed = json.loads(text.decode("utf-8")) if text else None
        executed = executed if isinstance(executed, dict) and isinstance(executed.get("cells"), list) else None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        executed = None
    if timed_out:
        return Execution("timeout", f"still running after {limits.timeout_s:g} s", wall, executed)
    outcome, message = str(report.get("outcome", "")), str(report.get("message", ""))[:2000]
    if outcome not in ("finished", "kernel-died", "crashed"):
        code = child.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        outcome, message = "crashed", f"it ended without a report ({how})"
    return Execution(outcome, message, wall, executed)


def skip_slow_optional_imports() -> None:
    """jsonschema (under nbformat, under papermill) validates IRIs with rfc3987_syntax when it can import
    it, and that import builds a grammar for ~2 s of CPU; notebooks hold no IRIs, so make it unimportable.
    Only for processes of the grader's own (the child here, the grader's workers)."""
    sys.modules.setdefault("rfc3987_syntax", None)


def _apply_limits(limits: dict) -> None:
    import resource
    mb = 2**20
    caps = [(resource.RLIMIT_AS, limits["memory_mb"] * mb), (resource.RLIMIT_FSIZE, limits["max_file_mb"] * mb),
            (resource.RLIMIT_CORE, 0)]
    if limits.get("uid") is not None:
        caps.append((resource.RLIMIT_NPROC, limits["max_processes"]))
    for which, value in caps:
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):       # macOS refuses some address-space limits; the others still apply
            if which != resource.RLIMIT_AS or sys.platform.startswith("linux"):
                raise


def _child_main(spec_path: str, report_fd: int) -> int:
    """Run papermill once and report how it ended on report_fd (the kernel never inherits that fd)."""
    os.set_inheritable(report_fd, False)
    try:
        spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
        _apply_limits(spec["limits"])
        skip_slow_optional_imports()
        import papermill
        from nbclient.exceptions import DeadKernelError
        from papermill.exceptions import PapermillExecutionError
        try:
            papermill.execute_notebook(
                spec["input"], spec["output"], parameters=spec["parameters"], kernel_name="python3",
                cwd=spec["cwd"], progress_bar=False, log_output=False, allow_errors=True,
                request_save_on_cell_execute=True, autosave_cell_every=5,
                start_timeout=min(120, int(spec["limits"]["timeout_s"])))
            report = {"outcome": "finished"}
        except PapermillExecutionError:                      # cells raised: the notebook records which
            report = {"outcome": "finished"}
        except DeadKernelError as err:
            report = {"outcome": "kernel-died", "message": str(err)}
    except BaseException as err:                             # noqa: BLE001 - every ending is reported
        report = {"outcome": "crashed", "message": f"{type(err).__name__}: {err}"}
    try:
        os.write(report_fd, json.dumps(report).encode("utf-8")[:MAX_REPORT_BYTES])
    finally:
        os.close(report_fd)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        sys.exit(2)
    sys.exit(_child_main(sys.argv[1], int(sys.argv[2])))
