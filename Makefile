# The course's two commands:  `make lab` opens it in JupyterLab, `make test` runs every test.
# Both create .venv/ and install everything on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
# The PyTorch release the course is tested with. On a machine with an NVIDIA GPU, PyPI's Linux wheel
# is the CUDA build; override with `make TORCH=torch==X.Y.Z` or install your own into .venv first.
TORCH  ?= torch==2.13.0
PYTEST := REGLAB_BUDGET=ci OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile --nbval-lax

.PHONY: lab test install labs check-labs unit notebooks browser bench site clean

lab: install
	$(VENV)/bin/jupyter lab --notebook-dir=. README.md

test: install
	$(PY) -m reglab.labs --check
	$(PYTEST) tests notebooks solutions labs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[test,site]"
	@# nbgrader comes for its command line (a test autogrades the labs with it); its JupyterLab panels
	@# would only confuse a student, so the course's JupyterLab does not load them.
	$(VENV)/bin/jupyter labextension disable --level=sys_prefix @jupyter/nbgrader >/dev/null
	for e in formgrader validate_assignment assignment_list course_list; do \
	  $(VENV)/bin/jupyter server extension disable --sys-prefix nbgrader.server_extensions.$$e >/dev/null; done
	touch $@

labs: install             ## regenerate labs/ from solutions/
	$(PY) -m reglab.labs

unit: install             ## the package's unit tests only
	$(PYTEST) tests

notebooks: install        ## execute every notebook (nbval, ci budget)
	$(PYTEST) notebooks solutions labs

browser: install          ## the JupyterLab + widgets browser test alone
	$(PYTEST) -n 0 tests/test_browser.py

site: install             ## the course as a website in build/site/html (REGLAB_BUDGET, default cpu)
	REGLAB_BUDGET=$(or $(REGLAB_BUDGET),cpu) $(PY) site/build.py

bench: install            ## trainer speed on this machine
	$(PY) -m reglab.bench model

clean:
	rm -rf $(VENV) screenshots build/site
