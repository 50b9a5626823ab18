"""GPT-2-small shape (12 layers, d_model 768, 12 heads, vocab 50257, tied head) as 4 stacks of 3.

The blocks are this project's Llama-style blocks (RMSNorm, RoPE, SwiGLU with d_ff 3072),
so the parameter count is that shape's, not GPT-2's 124M.
"""

from stackwise_jax.config import defaults


def get_config():
    c = defaults()
    c.model.vocab_size = 50257
    c.model.d_model = 768
    c.model.n_heads = 12
    c.model.n_kv_heads = 12
    c.model.d_ff = 3072
    c.model.tie_embeddings = True
    c.model.architecture.n_stacks = 4
    c.model.architecture.blocks_per_stack = 3
    c.data.seq_len = 1024
    c.data.batch_size = 8
    c.training.learning_rate = 6e-4
    c.training.steps_per_stage = 2000
    c.training.train_embedding = "every_stage"  # tied: the head trains in every stage
    c.training.train_head = "every_stage"
    return c
