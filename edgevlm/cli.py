"""The `edgevlm` command. Each subcommand imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .cli_chat import CHAT_COMMANDS
from .errors import EdgeVLMError

if TYPE_CHECKING:
    from .images import ImageLimits

QUANT_FLAGS = {"int4": "Q4_K_M", "int8": "Q8_0", "f16": "F16", "f32": "F32"}
NO_VERIFY_HELP = "skip the sha256 check of the bundle's files (default: checked the first time this device loads them)"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interruption so that `with` blocks clean up on the way out (an export's partial folder)."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    def interrupt(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _export(args: argparse.Namespace) -> int:
    from .exporters import export

    quantization = next((q for flag, q in QUANT_FLAGS.items() if getattr(args, flag)), "Q4_K_M")
    if args.dry_run:
        return _export_dry_run(args, quantization)
    with _sigterm_interrupts():  # SIGINT raises KeyboardInterrupt already; either removes the partial bundle
        out = export(
            args.model,
            args.output,
            quantization=quantization,
            vision_dtypes=_export_vision_dtypes(args.vision_dtype or [], args.profile or []),
            force=args.force,
            verify=args.verify,
            max_image_tokens=args.max_image_tokens,
        )
    print(_export_summary(out))
    return 0


def _export_summary(out: str | os.PathLike) -> str:
    """What an export leaves the user: the files and their sizes, how each vision graph validated, how to run it."""
    from .bundle import Bundle

    manifest = Bundle.open(out).manifest
    lines = [f"bundle written to {out}:"]
    lines += [f"  {name:<24} {entry.size / 1e6:>9.1f} MB" for name, entry in manifest.files.items()]
    for dtype, variant in manifest.vision.variants.items():
        check = variant.validation
        if "max_abs_diff" in check:
            lines.append(
                f"  vision {dtype}: max abs diff {check['max_abs_diff']:.1e} vs PyTorch (limit {check['atol']:g})"
            )
        elif "min_cosine_vs_fp32" in check:
            lines.append(f"  vision {dtype}: cosine vs fp32 mean {check['cosine_vs_fp32']:.5f}, worst token "
                         f"{check['min_cosine_vs_fp32']:.5f}")  # fmt: skip
    if "end_to_end" in manifest.validation:
        lines.append(f"  --verify against transformers: {', '.join(manifest.validation['end_to_end'])} (edgevlm.json's validation)")  # fmt: skip
    lines.append(f'run it: edgevlm run {out} --image photo.jpg -p "What is in this picture?"')
    return "\n".join(lines)


def _export_dry_run(args: argparse.Namespace, quantization: str) -> int:
    from .exporters.bundle_export import plan_export

    plan = plan_export(
        args.model, args.output, quantization=quantization, force=args.force, max_image_tokens=args.max_image_tokens,
        vision_dtypes=_export_vision_dtypes(args.vision_dtype or [], args.profile or []),
    )  # fmt: skip
    estimate, host, gb, gib = plan.estimate, plan.host, 1e9, 2**30
    print(f"{plan.source} ({plan.architecture}, family {plan.family_name}) -> {plan.out_dir}")
    print(f"  vision tower + projector: {estimate.n_vision_params / 1e6:.0f}M parameters; language model: {estimate.n_llm_params / 1e6:.0f}M")  # fmt: skip
    for name, size in estimate.files.items():
        print(f"  {name:<24} ~{size / gb:7.2f} GB")
    print(f"  disk at the peak (with staging files): ~{estimate.disk_peak / gb:.1f} GB; free: {host.disk_free / gb:.1f} GB")  # fmt: skip
    available = "unknown" if host.memory_available is None else f"{host.memory_available / gib:.1f} GiB"
    print(f"  memory at the peak: ~{estimate.memory_peak / gib:.1f} GiB; available now: {available}")
    problems = plan.shortfalls()
    for problem in problems:
        print(f"  will not fit: {problem}")
    print("  nothing was loaded or written (--dry-run)" if not problems else "  nothing was loaded or written")
    return 1 if problems else 0


def _export_vision_dtypes(flags: list[str], profile_names: list[str]) -> tuple[str, ...]:
    """--vision-dtype flags first, then the precision each --profile loads (the first it prefers); without either,
    fp32 and the int8 graph the `cpu` profile prefers."""
    from .profiles.schema import load_profile

    loaded = [load_profile(name).vision.precision[:1] for name in profile_names]
    return tuple(dict.fromkeys([*flags, *(p for precision in loaded for p in precision)])) or ("fp32", "int8")


def _run(args: argparse.Namespace) -> int:
    from .budget import Crop
    from .images import check_images

    crop = Crop.parse(args.crop) if args.crop else None  # flag errors before the model loads
    if args.system is not None and (crop is not None or args.tiles):
        args.parser.error("--system does not combine with --crop or --tiles yet (they are per-request options of "
                          "generate, --system needs the chat path): leave one of them out")  # fmt: skip
    image_limits = _image_limits(args)
    images = _image_sources(args)
    check_images(images, image_limits)  # a missing, non-regular or oversized image fails before loading
    t0 = time.perf_counter()
    vlm = _load(args)
    load_s = time.perf_counter() - t0
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
    if args.system is None:
        steps = vlm.generate(args.prompt, images=images, max_tokens=args.max_tokens, crop=crop, tiles=args.tiles,
                             image_limits=image_limits, **sampling)  # fmt: skip
    else:
        from .chat import ImagePolicy

        messages = [{"role": "system", "content": args.system}, _user_message(args.prompt, images)]
        steps = vlm.chat(messages, stream=True, max_tokens=args.max_tokens, image_policy=ImagePolicy(limits=image_limits),
                         **sampling)  # fmt: skip
    text, last = [], None
    for step in steps:
        if not args.json:
            print(step.text, end="", flush=True)
        text.append(step.text)
        last = step
    if args.json:
        print(json.dumps(_answer_record("".join(text), last, load_s), indent=1))
    else:
        print()
    if args.stats and last is not None:
        t = last.timings
        print(
            f"profile {t.profile} | vision {t.vision_dtype} | load {load_s:.2f} s | image tokens {t.n_image_tokens} | "
            f"vision {t.vision_ms:.0f} ms | "
            f"prefill {t.prefill_ms:.0f} ms ({t.prefill_tokens_per_s:.1f} tok/s) | "
            f"first token {t.time_to_first_token_ms:.0f} ms | decode {t.decode_tokens_per_s:.1f} tok/s | "
            f"{t.n_generated} tokens, finish: {last.finish_reason}",
            file=sys.stderr,
        )
    return 0


def _image_sources(args: argparse.Namespace) -> list[str | bytes]:
    """--image paths, with `-` read from stdin as the bytes of one image file."""
    paths = args.image or []
    if paths.count("-") > 1:
        args.parser.error("--image -: stdin holds one image; give the others as files")
    if "-" not in paths:
        return paths
    data = sys.stdin.buffer.read()
    if not data:
        raise EdgeVLMError("--image -: stdin is empty; pipe an image file in (edgevlm run ... --image - < photo.jpg)")
    return [data if path == "-" else path for path in paths]


def _user_message(prompt: str, images: list) -> dict:
    parts = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}


def _answer_record(text: str, last, load_s: float) -> dict:
    """What `run --json` prints: the answer, why it ended, its timings (with the rates) and OpenAI-style usage."""
    from .results import ChatResult

    timings = dataclasses.asdict(last.timings)
    timings |= {"load_s": load_s, "prefill_tokens_per_s": last.timings.prefill_tokens_per_s,
                "decode_tokens_per_s": last.timings.decode_tokens_per_s}  # fmt: skip
    usage = ChatResult(text, last.finish_reason, last.timings).usage  # one definition of the token counts
    return {"text": text, "finish_reason": last.finish_reason, "timings": timings, "usage": usage}


def _plan(args: argparse.Namespace) -> int:
    """Print the token plan of `run` with the same flags, from image headers: no model is loaded."""
    from .budget import DEFAULT_VISION_GFLOPS, BudgetLimits, Crop, ImageRequest, SpanPlan
    from .bundle import Bundle
    from .images import image_size
    from .planner import Planner
    from .profiles import Overrides, resolve_settings

    bundle = Bundle.open(args.bundle)
    manifest = bundle.manifest
    cli_limits = BudgetLimits(args.max_image_tokens, args.min_image_tokens, args.image_budget, args.max_tiles)
    crop = Crop.parse(args.crop) if args.crop else None
    settings = resolve_settings(args.profile, bundle, Overrides(n_ctx=args.n_ctx, vision_dtype=args.vision_dtype, limits=cli_limits))  # fmt: skip
    n_ctx = settings.llama.n_ctx
    planner = Planner.for_settings(manifest, settings, cli_limits)
    limits, tower = planner.limits(), planner.tower
    sizes = [image_size(path) for path in args.image]
    requests = [ImageRequest(width, height, crop=crop, tiles=args.tiles or 0) for width, height in sizes]
    gflops = args.gflops or settings.vision_gflops or DEFAULT_VISION_GFLOPS
    gflops_source = "--gflops" if args.gflops else f"profile {settings.profile.name}" if settings.vision_gflops else "default; --gflops"  # fmt: skip
    plan = planner.plan(requests, n_prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_tokens)

    gib = 2**30

    def label(span: SpanPlan) -> str:
        return span.view if span.tile is None or span.tile.row is None else f"tile {span.tile.row + 1},{span.tile.col + 1}"  # fmt: skip

    width_view = max([7, *(len(label(span)) + 1 for span in plan.spans)])
    header = f"{'view':<{width_view}} {'region (l,t,r,b)':<22} {'resized':>10} {'grid':>8} {'tokens':>7}  {'limited by':<17}"  # fmt: skip
    print(header + (f" {'est. memory':>11} {'est. encode':>11}" if tower else ""))
    for index, (path, (width, height)) in enumerate(zip(args.image, sizes, strict=True)):
        spans = [s for s in plan.spans if s.image_index == index]
        tiling = spans[0].tiling if spans else None
        grid_note = "" if tiling is None else f", {tiling.rows}x{tiling.cols} tiles" if tiling.n_tiles else ", not split"  # fmt: skip
        print(f"{path}: {width}x{height}{grid_note}")
        for span in spans:
            region = "whole image" if span.box == (0, 0, width, height) else ",".join(map(str, span.box))
            resized = f"{span.resized_size[1]}x{span.resized_size[0]}"
            grid = f"{span.grid[1]:>3}x{span.grid[2]:<4}" if span.grid[0] == 1 else f"{span.grid[0]}x{span.grid[1]}x{span.grid[2]}"  # fmt: skip
            line = (f"{label(span):<{width_view}} {region:<22} {resized:>10} {grid:>8} {span.n_tokens:>7}  "
                    f"{span.limited_by or '-':<17}")  # fmt: skip
            if tower:
                encode_s = span.encode_flops / (gflops * 1e9)
                line += f" {span.activation_bytes / gib:>7.2f} GiB {encode_s:>9.1f} s"
            print(line)
    cap = "none" if plan.image_token_cap is None else str(plan.image_token_cap)
    print(f"total {plan.n_image_tokens} image tokens in {len(plan.spans)} span(s); cap {cap} "
          f"(context {n_ctx} - {args.prompt_tokens} prompt - {args.max_tokens} new tokens"
          f"{'' if limits.image_budget is None else f', image budget {limits.image_budget}'})")  # fmt: skip
    in_force = [limits.describe(name) + (" (does not bind tile grids)" if planner.tiled and (name, layer) == ("max_image_tokens", "profile") else "")
                for name, layer in limits.sources]  # fmt: skip
    print("limits: " + (", ".join(in_force) or "none set (the model's own pixel limits)"))
    if tower:
        print(f"estimates: peak vision activations {plan.peak_activation_bytes / gib:.2f} GiB (weights excluded), "
              f"encode {plan.encode_seconds(gflops):.1f} s at an assumed {gflops:g} GFLOP/s ({gflops_source})")  # fmt: skip
    else:
        print("estimates: unavailable, the bundle does not record its vision tower's size (re-export it)")
    print(f"profile: {settings.profile.name} ({settings.reason}); {settings.vision_dtype} vision graph, n_ctx {n_ctx}")
    if settings.memory is not None:
        print(f"memory: {settings.memory.describe()}, ceiling {settings.ceiling_bytes / gib:.2f} GiB")
    return 0


def _add_profile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="auto", metavar="NAME|PATH",
                   help="hardware profile: auto (default: detect), a name from `edgevlm profiles`, or a .toml file")  # fmt: skip


def _add_image_limit_flags(p: argparse.ArgumentParser) -> None:
    from .images import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_PIXELS

    p.add_argument("--max-image-pixels", type=POSITIVE, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help="refuse an image of more than N pixels (width x height) from its header, before decoding "
                        f"(default: {DEFAULT_MAX_IMAGE_PIXELS:,}; a 48 MP photo passes)")  # fmt: skip
    p.add_argument("--max-request-pixels", type=POSITIVE, default=DEFAULT_MAX_REQUEST_PIXELS, metavar="N",
                   help=f"refuse a request whose images have more than N pixels together (default: {DEFAULT_MAX_REQUEST_PIXELS:,})")  # fmt: skip


def _image_limits(args: argparse.Namespace) -> ImageLimits:
    """The pixel caps of the flags; Pillow's process-wide ceiling is raised to match a per-image cap above it."""
    from PIL import Image

    from .images import ImageLimits

    if Image.MAX_IMAGE_PIXELS is not None and args.max_image_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = args.max_image_pixels
    return ImageLimits(args.max_image_pixels, args.max_request_pixels)


