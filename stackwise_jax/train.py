"""Training: `python -m stackwise_jax.train --config=configs/tiny.py [--workdir=DIR]`.

One code path for every mode: a run is a sequence of stages (one for end-to-end, one per
stack otherwise); stages.plan_stage says what trains in each. Rerunning the same command
resumes from the latest checkpoint at the same stage, step and data position.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from tqdm import tqdm

from stackwise_jax import cache, checkpoint, data, evaluate, fusion, objective, stages
from stackwise_jax import config as config_lib
from stackwise_jax import plan as plan_lib
from stackwise_jax.errors import UserError
from stackwise_jax.model import Rack, param_counts
from stackwise_jax.optim import make_optimizer
from stackwise_jax.run import rack_from_params
from stackwise_jax.step import make_loss_fn, make_train_step, step_key


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


class MetricsLog:
    """RUN_DIR/metrics.jsonl; on resume, lines past the restored checkpoint are dropped."""

    def __init__(self, workdir: str, keep_up_to_global_step: int | None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        lines = []
        if keep_up_to_global_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                lines = [ln for ln in f if ln.strip() and
                         json.loads(ln)["global_step"] <= keep_up_to_global_step]
        checkpoint.atomic_write_text(self.path, "".join(lines))
        self.file = open(self.path, "a")

    def write(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def _fresh_meta() -> dict:
    return {"stage": 0, "step": 0, "global_step": 0, "done": False, "stages": [],
            "stage_wall_s": 0.0, "stage_tokens": 0}


@dataclasses.dataclass
class StageRunner:
    """What one stage trains and how: its partition, step function and batch source."""

    trainable: dict
    frozen: dict
    step: object  # jitted (trainable, frozen, opt_state, batch, key) -> (trainable, opt_state, loss)
    batches: object  # grain iterator with get_state / set_state
    to_full: object  # (params, trainable) -> params
    source: str  # 'tokens', 'cache' or 'fusion' (adapters on the whole Rack)


class Trainer:
    """Builds each stage's runner; holds what lives across stages (the compiled cached step)."""

    def __init__(self, cfg, workdir: str, prepared, rebuild_cache: bool):
        self.cfg, self.workdir, self.prepared = cfg, workdir, prepared
        self.rebuild_cache = rebuild_cache
        self.template = nnx.eval_shape(lambda: Rack(cfg.model, nnx.Rngs(0)))
        self.tx = make_optimizer(cfg.training, config_lib.steps_in_stage(cfg))
        if fusion.enabled(cfg):
            self.fusion_tx = make_optimizer(cfg.training, cfg.training.fusion.steps,
                                            cfg.training.fusion.learning_rate)
        self.cached_step = None  # one compiled step serves every cached stage
        self.cache_seconds: dict[int, float] = {}  # opening or building each stage's cache
        self.token_batches = data.train_batches(prepared.train_rows, cfg.data.batch_size,
                                                cfg.data.seed)

    def uses_cache(self, stage: int) -> bool:
        return (self.cfg.training.progressive.cache_activations and stage >= 1
                and not fusion.is_fusion(self.cfg, stage))

    def tx_for(self, stage: int):
        return self.fusion_tx if fusion.is_fusion(self.cfg, stage) else self.tx

    def trainable_like(self, stage: int, params: dict):
        """Abstract trainable tree of `stage` (to restore its optimizer state)."""
        if fusion.is_fusion(self.cfg, stage):
            return fusion.adapters_like(self.cfg, self.template)
        return self.split(stage, params)[0]

    def partition(self, stage: int) -> stages.Partition:
        plan = stages.plan_stage(self.cfg, stage)
        if self.uses_cache(stage):
            return cache.cached_partition(self.cfg.model, plan)
        return stages.Partition(self.template, plan)

    def split(self, stage: int, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen) of `stage`, in the layout its step takes."""
        params = cache.to_one_stack(params, stage) if self.uses_cache(stage) else params
        return self.partition(stage).split(params)

    def runner(self, stage: int, params: dict, adapters=None) -> StageRunner:
        """adapters: fusion's adapters restored from a checkpoint (fresh ones otherwise)."""
        cfg, mask_id = self.cfg, self.prepared.tokenizer.mask_id
        if fusion.is_fusion(cfg, stage):
            partition = fusion.partition(self.template, cfg)
            frozen = fusion.store_base(partition, params, cfg)
            trainable = adapters if adapters is not None else fusion.init_adapters(cfg, frozen["trunk"])
            step = make_train_step(fusion.make_loss_fn(cfg, partition, mask_id), self.fusion_tx)
            return StageRunner(trainable, frozen, step, self.token_batches,
                               lambda full, tr: fusion.merge(full, frozen, tr, cfg), "fusion")
        partition = self.partition(stage)
        trainable, frozen = self.split(stage, params)
        if not self.uses_cache(stage):
            mask_range = objective.stage_mask_range(cfg.training, stage,
                                                    cfg.model.architecture.n_stacks)
            step = make_train_step(make_loss_fn(cfg, partition, mask_range, mask_id), self.tx)
            frozen = stages.store_frozen(frozen, cfg.training.progressive.frozen_precision,
                                         stages.compute_dtype(cfg))
            return StageRunner(trainable, frozen, step, self.token_batches,
                               lambda full, tr: stages.merge_trees(full, tr), "tokens")
        start = time.perf_counter()
        reader = cache.open_or_build(cfg, self.workdir, stage, rack_from_params(cfg.model, params),
                                     self.prepared.train_rows, mask_id, self.rebuild_cache)
        self.cache_seconds[stage] = self.cache_seconds.get(stage, 0.0) + time.perf_counter() - start
        self.rebuild_cache = False  # once, for the stage the run resumes in
        if self.cached_step is None:
            self.cached_step = make_train_step(cache.make_cached_loss_fn(cfg, partition),
                                               self.tx)
        batches = data.train_batches(reader, cfg.data.batch_size, cfg.data.seed + stage)
        return StageRunner(trainable, frozen, self.cached_step, batches,
                           lambda full, tr: cache.from_one_stack(full, tr, stage), "cache")


