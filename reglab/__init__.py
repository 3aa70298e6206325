"""reglab: a runnable course on regularization in transformer training, in three rooms.

- The course core, at the top of the package, which every notebook imports: `model` (the GPT),
  `train` (the one training loop and its sweep runner), `data`, `budget` (ci / cpu / gpu sizes),
  `results` (the record a lab publishes), `plots`, and `checks` (the probe/judge protocol of a check).
- `reglab.topics`: one folder per topic (dropout, weight_decay, label_smoothing, clipping, capstone),
  holding what its lecture computes (`lecture.py`), what its lab runs (`lab.py`) and the checks that
  grade the lab (`checks.py`); `topics/claims.py` is the claims ledger.
- `reglab.grading`: the lab generator (solutions/ -> labs/) and the grader (load the lab, validate a
  submission, run it in the sandbox, probe it there, judge here, write the gradebook).

A lecture imports the core and its topic's `lecture`; a lab adds its topic's `lab` and calls
`check("<topic>.<name>", obj)`, which runs the check's probe and judge in the kernel; the grader runs
the same probes in the student's sandboxed kernel and the judges in its own process.
"""
__version__ = "0.1.0"
