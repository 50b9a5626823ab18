"""Loading a finished (or in-progress) run for notebooks: `load_run(DIR)`."""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx

from stackwise_jax import checkpoint
from stackwise_jax.errors import UserError
from stackwise_jax.model import Rack


@dataclasses.dataclass
class LoadedRun:
    rack: Rack
    tokenizer: object  # stackwise_jax.data.Tokenizer
    config: object  # ml_collections.ConfigDict
    step: int  # global step of the checkpoint loaded
    finished: bool  # True when every stage had ended at that checkpoint

    def __iter__(self):  # `rack, tokenizer, config = load_run(dir)`
        return iter((self.rack, self.tokenizer, self.config))


def abstract_params(model_cfg) -> dict:
    """The Rack's parameters as ShapeDtypeStructs (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Rack(model_cfg, nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def rack_from_params(model_cfg, params: dict) -> Rack:
    """A Rack holding `params` (a pure nested dict), without allocating a random init."""
    abstract = nnx.eval_shape(lambda: Rack(model_cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_run(workdir: str, require_finished: bool = False) -> LoadedRun:
    """The Rack, tokenizer and config of the run in `workdir`, from its latest checkpoint."""
    from stackwise_jax import data  # deferred: data pulls in grain and tokenizers

    cfg = checkpoint.read_config(workdir)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise UserError(f"'{workdir}' has no checkpoint yet; train first")
    ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint.max_to_keep, create=False)
    step = ckpt.latest_step()
    if step is None:
        raise UserError(f"'{workdir}' has no checkpoint yet; train first")
    meta = ckpt.meta(step)
    if require_finished and not meta["done"]:
        raise UserError(f"'{workdir}' has not finished training (latest checkpoint: stage "
                        f"{meta['stage']}, step {meta['step']}); rerun the train command to finish it")
    params, _, _, _ = ckpt.restore(step, abstract_params(cfg.model))
    ckpt.close()
    params = jax.tree.map(jax.numpy.asarray, params)
    tokenizer = data.Tokenizer.load(os.path.join(workdir, "tokenizer"))
    return LoadedRun(rack_from_params(cfg.model, params), tokenizer, cfg, step, bool(meta["done"]))
