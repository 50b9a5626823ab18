"""Attention beyond GQA: DeepSeek's multi-head latent attention and kernel (linear) attention.

model.py builds one of these for `model.attention` = 'mla' or 'linear' (GQA lives there).
Both take what GQA takes, (x, cos, sin, causal), so a Block does not care which it holds;
the RoPE tables come at the width of the rotated part (model.rope_tables).

MLA (DeepSeek-V2, arXiv:2405.04434, section 2.1; the layout of HF's DeepseekV3Attention):
  query   q = W_qb RMSNorm(W_qa x)            (q_lora_rank > 0; else q = W_q x)
  latent  c, k_rope = split(W_kva x)           c: kv_lora_rank, k_rope: qk_rope_head_dim
  keys    [W_kb RMSNorm(c) per head (qk_nope_head_dim) | RoPE(k_rope), shared by heads]
  values  W_vb RMSNorm(c) per head (v_head_dim); W_kb and W_vb are one kv_b_proj
  scores  softmax(q . k / sqrt(qk_nope_head_dim + qk_rope_head_dim))
Generation caches only (c, k_rope): kv_lora_rank + qk_rope_head_dim numbers per token and
layer, against 2 n_kv_heads head_dim for GQA (cache_numbers_per_token).

Linear attention (Katharopoulos et al. 2020) with a positive feature map phi (elu + 1) and
RoPE on the numerator only (RoFormer, Su et al. 2021, eq. 19), so positions still reach a
bidirectional model and the denominator stays positive:
  out_i = sum_j <R_i phi(q_i), R_j phi(k_j)> v_j / sum_j <phi(q_i), phi(k_j)>
over all j (bidirectional) or j <= i (causal). Bidirectional is two global sums, O(L).
Causal runs chunk by chunk: the state of all earlier chunks (sum of R phi(k) v^T and of
phi(k)) plus an explicit masked C x C block inside the chunk, O(L C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stackwise_jax.model import RMSNorm, _linear, apply_rope

ATTENTIONS = ("gqa", "mla", "linear")
FEATURE_MAPS = ("elu",)
# DeepSeek builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not the
# config's rms_norm_eps; HF's DeepseekV3Attention does the same.
MLA_NORM_EPS = 1e-6
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
LINEAR_EPS = 1e-6  # keeps the denominator away from 0 (phi > 0 already; this guards underflow)


def projections(m) -> tuple[str, ...]:
    """Names of the attention's projection kernels (LoRA targets, export mapping)."""
    if m.attention == "mla":
        q = ("q_a_proj", "q_b_proj") if m.mla.q_lora_rank else ("q_proj",)
        return q + ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    return ("q_proj", "k_proj", "v_proj", "o_proj")


