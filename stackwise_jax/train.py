"""Training: `python -m stackwise_jax.train --config=configs/tiny.py [--workdir=DIR]`.

One loop for every mode: a run is a sequence of phases (phases.py says what each trains,
holds and stores). For each phase the loop opens it (assembles what it holds: trainable
groups born or loaded, the frozen trunk stack by stack, its batches), runs its steps,
then stores what it trained and evaluates the stored run stack by stack. Rerunning the
same command resumes from the latest checkpoint at the same phase, step and data position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from stackwise_jax import cache, checkpoint, data, distributed, evaluate, faults, memory, optim
from stackwise_jax import phases
from stackwise_jax import config as config_lib
from stackwise_jax import plan as plan_lib
from stackwise_jax import recipes, resident, sharding, step as step_lib, store, workdir_lock
from stackwise_jax.errors import UserError
from stackwise_jax.model import param_counts
from stackwise_jax.phases import Phase


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


class MetricsLog:
    """RUN_DIR/metrics.jsonl; on resume, lines past the restored checkpoint are dropped.
    Written by process 0 alone (distributed.is_primary); the others' writes go nowhere."""

    def __init__(self, workdir: str, keep_up_to_global_step: int | None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not distributed.is_primary():
            self.file = open(os.devnull, "a")
            return
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
            "stage_wall_s": 0.0, "stage_tokens": 0, "stage_nonfinite": 0}


@dataclasses.dataclass
class OpenPhase:
    """A phase while it trains: everything it holds."""

    phase: Phase
    trainable: dict
    frozen: dict
    opt_state: object
    step: object  # jitted step.make_train_step: -> (trainable, opt_state, loss, finite)
    batches: object  # grain iterator with get_state / set_state
    cache_s: float = 0.0


