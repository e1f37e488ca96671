"""A procedural 64x64 RGB world of coloured shapes on coloured backgrounds, with text prompts.

Everything is drawn on the fly (numpy + PIL, no files) and is fully determined by a seed: image ``i`` of a batch
drawn with seed ``s`` depends only on ``(s, i)``, so the same seed always gives identical images whatever the batch
size or the machine.

Vocabulary of the world
-----------------------
* 6 shapes: circle, square, triangle, star, ring, cross.
* 6 shape colours with well-separated hues (60 degrees apart): red, yellow, green, cyan, blue, magenta.
  Neighbouring hues such as red/orange or blue/purple are deliberately absent.
* 5 backgrounds: white, black, gray, blue, green. A shape never has the colour of its background, so there are
  6 x (6 x 5 - 2) = 168 plain combinations.
* Jitter: position (+-10% of the image), size, rotation (+-15 degrees) and colour (+-14 per channel for the shape,
  +-8 for the background). Shapes are drawn at 4x (256x256) and box-downsampled, so edges are anti-aliased.
* 3 fill patterns besides ``plain``: ``stripes`` (two-colour stripes), ``dots`` (a base colour with dots of a
  second colour) and ``split`` (left half one colour, right half another), named in prompts "striped", "dotted"
  and "split": "a yellow and red striped star on a blue background".

Subjects
--------
A :class:`Subject` is a named, seeded recipe for one patterned object (shape + pattern + two colours), e.g.
``Subject("striped_star", shape="star", pattern="stripes", colors=("yellow", "red"))``. The base model's training
distribution (:func:`sample_specs` with ``exclude_subjects=True``, the default) never contains the
``(shape, pattern)`` pair of any registered subject: the base model sees stripes on squares but never a striped
star, dots on stars but never a dotted square, and so on. A subject is therefore a new object that is built from
parts the base model can express. Prompts for a subject use a reserved identifier: "a sks star on a blue
background".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from .drawing import CANVAS, IMAGE_SIZE, SUPERSAMPLING, pattern_fill, shape_mask

__all__ = [
    "IMAGE_SIZE",
    "SHAPES",
    "COLORS",
    "BACKGROUNDS",
    "PATTERNS",
    "PATTERN_WORDS",
    "COLOR_RGB",
    "BACKGROUND_RGB",
    "NO_COLOR",
    "Spec",
    "Subject",
    "SUBJECTS",
    "Batch",
    "get_subject",
    "prompt_for",
    "render",
    "render_specs",
    "sample_specs",
    "make_batch",
    "plain_combinations",
    "world_words",
    "to_tensor",
    "iter_batches",
]


SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
COLORS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "magenta")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "blue", "green")
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "split")
#: The adjective used in prompts for each pattern.
PATTERN_WORDS: dict[str, str] = {"plain": "", "stripes": "striped", "dots": "dotted", "split": "split"}
#: Label used for the second colour of a plain (one-colour) object.
NO_COLOR = len(COLORS)

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (240, 205, 25),
    "green": (40, 170, 60),
    "cyan": (25, 195, 205),
    "blue": (40, 80, 225),
    "magenta": (205, 45, 195),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "blue": (35, 60, 160),
    "green": (35, 125, 55),
}

TEMPLATE = "a {color} {shape} on a {background} background"
TEMPLATE_NO_COLOR = "a {shape} on a {background} background"
TEMPLATE_NO_BACKGROUND = "a {color} {shape}"
TEMPLATE_PATTERN = "a {color} and {color2} {pattern} {shape} on a {background} background"
TEMPLATE_PATTERN_NO_BACKGROUND = "a {color} and {color2} {pattern} {shape}"
TEMPLATE_IDENTIFIER = "a {identifier} {shape} on a {background} background"
TEMPLATE_IDENTIFIER_NO_BACKGROUND = "a {identifier} {shape}"
# Two objects side by side: "a red star and a blue ring on a green background" (the first named is on the left).
TEMPLATE_PAIR = "{left} and {right} on a {background} background"
PAIR_WIDTH = 2 * IMAGE_SIZE


# --------------------------------------------------------------------------------------------------------------------
# Specs and subjects
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What to draw: the semantic content of one image (jitter is drawn from the image's own seed)."""

    shape: str
    color: str
    background: str
    pattern: str = "plain"
    color2: Optional[str] = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; known: {COLORS}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {BACKGROUNDS}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; known: {PATTERNS}")
        if self.pattern == "plain":
            if self.color2 is not None:
                raise ValueError("a plain spec has no second colour")
        else:
            if self.color2 not in COLORS or self.color2 == self.color:
                raise ValueError(f"pattern {self.pattern!r} needs a second colour different from {self.color!r}")

    def labels(self) -> dict[str, int]:
        """Class indices for the judge heads.

        ``color``/``color2`` are the two colours of a patterned object; for ``stripes`` and ``split`` (where the two
        colours play symmetric roles) they are ordered by palette index, for ``dots`` ``color`` is the base colour
        and ``color2`` the dots' colour. A plain object has ``color2 == NO_COLOR``.
        """
        c1, c2 = COLORS.index(self.color), (NO_COLOR if self.color2 is None else COLORS.index(self.color2))
        if self.pattern in ("stripes", "split") and c2 < c1:
            c1, c2 = c2, c1
        return {
            "shape": SHAPES.index(self.shape),
            "color": c1,
            "color2": c2,
            "background": BACKGROUNDS.index(self.background),
            "pattern": PATTERNS.index(self.pattern),
        }


