"""Train the demo VLM: a tiny Qwen2-VL on synthetic scenes, on CPU, seeded. Needs `pip install 'edgevlm[export]'`.

    python -m edgevlm.demo.train --out edgevlm/demo/model

The model has Qwen2-VL's architecture (so the exporter and runtime treat it like the real thing) with a 4-layer,
256-wide language model (row lengths multiples of 256: llama.cpp's K-quants apply), a 4-block vision tower and a
byte-level BPE vocabulary of a few hundred tokens learned from the question/answer text, with Qwen2-VL's special
tokens and chat template. Training has four stages, each seeded and drawing its own scenes:

1. the vision tower alone names the shape of single-shape scenes, through a head on its max-pooled tokens;
2. the vision tower alone learns, on every token of a shape in a left/right scene, on which side the other shape
   lies (`token_targets`' ``side``);
3. the vision tower alone learns, on every token of a shape, that shape's kind and color, keeps the side, and
   learns where the shapes' centers are (all of `token_targets`);
4. the whole model learns to answer (loss on the answer and its <|im_end|>), stage 3's loss kept on the tower, and
   two attention heads of the language model are led, at the token before the answer, to the question's words
   that name a shape (color and left/right questions) and to the image tokens the answer is read from, in every
   question (`attention_targets`).

The auxiliary heads are dropped at save. Accuracy is measured on the "val" split every few hundred steps; stage 4
stops at `--target` accuracy, at the end of its schedule or at `--max-minutes` (counted from the start).
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

from ..exporters.qwen2_vl.synthetic import qwen2_vl_config
from ..exporters.qwen_synthetic import (
    QWEN2_SPLIT_PATTERN,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN2_VL_SPECIAL_TOKENS,
    Qwen2VLShape,
    qwen2_vl_tokenizer,
)
from .evaluate import accuracy_by_type
from .scenes import COLORS, SHAPES, Scene, scene, shape_map

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
# Each stage draws its own training scenes: the answers stage from index 0, the others from these offsets.
SHAPE_SCENES, SCENE_SCENES, SIDE_SCENES = 10**7, 2 * 10**7, 3 * 10**7


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


def covering(s: Scene, grid: tuple[int, int, int], merge_size: int = 2, patch_size: int = 14, cover: float = 0.2):
    """Per vision token of `s` on `grid` (the tower's output order: row-major over merged blocks), the index in
    `s.shapes` of the shape covering at least `cover` of the token's pixels (the most covering one), else -1."""
    _, grid_h, grid_w = grid
    block, rows, cols = merge_size * patch_size, grid_h // merge_size, grid_w // merge_size
    pixels = shape_map(s, (grid_w * patch_size, grid_h * patch_size))
    pixels = pixels.reshape(rows, block, cols, block).transpose(0, 2, 1, 3).reshape(rows * cols, block * block)
    counts = np.stack([(pixels == 1 + i).sum(-1) for i in range(len(s.shapes))], -1)
    return np.where(counts.max(-1) >= cover * block * block, counts.argmax(-1), -1)


def center_tokens(s: Scene, grid: tuple[int, int, int], merge_size: int = 2, patch_size: int = 14) -> list[int]:
    """The vision token (index in the tower's output order) holding each shape's center, shape by shape."""
    _, grid_h, grid_w = grid
    block, rows, cols = merge_size * patch_size, grid_h // merge_size, grid_w // merge_size
    tokens = []
    for shape in s.shapes:
        x, y = shape.center[0] * grid_w * patch_size / s.image.width, shape.center[1] * grid_h * patch_size / s.image.height  # fmt: skip
        tokens.append(min(int(y // block), rows - 1) * cols + min(int(x // block), cols - 1))
    return tokens


def token_targets(scenes: list[Scene], grids, merge_size: int = 2, patch_size: int = 14):
    """Per vision token (the tower's output order), from the shape `covering` it:

    - ``kind_color``: 0 for background, else 1 + kind * len(COLORS) + color;
    - ``side``: in scenes of two shapes, 1 if the other shape lies left, 2 if right, 0 for background; -100
      (ignored) on shapes in scenes of one or three;
    - ``center``: 1 on the token holding a shape's center.

    So that the language model finds on every token of a shape what it needs to answer about that shape."""
    import torch

    names = list(COLORS)
    targets = {"kind_color": [], "side": [], "center": []}
    for s, grid in zip(scenes, grids.tolist(), strict=True):
        _, grid_h, grid_w = grid
        rows, cols = grid_h // merge_size, grid_w // merge_size
        covered = covering(s, grid, merge_size, patch_size)
        kind_color, side = np.zeros(rows * cols, np.int64), np.zeros(rows * cols, np.int64)
        for i, shape in enumerate(s.shapes):
            kind_color[covered == i] = 1 + SHAPES.index(shape.kind) * len(names) + names.index(shape.color)
            if len(s.shapes) == 2:
                side[covered == i] = 1 + int(s.shapes[1 - i].center[0] > shape.center[0])
            else:
                side[covered == i] = -100
        center = np.zeros(rows * cols, np.float32)
        center[center_tokens(s, grid, merge_size, patch_size)] = 1
        for key, value in (("kind_color", kind_color), ("side", side), ("center", center)):
            targets[key].append(torch.from_numpy(value))
    return {key: torch.cat(parts) for key, parts in targets.items()}


def encode(visual, processor, scenes: list[Scene]):
    """The vision tower's output tokens for `scenes` (image after image) and their grids."""
    pixels = processor(images=[s.image for s in scenes], return_tensors="pt")
    return visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"]).pooler_output, pixels["image_grid_thw"]


def aux_heads():
    """Linear heads (not saved) from a vision token to each of `token_targets`."""
    import torch

    sizes = {"kind_color": 1 + len(SHAPES) * len(COLORS), "side": 3, "center": 1}
    return torch.nn.ModuleDict({key: torch.nn.Linear(SHAPE.hidden_size, n) for key, n in sizes.items()})


def aux_loss(heads, tokens, grids, scenes: list[Scene], only: str | None = None):
    """The auxiliary loss on the vision tower's output tokens: `token_targets` (or only the one named) through
    `aux_heads`."""
    from torch.nn import functional

    targets = token_targets(scenes, grids)
    if only is not None:
        return functional.cross_entropy(heads[only](tokens), targets[only], ignore_index=-100)
    loss = functional.binary_cross_entropy_with_logits(heads["center"](tokens)[:, 0], targets.pop("center"))
    return loss + sum(functional.cross_entropy(heads[k](tokens), t, ignore_index=-100) for k, t in targets.items())


def aux_accuracy(visual, heads, processor, scenes: list[Scene], batch_size: int = 32) -> dict[str, float]:
    """Per-token accuracy of the auxiliary heads on the shapes' tokens (and of `center` on every token)."""
    import torch

    hits = {key: [] for key in heads}
    visual.eval()
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            tokens, grids = encode(visual, processor, chunk)
            targets = token_targets(chunk, grids)
            for key in ("kind_color", "side"):
                on_shapes = targets[key] > 0
                hits[key] += (heads[key](tokens).argmax(-1) == targets[key])[on_shapes].tolist()
            hits["center"] += ((heads["center"](tokens)[:, 0] > 0) == (targets["center"] > 0)).tolist()
    visual.train()
    return {key: float(np.mean(h)) for key, h in hits.items()}


def answer_accuracy(model, batcher: Batcher, scenes: list[Scene], batch_size: int = 32) -> dict[str, float]:
    """Exact-match accuracy per question type. Teacher-forced argmax on every answer token equals what greedy
    decoding would generate, so this is greedy accuracy at the cost of one forward pass."""
    import torch

    hits = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            inputs = batcher(chunk)
            labels = inputs.pop("labels")
            predicted = model(**inputs).logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            ok = ((predicted == target) | (target == -100)).all(-1)
            hits += ok.tolist()
    model.train()
    return {**accuracy_by_type(hits, scenes), "all": float(np.mean(hits))}


def warmup_cosine(steps: int):
    """The learning-rate factor: linear warmup over the first 5% of `steps`, then cosine decay to 0 at `steps`."""
    warmup = max(1, steps // 20)
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def learn_shapes(visual, processor, args: argparse.Namespace) -> list[dict]:
    """Stage 1: the vision tower alone learns which shape a single-shape scene shows, through a linear head (not saved)
    on its max-pooled tokens, so that a few tokens (a corner, an edge) can carry it. Trained only through the language
    model's answers, or on whole scenes, a tower from scratch stays near chance on shapes in 30 CPU minutes; this way
    it learns them in a few. Returns the stage's validation history."""
    import torch
    from torch.nn import functional

    head = torch.nn.Linear(SHAPE.hidden_size, len(SHAPES))
    optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=args.vision_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.shape_steps))
    val = [scene(i, "val", "shape") for i in range(96)]

    def logits(scenes: list[Scene]):
        tokens, grids = encode(visual, processor, scenes)
        sizes = (grids.prod(-1) // 4).tolist()
        return head(torch.stack([t.max(0).values for t in tokens.split(sizes)]))

    def kinds(scenes: list[Scene]):
        return torch.tensor([SHAPES.index(s.answer) for s in scenes])

    t0, history = time.perf_counter(), []
    for step in range(1, args.shape_steps + 1):
        scenes = [scene(SHAPE_SCENES + step * args.batch_size + j, "train", "shape") for j in range(args.batch_size)]
        functional.cross_entropy(logits(scenes), kinds(scenes)).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.shape_steps:
            with torch.no_grad():
                visual.eval()
                accuracy = (logits(val).argmax(-1) == kinds(val)).float().mean().item()
                visual.train()
            elapsed = time.perf_counter() - t0
            history.append({"stage": "shapes", "step": step, "seconds": round(elapsed), "shape": accuracy})
            logger.info("shapes step %d/%d: shape accuracy %.3f, %.0f s", step, args.shape_steps, accuracy, elapsed)
    return history


def learn_sides(visual, heads, processor, val: list[Scene], args: argparse.Namespace) -> list[dict]:
    """Stage 2: the vision tower alone learns, on every token of a shape in a two-shape scene, on which side the other
    shape lies (`token_targets`' ``side``), on left/right scenes only. Its relative rotary positions make this
    learnable, but only at a high enough learning rate (at 3e-4 it stayed at chance for 800 steps; at 1e-3 it went
    from chance to 97% between steps 300 and 600), and not while it shares the loss with the other targets from the
    start. Returns the stage's validation history."""

    def draw(step: int) -> list[Scene]:
        return [scene(SIDE_SCENES + step * args.batch_size + j, "train", "position") for j in range(args.batch_size)]

    warmup = lambda step: min(1.0, (step + 1) / 50)  # 50 warmup steps, then constant
    return _learn_tokens("sides", visual, heads, processor, val, args, args.side_steps, draw, warmup, only="side")


def learn_scenes(visual, heads, processor, val: list[Scene], args: argparse.Namespace) -> list[dict]:
    """Stage 3: the vision tower alone learns `token_targets` on mixed scenes, so that the language model, when it
    joins, finds what each shape is on all of its tokens, not on a few. Returns the stage's validation history."""
    types = TypeSampler(args.seed + 1)

    def draw(step: int) -> list[Scene]:
        return [scene(SCENE_SCENES + step * args.batch_size + j, "train", t) for j, t in enumerate(types(args.batch_size))]  # fmt: skip

    schedule = warmup_cosine(args.scene_steps)
    return _learn_tokens("scenes", visual, heads, processor, val, args, args.scene_steps, draw, schedule)


def _learn_tokens(stage: str, visual, heads, processor, val: list[Scene], args: argparse.Namespace, steps: int,
                  draw, schedule, only: str | None = None) -> list[dict]:  # fmt: skip
    """The vision tower alone on `token_targets` (or `only` one of them) for `steps` steps of `draw(step)` scenes,
    at --vision-lr times `schedule(step)`; validated every --eval-every steps. Returns the stage's history."""
    import torch

    params = [*visual.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    t0, history = time.perf_counter(), []
    for step in range(1, steps + 1):
        scenes = draw(step)
        tokens, grids = encode(visual, processor, scenes)
        aux_loss(heads, tokens, grids, scenes, only=only).backward()
        _step(params, optimizer, scheduler)
        if step % args.eval_every == 0 or step == steps:
            accuracy = aux_accuracy(visual, heads, processor, val)
            elapsed = time.perf_counter() - t0
            history.append({"stage": stage, "step": step, "seconds": round(elapsed), **accuracy})
            logger.info("%s step %d/%d: token accuracy %s, %.0f s", stage, step, steps, _rounded(accuracy), elapsed)
    return history


def _step(params, optimizer, scheduler) -> None:
    """One optimizer step with the gradients clipped to norm 1."""
    import torch

    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def subject(s: Scene) -> int | None:
    """Index in `s.shapes` of the shape a color or left/right question asks about; None for other questions."""
    if s.question_type == "color":
        return next(i for i, shape in enumerate(s.shapes) if s.question.endswith(f" {shape.kind}?"))
    if s.question_type == "position":
        return next(i for i, shape in enumerate(s.shapes) if f" {shape.color} {shape.kind} " in s.question)
    return None


def attention_targets(scenes: list[Scene], inputs: dict, tokenizer):
    """Where two attention heads of the language model are led at the token that predicts the answer:

    - ``query`` (B,): that token's position, the last of the prompt;
    - ``words`` (B, T): for a question that names a shape (color, left/right), a distribution spread evenly over
      the question's tokens that name it (its kind; for left/right also its color, the one word that tells the
      subject from the reference); zero for other questions;
    - ``image`` (B, T): the same over the image tokens the answer is read from: those of the named shape, or of the
      one shape for "What shape is this?"; for "How many shapes are there?" the tokens holding the shapes' centers
      and <|vision_start|>, whose share of the head, 1 / (1 + count), tells the count.

    A question about one shape takes two steps, finding in the question which shape is meant, then reading that
    shape's tokens; from scratch neither lowers the answer loss without the other, and in 30 CPU minutes the
    language model found neither (left/right stayed at chance, color at the level of guessing among the shapes).
    Led there, it learns both in a few hundred steps."""
    import torch

    input_ids, labels = inputs["input_ids"], inputs["labels"]
    image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    words, image = torch.zeros(input_ids.shape), torch.zeros(input_ids.shape)
    query = (labels != -100).int().argmax(-1) - 1
    for b, (s, grid) in enumerate(zip(scenes, inputs["image_grid_thw"].tolist(), strict=True)):
        image_positions = (input_ids[b] == image_pad_id).nonzero()[:, 0]
        if s.question_type == "count":
            led = [int(image_positions[i]) for i in set(center_tokens(s, grid))] + [int(image_positions[0]) - 1]
            image[b, led] = 1.0 / len(led)
            continue
        index = 0 if s.question_type == "shape" else subject(s)
        on_image = torch.from_numpy(covering(s, grid) == index)
        if on_image.any():
            image[b, image_positions[on_image]] = 1.0 / on_image.sum()
        if s.question_type == "shape":
            continue
        named = s.shapes[index]
        named_words = [named.kind] if s.question_type == "color" else [named.color, named.kind]
        word_ids = torch.tensor([tokenizer.convert_tokens_to_ids("Ġ" + w) for w in named_words])  # Ġ: a leading space
        on_words = torch.isin(input_ids[b], word_ids)
        words[b, on_words] = 1.0 / on_words.sum()
    return query, words, image


def attention_loss(weights, query, target):
    """Cross-entropy of head 0's attention (B, heads, T, T) at each row's `query` against `target` (B, T), averaged
    over the rows that have a target."""
    rows = target.sum(-1) > 0
    attended = weights[range(len(query)), 0, query]
    return -(target * (attended + 1e-9).log()).sum(-1)[rows].sum() / max(1, int(rows.sum()))


def _rounded(accuracy: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in accuracy.items()}


class TypeSampler:
    """Question types for a batch, drawn from TRAIN_MIX with its own seeded generator."""

    def __init__(self, seed: int):
        self.rng, self.types = np.random.default_rng(seed), list(TRAIN_MIX)

    def __call__(self, n: int) -> list[str]:
        return [self.types[k] for k in self.rng.choice(len(self.types), size=n, p=list(TRAIN_MIX.values()))]


def train(args: argparse.Namespace) -> Path:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer).train()
    processor = image_processor()
    batcher = Batcher(tokenizer, processor)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters, vocab %d", n_params / 1e6, model.config.text_config.vocab_size)
    val = [scene(i, "val") for i in range(args.val_scenes)]
    heads = aux_heads()
    t0 = time.perf_counter()  # the answers' history and --max-minutes count from here; earlier stages time themselves
    history = learn_shapes(model.model.visual, processor, args)
    history += learn_sides(model.model.visual, heads, processor, val, args)
    if history[-1]["side"] < 0.9:
        logger.warning("the side stage ended at %.2f token accuracy (the recipe reaches 0.94): left/right answers will "
                       "stay near chance; its jump is sensitive to rounding, so keep --threads 1", history[-1]["side"])  # fmt: skip
    history += learn_scenes(model.model.visual, heads, processor, val, args)

    # Stage 4: the whole model on the answers, the auxiliary loss kept on the vision tokens, and two attention heads
    # of the language model led to where the answer is (`attention_targets`).
    vision_tokens, attention = {}, {}
    model.model.visual.register_forward_hook(lambda _m, _i, out: vision_tokens.__setitem__("out", out.pooler_output))
    if args.attend_weight:
        model.config.text_config._attn_implementation = "eager"  # returns the attention weights
        for key, layer in (("words", args.word_layer), ("image", args.image_layer)):
            attention_layer = model.model.language_model.layers[layer].self_attn
            attention_layer.register_forward_hook(lambda _m, _i, out, key=key: attention.__setitem__(key, out[1]))
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps))
    types = TypeSampler(args.seed)
    for step in range(1, args.steps + 1):
        scenes = [scene(step * args.batch_size + j, "train", t) for j, t in enumerate(types(args.batch_size))]
        inputs = batcher(scenes)
        loss = model(**inputs).loss
        aux = aux_loss(heads, vision_tokens["out"], inputs["image_grid_thw"], scenes)
        total = loss + args.aux_weight * aux
        if args.attend_weight:
            query, words, image = attention_targets(scenes, inputs, tokenizer)
            for key, target in (("image", image), ("words", words)):
                total = total + args.attend_weight * attention_loss(attention[key], query, target)
        total.backward()
        _step(params, optimizer, schedule)
        elapsed = time.perf_counter() - t0
        if step % 25 == 0:
            logger.info("step %d/%d loss %.4f aux %.4f lr %.2e %.0f s", step, args.steps, loss.item(), aux.item(), schedule.get_last_lr()[0], elapsed)  # fmt: skip
        if step % args.eval_every == 0 or step == args.steps:
            accuracy = answer_accuracy(model, batcher, val)
            history.append({"stage": "answers", "step": step, "seconds": round(elapsed), "loss": round(loss.item(), 4), **accuracy})  # fmt: skip
            logger.info("answers step %d/%d: val accuracy %s", step, args.steps, _rounded(accuracy))
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
    parser.add_argument("--shape-steps", type=int, default=1000, help="stage 1: the vision tower on single shapes")
    parser.add_argument("--side-steps", type=int, default=600, help="stage 2: the vision tower on left/right scenes")
    parser.add_argument("--scene-steps", type=int, default=1200, help="stage 3: the vision tower on whole scenes")
    parser.add_argument("--steps", type=int, default=3000, help="stage 4: the whole model on the answers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vision-lr", type=float, default=1e-3, help="peak learning rate of stages 1 to 3")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of stage 4")
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the auxiliary loss in stage 4")
    parser.add_argument(
        "--attend-weight",
        type=float,
        default=1.0,
        help="weight of the losses leading two attention heads to where the answer is (0: off)",
    )
    parser.add_argument("--word-layer", type=int, default=0, help="the layer whose head is led to the question's words")  # fmt: skip
    parser.add_argument("--image-layer", type=int, default=2, help="the layer whose head is led to the answer's image tokens")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
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
