"""Config schema, loading, command-line overrides and validation.

Every config file under configs/ starts from `defaults()` and changes values; it may not
add keys. `validate` checks every key, so a typo or a bad value stops the run at start
with a message that names the key and what is allowed.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os

import ml_collections

from stackwise_jax.errors import UserError

STAGE_POLICIES = ("first_stage", "every_stage", "never")
OBJECTIVES = ("masked_diffusion", "causal")
MASK_SCHEDULES = ("uniform", "linear", "cosine")
MASK_DIRECTIONS = ("increasing", "decreasing")
LOSS_WEIGHTINGS = ("mean", "inv_t")
TRUNK_STRATEGIES = ("frozen", "trainable")
PRECISIONS = ("fp32", "bf16", "fp16")  # fp16 trains with dynamic loss scaling
CACHE_DTYPES = ("fp32", "bf16", "fp8")  # fp8: e4m3 with per-token scales
FROZEN_PRECISIONS = ("fp32", "bf16", "fp8", "nf4")  # fp8: e4m3 per channel; nf4: QLoRA's
REMAT_POLICIES = ("none", "full", "save_dots")
OPTIMIZER_STATE_DTYPES = ("fp32", "bf16")
STACK_STORAGE_DTYPES = ("fp32", "bf16")  # finished stacks on disk (store.py)
NEW_STACK_INITS = ("random", "copy")
STEP_SPLITS = ("equal", "increasing", "decreasing")
FUSION_MODES = ("lora", "block")
DECODE_ERRORS = ("strict", "replace")


def defaults() -> ml_collections.ConfigDict:
    """Every key the project knows, with its default value."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 4096  # includes the [MASK] token
    c.model.d_model = 256
    c.model.n_heads = 8
    c.model.n_kv_heads = 4
    c.model.d_ff = 768
    c.model.rope_theta = 10000.0
    c.model.norm_eps = 1e-5
    c.model.tie_embeddings = False
    c.model.init_std = 0.02
    c.model.remat = "none"  # what a block keeps for backward: none, full, save_dots
    c.model.attention_chunk_size = 0  # >0: attention scores this many queries at a time
    # gqa: grouped-query softmax attention (Llama); mla: DeepSeek's multi-head latent
    # attention (model.mla.*); linear: kernel attention, O(L) (model.linear.*). See
    # stackwise_jax/attention.py.
    c.model.attention = "gqa"
    c.model.mla = ml_collections.ConfigDict()
    c.model.mla.q_lora_rank = 0  # 0: a full query projection; > 0: low-rank query, own RMSNorm
    c.model.mla.kv_lora_rank = 64  # width of the compressed key/value latent (what is cached)
    c.model.mla.qk_nope_head_dim = 32  # per-head key/query part without RoPE
    c.model.mla.qk_rope_head_dim = 16  # RoPE part, one key shared by all heads (even)
    c.model.mla.v_head_dim = 32
    c.model.linear = ml_collections.ConfigDict()
    c.model.linear.feature_map = "elu"  # phi(x) = elu(x) + 1
    c.model.linear.chunk_size = 64  # causal mode: positions per chunk of the prefix-sum scan
    c.model.architecture = ml_collections.ConfigDict()
    c.model.architecture.n_stacks = 4
    c.model.architecture.blocks_per_stack = 1

    c.data = ml_collections.ConfigDict()
    c.data.files = ""  # glob of UTF-8 text files; empty: Shakespeare's works
    c.data.heldout_files = ""  # comma-separated basename globs held out whole
    c.data.heldout_fraction = 0.05  # own files, no heldout_files: tail of each file
    c.data.tokenizer = "bpe"  # 'bpe' (train one), 'llama3', or a tokenizer.json / SP .model
    c.data.bpe_sample_bytes = 32 << 20  # 'bpe' trains on at most this much text, spread out
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.data.seed = 0
    c.data.decode_errors = "strict"  # bad UTF-8 in a corpus file: 'strict' stops; 'replace': U+FFFD

    c.training = ml_collections.ConfigDict()
    c.training.objective = "masked_diffusion"
    c.training.steps_per_stage = 200
    c.training.learning_rate = 3e-3
    c.training.warmup_steps = 20
    c.training.weight_decay = 0.1
    c.training.grad_clip_norm = 1.0
    c.training.optimizer_state_dtype = "fp32"  # Adam moments: fp32 or bf16 (half the bytes)
    c.training.min_mask_fraction = 0.15
    c.training.max_mask_fraction = 0.90
    c.training.mask_schedule_type = "uniform"
    c.training.mask_schedule_direction = "increasing"
    c.training.loss_weighting = "mean"
    c.training.loss_chunk_size = 0  # >0: logits and loss this many positions at a time
    c.training.train_embedding = "first_stage"
    c.training.train_final_norm = "every_stage"
    c.training.train_head = "every_stage"
    c.training.seed = 0
    c.training.log_every = 10
    c.training.grad_accum_steps = 1  # micro-batches of data.batch_size per optimizer step
    # A step whose loss or gradients are not finite changes nothing and is counted; this
    # many in a row stop the run (its last checkpoint is from before them).
    c.training.max_nonfinite_steps = 20
    c.training.progressive = ml_collections.ConfigDict()
    c.training.progressive.enabled = True
    c.training.progressive.trunk_strategy = "frozen"
    c.training.progressive.new_stack_precision = "fp32"
    c.training.progressive.frozen_precision = "fp32"  # storage of frozen stacks: fp32, bf16, fp8, nf4
    c.training.progressive.cache_activations = False
    c.training.progressive.cache_dtype = "bf16"  # fp32, bf16 or fp8 (e4m3, per-token scales)
    c.training.progressive.cache_views = 1  # mask samples stored per training sequence
    c.training.progressive.keep_previous_cache = False
    # Finished stacks are stored once, in this dtype (bf16 halves a run's disk; needs a
    # frozen trunk, since the stored copy is what every later phase reads).
    c.training.progressive.stack_storage_dtype = "fp32"
    # How stack k >= 1 starts in a progressive run: 'random' (from its own (seed, k) key)
    # or 'copy' (the weights stack k - 1 ended its stage with). End-to-end: always random.
    c.training.progressive.new_stack_init = "random"
    # How a progressive run's stages share the budget of steps_per_stage * n_stacks steps:
    # 'equal', or linearly 'increasing' / 'decreasing' with depth (shares k + 1 or n - k).
    c.training.progressive.step_split = "equal"

    # Fusion: a joint phase after all stages (stackwise_jax/fusion.py). mode 'lora': QLoRA
    # adapters on every stack over a frozen base, merged into the weights at the end.
    # mode 'block': block-coordinate, one stack at a time trains at full precision while
    # every other stack is frozen in base_precision (the memory of one stage); the turns
    # cycle over the stacks block_cycles times and share fusion.steps equally.
    c.training.fusion = ml_collections.ConfigDict()
    c.training.fusion.mode = "lora"
    c.training.fusion.steps = 0  # 0: no fusion phase
    c.training.fusion.block_cycles = 1
    c.training.fusion.objective = "masked_diffusion"  # or causal: adapt to causal inference
    c.training.fusion.learning_rate = 1e-3
    c.training.fusion.lora_rank = 8
    c.training.fusion.lora_alpha = 16.0
    c.training.fusion.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj")
    c.training.fusion.base_precision = "nf4"  # storage of the frozen base: fp32, bf16, fp8, nf4
    # What each layer keeps for fusion's backward pass through the whole Rack (none, full,
    # save_dots): full keeps only layer inputs (70B: 5 GiB instead of ~570 GiB at 4096 tokens).
    c.training.fusion.remat = "full"

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100
    c.checkpoint.max_to_keep = 2

    c.eval = ml_collections.ConfigDict()
    # Held-out batches (data.batch_size rows each) scored after each phase and in
    # summary.json, spread evenly over the whole held-out split; 0: every held-out row.
    c.eval.batches = 8
    c.eval.mask_ratios = (0.15, 0.5, 0.9)

    # The device mesh (stackwise_jax/sharding.py): the product of the axes is the number of
    # devices; one axis may be -1, taking what the others leave. The default puts every
    # device on data (one device: the plain single-device run).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # batch rows
    c.mesh.fsdp = 1  # batch rows, and the d_model side of every parameter matrix
    c.mesh.tensor = 1  # Megatron: heads, d_ff and vocabulary split over devices
    return c


