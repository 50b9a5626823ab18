"""Sweeps: one config, the cross product of grid values and seeds, one run directory each.

python -m stackwise_jax.sweep --config=configs/tiny.py --workdir=runs/lr \\
    --grid=training.learning_rate=0.003,0.001 [--grid=recipe=progressive,e2e] \\
    [--seeds=3] [--config.KEY=VALUE ...]

--config: the config file every run starts from. --workdir (required): the sweep directory;
each run gets WORKDIR/<slug>, e.g. WORKDIR/training.learning_rate=0.001,seed=1.
A grid key is any config key (stackwise_jax/config.py: defaults()) or `recipe`, whose
values name recipes in stackwise_jax/recipes.py. Each run's config is: the file, then the
--config.KEY=VALUE flags (they apply to every run), then its grid values; then its recipe,
computed from that config (it keeps its token budget) and applied last, so the keys it sets
win (a note names any flag or grid value it replaces); then its seed. --seeds=N runs
training.seed, training.seed+1, ... (parameter init, masks): data.seed stays as configured,
so data order and held-out text are the same in every run. Runs go seed by seed, so a
stopped sweep has whole passes.

Every run's config is built and validated before the first run starts (bad input: one
`error:` line, exit 2). Runs train in this process through train.run, which resumes from
a run's checkpoints and returns at once for a finished one: rerunning the same command
finishes only what is missing. A run that fails with a UserError is reported and the sweep
goes on (exit 1 at the end). At the end WORKDIR holds results.csv (one row per run),
results.md (mean and sample std over seeds per setting) and the plots of report.py.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import hashlib
import io
import itertools
import json
import os
import re
import statistics
import sys
import time

from absl import flags, logging

from stackwise_jax import checkpoint, data, recipes, report, train
from stackwise_jax import config as config_lib
from stackwise_jax.errors import UserError

RECIPE = "recipe"  # the pseudo grid key
_MAX_SLUG = 150  # characters of a run directory's name; longer ones end in a hash


@dataclasses.dataclass
class Run:
    """One run of a sweep: its grid values, seed, validated config and directory."""

    setting: tuple[tuple[str, str], ...]  # (grid key, value as given), in grid order
    seed: int  # its training.seed
    cfg: object
    workdir: str

    @property
    def slug(self) -> str:
        return os.path.basename(self.workdir)

    @property
    def label(self) -> str:
        """The setting without the seed: runs with the same label are repeats."""
        return ",".join(f"{k}={v}" for k, v in self.setting) or "base"


def plot_labels(runs: list[Run]) -> dict[str, str]:
    """Run.label -> a shorter name for legends: a recipe's name, a key's last part
    (the whole key where two grid keys share a last part)."""
    keys = [k for k, _ in runs[0].setting] if runs else []
    leaves = [k.rpartition(".")[2] for k in keys]
    short = {k: (None if k == RECIPE else leaf if leaves.count(leaf) == 1 else k)
             for k, leaf in zip(keys, leaves)}
    return {r.label: ", ".join(v if short[k] is None else f"{short[k]}={v}" for k, v in r.setting)
            or "base" for r in runs}


# ------------------------------------------------------------------------- the grid


def _split_values(text: str) -> list[str]:
    """Splits on commas outside brackets and quotes, so tuple values like (0.15,0.5) survive."""
    items, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += ch
    return items + [current.strip()]


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """['KEY=V1,V2', ...] -> {KEY: [V1, V2]}, keys in the order given."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UserError(f"--grid={spec!r}: expected KEY=V1,V2,..., e.g. "
                            "--grid=training.learning_rate=0.003,0.001 or --grid=recipe=e2e,progressive")
        if key in grid:
            raise UserError(f"--grid={key} is given twice; list all its values in one --grid flag")
        grid[key] = _split_values(values)
    return grid


