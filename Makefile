# Two commands do all the set-up on a fresh machine:
#   make quickstart   venv + install, then train a tiny Aquila2 on the bundled corpus (CPU)
#                     with the monitor and the engine on, and write the run report
#                     (runs/quickstart/report.html)
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
DOMAINS := $(notdir $(patsubst %/,%,$(wildcard corpus/*/)))

.PHONY: install test quickstart docs clean

# The install ends with `fit --help`, which keeps fit's help and option list
# (cli/help_cache.py): typos are then refused in under a second from the first run on.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/lightning-aquila fit --help > /dev/null
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

quickstart: $(STAMP)
	@for d in $(DOMAINS); do \
	  $(BIN)/lightning-aquila prepare --input "corpus/$$d/*.jsonl" --domain $$d \
	    --output $(STORE) --held-out-fraction 0.1 --quiet || exit 1; \
	done
	$(BIN)/lightning-aquila inspect $(STORE)
	$(BIN)/lightning-aquila fit --config configs/quickstart.yaml \
	  --trainer.default_root_dir $(RUN_DIR) --data.init_args.store $(STORE) --ckpt_path last
	$(BIN)/lightning-aquila report $(RUN_DIR)

docs: $(STAMP)
	$(BIN)/pip install -q -e ".[docs]"
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs site
