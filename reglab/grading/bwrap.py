"""Grading room: the bubblewrap command line that seals one graded run off from the machine.

`command(argv, workdir, uid)` wraps the sandbox's runner (papermill and, under it, the kernel) in
bubblewrap (`bwrap`, https://github.com/containers/bubblewrap): new network, PID, IPC, UTS and
cgroup namespaces, its own session, killed with its parent, and a filesystem built from nothing
that holds, read-only, only what the interpreter needs (see `_read_only_trees`), plus the
submission's working folder (writable) and an empty private /tmp. `unavailable(uid)` answers,
from one tiny probe run (cached per process), whether that works on this machine, and if not,
what to install or enable; `missing_programs()` is its cheap half (are the programs there?).

Who the code runs as: a root grader has bubblewrap make every bind as root (an interpreter under
/root is reachable only so), then `setpriv` inside drops to the unprivileged uid before Python
starts; an ordinary user's bubblewrap maps the uid in a new user namespace instead.
"""
from __future__ import annotations

import importlib.machinery
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import reglab

BWRAP = os.environ.get("REGLAB_BWRAP", "bwrap")        # the bubblewrap program (tests point it at a missing file)
SETPRIV = os.environ.get("REGLAB_SETPRIV", "setpriv")  # util-linux's setpriv: drops root's uid inside the sandbox
SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")   # merged-/usr: mostly symlinks
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "localtime")   # the dynamic loader's, no more
MAX_PATH_MEMBERS = 500                                  # importable entries bound per PYTHONPATH folder
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`), "
                "or pass --no-sandbox to run student code without it (not recommended)")


def _is_under(path: str, trees) -> bool:
    return any(path == tree or path.startswith(tree.rstrip("/") + "/") for tree in trees)


def _importable_members(folder: Path) -> list[str]:
    """What an instructor's PYTHONPATH folder makes importable: its modules and its packages (folders
    with an __init__.py), not its other files and folders (a private tests folder, say)."""
    suffixes = tuple(importlib.machinery.all_suffixes())
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    members = [str(p) for p in entries if not p.name.startswith(".") and
               ((p.is_file() and p.name.endswith(suffixes)) or (p.is_dir() and (p / "__init__.py").is_file()))]
    return members[:MAX_PATH_MEMBERS]


def _read_only_trees(python: str) -> list[str]:
    """Real paths to show read-only: the interpreter's prefix, the environment and its site-packages,
    the imported course package (its folder only: not the repository, whose solutions/ stay hidden),
    and the modules and packages of each PYTHONPATH folder."""
    course = os.path.dirname(os.path.realpath(reglab.__file__))
    wanted = [sys.base_prefix, sys.prefix, *site.getsitepackages(), course, os.path.realpath(python)]
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and os.path.isdir(entry) and os.path.realpath(entry) != os.path.dirname(course):
            wanted += _importable_members(Path(entry))
    return [os.path.realpath(p) for p in wanted if os.path.exists(p)]


def command(argv: list[str], workdir: Path, uid: int, python: str = sys.executable) -> list[str]:
    """The bwrap command line that runs argv as uid, sealed off, in workdir (which must exist)."""
    workdir = os.path.realpath(workdir)
    args = [BWRAP, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--hostname", "reglab-sandbox"]
    root = os.geteuid() == 0
    if not root:                         # an ordinary user: the uid exists only in a new user namespace
        args += ["--unshare-user", "--disable-userns", "--uid", str(uid), "--gid", str(uid)]
    args += ["--dev", "/dev", "--proc", "/proc", "--perms", "01777", "--tmpfs", "/tmp"]
    made, shown = {"/", "/dev", "/proc", "/tmp"}, []

    def parents(path: str) -> None:      # bwrap would make missing parents 0700: make them 0755 (a uid must pass)
        missing = []
        for parent in Path(path).parents:
            if str(parent) in made or _is_under(str(parent), shown):
                break
            missing.append(str(parent))
        for parent in reversed(missing):
            args.extend(["--perms", "0755", "--dir", parent])
            made.add(parent)

    for tree in SYSTEM_TREES:
        if os.path.islink(tree):
            args += ["--symlink", os.readlink(tree), tree]
        elif os.path.isdir(tree):
            args += ["--ro-bind", tree, tree]
            shown.append(tree)
    for name in ETC_FILES:
        if os.path.exists(f"/etc/{name}"):
            parents(f"/etc/{name}")
            args += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
            shown.append(f"/etc/{name}")
    for tree in sorted(set(_read_only_trees(python))):         # a folder sorts before what is inside it
        if not _is_under(tree, shown):
            parents(tree)
            args += ["--ro-bind", tree, tree]
            shown.append(tree)
    for path in {os.path.abspath(python), os.path.abspath(sys.prefix)} - set(shown):   # a symlinked venv path
        if not _is_under(path, shown) and os.path.islink(path):
            parents(path)
            args += ["--symlink", os.path.realpath(path), path]
    parents(workdir)
    args += ["--bind", workdir, workdir, "--chdir", workdir, "--"]
    if root:
        setpriv = shutil.which(SETPRIV) or SETPRIV
        args += [setpriv, "--reuid", str(uid), "--regid", str(uid), "--clear-groups", "--no-new-privs",
                 "--inh-caps=-all", "--bounding-set=-all", "--"]
    return args + list(argv)


_PROBED: dict[tuple, str] = {}


def unavailable(uid: int, python: str = sys.executable) -> str:
    """"" when a sandboxed interpreter starts here as uid; else what is missing and how to get it.
    One probe run per (bwrap, uid, python) and process."""
    key = (BWRAP, SETPRIV, uid, python)
    if key not in _PROBED:
        _PROBED[key] = _probe(uid, python)
    return _PROBED[key]


def missing_programs() -> str:
    """"" when bwrap (and, for a root grader, setpriv) can be found; else what to install. No probe run."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux (bubblewrap), this is {sys.platform}; pass --no-sandbox to grade without it"
    if shutil.which(BWRAP) is None:
        return f"the sandbox cannot start: bubblewrap ({BWRAP}) is not installed; {INSTALL_HINT}"
    if os.geteuid() == 0 and shutil.which(SETPRIV) is None:
        return (f"the sandbox cannot start: setpriv ({SETPRIV}) is missing; install util-linux "
                "(Debian/Ubuntu: `apt-get install util-linux`)")
    return ""


def _probe(uid: int, python: str) -> str:
    missing = missing_programs()
    if missing:
        return missing
    with tempfile.TemporaryDirectory(prefix="reglab-sandbox-probe-") as folder:
        if os.geteuid() == 0:
            os.chown(folder, uid, uid)
        try:
            run = subprocess.run(command([python, "-I", "-c", "import os; print(os.getuid())"], Path(folder), uid, python),
                                 cwd=folder, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                                 env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        except (OSError, subprocess.SubprocessError) as err:
            return f"the sandbox cannot start: {err}; {INSTALL_HINT}"
    if run.returncode == 0 and run.stdout.strip() == str(uid):
        return ""
    said = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1][:300]
    if os.geteuid() != 0 and ("namespace" in said or "Operation not permitted" in said or "Permission denied" in said):
        return (f"the sandbox cannot start: bubblewrap cannot create a user namespace ({said}); enable them "
                "(`sysctl -w kernel.unprivileged_userns_clone=1` or `user.max_user_namespaces=15000`; Ubuntu 24.04: "
                "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`), run the grader as root, or pass "
                "--no-sandbox (not recommended)")
    return (f"the sandbox cannot start: a sandboxed {python} did not run as uid {uid} ({said}); "
            "pass --no-sandbox to grade without it (not recommended)")
