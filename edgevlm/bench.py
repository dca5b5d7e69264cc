"""`edgevlm bench`: where the time and memory of one answer go, stage by stage, next to plain llama.cpp.

One process loads the bundle once, then for each image size (given as the number of image tokens it should cost)
generates once to warm up and `runs` more times from a synthetic image, reading the runtime's own `Timings`. The
prompt's text rides in the image's batch, so text prefill speed is measured on its own, from the prompt without an
image.
In the same run, llama-cpp-python's high-level `Llama` on the same GGUF with the same threads and the runtime take
turns decoding the same text-only prompt: the runtime's decode speed is reported as a ratio to it, so its overhead
shows whatever the machine's speed (and a machine whose speed drifts affects both alike). Nothing here imports
torch.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .bundle import Bundle

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_TOKENS = (64, 256, 1024)
DEFAULT_PROMPT = "Describe this picture in detail."
# Timings fields (and properties) reported per image size, with the unit shown in tables.
STAGES = {
    "preprocess_ms": "ms",
    "vision_ms": "ms",
    "image_prefill_ms": "ms",
    "time_to_first_token_ms": "ms",
    "decode_tokens_per_s": "tok/s",
}


@dataclass(frozen=True)
class Spread:
    """Median and range of one measurement over the runs."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class ImageCase:
    """The measurements of one image size."""

    requested_tokens: int
    image_size: tuple[int, int]  # (width, height) of the synthetic image
    n_image_tokens: int  # what the runtime really encoded
    n_prompt_tokens: int
    n_generated: list[int]
    stages: dict[str, Spread]


def image_side_blocks(n_tokens: int) -> tuple[int, int]:
    """(rows, cols) of merged-token blocks, as square as possible, with rows * cols <= n_tokens (and close to it)."""
    if n_tokens < 1:
        raise ValueError(f"image token counts must be positive, got {n_tokens}")
    rows = math.isqrt(n_tokens)
    return rows, n_tokens // rows


def synthetic_image(n_tokens: int, block_pixels: int):
    """A deterministic image whose size costs about `n_tokens` image tokens at `block_pixels` pixels per token."""
    from .exporters.verify import sample_image  # numpy + Pillow only

    rows, cols = image_side_blocks(n_tokens)
    return sample_image(rows * block_pixels, cols * block_pixels, seed=n_tokens)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def plain_decode_speed(llm, prompt: str, max_new_tokens: int) -> float:
    """Decode tok/s of one greedy completion of `prompt` by llama-cpp-python's `Llama`, from a cleared cache."""
    llm.reset()
    first = last = None
    n = 0
    for _chunk in llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, stream=True):
        last = time.perf_counter()
        first = first or last
        n += 1
    return (n - 1) / (last - first) if n > 1 and last > first else 0.0


def decode_against_baseline(vlm, prompt: str, max_new_tokens: int, runs: int) -> dict:
    """The runtime's and plain `Llama`'s decode of the same text prompt from the same GGUF, run after run in turn
    (a machine whose speed drifts affects both alike), after one warm-up each."""
    from .runtimes.llm import plain_llama

    llm = vlm.llm
    plain = plain_llama(llm.path, repack_weights=llm.repack_weights, n_ctx=llm.n_ctx, n_threads=llm.loaded_threads[0],
                        n_threads_batch=llm.loaded_threads[1], verbose=False)  # fmt: skip
    ours, theirs = [], []
    try:
        for _ in range(1 + runs):
            vlm.clear_caches()
            *_, last = vlm.generate(prompt, max_tokens=max_new_tokens)
            ours.append(last.timings.decode_tokens_per_s)
            theirs.append(plain_decode_speed(plain, vlm.render_prompt(prompt, 0), max_new_tokens))
    finally:
        plain.close()
    runtime, baseline = Spread.of(ours[1:]), Spread.of(theirs[1:])
    return {
        "runtime_decode_tokens_per_s": asdict(runtime),
        "plain_llama_decode_tokens_per_s": asdict(baseline),
        "decode_ratio": runtime.median / baseline.median if baseline.median else None,
    }


def host_record() -> dict:
    """This machine as every benchmark result records it: the CPU and the instruction sets that pick the kernels,
    cores, RAM, and the kernels onnxruntime's int8 MatMuls and llama.cpp use here."""
    import onnxruntime

    from .llama_backend import system_info
    from .profiles import probe_host
    from .runtimes.vision import int8_pairs_saturate

    host = probe_host()
    return {
        "cpu_model": host.cpu_model, "isa": host.isa, "physical_cores": host.physical_cores,
        "logical_cpus": host.logical_cpus, "ram_gib": round(host.ram_bytes / 2**30, 1) if host.ram_bytes else None,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_int8": "pairs saturate in int16 (vpmaddubsw)" if int8_pairs_saturate() else "exact int32 sums",
        "llama_cpp": system_info(),
    }  # fmt: skip


