"""The data and run tools: ``prepare``, ``inspect``, ``remove-domain``, ``train-tokenizer``,
``report``, ``consolidate`` and ``export-hf``.

A tool's flags are the parameters of one function (``TOOLS`` names it), read from its
signature and docstring by jsonargparse, as litgpt's ``__main__`` does: the library function
where it does the whole job (``prepare``, ``remove_domain``, ``train_tokenizer``), else a
command function below that calls the library and prints (``inspect``, ``report``,
``consolidate``, ``export-hf``). Only flags that belong to the command and not the function
(``--threads``, ``--quiet``, ``-v``, ``--verify``) are added by hand.

The flags keep the spelling the tools have always had: dashes (``--held-out-fraction`` for
``held_out_fraction``), a repeatable ``--input`` for a list (each one appends), and switches
for booleans (``--keep-data`` alone means true; ``--keep-data false`` also parses).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import docstring_parser
from jsonargparse import ArgumentParser, Namespace

from lightning_aquila.cli.commands import TOOLS
from lightning_aquila.cli.errors import OneLineErrors


class ToolParser(OneLineErrors, ArgumentParser):
    """jsonargparse's parser without prefix matching (``--hel`` is an error, not
    ``--help``) and with one-line errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        #: flags that append to a list each time they are given (``--input``)
        self.repeatable: list[str] = []

    def parse_argv(self, argv: Sequence[str] | None) -> Namespace:
        """``argv`` (default: the process's) parsed, each repeatable flag given to
        jsonargparse as its appending form ``FLAG+``."""
        words = list(sys.argv[1:] if argv is None else argv)
        for flag in self.repeatable:
            words = [f"{flag}+{w[len(flag):]}" if w == flag or w.startswith(f"{flag}=")
                     else w for w in words]
        return self.parse_args(words)


def tool_function(tool: str) -> Callable[..., Any]:
    """The function whose parameters are ``tool``'s flags (``TOOLS``)."""
    module, function, _ = TOOLS[tool]
    return getattr(importlib.import_module(module), function)


def tool_parser(tool: str, description: str, *, positional: Iterable[str] = (),
                flags: Mapping[str, str] | None = None, skip: Iterable[str] = (),
                several: Iterable[str] = (),
                function: Callable[..., Any] | None = None) -> ToolParser:
    """The parser of ``tool``: one flag per parameter of its function (``TOOLS``, or
    ``function`` for a subcommand such as ``score fasttext``; ``skip`` left out),
    spelt with dashes or as ``flags`` maps parameter names, and the ``positional`` parameters
    as positional arguments (optional ones where the parameter has a default). A ``several``
    parameter (a list) takes one or more values after its flag (``--compare RUN RUN``)."""
    function = function or tool_function(tool)
    parser = ToolParser(prog=f"lightning-aquila {tool}", description=description)
    hints = typing.get_type_hints(function)
    defaults = {name: p.default for name, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty}
    positional, skip, several = set(positional), set(skip), set(several)
    by_hand = (positional & defaults.keys()) | several  # argparse's nargs, not jsonargparse's
    parser.add_function_arguments(function, skip=hints.keys() - (positional - by_hand),
                                  as_group=False, as_positional=True)
    parser.add_function_arguments(function, skip=skip | positional | several, as_group=False)
    # argparse has no public way to rename a flag: its option strings and their index
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if hints.get(action.dest) in (bool, bool | None):
            action.nargs, action.const = "?", True  # a switch: the flag alone means true
        flag = _flag(action.dest, flags)
        appends = f"--{action.dest}+" in action.option_strings
        for old in action.option_strings:
            del parser._option_string_actions[old]
        # jsonargparse appends to a list for ``--name+``; a repeatable flag is always that
        action.option_strings = [flag]
        parser._option_string_actions[flag] = action
        if appends:
            parser._option_string_actions[flag + "+"] = action
            parser.repeatable.append(flag)
            action.metavar = flag.lstrip("-").upper()  # one value each time, not a list
    helps = {p.arg_name: p.description
             for p in docstring_parser.parse(function.__doc__ or "").params}
    for name in [n for n in inspect.signature(function).parameters if n in by_hand]:
        if name in positional:
            parser.add_argument(name, nargs="?", default=defaults[name], help=helps.get(name))
        else:
            flag = _flag(name, flags)
            parser.add_argument(flag, dest=name, nargs="+", default=defaults.get(name),
                                metavar=flag.lstrip("-").upper(), help=helps.get(name))
    return parser


