# The two commands a fresh machine needs:  make run  (the main job)  and  make test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so that the rest of the install never pulls another build
TORCH ?= torch==2.13.0

.PHONY: run test lint install dev bench clean

$(VENV)/.core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.run: $(VENV)/.core
	$(PY) -m pip install -q -e '.[plot,data]'
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PY) -m pip install -q -e '.[dev]'
	# the Llama Guard prompts' reference (tests/test_guard.py); its own dependencies are not needed for that
	$(PY) -m pip install -q --no-deps llama-cookbook==0.0.5.post1
	touch $@

install: $(VENV)/.core
dev: $(VENV)/.dev

run: $(VENV)/.run
	$(VENV)/bin/herd run

test: lint
	$(PY) -m pytest tests

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

bench: $(VENV)/.dev
	$(PY) benchmarks/cpu_generate.py
	$(PY) benchmarks/cpu_train_step.py

clean:
	rm -rf $(VENV) build *.egg-info