def run(cfg, workdir: str, max_steps: int | None = None, progress: bool = True,
        rebuild_cache: bool = False, device_memory: int | str | None = "auto") -> dict:
    """Trains (or resumes) the run in `workdir`; returns the summary once every stage is done.

    max_steps: stop after this many steps in this call (a checkpoint is saved), for
    notebooks that train in slices. Returns {} in that case if the run is not finished.
    rebuild_cache: regenerate the activation cache of the stage the run resumes in.
    device_memory: bytes the preflight check plans against before anything is written;
    "auto": the device's own limit where it reports one (GPU, TPU; the CPU does not, and
    is not checked); None: no check.
    """
    config_lib.validate(cfg)
    checkpoint.check_workdir(workdir, cfg)  # a foreign workdir is refused first, untouched
    data.corpus_files(cfg.data)  # a bad glob fails before anything is written
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):  # finished: nothing to train, nothing to check
        print(f"{workdir}: run already finished; summary in {summary_path}")
        with open(summary_path) as f:
            return json.load(f)
    if device_memory == "auto":
        device_memory = plan_lib.device_memory_bytes()
    if device_memory is not None:
        for row in plan_lib.preflight(cfg, device_memory):  # raises, naming the knobs
            print(f"memory preflight: {row['phase']}: {row['total_bytes'] / 2**30:.2f} of "
                  f"{device_memory / 2**30:.2f} GiB")
    checkpoint.claim_workdir(workdir, cfg)

    prepared = data.prepare(cfg, workdir)
    batch_size, seq_len = cfg.data.batch_size, cfg.data.seq_len
    heldout = data.heldout_batches(prepared.heldout_rows, batch_size, cfg.eval.batches)
    trainer = Trainer(cfg, workdir, prepared, rebuild_cache)

    params = nnx.to_pure_dict(nnx.state(Rack(cfg.model, nnx.Rngs(cfg.training.seed)), nnx.Param))
    ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint.max_to_keep)
    meta, data_state, opt_state, adapters = _fresh_meta(), {}, None, None
    latest = ckpt.latest_step()
    if latest is not None:
        meta = ckpt.meta(latest)
        opt_like = adapters_like = None
        if meta["step"] > 0 and not meta["done"]:
            trainable_like = trainer.trainable_like(meta["stage"], params)
            opt_like = jax.eval_shape(trainer.tx_for(meta["stage"]).init, trainable_like)
            if fusion.is_fusion(cfg, meta["stage"]):
                adapters_like = trainable_like
        params, data_state, opt_state, adapters = ckpt.restore(latest, params, opt_like,
                                                               adapters_like)
        print(f"resuming {workdir} at stage {meta['stage']}, step {meta['step']} "
              f"(checkpoint {latest})")
    metrics = MetricsLog(workdir, meta["global_step"])
    if data_state.get("tokens"):
        trainer.token_batches.set_state(data_state["tokens"])

    n_phases = config_lib.n_phases(cfg)
    steps_this_call, seg_start, seg_tokens = 0, time.perf_counter(), 0
    r = None

    def save(opt):
        if ckpt.latest_step() == meta["global_step"]:
            return  # saved at this step already (a stop right after a periodic save)
        state = {"tokens": trainer.token_batches.get_state()}
        if r is not None and r.source == "cache" and meta["step"] > 0:
            state["cache"] = r.batches.get_state()
        if r is not None and r.source == "fusion":  # the base stays unmerged until the end
            ckpt.save(meta["global_step"], params, dict(meta), state, opt, adapters=r.trainable)
            return
        ckpt.save(meta["global_step"], params if r is None else r.to_full(params, r.trainable),
                  dict(meta), state, opt)

    try:
        while meta["stage"] < n_phases:
            if max_steps is not None and steps_this_call >= max_steps:
                return {}
            stage = meta["stage"]
            n_steps = config_lib.steps_in_phase(cfg, stage)
            r = trainer.runner(stage, params, adapters)
            adapters = None
            if r.source == "cache" and data_state.get("cache") and meta["step"] > 0:
                r.batches.set_state(data_state["cache"])
            if opt_state is None:
                opt_state = trainer.tx_for(stage).init(r.trainable)

            name = ("fusion" if r.source == "fusion"
                    else f"stage {stage + 1}/{config_lib.n_stages(cfg)}")
            bar = tqdm(total=n_steps, initial=meta["step"], disable=not progress, dynamic_ncols=True,
                       desc=f"{name} ({_count(r.trainable) / 1e6:.2f}M trainable, "
                            f"from {r.source})")
            seg_start, seg_tokens = time.perf_counter(), 0
            last_log_t, since_log_tokens = seg_start, 0
            while meta["step"] < n_steps:
                if max_steps is not None and steps_this_call >= max_steps:
                    break
                batch = jax.tree.map(jnp.asarray, next(r.batches))
                key = step_key(cfg.training.seed, stage, meta["step"])
                r.trainable, opt_state, loss = r.step(r.trainable, r.frozen, opt_state, batch, key)
                meta["step"] += 1
                meta["global_step"] += 1
                steps_this_call += 1
                seg_tokens += batch_size * seq_len
                since_log_tokens += batch_size * seq_len
                bar.update(1)
                if meta["step"] % cfg.training.log_every == 0 or meta["step"] == n_steps:
                    loss = float(loss)
                    now = time.perf_counter()
                    tok_s = since_log_tokens / (now - last_log_t)
                    last_log_t, since_log_tokens = now, 0
                    metrics.write({"stage": stage, "step": meta["step"],
                                   "global_step": meta["global_step"], "loss": loss,
                                   "tokens_per_s": tok_s})
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                if meta["global_step"] % cfg.checkpoint.every_steps == 0 and meta["step"] < n_steps:
                    _accumulate(meta, seg_start, seg_tokens)
                    seg_start, seg_tokens = time.perf_counter(), 0
                    save(opt_state)
            bar.close()
            _accumulate(meta, seg_start, seg_tokens)
            seg_start, seg_tokens = time.perf_counter(), 0
            if meta["step"] < n_steps:  # stopped by max_steps
                save(opt_state)
                return {}
            params = r.to_full(params, r.trainable)
            record = {"stage": stage, "trainable_params": _count(r.trainable),
                      "steps": n_steps, "tokens": meta["stage_tokens"],
                      "wall_s": round(meta["stage_wall_s"], 2)}
            is_fusion = r.source == "fusion"
            r, opt_state, data_state = None, None, {}
            if stage in trainer.cache_seconds:
                record["cache_s"] = round(trainer.cache_seconds[stage], 2)
            rack = rack_from_params(cfg.model, params)
            n_run = rack.n_stacks if is_fusion else stages.plan_stage(cfg, stage).n_stacks_run
            if cfg.training.objective == "masked_diffusion" or is_fusion:
                record["heldout_loss_t0.5"] = evaluate.masked_diffusion_loss(
                    rack, heldout, 0.5, prepared.tokenizer.mask_id, n_run)
            if is_fusion:
                record["phase"] = "fusion"
                record["heldout_causal_loss"] = evaluate.causal_loss(rack, heldout)
            meta["stages"].append(record)
            meta.update(stage=stage + 1, step=0, stage_wall_s=0.0, stage_tokens=0,
                        done=stage + 1 == n_phases)
            save(None)
    except KeyboardInterrupt:
        print("interrupted: saving a checkpoint to resume from", file=sys.stderr)
        if meta["step"] > 0 and r is not None:
            _accumulate(meta, seg_start, seg_tokens)
            save(opt_state)
        raise
    finally:
        metrics.close()
        ckpt.close()

    summary = _summarize(cfg, meta, params, prepared, heldout)
    if trainer.cached_step is not None:
        summary["cached_step_compilations"] = trainer.cached_step._cache_size()
    checkpoint.atomic_write_text(summary_path, json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("mode", "heldout_loss", "heldout_causal_loss",
                                              "unigram_loss", "wall_s")}, indent=2))
    return summary


