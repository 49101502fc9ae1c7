"""Train the demo LLaVA on the demo VQA task, from scratch, on CPU; write the folder `demo-model --preset trained` installs.

    python scripts/train_demo_model.py [--out exporter/demo_models/trained] [--steps 2000] [--seed 0]

The model is LLaVA-1.5's architecture at a small size (HuggingFace's own classes: a CLIP vision tower at 224 px
with 16 px patches, so 196 visual tokens; a two-layer GELU projector; a Llama decoder, hidden 128, 4 layers),
trained end to end on scenes and questions drawn afresh at every step by ``exporter.demo_scenes`` (seeded, so a
run is reproducible on one machine; kernels differ in their last bits between machines). The answer token and
the end-of-sequence token are trained, with two auxiliary losses on the visual tokens (``PatchProbe``); the
prompt is the LLaVA-1.5 conversation the tool uses
(``prune_core.prompt.prompt_text``). The loss of every step and a held-out score every 100 steps (accuracy on 250
questions drawn with another seed, per kind) go to ``training_log.json`` in the output folder; the loss
curve is plotted to docs/images/demo-training.png. 2000 steps take about 27 minutes on 2 cores; ``--minutes``
stops a slower machine early (the learning-rate schedule is set for ``--steps``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from exporter.demo import _CORPUS, random_llava  # noqa: E402
from exporter.demo_scenes import (  # noqa: E402
    COLORS,
    COUNTS,
    GRID,
    KINDS,
    SHAPES,
    SIDES,
    draw_scene,
    make_question,
    object_map,
)
from prune_core.prompt import prompt_text  # noqa: E402

#: Model sizes (fields of exporter.demo.DemoPreset): 224 px / 16 px patches -> 196 visual tokens.
SIZES = dict(image_size=224, patch_size=16, vision_hidden=128, vision_intermediate=256, vision_layers=3,
             vision_heads=4, hidden=128, intermediate=352, layers=4, heads=4, kv_heads=4, vocab=1000)  # fmt: skip


def corpus() -> str:
    """The tokenizer's training text: the demo corpus and the task's questions and answers, so that every
    answer is one token (" red", " triangle", " yes") and first-token metrics see the whole answer."""
    colors = sorted(COLORS)
    lines = [f"What color is the {shape}? ASSISTANT: {color}" for shape in SHAPES for color in colors]
    lines += [f"What shape is the {color} object? ASSISTANT: {shape}" for color in colors for shape in SHAPES]
    lines += [f"How many shapes are there? ASSISTANT: {count}" for count in COUNTS]
    lines += [f"Which side is the {color} {shape} on? ASSISTANT: {side}" for color in colors for shape in SHAPES
              for side in SIDES]  # fmt: skip
    lines += [f"Is there a {color} {shape}? ASSISTANT: {answer}" for color in colors for shape in SHAPES
              for answer in ("yes", "no")]  # fmt: skip
    return _CORPUS + "\n".join(lines) + "\n"


class Batches:
    """Scenes and questions drawn from ``seed``, turned into LLaVA inputs with answer-only labels."""

    def __init__(self, processor, seed: str, kinds: tuple[str, ...] = KINDS) -> None:
        # A string seed: Python's Random hashes it into a state no integer seed (``demo-data --seed N``) reaches.
        self.processor, self.rng, self.kinds = processor, random.Random(seed), kinds
        self.tokenizer = processor.tokenizer
        images = processor.image_processor
        self.size = images.crop_size["height"]
        self.mean, self.std = np.array(images.image_mean, np.float32), np.array(images.image_std, np.float32)
        self.rescale = np.float32(images.rescale_factor)
        self.patch = SIZES["patch_size"]
        self._prompts: dict[str, list[int]] = {}

    def prompt_ids(self, question: str, image) -> list[int]:
        if question not in self._prompts:
            text = prompt_text(self.processor, question)
            self._prompts[question] = self.processor(images=image, text=text)["input_ids"][0]
        return list(self._prompts[question])

    def pixels(self, image) -> np.ndarray:
        """What CLIPImageProcessor makes of an image already at the model's size: rescale and normalise."""
        array = np.asarray(image, np.float32) * self.rescale
        return ((array - self.mean) / self.std).transpose(2, 0, 1)

    def patch_targets(self, scene) -> np.ndarray:
        """Per visual token (row-major over the patch grid): the colour and shape of the object under the
        patch's centre (0: background), the grid column the patch lies in, and the scene's object count - 1."""
        patch = self.patch
        centres = np.asarray(object_map(scene, self.size))[patch // 2 :: patch, patch // 2 :: patch].reshape(-1)
        colors, shapes = sorted(COLORS), list(SHAPES)
        color = np.array([0] + [1 + colors.index(t.color) for t in scene.things])[centres]
        shape = np.array([0] + [1 + shapes.index(t.shape) for t in scene.things])[centres]
        side = self.size // patch
        column = (np.arange(side * side) % side) * GRID // side
        count = np.full(side * side, len(scene.things) - 1)
        return np.stack([color, shape, column, count], axis=1)

    def sample(self) -> tuple[list[int], int, np.ndarray, np.ndarray, str]:
        kind = self.rng.choice(self.kinds)
        scene, question = make_question(kind, self.rng)
        image = draw_scene(scene, self.size)
        prompt = self.prompt_ids(question.question, image)
        answer = self.tokenizer.encode(" " + question.answer, add_special_tokens=False)
        ids = prompt + answer + [self.tokenizer.eos_token_id]
        return ids, len(prompt), self.pixels(image), self.patch_targets(scene), kind

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        rows = [self.sample() for _ in range(size)]
        width = max(len(ids) for ids, *_ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((size, width), pad, dtype=torch.long)
        labels = torch.full((size, width), -100, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        for i, (ids, prompt_len, *_rest) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
            mask[i, : len(ids)] = 1
        pixels = torch.from_numpy(np.stack([r[2] for r in rows]))
        targets = torch.from_numpy(np.stack([r[3] for r in rows])).long()
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels,
                "patch_targets": targets, "kinds": [r[4] for r in rows]}  # fmt: skip


#: Classes of each per-token auxiliary target: colour (6 + background), shape (3 + background), column, count.
AUX_CLASSES = (len(COLORS) + 1, len(SHAPES) + 1, GRID, len(COUNTS))


class PatchProbe(torch.nn.Module):
    """The auxiliary losses on each visual token, as the projector hands it to the decoder.

    Training only the answer tokens through a decoder that starts random gives the vision tower almost no
    signal (on 2 cores the answers stay near their prior for thousands of steps). Two auxiliary losses give it
    one from the first step:

    - a probe: linear read-outs of what lies under each token (colour, shape, grid column, and how many
      objects the scene holds);
    - words: each token, read against the decoder's own input embeddings, names in words what lies under it
      (" red", " circle", " left", and for every token the count, " two"), the way LLaVA's first training
      stage aligns visual tokens with the language model's embedding space. The decoder then finds the
      object a question names by matching words, and copies the answer's word.

    Neither is part of the saved model."""

    def __init__(self, model, tokenizer) -> None:
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for n in AUX_CLASSES)
        self.embedding_of = model.get_input_embeddings  # a function: the embeddings are the model's parameters

        def word_ids(words) -> torch.Tensor:
            return torch.tensor([tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words])

        # index 0 of colour and shape is the background: no word (-100 is cross_entropy's ignore_index)
        self.register_buffer("color_words", torch.cat([torch.tensor([-100]), word_ids(sorted(COLORS))]))
        self.register_buffer("shape_words", torch.cat([torch.tensor([-100]), word_ids(SHAPES)]))
        self.register_buffer("side_words", word_ids(SIDES))
        self.register_buffer("count_words", word_ids(COUNTS))
        self.features: torch.Tensor | None = None
        model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output) -> None:
        self.features = output

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        features = self.features.reshape(targets.shape[0], targets.shape[1], -1)
        probe = sum(torch.nn.functional.cross_entropy(head(features).flatten(0, 1), targets[..., i].flatten())
                    for i, head in enumerate(self.heads)) / len(self.heads)  # fmt: skip
        color, shape, column, count = targets.unbind(-1)
        on_object = color > 0
        side = torch.where(on_object, self.side_words[column], torch.full_like(column, -100))
        words = [self.color_words[color], self.shape_words[shape], side, self.count_words[count]]
        logits = (features @ self.embedding_of().weight.T).flatten(0, 1)
        aligned = sum(torch.nn.functional.cross_entropy(logits, w.flatten(), ignore_index=-100) for w in words) / 4
        return probe + aligned


