"""SSD-style training augmentation (the paper trains RetinaNet "with the same data augmentation
strategies as SSD") as Detectron2 ``Augmentation`` / ``Transform`` classes: photometric
distortion, zoom-out, the min-IoU random crop, a resize to a fixed square and a flip
(:func:`build_ssd_augmentation`). Images are HxWxC arrays in [0, 255]; boxes Nx4 XYXY absolute.
``MinIoURandomCrop`` reads ``AugInput.boxes``, which ``BoxAwareDatasetMapper`` fills.
"""
from typing import Optional, Sequence, Tuple

import numpy as np
from detectron2.data import transforms as T

__all__ = [
    "DEFAULT_PIXEL_MEAN_BGR", "CenterKeepingCropTransform", "ExpandTransform", "MinIoURandomCrop",
    "PhotometricDistort", "PhotometricTransform", "RandomExpand", "build_ssd_augmentation",
]

#: Detectron2's default ``MODEL.PIXEL_MEAN`` (BGR); used as expand fill when no mean is given.
DEFAULT_PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB in [0, 255] -> HSV with H in degrees [0, 360), S in [0, 1], V in [0, 255]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    c = v - rgb.min(-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    safe_c = np.maximum(c, 1e-12)
    h = np.where(v == r, (g - b) / safe_c, np.where(v == g, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c))
    h = np.where(c > 0, (h * 60.0) % 360.0, 0.0)
    return np.stack([h, s, v], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] % 360.0, hsv[..., 1], hsv[..., 2]
    hp = h / 60.0
    c = v * s
    x = c * (1.0 - np.abs(hp % 2.0 - 1.0))
    zero = np.zeros_like(c)
    sector = np.floor(hp).astype(np.int64) % 6
    # (r, g, b) before adding m = v - c, per 60-degree sector.
    table = [(c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x)]
    out = np.zeros(hsv.shape, dtype=hsv.dtype)
    for k, rgb in enumerate(table):
        out = np.where((sector == k)[..., None], np.stack(rgb, -1), out)
    return out + (v - c)[..., None]


class PhotometricTransform(T.Transform):
    """Deterministic SSD photometric distortion; geometry passes through unchanged. Each step is
    skipped when None: ``brightness_delta`` (added), ``contrast_alpha`` (multiplies; before or
    after the HSV steps by ``contrast_first``), ``saturation_alpha`` (multiplies HSV saturation),
    ``hue_delta`` (degrees). Output: the input's dtype, integers rounded and clipped to [0, 255]."""

    def __init__(
        self,
        brightness_delta: Optional[float] = None,
        contrast_alpha: Optional[float] = None,
        contrast_first: bool = True,
        saturation_alpha: Optional[float] = None,
        hue_delta: Optional[float] = None,
        image_format: str = "BGR",
    ):
        super().__init__()
        if image_format not in ("BGR", "RGB"):
            raise ValueError(f"PhotometricTransform supports BGR/RGB images, got {image_format!r}")
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        dtype = img.dtype
        x = img.astype(np.float32)
        if self.brightness_delta is not None:
            x = x + self.brightness_delta
        if self.contrast_first and self.contrast_alpha is not None:
            x = x * self.contrast_alpha
        hsv_step = self.saturation_alpha is not None or self.hue_delta is not None
        if hsv_step and x.ndim == 3 and x.shape[-1] == 3:
            rgb = np.clip(x, 0, 255)
            if self.image_format == "BGR":
                rgb = rgb[..., ::-1]
            hsv = _rgb_to_hsv(rgb)
            if self.saturation_alpha is not None:
                hsv[..., 1] = np.clip(hsv[..., 1] * self.saturation_alpha, 0.0, 1.0)
            if self.hue_delta is not None:
                hsv[..., 0] = (hsv[..., 0] + self.hue_delta) % 360.0
            rgb = _hsv_to_rgb(hsv)
            x = rgb[..., ::-1] if self.image_format == "BGR" else rgb
        if not self.contrast_first and self.contrast_alpha is not None:
            x = x * self.contrast_alpha
        x = np.clip(x, 0, 255)
        if np.issubdtype(dtype, np.integer):
            return np.round(x).astype(dtype)
        return np.ascontiguousarray(x.astype(dtype))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> T.Transform:
        return T.NoOpTransform()  # geometrically the identity


class PhotometricDistort(T.Augmentation):
    """SSD's photometric distortion: brightness delta in ``[-brightness_delta, brightness_delta]``,
    contrast and saturation factors in ``contrast_range`` / ``saturation_range`` and a hue shift in
    ``[-hue_delta, hue_delta]`` degrees, each applied with probability ``prob``; contrast goes
    before or after the HSV steps with equal chance (as in SSD). Pixel values are in [0, 255].
    """

    def __init__(self, brightness_delta=32.0, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta=18.0,
                 prob=0.5, image_format="BGR"):
        super().__init__()
        self._init(locals())

    def get_transform(self, image) -> T.Transform:
        def maybe(low, high):
            return float(np.random.uniform(low, high)) if np.random.rand() < self.prob else None

        return PhotometricTransform(
            brightness_delta=maybe(-self.brightness_delta, self.brightness_delta),
            contrast_alpha=maybe(*self.contrast_range),
            contrast_first=bool(np.random.rand() < 0.5),
            saturation_alpha=maybe(*self.saturation_range),
            hue_delta=maybe(-self.hue_delta, self.hue_delta),
            image_format=self.image_format,
        )


class ExpandTransform(T.Transform):
    """Place an ``orig_h x orig_w`` image at ``(left, top)`` on a ``canvas_h x canvas_w`` canvas
    filled with ``fill`` (per channel; segmentation with ``seg_fill``)."""

    def __init__(self, left: int, top: int, canvas_w: int, canvas_h: int, orig_w: int, orig_h: int, fill=0.0, seg_fill: int = 0):
        super().__init__()
        if not (0 <= left <= canvas_w - orig_w and 0 <= top <= canvas_h - orig_h):
            raise ValueError(f"ExpandTransform: a {orig_w}x{orig_h} image at ({left}, {top}) does not fit a {canvas_w}x{canvas_h} canvas")
        self.left, self.top, self.canvas_w, self.canvas_h = int(left), int(top), int(canvas_w), int(canvas_h)
        self.orig_w, self.orig_h, self.fill, self.seg_fill = int(orig_w), int(orig_h), fill, seg_fill

    def _paste(self, img: np.ndarray, fill) -> np.ndarray:
        h, w = img.shape[:2]
        if (h, w) != (self.orig_h, self.orig_w):
            raise ValueError(f"ExpandTransform expects a {self.orig_w}x{self.orig_h} input, got {w}x{h}")
        canvas = np.empty((self.canvas_h, self.canvas_w) + img.shape[2:], dtype=img.dtype)
        fill = np.asarray(fill, dtype=np.float64)
        if np.issubdtype(img.dtype, np.integer):
            info = np.iinfo(img.dtype)
            fill = np.clip(np.round(fill), info.min, info.max)
        if fill.ndim and img.ndim == 3 and fill.shape[0] != img.shape[2]:
            fill = fill.mean()  # e.g. a 3-channel mean for a 1-channel image
        canvas[...] = fill.astype(img.dtype)
        canvas[self.top : self.top + h, self.left : self.left + w] = img
        return canvas

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return self._paste(img, self.fill)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self._paste(segmentation, self.seg_fill)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords = np.asarray(coords, dtype=np.float64).copy()
        coords[:, 0] += self.left
        coords[:, 1] += self.top
        return coords

    def inverse(self) -> T.Transform:
        return T.CropTransform(self.left, self.top, self.orig_w, self.orig_h, self.canvas_w, self.canvas_h)


class RandomExpand(T.Augmentation):
    """SSD's zoom-out: with probability ``prob``, put the image at a random position of a canvas
    ``r`` times larger (``r`` uniform in ``[1, max_ratio]``) filled with ``fill`` (the pixel mean,
    in the image's channel order)."""

    def __init__(self, max_ratio: float = 4.0, prob: float = 0.5, fill=DEFAULT_PIXEL_MEAN_BGR, seg_fill: int = 0):
        super().__init__()
        if max_ratio < 1:
            raise ValueError(f"RandomExpand: max_ratio={max_ratio} < 1")
        self.max_ratio, self.prob, self.seg_fill = max_ratio, prob, seg_fill
        self.fill = tuple(fill) if isinstance(fill, (list, tuple)) else fill

    def get_transform(self, image) -> T.Transform:
        if self.max_ratio == 1 or np.random.rand() >= self.prob:
            return T.NoOpTransform()
        h, w = image.shape[:2]
        ratio = np.random.uniform(1.0, self.max_ratio)
        cw, ch = int(w * ratio), int(h * ratio)
        left = int(np.random.randint(0, cw - w + 1))
        top = int(np.random.randint(0, ch - h + 1))
        return ExpandTransform(left, top, cw, ch, w, h, fill=self.fill, seg_fill=self.seg_fill)


class CenterKeepingCropTransform(T.CropTransform):
    """A ``CropTransform`` whose ``apply_box`` follows SSD: boxes are clipped to the crop, and one
    whose centre lies outside becomes ``[0, 0, 0, 0]`` (then dropped by ``filter_empty_instances``)."""

    def apply_box(self, box: np.ndarray) -> np.ndarray:
        box = np.asarray(box, dtype=np.float64).reshape(-1, 4)
        cx = (box[:, 0] + box[:, 2]) / 2
        cy = (box[:, 1] + box[:, 3]) / 2
        keep = (cx > self.x0) & (cx < self.x0 + self.w) & (cy > self.y0) & (cy < self.y0 + self.h)
        out = box - np.array([self.x0, self.y0, self.x0, self.y0], dtype=np.float64)
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.h)
        out[~keep] = 0.0
        return out