@dataclass(frozen=True)
class Subject:
    """A named recipe for a patterned object that the base model never saw.

    ``images(n, seed, backgrounds)`` draws ``n`` jittered images of it; ``prompt(background, identifier)`` gives the
    personalisation prompt ("a sks star on a blue background"); ``class_prompt(background)`` the prior prompt
    ("a star on a blue background"); ``description(background)`` the explicit prompt
    ("a yellow and red striped star on a blue background").
    """

    name: str
    shape: str
    pattern: str
    colors: tuple[str, str]
    identifier: str = "sks"

    def __post_init__(self) -> None:
        Spec(self.shape, self.colors[0], BACKGROUNDS[0], self.pattern, self.colors[1])  # validates
        if self.pattern == "plain":
            raise ValueError("a subject must have a pattern")

    def spec(self, background: str) -> Spec:
        return Spec(self.shape, self.colors[0], background, self.pattern, self.colors[1])

    def prompt(self, background: Optional[str] = None, identifier: Optional[str] = None) -> str:
        ident = identifier or self.identifier
        if background is None:
            return TEMPLATE_IDENTIFIER_NO_BACKGROUND.format(identifier=ident, shape=self.shape)
        return TEMPLATE_IDENTIFIER.format(identifier=ident, shape=self.shape, background=background)

    def class_prompt(self, background: Optional[str] = None) -> str:
        if background is None:
            return f"a {self.shape}"
        return TEMPLATE_NO_COLOR.format(shape=self.shape, background=background)

    def description(self, background: Optional[str] = None) -> str:
        return prompt_for(self.spec(background or BACKGROUNDS[0]), drop_background=background is None)

    def labels(self, background: str) -> dict[str, int]:
        return self.spec(background).labels()

    def images(
        self, n: int, seed: int, backgrounds: Optional[Sequence[str]] = None, identifier: Optional[str] = None
    ) -> "Batch":
        """``n`` images of the subject; backgrounds cycle through ``backgrounds`` (default: all)."""
        bgs = list(backgrounds) if backgrounds is not None else list(BACKGROUNDS)
        specs = [self.spec(bgs[i % len(bgs)]) for i in range(n)]
        batch = render_specs(specs, seed)
        batch.prompts = [self.prompt(s.background, identifier) for s in specs]
        return batch


#: Registered subjects. The base training distribution never contains their (shape, pattern) pairs.
SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("striped_star", shape="star", pattern="stripes", colors=("yellow", "red")),
        Subject("dotted_square", shape="square", pattern="dots", colors=("blue", "yellow")),
        Subject("split_circle", shape="circle", pattern="split", colors=("green", "magenta")),
    )
}


def get_subject(name: str) -> Subject:
    try:
        return SUBJECTS[name]
    except KeyError:
        raise KeyError(f"unknown subject {name!r}; known: {sorted(SUBJECTS)}") from None


def _subject_pairs() -> set[tuple[str, str]]:
    return {(s.shape, s.pattern) for s in SUBJECTS.values()}


