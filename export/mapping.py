"""StackWise parameter paths <-> HF tensor names, shapes and config: LlamaForCausalLM for
model.attention='gqa', DeepseekV3ForCausalLM with every layer dense for 'mla'.

HF layer n = k * blocks_per_stack + i is block i of stack k. Flax kernels are (in, out),
HF weights (out, in): a transpose, nothing more. RoPE already uses HF's rotate-half layout
and query head h reads KV head h // (n_heads / n_kv_heads) as HF's repeat_kv does, so no
row permutation is needed. DeepSeek checkpoints may store the RoPE rows interleaved
(rope_interleave=True); the export writes rope_interleave=False, the import reads both.
"""

from __future__ import annotations

import dataclasses

from stackwise_jax import store
from stackwise_jax.errors import UserError

# MLA's latent norms: (HF name, StackWise name) inside self_attn.
MLA_NORMS = (("q_a_layernorm", "q_a_norm"), ("kv_a_layernorm", "kv_a_norm"))
# HF projections whose output rows hold a RoPE part (MLA): per head, or the last rows.
MLA_ROPE_ROWS = ("q_proj", "q_b_proj", "kv_a_proj_with_mqa")


def _attention_kernels(m) -> list[tuple[str, tuple[int, int]]]:
    """(projection name, Flax kernel shape (in, out)) of the configured attention."""
    D, H, E = m.d_model, m.n_heads, m.d_model // m.n_heads
    if m.attention != "mla":
        return [("q_proj", (D, H * E)), ("k_proj", (D, m.n_kv_heads * E)),
                ("v_proj", (D, m.n_kv_heads * E)), ("o_proj", (H * E, D))]
    c = m.mla
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    q = ([("q_a_proj", (D, c.q_lora_rank)), ("q_b_proj", (c.q_lora_rank, H * qk))]
         if c.q_lora_rank else [("q_proj", (D, H * qk))])
    return q + [("kv_a_proj_with_mqa", (D, c.kv_lora_rank + c.qk_rope_head_dim)),
                ("kv_b_proj", (c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim))),
                ("o_proj", (H * c.v_head_dim, D))]


def layer_tensors(m) -> list[tuple[str, tuple, bool, tuple[int, ...]]]:
    """(name inside HF's model.layers.N, path inside the Flax stacks/<k>/blocks, transpose,
    HF shape) of one layer."""
    D, F = m.d_model, m.d_ff
    out = [("input_layernorm.weight", ("input_norm", "weight"), False, (D,))]
    out += [(f"self_attn.{name}.weight", ("attn", name, "kernel"), True, (d_out, d_in))
            for name, (d_in, d_out) in _attention_kernels(m)]
    if m.attention == "mla":
        widths = {"q_a_norm": m.mla.q_lora_rank, "kv_a_norm": m.mla.kv_lora_rank}
        out += [(f"self_attn.{hf}.weight", ("attn", ours, "weight"), False, (widths[ours],))
                for hf, ours in MLA_NORMS if widths[ours]]
    return out + [
        ("post_attention_layernorm.weight", ("post_attention_norm", "weight"), False, (D,)),
        ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True, (F, D)),
        ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True, (F, D)),
        ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True, (D, F))]


def check_exportable(m) -> None:
    """Kernel attention has no transformers model to map to."""
    if m.attention == "linear":
        raise UserError("model.attention='linear' (kernel attention) has no transformers "
                        "counterpart, so the run cannot be exported or imported; export "
                        "supports model.attention='gqa' (LlamaForCausalLM) and 'mla' "
                        "(DeepseekV3ForCausalLM)")


def deinterleave_rope_rows(hf_short_name: str, weight_OxI, m):
    """An HF DeepSeek weight saved for rope_interleave=True, in StackWise's layout.

    HF's interleaved RoPE pairs rows (2j, 2j+1) of the rope part with frequency j; ours
    (HF Llama's rotate-half) pairs (j, j + R/2). Row j of ours is row 2j of theirs, row
    j + R/2 is row 2j + 1: a permutation of output rows, so the scores are unchanged."""
    import numpy as np

    c = m.mla
    R = c.qk_rope_head_dim
    perm_R = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2)])
    if hf_short_name == "kv_a_proj_with_mqa":
        return np.concatenate([weight_OxI[:c.kv_lora_rank], weight_OxI[c.kv_lora_rank:][perm_R]])
    qk = c.qk_nope_head_dim + R
    w_HxQxI = weight_OxI.reshape(m.n_heads, qk, -1)
    w_HxQxI = np.concatenate([w_HxQxI[:, :c.qk_nope_head_dim],
                              w_HxQxI[:, c.qk_nope_head_dim:][:, perm_R]], axis=1)
    return w_HxQxI.reshape(weight_OxI.shape)