def _accumulate(meta, seg_start: float, seg_tokens: int):
    meta["stage_wall_s"] += time.perf_counter() - seg_start
    meta["stage_tokens"] += seg_tokens


def _summarize(cfg, meta, params, prepared, heldout) -> dict:
    rack = rack_from_params(cfg.model, params)
    mask_id = prepared.tokenizer.mask_id
    return {
        "mode": config_lib.mode_name(cfg),
        "heldout_loss": {str(t): evaluate.masked_diffusion_loss(rack, heldout, t, mask_id)
                         for t in cfg.eval.mask_ratios},
        "heldout_causal_loss": evaluate.causal_loss(rack, heldout),
        "unigram_loss": evaluate.unigram_loss(prepared.train_rows, heldout, cfg.model.vocab_size),
        "heldout_tokens": int(sum(np.asarray(b).size for b in heldout)),
        "tokens_seen": int(sum(s["tokens"] for s in meta["stages"])),
        "wall_s": round(sum(s["wall_s"] for s in meta["stages"]), 2),
        "stages": meta["stages"],
        "params": param_counts(cfg.model),
        "train_files": [os.path.basename(p) for p in prepared.train_files],
        "heldout_files": [os.path.basename(p) for p in prepared.heldout_files],
    }


# ------------------------------------------------------------------------------- CLI

