"""The image perturbations of Table 3 and the helpers the white-box attacks share with them.

Each perturbation is ``f(image, boxes, rng, stats=None) -> image``: ``image`` HxWxC uint8,
``boxes`` (B, 4) XYXY in absolute pixels, ``rng`` a ``numpy.random.Generator``, ``stats`` a dict
of counts (``patches``, ...) or None. :mod:`studies.robustness` evaluates models on
them; :mod:`studies.attacks` pastes its adversarial patch into the same centre regions.
"""
from typing import Callable, Dict

import numpy as np

NOISE_VARIANCE = 0.01


def _round(v: float) -> int:
    return int(np.floor(v + 0.5))  # half up, unlike Python's round()


def center_patch_region(box, height: int, width: int):
    """Integer pixel region ``(x0, y0, x1, y1)`` (end exclusive) of the centre patch of ``box``:
    half the box's width and height (rounded half up, at least 1 pixel), centred on the box
    centre, clipped to the image. None if it falls outside the image."""
    bx0, by0, bx1, by1 = (float(v) for v in box)
    pw = max(1, _round((bx1 - bx0) / 2))
    ph = max(1, _round((by1 - by0) / 2))
    x0 = _round((bx0 + bx1) / 2 - pw / 2)
    y0 = _round((by0 + by1) / 2 - ph / 2)
    x0c, y0c = max(x0, 0), max(y0, 0)
    x1c, y1c = min(x0 + pw, width), min(y0 + ph, height)
    if x1c <= x0c or y1c <= y0c:
        return None
    return x0c, y0c, x1c, y1c


def check_image_boxes(image, boxes):
    """``(image, boxes)`` as an HxWxC uint8 array and (B, 4) float64 XYXY boxes; ValueError
    naming the image's dtype and shape otherwise."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected an HxWxC uint8 image, got {image.dtype} {image.shape}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return image, boxes


def count(stats, key, n=1):
    """``stats[key] += n`` (from 0) when ``stats`` is a dict; nothing when it is None."""
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


def black_patch(image, boxes, rng=None, stats=None):
    """Zero the centre patch (half width, half height) of every box."""
    image, boxes = check_image_boxes(image, boxes)
    out = image.copy()
    h, w = image.shape[:2]
    for box in boxes:
        r = center_patch_region(box, h, w)
        if r is not None:
            out[r[1]:r[3], r[0]:r[2]] = 0
            count(stats, "patches")
    return out


FLIP_MODES = ("left_right", "top_bottom", "both")


def flip_patch(image, boxes, rng, stats=None):
    """Replace the centre patch of every box by itself flipped left/right, top/bottom or both
    (uniformly at random per box; the mode counts go to ``stats["flip_<mode>"]``)."""
    image, boxes = check_image_boxes(image, boxes)
    out = image.copy()
    h, w = image.shape[:2]
    for box in boxes:
        r = center_patch_region(box, h, w)
        if r is None:
            continue
        mode = FLIP_MODES[int(rng.integers(len(FLIP_MODES)))]
        patch = image[r[1]:r[3], r[0]:r[2]]
        if mode in ("left_right", "both"):
            patch = patch[:, ::-1]
        if mode in ("top_bottom", "both"):
            patch = patch[::-1, :]
        out[r[1]:r[3], r[0]:r[2]] = patch
        count(stats, "patches")
        count(stats, f"flip_{mode}")
    return out


def box_mask(boxes, height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of the pixels touched by any box (box ``[x0, x1]`` covers the columns
    ``floor(x0) .. ceil(x1) - 1``)."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def _window_sums(mask: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """Sum of ``mask`` over every ph x pw window; entry (y, x) is the window at top-left (y, x)."""
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    s[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    return s[ph:, pw:] - s[:-ph, pw:] - s[ph:, :-pw] + s[:-ph, :-pw]


def random_patch(image, boxes, rng, stats=None):
    """Replace the centre patch of every box by content cut from a same-size region outside
    every box of the image, chosen uniformly among all such regions. If no region of that size
    avoids all boxes, the least-overlapping one is used (ties at random) and counted in
    ``stats["random_patch_fallbacks"]``."""
    image, boxes = check_image_boxes(image, boxes)
    out = image.copy()
    h, w = image.shape[:2]
    mask = box_mask(boxes, h, w)
    for box in boxes:
        r = center_patch_region(box, h, w)
        if r is None:
            continue
        pw, ph = r[2] - r[0], r[3] - r[1]
        sums = _window_sums(mask, ph, pw)
        best = sums.min()
        ys, xs = np.nonzero(sums == best)
        k = int(rng.integers(len(ys)))
        sy, sx = int(ys[k]), int(xs[k])
        if best > 0:
            count(stats, "random_patch_fallbacks")
        out[r[1]:r[3], r[0]:r[2]] = image[sy:sy + ph, sx:sx + pw]
        count(stats, "patches")
    return out


def gaussian_noise(image, boxes=None, rng=None, stats=None, variance: float = NOISE_VARIANCE):
    """Add N(0, ``variance``) noise to ``image / 255``, then back to uint8 (round, clip)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if rng is None:
        rng = np.random.default_rng()
    x = image.astype(np.float64) / 255.0 + rng.normal(0.0, np.sqrt(variance), size=image.shape)
    count(stats, "noised_images")
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def original(image, boxes=None, rng=None, stats=None):
    """No perturbation (the image itself)."""
    return np.asarray(image)


#: name -> function, in the paper's column order.
PERTURBATIONS: Dict[str, Callable] = {
    "original": original, "black_patch": black_patch, "random_patch": random_patch,
    "flip_patch": flip_patch, "gaussian_noise": gaussian_noise
}
