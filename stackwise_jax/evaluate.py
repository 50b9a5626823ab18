"""Held-out evaluation, stack by stack from the stores; the unigram baseline; and the CLI

    python -m stackwise_jax.evaluate --workdir=RUN [--files=GLOB] [--batches=N] [--bound_points=K]

A run is evaluated the way its trunk is assembled: the batches are embedded once per
stream (a mask ratio, or causal), then every stack is read from its store, converted to
the run's resident format (phases.eval_format), applied to all of them and dropped before
the next one. One stack's weights and the streams' hidden states are all that is live, at
any depth. Masks are fixed (EVAL_SEED and the batch index; one uniform draw per position,
masked where it is below the ratio, so the masks of a lower ratio are inside those of a
higher one), so every run and every stage is scored on the same positions.

The CLI writes RUN/eval.json: masked-diffusion loss at the run's eval.mask_ratios, the
masked-diffusion bound on the negative log-likelihood (nll_bound below), causal loss, and
the unigram baseline, on the run's held-out split or on the text of --files.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from stackwise_jax import checkpoint, cli, memory, objective, phases, resident, store
from stackwise_jax.errors import UserError
from stackwise_jax.resident import Template, compute_dtype

EVAL_SEED = 1234
BOUND_POINTS = 8  # Gauss-Legendre nodes: exact for a c(t) polynomial of degree <= 15
CLI_HIDDEN_BYTES = 1 << 30  # the CLI's streams take several passes over the stacks above this
# eval.batches=0 scores every held-out row: the trainer's evaluation then takes them this
# many batches at a time (one pass over the stacks each), so what it holds stays bounded.
EVAL_GROUP_BATCHES = 16


def batches_held(cfg) -> int:
    """Held-out batches whose hidden states the trainer's evaluation holds at once."""
    return cfg.eval.batches or EVAL_GROUP_BATCHES