def _unknown_grid_key(key: str, known) -> UserError:
    close = difflib.get_close_matches(key, [*known, RECIPE], n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    section = key.rpartition(".")[0]
    siblings = sorted(k for k in known if k.rpartition(".")[0] == section)
    listing = (f" Keys under {section}: {', '.join(siblings)}" if siblings else
               f" A grid key is a config key (stackwise_jax/config.py: defaults()) or '{RECIPE}'")
    return UserError(f"--grid={key}: unknown key '{key}'.{hint}{listing}")


def _check_grid(grid: dict[str, list[str]]) -> None:
    known = config_lib._flat(config_lib.defaults())
    for key, values in grid.items():
        if key != RECIPE and key not in known:
            raise _unknown_grid_key(key, known)
        if not values or any(v == "" for v in values):
            raise UserError(f"--grid={key}={','.join(values)}: a value is empty")
        if len(set(values)) < len(values):
            raise UserError(f"--grid={key}={','.join(values)}: a value is repeated")
        if key == RECIPE:
            for name in values:
                if name not in recipes.RECIPES:
                    raise UserError(f"--grid=recipe={name}: unknown recipe '{name}'; known "
                                    f"recipes: {', '.join(recipes.RECIPES)} (stackwise_jax/recipes.py)")


def _slug(setting, seed: int | None) -> str:
    parts = [f"{k}={v}" for k, v in setting] + ([f"seed={seed}"] if seed is not None else [])
    slug = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts) or "base")
    if len(slug) > _MAX_SLUG:  # keep it readable, and unique through a hash of the whole
        slug = slug[:_MAX_SLUG - 9] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:8]
    return slug


def _apply(cfg, overrides: dict[str, str], source: str) -> None:
    for key, raw in overrides.items():
        try:
            config_lib.set_override(cfg, key, str(raw))
        except UserError as e:  # its message starts '--config.KEY': say where KEY came from
            if source == "--config":
                raise
            raise UserError(f"{source}: {str(e).removeprefix('--config.')}") from None


def _apply_recipe(cfg, name: str, given: dict[str, str], notes: set) -> None:
    """Applies recipe `name`, computed from `cfg` as the flags and grid left it (its token
    budget comes from there), so the keys it sets win; notes the `given` flags it replaces."""
    changes = recipes.overrides(name, cfg)
    before = config_lib._flat(cfg)
    _apply(cfg, changes, f"recipe '{name}'")
    after = config_lib._flat(cfg)
    for key in sorted(set(changes) & set(given)):
        if after[key] != before[key]:
            notes.add(f"recipe '{name}' sets {key}={after[key]!r}, replacing {given[key]}")


def plan(config, workdir: str, grid: dict[str, list], seeds: int = 1,
         overrides: dict[str, str] | None = None) -> list[Run]:
    """Every run of the sweep, its config built and validated; writes nothing.

    config: a config file path or a ConfigDict. grid: {key: [values]} (values as strings,
    as on the command line, or numbers). Raises UserError for any bad input.
    """
    if not workdir:
        raise UserError("--workdir is required: the sweep directory, e.g. --workdir=runs/lr_sweep")
    grid = {k: [str(v) for v in vs] for k, vs in grid.items()}
    overrides = {k: str(v) for k, v in (overrides or {}).items()}
    _check_grid(grid)
    if not isinstance(seeds, int) or seeds < 1:
        raise UserError(f"--seeds={seeds!r} must be a positive integer")
    both = sorted(set(grid) & set(overrides))
    if both:
        raise UserError(f"{both[0]} is set by both --grid and --config.{both[0]}; drop one")
    seed_swept = "training.seed" in grid
    if seed_swept and seeds > 1:
        raise UserError("--grid=training.seed and --seeds > 1 both set the seed; use one")
    if isinstance(config, (str, os.PathLike)):
        base = config_lib.load(os.fspath(config))
    else:
        base = copy.deepcopy(config)

    runs, seen, notes = [], {}, set()
    for offset in range(seeds):  # seed-major: a stopped sweep has whole passes
        for values in itertools.product(*grid.values()):
            setting = tuple(zip(grid, values))
            named = dict(setting)
            cfg = copy.deepcopy(base)
            _apply(cfg, overrides, "--config")
            _apply(cfg, {k: v for k, v in named.items() if k != RECIPE}, "--grid")
            if RECIPE in named:
                given = {**{k: f"--config.{k}={v}" for k, v in overrides.items()},
                         **{k: f"--grid={k}={v}" for k, v in named.items()}}
                _apply_recipe(cfg, named[RECIPE], given, notes)
            if not seed_swept:
                cfg.training.seed += offset  # from the file, or --config.training.seed
            slug = _slug(setting, None if seed_swept else cfg.training.seed)
            try:
                config_lib.validate(cfg)
            except UserError as e:
                raise UserError(f"run {slug}: {e}") from None
            if slug in seen:
                raise UserError(f"--grid: settings {seen[slug]!r} and {named!r} give the same "
                                f"directory name '{slug}'; make the values differ in letters "
                                "or digits")
            seen[slug] = named
            runs.append(Run(setting, cfg.training.seed, cfg, os.path.join(workdir, slug)))
    for note in sorted(notes):
        print(f"note: {note}")
    for r in runs:
        try:  # a run directory holding another config would fail mid-sweep: refuse now
            checkpoint.check_workdir(r.workdir, r.cfg)
        except UserError as e:
            raise UserError(f"run {r.slug}: {e}") from None
    for files in {(r.cfg.data.files, r.cfg.data.heldout_files): r.cfg.data for r in runs}.values():
        data.corpus_files(files)  # a bad glob stops the sweep, not each run
    return runs


