"""The `edgevlm` command. Each subcommand imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

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
    print(f"bundle written to {out}")
    return 0


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
    """--vision-dtype flags first, then the precision each --profile loads (the first it prefers); fp32 if none."""
    from .profiles.schema import load_profile

    loaded = [load_profile(name).vision.precision[:1] for name in profile_names]
    return tuple(dict.fromkeys([*flags, *(p for precision in loaded for p in precision)])) or ("fp32",)


def _run(args: argparse.Namespace) -> int:
    import edgevlm

    from .budget import Crop
    from .images import check_images

    crop = Crop.parse(args.crop) if args.crop else None  # flag errors before the model loads
    _check_tiles(args.tiles)
    image_limits = _image_limits(args)
    check_images(args.image or [], image_limits)  # a missing, non-regular or oversized image fails before loading
    t0 = time.perf_counter()
    vlm = edgevlm.load(
        args.bundle, args.profile, n_ctx=args.n_ctx, n_threads=args.threads, vision_dtype=args.vision_dtype,
        max_image_tokens=args.max_image_tokens, min_image_tokens=args.min_image_tokens, image_budget=args.image_budget,
        verify=not args.no_verify,
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    last = None
    for step in vlm.generate(
        args.prompt,
        images=args.image or [],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        crop=crop,
        tiles=args.tiles,
        image_limits=image_limits,
    ):
        print(step.text, end="", flush=True)
        last = step
    print()
    if args.stats and last is not None:
        t = last.timings
        print(
            f"load {load_s:.2f} s | image tokens {t.n_image_tokens} | vision {t.vision_ms:.0f} ms | "
            f"prefill {t.prefill_ms:.0f} ms ({t.prefill_tokens_per_s:.1f} tok/s) | "
            f"first token {t.time_to_first_token_ms:.0f} ms | decode {t.decode_tokens_per_s:.1f} tok/s | "
            f"{t.n_generated} tokens, finish: {last.finish_reason}",
            file=sys.stderr,
        )
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Print the token plan of `run` with the same flags, from image headers: no model is loaded."""
    from .budget import DEFAULT_VISION_GFLOPS, BudgetLimits, Crop, ImageRequest
    from .bundle import Bundle
    from .images import image_size
    from .planner import Planner
    from .profiles import Overrides, resolve_settings

    bundle = Bundle.open(args.bundle)
    manifest = bundle.manifest
    cli_limits = BudgetLimits(args.max_image_tokens, args.min_image_tokens, args.image_budget)
    crop = Crop.parse(args.crop) if args.crop else None
    _check_tiles(args.tiles)
    settings = resolve_settings(args.profile, bundle, Overrides(n_ctx=args.n_ctx, vision_dtype=args.vision_dtype, limits=cli_limits))  # fmt: skip
    n_ctx = settings.llama.n_ctx
    planner = Planner.for_settings(manifest, settings, cli_limits)
    limits, tower = planner.limits(), planner.tower
    sizes = [image_size(path) for path in args.image]
    requests = [ImageRequest(width, height, crop=crop, tiles=args.tiles or 0) for width, height in sizes]
    gflops = args.gflops or settings.vision_gflops or DEFAULT_VISION_GFLOPS
    gflops_source = "--gflops" if args.gflops else f"profile {settings.profile.name}" if settings.vision_gflops else "default; --gflops"  # fmt: skip
    plan = planner.plan(requests, n_prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens)

    gib = 2**30
    header = f"{'view':<7} {'region (l,t,r,b)':<22} {'resized':>10} {'grid':>8} {'tokens':>7}  {'limited by':<17}"
    print(header + (f" {'est. memory':>11} {'est. encode':>11}" if tower else ""))
    for index, (path, (width, height)) in enumerate(zip(args.image, sizes, strict=True)):
        print(f"{path}: {width}x{height}")
        for span in (s for s in plan.spans if s.image_index == index):
            region = "whole image" if span.box == (0, 0, width, height) else ",".join(map(str, span.box))
            resized = f"{span.resized_size[1]}x{span.resized_size[0]}"
            line = (f"{span.view:<7} {region:<22} {resized:>10} {span.grid[1]:>3}x{span.grid[2]:<4} {span.n_tokens:>7}  "
                    f"{span.limited_by or '-':<17}")  # fmt: skip
            if tower:
                encode_s = span.encode_flops / (gflops * 1e9)
                line += f" {span.activation_bytes / gib:>7.2f} GiB {encode_s:>9.1f} s"
            print(line)
    cap = "none" if plan.image_token_cap is None else str(plan.image_token_cap)
    print(f"total {plan.n_image_tokens} image tokens in {len(plan.spans)} span(s); cap {cap} "
          f"(context {n_ctx} - {args.prompt_tokens} prompt - {args.max_new_tokens} new tokens"
          f"{'' if limits.image_budget is None else f', image budget {limits.image_budget}'})")  # fmt: skip
    in_force = [limits.describe(name) for name, _ in limits.sources]
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


