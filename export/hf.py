"""StackWise run <-> HF Llama / DeepSeek-V3 (MLA, dense) directory (safetensors, config.json, tokenizer files): the CLI,
and the export. The import is in export/importing.py.

Export:  python -m export.hf --workdir=RUN_DIR --out=OUT_DIR [--dtype=float32|bfloat16]
                             [--max_shard_size=5GB] [--overwrite] [--allow_unfinished]
Import:  python -m export.hf --import_from=HF_DIR --workdir=RUN_DIR --config=configs/x.py
                             [--config.model.KEY=VALUE ...] [--overwrite]

The export streams: it reads the run's parameters through `stackwise_jax.run.RunParams`,
group by group (embedding, stack by stack, final norm, head) and array by array from the
per-stack stores (RUN_DIR/params, memory-mapped), and writes each block of each array to
the safetensors file at once, so host memory stays near one stored array whatever the
model's size. Both directions write into a temporary directory beside the target, renamed
into place only when complete (export/dirs.py).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np
import tqdm

from export import dirs, mapping, stream, tokenizer
from export.importing import import_hf
from stackwise_jax import checkpoint, faults, memory, store
from stackwise_jax import config as config_lib
from stackwise_jax.errors import UserError


# ----------------------------------------------------------------------------- export

def _open_run(workdir: str, allow_unfinished: bool):
    """The run's parameters at its latest checkpoint (stackwise_jax.run.RunParams)."""
    from stackwise_jax import run as run_lib  # deferred: it pulls in the model and Orbax

    params = run_lib.RunParams(workdir)  # raises: not a run directory, no checkpoint
    meta = params.meta
    if not params.finished and not allow_unfinished:
        raise UserError(f"'{workdir}' has not finished training (latest checkpoint: phase "
                        f"{meta['stage']}, step {meta['step']}); finish it with the train "
                        "command, or pass --allow_unfinished to export the latest checkpoint "
                        "as it is")
    return params


def _by_group(m) -> dict[str, dict[str, mapping.Tensor]]:
    """{group: {leaf name: its first HF tensor}}: the arrays the config says each group has."""
    out: dict = {}
    for t in mapping.all_tensors(m):
        out.setdefault(t.group, {}).setdefault(t.leaf, t)
    return out


def _checked_group(params, group: str, want: dict[str, mapping.Tensor]) -> dict:
    """params.group(group), once its array names and shapes match the config (nothing read)."""
    arrays = params.group(group)
    missing = [leaf for leaf in want if leaf not in arrays]
    extra = [leaf for leaf in arrays if leaf not in want]
    if missing or extra:
        what = (f"lack the array '{missing[0]}'" if missing else
                f"have an array '{extra[0]}' that the config's model does not have")
        raise UserError(f"the parameters of {store.describe(group)} in '{params.workdir}' "
                        f"{what}; does the run's config.json match them?")
    for leaf, t in want.items():
        got = tuple(arrays[leaf].shape)
        if got != t.stored_shape:
            raise UserError(f"stored tensor {group}/{leaf} has shape {got} but the run's "
                            f"config.json needs {t.stored_shape}")
    return arrays


def _check_stored_groups(params, layout: dict) -> None:
    """Fails before anything is written if a group's store is missing or does not match
    the config. Reads manifests only; groups that are not stored (an unfinished run's
    unborn stacks) come from their initialisation and are checked as they are exported."""
    for group in params.groups():
        if params.finished or store.newest(params.workdir, group, params.bound) is not None:
            _checked_group(params, group, layout[group])