def _add_budget_flags(p: argparse.ArgumentParser, *, per_request: bool = True) -> None:
    p.add_argument("--max-image-tokens", type=POSITIVE, metavar="N", help="most visual tokens per image span (default: the bundle's)")  # fmt: skip
    p.add_argument("--min-image-tokens", type=POSITIVE, metavar="N", help="fewest visual tokens per image span (default: the model's)")  # fmt: skip
    p.add_argument("--image-budget", type=POSITIVE, metavar="N", help="most visual tokens for all images together")
    p.add_argument("--max-tiles", type=POSITIVE, metavar="K",
                   help="most tiles per image: a tiling model's grid (SmolVLM2, InternVL3, LLaVA-OneVision), or --tiles")  # fmt: skip
    if per_request:
        p.add_argument("--tiles", type=TILES, metavar="K", help="encode a low-resolution global view plus up to K tiles")  # fmt: skip
        p.add_argument("--crop", metavar="L,T,R,B", help="encode only this region: pixels, or fractions if all in [0, 1]")  # fmt: skip


def _add_sampling_flags(p: argparse.ArgumentParser, default_max_tokens: int) -> None:
    p.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=POSITIVE, default=default_max_tokens,
                   metavar="N", help="most tokens in the answer (--max-new-tokens is the old name)")  # fmt: skip
    p.add_argument("--temperature", type=_number(0.0), default=0.0, metavar="T", help="0 = greedy")
    p.add_argument("--top-p", type=_number(0.0, 1.0, above=True), default=0.95, metavar="P", help="nucleus sampling: keep the likeliest tokens up to this probability")  # fmt: skip
    p.add_argument("--top-k", type=_integer(0), default=40, metavar="K", help="sample among the K likeliest tokens (0: all)")  # fmt: skip
    p.add_argument("--seed", type=SEED, default=None, metavar="N", help="sampling seed (default: a random one)")


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `edgevlm.load`: profile, context, threads, vision precision, the bundle check."""
    _add_profile_flag(p)
    p.add_argument("--n-ctx", type=POSITIVE, default=None, metavar="N", help="context size (default: the profile's)")
    p.add_argument("--threads", type=POSITIVE, default=None, metavar="N", help="CPU threads (default: the profile's)")
    p.add_argument("--vision-dtype", choices=["fp32", "fp16", "int8"], default=None,
                   help="vision graph precision (default: the profile's preference the bundle has)")  # fmt: skip
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)


def _load(args: argparse.Namespace):
    import edgevlm

    return edgevlm.load(
        args.bundle, args.profile, n_ctx=args.n_ctx, n_threads=args.threads, vision_dtype=args.vision_dtype,
        max_image_tokens=args.max_image_tokens, min_image_tokens=args.min_image_tokens, image_budget=args.image_budget,
        max_tiles=args.max_tiles, verify=not args.no_verify,
    )  # fmt: skip


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo_bundle_path, run_demo

    quantization = next((q for flag, q in QUANT_FLAGS.items() if getattr(args, flag, False)), "Q4_K_M")
    bundle = demo_bundle_path(quantization)
    if not args.quiet and not (bundle / "edgevlm.json").is_file():
        print(f"edgevlm demo: exporting the demo model once (~30 s) to {bundle}; later runs reuse it", file=sys.stderr, flush=True)  # fmt: skip
    result = run_demo(quantization, seed=args.seed, question_type=args.question_type, vision_dtype=args.vision_dtype,
                      profile=args.profile)  # fmt: skip
    t = result.timings
    print(f"bundle:   {result.bundle}" + (f" (exported in {result.export_s:.1f} s)" if result.export_s else ""))
    print(f"image:    {result.image_path}")
    print(f"question: {result.question}")
    print(f"answer:   {result.answer}")
    print(f"expected: {result.expected}  ({'correct' if result.answer == result.expected else 'wrong'})")
    print(f"load {result.load_s:.2f} s | {t.n_image_tokens} image tokens | vision {t.vision_ms:.0f} ms | "
          f"prefill {t.prefill_ms:.0f} ms | first token {t.time_to_first_token_ms:.0f} ms | {t.n_generated} tokens")  # fmt: skip
    return 0


def _is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is only reachable from this machine."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve beyond loopback


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .chat import ImagePolicy
    from .server import ServerSettings, serve

    local_dir = None
    if args.allow_local_images is not None:
        local_dir = Path(args.allow_local_images).resolve()
        if not local_dir.is_dir():
            raise EdgeVLMError(f"--allow-local-images {args.allow_local_images}: not a directory")
    max_body = int(args.max_body_mb * 2**20)
    # the settings check every limit (and refuse an empty --api-key) before the model loads
    policy = ImagePolicy(allow_local=local_dir is not None, local_root=local_dir,
                         allow_remote=args.allow_remote_images, max_bytes=max_body,
                         allow_private_hosts=args.allow_private_image_hosts, limits=_image_limits(args))  # fmt: skip
    settings = ServerSettings(
        model_id=args.model_id or Path(args.bundle).resolve().name, strict_model_name=args.strict_model_name,
        api_key=args.api_key, image_policy=policy,
        max_body_bytes=max_body, max_queue=args.queue, max_messages=args.max_messages,
        max_text_chars=args.max_text_chars,
        request_timeout_s=args.request_timeout, body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
        keep_alive_s=args.keep_alive_timeout, max_connections=args.max_connections,
    )  # fmt: skip
    vlm = _load(args)
    if not _is_loopback(args.host) and settings.api_key is None:
        print(f"edgevlm serve: warning: listening on {args.host}, beyond this machine, without --api-key: anyone "
              "who can reach the port can use the model", file=sys.stderr)  # fmt: skip
    print(f"serving {settings.model_id} at http://{args.host}:{args.port}/v1 (OpenAI-compatible)", flush=True)
    serve(vlm, settings, host=args.host, port=args.port)
    return 0


def _profiles(args: argparse.Namespace) -> int:
    """List the shipped profiles and auto's pick, or (`show NAME`) what one profile resolves to on this machine."""
    from .profiles import auto_profile, load_profile, probe_host, shipped_profiles

    host = probe_host()
    if getattr(args, "name", None):
        return _show_profile(args, host)
    auto_name, reason = auto_profile(host)
    width = max(map(len, shipped_profiles()))
    for name in shipped_profiles():
        print(f"{name:<{width}}  {'*' if name == auto_name else ' '} {load_profile(name).description}")
    print(f"\nauto picks {auto_name}: {reason}")
    ram = f"{host.ram_bytes / 2**30:.1f} GiB RAM" if host.ram_bytes else "RAM unknown"
    print(f"this machine: {host.cpu_model or 'CPU model unknown'} ({host.isa}), "
          f"{host.physical_cores} physical cores ({host.logical_cpus} CPUs), {ram}, "
          f"onnxruntime providers {', '.join(host.onnxruntime_providers)}, llama.cpp GPU offload "
          f"{'yes' if host.llama_gpu_offload else 'no'}{', ' + host.device_model if host.device_model else ''}")  # fmt: skip
    print("details: edgevlm profiles show NAME|PATH [--bundle DIR]")
    return 0