def _flag(name: str, flags: Mapping[str, str] | None) -> str:
    return (flags or {}).get(name, "--" + name.replace("_", "-"))


def add_switch(parser: ArgumentParser, *names: str, help: str) -> None:
    """A boolean flag that means true alone (``--quiet``), as the tools' own flags do."""
    parser.add_argument(*names, type=bool, nargs="?", const=True, default=False, help=help)


def call(function: Callable[..., Any], args: Namespace, **given: Any) -> Any:
    """``function`` called with the parsed values of its parameters (and ``given``)."""
    values = args.as_dict()
    names = typing.get_type_hints(function).keys() - {"return"}
    return function(**{name: values[name] for name in names if name in values}, **given)


def run_tool(tool: str, argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-aquila TOOL ARGV``; returns the exit code."""
    return COMMANDS[tool](argv)


# -- prepare ------------------------------------------------------------------------------------
def prepare_command(argv: Sequence[str] | None = None) -> int:
    from lightning_aquila.datamodules.shard_format import DataError

    parser = tool_parser(
        "prepare", "Tokenize raw text into one domain of a zarr shard store (idempotent: "
        "sources already in the domain, by content hash, are skipped).",
        flags={"inputs": "--input", "fmt": "--format"},
        skip={"batch_chars", "piece_chars", "progress"})
    parser.add_argument("--threads", type=int | None, default=None,
                        help="tokenizer threads (default: all cores)")
    add_switch(parser, "--quiet", help="no progress bars, and the summary in one line")
    add_switch(parser, "-v", "--verbose",
               help="the whole summary, also with --quiet: each split's size, and every "
                    "skipped source named, not only the first few")
    args = parser.parse_argv(argv)
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    try:
        report = call(tool_function("prepare"), args, progress=not args.quiet)
    except DataError as exc:
        print(f"lightning-aquila prepare: error: {exc}", file=sys.stderr)
        return 1
    print_prepare_summary(report, args.verbose, brief=args.quiet and not args.verbose)
    if report.undecodable:
        print(f"warning: skipped {len(report.undecodable)} file(s) that do not decode "
              "(--encoding reads another encoding):", file=sys.stderr)
        for line in report.undecodable:
            print(f"  {line}", file=sys.stderr)
    if report.bad_records:
        print(f"warning: skipped {report.bad_records} bad record(s), e.g.:", file=sys.stderr)
        for source in report.added:
            for example in source["bad_examples"]:
                print(f"  {example}", file=sys.stderr)
    return 0


def print_prepare_summary(report: Any, verbose: bool, brief: bool = False) -> None:
    """What a ``prepare`` run did: skipped duplicates (counted; named with ``-v``), then the
    split sizes of this run and of the domain after it; ``brief``: one line, what was added
    (and how much of it is held out) or else what was skipped."""
    from lightning_aquila.datamodules.split import HELDOUT_WINDOW_TOKENS

    added = (f"domain {report.domain!r} (language {report.language!r}): added "
             f"{len(report.added)} source(s), {report.documents:,} documents, "
             f"{report.tokens:,} tokens")
    if brief and report.added:
        skipped = (f"; skipped {len(report.skipped)} already there" if report.skipped
                   else "")
        print(f"{added} ({report.split_tokens.get('heldout', 0):,} held out){skipped} -> "
              f"{report.store}")
        return

    shown = len(report.skipped) if verbose else 3
    if report.skipped:
        names = ", ".join(report.skipped[:shown])
        more = (f", ... ({len(report.skipped) - shown} more; -v lists all)"
                if len(report.skipped) > shown else "")
        print(f"skipped {len(report.skipped)} source(s) already in domain {report.domain!r} "
              f"(same content): {names}{more}")
    if not report.added:
        if not report.skipped and not report.undecodable:
            print("nothing to do")
        return
    print(f"{added} -> {report.store}")
    how = ("whole documents" if report.split_mode == "documents" else
           f"windows of {HELDOUT_WINDOW_TOKENS} tokens cut from the documents")
    tokens, pieces = report.split_tokens, report.split_pieces
    print(f"  this run: train {tokens.get('train', 0):,} tokens ({pieces.get('train', 0):,} "
          f"pieces), held out {tokens.get('heldout', 0):,} tokens "
          f"({pieces.get('heldout', 0):,} pieces: {report.split_parts.get('dev', 0):,} dev, "
          f"{report.split_parts.get('test', 0):,} test; {how})")
    print(f"  domain now: train {report.domain_tokens['train']:,} tokens, held out "
          f"{report.domain_tokens['heldout']:,} tokens")


# -- inspect ------------------------------------------------------------------------------------
def inspect_store(store: str, storage_options: dict[str, Any] | None = None,
                  verify: bool = False) -> int:
    """Print the domains, documents and tokens of a shard store.

    Args:
        store: store path or URL
        storage_options: fsspec options of a remote store (e.g. credentials), as JSON
        verify: also read every chunk (catches missing or corrupt chunks)
    """
    from lightning_aquila.datamodules.shard_format import SPLITS, DataError
    from lightning_aquila.datamodules.store import ShardStore

    try:
        shards = ShardStore(store, storage_options)
        print(f"{shards.url}: {len(shards.domains)} domain(s); splits {', '.join(SPLITS)}")
        print(inspect_table(shards))
        if any(info.score_names for info in shards.domains.values()):
            print(f"\ndocument scores (both splits; higher = better):\n{scores_table(shards)}")
        if verify:
            shards.verify(full=True)
            print("verified: every chunk is present and intact")
    except DataError as exc:
        print(f"lightning-aquila inspect: error: {exc}", file=sys.stderr)
        return 1
    return 0


def inspect_table(store: Any) -> str:
    """The ``inspect`` table: one row per domain, share = the domain's part of all tokens."""
    rows = []
    total = sum(info.total_tokens for info in store.domains.values()) or 1
    for name, info in store.domains.items():
        rows.append([name, info.language, f"{info.total_documents:,}", f"{info.total_tokens:,}",
                     f"{info.total_tokens / total:.1%}", f"{info.tokens('heldout'):,}"])
    docs = sum(info.total_documents for info in store.domains.values())
    rows.append(["total", "", f"{docs:,}", f"{total if store.domains else 0:,}",
                 "100.0%" if store.domains else "", ""])
    header = ["domain", "language", "documents", "tokens", "share", "held-out tokens"]
    return _table(header, rows, left=2)


def scores_table(store: Any) -> str:
    """Each domain's scores: documents with a value, NaN (no value), min, quartiles, max."""
    import numpy as np

    from lightning_aquila.datamodules.shard_format import SPLITS
    from lightning_aquila.datamodules.store import document_scores

    header = ["domain", "score", "scored", "NaN", "min", "q25", "median", "q75", "max"]
    rows = []
    for domain, info in store.domains.items():
        for name in info.score_names:
            values = np.concatenate([document_scores(store, domain, name, split)[1]
                                     for split in SPLITS])
            known = values[~np.isnan(values)]
            stats = (np.quantile(known, [0, 0.25, 0.5, 0.75, 1]) if len(known)
                     else [np.nan] * 5)
            rows.append([domain, name, f"{len(known):,}", f"{len(values) - len(known):,}",
                         *(f"{v:.4g}" for v in stats)])
    return _table(header, rows, left=2)


def _table(header: list[str], rows: list[list[str]], left: int) -> str:
    """Columns padded to width; the first ``left`` left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                     for row in lines)


def inspect_command(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser("inspect", "Print the domains, documents and tokens of a shard store.",
                         positional={"store"})
    return call(tool_function("inspect"), parser.parse_argv(argv))


# -- remove-domain ------------------------------------------------------------------------------
def remove_domain_command(argv: Sequence[str] | None = None) -> int:
    from lightning_aquila.datamodules.shard_format import DataError

    parser = tool_parser(
        "remove-domain", "Take a domain out of a shard store: one atomic metadata write, "
        "then its files are deleted (see docs/data.md for runs training from the store).",
        positional={"url", "domain"})
    args = parser.parse_argv(argv)
    try:
        call(tool_function("remove-domain"), args)
    except DataError as exc:
        print(f"lightning-aquila remove-domain: error: {exc}", file=sys.stderr)
        return 1
    print(f"removed domain {args.domain!r} from {args.url}"
          + (" (its files are kept)" if args.keep_data else ""))
    return 0


# -- train-tokenizer ----------------------------------------------------------------------------
def train_tokenizer_command(argv: Sequence[str] | None = None) -> int:
    from lightning_aquila.tokenizer import (
        BOS,
        EOS,
        expand_inputs,
        load_tokenizer,
        special_token_ids,
        tokenizer_hash,
    )

    parser = tool_parser(
        "train-tokenizer", "Train a byte-level BPE tokenizer (bos/eos as the two highest ids) "
        "on .jsonl/.txt/.parquet files and write DIR/tokenizer.json.",
        flags={"files": "--input", "fmt": "--format"})
    args = parser.parse_argv(argv)
    try:
        args.files = expand_inputs(args.files)
        path = call(tool_function("train-tokenizer"), args)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    tokenizer = load_tokenizer(path)
    bos, eos = special_token_ids(tokenizer)
    print(f"trained on {len(args.files)} file(s)")
    print(f"vocab size: {tokenizer.get_vocab_size()}")
    print(f"bos: {BOS} = {bos}, eos: {EOS} = {eos}")
    print(f"hash: {tokenizer_hash(tokenizer)}")
    print(f"wrote: {path}")
    return 0


# -- report ---------------------------------------------------------------------------------------
def report_runs(run_dir: str | None = None, output_dir: str | None = None,
                title: str | None = None, compare: list[str] | None = None,
                labels: list[str] | None = None, output: str = "compare.png") -> int:
    """Write the PNG + HTML report of a run directory (its TSM run files), or with
    ``--compare`` one PNG that overlays several runs and a table of their final numbers.

    Args:
        run_dir: the trainer's default_root_dir / log_dir of the run
        output_dir: where to write report.png/report.html (default: the folder that holds
            the run's tsm/ files)
        title: title of the figure and page
        compare: compare these runs: held-out loss against tokens (domain mean, worst
            domain, each domain) and each run's mixture; prints a summary table
        labels: with --compare: one name per run (default: folder names)
        output: with --compare: the figure to write
    """
    if compare is not None:
        from lightning_aquila.tracking.compare import compare_runs, summarise_run, summary_table

        path = compare_runs(compare, output, labels)
        names = labels or [Path(r).name or r for r in compare]
        print(summary_table([summarise_run(r) for r in compare], names))
        print(f"figure: {path}")
        return 0
    from lightning_aquila.tracking.report import write_report

    png, page = write_report(run_dir, output_dir, title)
    print(f"report: {page} (figure: {png})")
    return 0


def report_command(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser(
        "report", "Write the PNG + HTML report of a run directory (its TSM run files), or "
        "with --compare one PNG that overlays several runs.",
        positional={"run_dir"}, several={"compare", "labels"})
    args = parser.parse_argv(argv)
    if (args.run_dir is None) == (args.compare is None):
        parser.error("give a run directory, or --compare RUN RUN ...")
    try:
        return call(tool_function("report"), args)
    except (FileNotFoundError, ValueError) as error:
        print(f"lightning-aquila report: {error}", file=sys.stderr)
        return 1


# -- checkpoints ----------------------------------------------------------------------------------
def consolidate_checkpoint(checkpoint: Path, output: Path | None = None,
                           hf_dir: Path | None = None, dtype: str = "bf16",
                           tokenizer: Path | None = None, weights_only: bool = False,
                           overwrite: bool = False) -> None:
    """Merge a sharded checkpoint (FSDP2/TP or DeepSpeed) into one file that resumes under
    any strategy, and/or a Hugging Face directory (``strategies/consolidate.py``).

    Args:
        checkpoint: a sharded checkpoint directory
        output: single-file Lightning checkpoint to write
        hf_dir: Hugging Face (Llama) directory to write with export_hf
        dtype: dtype of the Hugging Face weights (bf16, fp16 or fp32)
        tokenizer: tokenizer.json (or its directory) to copy into the Hugging Face directory
            (default: the one the checkpoint carries)
        weights_only: leave the optimizer state out of the single file
        overwrite: replace the outputs if they exist
    """
    import torch

    from lightning_aquila.atomic import atomic_file
    from lightning_aquila.export import export_tokenizer, model_from_checkpoint
    from lightning_aquila.model.hf import export_hf
    from lightning_aquila.strategies.consolidate import consolidate

    if output is None and hf_dir is None:
        raise ValueError("give --output FILE, --hf-dir DIR or both")
    if output is not None and output.exists() and not overwrite:
        raise ValueError(f"{output} exists (pass --overwrite)")
    torch_dtype = _dtype(dtype)
    full = consolidate(checkpoint)
    if output is not None:
        if weights_only:
            full = {k: v for k, v in full.items() if k != "optimizer_states"}
        with atomic_file(output, "wb") as handle:  # no truncated file if killed
            torch.save(full, handle)
        print(f"wrote {output}")
    if hf_dir is not None:
        model = model_from_checkpoint(full)
        export_hf(model, hf_dir, dtype=torch_dtype, overwrite=overwrite,
                  tokenizer=export_tokenizer(full, model.config, tokenizer))
        print(f"wrote {hf_dir} ({model.config.num_params / 1e6:.1f}M parameters, {dtype})")


def export_checkpoint(checkpoint: Path, output: Path, dtype: str = "bf16",
                      tokenizer: Path | None = None, overwrite: bool = False) -> None:
    """Export a single-file AquilaLM checkpoint as a Hugging Face Llama directory (sharded
    FSDP/TP checkpoints go through ``lightning-aquila consolidate`` first).

    Args:
        checkpoint: a .ckpt file written by AquilaLM
        output: directory to create
        dtype: dtype of the exported weights (bf16, fp16 or fp32)
        tokenizer: tokenizer.json (or its directory) to copy into the export (default: the
            one the checkpoint carries, recorded by prepare in the store it trained on)
        overwrite: replace the output directory if it exists
    """
    import torch

    from lightning_aquila.export import export_tokenizer, model_from_checkpoint
    from lightning_aquila.model.hf import export_hf

    if not checkpoint.is_file():
        raise ValueError(f"{checkpoint} is not a checkpoint file (sharded? use consolidate)")
    torch_dtype = _dtype(dtype)
    full = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = model_from_checkpoint(full)
    path = export_hf(model, output, dtype=torch_dtype, overwrite=overwrite,
                     tokenizer=export_tokenizer(full, model.config, tokenizer))
    print(f"wrote {path} ({model.config.num_params / 1e6:.1f}M parameters, {dtype})")


def _dtype(name: str) -> Any:
    from lightning_aquila.model.hf import DTYPES

    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _checkpoint_command(tool: str, argv: Sequence[str] | None) -> int:
    function = tool_function(tool)
    summary = (function.__doc__ or "").split("\n\n", 1)[0].replace("``", "")
    parser = tool_parser(tool, " ".join(summary.split()), positional={"checkpoint"})
    try:
        call(function, parser.parse_argv(argv))
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        parser.error(str(error))
    return 0


def consolidate_command(argv: Sequence[str] | None = None) -> int:
    return _checkpoint_command("consolidate", argv)


def export_hf_command(argv: Sequence[str] | None = None) -> int:
    return _checkpoint_command("export-hf", argv)


def score_command(argv: Sequence[str] | None = None) -> int:
    from lightning_aquila.cli.score import score_command as command

    return command(argv)


#: tool -> its command (``lightning-aquila TOOL ARGV``), returning the exit code
COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "prepare": prepare_command,
    "inspect": inspect_command,
    "remove-domain": remove_domain_command,
    "train-tokenizer": train_tokenizer_command,
    "report": report_command,
    "consolidate": consolidate_command,
    "export-hf": export_hf_command,
    "score": score_command,
}
