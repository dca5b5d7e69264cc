"""Train the demo VLM: a tiny Qwen2-VL on synthetic scenes, on CPU, seeded. Needs `pip install 'edgevlm[export]'`.

    python -m edgevlm.demo.train --out edgevlm/demo/model

The model has Qwen2-VL's architecture (so the exporter and runtime treat it like the real thing) with a 4-layer,
256-wide language model (row lengths multiples of 256: llama.cpp's K-quants apply), a 4-block vision tower and a
byte-level BPE vocabulary of a few hundred tokens learned from the question/answer text, with Qwen2-VL's special
tokens and chat template. The loss covers the answer and its <|im_end|> only, plus an auxiliary per-token loss on
the vision tower's output (which shape kind and color each image token shows, from the scene's own geometry; its two
linear heads are dropped at save). Accuracy is measured on the "val" split every few hundred steps; training stops
at `--target` accuracy, at the end of the schedule or at `--max-minutes`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np

from ..exporters.synthetic import (
    QWEN2_SPLIT_PATTERN,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN2_VL_SPECIAL_TOKENS,
    Qwen2VLShape,
    qwen2_vl_config,
    qwen2_vl_tokenizer,
)
from .scenes import COLORS, QUESTION_TYPES, SHAPES, Scene, label_map, scene

logger = logging.getLogger(__name__)

# vocab_size is set from the tokenizer.
# fmt: off
SHAPE = Qwen2VLShape(
    vision_depth=4, vision_embed_dim=128, vision_heads=4, hidden_size=256, intermediate_size=768,
    layers=4, heads=4, kv_heads=2, mrope_section=[8, 12, 12], vocab_size=0, max_position_embeddings=2048,
)
# fmt: on
# 16 to 36 image tokens per scene (larger scenes are scaled down): training time on 2 CPU cores goes with the number
# of patches, and 64 tokens per scene left too few steps in 30 minutes for the model to learn counting.
MIN_PIXELS, MAX_PIXELS = 112 * 112, 168 * 168
BPE_VOCAB = 384  # 256 bytes + merges; the corpus is small, most words become one token
SYSTEM_PROMPT = "You are a helpful assistant."
# Harder questions more often: counting and left/right need the whole scene, naming one shape does not.
TRAIN_MIX = {"shape": 0.2, "color": 0.2, "count": 0.3, "position": 0.3}


def build_tokenizer():
    """A byte-level BPE over the scene questions and answers, with Qwen2-VL's special tokens and chat template.

    The pre-tokenizer is Qwen2's (split regex + ByteLevel), so llama.cpp's "qwen2" pre-tokenizer reproduces it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE(ignore_merges=True))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    return qwen2_vl_tokenizer(backend, model_max_length=SHAPE.max_position_embeddings)


def _corpus() -> list[str]:
    """Every question and answer the scenes can produce, plus the chat template's own words."""
    lines = [SYSTEM_PROMPT, "system\n", "user\n", "assistant\n", "What shape is this?", "How many shapes are there?"]
    lines += [*SHAPES, *COLORS, "1", "2", "3", "left", "right"]
    for shape in SHAPES:
        lines.append(f"What color is the {shape}?")
        lines += [f"Is the {color} {shape} left or right of the {other}?" for color in COLORS for other in SHAPES]
    return lines


