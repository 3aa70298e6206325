"""The grader's sandbox (bubblewrap, `reglab.grading.bwrap`): student code reaches no network, reads and
writes nothing of the machine but its own folder, runs as an unprivileged uid, cannot outlive its run or
fork without bound, and a flood of output is cut and named; without bubblewrap the grader refuses.

One grading run (two workers) of the toy lab's solution with one hostile cell per submission: the
`reader` cell tries every read and connection and prints what happened as one JSON line, the others
each do one bad thing. Each test checks its case and that every row got its own expected verdict.
No test sends a packet to any address but loopback: the outside network is checked by what the
sandbox's network namespace holds (only `lo`, no routes).
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reglab.grading.generate import dumps
from test_grade import GRADING, PRIVATE, ROOT, TOY, grade_cli, read_rows, solution, with_cell

MARK = f"{20000 + os.getpid() % 10000}"     # in the `sleep` arguments of the processes a case leaves behind
RESULT = "REGLAB-SANDBOX-RESULT "
ATTEMPT = '''import json, os, socket
from pathlib import Path

def attempt(action):
    try:
        return "ok: " + str(action())[:300]
    except BaseException as err:
        return type(err).__name__

'''
EXPECTED = {"solution": ("graded", "5"), "reader": ("graded", "5"), "writer": ("graded", "5"),
            "daemon": ("graded", "5"), "processes": ("graded", "5"), "kernel_kill": ("error", "0"),
            "flood": ("graded", "5")}


def reader_source(port: int, home_file: Path, submissions: Path, out: Path) -> str:
    return ATTEMPT + f'''def connect():
    with socket.create_connection(("127.0.0.1", {port}), timeout=3) as s:
        s.sendall(b"hello from the sandbox")
    return "connected"

result = {{
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "root": attempt(lambda: sorted(os.listdir("/root"))), "top": sorted(os.listdir("/")),
    "interfaces": [name for _, name in socket.if_nameindex()],
    "routes": attempt(lambda: open("/proc/net/route").read().splitlines()[1:]),
    "inet6": attempt(lambda: [line.split()[-1] for line in open("/proc/net/if_inet6").read().splitlines()]),
    "sys_class_net": attempt(lambda: sorted(os.listdir("/sys/class/net"))),
    "loopback": attempt(connect),
    "shadow": attempt(lambda: open("/etc/shadow").read()),
    "home": attempt(lambda: open({str(home_file)!r}).read()),
    "home_listing": attempt(lambda: os.listdir({str(home_file.parent)!r})),
    "other_submission": attempt(lambda: open({str(submissions / "solution.ipynb")!r}).read()),
    "submissions": attempt(lambda: os.listdir({str(submissions)!r})),
    "private_tests": attempt(lambda: open({str(PRIVATE / "toy_private.py")!r}).read()),
    "private_listing": attempt(lambda: os.listdir({str(PRIVATE)!r})),
    "private_copy": attempt(lambda: sorted(os.listdir(".reglab-tests"))),
    "output": attempt(lambda: os.listdir({str(out)!r})),
    "output_lock": attempt(lambda: open({str(out / ".grader.lock")!r}).read()),
    "solutions": attempt(lambda: os.listdir({str(ROOT / "solutions")!r})),
    "repository": attempt(lambda: sorted(os.listdir({str(ROOT)!r}))),
}}
print({RESULT!r} + json.dumps(result))'''


def writer_source(submissions: Path, out: Path) -> str:
    targets = [out / "grades.csv", out / "feedback" / "solution.md", out / "forged.txt", submissions / "solution.ipynb"]
    return ATTEMPT + f'''result = {{t: attempt(lambda t=t: Path(t).write_text("solution,graded,999")) for t in {list(map(str, targets))!r}}}
print({RESULT!r} + json.dumps(result))'''


DAEMON = f'''import os
pid = os.fork()
if pid == 0:                                  # double fork: the grandchild is in a session of its own
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sh", ["sh", "-c", "sleep 2.{MARK}; echo late > late-{MARK}.txt; echo late > /tmp/late-{MARK}.txt; sleep 1{MARK}"])
    os._exit(0)
os.waitpid(pid, 0)
print("the daemon is running")'''

PROCESSES = f'''import json, subprocess
children, error = [], None
for _ in range(500):
    try:
        children.append(subprocess.Popen(["sleep", "3{MARK}"]))
    except OSError as err:
        error = type(err).__name__ + ": " + str(err)
        break
started = len(children)
for child in children:
    child.kill()
    child.wait()
print({RESULT!r} + json.dumps({{"started": started, "error": error}}))'''

KILL_KERNEL = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"
FLOOD = "for line in range(6000):\n    print(line, 'x' * 1000)     # about 6 MB"


class Listener:
    """A TCP listener on the host's 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port, self.accepted, self.running = self.socket.getsockname()[1], 0, True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.running:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                continue
            self.accepted += 1
            connection.close()

    def close(self):
        self.running = False
        self.thread.join()
        self.socket.close()


