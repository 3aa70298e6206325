"""The course as a student meets it: JupyterLab in headless Chromium, every cell run, every slider moved.

`JupyterLab` starts a server on 127.0.0.1 (random port and token, fresh settings) and stops exactly the
processes it started. `check_notebooks` opens notebooks in a few browser tabs at once and returns one
`Report` per notebook: what went wrong (errors, missing sliders, sliders whose output does not change)
and how long each stage took. tests/test_browser.py turns the reports into test cases.

What the kernel did is read from the kernel's websocket (execute requests and replies, error messages,
the comm messages a slider sends), so "every cell ran" and "this slider's callback finished" are known
exactly instead of guessed from the page; what the student sees is read from the page itself.
"""
from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 900}
SLIDER_KINDS = ("IntSlider", "FloatSlider", "FloatLogSlider", "SelectionSlider",
                "IntRangeSlider", "FloatRangeSlider", "SelectionRangeSlider")
INTERACT_NAMES = ("interact", "interactive", "interact_manual")
KEY_PRESSES = 3                  # ArrowRight presses per slider ("a few", as a student would)
RUN_TIMEOUT_S = 300              # Run All Cells, per notebook (ci budget: <= 20 s alone, more when shared)
CALLBACK_TIMEOUT_S = 60          # one slider's callbacks
MAX_SHOT_PX = 16000              # the tallest single screenshot (Chromium's limit is about 16k pixels)
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s*Cell In\[\d+\], line \d+", re.M)

# A fresh user-settings directory: no news or update checks, every cell attached to the page, and no
# autosave (a run notebook is "dirty": saving it would write outputs into the course's files).
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}
# And a server that refuses to write any file, with its checkpoints outside the repository.
SERVER_CONFIG = """\
from tornado.web import HTTPError

def refuse_to_save(model, path, contents_manager, **kwargs):
    raise HTTPError(403, f"the browser test never writes files (asked to save {{path}})")

c.FileContentsManager.pre_save_hook = refuse_to_save
c.FileCheckpoints.checkpoint_dir = {checkpoints!r}
"""


