"""A small synthetic world for the demo: coloured shapes on plain backgrounds, drawn in code.

The demo's base model is pre-trained on circles and squares ("a red circle", "a blue square"), so
that its renders are recognisable; its LoRA then teaches it a shape it has never drawn, a cross,
under the made-up trigger word "zqx" ("a red zqx"). Every image is drawn 4x larger and scaled down,
so edges are smooth, and depends only on its seed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (232, 232, 232), "black": (28, 28, 28)}
BASE_SHAPES = ("circle", "square")  # what the base model learns to draw
CONCEPT_SHAPE = "cross"  # what the LoRA teaches, under the trigger word
TRIGGER = "zqx"
SHAPES = (*BASE_SHAPES, "cross", "triangle", "bar", "diamond")  # everything draw_shape knows (the VAE sees them all)

_SUPERSAMPLE = 4


def draw_shape(
    shape: str, colour: str, background: str, rng: np.random.Generator, *, size: int = 32, jitter: float = 0.12,
    radius: tuple[float, float] = (0.22, 0.32),
) -> Image.Image:
    """One `size` x `size` RGB image: the shape filled with the colour on the background. Its half-width is a random
    fraction `radius` of the side, its centre a random offset of up to `jitter` sides from the middle."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if colour not in COLOURS or background not in BACKGROUNDS:
        raise ValueError(f"unknown colour {colour!r} or background {background!r}; colours: {', '.join(COLOURS)}, backgrounds: {', '.join(BACKGROUNDS)}")
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    r = rng.uniform(*radius) * big
    cx, cy = big / 2 + rng.uniform(-jitter, jitter, size=2) * big
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        side = 0.9 * r  # about the circle's area
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    elif shape == "cross":
        arm, half = 1.15 * r, 0.38 * r
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - 1.1 * r), (cx + 1.15 * r, cy + 0.9 * r), (cx - 1.15 * r, cy + 0.9 * r)], fill=fill)
    elif shape == "bar":
        draw.rectangle((cx - 1.4 * r, cy - 0.4 * r, cx + 1.4 * r, cy + 0.4 * r), fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - 1.2 * r), (cx + 1.2 * r, cy), (cx, cy + 1.2 * r), (cx - 1.2 * r, cy)], fill=fill)
    return image.resize((size, size), Image.LANCZOS)


def caption(colour: str, shape: str) -> str:
    """'a red circle'; the concept shape is named by the trigger word: 'a red zqx'."""
    return f"a {colour} {TRIGGER if shape == CONCEPT_SHAPE else shape}"


def shape_batch(
    count: int, seed: int, *, size: int = 32, shapes: tuple[str, ...] = BASE_SHAPES, colours: tuple[str, ...] = tuple(COLOURS),
) -> tuple[torch.Tensor, list[str]]:
    """`count` random images as one (count, 3, size, size) tensor in [-1, 1] with their captions: a shape of `shapes`
    in a colour of `colours` on a random background (backgrounds are not named in the captions)."""
    rng = np.random.default_rng(seed)
    pixels, captions = [], []
    for _ in range(count):
        shape, colour = shapes[rng.integers(len(shapes))], colours[rng.integers(len(colours))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        pixels.append(np.asarray(draw_shape(shape, colour, background, rng, size=size), dtype=np.float32) / 127.5 - 1.0)
        captions.append(caption(colour, shape))
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous(), captions


def write_concept_dataset(
    folder: str | os.PathLike, count: int, seed: int, *, size: int = 32, colours: tuple[str, ...] = tuple(COLOURS),
) -> Path:
    """`count` images of the concept (a cross, "a <colour> zqx") as PNGs with same-name .txt captions (the kohya
    layout the training loop and the monitor's references= and validation= read). Colours and backgrounds take turns,
    so that neither is what the images have in common; sizes and positions are random."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    backgrounds = list(BACKGROUNDS)
    for index in range(count):
        colour, background = colours[index % len(colours)], backgrounds[index % len(backgrounds)]
        draw_shape(CONCEPT_SHAPE, colour, background, rng, size=size).save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(caption(colour, CONCEPT_SHAPE), encoding="utf-8")
    return folder
