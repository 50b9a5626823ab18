"""The quality comparison table: sweep runs against an end-to-end reference and unigram.

    python scripts/quality_table.py runs/compare [runs/levers ...] [--reference=recipe=e2e]
        [--ratio=0.15] [--eval]

Reads every run's summary.json (and eval.json for the NLL bound, written by
`python -m stackwise_jax.evaluate`; --eval runs it where missing), groups runs by setting
(directory name without `seed=N`) and prints a markdown table: mean and sample std over
seeds of the held-out loss at each ratio, the bound, causal loss; the gap to the
reference at --ratio, in nats and percent; the share of the reference's gain over the
unigram baseline that the setting keeps; the largest trainable state of a stage (params
and as a fraction of the reference's); tokens; training wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys


def _runs(sweep_dirs):
    for d in sweep_dirs:
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if os.path.isfile(os.path.join(path, "summary.json")):
                yield re.sub(r",?seed=\d+", "", name) or name, path


def _load(path: str, want_eval: bool) -> dict:
    with open(os.path.join(path, "summary.json")) as f:
        s = json.load(f)
    ev_path = os.path.join(path, "eval.json")
    if want_eval and not os.path.exists(ev_path):
        subprocess.run([sys.executable, "-m", "stackwise_jax.evaluate", f"--workdir={path}"],
                       check=True, stdout=subprocess.DEVNULL)
    if os.path.exists(ev_path):
        with open(ev_path) as f:
            s["eval"] = json.load(f)
    return s


def _bound(s: dict):
    ev = s.get("eval") or {}
    b = ev.get("nll_bound")
    return b.get("nats_per_token") if isinstance(b, dict) else b


def _stat(values, digits: int = 3):
    values = [v for v in values if v is not None]
    if not values:
        return ""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", nargs="+")
    ap.add_argument("--reference", default="recipe=e2e")
    ap.add_argument("--ratio", default="0.15")
    ap.add_argument("--eval", action="store_true", help="run stackwise_jax.evaluate where "
                    "a run has no eval.json (the NLL bound column)")
    args = ap.parse_args()
    groups: dict[str, list[dict]] = {}
    for setting, path in _runs(args.sweeps):
        groups.setdefault(setting, []).append(_load(path, args.eval))
    if args.reference not in groups:
        sys.exit(f"error: no finished run of the reference '{args.reference}' in "
                 f"{', '.join(args.sweeps)} (settings: {', '.join(groups)})")
    ref = groups[args.reference]
    r = args.ratio
    ref_loss = statistics.fmean(s["heldout_loss"][r] for s in ref)
    unigram = statistics.fmean(s["unigram_loss"] for s in ref)
    ref_state = max(max(st["trainable_params"] for st in s["stages"]) for s in ref)
    ratios = list(ref[0]["heldout_loss"])
    print(f"reference {args.reference}: {ref_loss:.3f} at t = {r}; unigram {unigram:.3f}\n")
    head = (["setting", "seeds"] + [f"t = {x}" for x in ratios]
            + ["NLL bound", "causal", f"gap at t = {r}", "share of gain",
               "largest trainable state of a stage", "tokens", "training wall s"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for setting, runs in groups.items():
        loss = statistics.fmean(s["heldout_loss"][r] for s in runs)
        state = max(max(st["trainable_params"] for st in s["stages"]) for s in runs)
        row = [setting, str(len(runs))]
        row += [_stat([s["heldout_loss"][x] for s in runs]) for x in ratios]
        row += [_stat([_bound(s) for s in runs]),
                _stat([s["heldout_causal_loss"] for s in runs]),
                f"{loss - ref_loss:+.3f} ({100 * (loss - ref_loss) / ref_loss:+.1f}%)",
                f"{100 * (unigram - loss) / (unigram - ref_loss):.0f}%",
                f"{state:,} ({state / ref_state:.2f})",
                f"{runs[0]['tokens_seen']:,}",
                _stat([s["wall_s"] for s in runs], 0)]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
