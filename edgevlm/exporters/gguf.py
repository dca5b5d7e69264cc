"""GGUF mechanics shared by every family: writing a language model with its tokenizer, quantizing, reading back.

A family module turns its checkpoint into GGUF tensor names, hyperparameters and a `GGUFTokenizer`; this module
writes them the way llama.cpp's own converter would (norms and biases stay F32 in an F16 file), streaming one
tensor at a time so that a 2B model never needs twice its size in memory. Quantization goes through llama.cpp's
own quantizer (`llama_model_quantize`) so the result is exactly what `llama-quantize` would produce.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm.errors import EdgeVLMError
from edgevlm.gguf_header import GGUF_MAGIC, read_gguf_header

from .quantize_process import run_quantizer

logger = logging.getLogger(__name__)

# A callable returning a fresh iterator of (gguf_tensor_name, array): a numpy array or a CPU torch tensor. The
# writer walks it twice: with shapes_only=True for names and shapes (the header precedes the data; arrays may then be
# meta tensors, nothing is read), then with False for the data, one tensor in memory at a time. Arrays should be
# views of weights in memory or tensors read from the checkpoint one by one, never a copy of the model.
TensorSource = Callable[[bool], Iterable[tuple[str, Any]]]

# Output precisions of `write_gguf`, as (numpy dtype of 2-D+ tensors, general.file_type).
WRITE_DTYPES = {"f32": (np.float32, 0), "f16": (np.float16, 1)}  # LlamaFileType.ALL_F32 / MOSTLY_F16

# `quantize_gguf` types → the name of llama.cpp's `llama_ftype` constant in llama_cpp.
QUANT_FTYPES = {
    "F32": "LLAMA_FTYPE_ALL_F32",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


# Special-token roles a GGUF can name, → the tokenizer.ggml.*_token_id key.
SPECIAL_TOKEN_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's spelling
}


class QuantizationError(EdgeVLMError):
    """llama.cpp's quantizer refused or failed; no output file was left behind."""


@dataclass(frozen=True)
class GGUFTokenizer:
    """A tokenizer as llama.cpp stores it (`tokenizer.ggml.*`): one entry per model vocabulary row."""

    model: str  # "gpt2": byte-level BPE (`tokenizer_from_hf`); "llama": SentencePiece (`tokenizer_from_sentencepiece`)
    pre: str | None  # llama.cpp's pre-tokenizer name for BPE, e.g. "qwen2"; None for SentencePiece
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]  # BPE: "left right", in priority order; SentencePiece: none (its scores order the merges)
    special_ids: dict[str, int] = field(default_factory=dict)  # role (SPECIAL_TOKEN_KEYS) → id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    # Unicode normal form ("NFC", ...) the HF tokenizer applies before BPE. llama.cpp's BPE does not normalize,
    # so this is not stored in the GGUF: the runtime applies it (unicodedata.normalize) before tokenizing.
    normalization: str | None = None
    scores: list[float] | None = None  # SentencePiece: one per token
    add_space_prefix: bool | None = None  # SentencePiece: "▁" before the text (its add_dummy_prefix)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.token_types):
            raise ValueError(f"tokenizer has {len(self.tokens)} tokens but {len(self.token_types)} token types")
        if self.scores is not None and len(self.scores) != len(self.tokens):
            raise ValueError(f"tokenizer has {len(self.tokens)} tokens but {len(self.scores)} scores")
        for role, token_id in self.special_ids.items():
            if role not in SPECIAL_TOKEN_KEYS:
                raise ValueError(f"unknown special token role {role!r}; expected one of {sorted(SPECIAL_TOKEN_KEYS)}")
            if not 0 <= token_id < len(self.tokens):
                raise ValueError(
                    f"special token {role}={token_id} is outside the vocabulary (0..{len(self.tokens) - 1})"
                )


def tokenizer_from_hf(
    hf_tokenizer: Any,
    *,
    vocab_size: int,
    pre: str,
    special_ids: Mapping[str, int],
    add_bos: bool = False,
    chat_template: str | None = None,
) -> GGUFTokenizer:
    """A `GGUFTokenizer` from a Hugging Face fast tokenizer (its `tokenizer.json`), padded to `vocab_size` rows.

    Token types follow llama.cpp's converter: special added tokens are CONTROL (matched only when parsing
    specials), other added tokens USER_DEFINED (always matched whole), rows with no token UNUSED ("[PAD<i>]").
    `pre` names llama.cpp's pre-tokenizer: it must be the one whose regex equals the HF pre-tokenizer's.
    """
    import gguf

    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(hf_tokenizer).__name__} is not a fast tokenizer; GGUF export needs tokenizer.json")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"tokenizer model {spec['model']['type']!r} is not supported; only byte-level BPE is")

    if "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError("tokenizer is BPE but not byte-level (no ByteLevel pre-tokenizer); llama.cpp's gpt2 needs it")
    normalization = _unicode_normalization(spec.get("normalizer"))
    by_id: dict[int, str] = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    for token_id, entry in added.items():
        by_id[token_id] = entry["content"]
    if max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")

    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)

    merges = []
    for merge in spec["model"].get("merges", []):
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in part for part in pair):
            raise ValueError(f"merge {merge!r} cannot be stored in GGUF (a part contains a space)")
        merges.append(" ".join(pair))

    return GGUFTokenizer(
        model="gpt2", pre=pre, tokens=tokens, token_types=[int(t) for t in types], merges=merges,
        special_ids=dict(special_ids), add_bos=add_bos, chat_template=chat_template, normalization=normalization,
    )  # fmt: skip


