# The notebooks here are fixtures that tests/test_grade.py grades, not notebooks for nbval to run.
collect_ignore_glob = ["*.ipynb"]
