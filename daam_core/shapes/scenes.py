"""Synthetic scenes with exact object masks: the data of the "shapes" model and its attribution benchmark.

A scene is one or two coloured shapes (circle, square, triangle) on a plain background, with a caption
such as ``"a red circle on the left and a blue square on the right"`` and one boolean mask per object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((235, 235, 235), (150, 150, 150), (30, 30, 30))
# fraction of the bounding box a shape fills: what tells the shapes apart in a generated image
FILL_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclass
class SceneObject:
    color: str
    shape: str
    center: tuple[float, float]  # (y, x) in pixels
    size: float  # side of the bounding box in pixels
    mask: np.ndarray = field(repr=False)  # [H, W] bool

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] uint8
    caption: str
    objects: list[SceneObject]

    def mask_of(self, word: str) -> np.ndarray:
        """Union of the masks of the objects a colour or shape word names."""
        hits = [o.mask for o in self.objects if word in (o.color, o.shape)]
        if not hits:
            raise KeyError(f"{word!r} names no object of this scene ({self.caption!r})")
        return np.logical_or.reduce(hits)


def shape_mask(shape: str, center: tuple[float, float], size: float, hw: tuple[int, int]) -> np.ndarray:
    """Boolean ``[H, W]`` mask of a shape whose bounding box has side ``size``, sampled at pixel centres."""
    h, w = hw
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cy, cx = center
    r = size / 2
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(y - cy) <= r) & (np.abs(x - cx) <= r)
    if shape == "triangle":  # apex up, base at the bottom of the box
        top, bottom = cy - r, cy + r
        t = (y - top) / (2 * r)  # 0 at the apex, 1 at the base
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= r * t)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def side_of(center_x: float, width: int) -> str:
    return "left" if center_x < width / 2 else "right"


def caption_for(objects: list[SceneObject], width: int, positions: bool) -> str:
    parts = []
    for o in objects:
        text = f"a {o.color} {o.shape}"
        if positions:
            text += f" on the {side_of(o.center[1], width)}"
        parts.append(text)
    return " and ".join(parts)


def render(objects: list[SceneObject], background: tuple[int, int, int], hw: tuple[int, int]) -> np.ndarray:
    image = np.empty((*hw, 3), np.uint8)
    image[:] = background
    for o in objects:
        image[o.mask] = COLORS[o.color]
    return image


def random_scene(rng: np.random.Generator, hw: tuple[int, int] = (32, 32), n_objects: int | None = None,
                 positions: bool | None = None, colors: tuple[str, str] | None = None,
                 shapes: tuple[str, str] | None = None) -> Scene:
    """One scene; objects do not overlap and, with two, differ in colour and in shape.

    Two objects sit in different halves (left/right) so that position words are always true.
    """
    h, w = hw
    n = int(n_objects or rng.integers(1, 3))
    cols = list(colors) if colors else list(rng.choice(list(COLORS), size=n, replace=False))
    shps = list(shapes) if shapes else list(rng.choice(SHAPES, size=n, replace=False))
    sides = [int(rng.integers(0, 2))] if n == 1 else list(rng.permutation(2))
    objects = []
    for i in range(n):
        size = float(rng.uniform(0.30, 0.42) * w) if n == 2 else float(rng.uniform(0.30, 0.55) * w)
        r = size / 2
        if n == 1:
            cx = float(rng.uniform(r + 1, w - r - 1))
        else:  # each object wholly inside its half
            lo, hi = (r + 0.5, w / 2 - r - 0.5) if sides[i] == 0 else (w / 2 + r + 0.5, w - r - 0.5)
            cx = float(rng.uniform(lo, max(lo, hi)))
        cy = float(rng.uniform(r + 1, h - r - 1))
        objects.append(SceneObject(str(cols[i]), str(shps[i]), (cy, cx), size, shape_mask(shps[i], (cy, cx), size, hw)))
    background = BACKGROUNDS[int(rng.integers(0, len(BACKGROUNDS)))]
    use_positions = bool(rng.integers(0, 2)) if positions is None else positions
    order = list(rng.permutation(n))
    objects = [objects[i] for i in order]  # caption order independent of left/right
    return Scene(render(objects, background, hw), caption_for(objects, w, use_positions), objects)


def held_out_prompts() -> list[tuple[str, str, str, str]]:
    """(colour, shape, colour, shape) combinations never used for training two-object scenes."""
    return [("red", "triangle", "green", "square"), ("yellow", "circle", "blue", "triangle"),
            ("green", "circle", "yellow", "square"), ("blue", "square", "red", "circle")]


def is_held_out(scene: Scene) -> bool:
    if len(scene.objects) != 2:
        return False
    a, b = scene.objects
    key = (a.color, a.shape, b.color, b.shape)
    swapped = (b.color, b.shape, a.color, a.shape)
    return key in held_out_prompts() or swapped in held_out_prompts()


def detect_objects(image: np.ndarray, min_pixels: int = 12) -> list[tuple[str, str, np.ndarray]]:
    """Find the coloured objects of a generated image: ``(colour, shape, mask)`` per colour found.

    A pixel belongs to the palette colour nearest to it when that is closer than to the background
    colours; the shape is read from how much of its bounding box the colour's largest blob fills.
    """
    img = image.astype(np.float32)
    palette = np.array(list(COLORS.values()) + list(BACKGROUNDS), np.float32)
    dist = ((img[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
    nearest = dist.argmin(-1)
    found = []
    import cv2

    for k, name in enumerate(COLORS):
        mask = (nearest == k) & (dist[:, :, k] < 70.0 ** 2)
        if mask.sum() < min_pixels:
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        blob = labels == best
        if blob.sum() < min_pixels:
            continue
        ys, xs = np.nonzero(blob)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill = blob.sum() / box
        shape = min(FILL_RATIO, key=lambda s: abs(FILL_RATIO[s] - fill))
        found.append((name, shape, blob))
    return found
