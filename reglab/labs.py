"""Command: `python -m reglab.labs [--check]` writes labs/ from solutions/ (the code is in `reglab.grading.generate`)."""
from reglab.grading.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
