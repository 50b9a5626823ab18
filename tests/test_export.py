"""Export bridge: HF parity (logits and greedy tokens), HF round trip, bad input."""

import json
import os
import re
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from a model hub

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402
from conftest import generated_text, small_config  # noqa: E402
from flax import nnx  # noqa: E402

from export import hf as export_hf  # noqa: E402
from export import mapping, stream  # noqa: E402
from export.importing import IMPORT_META  # noqa: E402
from stackwise_jax import checkpoint, config, data, phases, store  # noqa: E402
from stackwise_jax import run as run_lib  # noqa: E402
from stackwise_jax.errors import UserError  # noqa: E402
from stackwise_jax.run import abstract_params, load_run, rack_from_params  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"step": 0, "global_step": 6, "stages": [], "stage_wall_s": 0.0, "stage_tokens": 0,
        "stage_nonfinite": 0}
N_NEW = 32


def tiny_cfg(**model):
    cfg = config.defaults()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff = 300, 64, 4, 2, 128
    m.architecture.n_stacks, m.architecture.blocks_per_stack = 2, 2
    cfg.data.seq_len = 64
    for key, value in model.items():
        if key in ("n_stacks", "blocks_per_stack"):
            m.architecture[key] = value
        else:
            m[key] = value
    if m.tie_embeddings:  # one matrix: embedding and head must train in the same stages
        cfg.training.train_head = cfg.training.train_embedding
    config.validate(cfg)
    return cfg


