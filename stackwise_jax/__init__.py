"""StackWise-JAX: train a transformer one stack of layers at a time.

`stackwise_jax.load_run(DIR)` returns (rack, tokenizer, config) of a run; see README.md.
"""

__all__ = ["load_run"]


def __getattr__(name):
    # Lazy, so `import stackwise_jax.config` does not pull in JAX.
    if name == "load_run":
        from stackwise_jax.run import load_run
        return load_run
    raise AttributeError(f"module 'stackwise_jax' has no attribute {name!r}")
