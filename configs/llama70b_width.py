"""Llama-3-70B layer shape at a size this 2-core CPU with 24 GiB can run to the end.

The 70B layer exactly (d_model 8192, 64 heads / 8 KV heads, d_ff 28672, RoPE theta 500000,
856M parameters per layer) with a 16,384-entry vocabulary, 4 stacks of 1 block, 64-token
sequences, batch 1 and 2 steps per stage, frozen trunk in nf4, Adam moments in bf16. It
shows on a CPU what the process holds per stage at 70B width (docs/plan.md).

python -m stackwise_jax.train --config=configs/llama70b_width.py
"""

from stackwise_jax.config import defaults


def get_config():
    c = defaults()
    c.model.vocab_size = 16384
    c.model.d_model = 8192
    c.model.n_heads = 64
    c.model.n_kv_heads = 8
    c.model.d_ff = 28672
    c.model.rope_theta = 500000.0
    c.model.norm_eps = 1e-5
    c.model.architecture.n_stacks = 4
    c.model.architecture.blocks_per_stack = 1
    c.data.seq_len = 64
    c.data.batch_size = 1
    c.training.steps_per_stage = 2
    c.training.warmup_steps = 1
    c.training.learning_rate = 1e-4
    c.training.log_every = 1
    c.training.optimizer_state_dtype = "bf16"
    c.training.progressive.frozen_precision = "nf4"
    c.eval.batches = 2
    return c