@dataclasses.dataclass(frozen=True)
class Tensor:
    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple  # path in the params pure dict (stack index as int)
    block: int | None  # index on the stacked leading axis, None outside stacks
    transpose: bool
    n_blocks: int = 1  # length of that axis (blocks_per_stack) for a layer tensor

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return self.hf_shape[::-1] if self.transpose else self.hf_shape

    @property
    def group(self) -> str:
        """The parameter group (store) holding it: embed, final_norm, head or stack_NNNNN."""
        return store.stack_group(self.path[1]) if self.path[0] == "stacks" else self.path[0]

    @property
    def leaf(self) -> str:
        """Its array's name inside the group's store, e.g. 'blocks.attn.q_proj.kernel'."""
        return ".".join(map(str, self.path[2:] if self.path[0] == "stacks" else self.path[1:]))

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of that array: blocks_per_stack blocks stacked for a layer tensor."""
        return self.flax_shape if self.block is None else (self.n_blocks,) + self.flax_shape


def n_layers(m) -> int:
    return m.architecture.n_stacks * m.architecture.blocks_per_stack


def embed_tensor(m) -> Tensor:
    return Tensor("model.embed_tokens.weight", (m.vocab_size, m.d_model), ("embed", "embedding"),
                  None, False)


def head_tensors(m) -> list[Tensor]:
    """Final norm, then the LM head unless it is tied to the embedding."""
    out = [Tensor("model.norm.weight", (m.d_model,), ("final_norm", "weight"), None, False)]
    if not m.tie_embeddings:
        out.append(Tensor("lm_head.weight", (m.vocab_size, m.d_model), ("head", "kernel"),
                          None, True))
    return out


def stack_tensors(m, k: int) -> list[Tensor]:
    """Stack k's tensors, kind by kind (each stored array is read once), block by block."""
    b = m.architecture.blocks_per_stack
    return [Tensor(f"model.layers.{k * b + i}.{name}", shape, ("stacks", k, "blocks") + sub,
                   i, transpose, b)
            for name, sub, transpose, shape in layer_tensors(m) for i in range(b)]


def all_tensors(m) -> list[Tensor]:
    """Every HF tensor, in the order the exporter writes them."""
    out = [embed_tensor(m)]
    for k in range(m.architecture.n_stacks):
        out += stack_tensors(m, k)
    return out + head_tensors(m)


# ---------------------------------------------------------------------------- HF config


def hf_config_class(m) -> str:
    """The transformers config class an exported model of this config uses."""
    check_exportable(m)
    return "DeepseekV3Config" if m.attention == "mla" else "LlamaConfig"


