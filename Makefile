# Two entry points (README): `make train` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export SIMCROP_CACHE ?= $(CURDIR)/.cache/simcrop
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install train test bench ablation evidence clean

CSRC   := $(wildcard csrc/*.cpp csrc/cpu/* csrc/cuda/* csrc/include/simcrop/*)

$(STAMP): requirements.txt pyproject.toml setup.py $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# the main job: pre-train the tiny preset on the built-in synthetic CT-report data (CPU: a few minutes)
train: install
	$(PY) -m simcrop.train --compile $(ARGS)

# the tests, after compiling every CUDA source with nvcc for sm_90 (compile only; exit 2 = no nvcc here: skipped),
# then the GPU check's dry run (every section's Python on the CPU at tiny shapes, ~1-2 min: it cannot rot unseen)
test: install
	bash csrc/check_cuda_compile.sh || test $$? -eq 2
	$(PY) -m pytest tests -q $(ARGS)
	PYTHON=$(CURDIR)/$(PY) bash bench/gpu_check.sh --dry-run

bench: install
	$(PY) -m pytest bench --benchmark-only $(ARGS)

# the ablation table of docs/ablation.md (random / MIM / MIM+MLM / full, each evaluated); resumable, ~45 min on 2 cores
ablation: install
	$(PY) -m simcrop.experiments.ablation --out docs/ablation --work runs/ablation --steps 300 --text-encoder minilm $(ARGS)

# the pre-registered E1 + E2 (testbed) and E3 (downstream, powered) of docs/ablation.md; resumable
evidence: install
	$(PY) -m simcrop.experiments.evidence --out docs/evidence --work runs/evidence $(ARGS)

clean:
	rm -rf $(VENV) .cache build *.egg-info