# ----------------------------------------------------------------------------- loading


def load(path: str, overrides: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """Loads a config file (a module with get_config()), applies overrides, validates."""
    if not os.path.isfile(path):
        raise UserError(f"--config: no such file '{path}' (expected e.g. configs/tiny.py)")
    spec = importlib.util.spec_from_file_location("stackwise_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report it, do not dump our stack
        raise UserError(f"--config: could not load '{path}': {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise UserError(f"--config: '{path}' defines no get_config()")
    try:
        cfg = module.get_config()
    except Exception as e:  # e.g. ConfigDict's TypeError for a value of the wrong type
        raise UserError(f"--config: get_config() in '{path}' failed: "
                        f"{type(e).__name__}: {e}") from e
    check_keys(cfg)
    for key, raw in (overrides or {}).items():
        set_override(cfg, key, raw)
    validate(cfg)
    return cfg


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separates `--config.a.b=v` arguments from the rest of argv."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config."):].partition("=")
            if not sep:  # `--config.key value`
                if i + 1 >= len(argv):
                    raise UserError(f"--config.{key} needs a value")
                i += 1
                value = argv[i]
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unknown_key(key: str, known) -> UserError:
    section = key.rpartition(".")[0]
    siblings = sorted(k for k in known if k.rpartition(".")[0] == section) or sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}'.{hint} "
                     f"Keys{' under ' + section if section else ''}: {', '.join(siblings)}")