def marked_processes() -> list[str]:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.split("\n")
    marks = (f"sleep 2.{MARK}", f"sleep 1{MARK}", f"sleep 3{MARK}", f"late-{MARK}")
    return [line for line in listing if any(mark in line for mark in marks)]


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    """One grading run of every case; returns (rows, output folder, listener, submissions folder, stdout)."""
    base = tmp_path_factory.mktemp("sandbox")
    out, submissions = base / "out", base / "submissions"
    submissions.mkdir()
    home_file = Path.home() / f".reglab-sandbox-test-{os.getpid()}.txt"
    home_file.write_text("the grader's secret\n")
    listener = Listener()
    try:
        sol = solution()
        cases = {"solution": sol,
                 "reader": with_cell(sol, "experiment", reader_source(listener.port, home_file, submissions, out), "my-reads"),
                 "writer": with_cell(sol, "experiment", writer_source(submissions, out), "my-writes"),
                 "daemon": with_cell(sol, "experiment", DAEMON, "my-daemon"),
                 "processes": with_cell(sol, "experiment", PROCESSES, "my-processes"),
                 "kernel_kill": with_cell(sol, "experiment", KILL_KERNEL, "my-kill"),
                 "flood": with_cell(sol, "experiment", FLOOD, "my-flood")}
        for name, notebook in cases.items():
            (submissions / f"{name}.ipynb").write_text(dumps(notebook), encoding="utf-8")
        run = grade_cli(TOY, submissions, "--out", out, "--workers", 2, "--tests", PRIVATE, "--timeout", 180)
        assert run.returncode == 0, run.stdout + run.stderr
        left = marked_processes()
        yield read_rows(out), out, listener, submissions, run.stdout + run.stderr, left
    finally:
        listener.close()
        home_file.unlink()


def printed(out: Path, name: str, cell_id: str) -> str:
    executed = json.loads((out / "executed" / f"{name}.ipynb").read_text(encoding="utf-8"))
    cell = next(c for c in executed["cells"] if c["id"] == cell_id)
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))


def result(out: Path, name: str, cell_id: str) -> dict:
    line = next(line for line in printed(out, name, cell_id).splitlines() if line.startswith(RESULT))
    return json.loads(line[len(RESULT):])


def assert_every_row_has_its_verdict(rows: dict) -> None:
    assert {name: (row["status"], row["score"]) for name, row in rows.items()} == EXPECTED, \
        {name: row["reason"] for name, row in rows.items()}


def test_student_code_runs_as_an_unprivileged_uid_that_sees_only_python_and_the_course(sealed):
    rows, out, *_ = sealed
    assert_every_row_has_its_verdict(rows)
    seen = result(out, "reader", "my-reads")
    assert seen["uid"] != 0 and seen["gid"] != 0 and seen["groups"] == []
    if os.geteuid() == 0:
        assert seen["uid"] in (61000, 61001)                        # 61000 + the worker's slot
    assert set(seen["top"]) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "tmp",
                                *(Path(p).parts[1] for p in (ROOT, sys.prefix, sys.base_prefix))}
    if Path(sys.base_prefix).is_relative_to("/root"):            # only the interpreter's path under /root
        assert seen["root"] == f"ok: {[Path(sys.base_prefix).relative_to('/root').parts[0]]}"
    assert seen["solutions"] == "FileNotFoundError"                # the repository shows its reglab/ only
    inside = sorted({"reglab", "tests"} | {Path(sys.prefix).relative_to(ROOT).parts[0]
                                           for _ in [0] if Path(sys.prefix).is_relative_to(ROOT)})
    assert seen["repository"] == f"ok: {inside}"        # tests/: the toy lab's checks (PYTHONPATH); .venv/ if it is here
    assert seen["private_copy"] == "ok: ['toy_private.py']"         # the probe files copied in are there