def random_params(cfg, seed=0):
    """Every parameter random (norm weights too, so a swapped norm would show)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        is_norm = any("norm" in str(getattr(k, "key", k)) for k in path)
        return jnp.asarray(1.0 + 0.3 * noise if is_norm else 0.08 * noise)
    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg.model))


@pytest.fixture(scope="module")
def bpe():
    return data.build_tokenizer(config.defaults().data, [generated_text(300, 0)], 300)


def write_run(workdir, cfg, params, tok, done=True):
    """A run as the trainer leaves it at a phase boundary: each group's store, written by
    the last phase that stores it (version index + 1), and a checkpoint holding only meta.
    done=False: the last phase has not run (its stores are absent, its stack unborn)."""
    checkpoint.claim_workdir(workdir, cfg)
    all_phases = phases.all_phases(cfg)
    stage = len(all_phases) if done else len(all_phases) - 1
    versions = {g: p.index + 1 for p in all_phases[:stage] for g in p.stores}
    for group, version in sorted(versions.items()):
        tree = params["stacks"][int(group[6:])] if group.startswith("stack_") else params[group]
        store.write(workdir, group, version, tree, "fp32")
    ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint.max_to_keep)
    ckpt.save(6, dict(META, stage=stage, done=done), data_state={})
    ckpt.close()
    tok.save(os.path.join(workdir, "tokenizer"))
    return workdir


def store_path(run, group):
    """The directory of the newest store of `group` in the run."""
    return os.path.join(store.root(run), group, f"v{store.versions(run, group)[-1]:05d}")


def forbid_whole_tree(monkeypatch):
    """Makes any read of a whole group tree or of the whole Rack fail: the export must
    stream array by array."""
    def refuse(*args, **kwargs):
        raise AssertionError("the export read a whole tree")
    monkeypatch.setattr(run_lib.RunParams, "tree", refuse)
    monkeypatch.setattr(store.Store, "tree", refuse)
    monkeypatch.setattr(run_lib, "load_run", refuse)


def load_hf(out_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32).eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()


def jax_greedy(forward, prompt, n_new, shape):
    """Greedy decoding by full causal forwards on a fixed buffer (row 0), so no recompiles."""
    P = len(prompt)
    assert P + n_new <= shape[1]
    ids = np.zeros(shape, np.int32)
    ids[0, :P] = prompt
    for t in range(P, P + n_new):
        ids[0, t] = int(np.argmax(forward(ids)[0, t - 1]))
    return ids[0, P:P + n_new].tolist()


def hf_greedy(model, prompt, n_new):
    model.generation_config.eos_token_id = None  # exactly n_new tokens, as in jax_greedy
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def causal_forward(rack):
    """ids -> logits of the Rack in causal mode, jitted (eager scans are slow)."""
    graphdef, state = nnx.split(rack)
    jitted = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids, mode="causal"))
    return lambda ids: np.asarray(jitted(state, jnp.asarray(ids, jnp.int32)))


def float32_parity_tolerance(m, seq_len: int, max_abs_logit: float) -> float:
    """How far two float32 implementations of the same model may drift apart, from rounding
    alone (docs/export.md derives it): 4 sqrt(n) eps32 n_layers max|logit|, n the longest
    sum inside a layer (d_model, d_ff or the seq_len keys). A sum of n terms rounded in
    another order differs by a random walk of n roundings of u = eps32/2, about sqrt(n) u
    relative; each layer adds that to the residual stream; the logits carry it at their own
    scale; 8 = sqrt(2) (both sides round) x ~5.6 (the largest of ~1e5 roughly Gaussian
    errors). On trained tiny runs (logits up to 14-20) differences of 0.02 to 0.33 of it
    were measured (docs/export.md)."""
    n = max(m.d_model, m.d_ff, seq_len)
    n_layers = m.architecture.n_stacks * m.architecture.blocks_per_stack
    return 4 * np.sqrt(n) * np.finfo(np.float32).eps * n_layers * max_abs_logit


def check_parity(rack, out_dir, tok, tol=1e-4):
    """Logits of HF (eager, fp32) vs the Rack in causal mode; 32 greedy tokens of each.
    tol: a number, or "scaled" for float32_parity_tolerance at these logits."""
    model = load_hf(out_dir)
    forward = causal_forward(rack)
    ids = np.random.default_rng(1).integers(0, rack.config.vocab_size, (2, 40)).astype(np.int32)
    ours = forward(ids)
    diff = float(np.abs(ours - hf_logits(model, ids)).max())
    if tol == "scaled":
        tol = float32_parity_tolerance(rack.config, ids.shape[1], float(np.abs(ours).max()))
        print(f"scaled tolerance {tol:.2e} at max |logit| {np.abs(ours).max():.2f}")
    assert diff <= tol, (diff, tol)
    prompt = tok.encode("The king finds")
    assert hf_greedy(model, prompt, N_NEW) == jax_greedy(forward, prompt, N_NEW, ids.shape)
    print(f"max abs logit diff {diff:.2e}")
    return diff

# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("model", [
    dict(n_kv_heads=2, tie_embeddings=False),  # grouped-query attention, untied head
    dict(n_kv_heads=1, tie_embeddings=True, n_stacks=4, blocks_per_stack=1),  # MQA, tied
    dict(n_kv_heads=4, tie_embeddings=False, blocks_per_stack=3, rope_theta=500000.0,
         norm_eps=1e-6),
], ids=["gqa-untied-2x2", "mqa-tied-4x1", "mha-2x3"])
def test_random_weights_parity(tmp_path, bpe, model, monkeypatch):
    cfg = tiny_cfg(**model)
    params = random_params(cfg)
    run = write_run(str(tmp_path / "run"), cfg, params, bpe)
    out = str(tmp_path / "hf")
    forbid_whole_tree(monkeypatch)
    assert export_hf.main([f"--workdir={run}", f"--out={out}", "--quiet"]) == 0
    assert os.path.exists(os.path.join(out, "model.safetensors"))  # small: one file
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    assert hf_cfg["num_key_value_heads"] == model["n_kv_heads"]
    assert hf_cfg["tie_word_embeddings"] == model["tie_embeddings"]
    check_parity(rack_from_params(cfg.model, params), out, bpe)


def test_rope_theta_is_written_where_the_installed_transformers_reads_it(tmp_path):
    """transformers 4.x reads `rope_theta`, 5.x `rope_parameters`; pyproject requires
    transformers >= 5.0 (test_transformers_floor runs exports under 5.0.0 itself). With the
    installed version, the frequencies HF's rotary embedding builds from rope_parameters in
    a written config.json must be the Rack's, at a theta no default would give."""
    from packaging.version import Version
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pin = re.search(r'"transformers>=([0-9.]+)"', f.read()).group(1)
    assert Version(pin) >= Version("5.0") and Version(transformers.__version__) >= Version(pin)
    cfg = tiny_cfg(rope_theta=123456.0)
    transformers.LlamaConfig(**mapping.hf_config_kwargs(cfg, {"eos_id": 0}, "float32")
                             ).save_pretrained(tmp_path)
    written = json.load(open(tmp_path / "config.json"))
    assert written["rope_parameters"]["rope_theta"] == 123456.0
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    rotary = LlamaRotaryEmbedding(transformers.AutoConfig.from_pretrained(tmp_path))
    E = cfg.model.d_model // cfg.model.n_heads
    want = 1.0 / 123456.0 ** (np.arange(0, E, 2) / E)
    np.testing.assert_allclose(rotary.inv_freq.numpy(), want, rtol=1e-6)