def check_keys(cfg) -> None:
    """No key may exist that defaults() does not know, and none may be missing."""
    known, given = _flat(defaults()), _flat(cfg)
    for key in given:
        if key not in known:
            raise _unknown_key(key, known)
    for key in known:
        if key not in given:
            raise UserError(f"config is missing key '{key}'; start config files from "
                            "stackwise_jax.config.defaults()")


def _parse_value(key: str, raw: str, like):
    try:
        if isinstance(like, bool):
            low = raw.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(like, int):
            return int(raw)
        if isinstance(like, float):
            return float(raw)
        if isinstance(like, tuple):
            value = ast.literal_eval(raw)
            return tuple(value) if isinstance(value, (list, tuple)) else (value,)
        return raw
    except (ValueError, SyntaxError):
        raise UserError(f"--config.{key}={raw!r}: expected a {type(like).__name__}") from None


def set_override(cfg, key: str, raw: str) -> None:
    known = _flat(defaults())
    if key not in known:
        raise _unknown_key(key, known)
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    with node.unlocked():
        node[leaf] = _parse_value(key, raw, known[key])


# -------------------------------------------------------------------------- validation


def _enum(cfg_value, key, allowed):
    if cfg_value not in allowed:
        raise UserError(f"{key}={cfg_value!r} is not allowed; choose one of {', '.join(allowed)}")


def _positive_int(value, key):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{key}={value!r} must be a positive integer")


MESH_KEYS = ("mesh.data", "mesh.fsdp", "mesh.tensor")  # -1: the devices the others leave
SEED_LIMIT = 2**31  # grain takes seeds in [0, 2**32); data.seed + phase index stays below


def _number_ok(value, like) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) if isinstance(like, int) else math.isfinite(value)


def check_types(cfg) -> None:
    """Every key holds a value of its default's kind: a bool, an integer >= 0, a finite
    number, a string, or a tuple of those; seeds fit the generators. The per-key rules in
    validate() then check ranges; this pass means none of them meets a value it cannot
    compare, and no NaN, infinity or negative count reaches JAX."""
    given = _flat(cfg)
    for key, like in _flat(defaults()).items():
        value = given[key]
        if isinstance(like, bool):
            if not isinstance(value, bool):
                raise UserError(f"{key}={value!r} must be True or False")
        elif isinstance(like, (int, float)):
            kind = "an integer" if isinstance(like, int) else "a finite number"
            if not _number_ok(value, like):
                raise UserError(f"{key}={value!r} must be {kind}")
            if key in MESH_KEYS and value < 1 and value != -1:
                raise UserError(f"{key}={value!r} must be a positive integer, or -1 for the "
                                "devices the other mesh axes leave")
            if isinstance(like, int) and value < 0 and key not in MESH_KEYS:
                raise UserError(f"{key}={value!r} must be an integer >= 0")
            if key.endswith(".seed") and value >= SEED_LIMIT:
                raise UserError(f"{key}={value!r} must be below 2**31")
        elif isinstance(like, str):
            if not isinstance(value, str):
                raise UserError(f"{key}={value!r} must be a string")
        elif isinstance(like, tuple):
            if not isinstance(value, (tuple, list)) or not all(
                    isinstance(v, str) if isinstance(like[0], str) else _number_ok(v, like[0])
                    for v in value):
                kind = "strings" if isinstance(like[0], str) else "finite numbers"
                raise UserError(f"{key}={value!r} must be a tuple of {kind}")