class Evaluator:
    """Compiled once per run (once per batch shape); `sums` and `losses` evaluate whatever
    the stores hold. layout (sharding.Layout): the mesh the stacks and batches are placed
    on, as in training; None: the default device."""

    def __init__(self, cfg, run_dir: str, heldout_batches, mask_id: int, layout=None):
        self.cfg, self.run_dir, self.mask_id = cfg, run_dir, mask_id
        self.layout = layout
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
            """(CE summed over valid positions, valid positions, sum over sequences of
            CE_b / (t_b L): the inv_t numerator, sequences)."""
            rack = template.rack({}, top)
            ce_B = objective.ce_sums(x_BxLxD, rack.logits, batch["targets"], batch["valid"],
                                     cfg.training.loss_chunk_size)
            B, L = batch["targets"].shape
            return ce_B.sum(), batch["valid"].sum(), (ce_B / (batch["t"] * L)).sum(), B

        self._embed = jax.jit(embed)
        self._run_stack = jax.jit(run_stack, static_argnames=("causal",))
        self._sums = jax.jit(sums)
        # The ratio is traced, not static: one program for every ratio and quadrature point.
        self._prepare = jax.jit(objective.prepare_tokens, static_argnums=(2, 4))

    def _top(self, max_version: int) -> dict:
        groups = [g for g in store.TOP_GROUPS
                  if not (g == "head" and self.cfg.model.tie_embeddings)]
        return {g: resident.load_group(self.run_dir, g, max_version, self.dtype, "evaluation",
                                       self.layout)
                for g in groups}

    def sums(self, n_stacks: int, max_version: int, streams, hidden_bytes: int | None = None,
             progress: bool = False, group_batches: int | None = None) -> dict:
        """{name: {"ce", "tokens", "inv_t", "seqs"}} summed over the batches, through stacks
        0..n_stacks-1 as stored at versions <= max_version. streams: (name, ratio) pairs,
        ratio None for causal next-token loss. hidden_bytes: the batches are taken in
        groups whose hidden states fit it, one pass over the stacks per group; or
        group_batches: groups of that many batches (neither: one pass, all at once)."""
        top = self._top(max_version)
        groups = self._groups(len(streams), hidden_bytes, group_batches)
        fmt = phases.eval_format(self.cfg)
        totals = {name: {"ce": 0.0, "tokens": 0.0, "inv_t": 0.0, "seqs": 0.0}
                  for name, _ in streams}
        bar = tqdm(total=len(groups) * n_stacks, desc="evaluating stack by stack",
                   disable=not progress or None, leave=False)
        for group in groups:
            live = []  # [name, causal, prepared batch, hidden]
            for i in group:
                ids = (jnp.asarray(self.batches[i]) if self.layout is None
                       else self.layout.put_batch(self.batches[i]))
                key = jax.random.fold_in(jax.random.key(EVAL_SEED), i)
                for name, ratio in streams:
                    if ratio is None:
                        batch = self._prepare(key, ids, "causal", (0.0, 0.0), self.mask_id)
                    else:
                        r = jnp.float32(ratio)
                        batch = self._prepare(key, ids, "masked_diffusion", (r, r), self.mask_id)
                    live.append([name, ratio is None, batch, self._embed(top, batch["inputs"])])
            memory.sample()
            for k in range(n_stacks):
                blocks = resident.stack_resident(self.cfg, self.run_dir, k, fmt, max_version,
                                                 "evaluation", self.layout)
                for s in live:
                    s[3] = self._run_stack(top, blocks, s[3], causal=s[1])
                memory.sample()
                del blocks
                bar.update(1)
            for name, _, batch, hidden in live:
                for field, value in zip(("ce", "tokens", "inv_t", "seqs"),
                                        self._sums(top, hidden, batch)):
                    totals[name][field] += float(value)
            del live
        bar.close()
        return totals

    def _groups(self, n_streams: int, hidden_bytes: int | None,
                group_batches: int | None) -> list[range]:
        n = len(self.batches)
        if n == 0:
            return [range(0)]
        if hidden_bytes is not None:
            B, L = self.batches[0].shape
            per_batch = n_streams * B * L * self.cfg.model.d_model * jnp.dtype(self.dtype).itemsize
            size = max(1, hidden_bytes // per_batch)
        else:
            size = group_batches or n
        return [range(i, min(i + size, n)) for i in range(0, n, size)]

    def losses(self, n_stacks: int, max_version: int, ratios=(), causal: bool = False) -> dict:
        """Mean held-out loss over masked tokens at each ratio in `ratios` (keys: the ratio
        as a string) and, with causal=True, next-token loss (key 'causal')."""
        streams = [(str(r), float(r)) for r in ratios] + ([("causal", None)] if causal else [])
        totals = self.sums(n_stacks, max_version, streams, group_batches=batches_held(self.cfg))
        return {name: s["ce"] / max(s["tokens"], 1.0) for name, s in totals.items()}


def unigram_loss(train_rows, heldout_batches, vocab_size: int) -> float:
    """Cross-entropy of add-one unigram frequencies of the training tokens on held-out tokens.

    A model that ignores context can do no better than this at any mask ratio, since which
    positions are masked is independent of the tokens there.
    """
    counts = np.bincount(np.asarray(train_rows).ravel(), minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    held = np.concatenate([np.asarray(b).ravel() for b in heldout_batches])
    return float(-log_p[held].mean())


# ----------------------------------------------------------------- the likelihood bound


def gauss_legendre(k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nodes in (0, 1) and their weights (summing to 1): exact for polynomials of degree
    <= 2k - 1, and never at t = 0, where the 1/t weighting is undefined."""
    x, w = np.polynomial.legendre.leggauss(k)
    return (x + 1.0) / 2.0, w / 2.0


def nll_bound(points_t, weights, inv_t_values) -> float:
    """The masked-diffusion bound, nats per token, by quadrature.

    For masking with probability t (the linear schedule), -log p(x) <= E_{t~U(0,1]}
    [(1/t) sum over masked i of -log p(x_i | x_t)]. Divided by L, its integrand at t is
    E[sum of masked CE | t] / (t L) = c(t), the expected CE of one masked token at ratio t,
    so the bound per token is the integral of c(t) over (0, 1]. Each point's value is
    estimated per sequence as its masked CE sum / (t L) (the 'inv_t' weighting), averaged.
    """
    return float(np.dot(np.asarray(weights), np.asarray(inv_t_values)))


# ----------------------------------------------------------------- what a run has stored


@dataclasses.dataclass
class StoredRun:
    """The latest stored state of a run: the phases that have finished and stored."""

    workdir: str
    cfg: object
    finished: bool
    phases_done: int  # phases that have finished (and stored what they trained)
    n_phases: int
    phase_name: str  # the latest finished phase
    n_stacks: int  # stacks 0..n_stacks-1 ran in it: what its stored top groups go with

    @property
    def version(self) -> int:
        return self.phases_done  # a phase stores version index + 1

    def describe(self) -> str:
        state = ("finished" if self.finished else
                 f"unfinished: {self.phases_done} of {self.n_phases} phases stored, "
                 "evaluating the latest")
        return f"{self.workdir}: {state} ({self.phase_name}, stacks 0..{self.n_stacks - 1})"

    def record(self) -> dict:
        return {"finished": self.finished, "phases_done": self.phases_done,
                "phases": self.n_phases, "phase": self.phase_name, "n_stacks": self.n_stacks,
                "eval_format": phases.eval_format(self.cfg)}


def stored_run(workdir: str) -> StoredRun:
    """What `workdir` has stored; a UserError if it is no run or nothing is stored yet."""
    if not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir}: no such directory")
    cfg = checkpoint.read_config(workdir)  # raises when there is no config.json
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise UserError(f"--workdir={workdir} has no checkpoint yet; train first")
    ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint.max_to_keep, create=False)
    try:
        latest = ckpt.latest_step()
        meta = ckpt.meta(latest) if latest is not None else None
    finally:
        ckpt.close()
    all_phases = phases.all_phases(cfg)
    done = len(all_phases) if meta and meta["done"] else (meta or {}).get("stage", 0)
    if done == 0:
        raise UserError(f"--workdir={workdir}: no phase has finished yet, so nothing is stored "
                        "to evaluate; train until the first stage ends")
    last = all_phases[done - 1]
    # Every stack up to the highest one the phase ran: a cached stage holds no trunk but
    # reads its outputs; block fusion runs frozen stacks above the trained one too.
    ran = last.trained_stacks + last.trunk_stacks + tuple(getattr(last, "upper_stacks", ()))
    n_stacks = 1 + max(ran)
    return StoredRun(workdir, cfg, done == len(all_phases), done, len(all_phases), last.name,
                     n_stacks)


def run_tokenizer(workdir: str):
    from stackwise_jax import data  # deferred: data pulls in grain and tokenizers

    tok_dir = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, data.META)):
        raise UserError(f"--workdir={workdir} has no complete tokenizer/ directory")
    return data.Tokenizer.load(tok_dir)


# ----------------------------------------------------------------------------- the text


def read_text_files(pattern: str, flag: str = "--files") -> list[tuple[str, str]]:
    """(path, text) of every file the glob matches, sorted; strict UTF-8, universal newlines."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not paths:
        raise UserError(f"{flag}='{pattern}' matches no file")
    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise UserError(f"{flag}: cannot read '{path}': {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{flag}: '{path}' is not UTF-8 text (byte {e.start}: "
                            f"{raw[e.start:e.start + 1]!r}); give UTF-8 text files") from None
        out.append((path, text.replace("\r\n", "\n").replace("\r", "\n")))
    return out


def _text_rows(run: StoredRun, files: str | None):
    """(tokenizer, rows_NxL to score, train rows for the unigram, file names, source)."""
    from stackwise_jax import data

    run_tokenizer(run.workdir)  # a clear error before prepare would train a new one
    prepared = data.prepare(run.cfg, run.workdir)  # the run's tokenizer and token cache
    if files is None:
        return (prepared.tokenizer, prepared.heldout_rows, prepared.train_rows,
                [os.path.basename(p) for p in prepared.heldout_files] or ["(tail of each file)"],
                "held-out split")
    texts = read_text_files(files)
    rows = data.pack([t for _, t in texts], prepared.tokenizer, run.cfg.data.seq_len)
    return prepared.tokenizer, rows, prepared.train_rows, [p for p, _ in texts], "files"


# ----------------------------------------------------------------------------- the report


def evaluate_run(workdir: str, files: str | None = None, batches: int | None = None,
                 bound_points: int = BOUND_POINTS, progress: bool = True) -> dict:
    """Scores the run's stored weights; writes and returns RUN/eval.json's content.

    batches: batches of data.batch_size rows, spread over the text (0: every row); default
    the run's eval.batches for its held-out split (the numbers of summary.json), every row
    for --files.
    """
    from stackwise_jax import data

    if batches is not None and batches < 0:
        raise UserError(f"--batches={batches} must be >= 0 (0: every row)")
    if bound_points < 1:
        raise UserError(f"--bound_points={bound_points} must be >= 1")
    run = stored_run(workdir)
    cfg = run.cfg
    tokenizer, rows, train_rows, names, source = _text_rows(run, files)
    if batches is None:
        batches = cfg.eval.batches if files is None else 0
    scored = data.heldout_batches(rows, cfg.data.batch_size, batches)

    ratios = [float(r) for r in cfg.eval.mask_ratios]
    nodes, weights = gauss_legendre(bound_points)
    streams = ([(f"ratio:{r}", r) for r in ratios] + [(f"bound:{j}", float(t))
                                                     for j, t in enumerate(nodes)]
               + [("causal", None)])
    evaluator = Evaluator(cfg, workdir, scored, tokenizer.mask_id)
    totals = evaluator.sums(run.n_stacks, run.version, streams, CLI_HIDDEN_BYTES, progress)

    def mean(name):
        return totals[name]["ce"] / max(totals[name]["tokens"], 1.0)

    points = [{"t": float(t), "weight": float(w),
               "inv_t": totals[f"bound:{j}"]["inv_t"] / totals[f"bound:{j}"]["seqs"],
               "masked_ce": mean(f"bound:{j}")}
              for j, (t, w) in enumerate(zip(nodes, weights))]
    n_scored = int(sum(b.size for b in scored))
    report = {
        "workdir": os.path.abspath(workdir),
        "run": run.record(),
        "text": {"source": source, "files": names, "seq_len": cfg.data.seq_len,
                 "batch_size": cfg.data.batch_size, "batches": len(scored),
                 "rows_scored": int(sum(len(b) for b in scored)), "rows_total": int(len(rows)),
                 "tokens_scored": n_scored, "tokens_total": int(np.prod(rows.shape))},
        "masked_diffusion_loss": {str(r): mean(f"ratio:{r}") for r in ratios},
        "nll_bound": {
            "nats_per_token": nll_bound(nodes, weights, [p["inv_t"] for p in points]),
            # The same integral from each point's mean CE per masked token: the realised
            # number of masked tokens is divided out, so less variance from the fixed masks.
            "nats_per_token_self_normalized": nll_bound(nodes, weights,
                                                        [p["masked_ce"] for p in points]),
            "rule": f"{bound_points}-point Gauss-Legendre on (0, 1]",
            "estimator": "per point: mean over sequences of (masked CE sum) / (t L); fixed "
                         "masks", "points": points},
        "causal_loss": mean("causal"),
        "unigram_loss": unigram_loss(train_rows, scored, cfg.model.vocab_size),
        "mask_seed": EVAL_SEED,
    }
    checkpoint.atomic_write_text(os.path.join(workdir, "eval.json"),
                                 json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    run, text = report["run"], report["text"]
    state = ("finished" if run["finished"] else
             f"UNFINISHED ({run['phases_done']} of {run['phases']} phases stored)")
    lines = [f"{report['workdir']}: {state}; {run['phase']}, stacks 0..{run['n_stacks'] - 1} "
             f"in {run['eval_format']}",
             f"text: {text['source']}: {', '.join(text['files'])}",
             f"scored: {text['tokens_scored']:,} of {text['tokens_total']:,} tokens "
             f"({text['rows_scored']} of {text['rows_total']} rows of {text['seq_len']})",
             ""]
    rows = [(f"masked diffusion, t = {r}", v) for r, v in report["masked_diffusion_loss"].items()]
    bound = report["nll_bound"]
    rows += [(f"NLL bound ({bound['rule']})", bound["nats_per_token"]),
             ("  the same, self-normalized per point", bound["nats_per_token_self_normalized"]),
             ("causal (next token, causal attention)", report["causal_loss"]),
             ("unigram baseline (add-one, train split)", report["unigram_loss"])]
    width = max(len(name) for name, _ in rows) + 2
    lines += [f"  {'nats per token':<{width}}{'loss':>7}"]
    lines += [f"  {name:<{width}}{value:>7.3f}" for name, value in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI


def main():
    # Flags are defined here, not at import: train.py (which imports this module) has its own.
    from absl import flags

    flags.DEFINE_string("workdir", None, "run directory to evaluate (finished or not: its "
                        "latest stored phase is scored)")
    flags.DEFINE_string("files", None, "glob of UTF-8 text files to score instead of the run's "
                        "held-out split (tokenized with the run's tokenizer, packed into rows)")
    flags.DEFINE_integer("batches", None, "batches of data.batch_size rows, spread evenly over "
                         "the text; 0: every row (default: the run's eval.batches for the "
                         "held-out split, every row for --files)")
    flags.DEFINE_integer("bound_points", BOUND_POINTS, "Gauss-Legendre points of the NLL "
                         "bound's quadrature over t in (0, 1]")

    def body(FLAGS):
        report = evaluate_run(FLAGS.workdir, FLAGS.files, FLAGS.batches, FLAGS.bound_points)
        print(format_report(report))
        print(f"\nwrote {os.path.join(FLAGS.workdir, 'eval.json')}")

    cli.run(body, required=("workdir",))


if __name__ == "__main__":
    main()
