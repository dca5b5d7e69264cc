"""The language model half: a GGUF run by llama.cpp through llama-cpp-python's low-level API.

The high-level `llama_cpp.Llama` cannot take image embeddings with 4-slot M-RoPE positions, so this module talks
to llama.cpp directly: it decodes token batches and embedding batches (`llama_batch.embd`) into one KV cache, and
samples with llama.cpp's sampler chain.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from ..chat import check_grammar_limits
from ..errors import BundleError, ContextOverflowError, GrammarError
from ..llama_backend import collect_llama_errors, cpu_has_amx, deliver_interrupts, init_llama
from ..profiles import LlamaSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 40
    top_p: float = 0.95
    seed: int = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: random
    grammar: str | None = None  # GBNF, root rule `root`: only tokens the grammar allows are sampled


def _outputs(logits: str, is_last_chunk: bool) -> str:
    """Which rows of one batch produce logits: "all", "last" (only in the last chunk) or "none"."""
    if logits not in ("all", "last", "none"):
        raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
    if logits == "last":
        return "last" if is_last_chunk else "none"
    return logits


# llama_token_data as a numpy record: candidates for a sampler, built from the logits without a Python loop
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _ggml_type(name: str) -> int:
    ggml_type = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if ggml_type is None:
        raise ValueError(f"KV cache type {name!r} is not a ggml type this llama-cpp-python knows")
    return ggml_type


def _set_load_mode(model_params, mmap: bool | None, mlock: bool) -> None:
    """mmap/mlock as llama.cpp's `load_mode` (llama-cpp-python >= 0.3.36; older ones have use_mmap/use_mlock).

    Assigning a name that is not a ctypes field would be silently ignored, so the fields are checked first.
    """
    fields = {name for name, *_ in type(model_params)._fields_}
    if "load_mode" in fields:
        if mmap is None and not mlock:
            return  # LLAMA_LOAD_MODE_AUTO, the default
        mode = {(True, False): "MMAP", (True, True): "MMAP_MLOCK", (False, True): "MLOCK", (False, False): "NONE"}
        model_params.load_mode = getattr(llama_cpp, f"LLAMA_LOAD_MODE_{mode[bool(mmap is None or mmap), mlock]}")
    elif {"use_mmap", "use_mlock"} <= fields:
        if mmap is not None:
            model_params.use_mmap = mmap
        model_params.use_mlock = mlock
    elif mmap is not None or mlock:
        raise RuntimeError("this llama-cpp-python exposes neither load_mode nor use_mmap/use_mlock; "
                           "leave mmap and mlock unset in the profile")  # fmt: skip


def _default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def plain_llama(gguf_path: str | os.PathLike, *, repack_weights: bool | None = None, **llama_kwargs) -> llama_cpp.Llama:  # fmt: skip
    """llama-cpp-python's high-level `Llama` on a GGUF, with `LlamaLM`'s rule for extra buffer types (a baseline,
    and a check that bundles work in stock llama.cpp). `Llama` does not expose the flag, so its default model
    parameters are patched while it loads."""
    init_llama()
    use_extra_bufts = repack_weights if repack_weights is not None else not cpu_has_amx()
    llama_kwargs.setdefault("use_mmap", not use_extra_bufts)  # `LlamaLM`'s rule: read the file where it repacks
    module = llama_cpp.llama_cpp
    default_params = module.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = use_extra_bufts
        return p

    module.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(gguf_path), **llama_kwargs)
    finally:
        module.llama_model_default_params = default_params


class LlamaLM:
    """One GGUF model with one context (KV cache) and a sampler. Not thread-safe: one generation at a time."""

    def __init__(self, gguf_path: str | os.PathLike, settings: LlamaSettings = LlamaSettings()):
        init_llama()
        self.path = Path(gguf_path)
        self.settings = settings
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = settings.n_gpu_layers
        self.repack_weights = settings.repack_weights if settings.repack_weights is not None else not cpu_has_amx()
        model_params.use_extra_bufts = self.repack_weights
        self.mapped = settings.mmap if settings.mmap is not None else not self.repack_weights
        _set_load_mode(model_params, self.mapped, settings.mlock)
        with deliver_interrupts():  # loading logs a lot: a Ctrl-C lands in the log callback
            self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise BundleError(f"llama.cpp could not load {self.path}: the GGUF is corrupt or of an architecture this "
                              "llama-cpp-python does not know. Run `edgevlm verify BUNDLE`, or upgrade llama-cpp-python.")  # fmt: skip
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        # the width of an embeddings batch's rows: wider than n_embd when DeepStack sets ride along (qwen3vl)
        self.n_embd_inp = llama_cpp.llama_model_n_embd_inp(self._model)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)

        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = settings.n_ctx
        ctx_params.n_batch = settings.n_batch
        ctx_params.n_ubatch = min(settings.n_ubatch, settings.n_batch)
        ctx_params.n_threads = settings.n_threads or _default_threads()
        ctx_params.n_threads_batch = settings.n_threads_batch or ctx_params.n_threads
        if settings.flash_attn is not None:
            ctx_params.flash_attn_type = 1 if settings.flash_attn else 0
        ctx_params.type_k = ctx_params.type_v = _ggml_type(settings.kv_cache_type)
        ctx_params.no_perf = False
        # swa_full stays llama.cpp's default (true): a sliding-window model's cache then keeps every cell, so removing
        # the cache's tail for KV reuse leaves what the next tokens attend to (a pruned one would not have it)
        with deliver_interrupts():
            self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise BundleError(f"llama.cpp could not create a context of {settings.n_ctx} tokens for {self.path} "
                              "(out of memory?); lower n_ctx.")  # fmt: skip
        # llama.cpp rounds n_ctx up (to 256 at least) and clamps n_batch to it: use what it really made
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)
        self.n_ubatch = llama_cpp.llama_n_ubatch(self._ctx)
        self.n_threads, self.n_threads_batch = ctx_params.n_threads, ctx_params.n_threads_batch
        self.loaded_threads = (self.n_threads, self.n_threads_batch)  # what `use_threads` may lower from
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_past = 0  # number of cache slots filled (not the RoPE position, which M-RoPE advances differently)
        self._sampler = None  # greedy or top-k/top-p/temperature/dist chain
        self._grammar = None  # the request's grammar sampler, applied as in `sample`

    # -- metadata -------------------------------------------------------------------------------------------------
    def metadata(self, key: str) -> str | None:
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8")
            size = n + 1

    @property
    def chat_template(self) -> str | None:
        return self.metadata("tokenizer.chat_template")

    # -- tokens ---------------------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, parse_special: bool = True, add_special: bool = False) -> list[int]:
        """Token ids of `text`; `add_special` adds the BOS/EOS tokens the GGUF's tokenizer says a sequence starts
        (ends) with, as at the start of a prompt."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        return list(tokens[:n])

    def special_tokens(self) -> dict[int, str]:
        """The texts of the tokens llama.cpp matches by their text: control, user-defined and unknown ones."""
        kinds = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN  # fmt: skip
        out = {}
        for token in range(self.n_vocab):
            if llama_cpp.llama_vocab_get_attr(self._vocab, token) & kinds:
                out[token] = self.token_bytes(token, special=True).decode("utf-8", errors="replace")
        return out

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (a piece of a UTF-8 character possibly); control tokens render as nothing unless
        `special`."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -- decoding -------------------------------------------------------------------------------------------------
    def use_threads(self, n_threads: int, n_threads_batch: int) -> None:
        """Decode with these thread counts from now on (the context keeps its weights and cache)."""
        if (n_threads, n_threads_batch) != (self.n_threads, self.n_threads_batch):
            llama_cpp.llama_set_n_threads(self._ctx, n_threads, n_threads_batch)
            self.n_threads, self.n_threads_batch = n_threads, n_threads_batch

    def reset(self) -> None:
        """Forget the KV cache."""
        llama_cpp.llama_memory_clear(self._memory, True)
        self.n_past = 0

    def truncate(self, position: int, n_kept: int) -> None:
        """Remove every cache cell at `position` or later; `n_kept` cells remain (the caller counts them: under
        M-RoPE an image's cells share one position, so positions are not cell counts)."""
        if n_kept == 0:
            self.reset()
            return
        if not llama_cpp.llama_memory_seq_rm(self._memory, 0, position, -1):
            raise RuntimeError(f"llama.cpp could not remove the KV cache from position {position} on")
        self.n_past = n_kept

    def _check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.n_ctx:
            raise ContextOverflowError(
                f"{self.n_past + n_new} tokens do not fit in the context of {self.n_ctx} "
                f"({self.n_past} already used, {n_new} more); use a larger n_ctx or fewer/smaller images."
            )

    def decode_tokens(self, tokens: list[int], positions: np.ndarray, *, logits: str = "last") -> np.ndarray | None:
        """Decode text tokens at the given 1-D positions (llama.cpp expands them for M-RoPE).

        `logits`: "last" keeps the last token's logits for sampling, "all" also returns every token's logits
        (n, n_vocab), "none" computes none.
        """
        n_total = len(tokens)
        self._check_room(n_total)
        rows = []
        for start in range(0, n_total, self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            token_buf = (llama_cpp.llama_token * len(chunk))(*chunk)
            pos_buf = np.ascontiguousarray(positions[start : start + len(chunk)], dtype=np.int32)
            rows.append(self._decode(len(chunk), token_buf, None, pos_buf, _outputs(logits, start + len(chunk) == n_total)))  # fmt: skip
        return np.concatenate(rows) if logits == "all" else None

    def decode_embeddings(self, embeddings: np.ndarray, positions: np.ndarray, *, logits: str = "none",
                          bidirectional: bool = False) -> np.ndarray | None:  # fmt: skip
        """Decode input embeddings (n, n_embd_inp) at positions of shape (n_pos_per_token, n), section-major.

        `bidirectional`: the embeddings attend to each other (and to the cache before them), not causally: one batch
        with llama.cpp's causal attention off, as its own multimodal path decodes such images (mtmd-helper's
        `scope_non_causal`); they must fit in one micro-batch.
        """
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        positions = np.atleast_2d(np.asarray(positions, dtype=np.int32))
        n_total, dim = embeddings.shape
        if dim != self.n_embd_inp:
            raise ValueError(f"image embeddings have width {dim}, the language model expects {self.n_embd_inp}")
        if positions.shape[1] != n_total:
            raise ValueError(f"{positions.shape[1]} positions for {n_total} embeddings")
        self._check_room(n_total)
        if bidirectional:
            return self._decode_bidirectional(embeddings, positions, logits)
        rows = []
        for start in range(0, n_total, self.n_batch):
            chunk = embeddings[start : start + self.n_batch]
            # each batch carries its own section-major layout: pos[i], pos[i+n], pos[i+2n], pos[i+3n]
            pos_buf = np.ascontiguousarray(positions[:, start : start + len(chunk)].reshape(-1))
            rows.append(self._decode(len(chunk), None, chunk, pos_buf, _outputs(logits, start + len(chunk) == n_total)))  # fmt: skip
        return np.concatenate(rows) if logits == "all" else None

    def _decode_bidirectional(self, embeddings: np.ndarray, positions: np.ndarray, logits: str) -> np.ndarray | None:
        n = len(embeddings)
        if n > min(self.n_batch, self.n_ubatch):
            # llama.cpp aborts the process on a non-causal batch larger than n_ubatch: refuse it here
            raise BundleError(f"an image of {n} tokens must be decoded in one batch (its tokens attend to each other), "
                              f"but this context has n_batch {self.n_batch} and n_ubatch {self.n_ubatch}; raise both "
                              f"to at least {n} in the hardware profile.")  # fmt: skip
        pos_buf = np.ascontiguousarray(positions.reshape(-1))
        llama_cpp.llama_set_causal_attn(self._ctx, False)
        try:
            return self._decode(n, None, embeddings, pos_buf, _outputs(logits, True))
        finally:
            llama_cpp.llama_set_causal_attn(self._ctx, True)

    def _decode(self, n: int, token, embd: np.ndarray | None, pos: np.ndarray, outputs: str) -> np.ndarray | None:
        n_seq_id = (ctypes.c_int32 * n)(*([1] * n))
        seq_zero = (llama_cpp.llama_seq_id * 1)(0)
        seq_ptr = ctypes.cast(seq_zero, ctypes.POINTER(llama_cpp.llama_seq_id))
        seq_ptrs = (ctypes.POINTER(llama_cpp.llama_seq_id) * n)(*([seq_ptr] * n))
        flags = (ctypes.c_int8 * n)(*([1] * n if outputs == "all" else [0] * n))
        if outputs == "last":
            flags[n - 1] = 1
        batch = llama_cpp.llama_batch()
        batch.n_tokens = n
        batch.token = token
        batch.embd = embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if embd is not None else None
        batch.pos = pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
        batch.n_seq_id = n_seq_id
        batch.seq_id = seq_ptrs
        batch.logits = flags
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} after {self.n_past} tokens "
                               f"({'out of KV cache space' if status == 1 else 'see the llama.cpp log'})")  # fmt: skip
        self.n_past += n
        if outputs != "all":
            return None
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(n, self.n_vocab)).copy()

    def last_logits(self) -> np.ndarray:
        """Logits of the last decoded position that asked for them (a copy)."""
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # -- sampling -------------------------------------------------------------------------------------------------
    def _grammar_sampler(self, grammar: str):
        check_grammar_limits(grammar, "the grammar")  # llama.cpp's parser recurses: a deep grammar kills the process
        with collect_llama_errors() as errors:
            sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            detail = "; ".join(line for line in errors if line) or "see the llama.cpp log"
            raise GrammarError(f"the grammar does not parse ({detail}); it must be GBNF with a `root` rule.")
        return sampler

    def check_grammar(self, grammar: str) -> None:
        """Raise `GrammarError` if llama.cpp cannot parse `grammar` (GBNF)."""
        llama_cpp.llama_sampler_free(self._grammar_sampler(grammar))

    def set_sampling(self, params: SamplingParams) -> None:
        """Replace the sampler: greedy, or top-k, top-p, temperature and seed; and the grammar, if any."""
        grammar = self._grammar_sampler(params.grammar) if params.grammar is not None else None
        self._free_samplers()
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(chain_params)
        if params.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(params.seed & 0xFFFFFFFF))
        self._sampler = chain
        self._grammar = grammar

    def sample(self) -> int:
        """Sample the next token from the last logits and tell the samplers it was chosen."""
        if self._sampler is None:
            self.set_sampling(SamplingParams())
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self._sampler, self._ctx, -1))
        # Checking every vocabulary entry against the grammar costs ~0.1 s per token with Qwen2's 151k tokens. Like
        # llama.cpp's own samplers, pick a token without the grammar first, and apply the grammar to all entries
        # only when the grammar refuses that one.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))
        token = self._apply(self._sampler, logits)
        if self._apply(self._grammar, None, token=token) is None:
            token = self._apply(self._sampler, logits, grammar_first=True)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._sampler, token)
        return token

    def _apply(self, sampler, logits: np.ndarray | None, *, token: int | None = None, grammar_first: bool = False) -> int | None:  # fmt: skip
        """Run `sampler` over candidates (all of `logits`, or the one `token`); the selected token, or None when
        the sampler ruled every candidate out."""
        if logits is None:
            candidates = np.array([(token, 0.0, 0.0)], dtype=_TOKEN_DATA)
        else:
            candidates = np.empty(self.n_vocab, dtype=_TOKEN_DATA)
            candidates["id"] = np.arange(self.n_vocab)
            candidates["logit"] = logits
            candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            candidates.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), len(candidates), -1, False
        )
        if grammar_first:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
        if logits is None:
            return None if np.isneginf(array.data[0].logit) else token
        return int(array.data[array.selected].id)

    def _free_samplers(self) -> None:
        for name in ("_sampler", "_grammar"):
            sampler = getattr(self, name, None)
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
            setattr(self, name, None)

    def close(self) -> None:
        self._free_samplers()
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: llama_cpp may already be gone
            pass