def prompt_for(
    spec: Spec, *, drop_color: bool = False, drop_background: bool = False, identifier: Optional[str] = None
) -> str:
    """The prompt describing ``spec``.

    ``drop_color`` / ``drop_background`` leave that attribute out ("a star on a blue background", "a red star");
    ``identifier`` replaces the colour/pattern words by an identifier token ("a sks star on a blue background").
    """
    if identifier is not None:
        tpl = TEMPLATE_IDENTIFIER_NO_BACKGROUND if drop_background else TEMPLATE_IDENTIFIER
        return tpl.format(identifier=identifier, shape=spec.shape, background=spec.background)
    if drop_color:
        if drop_background:
            return f"a {spec.shape}"
        return TEMPLATE_NO_COLOR.format(shape=spec.shape, background=spec.background)
    if spec.pattern == "plain":
        tpl = TEMPLATE_NO_BACKGROUND if drop_background else TEMPLATE
        return tpl.format(color=spec.color, shape=spec.shape, background=spec.background)
    tpl = TEMPLATE_PATTERN_NO_BACKGROUND if drop_background else TEMPLATE_PATTERN
    return tpl.format(
        color=spec.color,
        color2=spec.color2,
        pattern=PATTERN_WORDS[spec.pattern],
        shape=spec.shape,
        background=spec.background,
    )


def world_words() -> list[str]:
    """Every word a world prompt can contain (templates, shapes, colours, backgrounds, pattern adjectives)."""
    words = ["a", "on", "and", "background", "with", "of", "the"]
    words += list(SHAPES) + list(COLORS) + list(BACKGROUNDS)
    words += [w for w in PATTERN_WORDS.values() if w] + [p for p in PATTERNS if p != "plain"] + ["plain"]
    out: list[str] = []
    for w in words:
        if w not in out:
            out.append(w)
    return out


def plain_combinations(backgrounds: Optional[Sequence[str]] = None) -> list[Spec]:
    """All plain (shape, colour, background) combinations of the world (shape colour != background colour)."""
    bgs = BACKGROUNDS if backgrounds is None else tuple(backgrounds)
    return [Spec(s, c, b) for s in SHAPES for c in COLORS for b in bgs if c != b]


# --------------------------------------------------------------------------------------------------------------------
# Sampling specs
# --------------------------------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _sample_one(
    rng: np.random.Generator,
    pattern_fraction: float,
    exclude_pairs: set[tuple[str, str]],
    backgrounds: Sequence[str],
    shapes: Sequence[str],
) -> Spec:
    bg = _choice(rng, backgrounds)
    if rng.random() < pattern_fraction:
        while True:
            shape = _choice(rng, shapes)
            pattern = _choice(rng, PATTERNS[1:])
            if (shape, pattern) not in exclude_pairs:
                break
        allowed = [c for c in COLORS if c != bg]
        i, j = rng.choice(len(allowed), size=2, replace=False)
        return Spec(shape, allowed[int(i)], bg, pattern, allowed[int(j)])
    shape = _choice(rng, shapes)
    color = _choice(rng, [c for c in COLORS if c != bg])
    return Spec(shape, color, bg)


def sample_specs(
    n: int,
    seed: int,
    *,
    pattern_fraction: float = 0.0,
    exclude_subjects: bool = True,
    backgrounds: Optional[Sequence[str]] = None,
    shapes: Optional[Sequence[str]] = None,
) -> list[Spec]:
    """``n`` random specs: plain objects, plus a fraction ``pattern_fraction`` of patterned ones.

    With ``exclude_subjects`` (default) no patterned spec shares the (shape, pattern) pair of a registered subject:
    this is the base model's training distribution.
    """
    exclude = _subject_pairs() if exclude_subjects else set()
    bgs = tuple(backgrounds) if backgrounds is not None else BACKGROUNDS
    shp = tuple(shapes) if shapes is not None else SHAPES
    rng = np.random.default_rng([int(seed), 0x5EC5])
    return [_sample_one(rng, pattern_fraction, exclude, bgs, shp) for _ in range(n)]


# --------------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------------

def _jitter_rgb(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float64) + rng.uniform(-amount, amount, 3), 0, 255).round().astype(np.uint8)