def test_bf16_export(tmp_path, bpe):
    """bf16 export = the fp32 model with weights rounded to bf16: exact against that model,
    and within 3e-2 (relative to the largest logit) of the fp32 one."""
    cfg = tiny_cfg()
    params = random_params(cfg, seed=3)
    run = write_run(str(tmp_path / "run"), cfg, params, bpe)
    out = str(tmp_path / "hf")
    export_hf.export_run(run, out, dtype="bfloat16", progress=False)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    rounded = jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)), params)
    check_parity(rack_from_params(cfg.model, rounded), out, bpe)
    ids = np.random.default_rng(1).integers(0, 300, (2, 40))
    fp32 = causal_forward(rack_from_params(cfg.model, params))(ids)
    diff = np.abs(fp32 - hf_logits(load_hf(out), ids)).max()
    print(f"bf16 export vs fp32 Rack: max abs logit diff {diff:.2e}, max |logit| "
          f"{np.abs(fp32).max():.2f}")
    assert diff <= 3e-2 * np.abs(fp32).max(), (diff, np.abs(fp32).max())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_dir, bpe):
    """An HF Llama (random) imported into a run, then trained to the end by the trainer:
    evidence that an import is ready to train, and trained weights for the parity test."""
    if not os.path.exists(os.path.join(ROOT, "stackwise_jax", "train.py")):
        pytest.skip("stackwise_jax/train.py is not written yet")
    from stackwise_jax import train
    cfg = small_config(corpus_dir, **{"training.steps_per_stage": 3, "eval.batches": 1,
                                      "eval.mask_ratios": (0.5,), "checkpoint.every_steps": 100})
    root = tmp_path_factory.mktemp("trained")
    hf_dir, workdir = str(root / "hf"), str(root / "run")
    save_hf_model(hf_dir, cfg)
    hf_tokenizer_dir(hf_dir, bpe.backend, eos_token="<|endoftext|>", mask_token="[MASK]")
    export_hf.import_hf(hf_dir, workdir, cfg, progress=False)
    assert load_run(workdir).step == 0
    train.run(cfg, workdir, progress=False)
    return workdir


def test_trained_weights_parity(tmp_path, trained_run, monkeypatch):
    out = str(tmp_path / "hf")
    with monkeypatch.context() as patch:
        forbid_whole_tree(patch)
        assert export_hf.main([f"--workdir={trained_run}", f"--out={out}", "--quiet"]) == 0
    # what training left: every stack stored once, by the stage that trained it, started
    # from the imported weights (3 small steps away from them; a fresh init is ~0.1 away)
    assert store.versions(trained_run, "stack_00000") == [1]
    assert store.versions(trained_run, "stack_00001") == [2]
    imported = safetensors_dict(os.path.join(os.path.dirname(trained_run), "hf"))
    trained = np.asarray(store.open_store(trained_run, "stack_00001", 2)
                         .read("blocks.attn.q_proj.kernel"))[1].T
    drift = np.abs(trained - imported["model.layers.3.self_attn.q_proj.weight"].numpy()).max()
    assert 0 < drift < 0.02, drift
    loaded = load_run(trained_run, require_finished=True)
    assert loaded.step == 6  # 2 stages of 3 steps, started from the imported weights
    check_parity(loaded.rack, out, loaded.tokenizer, tol="scaled")
    tok = loaded.tokenizer
    # stackwise_jax.generate (KV cache, greedy) continues as HF's generate does
    from stackwise_jax.generate import generate
    prompt = tok.encode("The king finds")
    ours = generate(loaded.rack, prompt, N_NEW)[len(prompt):].tolist()
    assert ours == hf_greedy(load_hf(out), prompt, N_NEW)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "The queen hides the map by the river."
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert (hf_tok.mask_token, hf_tok.mask_token_id) == ("[MASK]", tok.mask_id)
    assert hf_tok.eos_token_id == tok.eos_id

