"""HF Llama or dense DeepSeek-V3 directory -> a new StackWise run directory (ready to train).

The config gives the stack partition; every HF value and tensor shape is checked against
it first, so a mismatch stops the import before anything is written. The weights become
parameter stores of version 0 (RUN_DIR/params/<group>/v00000, stackwise_jax/store.py),
written one group at a time, so host memory holds at most one stack; stage 0 of the
trainer loads them instead of initialising. The checkpoint at global step 0 holds only
meta (stage 0, step 0) and an empty data state.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tqdm

from export import dirs, mapping, stream, tokenizer
from stackwise_jax import checkpoint, memory, store
from stackwise_jax.errors import UserError

IMPORT_META = {"stage": 0, "step": 0, "global_step": 0, "done": False, "stages": [],
               "stage_wall_s": 0.0, "stage_tokens": 0, "stage_nonfinite": 0}
IMPORT_VERSION = 0  # stores no phase wrote: read by phase 0 on (store.py)
HF_CONFIGS = {"llama": "LlamaConfig", "deepseek_v3": "DeepseekV3Config"}
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old Llama checkpoints saved


def _read_hf_config(hf_dir: str):
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"--import_from={hf_dir} is not an HF model directory (no config.json)")
    with open(path) as f:
        raw = json.load(f)
    kind = raw.get("model_type")
    if kind not in HF_CONFIGS:
        archs = ", ".join(raw.get("architectures") or []) or "unknown architecture"
        raise UserError(f"--import_from={hf_dir} holds a '{kind}' model ({archs}); only Llama "
                        "(model_type 'llama', LlamaForCausalLM) and dense DeepSeek-V3 "
                        "(model_type 'deepseek_v3', DeepseekV3ForCausalLM) checkpoints can be "
                        "imported")
    import transformers

    return getattr(transformers, HF_CONFIGS[kind]).from_pretrained(hf_dir)


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
        raise UserError(f"'{hf_dir}' has tensor {extra[0]} that a model of this config does not "
                        f"have ({len(extra)} unexpected in all)")
    for name, shape in want.items():
        with safe_open(files[name], framework="numpy") as f:
            got = tuple(f.get_slice(name).get_shape())
        if got != shape:
            raise UserError(f"tensor {name} has shape {got} in '{hf_dir}' but the config needs "
                            f"{shape}")
    return {n: files[n] for n in want}


def _write_stores(files: dict[str, str], m, hf, run_dir: str, stack_dtype: str,
                  progress: bool) -> None:
    """The HF weights as the run's version-0 stores: the embedding, final norm and head in
    float32, each stack in `stack_dtype`; one HF tensor read at a time, one group in memory.
    DeepSeek weights saved with interleaved RoPE rows are put in StackWise's layout."""
    from safetensors import safe_open

    hf_vocab = hf.vocab_size
    interleaved = bool(getattr(hf, "rope_interleave", False)) and m.attention == "mla"

    def get(name):
        with safe_open(files[name], framework="numpy") as f:
            array = np.asarray(f.get_tensor(name), dtype=np.float32)
        short = name.split(".")[-2]  # model.layers.N.self_attn.<short>.weight
        if interleaved and short in mapping.MLA_ROPE_ROWS:
            array = mapping.deinterleave_rope_rows(short, array, m)
        return array

    def rows(matrix_VxD):  # rows past the HF vocabulary start as the mean row
        extra = m.vocab_size - hf_vocab
        if not extra:
            return matrix_VxD
        return np.concatenate([matrix_VxD, np.repeat(matrix_VxD.mean(0, keepdims=True), extra, 0)])

    store.write(run_dir, "embed", IMPORT_VERSION,
                {"embedding": rows(get(mapping.embed_tensor(m).hf_name))}, "fp32")
    for t in mapping.head_tensors(m):  # final norm, and the head unless tied
        array = get(t.hf_name)
        array = rows(array).T if t.group == "head" else array
        store.write(run_dir, t.group, IMPORT_VERSION, {t.leaf: array}, "fp32")
        del array
    with tqdm.tqdm(total=mapping.n_layers(m), unit="layer", desc="import",
                   disable=not progress) as bar:
        for k in range(m.architecture.n_stacks):
            tree: dict = {}
            for t in mapping.stack_tensors(m, k):
                *parents, leaf = t.leaf.split(".")
                node = tree
                for key in parents:
                    node = node.setdefault(key, {})
                if leaf not in node:
                    node[leaf] = np.empty(t.stored_shape, np.float32)
                node[leaf][t.block] = get(t.hf_name).T if t.transpose else get(t.hf_name)
            store.write(run_dir, store.stack_group(k), IMPORT_VERSION, tree, stack_dtype)
            del tree
            memory.release_memory()
            bar.update(m.architecture.blocks_per_stack)


def import_hf(hf_dir: str, workdir: str, cfg, overwrite: bool = False,
              progress: bool = True) -> str:
    """Writes a new run directory holding the HF Llama / DeepSeek-V3 checkpoint in hf_dir, ready to train
    (version-0 stores, checkpoint 0 at stage 0, step 0)."""
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
        _write_stores(files, m, hf, tmp, cfg.training.progressive.stack_storage_dtype,
                      progress)
        ckpt = checkpoint.Checkpointer(tmp, cfg.checkpoint.max_to_keep)
        ckpt.save(0, dict(IMPORT_META), data_state={})
        ckpt.close()
    return workdir