def test_a_tcp_connection_to_a_listener_on_the_hosts_loopback_fails(sealed):
    rows, out, listener, *_ = sealed
    assert_every_row_has_its_verdict(rows)
    assert result(out, "reader", "my-reads")["loopback"] in ("ConnectionRefusedError", "OSError", "TimeoutError")
    assert listener.accepted == 0


def test_the_sandbox_has_no_network_but_its_own_loopback(sealed):
    rows, out, *_ = sealed
    assert_every_row_has_its_verdict(rows)
    seen = result(out, "reader", "my-reads")
    assert seen["interfaces"] == ["lo"]
    assert seen["routes"] == "ok: []"                               # no IPv4 route: no way out
    assert seen["inet6"] in ("ok: []", "ok: ['lo']", "FileNotFoundError")
    assert seen["sys_class_net"] in ("FileNotFoundError", "ok: ['lo']")


@pytest.mark.parametrize("what", ["shadow", "home", "other_submission", "submissions",
                                  "private_tests", "private_listing", "output", "output_lock"])
def test_files_outside_the_submissions_folder_cannot_be_read(sealed, what):
    rows, out, *_ = sealed
    assert_every_row_has_its_verdict(rows)
    seen = result(out, "reader", "my-reads")[what]
    assert not seen.startswith("ok"), f"{what}: {seen}"
    assert "secret" not in seen


def test_the_graders_home_shows_at_most_the_interpreters_path(sealed):
    rows, out, *_ = sealed
    assert_every_row_has_its_verdict(rows)
    seen = result(out, "reader", "my-reads")["home_listing"]
    assert seen == "FileNotFoundError" or (Path.home() == Path("/root") and seen == result(out, "reader", "my-reads")["root"])
    assert ".reglab-sandbox-test" not in seen


def test_the_gradebook_and_another_submissions_feedback_cannot_be_written(sealed):
    rows, out, _, submissions, _, _ = sealed
    assert_every_row_has_its_verdict(rows)
    attempts = result(out, "writer", "my-writes")
    assert len(attempts) == 4 and not any(seen.startswith("ok") for seen in attempts.values()), attempts
    assert rows["solution"]["score"] == "5"
    assert (out / "feedback" / "solution.md").read_text().startswith("# Feedback on `solution`")
    assert not (out / "forged.txt").exists()
    assert json.loads((submissions / "solution.ipynb").read_text())["cells"]


def test_a_double_forked_daemon_dies_with_the_run(sealed):
    rows, out, _, _, _, left = sealed
    assert_every_row_has_its_verdict(rows)
    assert "the daemon is running" in printed(out, "daemon", "my-daemon")
    assert left == [], "processes of the run outlived it"
    time.sleep(3)                                                   # past the daemon's `sleep 2.MARK`
    assert marked_processes() == []
    from tempfile import gettempdir
    assert not list(Path(gettempdir()).glob(f"late-{MARK}.txt")) and not list(Path(gettempdir()).glob(f"*/late-{MARK}.txt"))


def test_500_child_processes_hit_the_process_cap(sealed):
    rows, out, *_ = sealed
    assert_every_row_has_its_verdict(rows)
    seen = result(out, "processes", "my-processes")
    assert seen["started"] < 256 and seen["error"].startswith("BlockingIOError"), seen


def test_a_kernel_that_kills_itself_is_an_error(sealed):
    rows, out, *_ = sealed
    assert_every_row_has_its_verdict(rows)
    assert rows["kernel_kill"]["reason"].startswith("the kernel died")
    assert "passed toy.p_zero_identity" not in printed(out, "kernel_kill", "hidden-tests")   # nothing ran after it


