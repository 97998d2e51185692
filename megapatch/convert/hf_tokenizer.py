"""Hugging Face tokenizer files from a sentencepiece model, without protobuf or transformers.

Writes ``tokenizer.model`` (the sentencepiece file itself, for slow tokenizers and llama.cpp),
``tokenizer.json`` (a ``tokenizers`` BPE with byte fallback, the same structure as Llama-2's),
``tokenizer_config.json`` and ``special_tokens_map.json``. ``tokenizer.json`` is produced for
sentencepiece BPE models with the identity normaliser (the models ``megapatch
train-tokenizer`` writes, and Llama-2's); for other models only ``tokenizer.model`` is written
and transformers converts it itself (which needs protobuf).

The few settings that decide how sentencepiece encodes are read straight from the model's
protobuf bytes by a minimal wire-format reader (field numbers from sentencepiece_model.proto).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import sentencepiece as spm

from megapatch.convert.common import ConvertError

SPIECE_UNDERLINE = "\u2581"


@dataclass(frozen=True)
class SentencePieceSettings:
    """What sentencepiece does besides the vocabulary (from the model's protobuf)."""

    model_type: int  # 1 unigram, 2 bpe, 3 word, 4 char
    normalizer: str  # normalization_rule_name, e.g. "identity" or "nmt_nfkc"
    has_charsmap: bool  # a precompiled normalisation table is present
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    byte_fallback: bool

    @property
    def fast_convertible(self) -> bool:
        """Whether the ``tokenizer.json`` written here encodes exactly like sentencepiece."""
        return (
            self.model_type == 2
            and (self.normalizer == "identity" or not self.has_charsmap)
            and not self.remove_extra_whitespaces
            and self.escape_whitespaces
        )


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one protobuf message (no nesting resolved)."""
    out = []
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    while i < len(buf):
        tag = varint()
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            out.append((num, wire, varint()))
        elif wire == 1:
            out.append((num, wire, buf[i : i + 8]))
            i += 8
        elif wire == 2:
            n = varint()
            out.append((num, wire, buf[i : i + n]))
            i += n
        elif wire == 5:
            out.append((num, wire, buf[i : i + 4]))
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def read_settings(model_bytes: bytes) -> SentencePieceSettings:
    """The encoding settings stored in a sentencepiece model file."""
    trainer: dict[int, int | bytes] = {}
    normalizer: dict[int, int | bytes] = {}
    for num, _, value in _fields(model_bytes):
        if num == 2 and isinstance(value, bytes):  # TrainerSpec
            trainer = {n: v for n, _, v in _fields(value)}
        elif num == 3 and isinstance(value, bytes):  # NormalizerSpec
            normalizer = {n: v for n, _, v in _fields(value)}
    name = normalizer.get(1, b"")
    return SentencePieceSettings(
        model_type=int(trainer.get(3, 1)),  # type: ignore[arg-type]
        normalizer=name.decode() if isinstance(name, bytes) else "",
        has_charsmap=bool(normalizer.get(2)),
        add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        escape_whitespaces=bool(normalizer.get(5, 1)),
        byte_fallback=bool(trainer.get(35, 0)),
    )


def load_processor(path: str) -> tuple[spm.SentencePieceProcessor, bytes]:
    """A sentencepiece model and its bytes; a clear error naming the file otherwise."""
    if not os.path.isfile(path):
        raise ConvertError(f"tokenizer model {path} not found; pass --tokenizer-model")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return spm.SentencePieceProcessor(model_proto=data), data
    except RuntimeError:
        raise ConvertError(f"{path} is not a sentencepiece model (--tokenizer-model)") from None


def _special_ids(sp: spm.SentencePieceProcessor) -> dict[str, int | None]:
    def ok(i: int) -> int | None:
        return i if 0 <= i < sp.vocab_size() else None

    return {
        "unk": ok(sp.unk_id()),
        "bos": ok(sp.bos_id()),
        "eos": ok(sp.eos_id()),
        "pad": ok(sp.pad_id()),
    }


def special_token_ids(path: str) -> dict[str, int | None]:
    """unk/bos/eos/pad ids of a sentencepiece model (None where absent)."""
    sp, _ = load_processor(path)
    return _special_ids(sp)


def tokenizer_json(
    sp: spm.SentencePieceProcessor, settings: SentencePieceSettings, add_bos: bool
) -> dict:
    """The ``tokenizers`` JSON of a sentencepiece BPE model (Llama-2's structure).

    Merges are every split of a piece into two pieces of the vocabulary, ranked by the score of
    the merged piece (sentencepiece BPE merges the highest-scoring pair first).
    """
    n = sp.vocab_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    merges = []
    for i, piece in enumerate(pieces):
        if i in special or sp.is_byte(i) or sp.is_unused(i):
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                merges.append((-sp.get_score(i), vocab[a], vocab[b], a, b))
    merges.sort()
    normalizers = []
    if settings.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": SPIECE_UNDERLINE})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE})
    decoders = [
        {"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if settings.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    ids = _special_ids(sp)
    post = None
    if add_bos and ids["bos"] is not None:
        bos = pieces[ids["bos"]]
        post = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [ids["bos"]], "tokens": [bos]}},
        }
    unk = pieces[ids["unk"]] if ids["unk"] is not None else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": pieces[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in special
        ],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": settings.byte_fallback,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[a, b] for *_, a, b in merges],
        },
    }


def write_tokenizer_files(
    model_path: str, out_dir: str, *, add_bos_token: bool, model_max_length: int
) -> list[str]:
    """Write the Hugging Face tokenizer files for ``model_path``; returns the names written."""
    sp, data = load_processor(model_path)
    settings = read_settings(data)
    ids = _special_ids(sp)

    def piece(i: int | None) -> str | None:
        return sp.id_to_piece(i) if i is not None else None

    written = ["tokenizer.model"]
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))
    special = {
        k + "_token": piece(ids[k]) for k in ("bos", "eos", "unk", "pad") if ids[k] is not None
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "add_prefix_space": None,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "sp_model_kwargs": {},
        **special,
        "pad_token": piece(ids["pad"]),
    }
    if settings.fast_convertible:
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer_json(sp, settings, add_bos_token), f, ensure_ascii=False)
        written.append("tokenizer.json")
        # The JSON defines the whole pipeline; a generic fast tokenizer runs it verbatim.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("add_prefix_space", "legacy", "sp_model_kwargs"):
            config.pop(key)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({k: v for k, v in special.items() if v is not None}, f, indent=2)
    written += ["tokenizer_config.json", "special_tokens_map.json"]
    return written
