"""Plots of finished or running runs: held-out loss against tokens, final losses, loss curves.

python -m stackwise_jax.report RUN_DIR [RUN_DIR ...] [--out=DIR]

Each RUN_DIR is drawn on its own; a sweep directory stands for its runs, grouped by
setting (the run's directory name without `seed=N`): mean over seeds, band of one sample
std. --out defaults to the directory holding the runs (their common parent; for one sweep,
the sweep directory), or the current directory when they have none. Writes, each only
where there is something to draw:
  loss_vs_tokens.png   held-out loss at t=0.5 at each stage end against cumulative tokens
  final_loss.png       final held-out loss at each eval mask ratio (grouped bars)
  training_loss.png    training loss from metrics.jsonl against global step, stage ends dotted
sweep.py calls write_plots with its runs grouped the same way. Runs still training are
drawn from what they have (metrics.jsonl, their checkpoint's stage records); runs with
no metrics yet are named and left out.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile

from absl import app, flags

_T = "0.5"  # the mask ratio each stage end is evaluated at (train.Trainer.finish)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_metrics(run_dir: str) -> list[dict]:
    """Logged steps of metrics.jsonl (skipped non-finite steps left out); [] when absent."""
    records = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if not rec.get("nonfinite") and rec.get("loss") is not None:
                    records.append(rec)
    except OSError:
        pass
    return records


def stage_records(run_dir: str) -> list[dict]:
    """Per-stage records: summary.json's, or for a run still training its latest checkpoint's."""
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    if summary is not None:
        return summary.get("stages", [])
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return []
    from stackwise_jax import checkpoint  # Orbax: only for runs that are not finished
    try:
        ckpt = checkpoint.Checkpointer(run_dir, max_to_keep=1, create=False)
        try:
            latest = ckpt.latest_step()
            return ckpt.meta(latest).get("stages", []) if latest is not None else []
        finally:
            ckpt.close()
    except Exception as e:  # a half-written checkpoint: plot the rest
        print(f"report: {run_dir}: could not read its checkpoint ({type(e).__name__}); "
              "no stage points", file=sys.stderr)
        return []


def stage_points(run_dir: str) -> list[tuple[int, float]]:
    """(cumulative tokens, held-out loss at t=0.5) at each stage end that was evaluated."""
    points, tokens = [], 0
    for st in stage_records(run_dir):
        tokens += st.get("tokens", 0)
        if st.get(f"heldout_loss_t{_T}") is not None:
            points.append((tokens, st[f"heldout_loss_t{_T}"]))
    return points


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ------------------------------------------------------------------------------ plots


def _figure(width=7.0, height=4.5):
    # matplotlib's Figure renders through Agg on savefig without selecting a pyplot
    # backend, so a notebook's own backend is left alone. Imported here: training
    # does not need matplotlib.
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _colors(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(fig) -> None:
    """Below the axes, where long setting names cover no data."""
    n = len(fig.axes[0].get_legend_handles_labels()[1])
    fig.legend(loc="outside lower center", ncols=2 if n > 3 else n, fontsize="small",
               frameon=False)


def _save(fig, path: str) -> str:
    """Atomic: a temp file in the same directory, renamed over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def plot_loss_vs_tokens(groups: dict[str, list[str]], path: str) -> str | None:
    """Held-out loss at t=0.5 at stage ends; per group the mean over runs, band ± std."""
    fig, ax = _figure()
    drawn = False
    for color, (label, dirs) in zip(_colors(len(groups)), groups.items()):
        runs = [p for p in (stage_points(d) for d in dirs) if p]
        if not runs:
            continue
        n_points = max(len(p) for p in runs)
        xs, means, stds = [], [], []
        for i in range(n_points):  # stage i of each run that reached it
            at = [p[i] for p in runs if len(p) > i]
            xs.append(statistics.mean(x for x, _ in at))
            m, s = _mean_std([y for _, y in at])
            means.append(m)
            stds.append(s)
        n = f" (n={len(runs)})" if len(dirs) > 1 else ""
        ax.errorbar(xs, means, yerr=stds if any(stds) else None, marker="o", capsize=3,
                    color=color, label=label + n)
        if any(stds) and len(xs) > 1:
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                            [m + s for m, s in zip(means, stds)], color=color, alpha=0.2)
        drawn = True
    if not drawn:
        return None
    from matplotlib.ticker import StrMethodFormatter
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set(xlabel="tokens seen (cumulative, at each stage end)",
           ylabel=f"held-out loss at t={_T} (nats/token)",
           title="Held-out masked-diffusion loss after each stage")
    ax.grid(alpha=0.3)
    _legend(fig)
    return _save(fig, path)