def build_model(tokenizer):
    """A randomly initialized Qwen2VLForConditionalGeneration of `SHAPE`, its token ids taken from `tokenizer`."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    vocab_size = math.ceil(len(tokenizer) / 64) * 64
    config = qwen2_vl_config(Qwen2VLShape(**{**SHAPE.__dict__, "vocab_size": vocab_size}))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    for holder in (config, config.text_config):
        holder.bos_token_id, holder.eos_token_id = ids["<|endoftext|>"], ids["<|im_end|>"]
        holder.pad_token_id = ids["<|endoftext|>"]
    config.image_token_id = ids["<|image_pad|>"]
    config.video_token_id = ids["<|video_pad|>"]
    config.vision_start_token_id = ids["<|vision_start|>"]
    config.vision_end_token_id = ids["<|vision_end|>"]
    with torch.device("cpu"):
        model = Qwen2VLForConditionalGeneration(config)
    fix_generation_config(model.generation_config, ids)
    return model


def fix_generation_config(generation_config, ids: dict[str, int]) -> None:
    """transformers copies Qwen2's ids into the generation config at construction; point them at this vocabulary."""
    generation_config.bos_token_id = ids["<|endoftext|>"]
    generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    generation_config.pad_token_id = ids["<|endoftext|>"]


def image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})


class Batcher:
    """Scenes -> padded model inputs with labels on the answer tokens (and <|im_end|>) only."""

    def __init__(self, tokenizer, processor, merge_size: int = 2):
        self.tokenizer, self.processor, self.merge = tokenizer, processor, merge_size**2
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def prompt_text(self, question: str, n_image_tokens: int) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text.replace("<|image_pad|>", "<|image_pad|>" * n_image_tokens)

    def __call__(self, scenes: list[Scene]) -> dict:
        import torch

        pixels = self.processor(images=[s.image for s in scenes], return_tensors="pt")
        rows, label_rows = [], []
        for s, grid in zip(scenes, pixels["image_grid_thw"], strict=True):
            prompt = self.tokenizer(self.prompt_text(s.question, int(grid.prod()) // self.merge)).input_ids
            answer = self.tokenizer(s.answer + "<|im_end|>").input_ids
            rows.append(prompt + answer)
            label_rows.append([-100] * len(prompt) + answer)
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_id)
        labels = torch.full((len(rows), width), -100)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, label_row) in enumerate(zip(rows, label_rows, strict=True)):
            input_ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(row)] = torch.tensor(label_row)
            attention_mask[i, : len(row)] = 1
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"],
            "mm_token_type_ids": (input_ids == self.image_pad_id).to(torch.int32),
        }  # fmt: skip


