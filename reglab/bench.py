"""Core: benchmarks that print figures, the trainer's speed and a lab's wall time and results.

    python -m reglab.bench model [--n-layer 6 --n-head 6 --n-embd 384 --block-size 256 --batch-size 64
                                  --steps 50 --compile]
    python -m reglab.bench lab dropout --budget cpu     # executes the solution with papermill
    python -m reglab.bench grade --lab dropout --n 30 --workers 2   # 30 copies of the solution graded
                                                                    # with the sandbox, then without
    python -m reglab.bench grade --n 60 --workers 2 --compare scheduler   # process pool vs a LocalCluster

Speeds belong here, printed, not in timed unit tests.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def bench_model(args) -> dict:
    from reglab.budget import resolve_device
    from reglab.data import LMTask
    from reglab.model import GPTConfig
    from reglab.train import TrainConfig, new_model, train

    device = resolve_device(args.device)
    config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, resid_dropout=args.dropout,
                       attn_dropout=args.dropout, ffn_dropout=args.dropout, embd_dropout=args.dropout)
    tokens = torch.randint(args.vocab_size, (200_000,))
    task = LMTask(tokens[:180_000], tokens[180_000:], args.block_size, args.batch_size, eval_batches=1, device=device)
    model = new_model(config, device=device)

    # One run of 2 * steps: the first `steps` absorb compilation and allocator warm-up; the time
    # between the evaluations at `steps` and at `2 * steps` is `steps` training steps plus one eval batch.
    marks = []

    def mark(_model):
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return {}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(steps=2 * args.steps, warmup_steps=0, eval_every=args.steps, compile=args.compile,
                      progress=False)
    train(model, task, cfg, on_eval=mark)
    step_time = (marks[1] - marks[0]) / args.steps
    figures = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
        "torch": torch.__version__, "params": model.num_params(), "n_layer": args.n_layer,
        "n_head": args.n_head, "n_embd": args.n_embd, "block_size": args.block_size,
        "batch_size": args.batch_size, "dropout": args.dropout, "compile": args.compile,
        "step_ms": 1000 * step_time, "tokens_per_s": args.batch_size * args.block_size / step_time,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
    }
    for key, value in figures.items():
        print(f"{key:>16}: {value:.4g}" if isinstance(value, float) else f"{key:>16}: {value}")
    return figures


def bench_lab(args) -> dict:
    import papermill

    from reglab.grading.lab import skip_widgets, widget_ids
    from reglab.grading.paths import ROOT, find_solution
    from reglab.results import read_results

    solution = find_solution(args.lab)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="reglab-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    notebook = json.loads(solution.read_text(encoding="utf-8"))
    source = out_dir / f"{solution.stem}.input.ipynb"          # the slider cell emptied: no person to move it
    source.write_text(json.dumps(skip_widgets(notebook, widget_ids(notebook))), encoding="utf-8")
    output = out_dir / f"{solution.stem}.{args.budget}.ipynb"
    load = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    os.environ["REGLAB_PROGRESS"] = "0"                         # no progress-bar widgets either (the kernel inherits it)
    papermill.execute_notebook(str(source), str(output), cwd=str(ROOT),
                               parameters={"budget": args.budget, "seed": args.seed, "device": args.device},
                               kernel_name="python3", progress_bar=False)
    wall = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)     # the kernel, once it has exited and been reaped
    cpu = (cpu_end.ru_utime + cpu_end.ru_stime) - (cpu_start.ru_utime + cpu_start.ru_stime)
    record = read_results(output)
    print(f"lab {args.lab} ({solution.name}), budget {args.budget}: {wall:.1f} s wall time, "
          f"{cpu:.0f} s CPU time of the kernel (1-min load average at the start: {load:.1f})")
    print(json.dumps(record, indent=1))
    print(f"executed notebook: {output}")
    return {"wall_s": wall, **record}


def bench_grade(args) -> dict:
    """Grade n copies of a lab's solution in two modes, one after the other in one run, and print each
    mode's total and per-submission times and their ratios:
    --compare sandbox: the process pool with the sandbox, then without (its cost; goal <= 1.1x);
    --compare scheduler: the process pool, then a Dask LocalCluster of as many workers (goal: the
    cluster keeps >= 0.9 of the pool's throughput)."""
    import shutil

    from reglab.grading.cli import grade
    from reglab.grading.lab import load_lab
    from reglab.grading.run import STATUSES, Options
    from reglab.grading.sandbox import choose_uid, skip_slow_optional_imports

    skip_slow_optional_imports()
    lab = load_lab(args.lab)
    sandboxed = Options(budget=args.budget, timeout_s=args.timeout, uid=choose_uid("auto", sandboxed=True))
    if args.compare == "sandbox":
        try:                               # the solution is trusted code: without the sandbox it may run as root
            plain_uid = choose_uid("auto", sandboxed=False)
        except ValueError:
            plain_uid = None
        modes = {"sandbox": (sandboxed, None),
                 "no sandbox": (Options(budget=args.budget, timeout_s=args.timeout, uid=plain_uid, sandbox=False), None)}
    else:
        modes = {"process pool": (sandboxed, None), "--scheduler local": (sandboxed, "local")}
    medians, totals = {}, {}
    for mode, (options, scheduler) in modes.items():
        with tempfile.TemporaryDirectory(prefix="reglab-bench-grade-") as folder:
            submissions = []
            for i in range(args.n):
                path = Path(folder) / "submissions" / f"copy{i + 1:02d}.ipynb"
                path.parent.mkdir(exist_ok=True)
                shutil.copyfile(lab.solution, path)
                submissions.append((path, path.stem))
            start = time.perf_counter()
            done = grade(lab, submissions, Path(folder) / "out", options, workers=args.workers, log=lambda line: None,
                         scheduler=scheduler)
            totals[mode] = time.perf_counter() - start
        times = sorted(g.seconds for g in done)
        medians[mode] = times[len(times) // 2]
        statuses = {s: sum(g.status == s for g in done) for s in STATUSES}
        user = "the grader's own user" if options.uid is None else f"uid {options.uid} + worker slot"
        print(f"{mode} ({user}): graded {args.n} copies of {lab.solution.name} (budget {args.budget}, "
              f"{args.workers} workers) in {totals[mode]:.1f} s = {args.n / totals[mode] * 60:.1f} submissions/min")
        print(f"  per submission: min {times[0]:.1f} s, median {medians[mode]:.1f} s, max {times[-1]:.1f} s; "
              + ", ".join(f"{k} {v}" for k, v in statuses.items() if v)
              + f"; full marks: {sum(g.score == lab.max_score for g in done)} of {args.n}")
    first, second = modes
    ratio = medians[first] / medians[second]
    print(f"per-submission median, {first} / {second}: {medians[first]:.2f} s / {medians[second]:.2f} s = {ratio:.3f}x"
          + (" (goal <= 1.1x)" if args.compare == "sandbox" else ""))
    throughput = totals[first] / totals[second]
    print(f"throughput, {second} / {first}: {throughput:.3f}" + (" (goal >= 0.9)" if args.compare == "scheduler" else ""))
    return {"median_s": medians, "total_s": totals, "median_ratio": ratio, "throughput_ratio": throughput}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reglab.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    model = sub.add_parser("model", help="trainer step time, tokens/s and peak memory")
    model.add_argument("--n-layer", type=int, default=6)
    model.add_argument("--n-head", type=int, default=6)
    model.add_argument("--n-embd", type=int, default=384)
    model.add_argument("--block-size", type=int, default=256)
    model.add_argument("--batch-size", type=int, default=64)
    model.add_argument("--vocab-size", type=int, default=65)
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--steps", type=int, default=50, help="timed steps (after as many warm-up steps)")
    model.add_argument("--compile", action="store_true")
    model.add_argument("--device", default="auto")
    lab = sub.add_parser("lab", help="execute a lab's solution and print its wall time and result record")
    lab.add_argument("lab", help="short name (dropout, weight_decay, ...) or a solution's path")
    lab.add_argument("--budget", default="auto", choices=["auto", "ci", "cpu", "gpu"])
    lab.add_argument("--seed", type=int, default=0)
    lab.add_argument("--device", default="auto")
    lab.add_argument("--out", help="folder for the executed notebook (default: a temporary folder)")
    grade = sub.add_parser("grade", help="grade n copies of a lab's solution in two modes (--compare); print "
                           "per-submission times, throughput and their ratios")
    grade.add_argument("--lab", default="dropout", help="short name or a solution's path")
    grade.add_argument("--n", type=int, default=30, help="copies graded in each mode")
    grade.add_argument("--workers", type=int, default=2)
    grade.add_argument("--budget", default="ci", choices=["ci", "cpu", "gpu"])
    grade.add_argument("--timeout", type=float, default=300.0, help="seconds per submission")
    grade.add_argument("--compare", default="sandbox", choices=["sandbox", "scheduler"],
                       help="sandbox: with vs without bubblewrap; scheduler: process pool vs --scheduler local")
    args = parser.parse_args(argv)
    if args.what == "model":
        bench_model(args)
    elif args.what == "grade":
        bench_grade(args)
    else:
        bench_lab(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
