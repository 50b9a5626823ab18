"""What the corpus files hold: invalid UTF-8 (refused with its byte offset, or replaced and
counted), binaries, empty files, and a directory where a glob belongs."""

import os
import struct
import zlib

import pytest

from conftest import generated_text, small_config
from stackwise_jax import data
from stackwise_jax.errors import UserError

TEXT = generated_text(200, seed=3)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(tmp_path / "cache"))


def corpus(tmp_path, **files):
    d = tmp_path / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


def png_bytes() -> bytes:
    """A real 2x2 RGB PNG: signature, IHDR, IDAT, IEND."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    raw = b"".join(b"\0" + bytes([200, 10, 30] * 2) for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


LATIN1 = ("Les élèves de l'école lisent à voix haute.\n" * 40).encode("latin-1")
FIRST_BAD = LATIN1.index("é".encode("latin-1"))
N_BAD = sum(LATIN1.count(c.encode("latin-1")) for c in "éèà")  # each a lone invalid byte


def cfg_for(d, **overrides):
    return small_config(str(d), **{"data.heldout_files": "", **overrides})


def test_invalid_utf8_is_refused_with_the_file_and_byte_offset(tmp_path):
    d = corpus(tmp_path, **{"good.txt": TEXT, "french.txt": LATIN1})
    path = str(d / "french.txt")
    with pytest.raises(UserError, match=f"'{path}' is not valid UTF-8: byte offset {FIRST_BAD} "
                                        r"\(0xe9\).*data.decode_errors=replace"):
        data.prepare(cfg_for(d), str(tmp_path / "run"), save_tokenizer=False)
    # The full read (token files) checks each piece at its own offset in the file.
    late = (TEXT * 3).encode() + b"caf\xe9\n" + TEXT.encode()
    (d / "late.txt").write_bytes(late)
    span = data.Span(str(d / "late.txt"), 0, len(late))
    bad_at = late.index(bytes([0xE9]))
    with pytest.raises(UserError, match=f"byte offset {bad_at} "):
        list(data.iter_pieces(span, 500, errors="strict"))
    assert "".join(data.iter_pieces(span, 500)).count("\ufffd") == 1  # the sample's default


def test_replace_reads_invalid_utf8_and_counts_it(tmp_path, capsys):
    literal = "A literal \ufffd is text, not an error.\n" + TEXT
    d = corpus(tmp_path, **{"good.txt": literal, "french.txt": LATIN1})
    cfg = cfg_for(d, **{"data.decode_errors": "replace"})
    p = data.prepare(cfg, str(tmp_path / "run"), save_tokenizer=False)
    assert p.replacements == {"french.txt": N_BAD}
    assert f"'french.txt': {N_BAD} invalid UTF-8 sequences read as U+FFFD" in capsys.readouterr().err
    again = data.prepare(cfg, str(tmp_path / "run"), save_tokenizer=False)  # from the cache
    assert again.replacements == {"french.txt": N_BAD}
    assert again.train_rows.filename == p.train_rows.filename
    # A strict run never takes that cache for one whose files passed the strict check.
    with pytest.raises(UserError, match="not valid UTF-8"):
        data.prepare(cfg_for(d), str(tmp_path / "run"), save_tokenizer=False)


def test_binary_empty_and_directory_corpora(tmp_path, capsys):
    d = corpus(tmp_path, **{"a.txt": TEXT, "b.txt": TEXT, "empty.txt": ""})
    files = data.corpus(cfg_for(d).data)
    assert [os.path.basename(p) for p in files.train] == ["a.txt", "b.txt"]
    assert [(s["file"], s["why"]) for s in files.skipped] == [("empty.txt", "empty")]
    p = data.prepare(cfg_for(d), str(tmp_path / "run"), save_tokenizer=False)
    assert p.skipped_files == [{"file": "empty.txt", "why": "empty"}]
    assert f"skipping '{d / 'empty.txt'}': empty" in capsys.readouterr().err

    (d / "photo.txt").write_bytes(png_bytes())
    with pytest.raises(UserError, match=f"'{d / 'photo.txt'}' is not text \\(NUL bytes"):
        data.corpus(cfg_for(d).data)
    os.remove(d / "photo.txt")
    # Bytes 1..31 twenty times: 25 of each 31 are control bytes (tab, newlines, form feed,
    # vertical tab and escape occur in text); no NUL.
    (d / "ctrl.txt").write_bytes(bytes(range(1, 32)) * 20)
    with pytest.raises(UserError, match="ctrl.txt' is not text \\(500 control bytes"):
        data.corpus(cfg_for(d).data)
    os.remove(d / "ctrl.txt")

    with pytest.raises(UserError, match=f"is a directory; give a glob of its files, e.g. "
                                        f"--config.data.files='{d}/\\*.txt'"):
        data.corpus(cfg_for(d, **{"data.files": str(d)}).data)
    (d / "sub").mkdir()
    with pytest.raises(UserError, match=f"--config.data.files='{d}/\\*\\*/\\*.txt'"):
        data.corpus(cfg_for(d, **{"data.files": str(d) + "/"}).data)
    only_empty = corpus(tmp_path / "e", **{"x.txt": ""})
    with pytest.raises(UserError, match="every file it matches is empty"):
        data.corpus(cfg_for(only_empty).data)
