"""BERT-base shape (12 layers, d_model 768, 12 heads, d_ff 3072, vocab 30522) as 12 one-block stacks.

Masked diffusion with bidirectional attention is the natural objective for this shape.
Blocks are Llama-style (SwiGLU), so the count is that shape's, not BERT's 110M.
"""

from stackwise_jax.config import defaults


def get_config():
    c = defaults()
    c.model.vocab_size = 30522
    c.model.d_model = 768
    c.model.n_heads = 12
    c.model.n_kv_heads = 12
    c.model.d_ff = 3072
    c.model.architecture.n_stacks = 12
    c.model.architecture.blocks_per_stack = 1
    c.data.seq_len = 512
    c.data.batch_size = 16
    c.training.learning_rate = 1e-4
    c.training.steps_per_stage = 1000
    return c