def _show_profile(args: argparse.Namespace, host) -> int:
    from .bundle import Bundle
    from .profiles import resolve_settings

    bundle = Bundle.open(args.bundle) if args.bundle else None
    if args.assume_gpu:
        host = dataclasses.replace(host, llama_gpu_offload=True, onnxruntime_providers=(
            "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"))  # fmt: skip
    logging.getLogger("edgevlm.profiles.resolve").setLevel(logging.ERROR)  # the notes are printed below
    settings = resolve_settings(args.name, bundle, host=host)
    profile, llama = settings.profile, settings.llama
    print(f"profile {profile.name} ({settings.reason}){' strict' if profile.strict else ''}: {profile.source}")
    if profile.description:
        print(f"  {profile.description}")
    print("vision (onnxruntime):")
    for name, options in settings.providers:
        print(f"  {name}" + "".join(f"\n      {key} = {value}" for key, value in options.items()))
        if name == "TensorrtExecutionProvider" and "trt_profile_min_shapes" not in options:
            print("      (the patch-axis shape profile needs --bundle)")
    preference = ", ".join(profile.vision.precision) or "the bundle's default"
    print(f"  precision {settings.vision_dtype or 'the bundle default'} (preference: {preference}"
          f"{'' if bundle else '; the bundle decides among them'})")  # fmt: skip
    print(f"  intra-op threads {settings.intra_op_threads}, spinning {'on' if settings.allow_spinning else 'off'}")
    print("llm (llama.cpp):")
    print(f"  n_gpu_layers {llama.n_gpu_layers} ({'all' if llama.n_gpu_layers < 0 else 'CPU only' if llama.n_gpu_layers == 0 else 'partial'}), "
          f"n_threads {llama.n_threads}, n_threads_batch {llama.n_threads_batch}"
          f"{' (less the cores other processes are busy on, per request)' if llama.adapt_threads else ''}")  # fmt: skip
    flash = "auto" if llama.flash_attn is None else "on" if llama.flash_attn else "off"
    mmap = "auto" if llama.mmap is None else "on" if llama.mmap else "off"
    print(f"  n_ctx {llama.n_ctx}, n_batch {llama.n_batch}, n_ubatch {llama.n_ubatch}, flash attention {flash}, "
          f"KV cache {llama.kv_cache_type}, mmap {mmap}, mlock {'on' if llama.mlock else 'off'}")  # fmt: skip
    limits = [f"{key}={value}" for key, value in settings.limits.to_dict().items() if value is not None]
    print(f"image token limits (profile layer): {', '.join(limits) or 'none (the bundle decides)'}")
    if settings.vision_gflops:
        print(f"assumed vision throughput: {settings.vision_gflops:g} GFLOP/s")
    ceiling = "none" if settings.ceiling_bytes is None else f"{settings.ceiling_bytes / 2**30:.2f} GiB"
    print(f"memory ceiling: {ceiling}" + (f"; estimate {settings.memory.describe()}" if settings.memory else "" if bundle else " (give --bundle for an estimate)"))  # fmt: skip
    for note in settings.notes:
        print(f"note: {note}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    bundle = Bundle.open(args.bundle)
    for name in bundle.verify():
        print(f"ok  {name}")
    print(f"{args.bundle}: all {len(bundle.manifest.files)} files match their sha256")
    return 0


def _positive_ints(text: str) -> list[int]:
    """argparse type: "64,256,1024" -> [64, 256, 1024]."""
    try:
        values = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _integer(low: int, high: int | None = None, hint: str = "") -> Callable[[str], int]:
    """argparse type: an integer in [low, high] (no upper bound when `high` is None); `hint` follows a refusal."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_bounds(low, high)}, got {value}{hint}")
        return value

    return parse


def _number(low: float, high: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number >= low (> low when `above`), <= high."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_bounds(low, high, above=above)}, got {text}")
        return value

    return parse


def _bounds(low: float, high: float | None, *, above: bool = False) -> str:
    if high is None:
        return f"{'greater than' if above else 'at least'} {low:g}"
    return f"in {'(' if above else '['}{low:g}, {high:g}]" if isinstance(high, float) else f"in [{low}, {high}]"


POSITIVE = _integer(1)
TILES = _integer(1, hint=" (the most tiles per image, K >= 1; leave --tiles out for no tiling)")
SEED = _integer(0, 2**32 - 2)  # llama.cpp's seed is 32 bits, and 0xFFFFFFFF means "random"


def _bench(args: argparse.Namespace) -> int:
    from .bench import check_plotting, markdown, plot, run_bench, short_cases

    if args.plot:
        check_plotting()  # before a run of minutes, not after it
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = run_bench(
        args.bundle, image_tokens=args.image_tokens, runs=args.runs, max_new_tokens=args.max_tokens,
        baseline=not args.no_baseline, vision_dtype=args.vision_dtype, n_threads=args.threads, profile=args.profile,
        progress=say,
    )  # fmt: skip
    print(markdown(result))
    for case in short_cases(result):
        print(f"edgevlm bench: warning: asked for {case['requested_tokens']} image tokens, the model encoded "
              f"{case['n_image_tokens']} (its pixel or token limits cap the image); the row is labelled with the "
              "tokens measured", file=sys.stderr)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results written to {args.json}", file=sys.stderr)
    if args.plot:
        print(f"plot written to {plot(result, args.plot)}", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .chat import ImagePolicy
    from .cli_chat import run_chat

    image_policy = ImagePolicy(limits=_image_limits(args))
    vlm = _load(args)
    try:
        sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                    "top_k": args.top_k, "seed": args.seed}  # fmt: skip
        return run_chat(vlm, system=args.system, sampling=sampling, image_policy=image_policy)
    finally:
        vlm.close()


def _supported_models() -> str:
    """What `edgevlm export` takes, from the exporter families' declarations (which import no torch)."""
    from .exporters import PACKAGED_MODELS, aliases, architectures

    lines = ["supported architectures (config.json):", *(f"  {name}" for name in architectures()), "aliases:"]
    lines += [f"  {alias:<15} {hub_id}" for alias, hub_id in aliases().items()]
    lines += [f"  {alias:<15} packaged with edgevlm" for alias in PACKAGED_MODELS]
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs as written (examples), and every option's default shown unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or not action.option_strings or unset:
            return text
        return f"{text} (default: %(default)s)"


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_logging_flags(p: argparse.ArgumentParser, after: bool) -> None:
    """-v/-q/--log-level; given after the subcommand they land in their own fields, so both places count."""
    suffix, default = ("_after", argparse.SUPPRESS) if after else ("", None)
    group = p.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", dest="verbose" + suffix, default=default,
                       help="more log detail: -v edgevlm's (llama.cpp, onnxruntime), -vv also third-party libraries'")  # fmt: skip
    group.add_argument("-q", "--quiet", action="store_true", dest="quiet" + suffix, default=default,
                       help="errors only: no warnings, no progress lines")  # fmt: skip
    group.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper, dest="log_level" + suffix, default=default,
                       help="edgevlm's log level, beats -v/-q (default: WARNING)")  # fmt: skip


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _subcommand(sub, name: str, handler: Callable[[argparse.Namespace], int], help: str, epilog: str | None = None,
                **kwargs) -> argparse.ArgumentParser:  # fmt: skip
    p = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".", epilog=epilog,
                       formatter_class=_HelpFormatter, **kwargs)  # fmt: skip
    _add_logging_flags(p, after=True)
    p.set_defaults(handler=handler, parser=p)  # `parser`: errors found later print this subcommand's usage
    return p


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="edgevlm", description="Vision-language models on devices.", formatter_class=_HelpFormatter,
        epilog=_examples("edgevlm demo", "edgevlm export qwen2-vl-2b -o bundle/",
                         'edgevlm run bundle/ --image photo.jpg -p "What is on the table?"', "edgevlm chat bundle/",
                         "edgevlm serve bundle/", "edgevlm COMMAND --help   (every command's options)"),
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_logging_flags(parser, after=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subcommand(sub, "export", _export, "export a Hugging Face VLM to a bundle (needs edgevlm[export])",
                    epilog=_examples("edgevlm export qwen2-vl-2b -o bundle/", "edgevlm export ./my-model --int8 --vision-dtype int8 --vision-dtype fp32",
                                     "edgevlm export gemma-3-4b --profile cpu --verify") + "\n\n" + _supported_models())  # fmt: skip
    p.add_argument("model", help="alias (listed below), hub id, or local model directory")
    p.add_argument("-o", "--output", help="bundle directory (default: ./<model name>-<quantization>)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--int4", action="store_true", help="LLM in Q4_K_M (default)")
    quant.add_argument("--int8", action="store_true", help="LLM in Q8_0")
    quant.add_argument("--f16", action="store_true", help="LLM in F16")
    quant.add_argument("--f32", action="store_true", help="LLM in F32 (for parity checks)")
    p.add_argument("--vision-dtype", action="append", choices=["fp32", "fp16", "int8"],
                   help="vision graph precision; repeat to ship several (default: fp32)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--verify", action="store_true", help="compare the bundle's logits with transformers after export")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be written and the estimated peak memory and disk, checked against this "
                        "machine, without loading the model (exit status 1 if it would not fit)")  # fmt: skip
    p.add_argument("--max-image-tokens", type=POSITIVE, metavar="N",
                   help="the bundle's default cap of visual tokens per image (default: 1024)")  # fmt: skip
    p.add_argument("--profile", action="append", metavar="NAME|PATH",
                   help="also ship the vision precision this hardware profile loads; repeat for several")  # fmt: skip

    p = _subcommand(sub, "run", _run, "answer a prompt about images with a bundle",
                    epilog=_examples('edgevlm run bundle/ --image photo.jpg -p "What is on the table?" --stats',
                                     'edgevlm run bundle/ --image a.jpg --image b.jpg -p "What changed?" --max-tokens 128',
                                     'cat frame.png | edgevlm run bundle/ --image - -p "Describe it." --json',
                                     'edgevlm run bundle/ --system "Answer in one word." -p "Capital of France?"'))  # fmt: skip
    p.add_argument("bundle", help="bundle directory (made by `edgevlm export`)")
    p.add_argument("-p", "--prompt", required=True, help="the question or instruction about the images")
    p.add_argument("--system", default=None, help="a system message before the prompt")
    p.add_argument("--image", action="append", metavar="PATH", help="image file, - for stdin; repeat for several")
    _add_sampling_flags(p, 256)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, finish_reason, timings, usage) instead of streaming the text")  # fmt: skip
    p.add_argument("--stats", action="store_true", help="print timings to stderr")
    _add_load_flags(p)
    _add_budget_flags(p)
    _add_image_limit_flags(p)

    p = _subcommand(sub, "chat", _chat, "chat with a bundle in the terminal: /image PATH, /reset, /quit",
                    epilog=_examples("edgevlm chat bundle/", 'edgevlm chat bundle/ --system "Be brief." --temperature 0.7') +
                    "\n\nin the chat:\n" + "\n".join(f"  {line}" for line in CHAT_COMMANDS))  # fmt: skip
    p.add_argument("bundle", help="bundle directory (made by `edgevlm export`)")
    p.add_argument("--system", default=None, help="a system message that starts the conversation")
    _add_sampling_flags(p, 512)
    _add_load_flags(p)
    _add_budget_flags(p, per_request=False)
    _add_image_limit_flags(p)

    p = _subcommand(sub, "plan", _plan, "show how many tokens images will cost, without loading the model",
                    epilog=_examples("edgevlm plan bundle/ --image photo.jpg --max-image-tokens 256 --tiles 4"))  # fmt: skip
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--image", action="append", required=True, metavar="PATH", help="image file; repeat for several")
    _add_budget_flags(p)
    _add_profile_flag(p)
    p.add_argument("--n-ctx", type=POSITIVE, default=None, metavar="N", help="context size, as for run (default: the profile's)")  # fmt: skip
    p.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=POSITIVE, default=256, metavar="N",
                   help="room kept for the answer (--max-new-tokens is the old name)")  # fmt: skip
    p.add_argument("--prompt-tokens", type=_integer(0), default=0, metavar="N",
                   help="text tokens of the prompt, template included (run counts them)")  # fmt: skip
    p.add_argument("--vision-dtype", choices=["fp32", "fp16", "int8"], default=None)
    p.add_argument("--gflops", type=_number(0.0, above=True), default=None,
                   help="assumed vision throughput in GFLOP/s for the time estimate (default: the profile's, else 200)")  # fmt: skip

    p = _subcommand(sub, "demo", _demo, "ask the built-in demo model about a freshly drawn scene (offline)",
                    epilog=_examples("edgevlm demo", "edgevlm demo --seed 7 --question-type count --vision-dtype int8"))  # fmt: skip
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--int4", action="store_true", help="LLM in Q4_K_M (default)")
    quant.add_argument("--int8", action="store_true", help="LLM in Q8_0")
    quant.add_argument("--f16", action="store_true", help="LLM in F16")
    p.add_argument("--seed", type=_integer(0), default=None, help="scene number (default: a random one)")
    p.add_argument("--question-type", choices=["shape", "color", "count", "position"], default=None,
                   help="the kind of question (default: a random one)")  # fmt: skip
    p.add_argument("--vision-dtype", choices=["fp32", "int8"], default=None, help="default: the profile's preference")
    _add_profile_flag(p)

    p = _subcommand(sub, "bench", _bench, "measure every stage of an answer, next to plain llama-cpp-python decoding",
                    epilog=_examples("edgevlm bench bundle/", "edgevlm bench bundle/ --image-tokens 64,256 --runs 5 --json bench.json --plot bench.png  (needs edgevlm[bench])"))  # fmt: skip
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--image-tokens", type=_positive_ints, default=[64, 256, 1024], metavar="N,N,...",
                   help="image sizes to measure, as image token counts (default: 64,256,1024; the model's limits may cap them)")  # fmt: skip
    p.add_argument("--runs", type=POSITIVE, default=3, help="measured runs per image size, after 1 warm-up")
    p.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=_integer(2), default=32, metavar="N",
                   help="tokens generated per run, at least 2 to measure decoding (--max-new-tokens is the old name)")  # fmt: skip
    p.add_argument("--threads", type=POSITIVE, default=None, metavar="N", help="CPU threads (default: the profile's)")
    p.add_argument("--vision-dtype", choices=["fp32", "fp16", "int8"], default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the plain llama-cpp-python decode baseline")
    _add_profile_flag(p)
    p.add_argument("--json", metavar="FILE", help="write the results to this JSON file")
    p.add_argument("--plot", metavar="PNG", help="write a PNG of the stages to this file (needs edgevlm[bench]: matplotlib)")  # fmt: skip

    p = _subcommand(sub, "serve", _serve, "serve a bundle over an OpenAI-compatible HTTP API (/v1/chat/completions)",
                    epilog=_examples("edgevlm serve bundle/", "edgevlm serve bundle/ --host 0.0.0.0 --port 9000 --api-key \"$KEY\""))  # fmt: skip
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=_integer(1, 65535), default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--model-id", default=None, help="model name in the API (default: the bundle directory's name)")
    p.add_argument("--strict-model-name", action="store_true",
                   help="answer 404 to requests naming another model (default: any name is served by this one)")  # fmt: skip
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs from public addresses (default: refused)")  # fmt: skip
    p.add_argument("--allow-private-image-hosts", action="store_true",
                   help="with --allow-remote-images, also fetch from loopback, private and link-local addresses "
                        "(default: refused, as a guard against reaching internal services)")  # fmt: skip
    p.add_argument("--allow-local-images", metavar="DIR", default=None,
                   help="accept image paths and file:// URLs of regular files inside DIR (default: refused)")  # fmt: skip
    _add_image_limit_flags(p)
    positive_float = _number(0.0, above=True)
    p.add_argument("--max-body-mb", type=positive_float, default=20.0, help="largest request body (default: 20 MB)")
    p.add_argument("--queue", type=_integer(0), default=16, help="requests that may wait for the model")
    p.add_argument("--max-messages", type=POSITIVE, default=256, help="most messages in one request")
    p.add_argument("--max-text-chars", type=POSITIVE, default=2**20, help="most characters of text in one request")
    p.add_argument("--max-connections", type=POSITIVE, default=64,
                   help="most open connections; more get 503 and are closed")  # fmt: skip
    p.add_argument("--request-timeout", type=positive_float, default=300.0, metavar="S",
                   help="a request still unanswered this long after it arrived is cancelled: 504")  # fmt: skip
    p.add_argument("--body-timeout", type=positive_float, default=30.0, metavar="S",
                   help="most time to receive a request's body: 408")  # fmt: skip
    p.add_argument("--header-timeout", type=positive_float, default=10.0, metavar="S",
                   help="most time to receive a request's headers after connecting or the previous answer")  # fmt: skip
    p.add_argument("--keep-alive-timeout", type=positive_float, default=5.0, metavar="S",
                   help="an idle keep-alive connection is closed after this")  # fmt: skip
    _add_load_flags(p)
    _add_budget_flags(p, per_request=False)

    p = _subcommand(sub, "profiles", _profiles, "list hardware profiles and which one auto picks here",
                    epilog=_examples("edgevlm profiles", "edgevlm profiles show cpu --bundle bundle/"))  # fmt: skip
    profiles_sub = p.add_subparsers(dest="profiles_command", metavar="show")
    show = _subcommand(profiles_sub, "show", _profiles, "the settings a profile resolves to on this machine")
    show.add_argument("name", metavar="NAME|PATH", help="a shipped profile, auto, or a .toml file")
    show.add_argument("--bundle", help="resolve against this bundle (precision, TensorRT shapes, memory estimate)")
    show.add_argument("--assume-gpu", action="store_true",
                      help="resolve as if onnxruntime had TensorRT and CUDA and llama.cpp could offload (review a GPU profile anywhere)")  # fmt: skip

    p = _subcommand(sub, "verify", _verify, "check every bundle file against its sha256",
                    epilog=_examples("edgevlm verify bundle/"))  # fmt: skip
    p.add_argument("bundle", help="bundle directory")
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    """edgevlm's loggers at the asked level; third-party loggers (onnx_ir's passes, transformers) stay at WARNING
    unless -vv, so that -v shows edgevlm's own steps, not hundreds of lines from the libraries it drives."""
    verbosity = (args.verbose or 0) + getattr(args, "verbose_after", 0)
    quiet = args.quiet or getattr(args, "quiet_after", False)
    if verbosity and quiet:
        args.parser.error("-v and -q contradict each other: give one")
    level_name = getattr(args, "log_level_after", None) or args.log_level
    level = getattr(logging, level_name) if level_name else logging.ERROR if quiet else logging.INFO if verbosity else logging.WARNING  # fmt: skip
    logging.basicConfig(level=logging.DEBUG if verbosity >= 2 else max(level, logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("edgevlm").setLevel(logging.DEBUG if verbosity >= 2 else level)
    if verbosity >= 2 or quiet:  # transformers logs through its own handler, at the level this variable sets
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbosity >= 2 else "error")
    if level > logging.INFO:
        logging.getLogger("edgevlm.llama_cpp").setLevel(logging.ERROR)
    args.quiet = quiet


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would print the top-level usage; the subcommand's is the one that helps
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _configure_logging(args)
    try:
        return args.handler(args)
    except EdgeVLMError as e:
        print(f"edgevlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"edgevlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during an export (`Terminated`)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"edgevlm {args.command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