def cache_numbers_per_token(m) -> int:
    """Numbers one layer keeps per generated token: GQA keys and values, MLA's latent and
    shared RoPE key. Linear attention keeps a fixed-size state instead (0 per token)."""
    if m.attention == "mla":
        return m.mla.kv_lora_rank + m.mla.qk_rope_head_dim
    if m.attention == "linear":
        return 0
    return 2 * m.n_kv_heads * (m.d_model // m.n_heads)


def score_flops_per_token(m, seq_len: int) -> float:
    """Matmul FLOPs per token of one layer's attention beyond its projections."""
    H, E = m.n_heads, m.d_model // m.n_heads
    if m.attention == "mla":
        c = m.mla
        return 2 * seq_len * H * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    if m.attention == "linear":  # state k v^T and the query's read of it: numerator, denominator
        return 4 * H * E * (E + 1)
    return 4 * seq_len * H * E


def _softmax_block(q_BxCxHxE, k_BxLxHxE, v_BxLxHxF, q_offset, causal: bool):
    """C queries (from position q_offset) over all L keys: 1/sqrt(E), scores in float32."""
    C, L, E = q_BxCxHxE.shape[1], k_BxLxHxE.shape[1], q_BxCxHxE.shape[-1]
    scores_BxHxCxL = jnp.einsum("bqhe,bkhe->bhqk", q_BxCxHxE, k_BxLxHxE).astype(jnp.float32)
    scores_BxHxCxL = scores_BxHxCxL / jnp.sqrt(jnp.float32(E))
    if causal:
        allowed_CxL = (q_offset + jnp.arange(C))[:, None] >= jnp.arange(L)[None, :]
        scores_BxHxCxL = jnp.where(allowed_CxL, scores_BxHxCxL, jnp.finfo(jnp.float32).min)
    probs_BxHxCxL = jax.nn.softmax(scores_BxHxCxL, axis=-1).astype(v_BxLxHxF.dtype)
    return jnp.einsum("bhqk,bkhf->bqhf", probs_BxHxCxL, v_BxLxHxF)


def softmax_attention(q_BxLxHxE, k_BxLxHxE, v_BxLxHxF, causal: bool, chunk: int = 0):
    """Multi-head softmax attention; chunk > 0 scores that many queries at a time (each
    query's softmax is over all keys, so it is exact), rematerialising each chunk in the
    backward pass: one (C, L) score block per head at a time, as model.attention_chunk_size
    does for GQA. Any length: the last chunk's missing queries are padding, dropped."""
    B, L, H, E = q_BxLxHxE.shape
    if not 0 < chunk < L:
        return _softmax_block(q_BxLxHxE, k_BxLxHxE, v_BxLxHxF, 0, causal)
    pad = -L % chunk
    N = (L + pad) // chunk
    q_NxBxCxHxE = jnp.moveaxis(jnp.pad(q_BxLxHxE, ((0, 0), (0, pad), (0, 0), (0, 0)))
                               .reshape(B, N, chunk, H, E), 1, 0)

    @jax.checkpoint
    def one_chunk(q_BxCxHxE, q_offset):
        return _softmax_block(q_BxCxHxE, k_BxLxHxE, v_BxLxHxF, q_offset, causal)

    out_NxBxCxHxF = jax.lax.map(lambda a: one_chunk(*a), (q_NxBxCxHxE, jnp.arange(N) * chunk))
    return jnp.moveaxis(out_NxBxCxHxF, 0, 1).reshape(B, N * chunk, H, -1)[:, :L]


class MLAttention(nnx.Module):
    """Multi-head latent attention; parameter names follow HF's DeepseekV3Attention."""

    def __init__(self, m, rngs: nnx.Rngs):
        c, D, H = m.mla, m.d_model, m.n_heads
        self.n_heads, self.chunk_size = H, m.attention_chunk_size
        self.q_lora_rank, self.kv_lora_rank = c.q_lora_rank, c.kv_lora_rank
        self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        qk = self.nope + self.rope
        if c.q_lora_rank:
            self.q_a_proj = _linear(D, c.q_lora_rank, m.init_std, rngs)
            self.q_a_norm = RMSNorm(c.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = _linear(c.q_lora_rank, H * qk, m.init_std, rngs)
        else:
            self.q_proj = _linear(D, H * qk, m.init_std, rngs)
        self.kv_a_proj_with_mqa = _linear(D, c.kv_lora_rank + self.rope, m.init_std, rngs)
        self.kv_a_norm = RMSNorm(c.kv_lora_rank, MLA_NORM_EPS)
        self.kv_b_proj = _linear(c.kv_lora_rank, H * (self.nope + self.v_dim), m.init_std, rngs)
        self.o_proj = _linear(H * self.v_dim, D, m.init_std, rngs)

    def query(self, x_BxLxD):
        if self.q_lora_rank:
            return self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BxLxD)))
        return self.q_proj(x_BxLxD)

    def latent(self, x_BxLxD, cos_LxR, sin_LxR):
        """What a generation cache would keep: normed latent (B, L, C), rotated key (B, L, R)."""
        B, L, _ = x_BxLxD.shape
        c_BxLxC, k_rope_BxLxR = jnp.split(self.kv_a_proj_with_mqa(x_BxLxD), [self.kv_lora_rank],
                                          axis=-1)
        k_rope_BxLx1xR = apply_rope(k_rope_BxLxR.reshape(B, L, 1, self.rope), cos_LxR, sin_LxR)
        return self.kv_a_norm(c_BxLxC), k_rope_BxLx1xR[:, :, 0]

    def __call__(self, x_BxLxD, cos_LxR, sin_LxR, causal: bool):
        B, L, _ = x_BxLxD.shape
        H = self.n_heads
        q_BxLxHxQ = self.query(x_BxLxD).reshape(B, L, H, self.nope + self.rope)
        q_rope_BxLxHxR = apply_rope(q_BxLxHxQ[..., self.nope:], cos_LxR, sin_LxR)
        q_BxLxHxQ = jnp.concatenate([q_BxLxHxQ[..., :self.nope], q_rope_BxLxHxR], axis=-1)
        c_BxLxC, k_rope_BxLxR = self.latent(x_BxLxD, cos_LxR, sin_LxR)
        kv_BxLxHxN = self.kv_b_proj(c_BxLxC).reshape(B, L, H, self.nope + self.v_dim)
        k_rope_BxLxHxR = jnp.broadcast_to(k_rope_BxLxR[:, :, None], (B, L, H, self.rope))
        k_BxLxHxQ = jnp.concatenate([kv_BxLxHxN[..., :self.nope], k_rope_BxLxHxR], axis=-1)
        out_BxLxHxV = softmax_attention(q_BxLxHxQ, k_BxLxHxQ, kv_BxLxHxN[..., self.nope:], causal,
                                        self.chunk_size)
        return self.o_proj(out_BxLxHxV.reshape(B, L, H * self.v_dim))


