"""Causal generation with a KV cache: `stackwise_jax.generate(rack, prompt_ids, n)`.

One jitted program per (batch, prompt + new tokens) does everything: a causal prefill of
the whole id buffer (positions past the prompt hold placeholders that the causal mask hides
from every prompt position, and that are overwritten before anything reads them), then one
token per step, each step writing its keys and values into a preallocated cache at its
position. The prompt length is a traced value, so prompts of different lengths with the
same total share the compiled program.

Cache per layer (GQA): k and v, each (B, max_len, n_kv_heads, head_dim), held per stack
with the stack's blocks on a leading axis, in the activations' dtype. The attention maths
is model.attend: the cache is the key/value sequence, the step's position the query
offset, so the causal mask also hides the slots not written yet.
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

from stackwise_jax import model
from stackwise_jax.errors import UserError

TRACES = {"generate": 0}  # how many times the program was traced (tests: once per shape)


def cache_bytes_per_token(m, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes one token adds to the KV cache of the model `m` (a model config), per kind of
    cache that the model's attention keeps. GQA: k and v of every KV head in every layer."""
    n_layers = m.architecture.n_stacks * m.architecture.blocks_per_stack
    head_dim = m.d_model // m.n_heads
    return {"gqa": 2 * n_layers * m.n_kv_heads * head_dim * dtype_bytes}


def _gqa_step(block, x_BxTxD, cos_TxE, sin_TxE, k_BxSxKxE, v_BxSxKxE, pos):
    """One block on T new tokens at positions pos..pos+T-1: the projections of
    model.Attention, their keys and values written into the cache, attention over it."""
    attn = block.attn
    B, T, _ = x_BxTxD.shape
    H, K, E = attn.n_heads, attn.n_kv_heads, attn.head_dim
    h_BxTxD = block.input_norm(x_BxTxD)
    q_BxTxHxE = model.apply_rope(attn.q_proj(h_BxTxD).reshape(B, T, H, E), cos_TxE, sin_TxE)
    k_BxTxKxE = model.apply_rope(attn.k_proj(h_BxTxD).reshape(B, T, K, E), cos_TxE, sin_TxE)
    v_BxTxKxE = attn.v_proj(h_BxTxD).reshape(B, T, K, E)
    k_BxSxKxE = jax.lax.dynamic_update_slice(k_BxSxKxE, k_BxTxKxE.astype(k_BxSxKxE.dtype),
                                             (0, pos, 0, 0))
    v_BxSxKxE = jax.lax.dynamic_update_slice(v_BxSxKxE, v_BxTxKxE.astype(v_BxSxKxE.dtype),
                                             (0, pos, 0, 0))
    out_BxTxKxGxE = model.attend(q_BxTxHxE.reshape(B, T, K, H // K, E), k_BxSxKxE, v_BxSxKxE,
                                 attn.chunk_size, True, pos)
    x_BxTxD = x_BxTxD + attn.o_proj(out_BxTxKxGxE.reshape(B, T, H * E))
    return x_BxTxD + block.mlp(block.post_attention_norm(x_BxTxD)), k_BxSxKxE, v_BxSxKxE


def empty_cache(rack, batch: int, max_len: int, dtype=jnp.float32) -> list[dict]:
    """Per stack: {"k", "v"} of shape (blocks_per_stack, B, max_len, n_kv_heads, head_dim)."""
    m = rack.config
    if not isinstance(rack.stacks[0].blocks.attn, model.Attention):
        raise UserError(f"generation with a KV cache supports grouped-query attention only; "
                        f"this model's attention is {type(rack.stacks[0].blocks.attn).__name__}")
    shape = (m.architecture.blocks_per_stack, batch, max_len, m.n_kv_heads, m.d_model // m.n_heads)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in rack.stacks]


def forward_cached(rack, x_BxTxD, cos_TxE, sin_TxE, cache: list[dict], pos):
    """Hidden states of T new tokens at positions pos.. through every stack, and the
    cache with their keys and values written in."""
    new_cache = []
    for stack, layer_cache in zip(rack.stacks, cache):
        graphdef, blocks_state = nnx.split(stack.blocks)

        def one_block(x, xs):
            block_state, k, v = xs
            block = nnx.merge(graphdef, model._dense_block(block_state, x.dtype))
            x, k, v = _gqa_step(block, x, cos_TxE, sin_TxE, k, v, pos)
            return x, (k, v)

        x_BxTxD, (k, v) = jax.lax.scan(one_block, x_BxTxD,
                                       (blocks_state, layer_cache["k"], layer_cache["v"]))
        new_cache.append({"k": k, "v": v})
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
    cos_SxE, sin_SxE = model.rope_cos_sin(S, m.d_model // m.n_heads, m.rope_theta)
    x_BxSxD = rack.embed(ids_BxS)
    cache = empty_cache(rack, B, S, x_BxSxD.dtype)
    h_BxSxD, cache = forward_cached(rack, x_BxSxD, cos_SxE, sin_SxE, cache, 0)
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


def generate(rack, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    """The prompt followed by max_new_tokens tokens, generated causally with a KV cache.

    prompt_ids: (P,) or (B, P) ints, every row the same length. Returns (B, P + n) (or
    (P + n,) for a 1-D prompt) int32. temperature 0: greedy; otherwise sampling with
    nucleus top_p, seeded by `seed` and each position (rows draw independently).
    """
    ids = np.asarray(prompt_ids)
    one_row = ids.ndim == 1
    ids_BxP = ids[None] if one_row else ids
    if ids_BxP.ndim != 2 or ids_BxP.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"prompt_ids of shape {ids.shape} and dtype {ids.dtype}: need a "
                        "non-empty (P,) or (B, P) array of token ids")
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
