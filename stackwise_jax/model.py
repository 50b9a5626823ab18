"""The transformer: Block, Stack (scanned Blocks) and Rack (the whole model).

Shape suffixes: B batch, L sequence, D d_model, H query heads, K key/value heads,
G = H/K query heads per KV head, E head dim, F d_ff, V vocabulary.

The maths follows HF Llama exactly (rotate-half RoPE, RMSNorm in float32, SwiGLU), so
exporting is transposing kernels, nothing more. Attention is a call argument: the same
weights run bidirectionally (training) or causally (inference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackwise_jax import lora, nf4_matmul, quant, sharding

ATTENTION_MODES = ("bidirectional", "causal")


def _check_mode(mode: str) -> bool:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r}: choose one of {', '.join(ATTENTION_MODES)}")
    return mode == "causal"


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x_BxLxD):
        x32 = x_BxLxD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x_BxLxD.dtype) * x32.astype(x_BxLxD.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float):
    """cos, sin of shape (L, E) in HF Llama's layout: the two halves repeat the freqs.

    Computed on the host and handed to XLA as constants: computed inside a jitted program,
    the tables are compiled with the program around them, and XLA:CPU compiled them
    differently for the cached and the recomputing MLA training steps (their gradients
    then differed in the last bits; tests/test_cache.py). As constants, every program
    reads the same bits. The angle is rounded to float32 as HF's float32 rotary embedding
    rounds it; cos and sin of that angle are evaluated in float64 and rounded once."""
    inv_freq_E2 = (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    freqs_LxE2 = np.arange(seq_len, dtype=np.float32)[:, None] * inv_freq_E2[None, :]
    emb_LxE = np.concatenate([freqs_LxE2, freqs_LxE2], axis=-1).astype(np.float64)
    return jnp.asarray(np.cos(emb_LxE), jnp.float32), jnp.asarray(np.sin(emb_LxE), jnp.float32)


def apply_rope(x_BxLxNxE, cos_LxE, sin_LxE):
    half = x_BxLxNxE.shape[-1] // 2
    x1, x2 = x_BxLxNxE[..., :half], x_BxLxNxE[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_LxE[None, :, None, :], sin_LxE[None, :, None, :]
    return (x_BxLxNxE * cos + rotated * sin).astype(x_BxLxNxE.dtype)


class Linear(nnx.Linear):
    """nnx.Linear whose kernel may also be an nf4 quant.QTensor: the frozen trunk's fused
    forward (_dense_block keeps such kernels packed), multiplied without a dense weight;
    or, inside a step on an fsdp mesh, a sharding.Gathered shard, gathered to multiply."""

    def __call__(self, inputs, out_sharding=None):
        kernel = self.kernel.get_value()
        if isinstance(kernel, sharding.Gathered):
            return sharding.gathered_call(_matmul, inputs, kernel)
        if isinstance(kernel, quant.QTensor):
            return nf4_matmul.nf4_matmul(inputs, kernel)
        return super().__call__(inputs, out_sharding)


def _matmul(x, kernel):
    """What Linear computes (no bias; nnx.Linear's default precision and dtypes)."""
    if isinstance(kernel, quant.QTensor):
        return nf4_matmul.nf4_matmul(x, kernel)
    dtype = jnp.result_type(x, kernel)
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                               (((x.ndim - 1,), (0,)), ((), ())))


