# Two commands on a fresh machine: `make demo` and `make test`. Each (re)builds .venv from the pins.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
EXTRAS := audio,torch,eval,tensorboard,dev
JOBS ?= 2

.PHONY: install demo demo-quick test test-fast test-busy lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-compile -c constraints.txt -e '.[$(EXTRAS)]'
	@# bytecode on every core (pip compiles on one: ~85 s install -> ~65 s on 2 cores); best effort
	@$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/vsalmonn-jax demo

demo-quick: $(STAMP)
	$(VENV)/bin/vsalmonn-jax demo --quick

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) --dist loadgroup tests

test-fast: $(STAMP)
	$(PY) -m pytest -n $(JOBS) --dist loadgroup -m "not slow" tests

# the suite beside one CPU burner per core (.ci/busy): it must pass on a busy machine too
test-busy: $(STAMP)
	.ci/busy $(MAKE) test

lint: $(STAMP)
	$(VENV)/bin/ruff check vsalmonn_jax tests bench configs

bench: $(STAMP)
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