class Trainer:
    """Opens and finishes phases; holds what lives across them (compiled steps, the
    token iterator, the evaluator) and the device mesh everything is placed on (layout:
    parameters and optimizer state by sharding.py's rules, batches by rows)."""

    def __init__(self, cfg, workdir: str, prepared, rebuild_cache: bool,
                 layout: sharding.Layout | None = None):
        self.cfg, self.workdir, self.prepared = cfg, workdir, prepared
        self.layout = layout or sharding.from_config(cfg)
        self.rebuild_cache = rebuild_cache
        self.mask_id = prepared.tokenizer.mask_id
        t = cfg.training
        self.txs: dict = {}  # by _schedule_key: one optimizer per schedule
        self.steps: dict = {}  # phases of one shape share one compiled step
        self.compilations: dict = {}  # programs each released step had compiled
        self.rows_per_step = cfg.data.batch_size * t.grad_accum_steps
        self.part = self.layout.local_rows(self.rows_per_step)  # what this process reads
        if jax.process_count() > 1:
            print(f"data: process {jax.process_index()} of {jax.process_count()} reads rows "
                  f"{self.part.start}:{self.part.stop} of each batch of {self.rows_per_step}",
                  flush=True)
        self.token_batches = data.train_batches(prepared.train_rows, self.rows_per_step,
                                                cfg.data.seed, self.part)
        heldout = data.heldout_batches(prepared.heldout_rows, cfg.data.batch_size,
                                       cfg.eval.batches)
        self.evaluator = evaluate.Evaluator(cfg, workdir, heldout, self.mask_id, self.layout)
        self.heldout = heldout

    def tx(self, phase: Phase):
        key = _schedule_key(phase)
        if key not in self.txs:
            self.txs[key] = step_lib.optimizer_for(self.cfg, phase)
        return self.txs[key]

    def step_for(self, phase: Phase):
        key = step_signature(phase)
        if key not in self.steps:
            shardings = self.layout.shardings(self.abstract_state(phase))
            self.steps[key] = step_lib.build(self.cfg, phase, self.tx(phase), self.mask_id,
                                             self.layout, shardings)[0]
        return self.steps[key]

    def abstract_state(self, phase: Phase):
        """Shapes of (trainable, opt_state), each carrying its sharding on this mesh: what
        a checkpoint restores onto, whatever mesh it was saved from."""
        trainable = resident.abstract_trainable(self.cfg, phase)
        opt = jax.eval_shape(lambda tr: optim.init_state(self.tx(phase), tr, self.cfg.training),
                             trainable)
        return self.layout.abstract((trainable, opt))

    def open(self, phase: Phase, restored, data_state: dict, step: int) -> OpenPhase:
        """restored: (trainable, opt_state) from a mid-phase checkpoint, or None."""
        cfg = self.cfg
        memory.start_phase()
        layout = self.layout
        frozen = resident.frozen_state(cfg, self.workdir, phase, layout)
        start = time.perf_counter()
        batches = self.token_batches
        if phase.inputs == "cache":
            reader = cache.open_or_build(cfg, self.workdir, phase.index, self.prepared.train_rows,
                                         self.mask_id, self.rebuild_cache, layout)
            self.rebuild_cache = False  # once, for the stage the run resumes in
            batches = data.train_batches(reader, self.rows_per_step, cfg.data.seed + phase.index,
                                         self.part)
            if data_state.get("cache") and step > 0:
                batches.set_state(data_state["cache"])
        cache_s = time.perf_counter() - start if phase.inputs == "cache" else 0.0
        if restored is not None:  # restored onto this mesh already (abstract_state)
            trainable, opt_state = layout.put(jax.tree.map(jnp.asarray, restored))
        else:
            trainable = resident.trainable_at_start(cfg, self.workdir, phase, frozen.get("trunk"),
                                                    layout)
            opt_state = layout.put(optim.init_state(self.tx(phase), trainable, cfg.training))
        memory.sample()
        return OpenPhase(phase, trainable, frozen, opt_state, self.step_for(phase), batches,
                         cache_s)

    def release(self, phase: Phase, following: list[Phase]) -> None:
        """Drops the compiled step of a finished phase unless the next one runs it with the
        same shapes (cached stages share one); a trunk that grows each stage would otherwise
        leave one executable per stage in host memory. Freed host pages go back to the OS."""
        key = step_signature(phase)
        if key in self.steps and not (following and _same_shapes(phase, following[0])):
            step = self.steps.pop(key)
            self.compilations[key] = step._cache_size()
            step.clear_cache()
        memory.release_memory()

    def data_state(self, run: OpenPhase | None, step: int) -> dict:
        state = {"tokens": self.token_batches.get_state()}
        if run is not None and run.phase.inputs == "cache" and step > 0:
            state["cache"] = run.batches.get_state()
        return state

    def finish(self, run: OpenPhase) -> dict:
        """Stores what the phase trained (store version index + 1), drops what it held,
        and evaluates the stored run through the stacks the phase ran."""
        phase, version = run.phase, run.phase.index + 1
        cfg = self.cfg
        record = {"trainable_params": _count(run.trainable)}
        resident.write_stores(cfg, self.workdir, phase, run.trainable, run.frozen)
        run.trainable = run.frozen = run.opt_state = None  # nothing of the phase stays live
        fusing = phase.kind != "stage"
        if cfg.training.objective == "masked_diffusion" or fusing:
            losses = self.evaluator.losses(phase.n_stacks_run, version, ratios=(0.5,),
                                           causal=fusing)
            record["heldout_loss_t0.5"] = losses["0.5"]
            if fusing:
                record["phase"] = phase.kind
                record["heldout_causal_loss"] = losses["causal"]
        if run.cache_s:
            record["cache_s"] = round(run.cache_s, 2)
        record.update(memory.phase_record())
        return record


def _same_shapes(a: Phase, b: Phase) -> bool:
    return (step_signature(a) == step_signature(b)
            and len(a.trunk_stacks) == len(b.trunk_stacks)
            and len(a.upper_stacks) == len(b.upper_stacks))