def _linear(d_in, d_out, std, rngs):
    return Linear(d_in, d_out, use_bias=False,
                  kernel_init=nnx.initializers.normal(std), rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, m, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads = m.n_heads, m.n_kv_heads
        self.head_dim = m.d_model // m.n_heads
        self.chunk_size = m.attention_chunk_size  # queries per score block; 0: all at once
        self.q_proj = _linear(m.d_model, m.n_heads * self.head_dim, m.init_std, rngs)
        self.k_proj = _linear(m.d_model, m.n_kv_heads * self.head_dim, m.init_std, rngs)
        self.v_proj = _linear(m.d_model, m.n_kv_heads * self.head_dim, m.init_std, rngs)
        self.o_proj = _linear(m.n_heads * self.head_dim, m.d_model, m.init_std, rngs)

    def __call__(self, x_BxLxD, cos_LxE, sin_LxE, causal: bool):
        B, L, _ = x_BxLxD.shape
        H, K, E = self.n_heads, self.n_kv_heads, self.head_dim
        q_BxLxHxE = apply_rope(self.q_proj(x_BxLxD).reshape(B, L, H, E), cos_LxE, sin_LxE)
        k_BxLxKxE = apply_rope(self.k_proj(x_BxLxD).reshape(B, L, K, E), cos_LxE, sin_LxE)
        v_BxLxKxE = self.v_proj(x_BxLxD).reshape(B, L, K, E)
        # Query head h reads KV head h // G, as HF's repeat_kv does.
        q_BxLxKxGxE = q_BxLxHxE.reshape(B, L, K, H // K, E)
        out_BxLxKxGxE = attend(q_BxLxKxGxE, k_BxLxKxE, v_BxLxKxE, self.chunk_size, causal)
        return self.o_proj(out_BxLxKxGxE.reshape(B, L, H * E))


def attend(q_BxLxKxGxE, k_BxSxKxE, v_BxSxKxE, chunk_size: int, causal: bool, q_offset=0):
    """Softmax attention of L queries (at positions q_offset..q_offset+L-1) over S keys
    (at 0..S-1), chunk_size queries at a time when 0 < chunk_size < L. Any L: the queries
    are padded to a multiple of the chunk and the padded rows' outputs dropped (keys are
    never padded, so no real query sees padding). A KV cache passes S > L and a traced
    q_offset; the causal mask then also hides the cache slots not written yet."""
    L = q_BxLxKxGxE.shape[1]
    C = chunk_size if 0 < chunk_size < L else L
    if C == L:
        return _attend(q_BxLxKxGxE, k_BxSxKxE, v_BxSxKxE, q_offset, causal)
    pad = -L % C
    q_padded = jnp.pad(q_BxLxKxGxE, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    out = _attend_chunked(q_padded, k_BxSxKxE, v_BxSxKxE, C, causal, q_offset)
    return out[:, :L]


def _attend(q_BxCxKxGxE, k_BxLxKxE, v_BxLxKxE, q_offset, causal: bool):
    """Softmax attention of C queries (starting at position q_offset) over all L keys."""
    C, L, E = q_BxCxKxGxE.shape[1], k_BxLxKxE.shape[1], q_BxCxKxGxE.shape[-1]
    scores_BxKxGxCxL = jnp.einsum("bckge,blke->bkgcl", q_BxCxKxGxE, k_BxLxKxE)
    scores_BxKxGxCxL = scores_BxKxGxCxL.astype(jnp.float32) / jnp.sqrt(jnp.float32(E))
    if causal:
        allowed_CxL = (q_offset + jnp.arange(C))[:, None] >= jnp.arange(L)[None, :]
        scores_BxKxGxCxL = jnp.where(allowed_CxL, scores_BxKxGxCxL, jnp.finfo(jnp.float32).min)
    probs_BxKxGxCxL = jax.nn.softmax(scores_BxKxGxCxL, axis=-1).astype(v_BxLxKxE.dtype)
    return jnp.einsum("bkgcl,blke->bckge", probs_BxKxGxCxL, v_BxLxKxE)


def _attend_chunked(q_BxLxKxGxE, k_BxSxKxE, v_BxSxKxE, C: int, causal: bool, q_offset=0):
    """The same attention C queries at a time (L a multiple of C): each query row's softmax
    is over all keys, so chunking the queries is exact. Each chunk is rematerialised in the
    backward pass, so at most one (C, S) score block per head exists, never the whole (L, S)."""
    B, L, K, G, E = q_BxLxKxGxE.shape
    q_NxBxCxKxGxE = jnp.moveaxis(q_BxLxKxGxE.reshape(B, L // C, C, K, G, E), 1, 0)

    @jax.checkpoint
    def one_chunk(q_BxCxKxGxE, chunk_offset):
        return _attend(q_BxCxKxGxE, k_BxSxKxE, v_BxSxKxE, chunk_offset, causal)

    out_NxBxCxKxGxE = jax.lax.map(lambda args: one_chunk(*args),
                                  (q_NxBxCxKxGxE, q_offset + jnp.arange(L // C) * C))
    return jnp.moveaxis(out_NxBxCxKxGxE, 0, 1).reshape(B, L, K, G, -1)  # v may be narrower (MLA)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, m, rngs: nnx.Rngs):
        self.gate_proj = _linear(m.d_model, m.d_ff, m.init_std, rngs)
        self.up_proj = _linear(m.d_model, m.d_ff, m.init_std, rngs)
        self.down_proj = _linear(m.d_ff, m.d_model, m.init_std, rngs)

    def __call__(self, x_BxLxD):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxLxD)) * self.up_proj(x_BxLxD))


def make_attention(m, rngs: nnx.Rngs):
    """The attention `model.attention` names: GQA here, MLA or linear from attention.py."""
    if m.attention == "gqa":
        return Attention(m, rngs)
    from stackwise_jax import attention  # deferred: it builds on this module's layers

    return attention.MODULES[m.attention](m, rngs)


def rope_tables(m, seq_len: int):
    """cos, sin at the width the configured attention rotates (MLA: qk_rope_head_dim)."""
    head_dim = m.mla.qk_rope_head_dim if m.attention == "mla" else m.d_model // m.n_heads
    return rope_cos_sin(seq_len, head_dim, m.rope_theta)


class Block(nnx.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, m, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(m.d_model, m.norm_eps)
        self.attn = make_attention(m, rngs)
        self.post_attention_norm = RMSNorm(m.d_model, m.norm_eps)
        self.mlp = MLP(m, rngs)

    def __call__(self, x_BxLxD, cos_LxE, sin_LxE, causal: bool):
        x_BxLxD = x_BxLxD + self.attn(self.input_norm(x_BxLxD), cos_LxE, sin_LxE, causal)
        return x_BxLxD + self.mlp(self.post_attention_norm(x_BxLxD))


# What a block keeps for the backward pass. none: everything (fastest, most memory); full:
# only the block's input (recompute the whole block); save_dots: the outputs of weight
# matmuls (projections), recomputing attention scores and elementwise work.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _dense_block(block_state, dtype, keep_nf4: bool = False):
    """One block's parameters in the compute dtype. Stored frozen weights (fp32, bf16 or a
    quant.QTensor) are converted here, inside the scan iteration, so one dense block is
    live at a time: converted outside the loop, XLA would keep every frozen layer dense.
    keep_nf4: nf4 kernels that the fused kernel takes stay packed (Linear multiplies them
    with nf4_matmul), so not even one layer's weights are dense."""
    def dense(v):
        if keep_nf4 and nf4_matmul.fused_supported(v):
            return v
        if isinstance(v, quant.QTensor):
            return quant.dequantize(v, dtype)
        return v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v

    return jax.tree.map(dense, block_state, is_leaf=lambda v: isinstance(v, quant.QTensor))


class Stack(nnx.Module):
    """blocks_per_stack Blocks, parameters stacked on a leading axis, applied with scan."""

    def __init__(self, m, rngs: nnx.Rngs):
        self.remat = m.remat
        @nnx.split_rngs(splits=m.architecture.blocks_per_stack)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(m, rngs)

        self.blocks = make_blocks(rngs)

    def __call__(self, x_BxLxD, cos_LxE, sin_LxE, causal: bool):
        graphdef, blocks_state = nnx.split(self.blocks)
        return scan_blocks(graphdef, blocks_state, x_BxLxD, cos_LxE, sin_LxE, causal, self.remat)


def scan_blocks(graphdef, blocks_state, x_BxLxD, cos_LxE, sin_LxE, causal: bool,
                remat: str = "none", adapters=None, lora_alpha: float = 0.0):
    """Blocks whose parameters are stacked on a leading axis, applied in order with scan.

    adapters: LoRA adapters (lora.py) stacked on the same axis, or None. Each block's
    kernels become W + (alpha / r) A @ B inside its iteration, formed in float32 and then
    cast to the compute dtype, so one dense block exists at a time. Without adapters, nf4
    kernels run through the fused kernel when nf4_matmul selects it (on a GPU).
    """
    fused = nf4_matmul.fused_selected()

    def one_block(x, xs):
        block_state, block_adapters = xs
        if block_adapters is None:
            dense = _dense_block(block_state, x.dtype, keep_nf4=fused)
        else:
            rank = jax.tree.leaves(block_adapters)[0].shape[-1]
            dense = lora.apply_adapters(_dense_block(block_state, jnp.float32), block_adapters,
                                        lora_alpha, rank)
            dense = jax.tree.map(lambda v: v.astype(x.dtype), dense)
        # On an fsdp mesh: this layer's weights gathered, rows stay split (sharding.py).
        block = nnx.merge(graphdef, sharding.gathered_weights(dense))
        return sharding.rows(block(sharding.rows(x), cos_LxE, sin_LxE, causal)), None

    if remat != "none":
        one_block = jax.checkpoint(one_block, policy=REMAT_POLICIES[remat])
    x_BxLxD, _ = jax.lax.scan(one_block, sharding.rows(x_BxLxD), (blocks_state, adapters))
    return x_BxLxD


class Rack(nnx.Module):
    """Token embedding, n_stacks Stacks, final RMSNorm and LM head (tied or untied)."""

    def __init__(self, m, rngs: nnx.Rngs):
        self.config = m
        self.embed = nnx.Embed(m.vocab_size, m.d_model,
                               embedding_init=nnx.initializers.normal(m.init_std), rngs=rngs)
        self.stacks = nnx.List([Stack(m, rngs) for _ in range(m.architecture.n_stacks)])
        self.final_norm = RMSNorm(m.d_model, m.norm_eps)
        self.head = None if m.tie_embeddings else _linear(m.d_model, m.vocab_size, m.init_std, rngs)

    @property
    def n_stacks(self) -> int:
        return len(self.stacks)

    def run_stacks(self, x_BxLxD, start: int, stop: int, mode: str):
        """Applies stacks[start:stop] to hidden states."""
        causal = _check_mode(mode)
        m = self.config
        cos_LxE, sin_LxE = rope_tables(m, x_BxLxD.shape[1])
        for stack in self.stacks[start:stop]:
            x_BxLxD = stack(x_BxLxD, cos_LxE, sin_LxE, causal)
        return x_BxLxD

    def run_trunk(self, trunk_blocks, x_BxLxD, mode: str, adapters=None, lora_alpha=0.0,
                  remat: str = "none"):
        """Applies layers given as one tree of blocks stacked on a leading axis (frozen
        stacks concatenated, see resident.assemble_trunk): one scan over every layer. With
        LoRA adapters (fusion), gradients reach them through every layer; `remat` says
        what each layer keeps for that backward pass."""
        causal = _check_mode(mode)
        m = self.config
        cos_LxE, sin_LxE = rope_tables(m, x_BxLxD.shape[1])
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(m, nnx.Rngs(0))))
        return scan_blocks(graphdef, trunk_blocks, x_BxLxD, cos_LxE, sin_LxE, causal, remat,
                           adapters, lora_alpha)

    def logits(self, x_BxLxD):
        """Final norm and head."""
        h_BxLxD = self.final_norm(x_BxLxD)
        if self.head is None:
            return self.embed.attend(h_BxLxD)
        return self.head(h_BxLxD)

    def __call__(self, ids_BxL, mode: str = "bidirectional", n_stacks: int | None = None):
        """Logits (B, L, V) of the first n_stacks stacks (all by default)."""
        x_BxLxD = self.embed(ids_BxL)
        x_BxLxD = self.run_stacks(x_BxLxD, 0, self.n_stacks if n_stacks is None else n_stacks, mode)
        return self.logits(x_BxLxD)


def param_counts(m) -> dict[str, int]:
    """Parameters per component, computed from abstract shapes (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Rack(m, nnx.Rngs(0)))
    counts: dict[str, int] = {}
    for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = f"stack_{path[1]}" if path[0] == "stacks" else path[0]
        counts[name] = counts.get(name, 0) + int(jnp.size(leaf) if not hasattr(leaf, "shape")
                                                 else _prod(leaf.shape))
    counts["total"] = sum(counts.values())
    return counts


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
