"""Topic material, one folder per topic (like a d2l chapter): what its lecture computes, what its lab runs,
and the checks that grade the lab (`checks.py`, registered as "<topic>.<name>")."""