def render(spec: Spec, rng: np.random.Generator, background_rgb: Optional[np.ndarray] = None) -> np.ndarray:
    """Draw one 64x64 RGB uint8 image of ``spec`` with jitter drawn from ``rng`` (``background_rgb`` overrides the
    jittered background colour, for the halves of a two-object scene)."""
    S = SUPERSAMPLING
    r = rng.uniform(0.24, 0.33) * IMAGE_SIZE * S
    cx = (0.5 + rng.uniform(-0.10, 0.10)) * IMAGE_SIZE * S
    cy = (0.5 + rng.uniform(-0.10, 0.10)) * IMAGE_SIZE * S
    angle = math.radians(rng.uniform(-15.0, 15.0))
    bg = _jitter_rgb(rng, BACKGROUND_RGB[spec.background], 8)  # drawn even when overridden: same rng stream after it
    bg = bg if background_rgb is None else background_rgb
    c1 = _jitter_rgb(rng, COLOR_RGB[spec.color], 14)
    c2 = _jitter_rgb(rng, COLOR_RGB[spec.color2], 14) if spec.color2 else c1
    phase = rng.uniform(0.0, 1.0)
    img = Image.new("RGB", (CANVAS, CANVAS), tuple(int(x) for x in bg))
    mask = shape_mask(spec.shape, cx, cy, r, angle)
    if spec.pattern == "plain":
        img.paste(tuple(int(x) for x in c1), (0, 0), mask)
    else:
        img.paste(pattern_fill(spec.pattern, c1, c2, cx, cy, r, angle, phase), (0, 0), mask)
    return np.asarray(img.reduce(S))


# --------------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Images (uint8 numpy ``(n, 64, 64, 3)``, ``(n, 64, 128, 3)`` for pairs), labels (dict of int64 numpy arrays),
    prompts and specs."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    prompts: list[str]
    specs: list[Spec] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def tensors(self, device=None):
        """``(images, labels)`` as torch tensors: float images in [-1, 1] ``(n, 3, 64, 64)``, int64 labels."""
        import torch

        images = to_tensor(self.images, device)
        labels = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in self.labels.items()}
        return images, labels


def to_tensor(images: np.ndarray, device=None):
    """uint8 ``(n, H, W, 3)`` -> float tensor in [-1, 1] ``(n, 3, H, W)``."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _labels(specs: Sequence[Spec]) -> dict[str, np.ndarray]:
    keys = ("shape", "color", "color2", "background", "pattern")
    out = {k: np.empty(len(specs), dtype=np.int64) for k in keys}
    for i, s in enumerate(specs):
        for k, v in s.labels().items():
            out[k][i] = v
    return out


def render_specs(specs: Sequence[Spec], seed: int, offset: int = 0) -> Batch:
    """Draw ``specs``; image ``i`` uses the jitter stream ``(seed, offset + i)``. Prompts are the full descriptions."""
    images = np.empty((len(specs), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, spec in enumerate(specs):
        images[i] = render(spec, np.random.default_rng([int(seed), 0x1A6E, offset + i]))
    return Batch(images, _labels(specs), [prompt_for(s) for s in specs], list(specs))


def make_batch(
    n: int,
    seed: int,
    *,
    pattern_fraction: float = 0.0,
    exclude_subjects: bool = True,
    backgrounds: Optional[Sequence[str]] = None,
    shapes: Optional[Sequence[str]] = None,
    drop_color: float = 0.0,
    drop_background: float = 0.0,
) -> Batch:
    """``n`` random images with labels and prompts, fully determined by ``seed``.

    ``pattern_fraction``/``exclude_subjects``/``backgrounds``/``shapes``: see :func:`sample_specs`.
    ``drop_color``/``drop_background``: probabilities of leaving that attribute out of a prompt.
    """
    specs = sample_specs(
        n,
        seed,
        pattern_fraction=pattern_fraction,
        exclude_subjects=exclude_subjects,
        backgrounds=backgrounds,
        shapes=shapes,
    )
    batch = render_specs(specs, seed)
    if drop_color > 0 or drop_background > 0:
        rng = np.random.default_rng([int(seed), 0xD409])
        dc = rng.random(n) < drop_color
        db = rng.random(n) < drop_background
        batch.prompts = [prompt_for(s, drop_color=bool(a), drop_background=bool(b)) for s, a, b in zip(specs, dc, db)]
    return batch


def iter_batches(batch_size: int, seed: int, **kwargs) -> Iterable[Batch]:
    """An endless stream of batches; batch ``k`` is ``make_batch(batch_size, seed * 1_000_003 + k, **kwargs)``."""
    k = 0
    while True:
        yield make_batch(batch_size, int(seed) * 1_000_003 + k, **kwargs)
        k += 1


def with_background(spec: Spec, background: str) -> Spec:
    return replace(spec, background=background)


# --------------------------------------------------------------------------------------------------------------------
# Two-object scenes (multi-subject personalisation)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSpec:
    """Two objects side by side on one background, drawn as a 64x128 image: ``left`` fills the left 64x64 half,
    ``right`` the right half, each exactly as a single-object image would draw it (so the judge reads each half)."""

    left: Spec
    right: Spec

    def __post_init__(self) -> None:
        if self.left.background != self.right.background:
            raise ValueError(f"both objects of a pair share one background, got {self.left.background!r} and "
                             f"{self.right.background!r}")

    @property
    def background(self) -> str:
        return self.left.background


def pair_prompt(pair: PairSpec, identifiers: tuple[Optional[str], Optional[str]] = (None, None)) -> str:
    """``"a red star and a blue ring on a green background"``; with identifiers ``"a sks circle and a zwx square on
    a green background"``. At most one patterned object fits the text encoder's 16 positions."""
    left = prompt_for(pair.left, drop_background=True, identifier=identifiers[0])
    right = prompt_for(pair.right, drop_background=True, identifier=identifiers[1])
    return TEMPLATE_PAIR.format(left=left, right=right, background=pair.background)


