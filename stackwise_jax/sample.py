"""Continue a prompt with a run's model, and print the continuation:

    python -m stackwise_jax.sample --workdir=RUN --prompt="..." [--method=ar|diffusion]
        [--max_new_tokens=64] [--steps=N] [--block_length=N] [--temperature=0] [--top_p=1]
        [--seed=0]

ar: causal generation with a KV cache (generate.py); diffusion: masked-diffusion sampling
with low-confidence remasking, the way the model was trained (diffusion_sample.py). The
text stops at the first end-of-text token, if one is generated. The prompt and the new
tokens together may not exceed data.seq_len, the length the model was trained at.
"""

from __future__ import annotations

import os

from stackwise_jax import checkpoint, cli
from stackwise_jax.errors import UserError

METHODS = ("ar", "diffusion")


def _check_options(method, max_new_tokens, steps, block_length, temperature, top_p) -> None:
    if method not in METHODS:
        raise UserError(f"--method={method!r}: choose one of {', '.join(METHODS)}")
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens={max_new_tokens} must be >= 1")
    if method == "ar" and (steps is not None or block_length):
        raise UserError("--steps and --block_length apply to --method=diffusion only")
    if method == "diffusion" and top_p != 1:
        raise UserError("--top_p applies to --method=ar only")
    if steps is not None and steps < 1:
        raise UserError(f"--steps={steps} must be >= 1")
    if block_length < 0:
        raise UserError(f"--block_length={block_length} must be >= 0 (0: one block)")
    if not temperature >= 0:
        raise UserError(f"--temperature={temperature} must be >= 0 (0: the most likely token)")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p={top_p} must be in (0, 1]")


def sample_text(workdir: str, prompt: str, method: str = "ar", max_new_tokens: int = 64,
                steps: int | None = None, block_length: int = 0, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0) -> str:
    """The continuation of `prompt` by the model of the run in `workdir` (its latest
    checkpoint). steps (diffusion): model calls, default one per new token."""
    _check_options(method, max_new_tokens, steps, block_length, temperature, top_p)
    from stackwise_jax import data  # deferred: tokenizers, and JAX below

    cfg = checkpoint.read_config(workdir)  # raises: not a run directory
    tokenizer = data.Tokenizer.load(os.path.join(workdir, "tokenizer"))
    prompt_ids = tokenizer.encode(prompt)
    limit = cfg.data.seq_len
    if not prompt_ids:
        raise UserError("--prompt is empty; give the text to continue")
    if len(prompt_ids) >= limit:
        raise UserError(f"--prompt is {len(prompt_ids)} tokens; the model's maximum length is "
                        f"data.seq_len={limit} tokens, prompt and continuation together")
    if len(prompt_ids) + max_new_tokens > limit:
        raise UserError(f"--max_new_tokens={max_new_tokens}: with the prompt's "
                        f"{len(prompt_ids)} tokens that exceeds the model's maximum length "
                        f"data.seq_len={limit}; at most {limit - len(prompt_ids)}")
    from stackwise_jax.run import load_run

    rack = load_run(workdir).rack
    if method == "ar":
        from stackwise_jax.generate import generate
        ids = generate(rack, prompt_ids, max_new_tokens, temperature, top_p, seed)
    else:
        from stackwise_jax.diffusion_sample import diffusion_generate
        ids = diffusion_generate(rack, prompt_ids, max_new_tokens, tokenizer.mask_id,
                                 steps or max_new_tokens, block_length, temperature, seed)
    new = [int(i) for i in ids[len(prompt_ids):]]
    if tokenizer.eos_id in new:
        new = new[:new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)


def main():
    from absl import flags

    flags.DEFINE_string("workdir", None, "run directory (its latest checkpoint is used)")
    flags.DEFINE_string("prompt", None, "text to continue")
    flags.DEFINE_string("method", "ar", "ar: causal, with a KV cache; diffusion: masked-"
                        "diffusion sampling (low-confidence remasking)")
    flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate")
    flags.DEFINE_integer("steps", None, "diffusion: model calls in all (default: one per new "
                         "token)")
    flags.DEFINE_integer("block_length", 0, "diffusion: tokens per semi-autoregressive block, "
                         "filled left to right (0: one block)")
    flags.DEFINE_float("temperature", 0.0, "0: the most likely token; > 0: sample")
    flags.DEFINE_float("top_p", 1.0, "ar: sample from the smallest set of tokens whose "
                       "probability reaches top_p")
    flags.DEFINE_integer("seed", 0, "seed of the draws when temperature > 0")

    def body(FLAGS):
        if FLAGS.prompt is None:
            raise UserError("--prompt is required")
        print(sample_text(FLAGS.workdir, FLAGS.prompt, FLAGS.method, FLAGS.max_new_tokens,
                          FLAGS.steps, FLAGS.block_length, FLAGS.temperature, FLAGS.top_p,
                          FLAGS.seed))

    cli.run(body, required=("workdir",))


if __name__ == "__main__":
    main()