flags.DEFINE_string("config", None, "config file, e.g. configs/tiny.py; override keys with "
                    "--config.key=value")
flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>)")
flags.DEFINE_bool("dry_run", False, "validate the config, print parameter counts, allocate nothing")
flags.DEFINE_integer("max_steps", None, "stop after this many steps (a checkpoint is saved)")
flags.DEFINE_string("device_memory", "auto", "memory the preflight check plans against, e.g. "
                    "80GiB; 'auto': the device's own limit where it reports one (not the CPU); "
                    "'none': no check")
flags.DEFINE_bool("rebuild_cache", False, "regenerate the activation cache of the stage the run "
                  "resumes in (after a corrupted or truncated shard is reported)")
FLAGS = flags.FLAGS
_OVERRIDES: dict[str, str] = {}


def dry_run(cfg) -> None:
    counts = param_counts(cfg.model)
    print(f"mode: {config_lib.mode_name(cfg)}, {config_lib.n_stages(cfg)} stage(s) of "
          f"{config_lib.steps_in_stage(cfg)} steps, "
          f"{cfg.data.batch_size * cfg.data.seq_len} tokens per step")
    width = max(len(k) for k in counts)
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n:>16,d}  ({n / 1e9:.3f}B)")


def _main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        if not FLAGS.config:
            raise UserError("--config is required, e.g. --config=configs/tiny.py")
        cfg = config_lib.load(FLAGS.config, _OVERRIDES)
        if FLAGS.dry_run:
            dry_run(cfg)
            return
        name = os.path.splitext(os.path.basename(FLAGS.config))[0]
        memory = FLAGS.device_memory
        if memory not in ("auto", "none"):
            memory = plan_lib.parse_bytes(memory)
        run(cfg, FLAGS.workdir or os.path.join("runs", name), max_steps=FLAGS.max_steps,
            rebuild_cache=FLAGS.rebuild_cache, device_memory=None if memory == "none" else memory)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main():
    try:
        rest, overrides = config_lib.split_overrides(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _OVERRIDES.update(overrides)
    app.run(_main, argv=[sys.argv[0]] + rest)


if __name__ == "__main__":
    main()
