"""Llama-3-70B shape: 80 layers, d_model 8192, 64 heads, 8 KV heads, d_ff 28672, vocab 128256.

One block per stack, so each of the 80 stages trains one layer. Check it without
allocating anything: python -m stackwise_jax.train --config=configs/llama70b.py --dry_run
"""

from stackwise_jax.config import defaults


def get_config():
    c = defaults()
    c.model.vocab_size = 128256
    c.model.d_model = 8192
    c.model.n_heads = 64
    c.model.n_kv_heads = 8
    c.model.d_ff = 28672
    c.model.rope_theta = 500000.0
    c.model.norm_eps = 1e-5
    c.model.tie_embeddings = False
    c.model.architecture.n_stacks = 80
    c.model.architecture.blocks_per_stack = 1
    c.data.tokenizer = "llama3"  # Llama-3's own 128,256 ids, [MASK] on a reserved one
    c.data.seq_len = 4096
    c.data.batch_size = 1
    c.training.grad_accum_steps = 64  # 64 x 4096 tokens per update, one micro-batch's memory
    c.training.learning_rate = 1e-4
    c.training.warmup_steps = 100
    c.training.steps_per_stage = 1000
    c.training.progressive.new_stack_precision = "bf16"
    # Memory levers that make one stage fit (docs/plan.md): scores 1024 queries at a time,
    # logits 256 positions at a time, Adam moments in bf16, frozen trunk in nf4.
    c.model.attention_chunk_size = 1024
    c.training.loss_chunk_size = 256
    c.training.optimizer_state_dtype = "bf16"
    c.training.progressive.frozen_precision = "nf4"
    c.training.progressive.stack_storage_dtype = "bf16"  # 141 GB of stored stacks, not 282
    return c
