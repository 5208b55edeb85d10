"""``prepare --tokenizer`` with tokenizers the project has never seen: each convention for
the end-of-document token, found where Hugging Face puts it, or named with ``--eos-token``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lightning_aquila.cli.tools import prepare_command as main
from lightning_aquila.datamodules.prepare import prepare
from lightning_aquila.datamodules.store import DataError, ShardStore, iter_documents

TEXTS = ["a first small document", "and a second one", "the third and last"]


def build_tokenizer(directory: Path, specials: list[str], *,
                    config: dict | None = None, special_map: dict | None = None) -> Path:
    """A tiny byte-level BPE with ``specials`` as its special tokens, saved in the
    ``from_pretrained`` layout: tokenizer.json, plus the configuration files given."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS * 10, trainer)
    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    for name, content in (("tokenizer_config.json", config),
                          ("special_tokens_map.json", special_map)):
        if content is not None:
            (directory / name).write_text(json.dumps(content), encoding="utf-8")
    return directory


def prepared_documents(tmp_path: Path, tokenizer: Path, **kwargs) -> tuple[list[list[int]],
                                                                           dict]:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), "utf-8")
    url = str(tmp_path / "store.zarr")
    prepare(str(source), "en_docs", url, str(tokenizer), held_out_fraction=0, progress=False,
            **kwargs)
    store = ShardStore(url)
    return ([d.tolist() for d in iter_documents(store, "en_docs")],
            store.info("en_docs").tokenizer)


def assert_each_document_ends_with(docs: list[list[int]], eos: int, tokenizer: Path) -> None:
    """Each stored document is its text encoded by the tokenizer itself, then ``eos``: the
    body, not only where eos sits."""
    encoder = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    assert docs == [[*encoder.encode(t, add_special_tokens=False).ids, eos] for t in TEXTS]
    assert all(eos not in doc[:-1] for doc in docs)


def test_a_llama2_style_tokenizer_json_alone_ends_documents_with_its_s_token(tmp_path):
    path = build_tokenizer(tmp_path / "llama2", ["<unk>", "<s>", "</s>"])
    docs, meta = prepared_documents(tmp_path, path / "tokenizer.json")
    eos = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id("</s>")
    assert_each_document_ends_with(docs, eos, path)
    assert (meta["eos"], meta["eos_id"], meta["eos_from"]) == ("</s>", eos, "vocabulary")
    assert meta["bos"] == "<s>"


def test_a_gpt2_style_directory_names_its_endoftext_eos_in_tokenizer_config(tmp_path):
    path = build_tokenizer(tmp_path / "gpt2", ["<|endoftext|>"],
                           config={"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                                   "model_max_length": 1024})
    docs, meta = prepared_documents(tmp_path, path)
    eos = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert_each_document_ends_with(docs, eos, path)
    assert (meta["eos"], meta["eos_from"]) == ("<|endoftext|>", "tokenizer_config.json:eos_token")


def test_the_configured_eos_wins_over_a_common_spelling_in_the_vocabulary(tmp_path):
    # Llama 3: <|end_of_text|> ends documents although the vocabulary also has </s>-like
    # tokens; special_tokens_map.json writes it as an AddedToken mapping.
    path = build_tokenizer(
        tmp_path / "llama3", ["<|begin_of_text|>", "<|end_of_text|>", "</s>"],
        special_map={"bos_token": {"content": "<|begin_of_text|>", "lstrip": False},
                     "eos_token": {"content": "<|end_of_text|>", "lstrip": False}})
    docs, meta = prepared_documents(tmp_path, path)
    eos = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id("<|end_of_text|>")
    assert_each_document_ends_with(docs, eos, path)
    assert (meta["eos"], meta["bos"]) == ("<|end_of_text|>", "<|begin_of_text|>")
    assert meta["eos_from"] == "special_tokens_map.json:eos_token"


def test_eos_token_overrides_the_configuration(tmp_path):
    path = build_tokenizer(tmp_path / "chat", ["<|endoftext|>", "<|im_end|>"],
                           config={"eos_token": "<|im_end|>"})
    docs, meta = prepared_documents(tmp_path, path, eos_token="<|endoftext|>")
    eos = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert_each_document_ends_with(docs, eos, path)
    assert meta["eos_from"] == "--eos-token"


def test_a_tokenizer_without_an_eos_is_refused_naming_the_flag_that_fixes_it(tmp_path,
                                                                           capsys):
    path = build_tokenizer(tmp_path / "bare", ["[PAD]"])
    source = tmp_path / "in.txt"
    source.write_text("some text\n", "utf-8")
    code = main(["--input", str(source), "--domain", "en", "--output",
                 str(tmp_path / "s.zarr"), "--tokenizer", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"tokenizer {path} has no eos token" in err and "pass --eos-token TEXT" in err
    assert not (tmp_path / "s.zarr").exists()


def test_an_eos_token_missing_from_the_vocabulary_is_named(tmp_path):
    path = build_tokenizer(tmp_path / "gpt2", ["<|endoftext|>"],
                           config={"eos_token": "<|endoftext|>"})
    with pytest.raises(DataError, match=r"--eos-token names '</eos>', which is not in its "
                                        "vocabulary"):
        prepared_documents(tmp_path, path, eos_token="</eos>")


def test_appending_with_another_eos_is_refused(tmp_path):
    path = build_tokenizer(tmp_path / "two", ["<|endoftext|>", "</s>"])
    prepared_documents(tmp_path, path)  # </s>, the first common spelling
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"text": "one more document"}) + "\n", "utf-8")
    with pytest.raises(DataError, match="pass the same --eos-token as before"):
        prepare(str(more), "en_docs", str(tmp_path / "store.zarr"), str(path),
                eos_token="<|endoftext|>", held_out_fraction=0, progress=False)
