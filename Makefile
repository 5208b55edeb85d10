# Two commands do all the set-up on a fresh machine:
#   make quickstart   venv + install, then train a tiny Aquila2 on the bundled corpus (CPU):
#                     a reference run on the uniform mixture, the run with DoReMi mixing, and
#                     the reports (runs/quickstart/report.html, runs/quickstart/compare.png)
#   make test         venv + install, then ruff and the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

# The run's folder: monitor files, checkpoints, config.yaml and the Neptune run all follow
# --trainer.default_root_dir, so `make quickstart RUN_DIR=runs/q2` is a second, separate run.
# `--ckpt_path last` makes a repeated `make quickstart` resume (or find the run finished)
# instead of starting a second run in the same folder, which fit refuses.
RUN_DIR ?= runs/quickstart
STORE   := $(RUN_DIR)/corpus.zarr
# The quickstart's policy (DoReMi: configs/quickstart.yaml) steers by each domain's held-out
# loss in excess of a reference run's final one: the same model and data on the uniform
# mixture (configs/quickstart-reference.yaml), trained first into its own folder. Once it has
# finished, REF_DONE marks it and a repeated `make quickstart` does not start it again
# (delete that file to retrain it; an interrupted reference run is resumed).
REF_DIR   ?= $(RUN_DIR)-reference
REFERENCE := $(REF_DIR)/tsm/metrics.jsonl
REF_DONE  := $(REF_DIR)/finished
DOMAINS := $(notdir $(patsubst %/,%,$(wildcard corpus/*/)))

.PHONY: install test quickstart docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

quickstart: $(STAMP)
	@for d in $(DOMAINS); do \
	  $(BIN)/lightning-aquila prepare --input "corpus/$$d/*.jsonl" --domain $$d \
	    --output $(STORE) --held-out-fraction 0.05 || exit 1; \
	done
	$(BIN)/lightning-aquila inspect $(STORE)
	if [ -f $(REF_DONE) ]; then echo "reference run: finished ($(REF_DONE))"; else \
	  $(BIN)/lightning-aquila fit --config configs/quickstart.yaml \
	    --config configs/quickstart-reference.yaml --trainer.default_root_dir $(REF_DIR) \
	    --data.init_args.store $(STORE) --ckpt_path last && touch $(REF_DONE); fi
	$(BIN)/lightning-aquila fit --config configs/quickstart.yaml \
	  --trainer.default_root_dir $(RUN_DIR) --data.init_args.store $(STORE) \
	  --trainer.callbacks.init_args.policy.init_args.reference $(REFERENCE) --ckpt_path last
	$(BIN)/lightning-aquila report $(RUN_DIR)
	$(BIN)/lightning-aquila report --compare $(REF_DIR) $(RUN_DIR) \
	  --labels "uniform (reference)" DoReMi --output $(RUN_DIR)/compare.png

docs: $(STAMP)
	$(BIN)/pip install -q -e ".[docs]"
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs site
