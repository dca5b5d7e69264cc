"""The Qwen2-VL language model as GGUF: loads in stock llama.cpp, tokenizes and computes like transformers,
quantizes with llama.cpp's own quantizer.

The model is a tiny random Qwen2-VL with init_std=0.05 (the session fixture uses 0.02). Measured here: at 0.02 the
logits are small and the gap between a random model's top-1 and top-2 falls to ~0.001 at some positions, below
llama.cpp's f32 error (~0.0025); at 0.1 the random net turns chaotic (error ~0.015, gaps ~0.002). At 0.05 the
smallest top-1/top-2 gap on the greedy paths below is ~0.02, 8x the error, so greedy parity is decisive.
"""

from __future__ import annotations

import struct
import unicodedata
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")

from edgevlm.exporters.gguf import (
    GGUFTokenizer,
    QuantizationError,
    quantize_gguf,
    read_gguf_metadata,
    read_gguf_tensor_types,
    write_gguf,
)
from edgevlm.exporters.qwen2_vl.synthetic import build_qwen2_vl
from edgevlm.exporters.qwen2vl_gguf import gguf_tensor_name, qwen2_vl_hparams, write_qwen2_vl_llm_gguf
from edgevlm.exporters.qwen_synthetic import QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_TINY
from edgevlm.runtimes.llm import plain_llama

INIT_STD = 0.05
# llama.cpp vs transformers, f32 weights, default context (f16 KV cache): measured 0.0019-0.0025 on logits of
# magnitude ~4.3 (llama.cpp is 0.0014 from a float64 reference even with an f32 KV cache, transformers-f32 4e-6:
# the difference is llama.cpp's CPU kernels). 0.01 leaves 4x headroom; export mistakes (a missing bias, a
# transposed or misnamed weight, wrong eps/heads) move logits by O(0.1-1).
LOGITS_ATOL = 0.01
# Top-1 agreement with the F32 GGUF over 116 teacher-forced positions (the PROMPTS). Measured on this model:
# Q8_0 0.948, Q4_K_M 0.569; the F32 top-1 is within the quantized top-5 at 1.000 and 0.905 of positions. A random
# model's logits over 152k tokens are nearly tied at the top (median top-1/top-2 gap 0.17), so quantization noise
# flips many choices that a trained model's peaked distribution would not; chance agreement and a broken file
# give ~0. Floors sit ~4.8 binomial standard deviations under the measurements (which vary with CPU kernels).
TOP1_FLOOR = {"Q8_0": 0.85, "Q4_K_M": 0.35}
TOP5_FLOOR = {"Q8_0": 0.95, "Q4_K_M": 0.75}

PROMPTS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe the picture in detail,"
    " please.<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. 你好，世界。",
    "def f(x):\n\treturn x * 12345\n",
    "In 1492, Columbus sailed the ocean blue; what happened next? Let me think step by step about it.",
    "Robots on a kiosk read the menu: 🍔 $4.99, 🍟 $1.50 — total? <|vision_start|><|image_pad|><|vision_end|>",
]

TOKENIZER_CASES = [
    "Hello, world! How are you today?",
    "你好，世界！今天天气很好。",
    "12345",
    "3 33 333 3333 33333 3.3 3..3 3...3 1,000,000",
    "def f(x):\n\tif x:\n\t\treturn 1\n    return 0\n",
    "emoji 🚀 🦙🦙 ✅ 😶\u200d🌫️ (concatenated)",
    "multiple   spaces    here  \n\n\n  \t end ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|vision_start|><|image_pad|><|vision_end|>What is in this image?",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "Ünïcödé café naïve résumé — “quotes” … ------======= ''''''```````\"\"\"\"......!!!!!!??????",
    "Здравствуй, мир! नमस्ते दुनिया مرحبا بالعالم កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～",
    "<|endoftext|>",
    " leading space, trailing space ",
]
# Decomposed text: Qwen2's tokenizer.json applies NFC first, llama.cpp does not normalize at all.
DECOMPOSED_CASES = ["cafe\u0301 au lait", "Hangul \u1100\u1161\u11a8"]


