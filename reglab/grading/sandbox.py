"""Running one untrusted notebook so that its code cannot hurt, read or reach anything of the grader's.

`execute(notebook, workdir, parameters, limits)` writes the notebook into a private working
directory and executes it with papermill in a child process that

- runs, whole (papermill, its kernel and everything the notebook starts), inside bubblewrap
  (`reglab.grading.bwrap`): no network (a new network namespace holding only its own loopback),
  its own PID, IPC and UTS namespaces and session, and a filesystem that shows, read-only, only the
  interpreter, the environment's packages and the course package, plus the working directory and a
  private /tmp. The runner goes into the sandbox with its kernel, rather than the kernel alone, so
  that the two talk over the sandbox's own loopback, the kernel's parent-process check sees its real
  parent, and nothing of papermill's (its files, its pipe) needs a hole in the walls;
- runs as an unprivileged uid (`limits.uid`; a root grader: a real uid, set inside the sandbox after
  the binds; an ordinary user: mapped in a user namespace), never as root;
- caps its address space (`RLIMIT_AS`, inherited by the kernel: a memory bomb gets MemoryError),
  the size of any file it writes, its core dumps and the processes of its uid (`RLIMIT_NPROC`);
- keeps at most `MAX_CELL_OUTPUT_BYTES` of each cell's output (the runner drops the rest and leaves a
  note in the cell that `flood_note` finds);
- is killed, kernel and every process it started included, when the wall-clock limit passes or the
  run ends: the PID namespace dies with its first process, and the caller, a "child subreaper"
  (Linux), sweeps up whatever is left (jupyter_client starts the kernel in a session of its own, and
  papermill's own cell timeout can fire while a cell still reports no exception: the wall clock here
  is the one that counts).

`limits.sandbox=False` (the instructor's `--no-sandbox`, a student's `--self-check`) keeps everything
but the namespaces and the sealed filesystem; a root grader then switches to `limits.uid` with
setuid, and `choose_uid` refuses a uid that cannot run this Python rather than fall back to root
(only a self-check, a student's own code, runs as the user who started it). The child
(`reglab.grading.runner`) reports how papermill ended through a pipe of its own that the kernel does
not inherit; the executed notebook is read back from the working directory, size-limited, and trusted
for nothing but its text.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from reglab.grading.runner import FLOOD_NOTE, MAX_CELL_OUTPUT_BYTES, MAX_REPORT_BYTES  # the child's
from reglab.grading.runner import skip_slow_optional_imports  # noqa: F401 - also the grader's (workers)

INPUT_NAME, OUTPUT_NAME, SPEC_NAME = "submission.ipynb", "executed.ipynb", ".reglab-sandbox.json"
MAX_NOTEBOOK_BYTES = 64 * 2**20      # an executed notebook larger than this is not read back
MAX_STDERR_BYTES = 2000              # of the sandbox's stderr, kept for a run that ended without a report
PR_SET_CHILD_SUBREAPER = 36          # prctl option, <linux/prctl.h>
DEFAULT_UID = 61000                  # student code runs as uid 61000 + worker slot (no account needed)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 300.0         # wall clock for the whole run, kernel start-up included
    memory_mb: int = 4096            # address space of each process (RLIMIT_AS); a ci lab kernel needs ~1.5 GB
    max_file_mb: int = 512           # largest file the notebook may write (RLIMIT_FSIZE)
    uid: int | None = None           # run as this user id (root grader, or in the sandbox); None: the grader's own
    max_processes: int = 256         # RLIMIT_NPROC for that user (threads count); only applied with uid
    python: str = sys.executable     # interpreter of the child; its folder goes first on PATH for the kernel
    sandbox: bool = True             # inside bubblewrap (False: --no-sandbox, --self-check)


@dataclass
class Execution:
    outcome: str                     # "finished" | "timeout" | "kernel-died" | "crashed"
    message: str                     # papermill's or the operating system's words, for the reason column
    wall_s: float
    notebook: dict | None            # the executed notebook as papermill last saved it (None: unreadable)
    flooded: str = ""                # which cells' output was cut, for the reason column ("" when none)


def choose_uid(choice: str, sandboxed: bool) -> int | None:
    """The base uid of student code: 'auto' (61000), a number, or 'self' (the grader's own user, only
    for a grader that is not root). Inside the sandbox any user gets one (a root grader: a real uid;
    an ordinary user: in a user namespace); without it only root can switch, and only to a uid that can
    run this Python. Raises ValueError rather than ever running student code as root."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if choice == "self":
        if root:
            raise ValueError("--sandbox-uid self would run student code as root; choose a uid or 'auto'")
        return None
    base = DEFAULT_UID if choice == "auto" else int(choice)
    if sandboxed:
        return base
    if not root:
        if choice != "auto":
            raise ValueError(f"--sandbox-uid {choice} without the sandbox needs a grader running as root")
        return None
    problem = _uid_cannot_run(base)                           # the others' permissions are the same for every uid
    if problem:
        raise ValueError(f"--no-sandbox: uid {base} cannot run {sys.executable} ({problem}), and student code never "
                         "runs as root: grade with the sandbox, or make Python and the course readable by other users")
    return base


def unavailable(uid: int = DEFAULT_UID, python: str = sys.executable) -> str:
    """"" when the sandbox works here for uid; else why not and what to install or enable (probed once)."""
    from reglab.grading import bwrap
    return bwrap.unavailable(uid, python)


