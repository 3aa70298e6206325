"""Grading: the lab generator, and the grader that validates, runs (in the sandbox), probes and judges submissions."""