def load_llama(path: Path, **kwargs):
    """`llama_cpp.Llama` on `path`, with the runtime's rule for llama.cpp's AMX kernels (they crash on this CPU)."""
    return plain_llama(path, n_ctx=512, n_threads=2, verbose=False, **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_qwen2_vl(tmp_path_factory.mktemp("qwen2vl-decisive"), QWEN2_VL_TINY, seed=0, init_std=INIT_STD)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def f32_export(hf, tmp_path_factory) -> tuple[Path, dict]:
    model, tokenizer = hf
    path = tmp_path_factory.mktemp("gguf") / "llm-f32.gguf"
    manifest = write_qwen2_vl_llm_gguf(model, tokenizer, path, dtype="f32", chat_template=None)
    return path, manifest


@pytest.fixture(scope="module")
def llm_f32(f32_export):
    return llama_cpp.Llama(model_path=str(f32_export[0]), n_ctx=512, n_threads=2, logits_all=True, verbose=False)


def hf_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


# --- metadata and layout ---------------------------------------------------------------------------------------


def test_metadata(f32_export, hf):
    path, manifest = f32_export
    md = read_gguf_metadata(path)
    assert md["general.architecture"] == "qwen2vl"
    assert md["qwen2vl.rope.dimension_sections"] == [8, 12, 12, 0]
    assert md["qwen2vl.embedding_length"] == 256 and md["qwen2vl.block_count"] == 2
    assert md["qwen2vl.attention.head_count"] == 4 and md["qwen2vl.attention.head_count_kv"] == 2
    assert md["qwen2vl.context_length"] == 4096 and md["qwen2vl.rope.freq_base"] == 1e6
    assert md["tokenizer.chat_template"] == QWEN2_VL_CHAT_TEMPLATE
    assert (md["tokenizer.ggml.model"], md["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    assert len(md["tokenizer.ggml.tokens"]) == len(md["tokenizer.ggml.token_type"]) == 151936
    assert md["tokenizer.ggml.eos_token_id"] == md["tokenizer.ggml.eot_token_id"] == 151645
    assert md["tokenizer.ggml.add_bos_token"] is False
    types, tokens = md["tokenizer.ggml.token_type"], md["tokenizer.ggml.tokens"]
    assert (tokens[151655], types[151655]) == ("<|image_pad|>", 3)  # CONTROL
    assert (tokens[151935], types[151935]) == ("[PAD151935]", 5)  # UNUSED padding row
    assert types[0] == 1  # NORMAL

    assert manifest["arch"] == "qwen2vl" and manifest["n_vocab"] == 151936 and manifest["n_ctx_train"] == 4096
    assert manifest["special_tokens"]["eos"] == 151645 and manifest["special_tokens"]["endoftext"] == 151643
    assert manifest["special_tokens"]["image_pad"] == 151655
    assert (manifest["special_tokens"]["vision_start"], manifest["special_tokens"]["vision_end"]) == (151652, 151653)
    assert manifest["text_normalization"] == "NFC"
    assert manifest["tied_embeddings"] is True
    assert all(t == "F32" for t in read_gguf_tensor_types(path).values())
    assert "output.weight" not in read_gguf_tensor_types(path)  # tied: llama.cpp reuses token_embd


def test_f16_keeps_norms_and_biases_f32(hf, f32_export, llm_f32, tmp_path):
    model, tokenizer = hf
    path = tmp_path / "llm-f16.gguf"
    write_qwen2_vl_llm_gguf(model, tokenizer, path, dtype="f16")
    types = read_gguf_tensor_types(path)
    assert {t for n, t in types.items() if n.endswith(("norm.weight", ".bias"))} == {"F32"}
    assert {t for n, t in types.items() if not n.endswith(("norm.weight", ".bias"))} == {"F16"}
    assert path.stat().st_size < 0.6 * f32_export[0].stat().st_size
    ids = hf_ids(tokenizer, PROMPTS[0])
    diff = np.abs(llama_logits(load_llama(path, logits_all=True), ids) - llama_logits(llm_f32, ids)).max()
    print(f"\nF16 vs F32 GGUF: max abs logits diff {diff:.4f}")
    assert diff < 0.05  # f16 rounding (2^-11 relative); measured 0.006


# --- plain llama.cpp: generation, tokenizer, logits -------------------------------------------------------------


def test_generates_text_with_chat_template(f32_export, hf):
    _, tokenizer = hf
    llm = llama_cpp.Llama(model_path=str(f32_export[0]), n_ctx=512, n_threads=2, verbose=False)
    messages = [{"role": "user", "content": "Describe a robot."}]
    out = llm.create_chat_completion(messages=messages, max_tokens=8, temperature=0.0)
    assert isinstance(out["choices"][0]["message"]["content"], str)
    assert out["usage"]["completion_tokens"] >= 1
    # The template came from the GGUF and renders to as many tokens as transformers' rendering.
    expected = hf_ids(tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert out["usage"]["prompt_tokens"] == len(expected)
    plain = llm.create_completion("Once upon a time", max_tokens=8, temperature=0.0)
    assert plain["usage"]["completion_tokens"] >= 1 and isinstance(plain["choices"][0]["text"], str)


@pytest.mark.parametrize("text", TOKENIZER_CASES)
def test_tokenization_matches_transformers(text, llm_f32, hf):
    _, tokenizer = hf
    expected = hf_ids(tokenizer, text)
    assert llm_f32.tokenize(text.encode(), add_bos=False, special=True) == expected
    assert llm_f32.detokenize(expected, special=True) == text.encode()


@pytest.mark.parametrize("text", DECOMPOSED_CASES)
def test_decomposed_text_matches_after_normalization(text, llm_f32, hf, f32_export):
    _, tokenizer = hf
    form = f32_export[1]["text_normalization"]
    expected = hf_ids(tokenizer, text)
    assert llm_f32.tokenize(text.encode(), add_bos=False, special=True) != expected  # why the manifest says NFC
    assert llm_f32.tokenize(unicodedata.normalize(form, text).encode(), add_bos=False, special=True) == expected


def test_logits_match_transformers(llm_f32, hf):
    model, tokenizer = hf
    worst = 0.0
    for prompt in PROMPTS:
        ids = hf_ids(tokenizer, prompt)
        expected = hf_logits(model, ids)
        diff = float(np.abs(llama_logits(llm_f32, ids) - expected).max())
        worst = max(worst, diff)
        assert diff <= LOGITS_ATOL, f"{len(ids)} tokens of {prompt[:30]!r}: max abs diff {diff:.4g} > {LOGITS_ATOL}"
    print(f"\nF32 GGUF vs transformers: max abs logits diff {worst:.4g} (atol {LOGITS_ATOL})")


# Prompts whose 24-step greedy paths are decisive on this model: smallest top-1/top-2 gap 0.029 and 0.043 against
# an error of ~0.003. Others here hit near-ties (gaps 0.0015-0.006) that two f32 implementations may break
# differently; the decisiveness check in the test catches a changed model or seed.
GREEDY_PROMPTS = [PROMPTS[0], PROMPTS[3]]


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_greedy_continuation_matches_transformers(prompt, llm_f32, hf):
    model, tokenizer = hf
    ids = hf_ids(tokenizer, prompt)
    expected, gaps = list(ids), []
    with torch.no_grad():
        for _ in range(24):
            logits = model(input_ids=torch.tensor([expected]), logits_to_keep=1).logits[0, -1].numpy()
            top2 = np.sort(logits)[-2:]
            gaps.append(float(top2[1] - top2[0]))
            expected.append(int(logits.argmax()))
    # A near-tie flipped by rounding is not an export bug: check the choices are decisive against the error
    # actually measured along this path before comparing tokens.
    error = float(np.abs(llama_logits(llm_f32, expected) - hf_logits(model, expected)).max())
    print(f"\ngreedy path: smallest top-1/top-2 gap {min(gaps):.4f}, max abs logits diff {error:.4f}")
    assert min(gaps) > 2 * error, f"random model not decisive: gap {min(gaps):.4g} vs error {error:.4g}"

    llm_f32.reset()
    llm_f32.eval(ids)
    generated = []
    for _ in range(24):
        token = int(np.argmax(llm_f32.scores[llm_f32.n_tokens - 1]))
        generated.append(token)
        llm_f32.eval([token])
    continuation = expected[len(ids) :]
    assert generated == continuation, f"{tokenizer.decode(generated)!r} != {tokenizer.decode(continuation)!r}"


# --- quantization -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32_teacher_forced(llm_f32, hf):
    _, tokenizer = hf
    return np.concatenate([llama_logits(llm_f32, hf_ids(tokenizer, p)) for p in PROMPTS])


@pytest.mark.parametrize(
    "qtype,expected_types",
    [
        ("Q8_0", {"Q8_0"}),
        # Q4_K_M keeps some tensors (token_embd, half the attn_v/ffn_down) at Q6_K. No other type: every row
        # length is a multiple of 256, so no tensor fell back to Q5_0/Q8_0.
        ("Q4_K_M", {"Q4_K", "Q6_K"}),
    ],
)
def test_quantized_loads_generates_and_agrees(qtype, expected_types, f32_export, f32_teacher_forced, hf, tmp_path):
    _, tokenizer = hf
    path = quantize_gguf(f32_export[0], tmp_path / f"llm-{qtype}.gguf", qtype, n_threads=2)
    assert not list(tmp_path.glob("*.partial"))
    types = read_gguf_tensor_types(path)
    assert {t for n, t in types.items() if not n.endswith(("norm.weight", ".bias"))} == expected_types
    assert {t for n, t in types.items() if n.endswith(("norm.weight", ".bias"))} == {"F32"}
    assert read_gguf_metadata(path)["tokenizer.chat_template"] == QWEN2_VL_CHAT_TEMPLATE

    llm = load_llama(path, logits_all=True)
    logits = np.concatenate([llama_logits(llm, hf_ids(tokenizer, p)) for p in PROMPTS])
    agreement = float((logits.argmax(-1) == f32_teacher_forced.argmax(-1)).mean())
    top5 = np.argsort(logits, axis=-1)[:, -5:]
    in_top5 = float(np.mean([ref in row for ref, row in zip(f32_teacher_forced.argmax(-1), top5)]))
    print(
        f"\n{qtype}: top-1 agreement with F32 {agreement:.3f} over {len(logits)} positions "
        f"(F32 top-1 within {qtype} top-5: {in_top5:.3f}), size {path.stat().st_size / 2**20:.1f} MiB"
    )
    assert agreement >= TOP1_FLOOR[qtype] and in_top5 >= TOP5_FLOOR[qtype]
    completion = llm.create_completion("Once upon a time", max_tokens=8, temperature=0.0)
    assert completion["usage"]["completion_tokens"] >= 1


def test_quantize_rejects_bad_input(f32_export, tmp_path):
    src = f32_export[0]
    dst = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="unknown quantization type 'Q3_XYZ'.*Q4_K_M"):
        quantize_gguf(src, dst, "Q3_XYZ")
    with pytest.raises(FileNotFoundError, match="not found"):
        quantize_gguf(tmp_path / "missing.gguf", dst, "Q8_0")
    not_gguf = tmp_path / "model.safetensors"
    not_gguf.write_bytes(b"\x00" * 4096)
    with pytest.raises(QuantizationError, match="not a GGUF file"):
        quantize_gguf(not_gguf, dst, "Q8_0")
    # Valid magic, truncated in the metadata: llama.cpp itself fails, and says why.
    truncated = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(QuantizationError, match="could not quantize.*failed to load model"):
        quantize_gguf(truncated, dst, "Q4_K_M")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "truncated.gguf"]


# --- pure pieces -----------------------------------------------------------------------------------------------


def test_tensor_name_map():
    assert gguf_tensor_name("model.language_model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("model.language_model.layers.17.self_attn.k_proj.bias") == "blk.17.attn_k.bias"
    assert gguf_tensor_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"  # older layout
    assert gguf_tensor_name("model.language_model.norm.weight") == "output_norm.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    assert gguf_tensor_name("model.visual.blocks.0.attn.qkv.weight") is None
    assert gguf_tensor_name("visual.merger.mlp.0.weight") is None
    with pytest.raises(ValueError, match="layers.0.self_attn.rotary.inv_freq"):
        gguf_tensor_name("model.language_model.layers.0.self_attn.rotary.inv_freq")


def test_hparams_refuse_what_llama_cpp_cannot_run():
    from edgevlm.errors import UnsupportedModelError
    from edgevlm.exporters.qwen2_vl.synthetic import qwen2_vl_config

    text = qwen2_vl_config(QWEN2_VL_TINY).text_config
    assert qwen2_vl_hparams(text)["qwen2vl.rope.dimension_sections"] == [8, 12, 12, 0]
    text.use_sliding_window = True
    with pytest.raises(UnsupportedModelError, match="sliding"):
        qwen2_vl_hparams(text)


def test_write_gguf_leaves_nothing_on_failure(tmp_path):
    tokenizer = GGUFTokenizer(model="gpt2", pre="qwen2", tokens=["a", "b"], token_types=[1, 1], merges=[])

    passes = []

    def tensors(shapes_only: bool):  # fine for the header pass, fails while data is being written
        passes.append(1)
        yield "token_embd.weight", np.zeros((2, 4), np.float32)
        yield "output_norm.weight", np.zeros(4, np.float32)
        if len(passes) == 2:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_gguf(tmp_path / "x.gguf", arch="qwen2vl", metadata={}, tensors=tensors, tokenizer=tokenizer)
    assert len(passes) == 2 and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="dtype 'q4'"):
        write_gguf(tmp_path / "x.gguf", arch="qwen2vl", metadata={}, tensors=tensors, tokenizer=tokenizer, dtype="q4")


def test_read_gguf_metadata_types(tmp_path):
    tokenizer = GGUFTokenizer(model="gpt2", pre="qwen2", tokens=["a", "b"], token_types=[1, 3], merges=["a b"])
    path = write_gguf(
        tmp_path / "x.gguf", arch="qwen2vl", tokenizer=tokenizer, dtype="f16",
        metadata={"x.u32": 7, "x.f32": 0.5, "x.flag": True, "x.name": "ü", "x.sections": [1, 2, 0, 0]},
        tensors=lambda _shapes_only: iter([("token_embd.weight", np.ones((2, 4), np.float32)), ("n.weight", np.ones(4))]),
    )  # fmt: skip
    md = read_gguf_metadata(path)
    values = (md["x.u32"], md["x.f32"], md["x.flag"], md["x.name"], md["x.sections"])
    assert values == (7, 0.5, True, "ü", [1, 2, 0, 0])
    assert md["tokenizer.ggml.merges"] == ["a b"] and md["tokenizer.ggml.token_type"] == [1, 3]
    assert read_gguf_tensor_types(path) == {"token_embd.weight": "F16", "n.weight": "F32"}
    assert struct.unpack("<I", path.read_bytes()[4:8])[0] == 3  # GGUF v3


def test_plain_qwen2_language_model(hf, tmp_path):
    """`QWEN2_FORMAT` (the LLM of InternVL3 and LLaVA-OneVision): a Qwen2 decoder with 1-D RoPE, arch `qwen2`. Built
    from the tiny Qwen2-VL's text weights as a `Qwen2ForCausalLM`: its logits in llama.cpp match transformers'."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from edgevlm.exporters.qwen2vl_gguf import QWEN2_FORMAT

    vlm, tokenizer = hf
    text = vlm.config.text_config
    config = Qwen2Config(**{k: getattr(text, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                            "max_position_embeddings")}, rope_theta=1e6, tie_word_embeddings=False)  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    weights = {k.removeprefix("model.language_model."): v for k, v in vlm.state_dict().items() if "visual" not in k}
    model.model.load_state_dict({k: v for k, v in weights.items() if k != "lm_head.weight"}, strict=True)
    model.lm_head.weight.data.copy_(vlm.lm_head.weight)
    path = tmp_path / "qwen2.gguf"
    summary = write_qwen2_vl_llm_gguf(model, tokenizer, path, dtype="f32", llm_format=QWEN2_FORMAT)
    assert summary["arch"] == "qwen2" and "rope_sections" not in summary
    assert set(summary["special_tokens"]) == {"eos", "endoftext", "im_start", "im_end"}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    ids = hf_ids(tokenizer, PROMPTS[0])
    diff = float(np.abs(llama_logits(llm, ids) - hf_logits(model, ids)).max())
    assert diff <= LOGITS_ATOL, f"plain Qwen2 GGUF vs transformers: max abs logits diff {diff:.4g}"