def test_unfinished_mid_phase_export(tmp_path, corpus_dir, monkeypatch, capsys):
    """A run stopped inside stage 2: stage 1's groups come from their stores, what stage 2
    trains (stack 1, final norm, head) from the checkpoint; the export matches load_run."""
    if not os.path.exists(os.path.join(ROOT, "stackwise_jax", "train.py")):
        pytest.skip("stackwise_jax/train.py is not written yet")
    from stackwise_jax import resident, train
    cfg = small_config(corpus_dir, **{"training.steps_per_stage": 3, "eval.batches": 1,
                                      "eval.mask_ratios": (0.5,), "checkpoint.every_steps": 100})
    run = str(tmp_path / "run")
    train.run(cfg, run, max_steps=5, progress=False)  # stage 1, then 2 steps of stage 2
    assert store.versions(run, "stack_00001") == []  # stack 1 lives in the checkpoint only
    out = str(tmp_path / "hf")
    assert_clean_error(*run_cli(capsys, f"--workdir={run}", f"--out={out}"),
                       "has not finished training (latest checkpoint: phase 1, step 2)", tmp_path)
    with monkeypatch.context() as patch:
        forbid_whole_tree(patch)
        assert export_hf.main([f"--workdir={run}", f"--out={out}", "--allow_unfinished",
                               "--quiet"]) == 0
    loaded = load_run(run)
    assert not loaded.finished
    check_parity(loaded.rack, out, loaded.tokenizer)
    exported = safetensors_dict(out)["model.layers.2.self_attn.q_proj.weight"].numpy()
    born = np.asarray(resident.init_stack(cfg, 1)["blocks"]["attn"]["q_proj"]["kernel"])[0].T
    assert 0 < np.abs(exported - born).max() < 0.05  # trained (warmup: step 1 has lr 0)


# ------------------------------------------------------------------------------- import


def hf_tokenizer_dir(directory, backend, **special):
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(
        directory)


def save_hf_model(directory, cfg, dtype=torch.float32, max_shard_size="5GB", seed=0):
    m = cfg.model
    kwargs = mapping.hf_config_kwargs(cfg, {"eos_id": 0}, "float32")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    with torch.no_grad():
        for p in model.parameters():  # random norms too
            p.add_(0.05 * torch.randn_like(p))
    model.to(dtype).save_pretrained(directory, max_shard_size=max_shard_size)
    return model, m


