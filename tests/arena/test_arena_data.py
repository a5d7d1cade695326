"""The arena's data: the default corpus, its fallback, folders of text, a fixed split and seeded batches."""

import sys

import pytest
import torch

from shine.arena import data


def test_default_corpus_is_pydoc_topics_and_deterministic():
    first, second = data.load_corpus(None, seq_len=64), data.load_corpus(None, seq_len=64)
    assert first.source == "pydoc_data.topics"
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert len(first.val) == pytest.approx(0.1 * (len(first.train) + len(first.val)), abs=1)


def test_fallback_to_stdlib_sources_without_pydoc_data(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # makes the import fail
    text, source = data.default_corpus()
    assert "stdlib" in source
    assert len(text) == data.FALLBACK_BYTES
    assert b"def " in text and b"import " in text
    assert data.default_corpus() == (text, source)


def test_train_batches_depend_on_the_seed_only():
    corpus = data.load_corpus(None, seq_len=32)
    take = lambda seed: [next(batches) for batches in [corpus.train_batches(4, 32, seed)] for _ in range(3)]  # noqa: E731
    a, b, c = take(0), take(0), take(1)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    x, y = a[0]
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes


def test_val_batches_are_fixed_and_inside_the_validation_text():
    corpus = data.load_corpus(None, seq_len=32)
    batches = corpus.val_batches(batch_size=16, seq_len=32, max_windows=40)
    assert [x.shape[0] for x, _ in batches] == [16, 16, 8]
    again = corpus.val_batches(batch_size=16, seq_len=32, max_windows=40)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(batches, again))


def test_folder_reads_text_files_in_path_order_and_skips_binary_and_hidden(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("third")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("hidden")
    assert data.read_text_path(tmp_path) == b"first\n\nsecond\n\nthird"
    assert data.read_text_path(tmp_path / "a.txt") == b"first"


def test_a_folder_of_only_binary_looking_files_says_so(tmp_path):
    """UTF-16 text has NUL bytes: a folder of it had read as 0 bytes of text."""
    (tmp_path / "a.txt").write_bytes("some text".encode("utf-16"))
    with pytest.raises(ValueError, match="its 1 file.* look binary .*UTF-16"):
        data.read_text_path(tmp_path)


def test_missing_path_and_too_little_text_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_corpus(tmp_path / "nope", seq_len=8)
    (tmp_path / "small.txt").write_text("x" * 50)
    with pytest.raises(ValueError, match="too little text"):
        data.load_corpus(tmp_path / "small.txt", seq_len=8)


@pytest.mark.parametrize("seq_len", [1, 16, 64, 100])
def test_too_little_text_names_the_least_that_is_enough(seq_len):
    """The bytes the message asks for are enough, and one fewer is not (it asked for one more than
    needed); no text at all gets the same message (it had been torch's about a zero-length buffer)."""
    with pytest.raises(ValueError, match=r"need at least (\d+) bytes") as err:
        data.ByteCorpus.from_bytes(b"", seq_len, "empty")
    need = int(err.value.args[0].rsplit("need at least ", 1)[1].split()[0])
    corpus = data.ByteCorpus.from_bytes(b"x" * need, seq_len, "just enough")
    assert min(len(corpus.train), len(corpus.val)) > seq_len
    with pytest.raises(ValueError, match=f"{need - 1} bytes is too little"):
        data.ByteCorpus.from_bytes(b"x" * (need - 1), seq_len, "one short")
