"""Byte-level BPE tokenizer: train one, load one, and tell two apart.

Aquila2 uses a BPE vocabulary of 100008 ids whose last two are its special tokens (bos 100006,
eos 100007). We keep that layout at any size: ``vocab_size - 2`` learned tokens, then ``<s>``
and ``</s>`` as the two highest ids, so a model's embedding size and its bos/eos ids follow
from one number. Byte-level pre-tokenization with the full 256-byte alphabet means every
UTF-8 string encodes without an unknown token, and without a normaliser ``decode(encode(s))``
gives ``s`` back exactly, whatever its Unicode form (the bundled corpus is NFC already).

A data store records :func:`tokenizer_hash` of the tokenizer that produced it, so training can
refuse token ids that mean something else to the model. The hash covers what fixes the ids
(vocabulary, merges, special tokens), not the JSON layout, which differs between library
versions.

Any other tokenizer works too: :func:`special_tokens` finds its eos (and bos) token the way
``transformers`` does, from ``tokenizer_config.json`` or ``special_tokens_map.json`` next to
``tokenizer.json`` (the ``from_pretrained`` layout), and otherwise from the spellings common
tokenizers use (``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ...).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from lightning_aquila.atomic import atomic_file

#: The tokenizer shipped with the package, trained on the bundled corpus (vocab 8192).
DEFAULT_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer"
BOS, EOS = "<s>", "</s>"
TOKENIZER_FILE = "tokenizer.json"
#: Files of the ``from_pretrained`` layout that name the special tokens, in the order
#: ``transformers`` gives them precedence.
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
#: Spellings of end-of-document and begin-of-document tokens in common tokenizers (Llama 2 and
#: Aquila2, GPT-2 and its descendants, Llama 3, Gemma, ...), tried in order when no
#: configuration file names them.
EOS_SPELLINGS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>")
BOS_SPELLINGS = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
PathLike = str | os.PathLike[str]


def _new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(files: list[str], output: str, vocab_size: int = 8192,
                    text_field: str = "text", *,
                    fmt: Literal["auto", "txt", "jsonl", "parquet"] = "auto",
                    on_error: Literal["stop", "skip"] = "stop",
                    encoding: str = "utf-8") -> Path:
    """Train a byte-level BPE tokenizer on ``files`` and write ``output/tokenizer.json``;
    returns its path. The files are read as ``prepare`` reads them
    (``datamodules/sources.py``: jsonl, txt, parquet, optionally compressed, local or any
    fsspec URL), a document at a time: the trainer only counts words.

    ``vocab_size - 2`` tokens are learned (the 256 byte symbols included) and ``<s>``/``</s>``
    take ids ``vocab_size - 2`` and ``vocab_size - 1``. Raises ``ValueError`` when the text is
    too small to learn that many tokens, since the special ids would then move. The file is
    written to a temporary name and renamed, so a reader never sees half a tokenizer.

    Args:
        files: input files (.jsonl, .txt, .parquet, optionally compressed); on the command
            line globs, and --input is repeatable
        output: directory to write tokenizer.json into
        vocab_size: total ids, bos and eos included
        text_field: jsonl field / parquet column holding the text
        fmt: input format (on the command line --format; default: by extension)
        on_error: a corrupt record: stop naming file and line, or skip it (a txt file
            that stops decoding is read up to there)
        encoding: the text encoding of the inputs: utf-8, another Python codec (latin-1,
            cp1252, ...), or auto (detected per file)
    """
    from lightning_aquila.datamodules.encoding import check_encoding
    from lightning_aquila.datamodules.sources import read_texts

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    learned = vocab_size - 2
    if learned <= len(alphabet):
        raise ValueError(f"vocab_size must exceed {len(alphabet) + 2} (256 bytes + bos + eos), "
                         f"got {vocab_size}")
    if not files:
        raise ValueError("no input files to train the tokenizer on")
    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=learned, initial_alphabet=alphabet,
                                  special_tokens=[], show_progress=False)
    texts = read_texts(files, text_field=text_field, fmt=fmt, on_error=on_error,
                       encoding=check_encoding(encoding))
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() != learned:
        raise ValueError(f"the input only supports {tokenizer.get_vocab_size()} tokens, not "
                         f"{learned}: give more text or a smaller vocab_size")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in (BOS, EOS)])

    target = Path(output) / TOKENIZER_FILE
    with atomic_file(target, "w", encoding="utf-8") as handle:  # the bytes save() writes
        handle.write(tokenizer.to_str(pretty=True))
    return target


def tokenizer_file(path: PathLike) -> Path:
    """The ``tokenizer.json`` a path names: the file itself or the one in a directory."""
    where = Path(path)
    file = where / TOKENIZER_FILE if where.is_dir() else where
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {os.fspath(path)!s} (expected a "
                                f"{TOKENIZER_FILE} file or a directory holding one)")
    return file


def load_tokenizer(path: PathLike = DEFAULT_TOKENIZER) -> Tokenizer:
    """Load a ``tokenizer.json``, given as the file or the directory holding it."""
    return Tokenizer.from_file(str(tokenizer_file(path)))


def _as_tokenizer(tokenizer_or_path: Tokenizer | PathLike) -> Tokenizer:
    if isinstance(tokenizer_or_path, Tokenizer):
        return tokenizer_or_path
    return load_tokenizer(tokenizer_or_path)


def tokenizer_hash(tokenizer_or_path: Tokenizer | PathLike) -> str:
    """SHA-256 (hex) of what decides the token ids: the vocabulary as sorted (token, id)
    pairs, the merges in order, and the special tokens. Equal for the same tokenizer however
    it was loaded or serialised; different as soon as any id would mean something else."""
    tokenizer = _as_tokenizer(tokenizer_or_path)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    special = sorted((t.content, i) for i, t in tokenizer.get_added_tokens_decoder().items()
                     if t.special)
    payload = {
        "model": model.get("type"),
        "vocab": sorted(tokenizer.get_vocab(with_added_tokens=True).items()),
        "merges": merges,
        "special_tokens": special,
    }
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SpecialTokens:
    """A tokenizer's document delimiters: text, id, and where each was found (for messages
    and the store's metadata)."""

    eos: str | None
    eos_id: int | None
    eos_from: str
    bos: str | None = None
    bos_id: int | None = None
    bos_from: str = ""


