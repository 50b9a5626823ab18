"""Causal generation with a KV cache: `stackwise_jax.generate(rack, prompt_ids, n)`.

One jitted program per (batch, prompt + new tokens) does everything: a causal prefill of
the whole id buffer (positions past the prompt hold placeholders that the causal mask hides
from every prompt position, and that are overwritten before anything reads them), then one
token per step, each step writing what its attention keeps into a preallocated cache at its
position. The prompt length is a traced value, so prompts of different lengths with the
same total share the compiled program.

What each attention caches per layer (held per stack, the stack's blocks on a leading axis):
  gqa     k and v, each (B, max_len, n_kv_heads, head_dim), in the activations' dtype.
  mla     the compressed latent only: the normed c_KV (B, max_len, kv_lora_rank) and the
          RoPE key shared by the heads (B, max_len, qk_rope_head_dim), rotated at its
          position, in the activations' dtype; never per-head keys and values.
  linear  no per-token cache: a recurrent state per KV head, S = sum R phi(k) v^T
          (B, n_kv_heads, head_dim, head_dim) and z = sum phi(k) (B, n_kv_heads, head_dim),
          in float32 (sums over the whole sequence): O(1) work and memory per token.
The softmax attentions run model.attend over their cache with the step's position as the
query offset, so the causal mask also hides the slots not written yet.
"""

from __future__ import annotations

import functools
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackwise_jax import attention, model
from stackwise_jax.errors import UserError

TRACES = {"generate": 0}  # how many times the program was traced (tests: once per shape)


def _n_layers(m) -> int:
    return m.architecture.n_stacks * m.architecture.blocks_per_stack