def _iou_boxes_patches(boxes: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """IoU matrix (num_patches, num_boxes) of XYXY arrays."""
    p, b = patches[:, None, :], boxes[None, :, :]
    ix = np.minimum(p[..., 2], b[..., 2]) - np.maximum(p[..., 0], b[..., 0])
    iy = np.minimum(p[..., 3], b[..., 3]) - np.maximum(p[..., 1], b[..., 1])
    inter = ix.clip(0) * iy.clip(0)
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_p = (patches[:, 2] - patches[:, 0]) * (patches[:, 3] - patches[:, 1])
    return inter / np.maximum(area_p[:, None] + area_b[None, :] - inter, 1e-12)


class MinIoURandomCrop(T.Augmentation):
    """SSD's random crop with a minimum IoU (``get_transform(image, boxes)``), as Caffe SSD's batch
    sampler: the candidates are the whole image and, per ``min_iou``, the first of ``max_trials``
    random patches (sides in ``[min_scale, 1]`` of the image's, ``h / w`` in ``aspect_range``)
    with IoU >= ``min_iou`` with some box and some box centre inside; one is chosen uniformly, as
    a :class:`CenterKeepingCropTransform`. No boxes: any patch qualifies."""

    def __init__(
        self,
        min_ious: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
        min_scale: float = 0.3,
        aspect_range: Tuple[float, float] = (0.5, 2.0),
        max_trials: int = 50,
    ):
        super().__init__()
        self._init(locals())

    def _sample_patch(self, w: int, h: int, boxes: np.ndarray, min_iou: float) -> Optional[Tuple[int, int, int, int]]:
        n = self.max_trials
        pw = np.random.uniform(self.min_scale * w, w, size=n)
        ph = np.random.uniform(self.min_scale * h, h, size=n)
        left = np.random.uniform(0, 1, size=n) * (w - pw)
        top = np.random.uniform(0, 1, size=n) * (h - ph)
        # Integer pixel-aligned patches of at least 1 pixel.
        x0 = np.floor(left).astype(np.int64)
        y0 = np.floor(top).astype(np.int64)
        pw = np.clip(np.round(pw).astype(np.int64), 1, w - x0)
        ph = np.clip(np.round(ph).astype(np.int64), 1, h - y0)
        ok = (ph / pw >= self.aspect_range[0]) & (ph / pw <= self.aspect_range[1])
        if len(boxes):
            patches = np.stack([x0, y0, x0 + pw, y0 + ph], 1).astype(np.float64)
            ok &= (_iou_boxes_patches(boxes, patches) >= min_iou).any(1)
            cx = (boxes[:, 0] + boxes[:, 2]) / 2
            cy = (boxes[:, 1] + boxes[:, 3]) / 2
            inside = (
                (cx[None] > patches[:, 0:1]) & (cx[None] < patches[:, 2:3])
                & (cy[None] > patches[:, 1:2]) & (cy[None] < patches[:, 3:4])
            )
            ok &= inside.any(1)
        idx = np.flatnonzero(ok)
        if len(idx) == 0:
            return None
        i = idx[0]
        return int(x0[i]), int(y0[i]), int(pw[i]), int(ph[i])

    def get_transform(self, image, boxes) -> T.Transform:
        h, w = image.shape[:2]
        if boxes is None:
            boxes = np.zeros((0, 4))
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        candidates = [None]  # None: the whole image
        for min_iou in self.min_ious:
            patch = self._sample_patch(w, h, boxes, min_iou)
            if patch is not None:
                candidates.append(patch)
        choice = candidates[np.random.randint(len(candidates))]
        if choice is None:
            return T.NoOpTransform()
        x0, y0, pw, ph = choice
        return CenterKeepingCropTransform(x0, y0, pw, ph, orig_w=w, orig_h=h)


def build_ssd_augmentation(
    cfg_or_size,
    is_train: bool = True,
    *,
    image_format: Optional[str] = None,
    pixel_mean: Optional[Sequence[float]] = None,
    expand_max_ratio: Optional[float] = None,
):
    """The SSD augmentation list: training ``[PhotometricDistort, RandomExpand, MinIoURandomCrop,
    Resize((s, s)), RandomFlip]``, test ``[Resize((s, s))]``. ``cfg_or_size``: the side ``s``, or a
    ``CfgNode`` (``AP_LOSS_INPUT.FIXED_SIZE`` / ``EXPAND_MAX_RATIO``, ``INPUT.FORMAT``,
    ``MODEL.PIXEL_MEAN``); the keyword arguments override those (defaults "BGR", Detectron2's
    BGR pixel mean, 4.0)."""
    size, fmt, mean, ratio = cfg_or_size, "BGR", None, 4.0
    if not isinstance(cfg_or_size, (int, np.integer)):
        cfg = cfg_or_size
        size, ratio = cfg.AP_LOSS_INPUT.FIXED_SIZE, cfg.AP_LOSS_INPUT.EXPAND_MAX_RATIO
        fmt, mean = cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN
    size, fmt = int(size), image_format or fmt
    ratio = float(expand_max_ratio if expand_max_ratio is not None else ratio)
    mean = pixel_mean if pixel_mean is not None else mean
    mean = tuple(float(v) for v in mean) if mean is not None else DEFAULT_PIXEL_MEAN_BGR[:: -1 if fmt == "RGB" else 1]
    if size <= 0:
        raise ValueError(f"build_ssd_augmentation: fixed size must be positive, got {size}")
    if not is_train:
        return [T.Resize((size, size))]
    return [
        PhotometricDistort(image_format=fmt if fmt in ("BGR", "RGB") else "RGB"),
        RandomExpand(max_ratio=ratio, prob=0.5, fill=mean),
        MinIoURandomCrop(),
        T.Resize((size, size)),
        T.RandomFlip(prob=0.5, horizontal=True, vertical=False),
    ]