# ------------------------------------------------------------------------ linear attention


def feature_map(x, name: str = "elu"):
    """A positive feature map phi, in float32: elu(x) + 1 > 0."""
    if name != "elu":
        raise ValueError(f"feature map {name!r}: choose one of {', '.join(FEATURE_MAPS)}")
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def linear_attention_reference(fq_BxLxHxE, fk_BxLxHxE, rq_BxLxHxE, rk_BxLxHxE, v_BxLxHxF,
                               causal: bool):
    """The O(L^2) formula, written out: phi(q), phi(k) and their RoPE-rotated copies given."""
    L = fq_BxLxHxE.shape[1]
    num_BxHxLxL = jnp.einsum("bihe,bjhe->bhij", rq_BxLxHxE, rk_BxLxHxE)
    den_BxHxLxL = jnp.einsum("bihe,bjhe->bhij", fq_BxLxHxE, fk_BxLxHxE)
    if causal:
        allowed_LxL = jnp.arange(L)[:, None] >= jnp.arange(L)[None, :]
        num_BxHxLxL, den_BxHxLxL = num_BxHxLxL * allowed_LxL, den_BxHxLxL * allowed_LxL
    out_BxLxHxF = jnp.einsum("bhij,bjhf->bihf", num_BxHxLxL, v_BxLxHxF)
    return out_BxLxHxF / (jnp.einsum("bhij->bih", den_BxHxLxL)[..., None] + LINEAR_EPS)


