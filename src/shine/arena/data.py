"""Byte-level text data for the arena: loading, a fixed split, seeded batches.

The default corpus needs no download: the standard library's `pydoc_data.topics` (the text of
Python's help topics, ~460 KB), or, where a distribution strips that module, the standard
library's own top-level .py sources.
"""

from __future__ import annotations

import hashlib
import itertools

import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

VAL_FRACTION = 0.1
FALLBACK_BYTES = 1_000_000  # enough stdlib source to stand in for pydoc_data.topics


def default_corpus() -> tuple[bytes, str]:
    """The default training text and a short description of where it came from."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return _stdlib_sources(), "stdlib .py sources (pydoc_data.topics missing)"
    return "\n\n".join(topics[key] for key in sorted(topics)).encode(), "pydoc_data.topics"


def _stdlib_sources() -> bytes:
    """The standard library's top-level .py files in name order, up to FALLBACK_BYTES."""
    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
        if size >= FALLBACK_BYTES:
            break
    return b"\n\n".join(chunks)[:FALLBACK_BYTES]


def read_text_path(path: str | Path, exclude: Path | None = None) -> bytes:
    """The bytes of a text file, or of every text file under a folder in path order.

    Files that look binary (a NUL byte in their first 8 KB), hidden files and the files under
    ``exclude`` (the arena's own output folder, when it lies inside the data folder: its logs and
    reports would change the data from one run to the next) are skipped.
    """
    root = Path(path)
    if root.is_file():
        return root.read_bytes()
    if not root.is_dir():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    chunks, binary = [], 0
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in file.relative_to(root).parts):
            continue
        if exclude is not None and file.resolve().is_relative_to(exclude.resolve()):
            continue
        data = file.read_bytes()
        if b"\0" not in data[:8192]:
            chunks.append(data)
        else:
            binary += 1
    if binary and not chunks:
        raise ValueError(f"--data {path}: its {binary} file(s) look binary (a NUL byte in the first 8 KB, as in "
                         f"UTF-16 text); give text in UTF-8 or another byte encoding")
    return b"\n\n".join(chunks)


@dataclass
class ByteCorpus:
    """A byte string split once into train (head) and validation (tail) parts."""

    train: torch.Tensor  # int64 byte values
    val: torch.Tensor
    source: str
    sha256: str = ""  # of all the bytes

    @classmethod
    def from_bytes(cls, data: bytes, seq_len: int, source: str) -> ByteCorpus:
        """Split `data`; raises ValueError when either part is shorter than one window."""
        if not _split_fits(len(data), seq_len):
            need = next(n for n in itertools.count(int(seq_len / VAL_FRACTION)) if _split_fits(n, seq_len))
            raise ValueError(f"{source}: {len(data)} bytes is too little text for --seq-len {seq_len}; "
                             f"need at least {need} bytes")
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        split = len(tokens) - int(len(tokens) * VAL_FRACTION)
        return cls(train=tokens[:split], val=tokens[split:], source=source, sha256=hashlib.sha256(data).hexdigest())

    def train_batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (input, target) batches of random train windows; the order depends on `seed` only."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            starts = torch.randint(0, len(self.train) - seq_len, (batch_size,), generator=gen)
            yield _windows(self.train, starts, seq_len)

    def val_batches(self, batch_size: int, seq_len: int, max_windows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of batches of up to `max_windows` windows spread evenly over the validation text."""
        n_windows = min(max_windows, len(self.val) - seq_len)
        starts = torch.linspace(0, len(self.val) - seq_len - 1, n_windows).long()
        return [_windows(self.val, chunk, seq_len) for chunk in starts.split(batch_size)]


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs tokens[s : s+seq_len] and their next-byte targets, stacked over `starts`."""
    idx = starts[:, None] + torch.arange(seq_len + 1)
    window = tokens[idx]
    return window[:, :-1], window[:, 1:]


def _split_fits(n: int, seq_len: int) -> bool:
    """Whether `n` bytes split into train and validation parts longer than one window each."""
    n_val = int(n * VAL_FRACTION)
    return min(n - n_val, n_val) > seq_len


def load_corpus(path: str | Path | None, seq_len: int, exclude: Path | None = None) -> ByteCorpus:
    """The corpus of `--data PATH` (without the files under `exclude`), or the default corpus when
    `path` is None."""
    if path is None:
        data, source = default_corpus()
    else:
        data, source = read_text_path(path, exclude), str(path)
    return ByteCorpus.from_bytes(data, seq_len, source)
