"""StackWise run <-> HF Llama directory (safetensors, config.json, tokenizer files): the CLI,
and the export. The import is in export/importing.py.

Export:  python -m export.hf --workdir=RUN_DIR --out=OUT_DIR [--dtype=float32|bfloat16]
                             [--max_shard_size=5GB] [--overwrite] [--allow_unfinished]
Import:  python -m export.hf --import_from=HF_DIR --workdir=RUN_DIR --config=configs/x.py
                             [--config.model.KEY=VALUE ...] [--overwrite]

The export streams: it reads one stored array of the Orbax checkpoint at a time and writes
it to the safetensors file at once, so host memory stays near one layer plus the embedding
and head whatever the model's size. Both directions write into a temporary directory beside
the target, renamed into place only when complete (export/dirs.py).
"""

from __future__ import annotations

import argparse
import os
import sys

import tqdm

from export import dirs, mapping, stream, tokenizer
from export.importing import import_hf
from stackwise_jax import checkpoint
from stackwise_jax import config as config_lib
from stackwise_jax.errors import UserError


# ----------------------------------------------------------------------------- export

def _finished_params_dir(workdir: str, cfg, allow_unfinished: bool) -> str:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise UserError(f"'{workdir}' has no checkpoint yet; train first")
    ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint.max_to_keep, create=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"'{workdir}' has no checkpoint yet; train first")
        meta = ckpt.meta(step)
    finally:
        ckpt.close()
    if not meta["done"] and not allow_unfinished:
        raise UserError(f"'{workdir}' has not finished training (latest checkpoint: stage "
                        f"{meta['stage']}, step {meta['step']}); finish it with the train command, "
                        "or pass --allow_unfinished to export the latest checkpoint as it is")
    params_dir = os.path.join(workdir, "checkpoints", str(step), "params")
    if not os.path.isdir(params_dir):
        raise UserError(f"checkpoint {step} in '{workdir}' has no params item")
    return params_dir


def _check_checkpoint_shapes(reader: stream.CheckpointReader, m) -> None:
    b = m.architecture.blocks_per_stack
    for t in mapping.all_tensors(m):
        if t.block not in (None, 0):
            continue
        want = ((b,) if t.block is not None else ()) + t.flax_shape
        got = reader.shape(t.path)
        if got != want:
            raise UserError(f"checkpoint tensor {'/'.join(map(str, t.path))} has shape {got} but "
                            f"the run's config.json needs {want}")


def export_run(workdir: str, out_dir: str, dtype: str = "float32", max_shard_size="5GB",
               overwrite: bool = False, allow_unfinished: bool = False,
               progress: bool = True) -> str:
    """Writes the run's latest (finished) checkpoint to out_dir as an HF Llama directory."""
    if dtype not in stream.DTYPES:
        raise UserError(f"--dtype={dtype!r}: choose one of {', '.join(stream.DTYPES)}")
    max_bytes = stream.parse_size(max_shard_size)
    cfg = checkpoint.read_config(workdir)
    m = cfg.model
    dirs.check_target(out_dir, "--out", overwrite, workdir)
    reader = stream.CheckpointReader(_finished_params_dir(workdir, cfg, allow_unfinished))
    _check_checkpoint_shapes(reader, m)

    from transformers import GenerationConfig, LlamaConfig

    with dirs.written_in_temp(out_dir) as tmp:
        tok = tokenizer.to_hf(os.path.join(workdir, "tokenizer"), tmp, cfg.data.seq_len)
        LlamaConfig(**mapping.hf_config_kwargs(cfg, tok, dtype)).save_pretrained(tmp)
        GenerationConfig(bos_token_id=tok["bos_id"], eos_token_id=tok["eos_id"],
                         pad_token_id=tok["eos_id"]).save_pretrained(tmp)
        tensors = mapping.all_tensors(m)
        writer = stream.ShardedWriter(tmp, [(t.hf_name, t.hf_shape) for t in tensors], dtype,
                                      max_bytes)
        _stream_weights(reader, m, writer, progress)
        writer.close()
    return out_dir


def _stream_weights(reader, m, writer, progress: bool) -> None:
    """Embedding, then stack by stack one stored array at a time, then final norm and head."""
    b = m.architecture.blocks_per_stack

    def write_single(t):
        array = reader.read(t.path)
        writer.write(t.hf_name, array.T if t.transpose else array)
        del array
        stream.release_memory()

    write_single(mapping.embed_tensor(m))
    with tqdm.tqdm(total=mapping.n_layers(m), unit="layer", desc="export",
                   disable=not progress) as bar:
        for k in range(m.architecture.n_stacks):
            tensors = mapping.stack_tensors(m, k)
            for first in range(0, len(tensors), b):  # one kind of tensor, all blocks
                group = tensors[first:first + b]
                for t, block in zip(group, reader.blocks(group[0].path)):
                    writer.write(t.hf_name, block.T if t.transpose else block)
                stream.release_memory()
            bar.update(b)
    for t in mapping.head_tensors(m):
        write_single(t)


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