def _check_tiles(tiles: int | None) -> None:
    if tiles is not None and tiles < 1:
        raise EdgeVLMError(f"--tiles {tiles}: give the most tiles per image, K >= 1 (leave it out for no tiling)")


def _add_profile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="auto", metavar="NAME|PATH",
                   help="hardware profile: auto (default: detect), a name from `edgevlm profiles`, or a .toml file")  # fmt: skip


def _add_image_limit_flags(p: argparse.ArgumentParser) -> None:
    from .images import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_PIXELS

    p.add_argument("--max-image-pixels", type=_at_least(1), default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help="refuse an image of more than N pixels (width x height) from its header, before decoding "
                        f"(default: {DEFAULT_MAX_IMAGE_PIXELS:,}; a 48 MP photo passes)")  # fmt: skip
    p.add_argument("--max-request-pixels", type=_at_least(1), default=DEFAULT_MAX_REQUEST_PIXELS, metavar="N",
                   help=f"refuse a request whose images have more than N pixels together (default: {DEFAULT_MAX_REQUEST_PIXELS:,})")  # fmt: skip


def _image_limits(args: argparse.Namespace) -> ImageLimits:
    """The pixel caps of the flags; Pillow's process-wide ceiling is raised to match a per-image cap above it."""
    from PIL import Image

    from .images import ImageLimits

    if Image.MAX_IMAGE_PIXELS is not None and args.max_image_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = args.max_image_pixels
    return ImageLimits(args.max_image_pixels, args.max_request_pixels)


def _add_budget_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-tokens", type=int, help="most visual tokens per image span (default: the bundle's)")
    p.add_argument("--min-image-tokens", type=int, help="fewest visual tokens per image span (default: the model's)")
    p.add_argument("--image-budget", type=int, help="most visual tokens for all images together")
    p.add_argument("--tiles", type=int, metavar="K", help="encode a low-resolution global view plus up to K tiles")
    p.add_argument("--crop", metavar="L,T,R,B", help="encode only this region: pixels, or fractions if all in [0, 1]")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    quantization = next((q for flag, q in QUANT_FLAGS.items() if getattr(args, flag, False)), "Q4_K_M")
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

    import edgevlm

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
        model_id=args.model_id or Path(args.bundle).resolve().name, api_key=args.api_key, image_policy=policy,
        max_body_bytes=max_body, max_queue=args.queue, max_messages=args.max_messages,
        max_text_chars=args.max_text_chars,
        request_timeout_s=args.request_timeout, body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
        keep_alive_s=args.keep_alive_timeout, max_connections=args.max_connections,
    )  # fmt: skip
    vlm = edgevlm.load(
        args.bundle, args.profile, n_ctx=args.n_ctx, n_threads=args.threads, vision_dtype=args.vision_dtype,
        max_image_tokens=args.max_image_tokens, min_image_tokens=args.min_image_tokens, image_budget=args.image_budget,
        verify=not args.no_verify,
    )  # fmt: skip
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