def hf_config_kwargs(cfg, tok, dtype: str) -> dict:
    """LlamaConfig (gqa) or DeepseekV3Config (mla) arguments for a Rack with this config
    and tokenizer metadata."""
    m = cfg.model
    common = dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
        num_hidden_layers=n_layers(m), num_attention_heads=m.n_heads, hidden_act="silu",
        max_position_embeddings=cfg.data.seq_len, initializer_range=m.init_std,
        rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        attention_bias=False, tie_word_embeddings=m.tie_embeddings,
        bos_token_id=tok.get("bos_id"), eos_token_id=tok["eos_id"], pad_token_id=tok["eos_id"],
        dtype=dtype)
    if hf_config_class(m) == "LlamaConfig":
        return dict(common, architectures=["LlamaForCausalLM"], num_key_value_heads=m.n_kv_heads,
                    head_dim=m.d_model // m.n_heads, mlp_bias=False)
    c = m.mla
    # Every layer dense (first_k_dense_replace = all layers): no experts are built, so the
    # MoE sizes below are unused; no multi-token-prediction module. Keys and values are
    # already one per head (num_key_value_heads = heads: HF must not repeat them).
    return dict(common, architectures=["DeepseekV3ForCausalLM"], num_key_value_heads=m.n_heads,
                q_lora_rank=c.q_lora_rank or None, kv_lora_rank=c.kv_lora_rank,
                qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
                v_head_dim=c.v_head_dim, rope_interleave=False,
                first_k_dense_replace=n_layers(m), moe_intermediate_size=m.d_ff,
                n_routed_experts=1, n_shared_experts=1, num_experts_per_tok=1, n_group=1,
                topk_group=1, num_mtp_layers=0)


def _mla_pairs(hf, m) -> list[tuple]:
    """(HF key, HF value, config key, config value) of a DeepSeek config's MLA shape."""
    c = m.mla
    if (hf.first_k_dense_replace or 0) < hf.num_hidden_layers:
        raise UserError(f"the HF model has mixture-of-experts layers (first_k_dense_replace="
                        f"{hf.first_k_dense_replace} < num_hidden_layers={hf.num_hidden_layers});"
                        " StackWise imports dense DeepSeek layers only")
    if (hf.num_key_value_heads or hf.num_attention_heads) != hf.num_attention_heads:
        raise UserError(f"the HF DeepSeek model has num_key_value_heads="
                        f"{hf.num_key_value_heads} != num_attention_heads="
                        f"{hf.num_attention_heads}; MLA keys are per head")
    return [("q_lora_rank", hf.q_lora_rank or 0, "model.mla.q_lora_rank", c.q_lora_rank),
            ("kv_lora_rank", hf.kv_lora_rank, "model.mla.kv_lora_rank", c.kv_lora_rank),
            ("qk_nope_head_dim", hf.qk_nope_head_dim, "model.mla.qk_nope_head_dim",
             c.qk_nope_head_dim),
            ("qk_rope_head_dim", hf.qk_rope_head_dim, "model.mla.qk_rope_head_dim",
             c.qk_rope_head_dim),
            ("v_head_dim", hf.v_head_dim, "model.mla.v_head_dim", c.v_head_dim)]


def check_hf_config(hf, cfg) -> None:
    """Raises UserError unless the HF config `hf` (Llama or DeepSeek-V3) describes the Rack
    `cfg.model` gives."""
    m = cfg.model
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise UserError(f"the HF model uses RoPE scaling '{rope_type}'; StackWise implements plain "
                        "RoPE only (rope_type 'default')")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise UserError(f"the HF model uses hidden_act='{hf.hidden_act}'; StackWise's MLP is "
                        "SwiGLU with silu")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise UserError("the HF model has attention or MLP biases; StackWise layers have none")
    check_exportable(m)
    hf_mla = hf.model_type == "deepseek_v3"
    if hf_mla != (m.attention == "mla"):
        want = "mla" if hf_mla else "gqa"
        raise UserError(f"the HF model is a '{hf.model_type}' model but model.attention="
                        f"'{m.attention}'; import it with --config.model.attention={want}")
    if hf_mla:
        pairs = _mla_pairs(hf, m)
    else:
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if head_dim * hf.num_attention_heads != hf.hidden_size:
            raise UserError(f"the HF model has head_dim={head_dim} with {hf.num_attention_heads} "
                            f"heads and hidden_size={hf.hidden_size}; StackWise needs head_dim * "
                            "heads == hidden_size")
        pairs = [("num_key_value_heads", hf.num_key_value_heads or hf.num_attention_heads,
                  "model.n_kv_heads", m.n_kv_heads)]
    pairs += [("hidden_size", hf.hidden_size, "model.d_model", m.d_model),
              ("intermediate_size", hf.intermediate_size, "model.d_ff", m.d_ff),
              ("num_attention_heads", hf.num_attention_heads, "model.n_heads", m.n_heads),
              ("num_hidden_layers", hf.num_hidden_layers,
               "model.architecture.n_stacks * model.architecture.blocks_per_stack", n_layers(m)),
              ("rope_theta", float(rope.get("rope_theta", 10000.0)), "model.rope_theta",
               float(m.rope_theta)),
              ("rms_norm_eps", float(hf.rms_norm_eps), "model.norm_eps", float(m.norm_eps)),
              ("tie_word_embeddings", bool(hf.tie_word_embeddings), "model.tie_embeddings",
               bool(m.tie_embeddings))]
    wrong = [(hk, hv, ck, cv) for hk, hv, ck, cv in pairs if hv != cv]
    if hf.vocab_size > m.vocab_size:
        wrong.append(("vocab_size", hf.vocab_size, "model.vocab_size", m.vocab_size))
    if wrong:
        fixes = " ".join(f"--config.{ck}={hv}" for _, hv, ck, _ in wrong if " " not in ck)
        raise UserError("the HF model does not match the config: "
                        + "; ".join(f"{hk}={hv} but {ck}={cv}" for hk, hv, ck, cv in wrong)
                        + (f" (to match it: {fixes})" if fixes else ""))