def _uid_cannot_run(uid: int) -> str:
    try:
        probe = subprocess.run([sys.executable, "-c", "import sys; sys.modules['rfc3987_syntax'] = None; "
                                "import reglab.grading.runner, papermill, ipykernel"], user=uid, group=uid,
                               extra_groups=[], cwd="/", capture_output=True, timeout=120,
                               env={"PATH": "/usr/bin:/bin", "HOME": "/", "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)[:200]
    return "" if probe.returncode == 0 else probe.stderr.decode(errors="replace").strip().split("\n")[-1][:200]


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
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    holder = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))   # the folder of reglab/
    if holder not in site.getsitepackages():   # the kernel imports the grader's reglab (in the sandbox: only it)
        paths.insert(0, holder)
    if paths:                                  # what the instructor made importable stays importable
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
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


def _keep_head(stream, limit: int, kept: list) -> None:
    """Read stream to its end, keeping its first limit bytes (the rest is drained, never stored)."""
    size = 0
    for chunk in iter(lambda: stream.read(65536), b""):
        if size < limit:
            kept.append(chunk[: limit - size])
        size += len(chunk)


def flood_note(executed: dict | None) -> str:
    """Which cells of an executed notebook had output dropped, and how much (from the runner's notes)."""
    flooded = []
    head = FLOOD_NOTE.split("{")[0]
    for cell in (executed or {}).get("cells", []):
        outputs = cell.get("outputs") if isinstance(cell, dict) else None
        for output in outputs if isinstance(outputs, list) else []:
            text = output.get("text", "") if isinstance(output, dict) else ""
            text = "".join(text) if isinstance(text, list) else str(text)
            if text.startswith(head):
                flooded.append(f"'{cell.get('id')}'")
                break
    if not flooded:
        return ""
    return (f"cell{'s' if len(flooded) > 1 else ''} {', '.join(flooded[:4])} flooded {'their' if len(flooded) > 1 else 'its'} "
            f"output (over {MAX_CELL_OUTPUT_BYTES // 2**20} MB); the grader kept the first "
            f"{MAX_CELL_OUTPUT_BYTES // 2**20} MB of each cell")


def execute(notebook: dict, workdir: Path, parameters: dict, limits: Limits) -> Execution:
    """Execute notebook (an nbformat dict) in workdir (an empty private folder) under limits."""
    workdir = Path(workdir)
    for sub in ("tmp", ".config/matplotlib", ".ipython", ".jupyter", ".local/jupyter/runtime"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    uid = DEFAULT_UID if limits.sandbox and limits.uid is None else limits.uid
    (workdir / INPUT_NAME).write_text(json.dumps(notebook), encoding="utf-8")
    spec = {"input": str(workdir / INPUT_NAME), "output": str(workdir / OUTPUT_NAME), "cwd": str(workdir),
            "parameters": parameters, "limits": {**asdict(limits), "uid": uid}}
    (workdir / SPEC_NAME).write_text(json.dumps(spec), encoding="utf-8")
    from reglab.grading import bwrap
    problem = bwrap.missing_programs() if limits.sandbox else ""   # the full probe ran once, in the grader
    if problem:                                              # fail closed (a bwrap that cannot set up runs nothing)
        return Execution("crashed", problem, 0.0, None)
    read_end, write_end = os.pipe()
    argv, user = [limits.python, "-m", "reglab.grading.runner", str(workdir / SPEC_NAME), str(write_end)], {}
    if limits.sandbox:
        argv = bwrap.command(argv, workdir, uid, limits.python)
    elif root and uid is not None:
        user = {"user": uid, "group": uid, "extra_groups": []}
    if root and uid is not None:
        _chown_tree(workdir, uid)
    become_subreaper()
    keep = {p for p, (pp, _) in _process_table().items() if pp == os.getpid()}
    start = time.perf_counter()
    try:
        child = subprocess.Popen(
            argv, pass_fds=(write_end,), cwd=workdir, env=sandbox_env(workdir, limits.python),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, **user)
    except OSError as err:
        os.close(read_end)
        os.close(write_end)
        return Execution("crashed", f"could not start the notebook's process: {err}", 0.0, None)
    os.close(write_end)
    stderr: list[bytes] = []
    reader = threading.Thread(target=_keep_head, args=(child.stderr, MAX_STDERR_BYTES, stderr), daemon=True)
    reader.start()
    timed_out = False
    try:
        child.wait(timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        kill_tree(child, keep)                               # also on KeyboardInterrupt / SystemExit
        reader.join(timeout=5)                               # every writer is dead: the pipe is at its end
        child.stderr.close()
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
    flooded = flood_note(executed)
    if timed_out:
        return Execution("timeout", f"still running after {limits.timeout_s:g} s", wall, executed, flooded)
    outcome, message = str(report.get("outcome", "")), str(report.get("message", ""))[:2000]
    if outcome not in ("finished", "kernel-died", "crashed"):
        code = child.returncode
        if limits.sandbox and code is not None and 128 < code < 160:
            code = -(code - 128)                             # bwrap passes on its child's signal as 128 + signal
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        said = b"".join(stderr).decode(errors="replace").strip().splitlines()
        outcome, message = "crashed", f"it ended without a report ({how})" + (f": {said[-1][:300]}" if said else "")
    return Execution(outcome, message, wall, executed, flooded)
