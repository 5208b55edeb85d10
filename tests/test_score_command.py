"""``lightning-aquila score``: the fastText scorer ranks clean above junk, the perplexity
scorer matches a direct computation with the model, ``attach``/``remove`` from the command
line, and ``inspect`` shows each score's distribution."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_aquila.cli import main as cli
from lightning_aquila.datamodules.prepare import prepare
from lightning_aquila.datamodules.store import ShardStore, document_scores, iter_documents
from lightning_aquila.model import AquilaConfig, AquilaModel

TEXT = ("the river carries water from the mountains to the sea and the people who live "
        "along its banks grow rice wheat and fruit in the fertile soil")
WORDS = TEXT.split()


def clean(rng: random.Random) -> str:
    sentences = [" ".join(rng.sample(WORDS, 10)).capitalize() + "." for _ in range(4)]
    return " ".join(sentences)


def junk(rng: random.Random) -> str:
    return " | ".join(rng.choice(["Home", "Login", "Cart", "Menu", "© 2024", "Click here",
                                  "Subscribe", "ÃƒÂ©", "Next >>"]) for _ in range(20))


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture
def mixed_store(tmp_path: Path) -> tuple[str, list[bool]]:
    """A one-domain store whose documents alternate clean and junk (held out: 20%), and
    which documents are clean, in the order of the train split then the held-out split."""
    rng = random.Random(0)
    texts = [clean(rng) if i % 2 == 0 else junk(rng) for i in range(60)]
    url = str(tmp_path / "store.zarr")
    prepare(write_jsonl(tmp_path / "web.jsonl", texts), "web", url, held_out_fraction=0.2,
            progress=False)
    from lightning_aquila.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    shards = ShardStore(url)
    is_clean = [tokenizer.decode(doc.tolist(), skip_special_tokens=True) in texts[0::2]
                for split in ("train", "heldout") for doc in iter_documents(shards, "web", split)]
    return url, is_clean


def test_fasttext_scores_clean_documents_above_junk(mixed_store, tmp_path, capsys):
    pytest.importorskip("fasttext", reason="the 'quality' extra (fasttext-numpy2)")
    url, is_clean = mixed_store
    rng = random.Random(1)  # training documents the store does not hold
    positive = write_jsonl(tmp_path / "good.jsonl", [clean(rng) for _ in range(40)])
    negative = write_jsonl(tmp_path / "bad.jsonl", [junk(rng) for _ in range(40)])
    model = str(tmp_path / "hq.bin")
    assert cli(["score", "fasttext", url, "--positive", positive, "--negative", negative,
                "--save-model", model, "--processes", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "score 'fasttext_hq' attached to" in out and "documents/s" in out
    assert Path(model).is_file()
    shards = ShardStore(url)
    values = np.concatenate([document_scores(shards, "web", "fasttext_hq", split)[1]
                             for split in ("train", "heldout")])
    is_clean = np.array(is_clean)
    assert not np.isnan(values).any()
    assert values[is_clean].min() > 0 > values[~is_clean].max()
    assert shards.info("web").scores["fasttext_hq"]["label"] == "__label__hq"
    # the saved model scores again, from --model, and replaces the column with the same values
    assert cli(["score", "fasttext", url, "--model", model, "--replace", "--quiet",
                "--processes", "1"]) == 0
    again = np.concatenate([document_scores(ShardStore(url), "web", "fasttext_hq", split)[1]
                            for split in ("train", "heldout")])
    np.testing.assert_allclose(again, values, rtol=1e-6)


def test_fasttext_needs_training_files_or_a_model(mixed_store, capsys):
    pytest.importorskip("fasttext", reason="the 'quality' extra (fasttext-numpy2)")
    url, _ = mixed_store
    assert cli(["score", "fasttext", url, "--quiet"]) == 1
    assert "give --positive and --negative files to train on, or --model" in \
        capsys.readouterr().err


def tiny_checkpoint(path: Path) -> AquilaModel:
    torch.manual_seed(0)
    config = AquilaConfig.from_name("aquila2-tiny", max_seq_len=16)
    model = AquilaModel(config)
    torch.save({"aquila_config": config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return model.eval()


def direct_score(model: AquilaModel, tokens: np.ndarray, context: int) -> float:
    """-mean NLL of tokens[1:], each window of ``context`` predictions read fresh."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, context):
        window = torch.from_numpy(tokens[start:start + context + 1].astype(np.int64))
        with torch.no_grad():
            logits = model(window[None, :-1])[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        nll -= logp.gather(1, window[1:, None]).sum().item()
        count += len(window) - 1
    return -nll / count


def test_perplexity_matches_a_direct_computation_with_the_model(mixed_store, tmp_path,
                                                                 capsys):
    url, _ = mixed_store
    checkpoint = tmp_path / "tiny.ckpt"
    model = tiny_checkpoint(checkpoint)
    assert cli(["score", "perplexity", url, "--checkpoint", str(checkpoint), "--quiet",
                "--batch-tokens", "64", "--threads", "2"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    shards = ShardStore(url)
    for split in ("train", "heldout"):
        _, values = document_scores(shards, "web", "ppl", split)
        documents = list(iter_documents(shards, "web", split))
        assert len(values) == len(documents)
        for doc, value in list(zip(documents, values))[:4]:
            assert len(doc) > 16  # several windows of 16 predictions each
            assert value == pytest.approx(direct_score(model, doc, 16), abs=1e-4)
    assert shards.info("web").scores["ppl"]["context"] == 16


def test_perplexity_refuses_a_store_with_ids_outside_the_vocabulary(dmu_make_store, tmp_path,
                                                                     capsys):
    url = dmu_make_store({"a": 500})  # synthetic ids reach 5 million
    checkpoint = tmp_path / "tiny.ckpt"
    tiny_checkpoint(checkpoint)
    assert cli(["score", "perplexity", url, "--checkpoint", str(checkpoint), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "domain 'a' has token id 5000399, but the model's vocabulary has 8192 ids" in err


def test_attach_from_a_file_remove_and_inspect_from_the_command_line(dmu_make_store,
                                                                     tmp_path, capsys):
    url = dmu_make_store({"a": 3000, "b": 1000}, documents=8)
    values = tmp_path / "mine.npz"
    np.savez(values, train=np.array([1, 2, 3, 4, 5, 6, 7, np.nan]), heldout=np.array([0.5]))
    assert cli(["score", "attach", url, "--domain", "a", "--name", "mine",
                "--values", str(values)]) == 0
    capsys.readouterr()
    assert cli(["inspect", url]) == 0
    out = capsys.readouterr().out
    table = out.split("document scores", 1)[1].splitlines()[1:]
    assert table[0].split() == ["domain", "score", "scored", "NaN", "min", "q25", "median",
                                "q75", "max"]
    assert table[2].split() == ["a", "mine", "8", "1", "0.5", "1.75", "3.5", "5.25", "7"]
    assert len(table) == 3  # b has no score
    assert cli(["score", "attach", url, "--domain", "a", "--name", "mine",
                "--values", str(values)]) == 1
    assert "score 'mine' exists; pass --replace" in capsys.readouterr().err
    assert cli(["score", "remove", url, "--domain", "a", "--name", "mine"]) == 0
    assert ShardStore(url).info("a").scores == {}
    capsys.readouterr()
    assert cli(["inspect", url]) == 0
    assert "document scores" not in capsys.readouterr().out
