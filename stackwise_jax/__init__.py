"""StackWise-JAX: train a transformer one stack of layers at a time.

`stackwise_jax.load_run(DIR)` returns (rack, tokenizer, config) of a run; see README.md.
`stackwise_jax.generate(rack, prompt_ids, max_new_tokens)` continues a prompt causally
with a KV cache; `stackwise_jax.diffusion_generate` samples by masked diffusion.
"""

__all__ = ["load_run", "generate", "diffusion_generate"]


def __getattr__(name):
    # Lazy, so `import stackwise_jax.config` does not pull in JAX.
    if name == "load_run":
        from stackwise_jax.run import load_run
        return load_run
    if name == "generate":  # the module, callable as its generate function
        import stackwise_jax.generate
        return stackwise_jax.generate
    if name == "diffusion_generate":
        from stackwise_jax.diffusion_sample import diffusion_generate
        return diffusion_generate
    raise AttributeError(f"module 'stackwise_jax' has no attribute {name!r}")
