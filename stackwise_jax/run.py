"""Reading a run's parameters: `load_run(DIR)` for notebooks, `RunParams` for streaming.

A run's weights at its latest checkpoint are, group by group (embed, final_norm, head,
stack_k): the group the current phase is training, from the checkpoint (mid-phase);
otherwise the newest store an earlier phase wrote (store.py); otherwise, for a stack no
stage has reached yet, its initialisation, which depends only on (training.seed, k).
`RunParams` hands them out one array at a time (the HF export streams a 70B run this way);
`load_run` builds the whole Rack in float32, which is only for models that fit in memory.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from stackwise_jax import checkpoint, phases, resident, store
from stackwise_jax.errors import UserError
from stackwise_jax.model import Rack


@dataclasses.dataclass
class LoadedRun:
    rack: Rack
    tokenizer: object  # stackwise_jax.data.Tokenizer
    config: object  # ml_collections.ConfigDict
    step: int  # global step of the checkpoint loaded
    finished: bool  # True when every phase had ended at that checkpoint

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


class RunParams:
    """The parameters of the run in `workdir` at its latest checkpoint, group by group."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.cfg = checkpoint.read_config(workdir)
        if not os.path.isdir(os.path.join(workdir, "checkpoints")):
            raise UserError(f"'{workdir}' has no checkpoint yet; train first")
        ckpt = checkpoint.Checkpointer(workdir, self.cfg.checkpoint.max_to_keep, create=False)
        try:
            self.step = ckpt.latest_step()
            if self.step is None:
                raise UserError(f"'{workdir}' has no checkpoint yet; train first")
            self.meta = ckpt.meta(self.step)
            all_phases = phases.all_phases(self.cfg)
            self.phase = all_phases[self.meta["stage"]] if not self.meta["done"] else None
            self._trainable = {}
            if self.phase is not None and self.meta["step"] > 0 and not self.phase.adapters:
                _, trainable, _ = ckpt.restore(self.step, resident.abstract_trainable(self.cfg,
                                                                                      self.phase))
                self._trainable = self._by_group(trainable)
        finally:
            ckpt.close()
        self.finished = bool(self.meta["done"])
        self.bound = self.meta["stage"]  # stores written by phases that had finished

    def _by_group(self, trainable: dict) -> dict:
        out = {g: v for g, v in trainable.items() if g != "stacks"}
        for i, tree in trainable.get("stacks", {}).items():
            out[store.stack_group(self.phase.trained_stacks[int(i)])] = tree
        return out

    def groups(self) -> list[str]:
        m = self.cfg.model
        top = [g for g in store.TOP_GROUPS if not (g == "head" and m.tie_embeddings)]
        return top + [store.stack_group(k) for k in range(m.architecture.n_stacks)]

    def group(self, group: str) -> dict:
        """{leaf name ('blocks.attn.q_proj.kernel'): array}: numpy, memory-mapped from a
        store where the group is stored (read lazily, one array at a time)."""
        if group in self._trainable:
            return {k: np.asarray(v) for k, v in store.flatten(self._trainable[group]).items()}
        version = store.newest(self.workdir, group, self.bound)
        if version is not None:
            s = store.open_store(self.workdir, group, version)
            return {name: _Lazy(s, name) for name in s.leaves}
        if group.startswith("stack_") and (self.phase is not None
                                           and self.phase.index <= int(group[6:])):
            born = resident.init_stack(self.cfg, int(group[6:]))  # not reached yet
        elif self.bound == 0 and group in store.TOP_GROUPS:
            born = resident.init_top(self.cfg)[group]  # stage 0 has not stored it yet
        else:
            store.require(self.workdir, group, self.bound, "reading the run")  # raises
        return {k: np.asarray(v) for k, v in store.flatten(born).items()}

    def tree(self, group: str) -> dict:
        """The group as a nested dict of float32 numpy arrays."""
        return store.unflatten({name: np.asarray(value, np.float32)
                                for name, value in self.group(group).items()})


class _Lazy:
    """A stored array, read (and checksum-verified) on first use, then memory-mapped."""

    def __init__(self, s: store.Store, name: str):
        self.store, self.name, self._array = s, name, None

    @property
    def shape(self):
        return self.store.shape(self.name)

    def _read(self):
        if self._array is None:
            self._array = self.store.read(self.name)
        return self._array

    def __getitem__(self, index):
        return self._read()[index]

    def __array__(self, dtype=None, copy=None):
        array = np.asarray(self._read())
        return array.astype(dtype) if dtype is not None else array


def load_run(workdir: str, require_finished: bool = False) -> LoadedRun:
    """The Rack (float32), tokenizer and config of the run in `workdir`, at its latest
    checkpoint. Builds the whole model in memory; export.hf streams instead."""
    from stackwise_jax import data  # deferred: data pulls in grain and tokenizers

    params_src = RunParams(workdir)
    meta = params_src.meta
    if require_finished and not params_src.finished:
        raise UserError(f"'{workdir}' has not finished training (latest checkpoint: phase "
                        f"{meta['stage']}, step {meta['step']}); rerun the train command to "
                        "finish it")
    params = {g: params_src.tree(g) for g in params_src.groups() if not g.startswith("stack_")}
    params["stacks"] = {int(g[6:]): params_src.tree(g) for g in params_src.groups()
                        if g.startswith("stack_")}
    params = jax.tree.map(jax.numpy.asarray, params)
    tokenizer = data.Tokenizer.load(os.path.join(workdir, "tokenizer"))
    return LoadedRun(rack_from_params(params_src.cfg.model, params), tokenizer, params_src.cfg,
                     params_src.step, params_src.finished)
