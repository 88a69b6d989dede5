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

# The main job on the embedded default: the shipped well-trained Fashion-MNIST StyleGAN2 (240 kimg) refined by the
# shipped 492-kimg EDM teacher on the CPU in about 3 minutes. refine.py's default recipe (ikl-gan) gains over 10-20
# kimg after a swing in its first kimg, longer than a demo: this runs the short-horizon setting whose gain comes in
# its first kimg (IKL alone, the official noise law at glr = lr = 1e-4 after a 1-kimg fake-score warm-up). It
# prints the Frechet distance (offline detector) at the start and at every 0.5 kimg, keeps the best snapshot, and
# draws curves.png; every run gets a new directory under demo-out/.
DEMO_KIMG ?= 2
demo: venv
	$(PY) refine.py --network=embedded/fmnist-stylegan2-240kimg.pkl --teacher=embedded/fmnist-edm-492kimg.pkl \
	    --outdir=demo-out --kimg=$(DEMO_KIMG) --recipe=official --fake-warmup=1 --batch=32 --glr=1e-4 --lr=1e-4 \
	    --tick=0.5 --snap=1 --device=cpu --metrics=fid2000_full --metrics-ref=embedded/fmnist-32x32-fmnist.npz \
	    --detector=fmnist

check-cuda:
	bash tools/check_cuda.sh

# On a GPU machine (a CUDA torch in PYTHON): build the CUDA ops, check them, short runs in fp32/bf16/fp16, and the
# speed benchmark on CUDA, in under 8 minutes on one H200 (tools/gpu_check.sh; results in gpu-check-out/).
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
