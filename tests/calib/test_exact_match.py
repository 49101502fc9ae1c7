"""Exact-match accuracy (the search's default metric): answer normalisation on hand-written cases, and both
evaluators (``calib.evaluate.evaluate`` and ``ModelEvaluator`` with ``accuracy``) on a tiny random model whose
reference answers are its own greedy answers, produced by HuggingFace ``generate`` (not by the code under test).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import PROMPT_TEMPLATE

from calib.data import load_rows
from calib.evaluate import evaluate, exact_match, normalize_answer
from calib.evaluator import CalibrationSet, ModelEvaluator
from exporter.adapters import load_adapter

# -- normalisation ----------------------------------------------------------------------------------------

MATCHES = [
    # case
    ("Red", "red"),
    ("RED CAR", "red car"),
    # punctuation
    ("red.", "red"),
    ("Yes!", "yes"),
    ("yes, it is", "yes it is"),
    ("red-white", "red white"),
    ("(left)", "left"),
    ("U.S.A.", "usa"),
    ("don't", "dont"),
    ("man's hat", "mans hat"),
    ("it\u2019s", "its"),
    # articles
    ("the cat", "cat"),
    ("a dog", "dog"),
    ("an apple", "apple"),
    ("The Cat.", "cat"),
    ("on the left of a table", "on left of table"),
    # whitespace
    ("  red   car ", "red car"),
    ("red\ncar", "red\tcar"),
    # numbers
    ("two", "2"),
    ("Ten", "10"),
    ("zero", "0"),
    ("none", "0"),
    ("Two dogs.", "2 dogs"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
]

MISMATCHES = [
    ("red", "red car"),  # no prefix or substring matching
    ("red car", "car"),
    ("cat", "cats"),
    ("left", "right"),
    ("3.5", "35"),  # a decimal point is kept
    ("3.5", "3 5"),
    ("theater", "ater"),  # articles only as whole words
    ("another", "other"),
    ("A", ""),  # an answer that is only an article keeps it
    ("the", ""),
    ("2", "two dogs"),
    ("yes", "no"),
]


@pytest.mark.parametrize(("prediction", "answer"), MATCHES)
def test_equivalent_answers_match(prediction: str, answer: str) -> None:
    assert exact_match(prediction, answer)
    assert exact_match(answer, prediction)


@pytest.mark.parametrize(("prediction", "answer"), MISMATCHES)
def test_different_answers_do_not_match(prediction: str, answer: str) -> None:
    assert not exact_match(prediction, answer)
    assert not exact_match(answer, prediction)


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("  The Two Dogs! ", "2 dogs"),
        ("An old man's hat.", "old mans hat"),
        ("It costs 1,250.50 dollars", "it costs 1250.50 dollars"),
        ("A", "a"),
        ("The", "the"),
        ("", ""),
        ("?!", ""),
        ("Left;right", "left right"),
    ],
)
def test_normal_form(text: str, normal: str) -> None:
    assert normalize_answer(text) == normal


# -- evaluators on the model's own answers ------------------------------------------------------------------


def _hf_greedy(model, processor, rows, max_new_tokens: int) -> list[str]:
    """Greedy answers from HuggingFace ``generate`` on the raw model, cut at the first EOS."""
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    answers = []
    for row in rows:
        inputs = processor(
            images=row.load_image(), text=PROMPT_TEMPLATE.format(question=row.question), return_tensors="pt"
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        stop = next((i for i, t in enumerate(new) if t in eos), len(new))
        answers.append(tok.decode(new[:stop], skip_special_tokens=True))
    return answers


def _write_rows(path: Path, rows, answers: list[str]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"image": str(row.image_path), "question": row.question, "answer": answer}) + "\n"
            for row, answer in zip(rows, answers, strict=True)
        )
    )
    return path


def _assert_distinct(answers: list[str]) -> None:
    normal = [normalize_answer(a) for a in answers]
    assert all(normal) and len(set(normal)) == len(normal), f"precondition: distinct answers, got {normal}"


def test_evaluate_scores_own_greedy_answers_one_and_wrong_answers_zero(
    tiny_model: Path, demo_data: Path, tmp_path: Path
) -> None:
    # The plain random model never says EOS: its answers are 16-token strings, so evaluate() must
    # reproduce the full greedy continuation under the same budget.
    adapter = load_adapter(tiny_model)
    rows = load_rows(demo_data)
    answers = _hf_greedy(adapter.model, adapter.processor, rows, max_new_tokens=16)
    _assert_distinct(answers)
    right = load_rows(_write_rows(tmp_path / "right.jsonl", rows, answers))
    report = evaluate(adapter, right, max_new_tokens=16)
    assert report.accuracy == 1.0
    assert [r.prediction for r in report.results] == answers

    rotated = answers[1:] + answers[:1]  # every row gets another row's answer
    wrong = load_rows(_write_rows(tmp_path / "wrong.jsonl", rows, rotated))
    report = evaluate(adapter, wrong, max_new_tokens=16)
    assert report.accuracy == 0.0
    assert [r.correct for r in report.results] == [False] * len(rows)


def _single_shape_rows(folder: Path, count: int) -> Path:
    """``count`` rows asking the colour of one square or circle on a background of random colour, 96 px (the
    demo data this test was written with): the random model's first answer tokens differ from row to row,
    which the demo task's gray scenes do not give."""
    import random

    from PIL import Image, ImageDraw

    colors = {"blue": (30, 60, 220), "green": (30, 180, 60), "orange": (250, 140, 20), "purple": (140, 40, 180),
              "red": (220, 30, 30), "yellow": (235, 220, 40)}  # fmt: skip
    rng, size, lines = random.Random(0), 96, []
    for i in range(count):
        color, shape = rng.choice(sorted(colors)), rng.choice(("square", "circle"))
        image = Image.new("RGB", (size, size), tuple(rng.randrange(0, 256) for _ in range(3)))
        box = (rng.randrange(4, size // 3),) * 2 + (rng.randrange(size // 2, size - 4),) * 2
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=colors[color])
        image.save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": f"What color is the {shape}?", "answer": color}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


@pytest.fixture(scope="module")
def stopping(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model, edited so that it says EOS right after the first generated token that is not in any
    prompt (accuracy in the search decodes only ``len(answer) + 2`` tokens, so answers must end), with 8
    data rows.

    Every token outside the prompts gets a large component along a direction ``u`` in its embedding; the
    LM head becomes a biased linear layer whose EOS row is ``10 * u`` with bias ``-50``. After the final
    RMSNorm a hidden state dominated by ``u`` gives EOS a logit near ``10 * 8 - 50 = 30``; any other state
    (RMS-normalised, ``u``-component about 1) gives it a negative one, so the prompt's computation and the
    first answer token are those of the random model.
    """
    adapter = load_adapter(tiny_model)  # a private copy: the session's tiny_adapter stays as it is
    rows = load_rows(_single_shape_rows(tmp_path_factory.mktemp("em_data"), 8))
    model, processor = adapter.model, adapter.processor
    prompts = set()
    for row in rows:
        text = PROMPT_TEMPLATE.format(question=row.question)  # written out, not taken from the adapter
        ids = processor(images=row.load_image(), text=text, return_tensors="pt")
        prompts.update(ids["input_ids"][0].tolist())
    embed = model.model.language_model.embed_tokens.weight
    vocab, hidden = embed.shape
    u = torch.nn.functional.normalize(torch.randn(hidden, generator=torch.Generator().manual_seed(0)), dim=0)
    head = torch.nn.Linear(hidden, vocab, bias=True)
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        embed[[t for t in range(vocab) if t not in prompts]] += 100 * u
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.weight[eos] = 10 * u
        head.bias[eos] = -50.0
    model.lm_head = head.requires_grad_(False)
    answers = _hf_greedy(model, processor, rows, max_new_tokens=12)
    # Precondition: every answer ended with EOS well inside the budget, and they differ from row to row.
    assert all(0 < len(processor.tokenizer(a, add_special_tokens=False).input_ids) < 6 for a in answers), answers
    _assert_distinct(answers)
    return adapter, rows, answers


def test_search_accuracy_scores_own_greedy_answers_one(stopping, tmp_path: Path) -> None:
    adapter, rows, answers = stopping
    # Answers as a person would write them: other case, padding, a full stop; normalised they are the same.
    written = [f"  {a.strip().upper()}. " for a in answers]
    path = _write_rows(tmp_path / "right.jsonl", rows, written)
    calib = CalibrationSet.load(adapter, path, "accuracy")
    assert ModelEvaluator(adapter, calib).evaluate(frozenset()) == 1.0
    report = evaluate(adapter, load_rows(path))
    assert report.accuracy == 1.0 and [r.prediction for r in report.results] == answers


def test_search_accuracy_scores_wrong_answers_zero_and_a_mix_by_its_share(stopping, tmp_path: Path) -> None:
    adapter, rows, answers = stopping
    rotated = answers[1:] + answers[:1]
    calib = CalibrationSet.load(adapter, _write_rows(tmp_path / "wrong.jsonl", rows, rotated), "accuracy")
    assert ModelEvaluator(adapter, calib).evaluate(frozenset()) == 0.0
    longer = [f"{a} dog" for a in answers]  # the right answer plus a word: still wrong
    calib = CalibrationSet.load(adapter, _write_rows(tmp_path / "longer.jsonl", rows, longer), "accuracy")
    assert ModelEvaluator(adapter, calib).evaluate(frozenset()) == 0.0
    mixed = answers[:3] + rotated[3:]  # 3 of 8 right
    calib = CalibrationSet.load(adapter, _write_rows(tmp_path / "mixed.jsonl", rows, mixed), "accuracy")
    assert ModelEvaluator(adapter, calib).evaluate(frozenset()) == pytest.approx(3 / 8)
