"""Small charts drawn with OpenCV (no plotting library needed): a labelled scatter and grouped bars.

Each returns an RGB float image ``[H, W, 3]`` in [0, 1] for :func:`daam_core.engine.render.save_png`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FONT_SCALE = 0.42
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _canvas(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), 255, np.uint8)


def _text(img, text, org, scale=FONT_SCALE, color=(0, 0, 0), center=False):
    import cv2

    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = org
    if center:
        x -= tw // 2
    cv2.putText(img, text, (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def _axes(img, box, xlim, ylim, xlabel, ylabel, title, ticks=5):
    import cv2

    x0, y0, x1, y1 = box
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    for i in range(ticks + 1):
        fx = xlim[0] + (xlim[1] - xlim[0]) * i / ticks
        fy = ylim[0] + (ylim[1] - ylim[0]) * i / ticks
        px = int(x0 + (x1 - x0) * i / ticks)
        py = int(y1 - (y1 - y0) * i / ticks)
        cv2.line(img, (px, y1), (px, y1 + 4), (0, 0, 0), 1)
        cv2.line(img, (x0 - 4, py), (x0, py), (0, 0, 0), 1)
        cv2.line(img, (px, y0), (px, y1), (225, 225, 225), 1)
        cv2.line(img, (x0, py), (x1, py), (225, 225, 225), 1)
        _text(img, f"{fx:.2f}", (px, y1 + 18), center=True)
        _text(img, f"{fy:.2f}", (x0 - 40, py + 4))
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    _text(img, xlabel, ((x0 + x1) // 2, y1 + 38), center=True)
    _text(img, ylabel, (8, y0 - 10))
    _text(img, title, ((x0 + x1) // 2, 20), scale=0.5, center=True)


def scatter(points: Sequence[tuple[float, float, str]], xlabel: str, ylabel: str, title: str,
            lim: tuple[float, float] = (0.0, 1.0), size: int = 560, diagonal: bool = True) -> np.ndarray:
    """``(x, y, label)`` points on square axes over ``lim``, with the line y = x."""
    import cv2

    img = _canvas(size, size)
    box = (60, 40, size - 20, size - 60)
    _axes(img, box, lim, lim, xlabel, ylabel, title)
    x0, y0, x1, y1 = box

    def px(x, y):
        fx = (x - lim[0]) / (lim[1] - lim[0])
        fy = (y - lim[0]) / (lim[1] - lim[0])
        return int(x0 + fx * (x1 - x0)), int(y1 - fy * (y1 - y0))

    if diagonal:
        cv2.line(img, px(lim[0], lim[0]), px(lim[1], lim[1]), (150, 150, 150), 1, cv2.LINE_AA)
    for i, (x, y, name) in enumerate(points):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        c = PALETTE[i % len(PALETTE)]
        p = px(x, y)
        cv2.circle(img, p, 5, c, -1, cv2.LINE_AA)
        tw = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE, 1)[0][0]
        x = p[0] + 7 if p[0] + 7 + tw < size - 2 else p[0] - 7 - tw  # keep labels inside the picture
        _text(img, name, (x, p[1] - 5), color=c)
    return img.astype(np.float32) / 255.0


def bars(groups: Sequence[str], series: dict[str, Sequence[float]], title: str, ylabel: str = "",
         ylim: tuple[float, float] = (0.0, 1.0), width: int = 720, height: int = 420) -> np.ndarray:
    """Grouped bars: one group per entry of ``groups``, one bar per series, with a legend and values."""
    import cv2

    img = _canvas(height, width)
    box = (60, 40, width - 20, height - 90)
    x0, y0, x1, y1 = box
    _axes(img, box, (0, 1), ylim, "", ylabel, title, ticks=5)
    img[y1 + 6: y1 + 24, x0 - 20: x1 + 10] = 255  # no x ticks: the group names go there
    n, k = len(groups), len(series)
    slot = (x1 - x0) / max(n, 1)
    bar = slot * 0.8 / max(k, 1)
    for j, (name, values) in enumerate(series.items()):
        c = PALETTE[j % len(PALETTE)]
        for i, v in enumerate(values):
            if not np.isfinite(v):
                continue
            left = int(x0 + i * slot + slot * 0.1 + j * bar)
            top = int(y1 - (min(max(v, ylim[0]), ylim[1]) - ylim[0]) / (ylim[1] - ylim[0]) * (y1 - y0))
            cv2.rectangle(img, (left, top), (int(left + bar) - 1, y1), c, -1)
            _text(img, f"{v:.2f}", (left + bar / 2, top - 3), scale=0.33, center=True)
        cv2.rectangle(img, (x0 + 10 + 150 * j, height - 22), (x0 + 22 + 150 * j, height - 10), c, -1)
        _text(img, name, (x0 + 28 + 150 * j, height - 11))
    for i, g in enumerate(groups):
        _text(img, g, (x0 + (i + 0.5) * slot, y1 + 18), scale=0.36, center=True)
    return img.astype(np.float32) / 255.0


def table_image(rows: Sequence[Sequence[str]], header: Sequence[str], title: str = "",
                scale: float = 0.45) -> np.ndarray:
    """A text table drawn as a picture: ``header`` then ``rows`` (strings), columns sized to their text."""
    import cv2

    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(cv2.getTextSize(r[j], cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] for r in cells) + 16
              for j in range(len(header))]
    line = int(30 * scale / 0.45)
    top = line if title else 0
    w = max(sum(widths) + 8, 200)
    h = top + line * len(cells) + 8
    img = _canvas(h, w)
    if title:
        _text(img, title, (8, line - 9), scale=scale)
    for i, r in enumerate(cells):
        y = top + line * (i + 1)
        if i == 0:
            img[y - line + 4: y + 4, :] = (225, 232, 242)
        elif i % 2 == 0:
            img[y - line + 4: y + 4, :] = (246, 246, 246)
        x = 8
        for j, text in enumerate(r):
            _text(img, text, (x, y - 6), scale=scale)
            x += widths[j]
    return img.astype(np.float32) / 255.0