def export_run(workdir: str, out_dir: str, dtype: str = "float32", max_shard_size="5GB",
               overwrite: bool = False, allow_unfinished: bool = False,
               progress: bool = True) -> str:
    """Writes the run's parameters at its latest (finished) checkpoint to out_dir as an HF
    directory: Llama for model.attention='gqa', DeepSeek-V3 (dense) for 'mla'."""
    if dtype not in stream.DTYPES:
        raise UserError(f"--dtype={dtype!r}: choose one of {', '.join(stream.DTYPES)}")
    max_bytes = stream.parse_size(max_shard_size)
    cfg = checkpoint.read_config(workdir)
    m = cfg.model
    mapping.check_exportable(m)
    dirs.check_target(out_dir, "--out", overwrite, workdir)
    params = _open_run(workdir, allow_unfinished)
    layout = _by_group(m)
    _check_stored_groups(params, layout)

    import transformers

    # The weights' files name themselves and their sizes when the disk is full; the small
    # files (tokenizer, configs) name the export. Either way the temporary directory goes.
    with faults.writing(os.path.abspath(out_dir), None, "the export", stream.NO_SPACE_AFTER), \
            dirs.written_in_temp(out_dir) as tmp:
        tok = tokenizer.to_hf(os.path.join(workdir, "tokenizer"), tmp, cfg.data.seq_len)
        hf_config = getattr(transformers, mapping.hf_config_class(m))(
            **mapping.hf_config_kwargs(cfg, tok, dtype))
        # theta in 4.x's top-level field too (5.x reads rope_parameters, folds this one in):
        # readers of config.json other than transformers 5 get it (docs/export.md)
        hf_config.rope_theta = float(m.rope_theta)
        hf_config.save_pretrained(tmp)
        transformers.GenerationConfig(bos_token_id=tok["bos_id"], eos_token_id=tok["eos_id"],
                                      pad_token_id=tok["eos_id"]).save_pretrained(tmp)
        tensors = mapping.all_tensors(m)
        writer = stream.ShardedWriter(tmp, [(t.hf_name, t.hf_shape) for t in tensors], dtype,
                                      max_bytes, shown_as=os.path.abspath(out_dir))
        _stream_weights(params, m, layout, writer, progress)
        writer.close()
    return out_dir


def _stream_weights(params, m, layout: dict, writer, progress: bool) -> None:
    """Embedding, then stack by stack, then final norm and head: one group open at a time,
    one stored array read at a time (memory-mapped), written block by block."""
    b = m.architecture.blocks_per_stack

    def write_group(group: str, tensors: list[mapping.Tensor]) -> None:
        arrays = _checked_group(params, group, layout[group])
        for leaf, kind in itertools.groupby(tensors, key=lambda t: t.leaf):  # all its blocks
            array = np.asarray(arrays.pop(leaf))  # read (checksummed, memory-mapped) here
            for t in kind:
                part = array if t.block is None else array[t.block]
                writer.write(t.hf_name, part.T if t.transpose else part)
                del part
            del array
            memory.release_memory()
        del arrays

    write_group("embed", [mapping.embed_tensor(m)])
    with tqdm.tqdm(total=mapping.n_layers(m), unit="layer", desc="export",
                   disable=not progress) as bar:
        for k in range(m.architecture.n_stacks):
            write_group(store.stack_group(k), mapping.stack_tensors(m, k))
            bar.update(b)
    for t in mapping.head_tensors(m):
        write_group(t.group, [t])


# ----------------------------------------------------------------------------- import


# -------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.hf",
        description="Export a StackWise run to an HF Llama directory (safetensors), or import "
                    "an HF Llama checkpoint into a new StackWise run directory.")
    p.add_argument("--workdir", required=True, help="the StackWise run directory (read on "
                   "export, created on import)")
    p.add_argument("--out", help="export: the HF directory to write")
    p.add_argument("--dtype", default="float32", choices=sorted(stream.DTYPES),
                   help="export: weight dtype of the safetensors files (default float32)")
    p.add_argument("--max_shard_size", default="5GB",
                   help="export: largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--allow_unfinished", action="store_true",
                   help="export: accept a run whose latest checkpoint is not the end of training")
    p.add_argument("--import_from", metavar="HF_DIR",
                   help="import: an HF Llama directory (config.json, safetensors, tokenizer)")
    p.add_argument("--config", help="import: config file giving the stack partition "
                   "(e.g. configs/tiny.py); --config.KEY=VALUE overrides it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (export) or --workdir (import)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = config_lib.split_overrides(argv)
        args = _parser().parse_args(rest)
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs chatter at WARNING
        if args.import_from:
            if args.out:
                raise UserError("--out is for export; an import writes the run to --workdir")
            if not args.config:
                raise UserError("--import_from needs --config=FILE: the config gives the stack "
                                "partition (model.architecture.*) and must match the HF model")
            cfg = config_lib.load(args.config, overrides)
            import_hf(args.import_from, args.workdir, cfg, args.overwrite, not args.quiet)
            print(f"imported {args.import_from} into {args.workdir} (step 0, not yet trained)")
        else:
            if not args.out:
                raise UserError("give --out=OUT_DIR to export, or --import_from=HF_DIR to import")
            if args.config or overrides:
                raise UserError("--config is for --import_from; an export uses the run's own "
                                "config.json")
            export_run(args.workdir, args.out, args.dtype, args.max_shard_size, args.overwrite,
                       args.allow_unfinished, not args.quiet)
            print(f"exported {args.workdir} to {args.out} ({args.dtype})")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