def token_targets(scenes: list[Scene], grids, merge_size: int = 2, patch_size: int = 14, cover: float = 0.2):
    """Auxiliary targets for the vision tower's output tokens, in its order (row-major over merged blocks): the kind
    and the color (1 + index; 0 for background) of the shape covering at least `cover` of the token's pixels."""
    import torch

    block = merge_size * patch_size
    targets = {"kind": [], "color": []}
    for s, (_, grid_h, grid_w) in zip(scenes, grids.tolist(), strict=True):
        for key, names in (("kind", SHAPES), ("color", COLORS)):
            labels = label_map(s, (grid_w * patch_size, grid_h * patch_size), key)
            blocks = labels.reshape(grid_h // merge_size, block, grid_w // merge_size, block).transpose(0, 2, 1, 3)
            blocks = blocks.reshape(-1, block * block)
            counts = np.stack([(blocks == k).sum(-1) for k in range(1, len(names) + 1)], -1)
            target = np.where(counts.max(-1) >= cover * block * block, counts.argmax(-1) + 1, 0)
            targets[key].append(torch.from_numpy(target))
    return {key: torch.cat(parts) for key, parts in targets.items()}


def answer_accuracy(model, batcher: Batcher, scenes: list[Scene], batch_size: int = 32) -> dict[str, float]:
    """Exact-match accuracy per question type. Teacher-forced argmax on every answer token equals what greedy
    decoding would generate, so this is greedy accuracy at the cost of one forward pass."""
    import torch

    correct = {t: [] for t in QUESTION_TYPES}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            inputs = batcher(chunk)
            labels = inputs.pop("labels")
            predicted = model(**inputs).logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            ok = ((predicted == target) | (target == -100)).all(-1)
            for s, hit in zip(chunk, ok.tolist(), strict=True):
                correct[s.question_type].append(hit)
    model.train()
    per_type = {t: float(np.mean(v)) for t, v in correct.items() if v}
    per_type["all"] = float(np.mean([h for v in correct.values() for h in v]))
    return per_type


def train(args: argparse.Namespace) -> Path:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.init_from:  # a second stage: continue from a saved model (its tokenizer included)
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.init_from, dtype=torch.float32).train()
    else:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer).train()
    processor = image_processor()
    batcher = Batcher(tokenizer, processor)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters, vocab %d", n_params / 1e6, model.config.text_config.vocab_size)

    val = [scene(i, "val") for i in range(args.val_scenes)]
    # Auxiliary heads on the vision tower's output tokens (not saved): which shape kind and color each token shows.
    # They give the vision tower a target per token instead of one answer per image.
    aux_heads = torch.nn.ModuleDict({
        "kind": torch.nn.Linear(SHAPE.hidden_size, len(SHAPES) + 1),
        "color": torch.nn.Linear(SHAPE.hidden_size, len(COLORS) + 1),
    })  # fmt: skip
    vision_tokens = {}
    model.model.visual.register_forward_hook(lambda _m, _i, out: vision_tokens.__setitem__("out", out.pooler_output))
    params = [*model.parameters(), *aux_heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 0 at args.steps
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    types, weights = list(TRAIN_MIX), list(TRAIN_MIX.values())
    type_rng = np.random.default_rng(args.seed)
    t0, history, index = time.perf_counter(), [], args.first_scene
    for step in range(1, args.steps + 1):
        chosen = type_rng.choice(len(types), size=args.batch_size, p=weights)
        scenes = [scene(index + j, "train", types[k]) for j, k in enumerate(chosen)]
        index += args.batch_size
        inputs = batcher(scenes)
        loss = model(**inputs).loss
        if args.aux_weight:
            targets = token_targets(scenes, inputs["image_grid_thw"])
            tokens = vision_tokens["out"]
            aux = sum(torch.nn.functional.cross_entropy(aux_heads[k](tokens), t) for k, t in targets.items())
            (loss + args.aux_weight * aux).backward()
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        if step % 25 == 0:
            logger.info("step %d/%d loss %.4f lr %.2e %.0f s", step, args.steps, loss.item(), schedule.get_last_lr()[0], elapsed)  # fmt: skip
        if step % args.eval_every == 0 or step == args.steps:
            accuracy = answer_accuracy(model, batcher, val)
            history.append({"step": step, "seconds": round(elapsed), "loss": round(loss.item(), 4), **accuracy})
            logger.info("step %d val accuracy %s", step, {k: round(v, 3) for k, v in accuracy.items()})
            if accuracy["all"] >= args.target:
                logger.info("reached the target accuracy %.2f", args.target)
                break
        if elapsed > args.max_minutes * 60:
            logger.warning("stopping at the time limit (%.0f min) after step %d", args.max_minutes, step)
            break
    return save(model, tokenizer, processor, Path(args.out), {"args": vars(args), "history": history, "parameters": n_params})  # fmt: skip


def save(model, tokenizer, processor, out: Path, training: dict) -> Path:
    """The model directory in Hugging Face format (fp32 safetensors) plus a record of how it was trained."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    (out / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    logger.info("saved %s", out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "model"))
    parser.add_argument("--steps", type=int, default=2800, help="length of the cosine schedule")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-token kind/color loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", help="continue training this saved model instead of a new one")
    parser.add_argument("--first-scene", type=int, default=0, help="index of the first training scene")
    # One thread: on 2 shared cores, 2 torch threads fell to 1.2 s/step whenever another job ran (their spin-waits
    # fight it), 1 thread kept 0.3 s/step. Measured with batch 8, this machine.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--val-scenes", type=int, default=200)
    parser.add_argument("--target", type=float, default=0.99, help="stop once val accuracy reaches this")
    parser.add_argument("--max-minutes", type=float, default=28.0, help="stop after this much wall time")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train(args)


if __name__ == "__main__":
    main()
