"""Held-out evaluation, stack by stack from the stores; and the unigram baseline.

A run is evaluated the way its trunk is assembled: the held-out batches are embedded once
(at each mask ratio, and causally), then every stack is read from its store, converted to
the run's resident format (phases.eval_format), applied to all of them and dropped before
the next one. One stack's weights and the held-out hidden states are all that is live, at
any depth. Masks are fixed (EVAL_SEED and the batch index), so every run and every stage
is scored on the same positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stackwise_jax import memory, objective, phases, resident, store
from stackwise_jax.resident import Template, compute_dtype

EVAL_SEED = 1234


class Evaluator:
    """Compiled once per run; `losses` evaluates whatever the stores hold."""

    def __init__(self, cfg, run_dir: str, heldout_batches, mask_id: int):
        self.cfg, self.run_dir, self.mask_id = cfg, run_dir, mask_id
        self.batches = [np.asarray(b, np.int32) for b in heldout_batches]
        self.dtype = compute_dtype(cfg)
        self.template = Template(cfg.model, 0)
        template = self.template

        def embed(top, inputs_BxL):
            return template.rack({}, top).embed(inputs_BxL).astype(self.dtype)

        def run_stack(top, blocks, x_BxLxD, causal: bool):
            mode = "causal" if causal else "bidirectional"
            return template.rack({}, top).run_trunk(blocks, x_BxLxD, mode)

        def sums(top, x_BxLxD, batch):
            rack = template.rack({}, top)
            return (objective.loss_numerator(x_BxLxD, rack.logits, batch, "mean",
                                             cfg.training.loss_chunk_size),
                    objective.loss_denominator(batch, "mean"))

        self._embed = jax.jit(embed)
        self._run_stack = jax.jit(run_stack, static_argnames=("causal",))
        self._sums = jax.jit(sums)
        self._prepare = jax.jit(objective.prepare_tokens, static_argnums=(2, 3, 4))

    def _top(self, max_version: int) -> dict:
        groups = [g for g in store.TOP_GROUPS
                  if not (g == "head" and self.cfg.model.tie_embeddings)]
        return {g: resident.load_group(self.run_dir, g, max_version, self.dtype, "evaluation")
                for g in groups}

    def losses(self, n_stacks: int, max_version: int, ratios=(), causal: bool = False) -> dict:
        """Mean held-out loss over masked tokens at each ratio in `ratios` (keys: the ratio
        as a string) and, with causal=True, next-token loss (key 'causal'), through stacks
        0..n_stacks-1 as stored at versions <= max_version."""
        top = self._top(max_version)
        streams = []  # (key, causal, prepared batch, hidden)
        for i, ids in enumerate(self.batches):
            ids = jnp.asarray(ids)
            key = jax.random.fold_in(jax.random.key(EVAL_SEED), i)
            wanted = [(str(r), False, ("masked_diffusion", (float(r), float(r))))
                      for r in ratios]
            if causal:
                wanted.append(("causal", True, ("causal", (0.0, 0.0))))
            for name, is_causal, (obj, mask_range) in wanted:
                batch = self._prepare(key, ids, obj, mask_range, self.mask_id)
                streams.append([name, is_causal, batch, self._embed(top, batch["inputs"])])
        memory.sample()
        fmt = phases.eval_format(self.cfg)
        for k in range(n_stacks):
            blocks = resident.stack_resident(self.cfg, self.run_dir, k, fmt, max_version,
                                             "evaluation")
            for s in streams:
                s[3] = self._run_stack(top, blocks, s[3], causal=s[1])
            memory.sample()
            del blocks
        totals: dict = {}
        for name, _, batch, hidden in streams:
            num, den = self._sums(top, hidden, batch)
            a, b = totals.get(name, (0.0, 0.0))
            totals[name] = (a + float(num), b + float(den))
        return {name: num / max(den, 1.0) for name, (num, den) in totals.items()}


def unigram_loss(train_rows, heldout_batches, vocab_size: int) -> float:
    """Cross-entropy of add-one unigram frequencies of the training tokens on held-out tokens.

    A model that ignores context can do no better than this at any mask ratio, since which
    positions are masked is independent of the tokens there.
    """
    counts = np.bincount(np.asarray(train_rows).ravel(), minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    held = np.concatenate([np.asarray(b).ravel() for b in heldout_batches])
    return float(-log_p[held].mean())