# Score of rows that are not SentencePiece pieces (added tokens, padding), as llama.cpp's converter writes it.
ADDED_TOKEN_SCORE = -1000.0


def tokenizer_from_sentencepiece(
    model_file: str | Path,
    *,
    added_tokens: Mapping[int, tuple[str, bool]],
    vocab_size: int,
    special_ids: Mapping[str, int],
    add_bos: bool,
    chat_template: str | None = None,
) -> GGUFTokenizer:
    """A "llama" (SentencePiece) `GGUFTokenizer` from a `tokenizer.model`, as llama.cpp's converter builds it.

    Pieces keep their scores and SentencePiece types (normal, unknown, control, unused, byte: the same numbers as
    gguf.TokenType). `added_tokens` maps token ids to (text, special); those beyond the SentencePiece model
    (LLaVA's `<image>`) are added, special ones as CONTROL, others USER_DEFINED; pieces of the model that transformers
    lists as added tokens (user-defined pieces, which SentencePiece's API reports as normal: Gemma's turn and image
    tokens) get those types too, as llama.cpp's converter gives them. Rows with no token up to `vocab_size` are UNUSED
    "[PAD<i>]".
    """
    import gguf

    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError("a SentencePiece tokenizer needs sentencepiece: pip install 'edgevlm[export]'") from e
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    n_pieces = processor.vocab_size()
    tokens, scores, types = [], [], []
    for i in range(n_pieces):
        tokens.append(processor.id_to_piece(i))
        scores.append(float(processor.get_score(i)))
        kinds = ((processor.is_unknown, gguf.TokenType.UNKNOWN), (processor.is_control, gguf.TokenType.CONTROL),
                 (processor.is_unused, gguf.TokenType.UNUSED), (processor.is_byte, gguf.TokenType.BYTE))  # fmt: skip
        kind = next((kind for test, kind in kinds if test(i)), gguf.TokenType.NORMAL)
        if kind == gguf.TokenType.NORMAL and i in added_tokens:  # a user-defined piece (Gemma's <start_of_turn>)
            kind = gguf.TokenType.CONTROL if added_tokens[i][1] else gguf.TokenType.USER_DEFINED
        types.append(kind)
    if max([*added_tokens, n_pieces - 1]) >= vocab_size:
        raise ValueError(f"tokenizer has id {max([*added_tokens, n_pieces - 1])} but the model's vocab_size is {vocab_size}")  # fmt: skip
    for i in range(n_pieces, vocab_size):
        text, special = added_tokens.get(i, (f"[PAD{i}]", None))
        tokens.append(text)
        scores.append(ADDED_TOKEN_SCORE)
        types.append(gguf.TokenType.UNUSED if special is None else gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)  # fmt: skip
    dummy_prefix = processor.encode("a", out_type=str)[0].startswith("\u2581")
    return GGUFTokenizer(
        model="llama", pre=None, tokens=tokens, token_types=[int(t) for t in types], merges=[], scores=scores,
        special_ids=dict(special_ids), add_bos=add_bos, chat_template=chat_template, add_space_prefix=dummy_prefix,
    )  # fmt: skip


def sentencepiece_tokenizer_of(
    tokenizer: Any, model_file: str | Path, vocab_size: int, chat_template: str | None
) -> tuple[GGUFTokenizer, dict[str, int]]:
    """The GGUF tokenizer of a transformers SentencePiece tokenizer (Llama's, Gemma's): the pieces of `model_file`,
    the tokens added to it (special ones CONTROL), its BOS/EOS/UNK/PAD ids and BOS added at the start, as
    transformers does. Also returns those ids by role."""
    roles = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id}  # fmt: skip
    special_ids = {role: int(i) for role, i in roles.items() if i is not None}
    added = {int(i): (token.content, bool(token.special)) for i, token in tokenizer.added_tokens_decoder.items()}
    gguf_tokenizer = tokenizer_from_sentencepiece(
        model_file, added_tokens=added, vocab_size=vocab_size, special_ids=special_ids, add_bos=True,
        chat_template=chat_template,
    )  # fmt: skip
    return gguf_tokenizer, special_ids


UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


def _unicode_normalization(normalizer: dict | None) -> str | None:
    """The Unicode form of a tokenizer.json normalizer; other normalizers cannot be reproduced, so they raise."""
    if normalizer is None:
        return None
    steps = normalizer["normalizers"] if normalizer["type"] == "Sequence" else [normalizer]
    kinds = [step["type"] for step in steps]
    if not kinds:
        return None
    if len(kinds) == 1 and kinds[0] in UNICODE_FORMS:
        return kinds[0]
    raise ValueError(
        f"tokenizer normalizer {kinds} is not supported: llama.cpp's BPE tokenizer does not normalize text, "
        f"and the runtime can only apply one of {UNICODE_FORMS}"
    )


def write_gguf(
    out_path: str | Path,
    *,
    arch: str,
    metadata: Mapping[str, Any],
    tensors: TensorSource,
    tokenizer: GGUFTokenizer,
    dtype: str = "f16",
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a GGUF language model to `out_path` (atomically: a `.partial` file renamed at the end).

    `metadata` maps GGUF keys to values: int → UINT32 (what llama.cpp reads hyperparameters as), float → FLOAT32,
    bool, str, list of ints → INT32 array; pass `(value, gguf.GGUFValueType)` to choose another type.
    `dtype` "f16" stores 2-D+ tensors as F16 and keeps 1-D ones (norms, biases) F32, like llama.cpp's converter.
    `progress(n_written, n_total)` is called after each tensor.
    """
    import gguf

    if dtype not in WRITE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(WRITE_DTYPES)}")
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output directory {out_path.parent} does not exist")
    matrix_dtype, file_type = WRITE_DTYPES[dtype]

    # Pass 1: names, shapes and stored types only (the header comes before any data).
    plan: list[tuple[str, tuple[int, ...], type]] = []
    for tensor_name, array in tensors(True):
        stored = np.float32 if array.ndim <= 1 else matrix_dtype
        plan.append((tensor_name, tuple(array.shape), stored))
    if not plan:
        raise ValueError("the tensor source yielded no tensors")

    partial = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        if name:
            writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in metadata.items():
            _add_metadata(writer, key, value)
        _add_tokenizer(writer, tokenizer)
        for tensor_name, shape, stored in plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(stored).itemsize
            writer.add_tensor_info(tensor_name, shape, np.dtype(stored), nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        # Pass 2: the data, one tensor in memory at a time.
        n_written = 0
        for (tensor_name, array), (planned_name, shape, stored) in zip(tensors(False), plan, strict=True):
            if tensor_name != planned_name or tuple(array.shape) != shape:
                raise ValueError(
                    f"the tensor source changed between passes: got {tensor_name} {tuple(array.shape)}, "
                    f"expected {planned_name} {shape}"
                )
            writer.write_tensor_data(np.ascontiguousarray(array, dtype=stored))
            n_written += 1
            if progress is not None:
                progress(n_written, len(plan))
        writer.close()
        os.replace(partial, out_path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%d tensors, %s)", out_path, len(plan), dtype)
    return out_path


# A decoder's HF tensor names (after the language model's prefix) -> llama.cpp's, `{bid}` the layer index: the
# names llama.cpp's llama and qwen2 families share (an architecture adds its own, e.g. qwen2's q/k/v biases).
DECODER_TENSOR_MAP = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def decoder_tensor_name(name: str, table: Mapping[str, str]) -> str | None:
    """llama.cpp's name for a decoder tensor (its HF name without the language model's prefix) by `table`, a
    `DECODER_TENSOR_MAP`-style map; None when the table has no entry for it."""
    if name in table:
        return table[name]
    layer = _LAYER_RE.match(name)
    key = f"layers.{{bid}}.{layer.group(2)}" if layer else None
    return table[key].format(bid=int(layer.group(1))) if key in table else None


def rope_settings(text_config: Any) -> tuple[dict, float | None]:
    """A transformers text config's rope parameters (either spelling) and rope theta (None when it has none)."""
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    return rope, rope.get("rope_theta", getattr(text_config, "rope_theta", None))