def _at_least(minimum: int):
    """argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _bench(args: argparse.Namespace) -> int:
    import json

    from .bench import markdown, plot, run_bench

    result = run_bench(
        args.bundle, image_tokens=args.image_tokens, runs=args.runs, max_new_tokens=args.max_new_tokens,
        baseline=not args.no_baseline, vision_dtype=args.vision_dtype, n_threads=args.threads, profile=args.profile,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )  # fmt: skip
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results written to {args.json}", file=sys.stderr)
    if args.plot:
        print(f"plot written to {plot(result, args.plot)}", file=sys.stderr)
    return 0


def _supported_models() -> str:
    """What `edgevlm export` takes, from the exporter families' declarations (which import no torch)."""
    from .exporters import PACKAGED_MODELS, aliases, architectures

    lines = ["supported architectures (config.json):", *(f"  {name}" for name in architectures()), "aliases:"]
    lines += [f"  {alias:<15} {hub_id}" for alias, hub_id in aliases().items()]
    lines += [f"  {alias:<15} packaged with edgevlm" for alias in PACKAGED_MODELS]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgevlm", description="Vision-language models on devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (llama.cpp, onnxruntime)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a Hugging Face VLM to a bundle (needs edgevlm[export])",
                       epilog=_supported_models(), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
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
    p.add_argument("--max-image-tokens", type=int,
                   help="the bundle's default cap of visual tokens per image (default: 1024)")  # fmt: skip
    p.add_argument("--profile", action="append", metavar="NAME|PATH",
                   help="also ship the vision precision this hardware profile loads; repeat for several")  # fmt: skip
    p.set_defaults(handler=_export)

    p = sub.add_parser("run", help="answer a prompt about images with a bundle")
    p.add_argument("bundle")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--image", action="append", help="image file; repeat for several")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    _add_profile_flag(p)
    p.add_argument("--n-ctx", type=int, default=None, help="context size (default: the profile's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the profile's)")
    p.add_argument("--vision-dtype", choices=["fp32", "fp16", "int8"], default=None,
                   help="vision graph precision (default: the profile's preference the bundle has)")  # fmt: skip
    p.add_argument("--stats", action="store_true", help="print timings to stderr")
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    _add_budget_flags(p)
    _add_image_limit_flags(p)
    p.set_defaults(handler=_run)

    p = sub.add_parser("plan", help="show how many tokens images will cost, without loading the model")
    p.add_argument("bundle")
    p.add_argument("--image", action="append", required=True, help="image file; repeat for several")
    _add_budget_flags(p)
    _add_profile_flag(p)
    p.add_argument("--n-ctx", type=int, default=None, help="context size, as for run (default: the profile's)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="room kept for the answer (default: 256)")
    p.add_argument("--prompt-tokens", type=int, default=0,
                   help="text tokens of the prompt, template included (run counts them; default: 0)")  # fmt: skip
    p.add_argument("--vision-dtype", choices=["fp32", "fp16", "int8"], default=None)
    p.add_argument("--gflops", type=float, default=None,
                   help="assumed vision throughput in GFLOP/s for the time estimate (default: the profile's, else 200)")  # fmt: skip
    p.set_defaults(handler=_plan)

    p = sub.add_parser("demo", help="ask the built-in demo model about a freshly drawn scene (offline)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--int4", action="store_true", help="LLM in Q4_K_M (default)")
    quant.add_argument("--int8", action="store_true", help="LLM in Q8_0")
    quant.add_argument("--f16", action="store_true", help="LLM in F16")
    p.add_argument("--seed", type=int, default=None, help="scene number (default: a random one)")
    p.add_argument("--question-type", choices=["shape", "color", "count", "position"], default=None)
    p.add_argument("--vision-dtype", choices=["fp32", "int8"], default=None, help="default: the profile's preference")
    _add_profile_flag(p)
    p.set_defaults(handler=_demo)

    p = sub.add_parser("bench", help="measure every stage of an answer, next to plain llama-cpp-python decoding")
    p.add_argument("bundle")
    p.add_argument("--image-tokens", type=_positive_ints, default=[64, 256, 1024],
                   help="image sizes to measure, as image token counts (default: 64,256,1024)")  # fmt: skip
    p.add_argument("--runs", type=_at_least(1), default=3, help="measured runs per image size, after 1 warm-up (default: 3)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=_at_least(2), default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--vision-dtype", choices=["fp32", "fp16", "int8"], default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the plain llama-cpp-python decode baseline")
    _add_profile_flag(p)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--plot", help="write a PNG of the stages to this file (needs matplotlib)")
    p.set_defaults(handler=_bench)

    p = sub.add_parser("serve", help="serve a bundle over an OpenAI-compatible HTTP API (/v1/chat/completions)")
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--model-id", default=None, help="model name in the API (default: the bundle directory's name)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs from public addresses (default: refused)")  # fmt: skip
    p.add_argument("--allow-private-image-hosts", action="store_true",
                   help="with --allow-remote-images, also fetch from loopback, private and link-local addresses "
                        "(default: refused, as a guard against reaching internal services)")  # fmt: skip
    p.add_argument("--allow-local-images", metavar="DIR", default=None,
                   help="accept image paths and file:// URLs of regular files inside DIR (default: refused)")  # fmt: skip
    _add_image_limit_flags(p)
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (default: 20 MB)")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait for the model (default: 16)")
    p.add_argument("--max-messages", type=int, default=256, help="most messages in one request (default: 256)")
    p.add_argument("--max-text-chars", type=int, default=2**20,
                   help="most characters of text in one request (default: 1048576)")  # fmt: skip
    p.add_argument("--max-connections", type=int, default=64,
                   help="most open connections; more get 503 and are closed (default: 64)")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=300.0, metavar="S",
                   help="a request still unanswered this long after it arrived is cancelled: 504 (default: 300)")  # fmt: skip
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="most time to receive a request's body: 408 (default: 30)")  # fmt: skip
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="most time to receive a request's headers after connecting or the previous answer (default: 10)")  # fmt: skip
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="S",
                   help="an idle keep-alive connection is closed after this (default: 5)")  # fmt: skip
    _add_profile_flag(p)
    p.add_argument("--n-ctx", type=int, default=None, help="context size (default: the profile's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the profile's)")
    p.add_argument("--vision-dtype", choices=["fp32", "fp16", "int8"], default=None)
    p.add_argument("--max-image-tokens", type=int, help="most visual tokens per image (default: the bundle's)")
    p.add_argument("--min-image-tokens", type=int, help="fewest visual tokens per image (default: the model's)")
    p.add_argument("--image-budget", type=int, help="most visual tokens for all images of a request")
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.set_defaults(handler=_serve)

    p = sub.add_parser("profiles", help="list hardware profiles and which one auto picks here")
    profiles_sub = p.add_subparsers(dest="profiles_command")
    show = profiles_sub.add_parser("show", help="the settings a profile resolves to on this machine")
    show.add_argument("name", metavar="NAME|PATH", help="a shipped profile, auto, or a .toml file")
    show.add_argument("--bundle", help="resolve against this bundle (precision, TensorRT shapes, memory estimate)")
    show.add_argument("--assume-gpu", action="store_true",
                      help="resolve as if onnxruntime had TensorRT and CUDA and llama.cpp could offload (review a GPU profile anywhere)")  # fmt: skip
    p.set_defaults(handler=_profiles)

    p = sub.add_parser("verify", help="check every bundle file against its sha256")
    p.add_argument("bundle")
    p.set_defaults(handler=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    if not args.verbose:
        logging.getLogger("edgevlm.llama_cpp").setLevel(logging.ERROR)
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
