"""Generation speed on this machine, and KV-cache bytes per token from the configs.

    python scripts/bench_generate.py [--workdir=RUN] [--out=docs/generation_benchmark.json]
    python scripts/bench_generate.py --attentions=gqa,mla,linear --methods=cache,full \
        --out=docs/generation_attention_benchmark.json
    python scripts/bench_generate.py --cache_only   # the cache table alone, speed rows kept

The model: the run in --workdir (its latest checkpoint), or configs/tiny.py at its random
initialisation (speed does not depend on the weights). --attentions runs that model's shape
with each attention (model.attention; one that is not the run's own starts at its random
initialisation, with the config's model.mla.* / model.linear.* keys). For each batch size
the --methods: causal generation with the attention's cache (stackwise_jax.generate: GQA's
KV cache, MLA's latent cache, linear attention's recurrent state), the same by a full
causal forward per token (what the cache saves), and masked-diffusion sampling with one
step per token. Each is timed after a first call that compiles it; the best of --repeats
runs is kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from stackwise_jax import checkpoint, config, model  # noqa: E402
from stackwise_jax.attention import ATTENTIONS  # noqa: E402
from stackwise_jax import generate as generate_lib  # noqa: E402
from stackwise_jax.diffusion_sample import diffusion_generate  # noqa: E402

CACHE_CONFIGS = ("configs/tiny.py", "configs/llama1b.py", "configs/llama70b.py")
# configs/llama70b.py's shape with another attention: DeepSeek-V3's MLA sizes, and linear
DEEPSEEK_V3_MLA = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128)
VARIANTS = {"configs/llama70b.py + MLA 1536/512/128/64/128": ("mla", DEEPSEEK_V3_MLA),
            "configs/llama70b.py + linear": ("linear", {})}


def cache_table() -> tuple[list[dict], list[dict]]:
    """Bytes per token of each config's cache (generate.cache_bytes_per_token), and the
    fixed state of linear attention (generate.linear_state_bytes, one sequence)."""
    models = {path: config.load(os.path.join(ROOT, path)).model for path in CACHE_CONFIGS}
    for name, (kind, keys) in VARIANTS.items():
        m = config.load(os.path.join(ROOT, "configs/llama70b.py")).model
        with m.unlocked():
            m.attention = kind
            m.mla.update(keys)
        models[name] = m
    cache, state = [], []
    for name, cm in models.items():
        if cm.attention == "linear":
            state.append({"config": name, "state_bytes_fp32": generate_lib.linear_state_bytes(cm)})
            continue
        for dtype, nbytes in (("bf16", 2), ("fp32", 4)):
            for kind, b in generate_lib.cache_bytes_per_token(cm, nbytes).items():
                if kind == cm.attention:  # the cache this model keeps
                    cache.append({"config": name, "cache": kind, "dtype": dtype,
                                  "bytes_per_token": b})
    print(f"\n{'config':<48}{'cache':<8}{'dtype':<7}{'bytes/token':>14}{'MiB per 4096':>14}")
    for c in cache:
        print(f"{c['config']:<48}{c['cache']:<8}{c['dtype']:<7}{c['bytes_per_token']:>14,}"
              f"{c['bytes_per_token'] * 4096 / 2**20:>14,.0f}")
    for c in state:
        print(f"{c['config']:<48}state, fp32, any length: {c['state_bytes_fp32']:,} bytes")
    return cache, state


def best_time(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, which compiles; best of `repeats` later calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return first, min(runs)


def full_recompute(rack):
    """Greedy decoding by a full causal forward of the whole (fixed) buffer per token."""
    graphdef, state = nnx.split(rack)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids, mode="causal"))

    def decode(prompt_BxP, n_new):
        B, P = prompt_BxP.shape
        ids = np.zeros((B, P + n_new), np.int32)
        ids[:, :P] = prompt_BxP
        for t in range(P, P + n_new):
            ids[:, t] = np.asarray(forward(state, jnp.asarray(ids))[:, t - 1].argmax(-1))
        return ids
    return decode


METHODS = ("cache", "full", "diffusion")
CACHE_NAMES = {"gqa": "ar, KV cache", "mla": "ar, latent cache", "linear": "ar, recurrent state"}


def racks(workdir: str | None, attentions: list[str] | None):
    """[(attention, rack, mask_id, source)]: the run's model (or tiny at init), and its
    shape with each of `attentions` when given."""
    if workdir:
        from stackwise_jax.run import load_run
        loaded = load_run(workdir)
        own, mask_id, cfg = loaded.rack, loaded.tokenizer.mask_id, loaded.config
        source = workdir
    else:
        cfg = config.load(os.path.join(ROOT, "configs/tiny.py"))
        own, mask_id, source = None, cfg.model.vocab_size - 1, "configs/tiny.py"
    out = []
    for kind in attentions or [cfg.model.attention]:
        if own is not None and kind == cfg.model.attention:
            out.append((kind, own, mask_id, source))
            continue
        c = copy.deepcopy(cfg)
        with c.unlocked():
            c.model.attention = kind
        config.validate(c)
        out.append((kind, model.Rack(c.model, nnx.Rngs(0)), mask_id,
                    f"{source} with model.attention={kind}, random init"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="a run to load; default: tiny at init")
    p.add_argument("--attentions", default=None,
                   help="comma-separated model.attention values to run at the model's shape "
                        "(gqa, mla, linear); default: the model's own")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated: cache (generate), full (a full causal forward per "
                        "token), diffusion (one step per token); default: all")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=112)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "generation_benchmark.json"))
    p.add_argument("--cache_only", action="store_true",
                   help="compute the cache table only; keep --out's speed rows")
    args = p.parse_args(argv)
    if args.cache_only:
        report = json.load(open(args.out))
        report["cache_bytes_per_token"], report["linear_state_bytes"] = cache_table()
        report["cache_command"] = "python scripts/bench_generate.py --cache_only"
        checkpoint.atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"\nwrote the cache table into {args.out}")
        return 0
    methods = args.methods.split(",")
    attentions = args.attentions.split(",") if args.attentions else None
    for name, values, allowed in (("--methods", methods, METHODS),
                                  ("--attentions", attentions or [], ATTENTIONS)):
        if set(values) - set(allowed):
            p.error(f"{name}={','.join(values)}: choose among {', '.join(allowed)}")

    load_before = os.getloadavg()
    rows = []
    for kind, rack, mask_id, source in racks(args.workdir, attentions):
        m = rack.config
        rng = np.random.default_rng(0)
        recompute = full_recompute(rack)
        for B in (int(b) for b in args.batches.split(",")):
            prompt = rng.integers(0, m.vocab_size - 1, (B, args.prompt_len)).astype(np.int32)
            n = args.new_tokens
            cases = {
                "cache": (CACHE_NAMES[kind], lambda: generate_lib.generate(rack, prompt, n)),
                "full": ("ar, full forward per token", lambda: recompute(prompt, n)),
                "diffusion": ("diffusion, 1 step per token",
                              lambda: diffusion_generate(rack, prompt, n, mask_id, steps=n)),
            }
            for method in methods:
                name, fn = cases[method]
                first, best = best_time(fn, args.repeats)
                rows.append({"attention": kind, "model": source, "method": name, "batch": B,
                             "prompt_len": args.prompt_len, "new_tokens": n,
                             "first_call_s": round(first, 3), "best_s": round(best, 4),
                             "tokens_per_s": round(B * n / best, 1)})
                print(f"{kind:<7}{name:<30} B={B:<3} first call {first:7.2f} s   best "
                      f"{best:8.4f} s   {B * n / best:9.1f} tokens/s", flush=True)

    cache, state = cache_table()

    report = {"command": "python scripts/bench_generate.py " + " ".join(argv or sys.argv[1:]),
              "model": sorted({r["model"] for r in rows}),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "load_average": {"before": load_before, "after": os.getloadavg()}, "jax": jax.__version__,
              "backend": jax.default_backend(), "speed": rows, "cache_bytes_per_token": cache,
              "linear_state_bytes": state}
    checkpoint.atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
