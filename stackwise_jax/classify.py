"""Text classification with a run's model, three ways on the same split:

    python -m stackwise_jax.classify --workdir=RUN --train=A.jsonl --test=B.jsonl
        [--finetune_steps=N] [--finetune_lr=LR] [--seed=S]

Each line of A.jsonl / B.jsonl is {"text": ..., "label": ...}; labels are strings (integers
are read as their decimal strings), numbered in sorted order.

Features: each text is tokenized with the run's tokenizer (no eos), truncated to
data.seq_len and run through the Rack bidirectionally, as it was trained; the final-norm
hidden states are mean-pooled over the text's own positions. model.py has no attention
mask (attention takes only a causal flag), so padding cannot be hidden from attention.
Texts are padded with [MASK] instead: the model was trained on inputs where 15-90% of the
positions are [MASK], so a text followed by [MASK]s reads as a text whose continuation is
unknown, an input like those it has seen, where an eos or an arbitrary id would not be.
Every text, train and test, is padded to the same length (the longest text of the two
files, rounded up to a multiple of 8, at most seq_len), so the pads change all features
alike. The weights are the latest stored phase's (as the evaluator scores:
evaluate.stored_run), in float32 as stored (a quantized frozen_precision is not applied),
the whole model at once: this is for models that fit in memory.

(a) Linear probe: multinomial logistic regression on the pooled features standardized
    with the training set's mean and deviation, mean cross-entropy + l2 / 2 * |W|^2 (bias
    not penalized), PROBE_ITERS full-batch L-BFGS iterations from zero; l2 is chosen from
    PROBE_L2_GRID by 5-fold cross-validation on the training set, then refit on all of it.
(b) Fine-tune: every parameter the features depend on (embedding, stacks, final norm; the
    LM head plays no part) plus a linear head (zero-initialized) on the pooled features,
    scaled by the training features' fixed mean and deviation as the probe's are,
    AdamW with warmup and cosine decay, the head at HEAD_LR_SCALE times the model's rate
    (it starts from nothing), batches of FT_BATCH shuffled with --seed.
(c) Majority class: the most frequent training label, predicted for every test text.

Prints a table and writes RUN/classify.json (atomically).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from stackwise_jax import checkpoint, cli, evaluate, resident, store
from stackwise_jax.errors import UserError
from stackwise_jax.resident import Template

PROBE_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
PROBE_FOLDS = 5
PROBE_ITERS = 100
FT_BATCH = 16
FT_LR = 1e-4
FT_WEIGHT_DECAY = 0.01
HEAD_LR_SCALE = 10.0
FEATURE_BATCH = 32

# ------------------------------------------------------------------------------ examples


def read_examples(path: str, flag: str) -> list[tuple[str, str]]:
    """(text, label) of each non-blank line; errors name the file and line."""
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except OSError as e:
        raise UserError(f"{flag}: cannot read '{path}': {e.strerror}") from None
    out = []
    for n, raw in enumerate(raw_lines, start=1):
        where = f"{flag}: {path}:{n}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8") from None
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg}, column {e.colno}); each line must be "
                            '{"text": ..., "label": ...}') from None
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            raise UserError(f'{where}: needs a JSON object with "text" and "label" keys')
        text, label = obj["text"], obj["label"]
        if not isinstance(text, str):
            raise UserError(f'{where}: "text" must be a string')
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise UserError(f'{where}: "label" must be a string (or an integer)')
        out.append((text, str(label)))
    if not out:
        raise UserError(f"{flag}: '{path}' holds no examples")
    return out


def label_ids(train, test, train_path: str, test_path: str):
    """(labels sorted, y_train, y_test); every test label must occur in training."""
    labels = sorted({lab for _, lab in train})
    if len(labels) < 2:
        raise UserError(f"--train: '{train_path}' has {len(labels)} class ({labels[0]!r}); "
                        "a classifier needs at least 2")
    index = {lab: i for i, lab in enumerate(labels)}
    unseen = sorted({lab for _, lab in test} - set(labels))
    if unseen:
        raise UserError(f"--test: '{test_path}' has labels that --train lacks: "
                        f"{', '.join(map(repr, unseen[:5]))}")
    return (labels, np.asarray([index[lab] for _, lab in train], np.int32),
            np.asarray([index[lab] for _, lab in test], np.int32))


def tokenize(tokenizer, texts: list[str], seq_len: int) -> tuple[list[np.ndarray], int]:
    """Ids of each text, truncated to seq_len; and how many were truncated."""
    ids = tokenizer.encode_batch(texts)
    return [x[:seq_len] for x in ids], sum(len(x) > seq_len for x in ids)


def pad(ids: list[np.ndarray], length: int, mask_id: int):
    """(ids_NxL padded with [MASK], real_NxL: each text's own positions)."""
    ids_NxL = np.full((len(ids), length), mask_id, np.int32)
    real_NxL = np.zeros((len(ids), length), bool)
    for i, x in enumerate(ids):
        ids_NxL[i, :len(x)] = x
        real_NxL[i, :len(x)] = True
    return ids_NxL, real_NxL

# ------------------------------------------------------------------------------ the model


def load_params(run: evaluate.StoredRun) -> dict:
    """What the pooled features need, float32, from the latest stored phase."""
    why = "classification"
    params = {g: resident.load_group(run.workdir, g, run.version, jnp.float32, why)
              for g in ("embed", "final_norm")}
    params["stacks"] = {k: resident.load_group(run.workdir, store.stack_group(k), run.version,
                                               jnp.float32, why) for k in range(run.n_stacks)}
    return params


def make_pooled(model_cfg, n_stacks: int):
    """pooled(params, ids_BxL, real_BxL) -> B x D: mean final-norm state of the real positions."""
    template = Template(model_cfg, n_stacks)

    def pooled(params, ids_BxL, real_BxL):
        rack = template.rack({}, params)
        x_BxLxD = rack.run_stacks(rack.embed(ids_BxL), 0, n_stacks, "bidirectional")
        h_BxLxD = rack.final_norm(x_BxLxD).astype(jnp.float32)
        w_BxLx1 = real_BxL.astype(jnp.float32)[..., None]
        return (h_BxLxD * w_BxLx1).sum(axis=1) / jnp.maximum(w_BxLx1.sum(axis=1), 1.0)

    return pooled


def features(pooled_jit, params, ids_NxL, real_NxL, desc: str, progress: bool) -> np.ndarray:
    """N x D pooled features, FEATURE_BATCH rows at a time (the last batch padded: one shape)."""
    n, out = len(ids_NxL), []
    for s in tqdm(range(0, n, FEATURE_BATCH), desc=desc, disable=not progress or None,
                  leave=False):
        ids, real = ids_NxL[s:s + FEATURE_BATCH], real_NxL[s:s + FEATURE_BATCH]
        pad = FEATURE_BATCH - len(ids)
        if pad:
            ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
            real = np.concatenate([real, np.repeat(real[:1], pad, 0)])
        out.append(np.asarray(pooled_jit(params, ids, real))[:FEATURE_BATCH - pad])
    return np.concatenate(out)

# ----------------------------------------------------------------------- the classifiers


def _ce_each(logits_NxC, y_N):
    return (jax.nn.logsumexp(logits_NxC, axis=-1)
            - jnp.take_along_axis(logits_NxC, y_N[:, None], axis=-1)[:, 0])


def standardize(x_train):
    """(mean, deviation) of the training features: the probe's and the fine-tune head's input
    scale. Pooled states vary little between texts (deviations ~1e-2), so unscaled they
    would need a head with large weights."""
    return x_train.mean(0), x_train.std(0) + 1e-6


def linear_probe(x_train, y_train, x_test, y_test, n_classes: int, seed: int) -> dict:
    """L2 chosen from PROBE_L2_GRID by PROBE_FOLDS-fold cross-validated accuracy on the
    training set (folds drawn with `seed`; a tie goes to the larger penalty), then refit
    on the whole training set."""
    mu, sd = standardize(x_train)
    z_train = jnp.asarray((x_train - mu) / sd)
    z_test = jnp.asarray((x_test - mu) / sd)
    y = jnp.asarray(y_train)

    def loss(p, z, labels, weight_N, l2):
        ce_N = _ce_each(z @ p["w"] + p["b"], labels)
        return (ce_N * weight_N).sum() / weight_N.sum() + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def solve(z, labels, weight_N, l2):
        """One program for every fit (folds are 0/1 weights, not subsets: one shape), the
        whole L-BFGS loop inside it."""
        opt = optax.lbfgs()
        f = lambda p: loss(p, z, labels, weight_N, l2)  # noqa: E731
        value_and_grad = optax.value_and_grad_from_state(f)

        def body(_, carry):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=f)
            return optax.apply_updates(p, updates), state

        p = {"w": jnp.zeros((z.shape[1], n_classes)), "b": jnp.zeros((n_classes,))}
        return jax.lax.fori_loop(0, PROBE_ITERS, body, (p, opt.init(p)))[0]

    def predict(p, z):
        return np.asarray(jnp.argmax(z @ p["w"] + p["b"], -1))

    n = len(y_train)
    k = min(PROBE_FOLDS, n)
    fold_N = np.random.default_rng(seed).permutation(n) % k
    cv = {}
    for l2 in PROBE_L2_GRID:
        right = 0
        for f in range(k):
            p = solve(z_train, y, jnp.asarray(fold_N != f, jnp.float32), l2)
            right += int((predict(p, z_train)[fold_N == f] == y_train[fold_N == f]).sum())
        cv[l2] = right / n
    best = max(PROBE_L2_GRID, key=lambda l2: (cv[l2], l2))
    ones = jnp.ones((n,), jnp.float32)
    p = solve(z_train, y, ones, best)
    return {"accuracy": float(np.mean(predict(p, z_test) == y_test)),
            "train_accuracy": float(np.mean(predict(p, z_train) == y_train)),
            "train_loss": float(loss(p, z_train, y, ones, best)), "l2": best,
            "cv_accuracy": {f"{l2:g}": acc for l2, acc in cv.items()}, "folds": k,
            "iterations": PROBE_ITERS,
            "objective": "mean cross-entropy + l2 / 2 * |W|^2 (bias not penalized)",
            "optimizer": "L-BFGS (optax.lbfgs), full batch, from zero"}


