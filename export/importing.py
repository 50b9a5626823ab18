"""HF Llama directory -> a new StackWise run directory (checkpoint 0, ready to train).

The config gives the stack partition; every HF value and tensor shape is checked against
it first, so a mismatch stops the import before anything is written.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tqdm

from export import dirs, mapping, stream, tokenizer
from stackwise_jax import checkpoint
from stackwise_jax.errors import UserError

IMPORT_META = {"stage": 0, "step": 0, "global_step": 0, "done": False, "stages": [],
               "stage_wall_s": 0.0, "stage_tokens": 0}
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old Llama checkpoints saved


def _read_hf_config(hf_dir: str):
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"--import_from={hf_dir} is not an HF model directory (no config.json)")
    with open(path) as f:
        raw = json.load(f)
    kind = raw.get("model_type")
    if kind != "llama":
        archs = ", ".join(raw.get("architectures") or []) or "unknown architecture"
        raise UserError(f"--import_from={hf_dir} holds a '{kind}' model ({archs}); only Llama "
                        "(model_type 'llama', LlamaForCausalLM) checkpoints can be imported")
    from transformers import LlamaConfig

    return LlamaConfig.from_pretrained(hf_dir)


def _hf_tensors(hf_dir: str, hf, m) -> dict[str, str]:
    """{name: file} of the tensors to import, after checking names and shapes."""
    from safetensors import safe_open

    files = stream.safetensors_files(hf_dir)
    want = {t.hf_name: t.hf_shape for t in mapping.all_tensors(m)}
    for name in [mapping.embed_tensor(m).hf_name, "lm_head.weight"]:
        if name in want:  # the HF matrix may have fewer rows than model.vocab_size
            want[name] = (hf.vocab_size, m.d_model)
    missing = [n for n in want if n not in files]
    if missing:
        raise UserError(f"'{hf_dir}' lacks tensor {missing[0]} (and {len(missing) - 1} more) "
                        "that the config needs")
    extra = [n for n in files if n not in want and not n.endswith(IGNORED_HF_TENSORS)
             and not (n == "lm_head.weight" and m.tie_embeddings)]
    if extra:
        raise UserError(f"'{hf_dir}' has tensor {extra[0]} that a Llama of this config does not "
                        f"have ({len(extra)} unexpected in all)")
    for name, shape in want.items():
        with safe_open(files[name], framework="numpy") as f:
            got = tuple(f.get_slice(name).get_shape())
        if got != shape:
            raise UserError(f"tensor {name} has shape {got} in '{hf_dir}' but the config needs "
                            f"{shape}")
    return {n: files[n] for n in want}


def _load_params(files: dict[str, str], m, hf_vocab: int, progress: bool) -> dict:
    """The Rack's parameter dict (float32), one HF tensor read at a time."""
    import jax
    from safetensors import safe_open

    def get(name):
        with safe_open(files[name], framework="numpy") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)

    def rows(matrix_VxD):  # rows past the HF vocabulary start as the mean row
        extra = m.vocab_size - hf_vocab
        if not extra:
            return matrix_VxD
        return np.concatenate([matrix_VxD, np.repeat(matrix_VxD.mean(0, keepdims=True), extra, 0)])

    params = {"embed": {"embedding": jax.device_put(rows(get("model.embed_tokens.weight")))},
              "final_norm": {"weight": jax.device_put(get("model.norm.weight"))}, "stacks": {}}
    if not m.tie_embeddings:
        params["head"] = {"kernel": jax.device_put(rows(get("lm_head.weight")).T)}
    b = m.architecture.blocks_per_stack
    with tqdm.tqdm(total=mapping.n_layers(m), unit="layer", desc="import",
                   disable=not progress) as bar:
        for k in range(m.architecture.n_stacks):
            tensors = mapping.stack_tensors(m, k)
            for first in range(0, len(tensors), b):
                group = tensors[first:first + b]
                stacked = np.stack([get(t.hf_name).T if t.transpose else get(t.hf_name)
                                    for t in group])
                node = params["stacks"]
                for key in group[0].path[1:-1]:
                    node = node.setdefault(key, {})
                node[group[0].path[-1]] = jax.device_put(stacked)
            bar.update(b)
    return params


def import_hf(hf_dir: str, workdir: str, cfg, overwrite: bool = False,
              progress: bool = True) -> str:
    """Writes a run directory holding the HF Llama checkpoint in hf_dir as its step 0."""
    m = cfg.model
    hf = _read_hf_config(hf_dir)
    mapping.check_hf_config(hf, cfg)
    files = _hf_tensors(hf_dir, hf, m)
    dirs.check_target(workdir, "--workdir", overwrite, hf_dir)
    with dirs.written_in_temp(workdir) as tmp:
        checkpoint.claim_workdir(tmp, cfg)  # needs an empty directory: first
        tok = tokenizer.from_hf(hf_dir, os.path.join(tmp, "tokenizer"))
        if tok.vocab_size > m.vocab_size:
            added = tok.vocab_size - hf.vocab_size
            raise UserError(
                f"the HF tokenizer with [MASK] and eos needs {tok.vocab_size} ids but "
                f"model.vocab_size={m.vocab_size}. Set --config.model.vocab_size={tok.vocab_size}:"
                f" the embedding{'' if m.tie_embeddings else ' and head'} then get "
                f"{max(added, 0)} new row(s), started as the mean row")
        params = _load_params(files, m, hf.vocab_size, progress)
        ckpt = checkpoint.Checkpointer(tmp, cfg.checkpoint.max_to_keep)
        ckpt.save(0, params, meta=dict(IMPORT_META), data_state={})
        ckpt.close()
    return workdir