def test_a_flood_of_output_is_cut_and_named_in_the_reason(sealed):
    rows, out, *_ = sealed
    assert_every_row_has_its_verdict(rows)
    assert "cell 'my-flood' flooded its output (over 1 MB); the grader kept the first 1 MB" in rows["flood"]["reason"]
    text = printed(out, "flood", "my-flood")
    assert 2**20 - 10_000 < len(text) < 2**20 + 1000 and text.startswith("0 xxx")
    assert "this cell's output exceeded 1 MB" in text.splitlines()[-1]
    assert "flooded" not in rows["solution"]["reason"]


def test_a_missing_bubblewrap_refuses_to_grade_and_says_what_to_install(tmp_path):
    (tmp_path / "solution.ipynb").write_text(dumps(solution()), encoding="utf-8")
    env = {**os.environ, "REGLAB_BWRAP": str(tmp_path / "no" / "bwrap")}
    run = subprocess.run([sys.executable, "-m", "reglab.grade", str(TOY), str(tmp_path / "solution.ipynb"),
                          "--out", str(tmp_path / "out"), "--tests", str(PRIVATE)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**env, "PYTHONPATH": str(GRADING)})
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"bubblewrap ({tmp_path / 'no' / 'bwrap'}) is not installed" in run.stderr
    assert "apt-get install bubblewrap" in run.stderr and "--no-sandbox" in run.stderr
    assert not (tmp_path / "out").exists()                          # nothing ran, nothing was written


def test_no_sandbox_is_recorded_in_the_reason_or_refused_rather_than_run_as_root(tmp_path):
    from reglab.grading.sandbox import choose_uid
    (tmp_path / "solution.ipynb").write_text(dumps(solution()), encoding="utf-8")
    try:
        choose_uid("auto", sandboxed=False)
        runs_as_another_user = True
    except ValueError:
        runs_as_another_user = False
    run = grade_cli(TOY, tmp_path / "solution.ipynb", "--out", tmp_path / "out", "--tests", PRIVATE, "--no-sandbox")
    if not runs_as_another_user:            # a root grader whose Python other users cannot run: no fallback to root
        assert run.returncode == 2 and "student code never runs as root" in run.stderr, run.stdout + run.stderr
        assert not (tmp_path / "out").exists()
        return
    assert run.returncode == 0 and "--no-sandbox: student code runs without bubblewrap" in run.stderr
    assert read_rows(tmp_path / "out")["solution"]["reason"].endswith("; ran without the sandbox (--no-sandbox)")


def test_the_bwrap_command_shows_the_course_package_but_not_the_repository(tmp_path):
    from reglab.grading import bwrap
    command = bwrap.command(["python", "-c", "pass"], tmp_path, 61000)
    for flag in ("--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent", "--new-session"):
        assert flag in command
    binds = [command[i + 1] for i, arg in enumerate(command) if arg in ("--ro-bind", "--bind")]
    assert str(ROOT / "reglab") in binds and str(ROOT) not in binds and str(tmp_path) in binds
    assert not any(Path(b).is_relative_to(ROOT / "solutions") or Path(b).is_relative_to(PRIVATE) for b in binds)
    assert "/etc" not in binds and "/home" not in binds and "/root" not in binds
    assert command[command.index("--") + 1:][-3:] == ["python", "-c", "pass"]


def test_the_sandbox_fails_closed_when_bubblewrap_is_missing_or_cannot_set_up(tmp_path, monkeypatch):
    from reglab.grading import bwrap
    from reglab.grading.sandbox import Limits, execute
    monkeypatch.setattr(bwrap, "BWRAP", str(tmp_path / "missing-bwrap"))
    run = execute({"cells": []}, tmp_path / "work", {}, Limits(timeout_s=30, uid=61000))
    assert run.outcome == "crashed" and "bubblewrap" in run.message and "is not installed" in run.message
    assert not (tmp_path / "work" / "executed.ipynb").exists()
    broken = tmp_path / "broken-bwrap"                  # a bubblewrap that cannot make its namespaces
    broken.write_text("#!/bin/sh\necho 'bwrap: Creating new namespace failed: Operation not permitted' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(bwrap, "BWRAP", str(broken))
    said = bwrap.unavailable(61000)
    assert said.startswith("the sandbox cannot start") and "Creating new namespace failed" in said
    assert ("user namespace" in said) == (os.geteuid() != 0)