# --------------------------------------------------------------------------- running


def _losses_line(summary: dict) -> str:
    held = summary.get("heldout_loss") or {}
    ratios = sorted(held, key=float)
    line = f"held-out loss t={'/'.join(ratios)}: {'/'.join(f'{held[r]:.3f}' for r in ratios)}"
    if summary.get("heldout_causal_loss") is not None:
        line += f", causal {summary['heldout_causal_loss']:.3f}"
    return line


def run(config, workdir: str, grid: dict[str, list], seeds: int = 1,
        overrides: dict[str, str] | None = None, progress: bool = True) -> list[dict]:
    """Runs (or finishes) the sweep; returns the rows of results.csv (key 'status' is
    'finished', 'failed' or 'unfinished'). Raises UserError before any run for bad input."""
    runs = plan(config, workdir, grid, seeds, overrides)
    os.makedirs(workdir, exist_ok=True)
    failed: dict[str, str] = {}
    print(f"sweep {workdir}: {len(runs)} runs", flush=True)
    for k, r in enumerate(runs, 1):
        head = f"[{k}/{len(runs)}] {r.slug}"
        finished_before = os.path.exists(os.path.join(r.workdir, "summary.json"))
        start = time.perf_counter()
        try:
            summary = train.run(r.cfg, r.workdir, progress=progress)
        except UserError as e:
            failed[r.slug] = str(e)
            print(f"{head}: FAILED: {e}", flush=True)
            continue
        how = ("skipped (finished earlier)" if finished_before
               else f"finished in {time.perf_counter() - start:.0f} s")
        print(f"{head}: {how}; {_losses_line(summary)}", flush=True)
    rows = write_results(runs, workdir, failed)
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed:", file=sys.stderr)
        for slug, why in failed.items():
            print(f"  {slug}: {why}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------- results


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _ratios(runs: list[Run], summaries: list[dict | None]) -> list[str]:
    found = {str(float(t)) for r in runs for t in r.cfg.eval.mask_ratios}
    found |= {k for s in summaries if s for k in s.get("heldout_loss", {})}
    return sorted(found, key=float)


def _stage_max(summary: dict, key: str):
    values = [s[key] for s in summary.get("stages", []) if s.get(key) is not None]
    return max(values) if values else ""


def result_rows(runs: list[Run], failed: dict[str, str] | None = None) -> list[dict]:
    """One row per run, from its summary.json (empty cells where the run or a key is missing)."""
    failed = failed or {}
    summaries = [_read_json(os.path.join(r.workdir, "summary.json")) for r in runs]
    ratios = _ratios(runs, summaries)
    rows = []
    for r, s in zip(runs, summaries):
        status = "finished" if s else "failed" if r.slug in failed else "unfinished"
        s = s or {}
        row = {**dict(r.setting), "seed": r.seed, "status": status}
        for t in ratios:
            row[f"heldout_loss_t{t}"] = s.get("heldout_loss", {}).get(t, "")
        for key in ("heldout_causal_loss", "unigram_loss", "heldout_tokens_scored",
                    "tokens_seen", "wall_s"):
            row[key] = s.get(key, "")
        for key in ("peak_live_bytes", "peak_rss_bytes", "trainable_params"):
            row[key] = _stage_max(s, key)
        row["mode"] = s.get("mode", config_lib.mode_name(r.cfg))
        row["workdir"] = r.workdir
        rows.append(row)
    return rows


def _csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _mean_std(values: list, digits: int, thousands: bool = False) -> str:
    values = [float(v) for v in values if v != ""]
    if not values:
        return "–"
    fmt = f"{{:{',' if thousands else ''}.{digits}f}}"
    text = fmt.format(statistics.mean(values))
    if len(values) > 1:
        text += " ± " + fmt.format(statistics.stdev(values))
    return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _markdown(runs: list[Run], rows: list[dict], workdir: str, plots: list[str]) -> str:
    keys = [k for k, _ in runs[0].setting]
    loss_cols = [c for c in rows[0] if c.startswith("heldout_loss_t")]
    metrics = ([(c, f"t={c[len('heldout_loss_t'):]}", 3, False) for c in loss_cols]
               + [("heldout_causal_loss", "causal", 3, False), ("unigram_loss", "unigram", 3, False),
                  ("tokens_seen", "tokens", 0, True), ("wall_s", "wall (s)", 1, False)])
    seeds = sorted({r.seed for r in runs})
    n_settings = len({r.label for r in runs})
    lines = [f"# Sweep {workdir}", "",
             f"{len(runs)} runs: {_plural(n_settings, 'setting')} x {_plural(len(seeds), 'seed')} "
             f"(training.seed {', '.join(map(str, seeds))}; data order and held-out text are "
             "the same in every run). Held-out losses are nats per masked token at mask ratio "
             "t (causal: per next token); each cell is the mean ± sample std over the "
             "finished seeds, n of them.", "",
             "| " + " | ".join([*keys, "n", *(m[1] for m in metrics)]) + " |",
             "|" + "---|" * (len(keys) + 1 + len(metrics))]
    by_label: dict[str, list[dict]] = {}
    for r, row in zip(runs, rows):
        by_label.setdefault(r.label, []).append(row)
    for label, group in by_label.items():
        done = [row for row in group if row["status"] == "finished"]
        cells = [str(group[0][k]) for k in keys] + [str(len(done))]
        cells += [_mean_std([row[c] for row in done], d, th) for c, _, d, th in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    missing = [f"{row['workdir']} ({row['status']})" for row in rows if row["status"] != "finished"]
    if missing:
        lines += ["", "Not in the means: " + ", ".join(missing) + "."]
    if plots:
        lines += ["", "Plots: " + ", ".join(os.path.basename(p) for p in plots) + "."]
    return "\n".join(lines) + "\n"


def write_results(runs: list[Run], workdir: str, failed: dict[str, str] | None = None) -> list[dict]:
    """results.csv, the plots and results.md in `workdir` (each written atomically)."""
    rows = result_rows(runs, failed)
    checkpoint.atomic_write_text(os.path.join(workdir, "results.csv"), _csv_text(rows))
    groups: dict[str, list[str]] = {}
    names = plot_labels(runs)
    for r in runs:
        groups.setdefault(names[r.label], []).append(r.workdir)
    plots = report.write_plots(groups, workdir)
    checkpoint.atomic_write_text(os.path.join(workdir, "results.md"),
                                 _markdown(runs, rows, workdir, plots))
    print(f"wrote {os.path.join(workdir, 'results.csv')}, results.md and {len(plots)} plots")
    return rows


# ------------------------------------------------------------------------------- CLI
# --config and --workdir are train.py's flags (absl allows one definition per name).

flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,...: values of a config key (or 'recipe') "
                          "to sweep; repeat for a cross product")
flags.DEFINE_integer("seeds", 1, "runs per setting, with training.seed, training.seed+1, ...; "
                     "data.seed is not changed, so data order and held-out text stay fixed")
flags.DEFINE_bool("progress", True, "show each run's training progress bars")
FLAGS = flags.FLAGS
_OVERRIDES: dict[str, str] = {}


def _main(argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not FLAGS.config:
            raise UserError("--config is required, e.g. --config=configs/tiny.py")
        rows = run(FLAGS.config, FLAGS.workdir, parse_grid(FLAGS.grid), FLAGS.seeds,
                   _OVERRIDES, progress=FLAGS.progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to finish the missing runs", file=sys.stderr)
        sys.exit(130)
    sys.exit(1 if any(row["status"] != "finished" for row in rows) else 0)


def main():
    train.launch(_main, _OVERRIDES)


if __name__ == "__main__":
    main()
