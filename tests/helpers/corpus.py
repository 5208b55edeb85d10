"""The bundled corpus (``corpus/<domain>/*.jsonl``) prepared into a shard store."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "corpus"


def prepare_bundled_corpus(folder: Path, files: Mapping[str, str] | None = None, *,
                           held_out_fraction: float = 0.05, chunk_tokens: int | None = None
                           ) -> str:
    """``folder/corpus.zarr`` prepared with the bundled tokenizer from ``files`` (domain ->
    file name without ``.jsonl``), by default the first file of every bundled domain;
    ``chunk_tokens``: as ``prepare``'s (default: its default)."""
    from lightning_aquila.datamodules.prepare import prepare

    if files is None:
        files = {domain.name: sorted(domain.glob("*.jsonl"))[0].stem
                 for domain in sorted(CORPUS.iterdir()) if domain.is_dir()}
    url = str(folder / "corpus.zarr")
    for domain, name in files.items():
        prepare(str(CORPUS / domain / f"{name}.jsonl"), domain, url,
                held_out_fraction=held_out_fraction, progress=False,
                **({"chunk_tokens": chunk_tokens} if chunk_tokens else {}))
    return url
