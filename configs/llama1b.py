"""Llama-3.2-1B shape (a small Llama-style model): 16 layers in 4 stacks of 4 blocks, tied head."""

from stackwise_jax.config import defaults


def get_config():
    c = defaults()
    c.model.vocab_size = 128256
    c.model.d_model = 2048
    c.model.n_heads = 32
    c.model.n_kv_heads = 8
    c.model.d_ff = 8192
    c.model.rope_theta = 500000.0
    c.model.tie_embeddings = True
    c.model.architecture.n_stacks = 4
    c.model.architecture.blocks_per_stack = 4
    c.data.seq_len = 2048
    c.data.batch_size = 8
    c.training.learning_rate = 3e-4
    c.training.steps_per_stage = 2000
    c.training.train_embedding = "every_stage"  # tied: the head trains in every stage
    c.training.train_head = "every_stage"
    c.training.progressive.new_stack_precision = "bf16"
    return c
