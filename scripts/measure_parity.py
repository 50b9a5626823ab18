"""Exported logits against the JAX Rack on a trained run, next to the float32 tolerance.

    python scripts/measure_parity.py --workdir=RUN [--batches=6] [--batch=4] [--len=128]

Exports the run (float32) to a temporary directory, loads it in transformers (eager
attention, float32) and compares the logits of the Rack in causal mode on --batches
batches of random ids, and on a line of English text, with the tolerance
4 sqrt(n) eps32 n_layers max|logit| (docs/export.md). Then 32 greedy tokens of
stackwise_jax.generate against HF generate. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from export import hf as export_hf  # noqa: E402
from stackwise_jax.generate import generate  # noqa: E402
from stackwise_jax.run import load_run  # noqa: E402


def tolerance(m, seq_len: int, max_abs_logit: float) -> float:
    n = max(m.d_model, m.d_ff, seq_len)
    n_layers = m.architecture.n_stacks * m.architecture.blocks_per_stack
    return float(4 * np.sqrt(n) * np.finfo(np.float32).eps * n_layers * max_abs_logit)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--len", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    loaded = load_run(args.workdir)
    rack, tok, m = loaded.rack, loaded.tokenizer, loaded.rack.config
    graphdef, state = nnx.split(rack)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids, mode="causal"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "hf")
        export_hf.export_run(args.workdir, out, progress=False)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            out, attn_implementation="eager", dtype=torch.float32).eval()

    rng = np.random.default_rng(0)
    batches = [("random ids", rng.integers(0, m.vocab_size, (args.batch, args.len)))
               for _ in range(args.batches)]
    # English text through the run's tokenizer, cut to --len tokens
    ids = tok.encode("The king finds the silver key by the river, and the queen hides the "
                     "letter in the garden before supper. " * 20)[:args.len]
    batches.append(("English text", np.asarray([ids])))
    rows = []
    for name, ids in batches:
        ours = np.asarray(forward(state, ids.astype(np.int32)))
        with torch.no_grad():
            theirs = hf(torch.tensor(ids)).logits.numpy()
        scale = float(np.abs(ours).max())
        diff = float(np.abs(ours - theirs).max())
        bound = tolerance(m, ids.shape[1], scale)
        rows.append({"input": name, "shape": list(ids.shape), "max_abs_diff": diff,
                     "max_abs_logit": scale, "tolerance": bound, "diff_over_tolerance":
                     diff / bound, "argmax_equal": bool((ours.argmax(-1) == theirs.argmax(-1)).all())})
        print(f"{name:<14} {str(ids.shape):<10} diff {diff:.2e}  max|logit| {scale:6.2f}  "
              f"tolerance {bound:.2e}  ({diff / bound:.2f} of it)  argmax equal "
              f"{rows[-1]['argmax_equal']}", flush=True)
    prompt = tok.encode("The king finds")
    ours = generate(rack, prompt, 32)[len(prompt):].tolist()
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    same = ours == theirs[0, len(prompt):].tolist()
    print(f"32 greedy tokens: stackwise_jax.generate == HF generate: {same}")
    print(json.dumps({"workdir": args.workdir, "rows": rows, "greedy_32_equal": same}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