def validate(cfg) -> None:
    check_keys(cfg)
    check_types(cfg)
    m, a, d, t = cfg.model, cfg.model.architecture, cfg.data, cfg.training
    for key in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff"):
        _positive_int(m[key], f"model.{key}")
    _positive_int(a.n_stacks, "model.architecture.n_stacks")
    _positive_int(a.blocks_per_stack, "model.architecture.blocks_per_stack")
    if m.d_model % m.n_heads:
        raise UserError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    if m.n_heads % m.n_kv_heads:
        raise UserError(f"model.n_heads={m.n_heads} must be divisible by "
                        f"model.n_kv_heads={m.n_kv_heads} (grouped-query attention)")
    if (m.d_model // m.n_heads) % 2:
        raise UserError(f"head dim model.d_model/model.n_heads={m.d_model // m.n_heads} "
                        "must be even for RoPE")
    for key in ("rope_theta", "norm_eps", "init_std"):
        if not m[key] > 0:
            raise UserError(f"model.{key}={m[key]} must be > 0")

    _positive_int(d.seq_len, "data.seq_len")
    _positive_int(d.batch_size, "data.batch_size")
    if not 0.0 < d.heldout_fraction < 1.0:
        raise UserError(f"data.heldout_fraction={d.heldout_fraction} must be in (0, 1)")
    if d.tokenizer not in ("bpe", "llama3") and not os.path.isfile(d.tokenizer):
        raise UserError(f"data.tokenizer='{d.tokenizer}': no such file; use 'bpe' to train "
                        "one, 'llama3' for Llama-3's tokenizer, or a path to a tokenizer.json "
                        "or SentencePiece .model")
    if d.tokenizer == "llama3" and m.vocab_size < 128256:  # data.LLAMA3_VOCAB_SIZE
        raise UserError(f"data.tokenizer='llama3' has 128256 ids; model.vocab_size="
                        f"{m.vocab_size} must be at least that")
    _positive_int(d.bpe_sample_bytes, "data.bpe_sample_bytes")
    _enum(d.decode_errors, "data.decode_errors", DECODE_ERRORS)

    _validate_attention(m)
    _enum(m.remat, "model.remat", REMAT_POLICIES)
    c = m.attention_chunk_size
    if not isinstance(c, int) or isinstance(c, bool) or c < 0:  # any length: the last chunk pads
        raise UserError(f"model.attention_chunk_size={c!r} must be an integer >= 0 (0: off)")
    if t.loss_chunk_size < 0 or (t.loss_chunk_size and d.seq_len % t.loss_chunk_size):
        raise UserError(f"training.loss_chunk_size={t.loss_chunk_size} must be 0 (off) or divide "
                        f"data.seq_len={d.seq_len}")
    _enum(t.objective, "training.objective", OBJECTIVES)
    _enum(t.optimizer_state_dtype, "training.optimizer_state_dtype", OPTIMIZER_STATE_DTYPES)
    _enum(t.mask_schedule_type, "training.mask_schedule_type", MASK_SCHEDULES)
    _enum(t.mask_schedule_direction, "training.mask_schedule_direction", MASK_DIRECTIONS)
    _enum(t.loss_weighting, "training.loss_weighting", LOSS_WEIGHTINGS)
    for key in ("train_embedding", "train_final_norm", "train_head"):
        _enum(t[key], f"training.{key}", STAGE_POLICIES)
    p = t.progressive
    _enum(p.trunk_strategy, "training.progressive.trunk_strategy", TRUNK_STRATEGIES)
    _enum(p.new_stack_precision, "training.progressive.new_stack_precision", PRECISIONS)
    _enum(p.frozen_precision, "training.progressive.frozen_precision", FROZEN_PRECISIONS)
    _enum(p.cache_dtype, "training.progressive.cache_dtype", CACHE_DTYPES)
    _positive_int(p.cache_views, "training.progressive.cache_views")
    lo, hi = t.min_mask_fraction, t.max_mask_fraction
    for key, v in (("min_mask_fraction", lo), ("max_mask_fraction", hi)):
        if not 0.0 < v <= 1.0:
            raise UserError(f"training.{key}={v} must be in (0, 1]")
    if lo > hi:
        raise UserError(f"training.min_mask_fraction={lo} must be <= "
                        f"training.max_mask_fraction={hi}")
    if t.mask_schedule_type != "uniform" and not p.enabled:
        raise UserError(f"training.mask_schedule_type='{t.mask_schedule_type}' sets the mask "
                        "ratio by the stack being trained, so it needs "
                        "training.progressive.enabled=True; use 'uniform' for end-to-end runs")
    if m.tie_embeddings and t.train_head != t.train_embedding:
        raise UserError("model.tie_embeddings=True shares one matrix between embedding and "
                        f"head, so training.train_head ('{t.train_head}') must equal "
                        f"training.train_embedding ('{t.train_embedding}')")
    _enum(p.stack_storage_dtype, "training.progressive.stack_storage_dtype", STACK_STORAGE_DTYPES)
    if p.stack_storage_dtype != "fp32" and p.enabled and p.trunk_strategy == "trainable":
        raise UserError(f"training.progressive.stack_storage_dtype='{p.stack_storage_dtype}' "
                        "needs a frozen trunk: a growing trunk trains its stored stacks again "
                        "and would lose their float32 master weights between stages")
    if p.cache_activations:
        _validate_cache(cfg)
    _enum(p.new_stack_init, "training.progressive.new_stack_init", NEW_STACK_INITS)
    _enum(p.step_split, "training.progressive.step_split", STEP_SPLITS)
    _positive_int(t.steps_per_stage, "training.steps_per_stage")
    _positive_int(t.log_every, "training.log_every")
    _positive_int(t.grad_accum_steps, "training.grad_accum_steps")
    _positive_int(t.max_nonfinite_steps, "training.max_nonfinite_steps")
    if not t.learning_rate > 0:
        raise UserError(f"training.learning_rate={t.learning_rate} must be > 0")
    for key in ("weight_decay", "grad_clip_norm"):  # warmup_steps: check_types' >= 0
        if t[key] < 0:
            raise UserError(f"training.{key}={t[key]} must be >= 0"
                            + (" (0 turns clipping off)" if key == "grad_clip_norm" else ""))
    f = t.fusion
    if not isinstance(f.steps, int) or isinstance(f.steps, bool) or f.steps < 0:
        raise UserError(f"training.fusion.steps={f.steps!r} must be an integer >= 0 (0: no fusion)")
    _enum(f.objective, "training.fusion.objective", OBJECTIVES)
    _enum(f.mode, "training.fusion.mode", FUSION_MODES)
    _positive_int(f.block_cycles, "training.fusion.block_cycles")
    if f.mode == "block" and f.steps:
        turns = f.block_cycles * a.n_stacks
        if f.steps % turns:
            raise UserError(f"training.fusion.steps={f.steps} must be a multiple of "
                            f"training.fusion.block_cycles x model.architecture.n_stacks = "
                            f"{turns}: block fusion gives every turn the same steps")
        if p.stack_storage_dtype != "fp32":
            raise UserError("training.fusion.mode='block' trains stored stacks again, so it "
                            "needs training.progressive.stack_storage_dtype='fp32' (their "
                            "float32 master weights)")
    _enum(f.base_precision, "training.fusion.base_precision", FROZEN_PRECISIONS)
    _enum(f.remat, "training.fusion.remat", REMAT_POLICIES)
    _positive_int(f.lora_rank, "training.fusion.lora_rank")
    for key in ("learning_rate", "lora_alpha"):
        if not f[key] > 0:
            raise UserError(f"training.fusion.{key}={f[key]} must be > 0")
    from stackwise_jax.lora import PROJECTIONS
    bad = [x for x in f.lora_targets if x not in PROJECTIONS]
    if not f.lora_targets or bad:
        raise UserError(f"training.fusion.lora_targets={tuple(f.lora_targets)!r}: choose one or "
                        f"more of {', '.join(PROJECTIONS)}")
    from stackwise_jax.attention import projections
    has = projections(m) + ("gate_proj", "up_proj", "down_proj")
    if f.steps and not any(x in has for x in f.lora_targets):  # absent targets are skipped
        raise UserError(f"training.fusion.lora_targets={tuple(f.lora_targets)!r} names no "
                        f"projection of model.attention='{m.attention}'; it has {', '.join(has)}")
    _positive_int(cfg.checkpoint.every_steps, "checkpoint.every_steps")
    _positive_int(cfg.checkpoint.max_to_keep, "checkpoint.max_to_keep")
    b = cfg.eval.batches
    if not isinstance(b, int) or isinstance(b, bool) or b < 0:
        raise UserError(f"eval.batches={b!r} must be an integer >= 0 (0: every held-out row)")
    if not cfg.eval.mask_ratios or not all(0.0 < r <= 1.0 for r in cfg.eval.mask_ratios):
        raise UserError(f"eval.mask_ratios={cfg.eval.mask_ratios} must be ratios in (0, 1]")
    _validate_mesh(cfg)


def _validate_mesh(cfg) -> None:
    """What the mesh keys say without a device count: sizes, and the dimensions the fixed
    axes split. The device count is checked when the run starts (sharding.mesh_shape)."""
    from stackwise_jax import sharding

    sizes = {a: cfg.mesh[a] for a in sharding.AXES}
    sharding.check_sizes(sizes)
    sharding.check_divisible(cfg, sizes)


def _validate_attention(m) -> None:
    """model.attention and its own keys (model.mla.*, model.linear.*)."""
    from stackwise_jax.attention import ATTENTIONS, FEATURE_MAPS

    _enum(m.attention, "model.attention", ATTENTIONS)
    c = m.mla
    q = c.q_lora_rank
    if not isinstance(q, int) or isinstance(q, bool) or q < 0:
        raise UserError(f"model.mla.q_lora_rank={q!r} must be an integer >= 0 (0: a full query "
                        "projection)")
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        _positive_int(c[key], f"model.mla.{key}")
    if c.qk_rope_head_dim % 2:
        raise UserError(f"model.mla.qk_rope_head_dim={c.qk_rope_head_dim} must be even: RoPE "
                        "rotates pairs of dimensions")
    _enum(m.linear.feature_map, "model.linear.feature_map", FEATURE_MAPS)
    _positive_int(m.linear.chunk_size, "model.linear.chunk_size")


def _validate_cache(cfg) -> None:
    """Requirements of training.progressive.cache_activations=True."""
    t, p = cfg.training, cfg.training.progressive
    need = "training.progressive.cache_activations=True needs"
    if not p.enabled or p.trunk_strategy != "frozen":
        raise UserError(f"{need} progressive training with a frozen trunk "
                        "(training.progressive.enabled=True, trunk_strategy='frozen')")
    if t.train_embedding == "every_stage":
        raise UserError(f"{need} an embedding that stops training after stage 0 "
                        "(training.train_embedding='first_stage' or 'never'): cached activations "
                        "were computed with it")
    if t.objective != "masked_diffusion":
        raise UserError(f"{need} training.objective='masked_diffusion'")


def n_stages(cfg) -> int:
    return cfg.model.architecture.n_stacks if cfg.training.progressive.enabled else 1


def steps_in_stage(cfg, k: int = 0) -> int:
    """Steps of stage k. End-to-end gets the whole token budget of a progressive run in
    its one stage; a progressive run shares it by training.progressive.step_split (the
    rounding remainder goes to the last stage, so the total is exact)."""
    t, n = cfg.training, cfg.model.architecture.n_stacks
    total = t.steps_per_stage * n
    if not t.progressive.enabled:
        return total
    split = t.progressive.step_split
    if split == "equal":
        return t.steps_per_stage
    shares = [i + 1 if split == "increasing" else n - i for i in range(n)]
    steps = [total * s // sum(shares) for s in shares]
    steps[-1] += total - sum(steps)
    return steps[k]


def mode_name(cfg) -> str:
    """The training mode this config selects, for logs and summary.json.

    end_to_end: one stage, every stack trains. progressive-*: stage k trains stack k on
    a frozen trunk. growing-*: stage k trains stacks 0..k (trunk_strategy='trainable').
    The suffix says the stage unit: one block (layerwise) or several (stackwise).
    """
    p = cfg.training.progressive
    if not p.enabled:
        return "end_to_end"
    unit = "layerwise" if cfg.model.architecture.blocks_per_stack == 1 else "stackwise"
    return f"{'progressive' if p.trunk_strategy == 'frozen' else 'growing'}-{unit}"


def to_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)