def plot_final_losses(groups: dict[str, list[str]], path: str) -> str | None:
    """Grouped bars: final held-out loss per eval ratio, one bar per group, error bar = std."""
    finals = {}
    for label, dirs in groups.items():
        summaries = [s for s in (_read_json(os.path.join(d, "summary.json")) for d in dirs) if s]
        if summaries:
            finals[label] = summaries
    if not finals:
        return None
    ratios = sorted({t for ss in finals.values() for s in ss for t in s.get("heldout_loss", {})},
                    key=float)
    fig, ax = _figure(max(6.0, 1.6 * len(ratios) * max(1, len(finals)) / 2), 4.5)
    width = 0.8 / len(finals)
    for j, (color, (label, summaries)) in enumerate(zip(_colors(len(finals)), finals.items())):
        stats = [_mean_std([s["heldout_loss"][t] for s in summaries if t in s.get("heldout_loss", {})]
                           or [float("nan")]) for t in ratios]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(ratios))]
        n = f" (n={len(summaries)})" if len(groups[label]) > 1 else ""
        spread = [s for _, s in stats]
        ax.bar(xs, [m for m, _ in stats], width, yerr=spread if any(spread) else None,
               capsize=3, color=color, label=label + n)
    unigram = [s["unigram_loss"] for ss in finals.values() for s in ss if "unigram_loss" in s]
    if unigram:
        ax.axhline(statistics.mean(unigram), color="gray", linestyle="--", linewidth=1,
                   label="unigram baseline")
    ax.set_xticks(range(len(ratios)), [f"t = {t}" for t in ratios])
    ax.set(ylabel="held-out loss (nats/masked token)", title="Final held-out loss by mask ratio")
    lows = [s["heldout_loss"][t] for ss in finals.values() for s in ss
            for t in ratios if t in s.get("heldout_loss", {})] + unigram
    ax.set_ylim(bottom=max(0.0, min(lows) - 0.5))  # bars start near the data, not at 0
    ax.grid(axis="y", alpha=0.3)
    _legend(fig)
    return _save(fig, path)


def plot_training_curves(groups: dict[str, list[str]], path: str) -> str | None:
    """Training loss against global step per run; dotted lines at each run's stage ends."""
    fig, ax = _figure(8.0, 4.5)
    drawn = False
    for color, (label, dirs) in zip(_colors(len(groups)), groups.items()):
        first = True
        for d in dirs:
            recs = read_metrics(d)
            if not recs:
                continue
            ax.plot([r["global_step"] for r in recs], [r["loss"] for r in recs], color=color,
                    alpha=0.9 if len(dirs) == 1 else 0.6, linewidth=1.2,
                    label=label if first else None)
            first, drawn = False, True
            ends: dict[int, int] = {}
            for r in recs:
                ends[r["stage"]] = max(ends.get(r["stage"], 0), r["global_step"])
            for stage, step in sorted(ends.items())[:-1]:  # the last end is the curve's end
                ax.axvline(step, color=color, linestyle=":", linewidth=1, alpha=0.7)
    if not drawn:
        return None
    ax.set(xlabel="global step", ylabel="training loss (nats/masked token)",
           title="Training loss (dotted: stage ends)")
    ax.grid(alpha=0.3)
    _legend(fig)
    return _save(fig, path)


def write_plots(groups: dict[str, list[str]], out_dir: str) -> list[str]:
    """The three plots for `groups` ({label: [run dirs]}) in out_dir; returns those written."""
    for label, dirs in groups.items():
        for d in dirs:
            if not read_metrics(d):
                print(f"report: {d}: no metrics.jsonl lines yet; not in the plots", file=sys.stderr)
    written = []
    for name, plot in (("loss_vs_tokens.png", plot_loss_vs_tokens),
                       ("final_loss.png", plot_final_losses),
                       ("training_loss.png", plot_training_curves)):
        path = plot(groups, os.path.join(out_dir, name))
        if path is None:
            print(f"report: nothing to draw in {name} yet; not written", file=sys.stderr)
        else:
            written.append(path)
    return written


# ------------------------------------------------------------------------------- CLI


def _is_run(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f))
               for f in ("config.json", "metrics.jsonl", "summary.json"))


def _setting(slug: str) -> str:
    """A sweep run's directory name without its seed: the runs of one setting share it."""
    return re.sub(r"(^|,)seed=\d+$", "", slug) or "base"


def group_runs(paths: list[str]) -> dict[str, list[str]]:
    """{label: [run dirs]}: a run directory is its own group; a sweep directory gives its
    runs grouped by setting (directory name without `seed=N`)."""
    from stackwise_jax.errors import UserError
    singles, groups = [], {}
    for p in paths:
        if not os.path.isdir(p):
            raise UserError(f"{p}: no such directory")
        if _is_run(p):
            singles.append(p)
            continue
        inside = sorted(d for d in os.listdir(p) if _is_run(os.path.join(p, d)))
        if not inside:
            raise UserError(f"{p}: neither a run directory (config.json, metrics.jsonl) nor a "
                            "sweep directory holding runs")
        for d in inside:
            groups.setdefault(_setting(d), []).append(os.path.join(p, d))
    names = [os.path.basename(os.path.normpath(d)) for d in singles]
    if len(set(names)) < len(names):  # same names in different places: use the paths
        names = [os.path.normpath(d) for d in singles]
    return {**{name: [d] for name, d in zip(names, singles)}, **groups}


def default_out(run_dirs: list[str]) -> str:
    """The runs' common parent directory, or the current directory when there is none."""
    parents = [os.path.dirname(os.path.abspath(d)) for d in run_dirs]
    common = os.path.commonpath(parents)
    return common if common != os.path.dirname(common) else os.getcwd()  # not the root


def _main(argv):
    from stackwise_jax.errors import UserError
    try:
        if len(argv) < 2:
            raise UserError("name at least one RUN_DIR, e.g. python -m stackwise_jax.report runs/tiny")
        groups = group_runs(argv[1:])
        out = flags.FLAGS.out or default_out([d for dirs in groups.values() for d in dirs])
        written = write_plots(groups, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for path in written:
        print(f"wrote {path}")


def main():
    # Defined here, not at import: sweep.py imports this module, and its command line
    # should not grow an --out flag.
    flags.DEFINE_string("out", None, "directory for the PNGs (default: the runs' common "
                        "parent directory, or the current directory)")
    app.run(_main)


if __name__ == "__main__":
    main()