def sample_pair_specs(
    n: int, seed: int, *, pattern_fraction: float = 0.0, backgrounds: Optional[Sequence[str]] = None
) -> list[PairSpec]:
    """``n`` random pairs from the base distribution (no subject's (shape, pattern)); ``pattern_fraction`` of the
    left objects are patterned, and the right object is then plain (two patterned objects would not fit a prompt)."""
    exclude = _subject_pairs()
    bgs = tuple(backgrounds) if backgrounds is not None else BACKGROUNDS
    rng = np.random.default_rng([int(seed), 0x9A12])
    pairs = []
    for _ in range(n):
        left = _sample_one(rng, pattern_fraction, exclude, bgs, SHAPES)
        right_fraction = pattern_fraction if left.pattern == "plain" else 0.0
        right = _sample_one(rng, right_fraction, exclude, (left.background,), SHAPES)
        if left.pattern == "plain" and right.pattern != "plain" and rng.random() < 0.5:
            left, right = right, left  # patterned objects on either side
        pairs.append(PairSpec(left, right))
    return pairs


def render_pairs(pairs: Sequence[PairSpec], seed: int, offset: int = 0,
                 identifiers: tuple[Optional[str], Optional[str]] = (None, None)) -> Batch:
    """Draw ``pairs`` as 64x128 images; pair ``i`` uses the jitter stream ``(seed, offset + i)``. Labels are per half
    (``left_shape``, ``right_color``, ...); prompts from :func:`pair_prompt`."""
    images = np.empty((len(pairs), IMAGE_SIZE, PAIR_WIDTH, 3), dtype=np.uint8)
    for i, pair in enumerate(pairs):
        rng = np.random.default_rng([int(seed), 0x9A13, offset + i])
        background = _jitter_rgb(rng, BACKGROUND_RGB[pair.background], 8)
        images[i, :, :IMAGE_SIZE] = render(pair.left, rng, background)
        images[i, :, IMAGE_SIZE:] = render(pair.right, rng, background)
    labels = {f"{side}_{key}": value for side in ("left", "right")
              for key, value in _labels([getattr(p, side) for p in pairs]).items()}
    return Batch(images, labels, [pair_prompt(p, identifiers) for p in pairs], list(pairs))


def make_pair_batch(n: int, seed: int, *, pattern_fraction: float = 0.0,
                    backgrounds: Optional[Sequence[str]] = None) -> Batch:
    """``n`` random two-object scenes (64x128) with per-half labels and prompts, fully determined by ``seed``."""
    return render_pairs(sample_pair_specs(n, seed, pattern_fraction=pattern_fraction, backgrounds=backgrounds), seed)
