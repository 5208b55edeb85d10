"""``lightning-aquila score``: attach a named per-document score to the domains of a store.

    lightning-aquila score fasttext STORE --positive good.jsonl --negative junk.jsonl
    lightning-aquila score perplexity STORE --checkpoint last.ckpt --name ppl
    lightning-aquila score attach STORE --domain web --name mine --values mine.npz
    lightning-aquila score remove STORE --domain web --name ppl

Each subcommand's flags are its function's parameters (as for the other tools,
``cli/tools.py``). Scorers read every document of both splits of each domain, show one
progress line, attach the column (``datamodules/scores.py``: atomic, nothing written on bad
input) and print their throughput.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SUBCOMMANDS = {
    "fasttext": "train (or load) a fastText quality classifier and score documents by it",
    "perplexity": "score documents by -log perplexity under a checkpoint of our model",
    "attach": "attach per-document values from a .npz file (arrays 'train' and 'heldout')",
    "remove": "remove a named score from a domain (atomically)",
}


def score_fasttext(store: str, positive: list[str] | None = None,
                   negative: list[str] | None = None, model: str | None = None,
                   save_model: str | None = None, name: str = "fasttext_hq",
                   domains: list[str] | None = None, label: str = "__label__hq",
                   tokenizer: str | None = None, text_field: str = "text", epoch: int = 20,
                   lr: float = 0.5, word_ngrams: int = 2, dim: int = 100,
                   replace: bool = False, batch_documents: int = 256,
                   processes: int = 1,
                   storage_options: dict[str, Any] | None = None,
                   progress: bool = True) -> None:
    """Score documents by a fastText classifier (DCLM-style): log-odds of ``label``.

    Args:
        store: store path or URL
        positive: high-quality text files (jsonl/parquet/txt, globs); one flag per file
        negative: low-quality text files; one flag per file
        model: an existing fastText .bin instead of training one (DCLM's, datatrove's, ours)
        save_model: where to save the trained classifier (default: STORE's sibling
            NAME.fasttext.bin)
        name: the score's name in the store
        domains: domains to score (repeat the flag; default: all)
        label: the positive label of the model
        tokenizer: the tokenizer the store was prepared with, to decode documents (default:
            the bundled one; checked against the store's record)
        text_field: the text field of jsonl/parquet training files
        epoch: fastText training epochs
        lr: fastText learning rate
        word_ngrams: fastText word n-grams
        dim: fastText vector size
        replace: replace a score of that name
        batch_documents: documents per batch handed to a worker
        processes: worker processes, each decoding and predicting (default 1: in this
            process, decoding on all cores with the tokenizer's threads, predicting on one;
            more pays on many cores, see docs/benchmarks.md)
        storage_options: fsspec options of a remote store, as JSON
    """
    from lightning_aquila.datamodules.shard_format import DataError
    from lightning_aquila.scoring.classifier import FastTextScorer, train_classifier
    from lightning_aquila.tokenizer import DEFAULT_TOKENIZER, tokenizer_hash

    shards, domains = _open(store, domains, name, replace, storage_options)
    tokenizer = str(tokenizer or DEFAULT_TOKENIZER)
    expected = tokenizer_hash(tokenizer)
    for domain in domains:
        recorded = shards.info(domain).tokenizer_hash
        if recorded != expected:
            raise DataError(f"{shards.where(domain)} was prepared with tokenizer {recorded}, "
                            f"not {tokenizer} ({expected}); pass --tokenizer")
    if model is None:
        if not positive or not negative:
            raise DataError("give --positive and --negative files to train on, or --model")
        model = save_model or os.path.join(os.path.dirname(os.path.abspath(store)),
                                           f"{name}.fasttext.bin")
        train_classifier(positive, negative, model, text_field=text_field, epoch=epoch,
                         lr=lr, word_ngrams=word_ngrams, dim=dim)
        print(f"trained fastText classifier on {len(positive)} positive and {len(negative)} "
              f"negative file(s): {model}")
    about = {"scorer": "fasttext", "value": f"log-odds of {label}", "model": model,
             "label": label}
    with FastTextScorer(model, tokenizer, label=label, processes=processes) as scorer:
        _score_all(shards, domains, name, scorer, about, replace=replace,
                   batch_documents=batch_documents, progress=progress)


def score_perplexity(store: str, checkpoint: str, name: str = "ppl",
                     domains: list[str] | None = None, context: int | None = None,
                     batch_tokens: int = 16384, batch_documents: int = 256,
                     device: str | None = None, threads: int | None = None,
                     replace: bool = False, storage_options: dict[str, Any] | None = None,
                     progress: bool = True) -> None:
    """Score documents by -mean token NLL (nats, = -log perplexity) under a checkpoint.

    Args:
        store: store path or URL
        checkpoint: a single-file AquilaLM checkpoint (.ckpt)
        name: the score's name in the store
        domains: domains to score (repeat the flag; default: all)
        context: predicted tokens per window (default: the model's max_seq_len)
        batch_tokens: tokens per forward pass, padding included
        batch_documents: documents read per batch
        device: cpu, cuda, cuda:1, ... (default: a GPU if there is one)
        threads: CPU threads (default: all cores)
        replace: replace a score of that name
        storage_options: fsspec options of a remote store, as JSON
    """
    import torch

    from lightning_aquila.scoring.perplexity import PerplexityScorer, load_model

    torch.set_num_threads(threads or os.cpu_count() or 1)
    shards, domains = _open(store, domains, name, replace, storage_options)
    scorer = PerplexityScorer(load_model(checkpoint), context=context,
                              batch_tokens=batch_tokens, device=device)
    for domain in domains:
        scorer.check_store(shards.where(domain), shards.info(domain).max_token_id)
    about = {"scorer": "perplexity", "value": "-mean token NLL (nats)",
             "checkpoint": str(checkpoint), "context": scorer.context}
    print(f"model: {scorer.model.config.name} on {scorer.device}, context {scorer.context}")
    _score_all(shards, domains, name, scorer, about, replace=replace,
               batch_documents=batch_documents, progress=progress)


def score_attach(store: str, domain: str, name: str, values: str, replace: bool = False,
                 storage_options: dict[str, Any] | None = None) -> None:
    """Attach values computed elsewhere: a .npz with float arrays ``train`` and ``heldout``,
    one value per document in stream order (NaN for none).

    Args:
        store: store path or URL
        domain: the domain
        name: the score's name
        values: the .npz file
        replace: replace a score of that name
        storage_options: fsspec options of a remote store, as JSON
    """
    import numpy as np

    from lightning_aquila.datamodules.scores import attach_score
    from lightning_aquila.datamodules.shard_format import DataError

    try:
        with np.load(values) as arrays:
            columns = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{values}: not a readable .npz file ({exc})") from None
    attach_score(store, domain, name, columns, about={"scorer": "attach", "values": values},
                 replace_existing=replace, storage_options=storage_options)
    print(f"attached score {name!r} to domain {domain!r} of {store}")


def score_remove(store: str, domain: str, name: str,
                 storage_options: dict[str, Any] | None = None) -> None:
    """Remove a named score from a domain: one atomic metadata write, then its arrays go.

    Args:
        store: store path or URL
        domain: the domain
        name: the score's name
        storage_options: fsspec options of a remote store, as JSON
    """
    from lightning_aquila.datamodules.scores import remove_score

    remove_score(store, domain, name, storage_options=storage_options)
    print(f"removed score {name!r} from domain {domain!r} of {store}")


# -- shared steps ---------------------------------------------------------------------------
def _open(store: str, domains: list[str] | None, name: str, replace: bool,
          storage_options: Mapping[str, Any] | None) -> tuple[Any, list[str]]:
    """The store and the domains to score, checked before any work: known domains, a valid
    name, and no existing score of that name unless ``replace``."""
    from lightning_aquila.datamodules.shard_format import DataError, check_score_name
    from lightning_aquila.datamodules.store import ShardStore

    check_score_name(name)
    shards = ShardStore(store, storage_options)
    domains = list(domains or shards.domains)
    for domain in domains:
        if name in shards.info(domain).scores and not replace:
            raise DataError(f"{shards.where(domain)}, score {name!r} exists; pass --replace "
                            "to replace it or choose another --name")
    return shards, domains


def _score_all(shards: Any, domains: Sequence[str], name: str, scorer: Any,
               about: dict[str, Any], *, replace: bool, batch_documents: int,
               progress: bool) -> None:
    from lightning_aquila.datamodules.scores import attach_score
    from lightning_aquila.scoring.documents import Throughput, score_domain

    meter = Throughput()
    for domain in domains:
        values = score_domain(shards, domain, scorer, batch_documents=batch_documents,
                              progress=progress, meter=meter)
        attach_score(shards.url, domain, name, values, about=about, replace_existing=replace,
                     storage_options=shards.storage_options)
        print(f"domain {domain!r}: score {name!r} attached to {len(values['train']):,} train "
              f"and {len(values['heldout']):,} held-out documents")
    print(f"throughput: {meter.line()}")


FUNCTIONS: dict[str, Callable[..., None]] = {
    "fasttext": score_fasttext, "perplexity": score_perplexity,
    "attach": score_attach, "remove": score_remove,
}


def score_command(argv: Sequence[str] | None = None) -> int:
    from lightning_aquila.cli.tools import add_switch, call, tool_parser
    from lightning_aquila.datamodules.shard_format import DataError

    words = list(sys.argv[2:] if argv is None else argv)
    width = max(map(len, SUBCOMMANDS)) + 2
    top = argparse.ArgumentParser(
        prog="lightning-aquila score", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Attach a named per-document score (higher = better) to the domains of "
                    "a shard store, or remove one (docs/data.md, \"Quality\").",
        epilog="subcommands:\n" + "\n".join(f"  {n:<{width}}{text}"
                                             for n, text in SUBCOMMANDS.items())
               + "\n\n`lightning-aquila score SUBCOMMAND --help` shows its flags.")
    top.add_argument("subcommand", choices=list(SUBCOMMANDS), help="what to do (below)")
    sub = top.parse_args(words[:1]).subcommand
    function = FUNCTIONS[sub]
    parser = tool_parser(f"score {sub}", SUBCOMMANDS[sub], function=function,
                         positional={"store"}, flags={"domains": "--domain"},
                         skip={"progress"})
    has_progress = "progress" in inspect.signature(function).parameters
    if has_progress:
        add_switch(parser, "--quiet", help="no progress bar")
    args = parser.parse_argv(words[1:])
    extra = {"progress": not args.quiet} if has_progress else {}
    try:
        call(function, args, **extra)
    except DataError as exc:
        print(f"lightning-aquila score {sub}: error: {exc}", file=sys.stderr)
        return 1
    return 0
