"""Grading room: the child that runs inside the sandbox: papermill on one notebook, under limits.

`reglab.grading.sandbox.execute` starts it (inside bubblewrap, as the sandbox's uid); it applies the
resource limits, which the kernel inherits, caps what is kept of each cell's output, runs papermill
once and reports how it ended on a pipe of its own that the kernel does not inherit.

    python -m reglab.grading.runner SPEC.json FD    # not for direct use
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MAX_CELL_OUTPUT_BYTES = 2**20        # output kept per cell; a lab cell prints a few kB
IOPUB_SECONDS = 30                   # wait this long for a cell's last output after it finished (nbclient: 4)
FLOOD_NOTE = "[reglab grader: this cell's output exceeded {limit} MB; {dropped} MB more were dropped]"
MAX_REPORT_BYTES = 64 * 2**10


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
    if limits.get("uid") is not None:                        # counted per uid: each worker slot has its own
        caps.append((resource.RLIMIT_NPROC, limits["max_processes"]))
    for which, value in caps:
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):       # macOS refuses some address-space limits; the others still apply
            if which != resource.RLIMIT_AS or sys.platform.startswith("linux"):
                raise


def _output_size(content: dict) -> int:
    if "text" in content:
        return len(str(content["text"]))
    return sum(len(str(v)) for v in (content.get("data") or {}).values()) + len(str(content.get("traceback", "")))


def cap_cell_outputs() -> None:
    """Keep at most MAX_CELL_OUTPUT_BYTES of each cell's output in the executed notebook, and end a cell
    whose output was cut with one FLOOD_NOTE (error outputs, which name the exception, are always kept,
    shortened). Patches nbclient in this process only: the child runs nothing else."""
    from nbclient.client import NotebookClient
    from nbformat.v4 import new_output
    original = NotebookClient.output
    counts: dict[int, list] = {}                             # cell index -> [kept, dropped, note]

    def output(self, outs, msg, display_id, cell_index):
        content = msg.get("content") or {}
        if msg.get("msg_type") == "error":
            content["evalue"] = str(content.get("evalue", ""))[:2000]
            content["traceback"] = [str(line)[:2000] for line in (content.get("traceback") or [])[-20:]]
            return original(self, outs, msg, display_id, cell_index)
        kept, dropped, note = counts.setdefault(cell_index, [0, 0, None])
        size = _output_size(content)
        if kept + size <= MAX_CELL_OUTPUT_BYTES:
            counts[cell_index][0] = kept + size
            return original(self, outs, msg, display_id, cell_index)
        result = None
        if msg.get("msg_type") == "stream" and kept < MAX_CELL_OUTPUT_BYTES:   # keep the head of the stream
            room = MAX_CELL_OUTPUT_BYTES - kept
            msg = {**msg, "content": {**content, "text": str(content.get("text", ""))[:room]}}
            result = original(self, outs, msg, display_id, cell_index)
            size, kept = size - room, MAX_CELL_OUTPUT_BYTES
        dropped += size
        text = FLOOD_NOTE.format(limit=MAX_CELL_OUTPUT_BYTES // 2**20, dropped=f"{dropped / 2**20:.1f}") + "\n"
        if note is None or note not in outs:
            note = new_output("stream", name="stderr", text=text)
            outs.append(note)
        note["text"] = text
        counts[cell_index] = [kept, dropped, note]
        return result

    NotebookClient.output = output


def _child_main(spec_path: str, report_fd: int) -> int:
    """Run papermill once and report how it ended on report_fd (the kernel never inherits that fd)."""
    os.set_inheritable(report_fd, False)
    try:
        spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
        _apply_limits(spec["limits"])
        skip_slow_optional_imports()
        cap_cell_outputs()
        import papermill
        from nbclient.exceptions import DeadKernelError
        from papermill.exceptions import PapermillExecutionError
        try:
            papermill.execute_notebook(
                spec["input"], spec["output"], parameters=spec["parameters"], kernel_name="python3",
                cwd=spec["cwd"], progress_bar=False, log_output=False, allow_errors=True,
                request_save_on_cell_execute=True, autosave_cell_every=5,
                start_timeout=min(120, int(spec["limits"]["timeout_s"])),
                iopub_timeout=IOPUB_SECONDS, raise_on_iopub_timeout=False)   # a flood: cut, not a crash
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