# ---------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks): tells a process from a later one with its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def descendants(root_pid: int) -> dict[int, str]:
    """{pid: start time} of every live process below root_pid (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, list(children.get(root_pid, []))
    while todo:
        pid = todo.pop()
        start = process_start_time(pid)
        if start is not None:
            found[pid] = start
            todo.extend(children.get(pid, []))
    return found


class JupyterLab:
    """`with JupyterLab(root) as lab:` a server from this Python's environment, serving root."""

    def __init__(self, root: Path, env: dict | None = None, log_path: Path | None = None,
                 startup_timeout_s: float = 120):
        self.root, self.extra_env, self.startup_timeout_s = Path(root), env or {}, startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.token = secrets.token_hex(24)
        self.port = 0
        self.home = Path(tempfile.mkdtemp(prefix="reglab-jupyterlab-"))     # settings, runtime files
        self.log_path = Path(log_path) if log_path else self.home / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def environment(self) -> dict:
        env = dict(os.environ)
        for name in ("settings", "workspaces", "config", "data", "runtime", "ipython"):
            (self.home / name).mkdir(exist_ok=True)
        (self.home / "config" / "jupyter_server_config.py").write_text(
            SERVER_CONFIG.format(checkpoints=str(self.home / "checkpoints")))
        for rel, values in SETTINGS.items():
            path = self.home / "settings" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env.update(JUPYTERLAB_SETTINGS_DIR=str(self.home / "settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(self.home / "workspaces"),
                   JUPYTER_CONFIG_DIR=str(self.home / "config"),
                   JUPYTER_DATA_DIR=str(self.home / "data"),       # no user kernelspec overrides ours
                   JUPYTER_RUNTIME_DIR=str(self.home / "runtime"),
                   IPYTHONDIR=str(self.home / "ipython"),
                   PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        return env

    def start(self):
        self.port = free_port()
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--LabApp.news_url=", "--LabApp.expose_app_in_browser=True"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        # Its own session, so that stop() can signal the server's whole process group and nothing else.
        self.proc = subprocess.Popen(cmd, env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.proc.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                self.api("GET", "api/status", timeout=2)
                return
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"JupyterLab did not answer on {self.url} within {self.startup_timeout_s} s:\n"
                           f"{self.log_tail()}")

    def api(self, method: str, path: str, timeout: float = 10):
        request = urllib.request.Request(self.url + path, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    def stop(self):
        """SIGTERM the server's process group (it shuts its kernels down), then SIGKILL whatever it started
        that is still alive: its group, and each descendant (kernels run in sessions of their own)."""
        if self.proc is None:
            shutil.rmtree(self.home, ignore_errors=True)
            return
        started = descendants(self.proc.pid)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        for pid, start in started.items():
            if process_start_time(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc = None
        shutil.rmtree(self.home, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# What a notebook's source promises
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CodeCell:
    index: int              # among the notebook's code cells, in order
    id: str
    source: str
    tags: list
    sliders: int            # sliders this cell's source creates (and so should show)

    @property
    def name(self) -> str:
        return f"cell {self.id!r} (code cell {self.index + 1})"

    @property
    def may_raise(self) -> bool:
        return "raises-exception" in self.tags


def callee_name(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def count_sliders(source: str) -> int:
    """Slider constructors in a cell, plus interact's (min, max[, step]) tuples, which also make sliders.
    IPython lines (%magic, !shell) are blanked first; a cell that does not parse counts 0."""
    python = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    try:
        tree = ast.parse(python)
    except SyntaxError:
        return 0
    count = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = callee_name(node)
        if name in SLIDER_KINDS:
            count += 1
        elif name in INTERACT_NAMES:
            count += sum(isinstance(kw.value, ast.Tuple) and 2 <= len(kw.value.elts) <= 3
                         and all(isinstance(e, ast.Constant) and isinstance(e.value, (int, float))
                                 for e in kw.value.elts) for kw in node.keywords)
    return count


def code_cells(path: Path) -> list[CodeCell]:
    nb = json.loads(Path(path).read_text())
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        cells.append(CodeCell(len(cells), cell.get("id", "?"), source,
                              cell.get("metadata", {}).get("tags", []), count_sliders(source)))
    return cells


# ---------------------------------------------------------------------------------------------------------
# What the kernel does, read from its websocket
# ---------------------------------------------------------------------------------------------------------
def decode_frame(payload) -> dict | None:
    """A kernel websocket frame as {channel, header, parent_header, content}: JSON text (the legacy
    protocol) or the binary v1.kernel.websocket.jupyter.org layout (offset count, offsets, channel,
    header, parent header, metadata, content, buffers)."""
    try:
        if isinstance(payload, str):
            msg = json.loads(payload)
            return {key: msg.get(key) or {} for key in ("channel", "header", "parent_header", "content")}
        data = bytes(payload)
        n = int.from_bytes(data[:8], "little")
        offsets = [int.from_bytes(data[8 * (i + 1):8 * (i + 2)], "little") for i in range(n)]
        parts = [data[offsets[i]:offsets[i + 1]] for i in range(n - 1)]
        header, parent, _metadata, content = (json.loads(part) for part in parts[1:5])
        return {"channel": parts[0].decode(), "header": header, "parent_header": parent, "content": content}
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


class KernelTraffic:
    """Bookkeeping of one tab's kernel messages."""

    def __init__(self):
        self.kernel_id: str | None = None
        self.ready = False                      # a kernel_info_reply came back
        self.executes: dict[str, str] = {}      # execute_request msg_id -> code, in send order
        self.replies: dict[str, dict] = {}      # execute_request msg_id -> execute_reply content
        self.comm_sent: set[str] = set()        # comm_msg msg_ids (a widget told the kernel something)
        self.comm_done: set[str] = set()        # ... whose handling finished (status idle)
        self.errors: list[tuple[str, str, dict]] = []   # (parent msg_type, parent msg_id, error content)
        self.died = False                       # the server said the kernel died or is restarting
        self.death = ""
        self.last_event = time.monotonic()

    def attach(self, ws):
        match = re.search(r"/api/kernels/([0-9a-f-]+)/channels", ws.url)
        if not match:
            return
        self.kernel_id = match.group(1)
        ws.on("framesent", self.on_sent)
        ws.on("framereceived", self.on_received)

    def on_sent(self, payload):
        msg = decode_frame(payload)
        if msg is None:
            return
        kind, msg_id = msg["header"].get("msg_type"), msg["header"].get("msg_id")
        if kind == "execute_request":
            self.executes[msg_id] = msg["content"].get("code", "")
        elif kind == "comm_msg":
            self.comm_sent.add(msg_id)
        self.last_event = time.monotonic()

    def on_received(self, payload):
        msg = decode_frame(payload)
        if msg is None:
            return
        kind = msg["header"].get("msg_type")
        parent_kind, parent_id = msg["parent_header"].get("msg_type"), msg["parent_header"].get("msg_id")
        if kind == "kernel_info_reply":
            self.ready = True
        elif kind == "execute_reply":
            self.replies[parent_id] = msg["content"]
        elif kind == "error":
            self.errors.append((parent_kind, parent_id, msg["content"]))
        elif kind == "status":
            state = msg["content"].get("execution_state")
            if state == "idle" and parent_kind == "comm_msg":
                self.comm_done.add(parent_id)
            elif state in ("dead", "restarting"):
                self.died = True
                self.death = f"{state} (kernel {self.kernel_id})"
        self.last_event = time.monotonic()

    @property
    def comms_pending(self) -> int:
        return len(self.comm_sent - self.comm_done)


# ---------------------------------------------------------------------------------------------------------
# One notebook in one tab
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Report:
    path: str
    problems: list = field(default_factory=list)
    sliders_expected: int = 0
    sliders_found: int = 0
    sliders_responding: int = 0
    cells_run: int = 0
    cells: int = 0
    screenshots: list = field(default_factory=list)    # one file, or several parts for a long notebook
    stages: dict = field(default_factory=dict)      # stage -> seconds

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stages.items())
        return (f"{self.path}: {self.cells_run}/{self.cells} code cells ran, sliders "
                f"{self.sliders_responding} responding / {self.sliders_found} shown / "
                f"{self.sliders_expected} declared; {stages}")


# Page-side helpers. A slider's "view" is what it drives, as the student sees it: the text, images and
# SVG of the outputs in its interact box (or its cell), without the sliders themselves (their readouts
# change whenever they move) and without layout attributes the page changes on every redraw.
JS_VIEW = """(slider) => {
  const box = slider.closest('.widget-interact') || slider.closest('.jp-Cell-outputArea, .jp-OutputArea');
  const copy = box.cloneNode(true);
  copy.querySelectorAll('.widget-slider').forEach(n => n.remove());
  return Array.from(copy.querySelectorAll('.jp-OutputArea-output')).map(out =>
    (out.dataset.mimeType || '') + ': ' + out.textContent + ' '
    + Array.from(out.querySelectorAll('img')).map(img => img.src).join(' ')
    + Array.from(out.querySelectorAll('svg')).map(svg => svg.outerHTML).join(' ')).join('\\n');
}"""
# What the slider shows as its value: the readout (noUiSlider's aria-valuenow is rounded for floats,
# and is an index for a SelectionSlider).
JS_SLIDER_VALUE = """(slider) => {
  const readout = slider.querySelector('.widget-readout');
  const handle = slider.querySelector('.noUi-handle');
  return (readout ? readout.textContent.trim() : '') || (handle ? handle.getAttribute('aria-valuenow') : '');
}"""
JS_CELL_STATE = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell')).map(cell => ({
  prompt: (cell.querySelector('.jp-InputArea-prompt') || {}).textContent || '',
  sliders: cell.querySelectorAll('.jp-Cell-outputArea .widget-slider').length,
  widgetErrors: cell.querySelectorAll('.jupyter-widgets-error-widget').length,
  stderr: Array.from(cell.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
                .map(n => n.textContent),
}))"""
JS_SCROLL_ON = """() => {
  const outer = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer');
  const cells = outer ? outer.querySelectorAll('.jp-Cell') : [];
  if (!cells.length) return false;
  const bottom = outer.getBoundingClientRect().bottom;
  if (cells[cells.length - 1].getBoundingClientRect().bottom <= bottom) return false;
  outer.scrollTop += outer.clientHeight - 40;
  return true;
}"""
JS_SCROLL_TO_TOP = """() => {
  const outer = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer');
  if (!outer) return document.body.scrollHeight;
  outer.scrollTop = 0;
  const cells = outer.querySelectorAll('.jp-Cell');
  const last = cells[cells.length - 1].getBoundingClientRect().bottom;
  return Math.ceil(last + (window.innerHeight - outer.getBoundingClientRect().bottom));
}"""


async def wait_until(predicate, timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll predicate (a function, or a coroutine function) until it is true; False after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return True
        await asyncio.sleep(interval_s)
    return False


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


async def run_all_cells(page, traffic: KernelTraffic, cells: list[CodeCell], report: Report):
    """Run menu -> Run All Cells; return when every request has its reply and nothing new is sent,
    with every non-empty code cell sent or the run stopped by an error."""
    await page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    await page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    expected = sum(bool(c.source.strip()) for c in cells)

    def finished():
        if traffic.died:
            return True
        if len(traffic.replies) < len(traffic.executes) or not traffic.executes:
            return False
        stopped = any(r.get("status") == "error" for r in traffic.replies.values())
        quiet = time.monotonic() - traffic.last_event > 1.0
        return len(traffic.executes) >= expected or (stopped and quiet)

    if not await wait_until(finished, RUN_TIMEOUT_S):
        report.problems.append(f"Run All Cells did not finish in {RUN_TIMEOUT_S} s: "
                               f"{len(traffic.replies)} of {len(traffic.executes)} requests answered, "
                               f"{expected} code cells")
    elif traffic.died:
        report.problems.append(f"the kernel died while running code cell {len(traffic.replies) + 1} of {expected}")


def cell_errors(traffic: KernelTraffic, cells: list[CodeCell], report: Report) -> set:
    """Errors the kernel raised while running cells (cells tagged raises-exception may raise); returns
    the indices of the cells it reported."""
    by_source: dict[str, list[CodeCell]] = {}
    for cell in cells:
        by_source.setdefault(cell.source, []).append(cell)
    cell_of: dict[str, CodeCell | None] = {}
    for msg_id, code in traffic.executes.items():
        candidates = by_source.get(code) or [None]
        cell_of[msg_id] = candidates.pop(0) if len(candidates) > 1 else candidates[0]
    report.cells = sum(bool(c.source.strip()) for c in cells)
    flagged = set()
    report.cells_run = sum(r.get("status") == "ok" or (r.get("status") == "error" and (cell_of.get(m) and
                           cell_of[m].may_raise)) for m, r in traffic.replies.items())
    for msg_id, reply in traffic.replies.items():
        cell = cell_of.get(msg_id)
        where = cell.name if cell else "a cell"
        if reply.get("status") == "error" and not (cell and cell.may_raise):
            report.problems.append(f"{where} raised {reply.get('ename')}: {reply.get('evalue')}")
            flagged.add(cell and cell.index)
        elif reply.get("status") == "aborted":
            report.problems.append(f"{where} did not run (aborted after an earlier error)")
            flagged.add(cell and cell.index)
    return flagged


async def check_page(page, cells: list[CodeCell], report: Report, flagged: set):
    """After the run: every cell has a prompt number, shows no traceback or broken widget, and shows
    the sliders its source declares. The page draws a moment after the kernel is done: wait until no
    prompt says [*] and all declared sliders show (or their count has not changed for 3 s).
    Cells in flagged are already reported."""
    expected = [c.sliders for c in cells]
    seen = {"counts": None, "since": time.monotonic()}

    async def page_caught_up():
        state = await page.evaluate(JS_CELL_STATE)
        counts = [s["sliders"] for s in state]
        if counts != seen["counts"]:
            seen.update(counts=counts, since=time.monotonic())
        busy = any("*" in s["prompt"] for s in state)
        return not busy and (len(counts) == len(cells) and all(c >= e for c, e in zip(counts, expected))
                             or time.monotonic() - seen["since"] > 3)

    await wait_until(page_caught_up, 30)
    state = await page.evaluate(JS_CELL_STATE)
    if len(state) != len(cells):
        report.problems.append(f"the page shows {len(state)} code cells, the file has {len(cells)}")
        return
    report.sliders_expected = sum(expected)
    report.sliders_found = sum(s["sliders"] for s in state)
    for cell, shown in zip(cells, state):
        if cell.index in flagged:          # it raised or never ran: nothing more to say about it
            continue
        if shown["widgetErrors"]:
            report.problems.append(f"{cell.name} shows a widget that failed to render")
        if shown["sliders"] < cell.sliders:
            report.problems.append(f"{cell.name} declares {cell.sliders} slider(s) but shows {shown['sliders']}")
        elif shown["sliders"] > cell.sliders:
            report.problems.append(
                f"{cell.name} shows {shown['sliders']} slider(s) but its source declares {cell.sliders}: interact "
                "also makes a slider for each parameter with a default that it is not given (pass fixed(...))")
        if not cell.may_raise and any(TRACEBACK.search(text) for text in shown["stderr"]):
            report.problems.append(f"{cell.name} shows an error: "
                                   + next(t for t in shown["stderr"] if TRACEBACK.search(t))[-300:])
        if cell.source.strip() and not re.search(r"\[\d+\]", shown["prompt"]):
            report.problems.append(f"{cell.name} has no execution count (prompt {shown['prompt']!r})")


async def move_sliders(page, traffic: KernelTraffic, cells: list[CodeCell], report: Report):
    """Each slider: focus its handle, press ArrowRight a few times (ArrowLeft if it sits at its maximum),
    wait until the kernel has handled every message the widget sent, and compare the output it drives."""
    code_cells_on_page = page.locator(".jp-Notebook .jp-CodeCell")
    for cell in cells:
        sliders = code_cells_on_page.nth(cell.index).locator(".jp-Cell-outputArea .widget-slider")
        for k in range(await sliders.count()):
            slider = sliders.nth(k)
            label = (await slider.evaluate("s => (s.querySelector('.widget-label') || {}).textContent || ''")).strip()
            name = f"slider {label!r} of {cell.name}" if label else f"slider {k + 1} of {cell.name}"
            handle = slider.locator(".noUi-handle").first
            await handle.scroll_into_view_if_needed()
            before = await slider.evaluate(JS_VIEW)
            value_before = await slider.evaluate(JS_SLIDER_VALUE)
            errors_before = len(traffic.errors)

            async def moved():
                return await slider.evaluate(JS_SLIDER_VALUE) != value_before

            async def redrawn():
                return await slider.evaluate(JS_VIEW) != before

            await handle.focus()
            for key in ("ArrowRight", "ArrowLeft"):
                for _ in range(KEY_PRESSES):
                    await handle.press(key)
                if await wait_until(moved, 3):        # the readout follows within a frame or two
                    break
            else:
                report.problems.append(f"{name} did not move with the arrow keys (value {value_before})")
                continue
            await asyncio.sleep(0.3)                           # let the widget send its update
            if not await wait_until(lambda: traffic.comms_pending == 0, CALLBACK_TIMEOUT_S):
                report.problems.append(f"{name}: the kernel did not finish its callback in {CALLBACK_TIMEOUT_S} s")
                continue
            await wait_until(redrawn, 5)                       # the page draws what the kernel sent
            after = await settled(slider)
            new_errors = [e for e in traffic.errors[errors_before:] if e[0] == "comm_msg"]
            if new_errors:
                content = new_errors[0][2]
                report.problems.append(f"{name}: moving it raised {content.get('ename')}: {content.get('evalue')}")
            elif TRACEBACK.search(after):
                report.problems.append(f"{name}: moving it shows a traceback")
            elif after == before:
                report.problems.append(f"{name}: moving it (value {value_before} -> "
                                       f"{await slider.evaluate(JS_SLIDER_VALUE)}) did not change the "
                                       f"output it drives (still {digest(before)})")
            else:
                report.sliders_responding += 1


async def settled(slider, interval_s: float = 0.25, timeout_s: float = 10) -> str:
    """The slider's output once two reads in a row agree (images and text render a moment after the
    kernel's messages arrive)."""
    previous = await slider.evaluate(JS_VIEW)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(interval_s)
        current = await slider.evaluate(JS_VIEW)
        if current == previous:
            return current
        previous = current
    return previous


async def screenshot(page, path: Path) -> list[Path]:
    """The whole notebook: scroll it to the top and make the window as tall as the notebook. Chromium
    captures at most about 16k pixels at once, so a longer notebook continues in <name>_part2.png, ..."""
    await page.keyboard.press("Escape")                  # command mode: no cursor, no highlighted cell
    height = await page.evaluate(JS_SCROLL_TO_TOP)       # the window height that shows the last cell
    await page.set_viewport_size({"width": VIEWPORT["width"], "height": min(max(height + 40, 600), MAX_SHOT_PX)})
    await asyncio.sleep(0.5)
    await page.evaluate(JS_SCROLL_TO_TOP)
    path.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(path))
    shots = [path]
    while await page.evaluate(JS_SCROLL_ON):
        await asyncio.sleep(0.3)
        shots.append(path.with_name(f"{path.stem}_part{len(shots) + 1}{path.suffix}"))
        await page.screenshot(path=str(shots[-1]))
    return shots


class Tab:
    """One browser tab running JupyterLab. Notebooks open in it one after another, as a student opens
    them from the file browser: the app loads once per tab (a reload costs seconds of CPU), and after a
    notebook whose check failed midway the tab is reloaded, so one stuck page does not spoil the next.
    Each tab has a browser context (a window) of its own: tabs sharing a window are drawn at a few frames
    per second unless in front, and JupyterLab then lags behind its kernel."""

    def __init__(self, browser, lab: JupyterLab, name: str):
        self.browser, self.lab, self.name = browser, lab, name
        self.context = None
        self.page = None
        self.loads = 0
        self.traffic = KernelTraffic()

    async def open(self, rel: str):
        """Show notebook rel alone in the main area, its kernel traffic recorded from the start."""
        self.traffic = KernelTraffic()
        if self.page is None:
            if self.context is None:
                self.context = await self.browser.new_context(viewport=VIEWPORT)
            self.page = await self.context.new_page()
            self.page.set_default_timeout(120_000)
            self.page.on("websocket", lambda ws: self.traffic.attach(ws))
            self.loads += 1
            # A workspace of its own per load: a clean layout, and no tab fights another over "default".
            await self.page.goto(f"{self.lab.url}lab/workspaces/{self.name}-{self.loads}/tree/{rel}"
                                 f"?reset&token={self.lab.token}")
            await self.page.wait_for_selector(".jp-Notebook .jp-Cell")
            side_panel = self.page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
            if await side_panel.count():             # the notebook gets the width
                await side_panel.first.click()
        else:
            await self.page.set_viewport_size(VIEWPORT)
            await self.page.evaluate(JS_OPEN, rel)
            await self.page.wait_for_selector(".jp-Notebook .jp-Cell")

    async def close_notebook(self):
        """Close the notebook without saving it, then shut its kernel down."""
        if self.page is not None:
            try:
                await self.page.evaluate(JS_CLOSE_ALL)
            except Exception:
                await self.reload_next_time()
        if self.traffic.kernel_id:
            try:
                await asyncio.to_thread(self.lab.api, "DELETE", f"api/kernels/{self.traffic.kernel_id}")
            except OSError:
                pass

    async def reload_next_time(self):
        if self.page is not None:
            try:
                await self.page.close()
            except Exception:           # already gone with a crashed renderer: nothing to close
                pass
        self.page = None

    async def close(self):
        await self.reload_next_time()
        if self.context is not None:
            await self.context.close()
        self.context = None


# With the app exposed (LabApp.expose_app_in_browser): close every document in the main area without
# a "save changes?" dialog, and open a file as the file browser does.
JS_CLOSE_ALL = """() => {
  for (const widget of Array.from(window.jupyterapp.shell.widgets('main'))) widget.dispose();
  return true;
}"""
JS_OPEN = """async (path) => {
  for (const widget of Array.from(window.jupyterapp.shell.widgets('main'))) widget.dispose();
  await window.jupyterapp.commands.execute('docmanager:open', {path});
  return true;
}"""


async def check_notebook(tab: Tab, rel: str, cells: list[CodeCell], screenshot_path: Path | None) -> Report:
    """Open, run all, check the page, move every slider, take a screenshot: one notebook's Report."""
    report = Report(rel)
    clock = time.monotonic()

    def stage(name):
        nonlocal clock
        now = time.monotonic()
        report.stages[name] = now - clock
        clock = now

    try:
        await tab.open(rel)
        page, traffic = tab.page, tab.traffic
        stage("open")
        if not await wait_until(lambda: traffic.ready or traffic.died, 120):
            report.problems.append("the kernel did not start (no kernel_info_reply in 120 s)")
            return report
        if traffic.died:
            report.problems.append(f"the kernel died as it started: {traffic.death}")
            return report
        stage("kernel")
        await run_all_cells(page, traffic, cells, report)
        flagged = cell_errors(traffic, cells, report)
        stage("run")
        await check_page(page, cells, report, flagged)
        await move_sliders(page, traffic, cells, report)
        stage("sliders")
        if screenshot_path is not None:
            report.screenshots = [str(shot) for shot in await screenshot(page, screenshot_path)]
            stage("screenshot")
    except Exception as error:       # a stuck page is a problem of this notebook, not of the whole run
        report.problems.append(f"browser step failed: {type(error).__name__}: {str(error)[:500]}")
        if tab.page is not None and screenshot_path is not None and not report.screenshots:
            try:                     # what the page looked like when it failed
                await tab.page.screenshot(path=str(screenshot_path), timeout=20_000)
                report.screenshots = [str(screenshot_path)]
            except Exception:
                pass
        await tab.reload_next_time()
    finally:
        await tab.close_notebook()
    return report


async def check_notebooks_async(lab: JupyterLab, root: Path, paths, screenshots: Path | None, tabs: int):
    from playwright.async_api import async_playwright
    rels = [Path(path).resolve().relative_to(root.resolve()) for path in paths]
    queue: asyncio.Queue = asyncio.Queue()
    for path, rel in zip(paths, rels):
        queue.put_nowait((Path(path), rel))
    reports = {}

    async def work(tab: Tab):
        while not queue.empty():
            path, rel = queue.get_nowait()
            shot = screenshots / ("__".join(rel.with_suffix("").parts[-2:]) + ".png") if screenshots else None
            try:
                cells = code_cells(path)
            except (OSError, ValueError) as error:     # renamed or half-written by someone else's edit
                reports[rel.as_posix()] = Report(rel.as_posix(), [f"could not read the notebook: {error}"])
                continue
            reports[rel.as_posix()] = await check_notebook(tab, rel.as_posix(), cells, shot)
        await tab.close()

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            await asyncio.gather(*(work(Tab(browser, lab, f"tab{i}")) for i in range(max(1, tabs))))
        finally:
            await browser.close()
    return {rel.as_posix(): reports[rel.as_posix()] for rel in rels}


def check_notebooks(lab: JupyterLab, root: Path, paths, screenshots: Path | None = None,
                    tabs: int = 3) -> dict[str, Report]:
    """{path relative to root: Report} for each notebook, `tabs` notebooks at a time in one browser."""
    return asyncio.run(check_notebooks_async(lab, root, list(paths), screenshots, tabs))