class TokenizerError(ValueError):
    """A tokenizer that cannot be used as asked; the message names the file and the fix."""


def _configured(directory: Path, key: str) -> tuple[str, str] | None:
    """``(token text, "file:key")`` of the first configuration file naming ``key``; a token
    may be written as a string or as an AddedToken mapping with its ``content``."""
    for name in SPECIAL_TOKEN_FILES:
        file = directory / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"{file}: not a JSON file ({exc})") from None
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value, f"{file.name}:{key}"
    return None


def _resolve(tokenizer: Tokenizer, directory: Path | None, key: str, given: str | None,
             spellings: tuple[str, ...], where: str) -> tuple[str | None, int | None, str]:
    """One special token: ``given`` (a flag), else a configuration file, else the first
    common spelling the vocabulary has. A token named but absent is an error."""
    if given:
        found: tuple[str, str] | None = (given, f"--{key.replace('_', '-')}")
    else:
        found = _configured(directory, key) if directory else None
    if found is not None:
        text, source = found
        token_id = tokenizer.token_to_id(text)
        if token_id is None:
            raise TokenizerError(f"tokenizer {where}: {source} names {text!r}, which is not in "
                                 "its vocabulary")
        return text, token_id, source
    for text in spellings:
        token_id = tokenizer.token_to_id(text)
        if token_id is not None:
            return text, token_id, "vocabulary"
    return None, None, ""


def special_tokens(tokenizer: Tokenizer | PathLike = DEFAULT_TOKENIZER, *,
                   eos_token: str | None = None, bos_token: str | None = None
                   ) -> SpecialTokens:
    """The eos and bos tokens of a tokenizer, given as a ``Tokenizer`` or a path.

    For a path, ``tokenizer_config.json`` then ``special_tokens_map.json`` beside the
    ``tokenizer.json`` are read first (their ``eos_token``/``bos_token``); otherwise the
    first of :data:`EOS_SPELLINGS` / :data:`BOS_SPELLINGS` the vocabulary holds. ``eos_token``
    / ``bos_token`` override both. A token that is named but not in the vocabulary raises
    ``TokenizerError``; one that cannot be found is ``None``.
    """
    directory = None
    if isinstance(tokenizer, Tokenizer):
        where, tok = "(in memory)", tokenizer
    else:
        directory = tokenizer_file(tokenizer).parent
        where, tok = os.fspath(tokenizer), load_tokenizer(tokenizer)
    eos = _resolve(tok, directory, "eos_token", eos_token, EOS_SPELLINGS, where)
    bos = _resolve(tok, directory, "bos_token", bos_token, BOS_SPELLINGS, where)
    return SpecialTokens(*eos, *bos)


def special_token_ids(tokenizer: Tokenizer | PathLike) -> tuple[int | None, int | None]:
    """``(bos, eos)`` ids, ``None`` for one the tokenizer lacks (a foreign tokenizer may)."""
    found = special_tokens(tokenizer)
    return found.bos_id, found.eos_id


def expand_inputs(patterns: list[str]) -> list[str]:
    """The files ``train-tokenizer --input`` names: each local glob expanded (sorted), each
    file once, a URL as given (the reader expands it); a local pattern that matches nothing is
    a ``FileNotFoundError``."""
    files: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            files.append(pattern)
            continue
        matches = sorted(glob.glob(pattern, recursive=True)) or (
            [pattern] if os.path.isfile(pattern) else [])
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files.extend(m for m in matches if m not in files)
    return files