def run_bench(
    bundle: str | Path,
    *,
    profile: str | None = None,
    image_tokens: Sequence[int] = DEFAULT_IMAGE_TOKENS,
    runs: int = 3,
    max_new_tokens: int = 32,
    prompt: str = DEFAULT_PROMPT,
    baseline: bool = True,
    progress: Callable[[str], None] | None = None,
    **load_options,
) -> dict:
    """Measure `bundle` (see the module docstring); returns a JSON-ready dict. `progress` gets one line per step."""
    import edgevlm

    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be at least 2 to measure decoding, got {max_new_tokens}")
    for n in image_tokens:
        image_side_blocks(n)
    say = progress or (lambda line: None)
    opened = Bundle.open(bundle)
    if profile is not None:
        load_options["profile"] = profile
    say(f"loading {opened.path}")
    start = time.perf_counter()
    vlm = edgevlm.load(opened, **load_options)
    load_s = time.perf_counter() - start
    preprocessing = vlm.preprocessing
    block_pixels = preprocessing.patch_size * preprocessing.merge_size
    cases = []
    try:
        for n_tokens in image_tokens:
            image = synthetic_image(n_tokens, block_pixels)
            say(f"{n_tokens} image tokens ({image.width}x{image.height}): 1 warm-up + {runs} runs")
            measured = []
            for _ in range(1 + runs):
                vlm.clear_caches()  # every run cold: no KV prefix or embedding reused from the previous one
                *_, last = vlm.generate(prompt, [image], max_tokens=max_new_tokens, max_image_tokens=n_tokens)
                measured.append(last.timings)
            measured = measured[1:]
            cases.append(ImageCase(
                requested_tokens=n_tokens, image_size=image.size, n_image_tokens=measured[0].n_image_tokens,
                n_prompt_tokens=measured[0].n_prompt_tokens, n_generated=[t.n_generated for t in measured],
                stages={stage: Spread.of([getattr(t, stage) for t in measured]) for stage in STAGES},
            ))  # fmt: skip
        say(f"text prefill: the prompt without an image, {runs} runs")
        text_prefill = []
        for _ in range(runs):
            vlm.clear_caches()
            *_, last = vlm.generate(prompt, [], max_tokens=1)
            text_prefill.append(last.timings.prefill_tokens_per_s)
        peak_rss = peak_rss_bytes()  # before the baseline loads a second context on the language model
        result = {
            "bundle": str(opened.path),
            "host": host_record(),
            "files": {name: entry.size for name, entry in opened.manifest.files.items()},
            "llm_settings": asdict(vlm.llm.settings),
            "llm_extra_buffers": vlm.llm.repack_weights,  # what the settings above came to (their None decided)
            "llm_mapped": vlm.llm.mapped,
            "vision": {"dtype": vlm.vision_dtype, "providers": vlm.vision.providers},
            "prompt": prompt, "max_new_tokens": max_new_tokens, "runs": runs,
            "load_s": load_s,
            "peak_rss_bytes": peak_rss,
            "cases": [asdict(case) for case in cases],
            "text_prefill_tokens_per_s": asdict(Spread.of(text_prefill)),
        }  # fmt: skip
        if baseline:
            say(f"baseline: plain llama-cpp-python Llama on {vlm.llm.path.name}, text only, in turn with the runtime")
            result["baseline"] = decode_against_baseline(vlm, prompt, max_new_tokens, runs)
    finally:
        vlm.close()
    return result


