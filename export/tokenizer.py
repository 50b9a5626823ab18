"""A run's tokenizer <-> HF tokenizer files.

The [MASK] token the masked-diffusion objective trains with stays in the exported
vocabulary, at the same id, as the tokenizer's `mask_token`, so token ids mean the same
thing in both worlds. Causal generation never needs it.
"""

from __future__ import annotations

import json
import os
import sys

import tokenizers

from stackwise_jax import data
from stackwise_jax.errors import UserError

PROBE = "The quick brown fox, 3 times:\n  jumps over the lazy dog.\tÜnïcödé 日本"
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


def _meta(run_tok_dir: str) -> dict:
    path = os.path.join(run_tok_dir, data.META)
    if not os.path.isfile(path):
        raise UserError(f"the run has no complete tokenizer ({path} is missing)")
    with open(path) as f:
        return json.load(f)


def to_hf(run_tok_dir: str, out_dir: str, model_max_length: int) -> dict:
    """Writes HF tokenizer files for the run's tokenizer into out_dir.

    Returns {"bos_id", "eos_id", "mask_id"} for the model config.
    """
    meta = _meta(run_tok_dir)
    ours = data.Tokenizer.load(run_tok_dir)
    if meta["kind"] == "hf":
        hf = _hf_from_tokenizer_json(os.path.join(run_tok_dir, "tokenizer.json"), meta)
    else:
        hf = _hf_from_sentencepiece(run_tok_dir, meta)
    for role in ("mask", "eos"):
        got = getattr(hf, f"{role}_token_id")
        if got != meta[f"{role}_id"]:
            raise UserError(f"the exported tokenizer maps its {role} token to id {got}, the run "
                            f"uses {meta[f'{role}_id']}; this tokenizer cannot be exported as is")
    if hf(PROBE, add_special_tokens=False)["input_ids"] != ours.encode(PROBE):
        print("warning: the HF tokenizer splits some text differently from the run's tokenizer "
              "(e.g. a SentencePiece model with text normalization); check before use",
              file=sys.stderr)
    hf.model_max_length = model_max_length
    hf.save_pretrained(out_dir)
    return {"bos_id": hf.bos_token_id, "eos_id": meta["eos_id"], "mask_id": meta["mask_id"]}


def _hf_from_tokenizer_json(path: str, meta: dict):
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer.from_file(path)
    eos = backend.id_to_token(meta["eos_id"])
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    bos = next((t for t in BOS_CANDIDATES if t in added), None)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos,
                                   bos_token=bos, mask_token=backend.id_to_token(meta["mask_id"]))


def _hf_from_sentencepiece(run_tok_dir: str, meta: dict):
    """The Llama converter; ids the run appended after the pieces are added in id order."""
    from transformers import LlamaTokenizer

    hf = LlamaTokenizer.from_pretrained(run_tok_dir, add_bos_token=False, legacy=False)
    extra = {meta["mask_id"]: ("mask_token", data.MASK), meta["eos_id"]: ("eos_token", data.EOS)}
    for token_id in sorted(i for i in extra if i >= len(hf)):
        role, text = extra[token_id]
        hf.add_special_tokens({role: text})
    if meta["mask_id"] < len(hf) and hf.mask_token is None:  # [MASK] is one of the pieces
        hf.add_special_tokens({"mask_token": data.MASK})
    hf.pad_token = hf.eos_token
    return hf


def from_hf(hf_dir: str, run_tok_dir: str) -> data.Tokenizer:
    """Builds the run's tokenizer from an HF directory ([MASK] appended when missing)."""
    json_path = os.path.join(hf_dir, "tokenizer.json")
    sp_path = os.path.join(hf_dir, "tokenizer.model")
    try:
        if os.path.isfile(json_path):
            tok = data.Tokenizer(tokenizers.Tokenizer.from_file(json_path))
        elif os.path.isfile(sp_path):
            import sentencepiece

            tok = data.Tokenizer(sentencepiece.SentencePieceProcessor(model_file=sp_path))
        else:
            raise UserError(f"'{hf_dir}' has no tokenizer.json nor tokenizer.model")
    except UserError:
        raise
    except Exception as e:  # the bindings raise several types on a bad file
        raise UserError(f"cannot load the tokenizer in '{hf_dir}': {e}") from None
    tok.save(run_tok_dir)
    return tok