def linear_attention(fq_BxLxHxE, fk_BxLxHxE, rq_BxLxHxE, rk_BxLxHxE, v_BxLxHxF,
                     causal: bool, chunk: int):
    """linear_attention_reference in O(L): float32 in, float32 out."""
    if not causal:
        kv_BxHxExF = jnp.einsum("bjhe,bjhf->bhef", rk_BxLxHxE, v_BxLxHxF)
        num_BxLxHxF = jnp.einsum("bihe,bhef->bihf", rq_BxLxHxE, kv_BxHxExF)
        den_BxLxH = jnp.einsum("bihe,bhe->bih", fq_BxLxHxE, fk_BxLxHxE.sum(axis=1))
        return num_BxLxHxF / (den_BxLxH[..., None] + LINEAR_EPS)
    B, L, H, E = fq_BxLxHxE.shape
    F = v_BxLxHxF.shape[-1]
    C = min(chunk, L)
    pad = -L % C  # padded positions come after every real one: causality hides them
    N = (L + pad) // C

    def chunks(x):  # (B, L, H, X) -> (N, B, C, H, X)
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.moveaxis(x.reshape(B, N, C, H, x.shape[-1]), 1, 0)

    inside_CxC = jnp.arange(C)[:, None] >= jnp.arange(C)[None, :]

    def one_chunk(state, xs):
        kv_BxHxExF, k_sum_BxHxE = state
        fq, fk, rq, rk, v = xs  # each (B, C, H, X)
        num = jnp.einsum("bihe,bhef->bihf", rq, kv_BxHxExF)
        den = jnp.einsum("bihe,bhe->bih", fq, k_sum_BxHxE)
        num += jnp.einsum("bhij,bjhf->bihf",
                          jnp.einsum("bihe,bjhe->bhij", rq, rk) * inside_CxC, v)
        den += jnp.einsum("bhij->bih", jnp.einsum("bihe,bjhe->bhij", fq, fk) * inside_CxC)
        state = (kv_BxHxExF + jnp.einsum("bjhe,bjhf->bhef", rk, v), k_sum_BxHxE + fk.sum(axis=1))
        return state, num / (den[..., None] + LINEAR_EPS)

    state = (jnp.zeros((B, H, E, F), jnp.float32), jnp.zeros((B, H, E), jnp.float32))
    xs = tuple(chunks(x) for x in (fq_BxLxHxE, fk_BxLxHxE, rq_BxLxHxE, rk_BxLxHxE, v_BxLxHxF))
    _, out_NxBxCxHxF = jax.lax.scan(one_chunk, state, xs)
    return jnp.moveaxis(out_NxBxCxHxF, 0, 1).reshape(B, N * C, H, F)[:, :L]


class LinearAttention(nnx.Module):
    """Kernel attention with GQA's projections (q, k, v, o; a KV head serves H/K queries)."""

    def __init__(self, m, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads = m.n_heads, m.n_kv_heads
        self.head_dim = m.d_model // m.n_heads
        self.feature_map, self.chunk = m.linear.feature_map, m.linear.chunk_size
        self.q_proj = _linear(m.d_model, m.n_heads * self.head_dim, m.init_std, rngs)
        self.k_proj = _linear(m.d_model, m.n_kv_heads * self.head_dim, m.init_std, rngs)
        self.v_proj = _linear(m.d_model, m.n_kv_heads * self.head_dim, m.init_std, rngs)
        self.o_proj = _linear(m.n_heads * self.head_dim, m.d_model, m.init_std, rngs)

    def features(self, x_BxLxD, cos_LxE, sin_LxE):
        """phi(q), phi(k), their rotations and v, float32, KV heads repeated to H."""
        B, L, _ = x_BxLxD.shape
        H, K, E = self.n_heads, self.n_kv_heads, self.head_dim
        fq = feature_map(self.q_proj(x_BxLxD).reshape(B, L, H, E), self.feature_map)
        fk = feature_map(self.k_proj(x_BxLxD).reshape(B, L, K, E), self.feature_map)
        v = self.v_proj(x_BxLxD).reshape(B, L, K, E).astype(jnp.float32)
        fk, v = jnp.repeat(fk, H // K, axis=2), jnp.repeat(v, H // K, axis=2)  # HF repeat_kv order
        return fq, fk, apply_rope(fq, cos_LxE, sin_LxE), apply_rope(fk, cos_LxE, sin_LxE), v

    def __call__(self, x_BxLxD, cos_LxE, sin_LxE, causal: bool):
        B, L, _ = x_BxLxD.shape
        out = linear_attention(*self.features(x_BxLxD, cos_LxE, sin_LxE), causal, self.chunk)
        return self.o_proj(out.reshape(B, L, -1).astype(x_BxLxD.dtype))


MODULES = {"mla": MLAttention, "linear": LinearAttention}