def markdown(result: dict) -> str:
    """The results as Markdown tables (what `edgevlm bench` prints)."""
    mb = 1e6
    vision = result["vision"]
    summary = (f"bundle {result['bundle']}: load {result['load_s']:.2f} s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} "
               f"GiB, vision {vision['dtype']} on {', '.join(vision['providers'])}, llama.cpp extra buffer types "
               f"(repacked and AMX weights) {'on' if result['llm_extra_buffers'] else 'off'}, GGUF "
               f"{'mapped' if result['llm_mapped'] else 'read'}")  # fmt: skip
    lines = [summary, ""]
    lines += ["| file | MB |", "|---|---:|"]
    lines += [f"| {name} | {size / mb:.1f} |" for name, size in result["files"].items()]
    header = " | ".join(f"{stage.removesuffix('_ms').removesuffix('_tokens_per_s').replace('_', ' ')} {unit}" for stage, unit in STAGES.items())  # fmt: skip
    lines += ["", f"median (min–max) of {result['runs']} runs, {result['max_new_tokens']} new tokens:", "",
              f"| image tokens | image | {header} |", "|---:|---|" + "---:|" * len(STAGES)]  # fmt: skip
    for case in result["cases"]:
        cells = []
        for stage in STAGES:
            s = case["stages"][stage]
            digits = 0 if stage.endswith("_ms") else 1
            cells.append(f"{s['median']:.{digits}f} ({s['low']:.{digits}f}–{s['high']:.{digits}f})")
        width, height = case["image_size"]
        lines.append(f"| {_case_label(case)} | {width}x{height} | " + " | ".join(cells) + " |")
    short = short_cases(result)
    if short:
        asked = ", ".join(str(c["requested_tokens"]) for c in short)
        lines += ["", (f"warning: the model encoded fewer image tokens than asked for {asked} (its pixel or token "
                       "limits capped the image); rows show the tokens measured")]  # fmt: skip
    text = result["text_prefill_tokens_per_s"]
    lines += ["", f"text prefill (the prompt alone): {text['median']:.1f} tok/s ({text['low']:.1f}–{text['high']:.1f})"]
    if "baseline" in result:
        b = result["baseline"]
        ours, plain = b["runtime_decode_tokens_per_s"], b["plain_llama_decode_tokens_per_s"]
        ratio = f"{b['decode_ratio']:.2f}x" if b["decode_ratio"] else "n/a"
        lines += ["", (f"text-only decode, in turn: runtime {ours['median']:.1f} tok/s ({ours['low']:.1f}–{ours['high']:.1f}), "
                       f"plain llama-cpp-python {plain['median']:.1f} tok/s ({plain['low']:.1f}–{plain['high']:.1f}): "
                       f"ratio {ratio}")]  # fmt: skip
    return "\n".join(lines)


def short_cases(result: dict) -> list[dict]:
    """The image sizes where the model encoded fewer tokens than asked (its pixel or token limits capped them)."""
    return [case for case in result["cases"] if case["n_image_tokens"] < case["requested_tokens"]]


def _case_label(case: dict, unit: str = "") -> str:
    """A row's name: the tokens measured, and the tokens asked when the model gave fewer."""
    asked = f" (asked {case['requested_tokens']})" if case["n_image_tokens"] < case["requested_tokens"] else ""
    return f"{case['n_image_tokens']}{unit}{asked}"


def check_plotting() -> None:
    """Fail at once, with the install command, when matplotlib is missing (`--plot`; before a run of minutes)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'edgevlm[bench]'") from e


def plot(result: dict, out: str | Path) -> Path:
    """A PNG: time to first token per image size, stacked by stage, and decode speed next to the baseline."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def figure(result: dict):
    """The matplotlib figure `plot` saves (call `check_plotting` first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    labels = [f"{_case_label(c, ' tok')}\n{c['image_size'][0]}x{c['image_size'][1]}" for c in cases]
    parts = {
        "preprocess": [c["stages"]["preprocess_ms"]["median"] / 1000 for c in cases],
        "vision encoder": [c["stages"]["vision_ms"]["median"] / 1000 for c in cases],
        "prefill (image + its text)": [c["stages"]["image_prefill_ms"]["median"] / 1000 for c in cases],
    }
    ttft = [c["stages"]["time_to_first_token_ms"]["median"] / 1000 for c in cases]
    parts["rest (sampling, text batches)"] = [max(0.0, t - sum(p[i] for p in parts.values())) for i, t in enumerate(ttft)]  # fmt: skip
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    bottom = [0.0] * len(cases)
    for name, values in parts.items():
        left.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    left.set_ylabel("seconds")
    left.set_title("time to first token, by stage (median)")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)  # below the bars, never on them
    decode = {_case_label(c, " tok"): c["stages"]["decode_tokens_per_s"]["median"] for c in cases}
    colors = ["C0"] * len(cases)
    if "baseline" in result:
        decode["text only"] = result["baseline"]["runtime_decode_tokens_per_s"]["median"]
        decode["plain Llama"] = result["baseline"]["plain_llama_decode_tokens_per_s"]["median"]
        colors += ["C0", "C3"]
    right.bar(list(decode), list(decode.values()), color=colors)
    right.tick_params(axis="x", labelrotation=30)
    right.set_ylabel("tokens / s")
    right.set_title("decode speed")
    fig.suptitle(Path(result["bundle"]).name)
    fig.tight_layout()
    return fig
