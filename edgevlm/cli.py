"""The `edgevlm` command. Each subcommand imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .errors import EdgeVLMError

QUANT_FLAGS = {"int4": "Q4_K_M", "int8": "Q8_0", "f16": "F16", "f32": "F32"}


def _export(args: argparse.Namespace) -> int:
    from .exporters import export

    quantization = next((q for flag, q in QUANT_FLAGS.items() if getattr(args, flag)), "Q4_K_M")
    out = export(
        args.model,
        args.output,
        quantization=quantization,
        vision_dtypes=tuple(dict.fromkeys(args.vision_dtype or ["fp32"])),
        force=args.force,
        verify=args.verify,
    )
    print(f"bundle written to {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import edgevlm

    t0 = time.perf_counter()
    vlm = edgevlm.load(args.bundle, n_ctx=args.n_ctx, n_threads=args.threads, vision_dtype=args.vision_dtype)
    load_s = time.perf_counter() - t0
    last = None
    for step in vlm.generate(
        args.prompt,
        images=args.image or [],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
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


def _verify(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    bundle = Bundle.open(args.bundle)
    for name in bundle.verify():
        print(f"ok  {name}")
    print(f"{args.bundle}: all {len(bundle.manifest.files)} files match their sha256")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgevlm", description="Vision-language models on devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (llama.cpp, onnxruntime)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a Hugging Face VLM to a bundle (needs edgevlm[export])")
    p.add_argument("model", help="alias (e.g. qwen2-vl-2b), hub id, or local model directory")
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
    p.set_defaults(handler=_export)

    p = sub.add_parser("run", help="answer a prompt about images with a bundle")
    p.add_argument("bundle")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--image", action="append", help="image file; repeat for several")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--vision-dtype", choices=["fp32", "fp16", "int8"], default=None)
    p.add_argument("--stats", action="store_true", help="print timings to stderr")
    p.set_defaults(handler=_run)

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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
