# `make test` and `make demo` work on a fresh machine: they create .venv, install (with the optional diffusers
# extra, so that the diffusers-teacher tests run), and run.
#   PYTHON=python3.11        interpreter used to create the venv
#   TORCH_SPEC='torch==X'    torch to install when the venv has none (default: the CPU build 2.13.0)
#   USE_SYSTEM_TORCH=1       let the venv see the interpreter's own site-packages (bring your own torch/CUDA)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
VENV_FLAGS := $(if $(filter 1,$(USE_SYSTEM_TORCH)),--system-site-packages,)

.PHONY: venv test demo check-cuda gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,diffusers]'
	touch $@

test: venv
	$(PY) -m pytest tests experiments -q

# The main job on the embedded default: the shipped well-trained Fashion-MNIST StyleGAN2 (the gamma-1 GAN, 160 kimg)
# refined by the shipped 492-kimg EDM teacher with refine.py's default recipe (ikl-gan), 10 kimg on the CPU in under
# 5 minutes on two cores. The recipe's distance first swings up (GAN training restarted from a pickle) and is under
# its start by 8-10 kimg; the run prints the Frechet distance (offline detector, 2000 samples) at the start, at
# 5 kimg and at the end, keeps the best snapshot and draws curves.png; every run gets a new directory under demo-out/.
DEMO_KIMG ?= 10
demo: venv
	$(PY) refine.py --network=embedded/fmnist-stylegan2-gamma1-160kimg.pkl --teacher=embedded/fmnist-edm-492kimg.pkl \
	    --outdir=demo-out --kimg=$(DEMO_KIMG) --tick=1 --snap=5 --device=cpu --metrics=fid2000_full \
	    --metrics-ref=embedded/fmnist-32x32-fmnist.npz --detector=fmnist

check-cuda:
	bash tools/check_cuda.sh

# On a GPU machine (a CUDA torch in PYTHON): build the CUDA ops, check them, short runs in fp32/bf16/fp16, and the
# speed benchmark on CUDA, in under 8 minutes on one H200 (tools/gpu_check.sh; results in gpu-check-out/).
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