def held_out_accuracy(model, batch: dict) -> dict[str, float]:
    """Share of rows whose answer token is the model's top logit (teacher forcing, one forward), per question
    kind and over all (``"all"``). Every answer is one token, so this is the answer's exact match."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "patch_targets", "kinds")}
    with torch.no_grad():
        logits = model(**inputs).logits
    first = (batch["labels"] != -100).float().argmax(dim=1)  # position of the answer token
    rows = torch.arange(len(first))
    hits = (logits[rows, first - 1].argmax(dim=-1) == batch["input_ids"][rows, first]).tolist()
    kinds = batch["kinds"]
    scores = {kind: float(np.mean([h for h, k in zip(hits, kinds, strict=True) if k == kind])) for kind in sorted(set(kinds))}
    return {"all": float(np.mean(hits)), **scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "exporter" / "demo_models" / "trained")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "images" / "demo-training.png")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--kinds", default=",".join(KINDS), help="question kinds to train on (comma-separated)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--minutes", type=float, default=45.0, help="stop early past this wall time")
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-token auxiliary loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, processor = random_llava("tiny", seed=args.seed, corpus=corpus(), **SIZES)
    tokenizer = processor.tokenizer
    answers = [*COLORS, *SHAPES, *COUNTS, *SIDES, "yes", "no"]
    split = [a for a in answers if len(tokenizer.encode(" " + a, add_special_tokens=False)) != 1]
    if split:
        sys.exit(f"the tokenizer splits the answers {split}; raise the vocabulary size (SIZES['vocab'])")
    model.config.vision_config._attn_implementation = "sdpa"  # training speed; the saved config says eager
    model.requires_grad_(True).train()
    kinds = tuple(args.kinds.split(","))
    if not set(kinds) <= set(KINDS):
        sys.exit(f"--kinds takes some of {','.join(KINDS)}, got {args.kinds}")
    train = Batches(processor, f"train-{args.seed}", kinds)
    held_out = Batches(processor, f"held-out-{args.seed}", kinds)
    evaluation = held_out.batch(250)
    probe = PatchProbe(model, tokenizer)
    params = [p for p in (*model.parameters(), *probe.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98))  # fmt: skip
    warmup = max(1, args.steps // 20)

    def learning_rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    log: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}, "sizes": SIZES, "loss": [], "aux_loss": [], "held_out": []}
    started = time.perf_counter()
    step = 0
    for step in range(args.steps):
        batch = train.batch(args.batch)
        targets = batch.pop("patch_targets")
        batch.pop("kinds")
        answer_loss = model(**batch).loss
        aux_loss = probe.loss(targets)
        loss = answer_loss + args.aux_weight * aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        log["loss"].append(round(float(answer_loss.detach()), 5))
        log["aux_loss"].append(round(float(aux_loss.detach()), 5))
        elapsed = time.perf_counter() - started
        out_of_time = elapsed > args.minutes * 60
        if step % 100 == 99 or step == args.steps - 1 or out_of_time:
            model.eval()
            accuracy = held_out_accuracy(model, evaluation)
            model.train()
            log["held_out"].append({"step": step + 1, "accuracy": accuracy, "seconds": round(elapsed, 1)})
            print(f"step {step + 1}/{args.steps}  loss {np.mean(log['loss'][-100:]):.4f}  auxiliary "
                  f"{np.mean(log['aux_loss'][-100:]):.4f}  held-out "
                  f"accuracy {accuracy['all']:.3f} ({' '.join(f'{k} {v:.2f}' for k, v in accuracy.items() if k != 'all')})"
                  f"  {elapsed / 60:.1f} min", flush=True)  # fmt: skip
        if out_of_time:
            print(f"stopping at step {step + 1}: the {args.minutes} min budget is spent", flush=True)
            break
    log["steps_run"] = step + 1
    log["minutes"] = round((time.perf_counter() - started) / 60, 2)

    model.eval().requires_grad_(False)
    model.config.vision_config._attn_implementation = "eager"  # as the adapter loads it: [CLS] attention
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), max_shard_size="4MB")  # shards of under 4 MB, as the package ships them
    processor.save_pretrained(str(args.out))
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    plot(log, args.plot)
    print(f"wrote {args.out} and {args.plot}")


def plot(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    loss = np.array(log["loss"])
    window = 50
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid") if len(loss) > window else loss
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(np.arange(1, len(loss) + 1), loss, color="0.8", linewidth=0.6, label="loss (per step)")
    left.plot(np.arange(len(smooth)) + window, smooth, color="C0", label=f"loss ({window}-step mean)")
    left.set_yscale("log")
    left.set_xlabel("step (batch of 32)")
    left.set_ylabel("cross-entropy of the answer tokens")
    right = left.twinx()
    points = log["held_out"]
    right.plot([p["step"] for p in points], [p["accuracy"]["all"] for p in points], "o-", color="C1",
               markersize=3, label="held-out accuracy")  # fmt: skip
    right.set_ylim(0, 1)
    right.set_ylabel("held-out accuracy (exact match)")
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    left.set_title("Demo LLaVA trained from scratch on the demo VQA task (CPU)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
