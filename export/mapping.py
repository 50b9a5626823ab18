"""StackWise parameter paths <-> HF Llama tensor names, shapes and config.

HF layer n = k * blocks_per_stack + i is block i of stack k. Flax kernels are (in, out),
HF weights (out, in): a transpose, nothing more. RoPE already uses HF's rotate-half layout
and query head h reads KV head h // (n_heads / n_kv_heads) as HF's repeat_kv does, so no
row permutation is needed.
"""

from __future__ import annotations

import dataclasses

from stackwise_jax import store
from stackwise_jax.errors import UserError

# (name inside HF's model.layers.N, path inside the Flax stacks/<k>/blocks, transpose)
LAYER_TENSORS = (
    ("input_layernorm.weight", ("input_norm", "weight"), False),
    ("self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), True),
    ("self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), True),
    ("self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), True),
    ("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), True),
    ("post_attention_layernorm.weight", ("post_attention_norm", "weight"), False),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True),
)


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


def _layer_shapes(m) -> dict[str, tuple[int, int] | tuple[int]]:
    D, F, E = m.d_model, m.d_ff, m.d_model // m.n_heads
    q, kv = m.n_heads * E, m.n_kv_heads * E
    return {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
            "self_attn.q_proj.weight": (q, D), "self_attn.k_proj.weight": (kv, D),
            "self_attn.v_proj.weight": (kv, D), "self_attn.o_proj.weight": (D, q),
            "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D),
            "mlp.down_proj.weight": (D, F)}


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
    b, shapes = m.architecture.blocks_per_stack, _layer_shapes(m)
    return [Tensor(f"model.layers.{k * b + i}.{name}", shapes[name], ("stacks", k, "blocks") + sub,
                   i, transpose, b)
            for name, sub, transpose in LAYER_TENSORS for i in range(b)]


def all_tensors(m) -> list[Tensor]:
    """Every HF tensor, in the order the exporter writes them."""
    out = [embed_tensor(m)]
    for k in range(m.architecture.n_stacks):
        out += stack_tensors(m, k)
    return out + head_tensors(m)


# ---------------------------------------------------------------------------- HF config


def hf_config_kwargs(cfg, tok, dtype: str) -> dict:
    """LlamaConfig arguments for a Rack with this config and tokenizer metadata."""
    m = cfg.model
    return dict(
        architectures=["LlamaForCausalLM"], vocab_size=m.vocab_size, hidden_size=m.d_model,
        intermediate_size=m.d_ff, num_hidden_layers=n_layers(m), num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads, head_dim=m.d_model // m.n_heads, hidden_act="silu",
        max_position_embeddings=cfg.data.seq_len, initializer_range=m.init_std,
        rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=m.tie_embeddings,
        bos_token_id=tok.get("bos_id"), eos_token_id=tok["eos_id"], pad_token_id=tok["eos_id"],
        dtype=dtype)


def check_hf_config(hf, cfg) -> None:
    """Raises UserError unless the HF LlamaConfig `hf` describes the Rack `cfg.model` gives."""
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
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise UserError(f"the HF model has head_dim={head_dim} with {hf.num_attention_heads} heads "
                        f"and hidden_size={hf.hidden_size}; StackWise needs head_dim * heads == "
                        "hidden_size")
    pairs = [("hidden_size", hf.hidden_size, "model.d_model", m.d_model),
             ("intermediate_size", hf.intermediate_size, "model.d_ff", m.d_ff),
             ("num_attention_heads", hf.num_attention_heads, "model.n_heads", m.n_heads),
             ("num_key_value_heads", hf.num_key_value_heads or hf.num_attention_heads,
              "model.n_kv_heads", m.n_kv_heads),
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
