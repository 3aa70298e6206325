"""Command: `python -m reglab.grade LAB SUBMISSIONS --out DIR` grades submitted labs (the code is in `reglab.grading`)."""
from reglab.grading.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