def _schedule_key(phase: Phase) -> tuple:
    """What a phase's learning-rate schedule depends on (step_lib.optimizer_for)."""
    return (phase.kind, phase.n_steps, phase.index if phase.kind == "block" else 0)


def step_signature(phase: Phase) -> tuple:
    """What a phase's compiled step depends on (shapes aside, which jit tells apart
    itself): phases that agree share it. The optimizer, schedule included, is part of it."""
    fields = dataclasses.asdict(phase)
    for name in ("index", "name", "n_steps", "stores", "trained_stacks", "trunk_stacks",
                 "upper_stacks", "kind"):
        fields.pop(name)
    if phase.inputs == "cache":
        fields.pop("mask_range")  # masks come from the cache
    return (phase.n_local_stacks, len(phase.trunk_stacks) > 0, len(phase.upper_stacks) > 0,
            _schedule_key(phase)) + tuple(
        (k, tuple(sorted(v)) if isinstance(v, frozenset) else v) for k, v in sorted(fields.items()))


class Interrupted(KeyboardInterrupt):
    """The run stopped for a signal (Ctrl-C's SIGINT, or SIGTERM from a scheduler, Colab or
    a spot instance being reclaimed); `signum` says which. The CLI exits 128 + signum."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Interrupt:
    """SIGINT or SIGTERM asks the loop to stop after the current step and save a checkpoint;
    a second one abandons the step at once (the last checkpoint stays as it was)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (some notebook runners): no guard
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise Interrupted(signum)
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: saving a checkpoint after the current step (send it again "
              "to stop at once, without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        return False


def run(cfg, workdir: str, max_steps: int | None = None, progress: bool = True,
        rebuild_cache: bool = False, device_memory: int | str | None = "auto",
        devices=None) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the summary once every phase is done.

    max_steps: stop after this many steps in this call (a checkpoint is saved), for
    notebooks that train in slices. Returns {} in that case if the run is not finished.
    rebuild_cache: regenerate the activation cache of the stage the run resumes in.
    device_memory: bytes the preflight check plans against before anything is written;
    "auto": the device's own limit where it reports one (GPU, TPU; the CPU does not, and
    is not checked); None: no check.
    devices: the devices the mesh (config mesh.*) spans; default every device. A resumed
    run may use another mesh shape than the one it was saved on.
    """
    config_lib.validate(cfg)
    layout = sharding.from_config(cfg, devices)  # the device count: refused before any write
    workdir_lock.check_path(workdir)  # a file where a directory should be: refused, untouched
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
        mesh = layout if layout.n_devices > 1 else None  # per device of the run's mesh
        for row in plan_lib.preflight(cfg, device_memory, mesh):  # raises, naming the knobs
            print(f"memory preflight: {row['phase']}: {row['total_bytes'] / 2**30:.2f} of "
                  f"{device_memory / 2**30:.2f} GiB")
    # One run per workdir; the first write. Process 0 holds it for all the run's processes.
    lock = workdir_lock.acquire(workdir) if distributed.is_primary() else None
    try:
        return _run_locked(cfg, workdir, max_steps, progress, rebuild_cache, layout)
    finally:
        if lock is not None:
            lock.release()


def _inputs(cfg, workdir: str, rebuild_cache: bool, layout):
    """(prepared data, trainer, phases, data stats): everything checked before the first
    write. Raises UserError, having written nothing."""
    prepared = data.prepare(cfg, workdir, save_tokenizer=False,
                            written_elsewhere=not distributed.is_primary())
    plan_lib.check_disk(cfg, workdir, len(prepared.train_rows))  # raises, naming the bytes
    trainer = Trainer(cfg, workdir, prepared, rebuild_cache, layout)
    all_phases = phases.all_phases(cfg)
    data_stats = data.describe(cfg, prepared, all_phases)  # prints it, with any warnings
    return prepared, trainer, all_phases, data_stats


def _run_locked(cfg, workdir: str, max_steps, progress: bool, rebuild_cache: bool,
                layout: sharding.Layout) -> dict:
    """run() under the workdir lock. Nothing lands in the workdir (config.json, tokenizer/)
    until the corpus, the tokenizer and the rows have all passed their checks, so a start
    that fails leaves the workdir as it found it and the corrected command runs there."""
    summary_path = os.path.join(workdir, "summary.json")
    primary = distributed.is_primary()
    if primary:  # the tokenizer and token caches are built once, by process 0
        prepared, trainer, all_phases, data_stats = _inputs(cfg, workdir, rebuild_cache, layout)
        checkpoint.claim_workdir(workdir, cfg)  # inputs known good: the run starts here
        data.save_run_tokenizer(prepared.tokenizer, workdir)
    distributed.barrier("stackwise: inputs")
    if not primary:  # reads what process 0 wrote: the run's tokenizer, the token cache
        prepared, trainer, all_phases, data_stats = _inputs(cfg, workdir, rebuild_cache, layout)

    # Process 0 drops Orbax's leftovers; the others wait for it.
    ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint.max_to_keep, clean=primary)
    distributed.barrier("stackwise: checkpoints")
    meta, data_state, restored = _resume(ckpt, trainer, all_phases, workdir)
    store.require_intact(workdir, meta["stage"])  # what the resumed phase reads, all named
    metrics = MetricsLog(workdir, meta["global_step"])
    if data_state.get("tokens"):
        trainer.token_batches.set_state(data_state["tokens"])

    loop = _Loop(cfg, trainer, ckpt, metrics, meta, max_steps, progress)
    try:
        with _Interrupt() as interrupt, _disk_full_named():
            loop.interrupt = interrupt
            while meta["stage"] < len(all_phases):
                phase = all_phases[meta["stage"]]
                if loop.must_stop():  # nothing trained since the last checkpoint
                    loop.raise_if_interrupted()
                    return {}
                run_ = trainer.open(phase, restored, data_state, meta["step"])
                restored = None
                if not loop.train(run_):
                    return {}
                record = {"stage": phase.index, "steps": phase.n_steps,
                          "tokens": meta["stage_tokens"], "wall_s": round(meta["stage_wall_s"], 2),
                          "nonfinite_steps": meta["stage_nonfinite"], **trainer.finish(run_)}
                meta["stages"].append(record)
                meta.update(stage=phase.index + 1, step=0, stage_wall_s=0.0, stage_tokens=0,
                            stage_nonfinite=0, done=phase.index + 1 == len(all_phases))
                loop.save(None)
                if primary:
                    store.collect_garbage(workdir, meta["stage"])
                trainer.release(phase, all_phases[phase.index + 1:phase.index + 2])
    finally:
        metrics.close()
        ckpt.close()

    summary = _summarize(cfg, meta, trainer, prepared)
    summary["data"] = data_stats
    if not primary:
        return summary
    checkpoint.atomic_write_text(summary_path, json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("mode", "heldout_loss", "heldout_causal_loss",
                                              "unigram_loss", "wall_s")}, indent=2))
    return summary


def _resume(ckpt, trainer: Trainer, all_phases, workdir: str):
    """(meta, data_state, (trainable, opt_state) or None) of the newest intact checkpoint.

    Each checkpoint, newest first, is checked against its checksums and then restored; a
    damaged one is named, set aside and the next older one tried. With checkpoints but
    none intact the run stops, having changed nothing."""
    damaged: list[checkpoint.Damage] = []
    for step in reversed(ckpt.all_steps()):
        try:
            found = _restore(ckpt, trainer, all_phases, step)
        except checkpoint.Damage as e:
            damaged.append(e)
            continue
        where = checkpoint_label(all_phases, found[0])
        if damaged:
            aside = ckpt.set_aside([d.step for d in damaged])
            print(f"{_describe_damage(damaged)}; set aside in {aside}. Resuming from the newest "
                  f"intact checkpoint, {step}, at {where}", file=sys.stderr)
        else:
            print(f"resuming {workdir} at {where} (checkpoint {step})")
        return found
    if damaged:
        raise UserError(
            f"{workdir}: no intact checkpoint to resume from. {_describe_damage(damaged)}. "
            "Nothing was changed or deleted. Restore the checkpoints from a backup, or start "
            "the run again in a new --workdir")
    return _fresh_meta(), {}, None


@contextlib.contextmanager
def _disk_full_named():
    """A write that failed for lack of space where no caller named it (metrics, the
    activation cache, the stores): one message with the file and, where known, the size."""
    try:
        yield
    except faults.DiskFull:
        raise
    except Exception as e:
        if not faults.is_disk_full(e):
            raise
        path = getattr(e, "filename", None) or "the run directory"
        raise faults.disk_full(path, None, "a file of the run") from None


def checkpoint_label(all_phases, meta: dict) -> str:
    if meta["done"]:
        return "the end"
    return f"{all_phases[meta['stage']].name}, step {meta['step']}"


def _describe_damage(damaged) -> str:
    return "; ".join(f"checkpoint {d.step} is damaged ({d.item}: {d.path} is {d.why})"
                     for d in damaged)


def _restore(ckpt, trainer: Trainer, all_phases, step: int):
    """Checkpoint `step` as _resume returns it, or Damage naming what is wrong with it."""
    ckpt.check(step)  # the checksums: names the file
    directory = ckpt.step_dir(step)
    try:
        meta = ckpt.meta(step)
        meta.setdefault("stage_nonfinite", 0)
        mid = meta["step"] > 0 and not meta["done"]
        phase = all_phases[meta["stage"]] if not meta["done"] else None
    except Exception as e:  # noqa: BLE001 - whatever Orbax or the JSON says, the item is bad
        raise checkpoint.Damage(step, "meta", os.path.join(directory, "meta"),
                                f"unreadable ({checkpoint.first_line(e)})") from None
    like = trainer.abstract_state(phase) if mid else (None, None)
    data_state, trainable, opt_state = ckpt.restore(step, *like)  # Damage names the item
    return meta, data_state, (trainable, opt_state) if mid else None


class _Loop:
    """The steps of one phase, checkpoints and metrics."""

    def __init__(self, cfg, trainer: Trainer, ckpt, metrics, meta: dict, max_steps, progress):
        self.cfg, self.trainer, self.ckpt, self.metrics = cfg, trainer, ckpt, metrics
        self.meta, self.max_steps, self.progress = meta, max_steps, progress
        self.steps_this_call = 0
        self.interrupt = None
        self.run: OpenPhase | None = None

    def save(self, run: OpenPhase | None):
        """A checkpoint of the current position; mid-phase it holds `run`'s trainable state:
        the arrays the last step returned (its inputs were donated, so nothing older is
        alive), written synchronously before the next step may donate these in turn."""
        meta = self.meta
        if self.ckpt.latest_step() == meta["global_step"]:
            return  # saved at this step already (a stop right after a periodic save)
        mid = run is not None and meta["step"] > 0
        self.ckpt.save(meta["global_step"], dict(meta), self.trainer.data_state(run, meta["step"]),
                       run.trainable if mid else None, run.opt_state if mid else None)

    def train(self, run: OpenPhase) -> bool:
        """Runs the phase's remaining steps; False when stopped early (saved)."""
        cfg, meta, phase = self.cfg, self.meta, run.phase
        tokens_per_step = self.trainer.rows_per_step * cfg.data.seq_len
        bar = tqdm(total=phase.n_steps, initial=meta["step"], disable=not self.progress,
                   dynamic_ncols=True,
                   desc=f"{phase.name} ({_count(run.trainable) / 1e6:.2f}M trainable, "
                        f"from {phase.inputs})")
        seg_start, seg_tokens = time.perf_counter(), 0
        last_log_t, since_log_tokens, since_log_skipped, streak = seg_start, 0, 0, 0

        def account():
            nonlocal seg_start, seg_tokens
            meta["stage_wall_s"] += time.perf_counter() - seg_start
            meta["stage_tokens"] += seg_tokens
            seg_start, seg_tokens = time.perf_counter(), 0

        try:
            while meta["step"] < phase.n_steps:
                if self.must_stop():
                    account()
                    self.save(run)
                    self.raise_if_interrupted()
                    return False
                batch = self.trainer.layout.put_local_batch(next(run.batches),
                                                            self.trainer.rows_per_step)
                key = step_lib.step_key(cfg.training.seed, phase.index, meta["step"])
                run.trainable, run.opt_state, loss, finite = run.step(
                    run.trainable, run.frozen, run.opt_state, batch, key)
                memory.sample()
                meta["step"] += 1
                meta["global_step"] += 1
                self.steps_this_call += 1
                seg_tokens += tokens_per_step
                since_log_tokens += tokens_per_step
                bar.update(1)
                if bool(finite):
                    streak = 0
                else:
                    streak += 1
                    since_log_skipped += 1
                    meta["stage_nonfinite"] += 1
                    self.metrics.write({"stage": phase.index, "step": meta["step"],
                                        "global_step": meta["global_step"], "nonfinite": True,
                                        "loss": float(loss) if np.isfinite(float(loss)) else None})
                    if streak >= cfg.training.max_nonfinite_steps:
                        self._stop_nonfinite(phase, streak)
                if meta["step"] % cfg.training.log_every == 0 or meta["step"] == phase.n_steps:
                    now = time.perf_counter()
                    tok_s = since_log_tokens / (now - last_log_t)
                    record = {"stage": phase.index, "step": meta["step"],
                              "global_step": meta["global_step"], "loss": float(loss),
                              "tokens_per_s": tok_s, "nonfinite_steps": since_log_skipped}
                    self.metrics.write(record)
                    last_log_t, since_log_tokens, since_log_skipped = now, 0, 0
                    bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{tok_s:,.0f}")
                periodic = meta["global_step"] % cfg.checkpoint.every_steps == 0
                if periodic and meta["step"] < phase.n_steps and streak == 0:
                    account()
                    self.save(run)  # never inside a run of non-finite steps
        finally:
            bar.close()
        account()
        return True

    def must_stop(self) -> bool:
        stop_here = self.max_steps is not None and self.steps_this_call >= self.max_steps
        return stop_here or (self.interrupt is not None and self.interrupt.requested)

    def raise_if_interrupted(self):
        if self.interrupt is not None and self.interrupt.requested:
            raise Interrupted(self.interrupt.signum)

    def _stop_nonfinite(self, phase: Phase, streak: int):
        latest = self.ckpt.latest_step()
        where = (f"the last checkpoint (global step {latest}) is from before them"
                 if latest is not None else "no checkpoint was written")
        raise UserError(
            f"{phase.name} (phase {phase.index}), step {self.meta['step']}: {streak} steps in a "
            f"row had a non-finite loss or gradients and were skipped (training.max_nonfinite_"
            f"steps={self.cfg.training.max_nonfinite_steps}); {where}. See metrics.jsonl. Lower "
            "training.learning_rate, use fp32 or bf16 compute "
            "(training.progressive.new_stack_precision), or check the data")


