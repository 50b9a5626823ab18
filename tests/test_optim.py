"""The optimizer's weight decay reaches matrices only."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import small_config
from stackwise_jax import optim, resident


def test_weight_decay_reaches_matrices_and_never_norm_gains(corpus_dir):
    cfg = small_config(corpus_dir, **{"training.weight_decay": 0.5,
                                      "training.warmup_steps": 0})
    top = resident.init_top(cfg)
    # A stage's trainable tree: a stack (its norm gains are (blocks_per_stack, d_model),
    # two dimensions like a matrix), the embedding, the final norm and the head.
    params = {"stacks": {0: resident.init_stack(cfg, 0)}, **top}
    tx = optim.make_optimizer(cfg.training, 10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    names = {jax.tree_util.keystr(path): np.asarray(u) for path, u in flat}
    norms = {k: u for k, u in names.items() if "norm" in k}
    matrices = {k: u for k, u in names.items() if k.endswith(("['kernel']", "['embedding']"))}
    assert any(u.ndim == 2 for u in norms.values())  # the case a rule by ndim got wrong
    assert norms and all(not u.any() for u in norms.values()), "norm gains were decayed"
    assert matrices and all(u.any() for u in matrices.values()), "a matrix was not decayed"
    assert set(norms) | set(matrices) == set(names)
