"""The commands of ``lightning-aquila``, each with its one line of help. Kept apart from the
dispatcher and the tools, which both read it, and light: ``--help`` lists it."""

from __future__ import annotations

#: The LightningCLI commands -> one-line help.
TRAINER_COMMANDS: dict[str, str] = {
    "fit": "train a model from a YAML config (resume with --ckpt_path last)",
    "validate": "run the validation loop of a config on a checkpoint",
    "test": "run the test loop of a config on a checkpoint",
    "predict": "run the predict loop of a config on a checkpoint",
}

#: name -> (module, the function there whose signature and docstring are the tool's flags,
#: one-line help). ``cli/tools.py`` runs each (``COMMANDS``) and prints what it did.
TOOLS: dict[str, tuple[str, str, str]] = {
    "prepare": ("lightning_aquila.datamodules.prepare", "prepare",
                "tokenize raw text into a domain of a zarr shard store"),
    "inspect": ("lightning_aquila.cli.tools", "inspect_store",
                "print the domains, documents and tokens of a shard store"),
    "remove-domain": ("lightning_aquila.datamodules.edit", "remove_domain",
                      "take a domain out of a shard store (atomically)"),
    "score": ("lightning_aquila.cli.score", "score_command",
              "attach a per-document quality score (fastText, perplexity, a file) or remove one"),
    "train-tokenizer": ("lightning_aquila.tokenizer", "train_tokenizer",
                        "train a byte-level BPE tokenizer on jsonl/txt/parquet files"),
    "report": ("lightning_aquila.cli.tools", "report_runs",
               "write the PNG + HTML run report of a run directory (or --compare runs)"),
    "consolidate": ("lightning_aquila.cli.tools", "consolidate_checkpoint",
                    "merge a sharded checkpoint into one file and/or a Hugging Face directory"),
    "export-hf": ("lightning_aquila.cli.tools", "export_checkpoint",
                  "export a Lightning checkpoint as a Hugging Face Llama directory"),
}