def _summarize(cfg, meta, trainer: Trainer, prepared) -> dict:
    n_phases = len(phases.all_phases(cfg))
    losses = trainer.evaluator.losses(cfg.model.architecture.n_stacks, n_phases,
                                      ratios=cfg.eval.mask_ratios, causal=True)
    summary = {
        "mode": config_lib.mode_name(cfg),
        "heldout_loss": {str(t): losses[str(t)] for t in cfg.eval.mask_ratios},
        "heldout_causal_loss": losses["causal"],
        "eval_format": phases.eval_format(cfg),
        "unigram_loss": evaluate.unigram_loss(prepared.train_rows, trainer.heldout,
                                              cfg.model.vocab_size),
        # Scored: the eval.batches batches spread over the split; total: its whole rows.
        "heldout_tokens_scored": int(sum(np.asarray(b).size for b in trainer.heldout)),
        "heldout_tokens_total": int(np.prod(prepared.heldout_rows.shape)),
        "tokens_seen": int(sum(s["tokens"] for s in meta["stages"])),
        "wall_s": round(sum(s["wall_s"] for s in meta["stages"]), 2),
        "stages": meta["stages"],
        "params": param_counts(cfg.model),
        "disk_bytes": {"stores": store.disk_bytes(trainer.workdir)},
        "peak_rss_bytes": memory.process_peak_rss_bytes(),  # of this call's process
        "train_files": [os.path.basename(p) for p in prepared.train_files],
        "heldout_files": [os.path.basename(p) for p in prepared.heldout_files],
        # Corpus files not used, with why (empty); and, with data.decode_errors='replace',
        # the invalid UTF-8 sequences each file had replaced.
        "skipped_files": prepared.skipped_files,
        "decode_replacements": prepared.replacements,
    }
    cached = [n for key, n in trainer.compilations.items() if ("inputs", "cache") in key]
    if cached:
        summary["cached_step_compilations"] = cached[0]
    return summary