def finetune(pooled, pooled_jit, params, train, test, scale, n_classes: int, steps: int,
             seed: int, lr: float, progress: bool) -> dict:
    """train, test: (ids_NxL, real_NxL, y_N). Every parameter of `params` and a linear head
    on (pooled - mean) / deviation, scale = (mean, deviation) fixed from the untuned model.
    pooled_jit: jax.jit(pooled), already compiled for the features: reused for the test."""
    mu, sd = (jnp.asarray(v) for v in scale)
    ids_tr, real_tr, y_tr = train
    d_model = params["final_norm"]["weight"].shape[0]
    theta = {"model": params, "head": {"w": jnp.zeros((d_model, n_classes)),
                                       "b": jnp.zeros((n_classes,))}}

    def adamw(peak):
        sched = optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 10), steps)
        return optax.adamw(sched, weight_decay=FT_WEIGHT_DECAY)

    labels = {"model": jax.tree.map(lambda _: "model", params), "head": {"w": "head", "b": "head"}}
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.multi_transform({"model": adamw(lr),
                                            "head": adamw(lr * HEAD_LR_SCALE)}, labels))

    def logits(theta, ids, real):
        z = (pooled(theta["model"], ids, real) - mu) / sd
        return z @ theta["head"]["w"] + theta["head"]["b"]

    @jax.jit
    def step(theta, opt_state, ids, real, y):
        loss, grads = jax.value_and_grad(lambda th: _ce_each(logits(th, ids, real), y).mean())(theta)
        updates, opt_state = tx.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, loss

    opt_state = tx.init(theta)
    batch = min(FT_BATCH, len(y_tr))
    rng = np.random.default_rng(seed)
    order, pos, losses = rng.permutation(len(y_tr)), 0, []
    for _ in tqdm(range(steps), desc="fine-tuning", disable=not progress or None, leave=False):
        if pos + batch > len(order):  # a new shuffle each epoch; every batch full (one shape)
            order, pos = rng.permutation(len(y_tr)), 0
        idx = order[pos:pos + batch]
        pos += batch
        theta, opt_state, loss = step(theta, opt_state, ids_tr[idx], real_tr[idx], y_tr[idx])
        losses.append(float(loss))

    ids_te, real_te, y_te = test
    x_te = features(pooled_jit, theta["model"], ids_te, real_te, "features (tuned)", progress)
    z_te = (x_te - np.asarray(mu)) / np.asarray(sd)
    predicted = np.argmax(z_te @ np.asarray(theta["head"]["w"]) + np.asarray(theta["head"]["b"]),
                          axis=-1)
    tail = losses[-max(1, steps // 10):]
    return {"accuracy": float(np.mean(predicted == y_te)), "steps": steps,
            "batch_size": batch, "lr": lr, "head_lr": lr * HEAD_LR_SCALE,
            "weight_decay": FT_WEIGHT_DECAY, "seed": seed,
            "train_loss_last_10pct": float(np.mean(tail)),
            "optimizer": "AdamW, warmup 10% then cosine decay, grad clip 1.0"}

# ----------------------------------------------------------------------------- the report


def classify_run(workdir: str, train_path: str, test_path: str, finetune_steps: int = 100,
                 seed: int = 0, lr: float = FT_LR, progress: bool = True) -> dict:
    if finetune_steps < 0:
        raise UserError(f"--finetune_steps={finetune_steps} must be >= 0 (0: no fine-tune)")
    if not lr > 0:
        raise UserError(f"--finetune_lr={lr} must be > 0")
    train = read_examples(train_path, "--train")
    test = read_examples(test_path, "--test")
    labels, y_train, y_test = label_ids(train, test, train_path, test_path)
    run = evaluate.stored_run(workdir)
    tokenizer = evaluate.run_tokenizer(workdir)
    seq_len = run.cfg.data.seq_len
    tok_tr, cut_tr = tokenize(tokenizer, [t for t, _ in train], seq_len)
    tok_te, cut_te = tokenize(tokenizer, [t for t, _ in test], seq_len)
    # One padded length for all: the longest text, rounded up to a multiple of 8.
    length = min(seq_len, -(-max(len(x) for x in tok_tr + tok_te) // 8) * 8)
    ids_tr, real_tr = pad(tok_tr, max(length, 1), tokenizer.mask_id)
    ids_te, real_te = pad(tok_te, max(length, 1), tokenizer.mask_id)

    params = load_params(run)
    pooled = make_pooled(run.cfg.model, run.n_stacks)
    pooled_jit = jax.jit(pooled)
    x_train = features(pooled_jit, params, ids_tr, real_tr, "features (train)", progress)
    x_test = features(pooled_jit, params, ids_te, real_te, "features (test)", progress)
    probe = linear_probe(x_train, y_train, x_test, y_test, len(labels), seed)
    tuned = None
    if finetune_steps:
        tuned = finetune(pooled, pooled_jit, params, (ids_tr, real_tr, y_train),
                         (ids_te, real_te, y_test), standardize(x_train), len(labels),
                         finetune_steps, seed, lr, progress)
    majority = int(np.bincount(y_train, minlength=len(labels)).argmax())

    def counts(y):
        return {lab: int(n) for lab, n in zip(labels, np.bincount(y, minlength=len(labels)))}

    report = {
        "workdir": os.path.abspath(workdir),
        "run": run.record(),
        "train": {"file": os.path.abspath(train_path), "examples": len(train),
                  "per_label": counts(y_train), "truncated": cut_tr},
        "test": {"file": os.path.abspath(test_path), "examples": len(test),
                 "per_label": counts(y_test), "truncated": cut_te},
        "labels": labels,
        "features": {"seq_len": seq_len, "padded_length": int(ids_tr.shape[1]),
                     "padding": "[MASK] (no attention mask in model.py)",
                     "pooling": "mean of final-norm states over the text's positions",
                     "attention": "bidirectional", "dim": int(x_train.shape[1])},
        "linear_probe": probe,
        "finetune": tuned,
        "majority": {"label": labels[majority],
                     "accuracy": float(np.mean(y_test == majority))},
    }
    checkpoint.atomic_write_text(os.path.join(workdir, "classify.json"),
                                 json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    run, tr, te = report["run"], report["train"], report["test"]
    state = ("finished" if run["finished"] else
             f"UNFINISHED ({run['phases_done']} of {run['phases']} phases stored)")
    cut = tr["truncated"] + te["truncated"]
    lines = [f"{report['workdir']}: {state}; {run['phase']}, stacks 0..{run['n_stacks'] - 1}",
             f"{len(report['labels'])} labels; train {tr['examples']} {tr['per_label']}, "
             f"test {te['examples']} {te['per_label']}"
             + (f"; {cut} texts truncated to {report['features']['seq_len']} tokens" if cut
                else ""), ""]
    p, f = report["linear_probe"], report["finetune"]
    rows = [(f"linear probe (L-BFGS, l2 {p['l2']:g} by {p['folds']}-fold CV)", p["accuracy"])]
    if f is not None:
        rows.append((f"fine-tune ({f['steps']} AdamW steps, lr {f['lr']:g})", f["accuracy"]))
    rows.append((f"majority class ({report['majority']['label']!r})",
                 report["majority"]["accuracy"]))
    width = max(len(name) for name, _ in rows) + 2
    lines.append(f"  {'test accuracy':<{width}}")
    lines += [f"  {name:<{width}}{acc:>7.3f}" for name, acc in rows]
    return "\n".join(lines)

# ------------------------------------------------------------------------------- CLI


def main():
    from absl import flags

    flags.DEFINE_string("workdir", None, "run directory (its latest stored phase is used)")
    flags.DEFINE_string("train", None, 'JSONL of {"text": ..., "label": ...}: training examples')
    flags.DEFINE_string("test", None, "JSONL of the same form: test examples")
    flags.DEFINE_integer("finetune_steps", 100, f"AdamW steps of the full fine-tune (batches "
                         f"of {FT_BATCH}); 0: skip it")
    flags.DEFINE_float("finetune_lr", FT_LR, f"peak learning rate of the model's parameters in "
                       f"the fine-tune (the new head: {HEAD_LR_SCALE:g}x)")
    flags.DEFINE_integer("seed", 0, "seed of the probe's cross-validation folds and the "
                         "fine-tune's batch order")

    def body(FLAGS):
        report = classify_run(FLAGS.workdir, FLAGS.train, FLAGS.test, FLAGS.finetune_steps,
                              FLAGS.seed, FLAGS.finetune_lr)
        print(format_report(report))
        print(f"\nwrote {os.path.join(FLAGS.workdir, 'classify.json')}")

    cli.run(body, required=("workdir", "train", "test"))


if __name__ == "__main__":
    main()
