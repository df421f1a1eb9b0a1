"""A corpus for a cartridge: plain-text or markdown files, read with clear errors and cut into chunks that fit.

Each file is one document. A document longer than ``chunk_tokens`` is cut at paragraph boundaries (blank lines)
into chunks of at most ``chunk_tokens`` tokens; a single paragraph longer than that is cut at token boundaries
(decoded back to text). Chunks never cross documents. Every chunk is what the teacher reads in its context during
self-study (``training/self_study.py``), so ``chunk_tokens`` + a conversation must fit the model's context.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from softprompts.errors import DataError

SUFFIXES = (".txt", ".md", ".markdown", ".rst", "")


@dataclass(frozen=True)
class Chunk:
    """One piece of the corpus: its text, the document it comes from and its place there."""

    text: str
    source: str
    index: int  # within its document


def read_corpus(paths: list[str | Path]) -> list[tuple[str, str]]:
    """``(path, text)`` per file; a missing, empty, binary or non-UTF-8 file is a ``DataError`` naming it."""
    if not paths:
        raise DataError("--corpus needs at least one text or markdown file")
    documents = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"corpus file {path} does not exist (or is not a file)")
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"corpus file {path}: a cartridge reads plain text or markdown ({', '.join(SUFFIXES[:-1])}"
                            f"), got {path.suffix!r}; convert it to text first")
        raw = path.read_bytes()
        if b"\0" in raw:
            raise DataError(f"corpus file {path} is binary, not text")
        try:
            text = raw.decode("utf-8").replace("\r\n", "\n").strip()
        except UnicodeDecodeError as error:
            raise DataError(f"corpus file {path} is not UTF-8 text (byte {error.start}); re-save it as UTF-8") from None
        if not text:
            raise DataError(f"corpus file {path} is empty")
        documents.append((str(path), text))
    return documents


def corpus_digest(documents: list[tuple[str, str]]) -> str:
    """A sha256 over the documents' texts (not their paths): what self-study data was generated from."""
    digest = hashlib.sha256()
    for _, text in documents:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()


def chunk_documents(documents: list[tuple[str, str]], tokenize: Callable[[str], list[int]],
                    decode: Callable[[list[int]], str], chunk_tokens: int) -> list[Chunk]:
    """Every document cut into chunks of at most ``chunk_tokens`` tokens (module docstring)."""
    if chunk_tokens < 16:
        raise DataError(f"--chunk-tokens must be at least 16, got {chunk_tokens}")
    chunks = []
    for source, text in documents:
        pieces = []
        for paragraph in (p.strip() for p in text.split("\n\n")):
            if paragraph:
                pieces += _split_long(paragraph, tokenize, decode, chunk_tokens)
        current: list[str] = []
        for piece in pieces:
            candidate = "\n\n".join([*current, piece])
            if current and len(tokenize(candidate)) > chunk_tokens:
                chunks.append(Chunk("\n\n".join(current), source, len([c for c in chunks if c.source == source])))
                current = [piece]
            else:
                current.append(piece)
        if current:
            chunks.append(Chunk("\n\n".join(current), source, len([c for c in chunks if c.source == source])))
    return chunks


def _split_long(paragraph: str, tokenize, decode, chunk_tokens: int) -> list[str]:
    ids = tokenize(paragraph)
    if len(ids) <= chunk_tokens:
        return [paragraph]
    return [decode(ids[i : i + chunk_tokens]).strip() for i in range(0, len(ids), chunk_tokens)]


__all__ = ["Chunk", "chunk_documents", "corpus_digest", "read_corpus"]