# ------------------------------------------------------------------------------- CLI

flags.DEFINE_string("config", None, "config file, e.g. configs/tiny.py; override keys with "
                    "--config.key=value")
flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>, with "
                    "-<recipe> when --recipe is given)")
flags.DEFINE_string("recipe", None, "a named recipe applied after the file and the --config "
                    "flags (stackwise_jax/recipes.py), e.g. progressive: plain progressive "
                    "training instead of the config's recipe")
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
    all_phases = phases.all_phases(cfg)
    print(f"mode: {config_lib.mode_name(cfg)}, {len(all_phases)} phase(s), "
          f"{cfg.data.batch_size * cfg.training.grad_accum_steps * cfg.data.seq_len} "
          "tokens per step")
    for ph in all_phases:
        print(f"  {ph.describe()}; {ph.n_steps} steps")
    width = max(len(k) for k in counts)
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n:>16,d}  ({n / 1e9:.3f}B)")


def _main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    signal.signal(signal.SIGTERM, _terminate)  # until the loop's own guard takes over
    try:
        distributed.initialize_from_env()  # several processes: before any backend starts
        if not FLAGS.config:
            raise UserError("--config is required, e.g. --config=configs/tiny.py")
        cfg = config_lib.load(FLAGS.config, _OVERRIDES)
        if FLAGS.recipe:
            cfg = recipes.apply(cfg, FLAGS.recipe)
        if FLAGS.dry_run:
            dry_run(cfg)
            return
        name = os.path.splitext(os.path.basename(FLAGS.config))[0]
        name += f"-{FLAGS.recipe}" if FLAGS.recipe else ""
        memory_flag = FLAGS.device_memory
        if memory_flag not in ("auto", "none"):
            memory_flag = plan_lib.parse_bytes(memory_flag)
        run(cfg, FLAGS.workdir or os.path.join("runs", name), max_steps=FLAGS.max_steps,
            rebuild_cache=FLAGS.rebuild_cache,
            device_memory=None if memory_flag == "none" else memory_flag)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C before the loop's guard, or Interrupted
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name}); rerun the same command to resume "
              "from the last checkpoint", file=sys.stderr)
        sys.exit(128 + signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _terminate(signum, frame):
    """SIGTERM outside the training loop (loading, compiling, the final evaluation):
    nothing unsaved to lose; stop with a message instead of dying silently."""
    raise Interrupted(signum)


def launch(main_fn, overrides: dict) -> None:
    """Runs an absl main whose command line may hold `--config.KEY=VALUE` flags: those go
    into `overrides` (absl would reject them), the rest to absl."""
    plan_lib.use_whole_accelerator()  # before JAX starts a backend
    try:
        rest, found = config_lib.split_overrides(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    overrides.update(found)
    app.run(main_fn, argv=[sys.argv[0]] + rest)


def main():
    launch(_main, _OVERRIDES)


if __name__ == "__main__":
    main()