def decoder_hparams(arch: str, text_config: Any, rope_theta: float) -> dict[str, Any]:
    """The GGUF metadata every decoder-only architecture of llama.cpp reads, from a transformers text config;
    an architecture adds its own keys (rope sections, rope dimensions, …)."""
    import gguf

    def key(template: str) -> str:
        return template.format(arch=arch)

    return {
        key(gguf.Keys.LLM.CONTEXT_LENGTH): int(text_config.max_position_embeddings),
        key(gguf.Keys.LLM.EMBEDDING_LENGTH): int(text_config.hidden_size),
        key(gguf.Keys.LLM.BLOCK_COUNT): int(text_config.num_hidden_layers),
        key(gguf.Keys.LLM.FEED_FORWARD_LENGTH): int(text_config.intermediate_size),
        key(gguf.Keys.Attention.HEAD_COUNT): int(text_config.num_attention_heads),
        key(gguf.Keys.Attention.HEAD_COUNT_KV): int(text_config.num_key_value_heads),
        key(gguf.Keys.Rope.FREQ_BASE): float(rope_theta),
        key(gguf.Keys.Attention.LAYERNORM_RMS_EPS): float(text_config.rms_norm_eps),
    }


def decoder_summary(arch: str, dtype: str, text_config: Any, n_vocab: int, chat_template: str | None) -> dict[str, Any]:  # fmt: skip
    """What an LLM writer reports of any decoder GGUF it wrote (the manifest's `llm` section reads it); a family adds
    its own entries (special tokens, tied embeddings, …)."""
    return {
        "arch": arch,
        "dtype": dtype,
        "n_ctx_train": int(text_config.max_position_embeddings),
        "embedding_length": int(text_config.hidden_size),
        "block_count": int(text_config.num_hidden_layers),
        "n_vocab": n_vocab,
        "chat_template_in_gguf": chat_template is not None,
    }


def _add_metadata(writer: Any, key: str, value: Any) -> None:
    import gguf

    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], gguf.GGUFValueType):
        value, value_type = value
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, list(value))
        else:
            writer.add_key_value(key, value, value_type)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        if value < 0:
            raise ValueError(f"metadata {key}={value}: negative ints need an explicit (value, GGUFValueType)")
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        writer.add_array(key, list(value))
    else:
        raise ValueError(f"metadata {key}={value!r}: unsupported value type {type(value).__name__}")


def _add_tokenizer(writer: Any, tokenizer: GGUFTokenizer) -> None:
    writer.add_tokenizer_model(tokenizer.model)
    if tokenizer.pre is not None:
        writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.token_types)
    if tokenizer.scores is not None:
        writer.add_token_scores(tokenizer.scores)
    if tokenizer.merges:
        writer.add_token_merges(tokenizer.merges)
    if tokenizer.add_space_prefix is not None:
        writer.add_add_space_prefix(tokenizer.add_space_prefix)
    for role, token_id in tokenizer.special_ids.items():
        writer.add_uint32(SPECIAL_TOKEN_KEYS[role], token_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(tokenizer.add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def quantize_gguf(src_path: str | Path, dst_path: str | Path, qtype: str, *, n_threads: int | None = None) -> Path:
    """Quantize a GGUF with llama.cpp's quantizer (`llama_model_quantize`, default parameters) to `qtype`.

    `qtype` is one of `QUANT_FTYPES` ("F16", "Q8_0", "Q4_K_M", ...). K-quants need every row length to be a
    multiple of 256; llama.cpp falls back to another type for tensors that are not. The output is written to
    `<dst>.partial` and renamed on success; on failure or interruption nothing is left at `dst_path`. llama.cpp
    runs in a child process (`quantize_process`), killed if this one is interrupted.
    """
    qtype_key = qtype.upper()
    if qtype_key not in QUANT_FTYPES:
        raise ValueError(f"unknown quantization type {qtype!r}; expected one of {', '.join(QUANT_FTYPES)}")
    src_path, dst_path = Path(src_path), Path(dst_path)
    if not src_path.is_file():
        raise FileNotFoundError(f"GGUF to quantize not found: {src_path}")
    with src_path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise QuantizationError(f"{src_path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    if not dst_path.parent.is_dir():
        raise FileNotFoundError(f"output directory {dst_path.parent} does not exist")
    if dst_path.resolve() == src_path.resolve():
        raise ValueError(f"quantizing {src_path} onto itself; choose another output path")
    partial = dst_path.with_name(dst_path.name + ".partial")
    logger.info("quantizing %s → %s (%s)", src_path, dst_path, qtype_key)
    try:
        reason = run_quantizer(src_path, partial, QUANT_FTYPES[qtype_key], n_threads)  # a child process: interruptible
        if reason is not None:
            raise QuantizationError(f"llama.cpp could not quantize {src_path} to {qtype_key}: {reason}")
        os.replace(partial, dst_path)
    finally:
        partial.unlink(missing_ok=True)
    return dst_path


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """A GGUF's key/value metadata as plain Python values (str, int, float, bool, lists of those)."""
    return read_gguf_header(path).metadata


def read_gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Each tensor's stored type name ("F32", "F16", "Q4_K", ...), by GGUF tensor name, in file order."""
    import gguf

    types = read_gguf_header(path).tensor_types
    return {name: gguf.GGMLQuantizationType(type_id).name for name, type_id in types.items()}
