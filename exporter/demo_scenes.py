"""The demo VQA task: scenes of coloured shapes on a 3 x 3 grid, and one-word questions only the image answers.

A scene holds objects on a 3 x 3 grid over a gray background, each in its own cell, each a circle, square or
triangle in one of six colours, drawn with a random size and offset inside its cell. Four kinds of question,
drawn in turn so that each kind is a quarter of a data set, with answers balanced within a kind (uniform over
the scenes, as drawn):

========  ==============================================  =================================  =======
kind      question                                         answer                             chance
========  ==============================================  =================================  =======
color     What color is the {shape}?                       one of 6 colours                   1/6
shape     What shape is the {color} object?                circle / square / triangle         1/3
count     How many shapes are there?                       one .. four                        1/4
side      Which side is the {color} {shape} on?            left / middle / right (its column)  1/3
========  ==============================================  =================================  =======

Count questions are asked of scenes of 1 to 4 objects, the others of scenes of one object (a question names
no object the image lacks; the name does not tell the answer). A model that does not look at the image can do
no better than chance on any kind (0.27 over all four); the trained demo model answers from the image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

__all__ = ["CHANCE", "COLORS", "KINDS", "SHAPES", "Question", "Scene", "draw_scene", "make_question", "object_map", "random_scene"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 190),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "middle", "right")
COUNTS = ("one", "two", "three", "four")
KINDS = ("color", "shape", "count", "side")
#: The accuracy of answering each kind without the image (uniform over its balanced answers).
CHANCE = {"color": 1 / 6, "shape": 1 / 3, "count": 1 / 4, "side": 1 / 3}
GRID = 3


@dataclass(frozen=True)
class Thing:
    """One object: its shape, colour and grid cell (row, column)."""

    shape: str
    color: str
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    """Objects in distinct cells, a gray background level and the drawing jitter (per object)."""

    things: tuple[Thing, ...]
    background: int
    jitter: tuple[tuple[float, float, float], ...]  # per object: size fraction, x offset, y offset in [0, 1]


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    answer: str


def random_scene(rng: random.Random, count: int | None = None) -> Scene:
    """A scene of ``count`` objects (1 to 4, random when None) in distinct cells."""
    count = count if count is not None else rng.randint(1, 4)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], count)
    things = tuple(Thing(rng.choice(SHAPES), rng.choice(sorted(COLORS)), r, c) for r, c in cells)
    jitter = tuple((rng.uniform(0.55, 0.85), rng.random(), rng.random()) for _ in things)
    return Scene(things, rng.randint(70, 190), jitter)


def draw_scene(scene: Scene, size: int) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` pixels."""
    return _draw(scene, size, "RGB", (scene.background,) * 3, [COLORS[t.color] for t in scene.things])


def object_map(scene: Scene, size: int) -> Image.Image:
    """A ``size`` x ``size`` map (mode "L") of which object covers each pixel of :func:`draw_scene`'s image:
    0 for the background, ``i + 1`` for ``scene.things[i]``."""
    return _draw(scene, size, "L", 0, list(range(1, len(scene.things) + 1)))


def _draw(scene: Scene, size: int, mode: str, background, fills: list) -> Image.Image:
    image = Image.new(mode, (size, size), background)
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for thing, (fraction, dx, dy), fill in zip(scene.things, scene.jitter, fills, strict=True):
        side = fraction * cell
        x0 = thing.col * cell + dx * (cell - side)
        y0 = thing.row * cell + dy * (cell - side)
        box = (x0, y0, x0 + side, y0 + side)
        if thing.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif thing.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image


def make_question(kind: str, rng: random.Random) -> tuple[Scene, Question]:
    """A scene and a question of ``kind`` about it, with the answer drawn uniformly from the kind's answers.

    ``count`` questions are about scenes of 1 to 4 objects; the others about scenes of one object."""
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "count":
        answer = rng.choice(COUNTS)
        return random_scene(rng, COUNTS.index(answer) + 1), Question(kind, "How many shapes are there?", answer)
    scene = random_scene(rng, 1)
    thing = scene.things[0]
    if kind == "color":
        return scene, Question(kind, f"What color is the {thing.shape}?", thing.color)
    if kind == "shape":
        return scene, Question(kind, f"What shape is the {thing.color} object?", thing.shape)
    return scene, Question(kind, f"Which side is the {thing.color} {thing.shape} on?", SIDES[thing.col])
