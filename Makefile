# `make test` and `make demo` work on a fresh machine: they create .venv, install, and run.
#   PYTHON=python3.11        interpreter used to create the venv
#   TORCH_SPEC='torch==X'    torch to install when the venv has none (default: the CPU build 2.13.0)
#   USE_SYSTEM_TORCH=1       let the venv see the interpreter's own site-packages (bring your own torch/CUDA)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
VENV_FLAGS := $(if $(filter 1,$(USE_SYSTEM_TORCH)),--system-site-packages,)

.PHONY: venv test demo check-cuda clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: venv
	$(PY) -m pytest tests -q

# The main job on the embedded default: IKL refinement of a mode-dropping 2-D generator by the exact
# 25-Gaussian teacher (a few minutes on 2 CPU cores); scatter plots and the table land in demo-out/.
demo: venv
	$(PY) bench/toy2d.py --outdir demo-out --kimg 6000 --methods none,ikl
	@echo "Before: demo-out/scatter-none.png   after IKL: demo-out/scatter-ikl.png   (red crosses: the 25 modes)"

check-cuda:
	bash tools/check_cuda.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