def safetensors_dict(directory):
    from safetensors import safe_open
    out = {}
    for name, path in stream.safetensors_files(directory).items():
        with safe_open(path, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize("dtype,tied", [("float32", False), ("bfloat16", True)])
def test_hf_round_trip_identical(tmp_path, bpe, dtype, tied):
    cfg = tiny_cfg(tie_embeddings=tied)
    hf_dir, run, back = (str(tmp_path / n) for n in ("hf", "run", "back"))
    model, _ = save_hf_model(hf_dir, cfg, getattr(torch, dtype), max_shard_size="200KB")
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))  # sharded
    hf_tokenizer_dir(hf_dir, bpe.backend, eos_token="<|endoftext|>", mask_token="[MASK]")
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("from stackwise_jax.config import defaults\n"
                        "def get_config():\n    c = defaults()\n    return c\n")
    m = cfg.model
    overrides = [f"--config.model.{k}={m[k]}" for k in
                 ("vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff", "tie_embeddings")]
    overrides += [f"--config.model.architecture.{k}={m.architecture[k]}" for k in
                  ("n_stacks", "blocks_per_stack")] + ["--config.data.seq_len=64"]
    overrides += ["--config.training.train_head=first_stage"] if tied else []
    stack_dtype = "bf16" if dtype == "bfloat16" else "fp32"  # bf16 weights fit bf16 stores
    overrides += [f"--config.training.progressive.stack_storage_dtype={stack_dtype}"]
    assert export_hf.main([f"--import_from={hf_dir}", f"--workdir={run}", f"--config={cfg_file}",
                           "--quiet"] + overrides) == 0
    # version-0 stores (stacks in stack_storage_dtype, the rest fp32), leaf names as the
    # trainer's own parameters have them, and a checkpoint 0 holding only meta
    expected = abstract_params(cfg.model)
    for group in run_lib.RunParams(run).groups():
        assert store.versions(run, group) == [0], group
        s = store.open_store(run, group, 0)
        assert s.dtype == (stack_dtype if group.startswith("stack_") else "fp32"), group
        tree = (expected["stacks"][int(group[6:])] if group.startswith("stack_")
                else expected[group])
        want = {n: tuple(x.shape) for n, x in store.flatten(tree).items()}
        assert {n: s.shape(n) for n in s.leaves} == want, group
    ckpt = checkpoint.Checkpointer(run, 1, create=False)
    assert ckpt.latest_step() == 0 and ckpt.meta(0) == IMPORT_META
    assert ckpt.restore(0)[0] == {}
    items = set(os.listdir(os.path.join(run, "checkpoints", "0")))
    assert {"meta", "data"} <= items and not items & {"params", "trainable", "opt_state"}, items
    ckpt.close()
    loaded = load_run(run)  # the trainer's loader accepts it, at step 0, not finished
    assert loaded.step == 0 and not loaded.finished
    assert loaded.tokenizer.mask_id == bpe.mask_id
    assert export_hf.main([f"--workdir={run}", f"--out={back}", f"--dtype={dtype}",
                           "--allow_unfinished", "--quiet"]) == 0
    a, b = safetensors_dict(hf_dir), safetensors_dict(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    if dtype == "float32":  # and the imported Rack computes what the HF model computes
        ids = np.random.default_rng(2).integers(0, 300, (1, 24))
        diff = np.abs(causal_forward(loaded.rack)(ids) - hf_logits(model.eval(), ids)).max()
        print(f"imported Rack vs HF model: max abs logit diff {diff:.2e}")
        assert diff <= 1e-4


def test_import_adds_mask_in_a_spare_row_or_explains(tmp_path):
    """An HF tokenizer without [MASK]: appended if model.vocab_size leaves a row, else an
    error naming model.vocab_size; a larger vocab_size adds rows started at the mean row."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=299, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([generated_text(300, 1)], trainer)
    n_tokens = backend.get_vocab_size()
    cfg = tiny_cfg(vocab_size=n_tokens + 1)
    hf_dir = str(tmp_path / "hf")
    save_hf_model(hf_dir, cfg)
    hf_tokenizer_dir(hf_dir, backend, eos_token="</s>")
    run = str(tmp_path / "run")
    export_hf.import_hf(hf_dir, run, cfg, progress=False)
    tok = data.Tokenizer.load(os.path.join(run, "tokenizer"))
    assert (tok.mask_id, tok.eos_id, tok.vocab_size) == (n_tokens, 0, n_tokens + 1)

    full = tiny_cfg(vocab_size=n_tokens)
    full_dir = str(tmp_path / "hf_full")
    save_hf_model(full_dir, full)
    hf_tokenizer_dir(full_dir, backend, eos_token="</s>")
    with pytest.raises(UserError, match=f"model.vocab_size={n_tokens + 1}"):
        export_hf.import_hf(full_dir, str(tmp_path / "run2"), full, progress=False)
    assert not os.path.exists(tmp_path / "run2")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]

    grown = tiny_cfg(vocab_size=n_tokens + 1)
    export_hf.import_hf(full_dir, str(tmp_path / "run3"), grown, progress=False)
    params = load_run(str(tmp_path / "run3")).rack
    embed = np.asarray(nnx.to_pure_dict(nnx.state(params, nnx.Param))["embed"]["embedding"])
    np.testing.assert_allclose(embed[-1], embed[:-1].mean(0), atol=1e-6)


def test_sentencepiece_tokenizer_export(tmp_path):
    import sentencepiece as spm
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_text(400, 5))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    tok = data.Tokenizer(spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model")))
    cfg = tiny_cfg(vocab_size=tok.vocab_size)
    run = write_run(str(tmp_path / "run"), cfg, random_params(cfg), tok)
    out = str(tmp_path / "hf")
    export_hf.export_run(run, out, progress=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "The miller mends a wooden chair  near the mill.\nOur captain sells the bell."
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert (hf_tok.mask_token_id, hf_tok.eos_token_id) == (tok.mask_id, tok.eos_id)

# ---------------------------------------------------------------------------- bad input


def run_cli(capsys, *args):
    capsys.readouterr()  # drop what earlier steps printed
    rc = export_hf.main(list(args) + ["--quiet"])
    err = capsys.readouterr().err
    return rc, err


def assert_clean_error(rc, err, pattern, parent):
    assert rc == 2
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert pattern in err, err
    assert not [p for p in os.listdir(parent) if ".tmp-" in p]  # nothing half-written


def test_unfinished_or_missing_checkpoint(tmp_path, bpe, capsys):
    cfg = tiny_cfg()
    run = write_run(str(tmp_path / "run"), cfg, random_params(cfg), bpe, done=False)
    out = tmp_path / "out"
    assert_clean_error(*run_cli(capsys, f"--workdir={run}", f"--out={out}"),
                       "has not finished training", tmp_path)
    assert not out.exists()
    empty = tmp_path / "empty_run"
    checkpoint.claim_workdir(str(empty), cfg)
    assert_clean_error(*run_cli(capsys, f"--workdir={empty}", f"--out={out}"),
                       "has no checkpoint", tmp_path)
    assert_clean_error(*run_cli(capsys, f"--workdir={tmp_path / 'nowhere'}", f"--out={out}"),
                       "not a StackWise run directory", tmp_path)
    assert not out.exists()


def test_checkpoint_shapes_not_matching_config(tmp_path, bpe, capsys):
    cfg = tiny_cfg()
    run = write_run(str(tmp_path / "run"), cfg, random_params(cfg), bpe)
    wrong = tiny_cfg(d_ff=96)
    checkpoint.atomic_write_text(os.path.join(run, "config.json"), config.to_json(wrong))
    out = tmp_path / "out"
    assert_clean_error(*run_cli(capsys, f"--workdir={run}", f"--out={out}"),
                       "stored tensor stack_00000/blocks.mlp.gate_proj.kernel has shape "
                       "(2, 64, 128) but the run's config.json needs (2, 64, 96)", tmp_path)
    assert not out.exists()


def test_truncated_or_missing_store_names_the_stack(tmp_path, bpe, capsys):
    """A store whose .npy lost its tail, or a stack whose store is gone: one clean error
    naming the stack (store.py's message), exit code 2, nothing half-written."""
    cfg = tiny_cfg()
    run = write_run(str(tmp_path / "run"), cfg, random_params(cfg), bpe)
    out = tmp_path / "out"
    npy = os.path.join(store_path(run, "stack_00001"), "blocks.mlp.up_proj.kernel.npy")
    with open(npy, "r+b") as f:
        f.truncate(os.path.getsize(npy) - 100)
    rc, err = run_cli(capsys, f"--workdir={run}", f"--out={out}")
    assert_clean_error(rc, err, "stored parameters of stack 1", tmp_path)
    assert "truncated" in err and "blocks.mlp.up_proj.kernel.npy" in err, err
    assert not out.exists()

    import shutil
    shutil.rmtree(os.path.join(store.root(run), "stack_00001"))
    rc, err = run_cli(capsys, f"--workdir={run}", f"--out={out}")
    assert_clean_error(rc, err, "stored parameters of stack 1 are missing", tmp_path)
    assert not out.exists()

    os.remove(os.path.join(store_path(run, "embed"), store.MANIFEST))  # a half-written store
    rc, err = run_cli(capsys, f"--workdir={run}", f"--out={out}")
    assert_clean_error(rc, err, "stored parameters of the embedding", tmp_path)
    assert not out.exists()


def test_non_empty_out_dir_needs_overwrite(tmp_path, bpe, capsys):
    cfg = tiny_cfg()
    run = write_run(str(tmp_path / "run"), cfg, random_params(cfg), bpe)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(*run_cli(capsys, f"--workdir={run}", f"--out={out}"),
                       "--overwrite", tmp_path)
    assert os.listdir(out) == ["keep.txt"]
    assert_clean_error(*run_cli(capsys, f"--workdir={run}", f"--out={run}", "--overwrite"),
                       "would replace the input", tmp_path)
    assert run_cli(capsys, f"--workdir={run}", f"--out={out}", "--overwrite")[0] == 0
    assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_failure_midway_leaves_nothing(tmp_path, bpe, monkeypatch):
    cfg = tiny_cfg()
    run = write_run(str(tmp_path / "run"), cfg, random_params(cfg), bpe)

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(stream._FileWriter, "close", boom)
    with pytest.raises(OSError):
        export_hf.export_run(run, str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_import_rejects_other_architectures_and_bad_shapes(tmp_path, bpe, capsys):
    cfg = tiny_cfg()
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("from stackwise_jax.config import defaults\n"
                        "def get_config():\n    c = defaults()\n    c.model.vocab_size = 300\n"
                        "    c.model.d_model = 64\n    c.model.n_heads = 4\n"
                        "    c.model.n_kv_heads = 2\n    c.model.d_ff = 128\n"
                        "    c.model.architecture.n_stacks = 2\n"
                        "    c.model.architecture.blocks_per_stack = 2\n    return c\n")
    run = tmp_path / "run"
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2,
                            architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    assert_clean_error(*run_cli(capsys, f"--import_from={gpt2}", f"--workdir={run}",
                                f"--config={cfg_file}"), "'gpt2' model (GPT2LMHeadModel)",
                       tmp_path)
    hf_dir = tmp_path / "hf"
    save_hf_model(str(hf_dir), cfg)
    hf_tokenizer_dir(str(hf_dir), bpe.backend, eos_token="<|endoftext|>", mask_token="[MASK]")
    assert_clean_error(*run_cli(capsys, f"--import_from={hf_dir}", f"--workdir={run}",
                                f"--config={cfg_file}", "--config.model.d_ff=96"),
                       "intermediate_size=128 but model.d_ff=96", tmp_path)
    hf_json = json.load(open(hf_dir / "config.json"))
    hf_json["num_hidden_layers"] = 3  # config.json and tensors disagree with the config
    hf_json["intermediate_size"] = 128
    (hf_dir / "config.json").write_text(json.dumps(hf_json))
    assert_clean_error(*run_cli(capsys, f"--import_from={hf_dir}", f"--workdir={run}",
                                f"--config={cfg_file}", "--config.model.architecture.n_stacks=3",
                                "--config.model.architecture.blocks_per_stack=1"),
                       "has tensor model.layers.3", tmp_path)
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(tensors, str(hf_dir / "model.safetensors"))
    hf_json["num_hidden_layers"] = 4
    (hf_dir / "config.json").write_text(json.dumps(hf_json))
    assert_clean_error(*run_cli(capsys, f"--import_from={hf_dir}", f"--workdir={run}",
                                f"--config={cfg_file}"),
                       "model.layers.1.self_attn.k_proj.weight has shape (16, 64)", tmp_path)
    assert not run.exists()


def test_sizes_and_shard_plan():
    assert stream.parse_size("5GB") == 5 * 10**9
    assert stream.parse_size("2GiB") == 2 * 2**30
    assert stream.parse_size("500kb") == 500_000
    assert stream.parse_size("123") == 123
    with pytest.raises(UserError, match="max_shard_size"):
        stream.parse_size("big")
    entries = [("a", (), 40), ("b", (), 40), ("c", (), 100), ("d", (), 10)]
    assert stream.plan_shards(entries, 90) == [["a", "b"], ["c"], ["d"]]
    assert stream.shard_file_names(2) == ["model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors"]


def test_help_runs():
    out = subprocess.run([sys.executable, "-m", "export.hf", "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0 and "--import_from" in out.stdout
