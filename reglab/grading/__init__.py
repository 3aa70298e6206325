"""Grading room: the grader that turns submitted lab notebooks into a gradebook, and the lab generator beside it.

One submission goes through the modules in this order:
    lab.py        load the lab from its solution: the cells a submission must keep, the checks that grade it
    validate.py   is the file a notebook of this lab, with those cells in the lab's order? (nothing runs)
    run.py        prepare it and execute it in the sandbox (sandbox.py: a fresh kernel, time and memory caps)
    probe.py      the appended cell: each check's probe runs in the student's kernel and writes JSON data
    judge.py      each check's judge decides from that data alone, in the grader's process
    gradebook.py  feedback, grades.csv and the executed notebook, written atomically; a rerun resumes
    cli.py        `python -m reglab.grade`: many submissions in worker processes, or a student's --self-check
Beside them: generate.py cuts the student labs/ from solutions/ (`python -m reglab.labs`), and paths.py
says where both folders are.
"""
