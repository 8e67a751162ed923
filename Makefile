# `make demo` and `make test` set up .venv themselves on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean gpu-suite

$(STAMP): setup.py
	python3 -m venv $(VENV)
	# the CPU wheel that pip finds on these machines; a bare `torch` would pull a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,apps,triton]'
	touch $@

demo: $(STAMP)
	$(PY) -m dicekern demo --out out/demo

# one pytest-xdist worker per core; a test marked xdist_group shares a worker with its group
XDIST := -n auto --dist loadgroup

# everything: core maths, contracts, kernels (Triton's interpreter), distributed ranks, slow end-to-end runs
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

# the inner loop: core maths and contract tests, without the markers of pytest.ini (under 90 s on 2 cores)
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow and not kernels and not distributed"

bench: $(STAMP)
	$(PY) -m pytest benchmarks -q -o addopts= --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds \
		--benchmark-json=benchmarks/results/cpu.json
	$(PY) benchmarks/ratios.py benchmarks/results/cpu.json

clean:
	rm -rf $(VENV) out .benchmarks

# On a CUDA machine with torch and triton already installed (the H200): no venv, no downloads.
gpu-suite:
	python3 -m pip install --quiet --no-deps --no-build-isolation -e .
	python3 benchmarks/gpu_suite.py