def cache_bytes_per_token(m, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes one token adds to the generation cache of the model `m` (a model config).
    gqa: k and v of every KV head in every layer (what these dimensions cost with GQA);
    mla (MLA models only): the latent and the shared RoPE key of every layer. Linear
    attention adds nothing per token: see linear_state_bytes."""
    head_dim = m.d_model // m.n_heads
    out = {"gqa": 2 * _n_layers(m) * m.n_kv_heads * head_dim * dtype_bytes}
    if m.attention == "mla":
        out["mla"] = _n_layers(m) * attention.cache_numbers_per_token(m) * dtype_bytes
    return out


def linear_state_bytes(m, batch: int = 1) -> int:
    """Bytes of linear attention's recurrent state, the same at every length: per layer
    and KV head, S (head_dim x head_dim) and z (head_dim), float32."""
    head_dim = m.d_model // m.n_heads
    return _n_layers(m) * batch * m.n_kv_heads * (head_dim * head_dim + head_dim) * 4


def _write(cache_BxSx_, new_BxTx_, pos):
    """The T new entries written into the cache at positions pos..pos+T-1."""
    start = (0, pos) + (0,) * (cache_BxSx_.ndim - 2)
    return jax.lax.dynamic_update_slice(cache_BxSx_, new_BxTx_.astype(cache_BxSx_.dtype), start)


def _gqa_step(attn, h_BxTxD, cos_TxE, sin_TxE, cache, pos, n_keep):
    """model.Attention on T new tokens at positions pos..: their keys and values written
    into the cache, attention over it."""
    B, T, _ = h_BxTxD.shape
    H, K, E = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q_BxTxHxE = model.apply_rope(attn.q_proj(h_BxTxD).reshape(B, T, H, E), cos_TxE, sin_TxE)
    k_BxTxKxE = model.apply_rope(attn.k_proj(h_BxTxD).reshape(B, T, K, E), cos_TxE, sin_TxE)
    v_BxTxKxE = attn.v_proj(h_BxTxD).reshape(B, T, K, E)
    k_BxSxKxE, v_BxSxKxE = _write(cache["k"], k_BxTxKxE, pos), _write(cache["v"], v_BxTxKxE, pos)
    out_BxTxKxGxE = model.attend(q_BxTxHxE.reshape(B, T, K, H // K, E), k_BxSxKxE, v_BxSxKxE,
                                 attn.chunk_size, True, pos)
    return attn.o_proj(out_BxTxKxGxE.reshape(B, T, H * E)), {"k": k_BxSxKxE, "v": v_BxSxKxE}


def _mla_step(attn, h_BxTxD, cos_TxR, sin_TxR, cache, pos, n_keep):
    """attention.MLAttention on T new tokens, reading only the latent cache, kv_b_proj
    absorbed (DeepSeek-V2, section 2.1.3): rather than expanding every cached latent into
    per-head keys and values at every step, each head's no-RoPE query is mapped into the
    latent space (q_nope W_kb^T) and its output out of it (W_vb). The scores become
    [q_nope W_kb^T | RoPE(q_rope)] . [c | k_rope], one key shared by all heads: multi-query
    attention with a (kv_lora_rank + qk_rope_head_dim)-wide key and the latent as value,
    which model.attend computes."""
    B, T, _ = h_BxTxD.shape
    H, C, N, R, V = attn.n_heads, attn.kv_lora_rank, attn.nope, attn.rope, attn.v_dim
    q_BxTxHxQ = attn.query(h_BxTxD).reshape(B, T, H, N + R)
    q_rope_BxTxHxR = model.apply_rope(q_BxTxHxQ[..., N:], cos_TxR, sin_TxR)
    c_BxTxC, k_rope_BxTxR = attn.latent(h_BxTxD, cos_TxR, sin_TxR)
    c_BxSxC = _write(cache["latent"], c_BxTxC, pos)
    k_rope_BxSxR = _write(cache["k_rope"], k_rope_BxTxR, pos)
    kv_b_CxHxNV = attn.kv_b_proj.kernel[...].reshape(C, H, N + V)
    q_latent_BxTxHxC = jnp.einsum("bthn,chn->bthc", q_BxTxHxQ[..., :N], kv_b_CxHxNV[..., :N])
    # model.attend divides the scores by sqrt(C + R), the absorbed query's width; MLA's
    # scale is 1/sqrt(N + R), the expanded query's
    rescale = np.float32(np.sqrt((C + R) / (N + R)))
    q_BxTx1xHxW = (jnp.concatenate([q_latent_BxTxHxC, q_rope_BxTxHxR], axis=-1)
                   * jnp.asarray(rescale, h_BxTxD.dtype))[:, :, None]
    k_BxSx1xW = jnp.concatenate([c_BxSxC, k_rope_BxSxR], axis=-1)[:, :, None]
    out_BxTx1xHxC = model.attend(q_BxTx1xHxW, k_BxSx1xW, c_BxSxC[:, :, None], attn.chunk_size,
                                 True, pos)
    out_BxTxHxV = jnp.einsum("bthc,chv->bthv", out_BxTx1xHxC[:, :, 0], kv_b_CxHxNV[..., N:])
    return (attn.o_proj(out_BxTxHxV.reshape(B, T, H * V)),
            {"latent": c_BxSxC, "k_rope": k_rope_BxSxR})


def _linear_step(attn, h_BxTxD, cos_TxE, sin_TxE, cache, pos, n_keep):
    """attention.LinearAttention on T new tokens with its recurrent state: the first
    n_keep of them (the prompt in a prefill, whose later positions are placeholders) are
    added to S and z. One token (T = 1): out = R phi(q) S / (phi(q) . z), S and z including
    the token itself (causal: j <= i). A prefill (T > 1, from position 0) runs the chunked
    causal form of training on the new tokens, then sums the state."""
    B, T, _ = h_BxTxD.shape
    H, K, E = attn.n_heads, attn.n_kv_heads, attn.head_dim
    fk_BxTxKxE = attention.feature_map(attn.k_proj(h_BxTxD).reshape(B, T, K, E), attn.feature_map)
    rk_BxTxKxE = model.apply_rope(fk_BxTxKxE, cos_TxE, sin_TxE)
    v_BxTxKxE = attn.v_proj(h_BxTxD).reshape(B, T, K, E).astype(jnp.float32)
    keep_T = (jnp.arange(T) < n_keep).astype(jnp.float32)[None, :, None, None]
    kv_BxKxExE = cache["kv_state"] + jnp.einsum("btke,btkf->bkef", rk_BxTxKxE * keep_T, v_BxTxKxE)
    k_sum_BxKxE = cache["k_sum"] + (fk_BxTxKxE * keep_T).sum(axis=1)
    new_cache = {"kv_state": kv_BxKxExE, "k_sum": k_sum_BxKxE}
    if T > 1:
        if not isinstance(pos, int) or pos != 0:
            raise ValueError("linear attention prefills from position 0 only")
        return attn(h_BxTxD, cos_TxE, sin_TxE, True), new_cache
    fq_BxTxKxGxE = attention.feature_map(attn.q_proj(h_BxTxD).reshape(B, T, K, H // K, E),
                                         attn.feature_map)
    rq_BxTxKxGxE = model.apply_rope(fq_BxTxKxGxE.reshape(B, T, H, E), cos_TxE, sin_TxE)
    rq_BxTxKxGxE = rq_BxTxKxGxE.reshape(B, T, K, H // K, E)  # query head h reads KV head h // G
    num_BxTxKxGxE = jnp.einsum("btkge,bkef->btkgf", rq_BxTxKxGxE, kv_BxKxExE)
    den_BxTxKxG = jnp.einsum("btkge,bke->btkg", fq_BxTxKxGxE, k_sum_BxKxE)
    out_BxTxKxGxE = num_BxTxKxGxE / (den_BxTxKxG[..., None] + attention.LINEAR_EPS)
    return attn.o_proj(out_BxTxKxGxE.reshape(B, T, H * E).astype(h_BxTxD.dtype)), new_cache


_STEPS = {model.Attention: _gqa_step, attention.MLAttention: _mla_step,
          attention.LinearAttention: _linear_step}


def empty_cache(rack, batch: int, max_len: int, dtype=jnp.float32) -> list[dict]:
    """Per stack, each array with the stack's blocks on a leading axis: gqa {"k", "v"}
    (B, max_len, n_kv_heads, head_dim); mla {"latent" (B, max_len, kv_lora_rank), "k_rope"
    (B, max_len, qk_rope_head_dim)}; linear {"kv_state" (B, n_kv_heads, head_dim, head_dim),
    "k_sum" (B, n_kv_heads, head_dim)}, float32 whatever `dtype`."""
    m = rack.config
    N, E = m.architecture.blocks_per_stack, m.d_model // m.n_heads
    if m.attention == "mla":
        shapes = {"latent": (N, batch, max_len, m.mla.kv_lora_rank),
                  "k_rope": (N, batch, max_len, m.mla.qk_rope_head_dim)}
    elif m.attention == "linear":
        shapes = {"kv_state": (N, batch, m.n_kv_heads, E, E), "k_sum": (N, batch, m.n_kv_heads, E)}
        dtype = jnp.float32
    else:
        shapes = {"k": (N, batch, max_len, m.n_kv_heads, E), "v": (N, batch, max_len, m.n_kv_heads, E)}
    return [{name: jnp.zeros(shape, dtype) for name, shape in shapes.items()} for _ in rack.stacks]


def forward_cached(rack, x_BxTxD, cos_TxE, sin_TxE, cache: list[dict], pos, n_keep=None):
    """Hidden states of T new tokens at positions pos.. through every stack, and the cache
    with them written in. n_keep (linear attention's state): how many of the T enter it."""
    n_keep = x_BxTxD.shape[1] if n_keep is None else n_keep
    new_cache = []
    for stack, layer_cache in zip(rack.stacks, cache):
        graphdef, blocks_state = nnx.split(stack.blocks)

        def one_block(x, xs):
            block_state, block_cache = xs
            block = nnx.merge(graphdef, model._dense_block(block_state, x.dtype))
            attend_step = _STEPS[type(block.attn)]
            out, block_cache = attend_step(block.attn, block.input_norm(x), cos_TxE, sin_TxE,
                                           block_cache, pos, n_keep)
            x = x + out
            return x + block.mlp(block.post_attention_norm(x)), block_cache

        x_BxTxD, layer_cache = jax.lax.scan(one_block, x_BxTxD, (blocks_state, layer_cache))
        new_cache.append(layer_cache)
    return x_BxTxD, new_cache


def sample_token(logits_BxV, temperature, top_p, key):
    """Argmax when temperature == 0; otherwise a draw from softmax(logits / temperature)
    restricted to the smallest set of most likely tokens whose mass reaches top_p."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    scaled_BxV = logits_BxV / jnp.where(temperature > 0, temperature, 1.0)
    order_BxV = jnp.argsort(-scaled_BxV, axis=-1)
    sorted_BxV = jnp.take_along_axis(scaled_BxV, order_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # the top token: 0, kept
    sorted_BxV = jnp.where(mass_before_BxV < top_p, sorted_BxV, -jnp.inf)
    choice_B = jax.random.categorical(key, sorted_BxV, axis=-1)
    sampled_B = jnp.take_along_axis(order_BxV, choice_B[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


def _generate(graphdef, state, ids_BxS, prompt_len, temperature, top_p, key):
    """ids_BxS with the prompt in [:, :prompt_len]; returns it with the rest generated."""
    TRACES["generate"] += 1
    rack = nnx.merge(graphdef, state)
    m = rack.config
    B, S = ids_BxS.shape
    cos_SxE, sin_SxE = model.rope_tables(m, S)  # MLA: at the width of its RoPE part
    x_BxSxD = rack.embed(ids_BxS)
    cache = empty_cache(rack, B, S, x_BxSxD.dtype)
    h_BxSxD, cache = forward_cached(rack, x_BxSxD, cos_SxE, sin_SxE, cache, 0, prompt_len)
    last_Bx1xD = jax.lax.dynamic_slice_in_dim(h_BxSxD, prompt_len - 1, 1, axis=1)
    token_B = sample_token(rack.logits(last_Bx1xD)[:, 0], temperature, top_p,
                           jax.random.fold_in(key, prompt_len))
    ids_BxS = jax.lax.dynamic_update_slice(ids_BxS, token_B[:, None], (0, prompt_len))

    def step(t, carry):  # feeds the token at t, writes the one at t + 1
        ids_BxS, cache = carry
        token_Bx1 = jax.lax.dynamic_slice_in_dim(ids_BxS, t, 1, axis=1)
        cos_1xE = jax.lax.dynamic_slice_in_dim(cos_SxE, t, 1)
        sin_1xE = jax.lax.dynamic_slice_in_dim(sin_SxE, t, 1)
        h_Bx1xD, cache = forward_cached(rack, rack.embed(token_Bx1), cos_1xE, sin_1xE, cache, t)
        token_B = sample_token(rack.logits(h_Bx1xD)[:, 0], temperature, top_p,
                               jax.random.fold_in(key, t + 1))
        return jax.lax.dynamic_update_slice(ids_BxS, token_B[:, None], (0, t + 1)), cache

    ids_BxS, _ = jax.lax.fori_loop(prompt_len, S - 1, step, (ids_BxS, cache))
    return ids_BxS


_PROGRAMS: dict = {}  # model config (JSON) -> its jitted program; jit caches each shape


def _program(graphdef, m):
    """The jitted generation program of one model structure. A GraphDef holding the config
    cannot be a static jit argument (a ConfigDict does not hash), so it is closed over,
    one program per model config, which decides the structure."""
    key = json.dumps(m.to_dict(), sort_keys=True, default=list)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = jax.jit(functools.partial(_generate, graphdef))
    return _PROGRAMS[key]


def prompt_rows(prompt_ids) -> tuple[np.ndarray, bool]:
    """(B, P) token ids of a (P,) or (B, P) prompt, and whether it was one row; a clear
    UserError for anything else (shared by both samplers)."""
    ids = np.asarray(prompt_ids)
    one_row = ids.ndim == 1
    ids_BxP = ids[None] if one_row else ids
    if ids_BxP.ndim != 2 or ids_BxP.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"prompt_ids of shape {ids.shape} and dtype {ids.dtype}: need a "
                        "non-empty (P,) or (B, P) array of token ids")
    return ids_BxP, one_row


def generate(rack, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    """The prompt followed by max_new_tokens tokens, generated causally with a KV cache.

    prompt_ids: (P,) or (B, P) ints, every row the same length. Returns (B, P + n) (or
    (P + n,) for a 1-D prompt) int32. temperature 0: greedy; otherwise sampling with
    nucleus top_p, seeded by `seed` and each position (rows draw independently).
    """
    ids_BxP, one_row = prompt_rows(prompt_ids)
    if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
        raise UserError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not temperature >= 0 or not 0 < top_p <= 1:
        raise UserError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    vocab = rack.config.vocab_size
    if ids_BxP.min() < 0 or ids_BxP.max() >= vocab:
        raise UserError(f"prompt_ids must lie in [0, {vocab}) (model.vocab_size)")
    B, P = ids_BxP.shape
    buffer_BxS = np.zeros((B, P + int(max_new_tokens)), np.int32)
    buffer_BxS[:, :P] = ids_BxP
    graphdef, state = nnx.split(rack)
    out = _program(graphdef, rack.config)(state, jnp.asarray(buffer_BxS), jnp.int32(P), jnp.float32(temperature),
                    jnp.float32(top_p), jax.random.key(seed))
    out = np.asarray(out)
    return out[0] if one_row else out


class _CallableModule(types.ModuleType):
    """`stackwise_jax.generate` names this module (importing it makes it the package's
    attribute), so the module itself is callable as generate(): both
    `stackwise_jax.generate(rack, ...)` and `from stackwise_jax.generate import generate`
    work, whatever was imported first."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
