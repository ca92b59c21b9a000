"""Image edits of the copy-detection kind, in numpy + OpenCV (RGB uint8 arrays, HxWx3).

The same edit families serve twice: the synthetic generator uses them to make *queries* (strong
edits of reference images), and training uses them for the *hard* view of each image, as the seed
uses AugLy's overlays, text, emoji, encoding and pixel edits. Every function takes a
``numpy.random.Generator``; the training dataset draws it from the per-sample seed the engine
sets, so augmentations are reproducible and independent of worker count.
"""

from __future__ import annotations

import string
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

Image = np.ndarray
Rng = np.random.Generator

_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
          cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX, cv2.FONT_HERSHEY_PLAIN)
_CHARS = string.ascii_letters + string.digits + "!?#&@"


def read_rgb(path) -> Image:
    """An image file as RGB uint8 (cv2 reads BGR); raises OSError naming the file if unreadable."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise OSError(f"cannot decode image {path} (missing, empty or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_jpeg(path, image: Image, quality: int = 90) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError(f"cannot encode {path}")
    buf.tofile(str(path))


def resize(image: Image, size: int | Tuple[int, int]) -> Image:
    """Resize to ``size`` (square) or ``(width, height)``; area interpolation when shrinking."""
    w, h = (size, size) if isinstance(size, int) else size
    shrink = w * h < image.shape[0] * image.shape[1]
    return cv2.resize(image, (int(w), int(h)), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


# -- geometry ------------------------------------------------------------------------------------
def random_resized_crop(image: Image, rng: Rng, out_size: int | Tuple[int, int], scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Image:
    """torchvision's RandomResizedCrop: a crop of ``scale`` of the area and ``ratio`` aspect, resized."""
    h, w = image.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return resize(image[y:y + ch, x:x + cw], out_size)
    side = min(h, w)  # fallback: the central square
    y, x = (h - side) // 2, (w - side) // 2
    return resize(image[y:y + side, x:x + side], out_size)


def hflip(image: Image, rng: Rng) -> Image:
    return image[:, ::-1].copy()


def vflip(image: Image, rng: Rng) -> Image:
    return image[::-1].copy()


def rotate(image: Image, rng: Rng) -> Image:
    """A right-angle turn or a small tilt with a black border (AugLy's RandomRotation)."""
    if rng.random() < 0.3:
        return np.ascontiguousarray(np.rot90(image, k=int(rng.integers(1, 4))))
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-30, 30)), 1.0)
    return cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_CONSTANT)


def perspective(image: Image, rng: Rng, distortion: float = 0.3) -> Image:
    h, w = image.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    jitter = rng.uniform(0, distortion / 2, size=(4, 2)) * np.float32([w, h])
    dst = src + jitter * np.float32([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    return cv2.warpPerspective(image, cv2.getPerspectiveTransform(src, dst.astype(np.float32)), (w, h))


# -- colour and pixels ---------------------------------------------------------------------------
def color_jitter(image: Image, rng: Rng, brightness=0.7, contrast=0.7, saturation=0.7, hue=0.2) -> Image:
    """torchvision's ColorJitter factors, applied in a random order."""
    out = image.astype(np.float32)
    ops = rng.permutation(4)
    for op in ops:
        if op == 0 and brightness:
            out *= rng.uniform(max(0, 1 - brightness), 1 + brightness)
        elif op == 1 and contrast:
            mean = out.mean()
            out = (out - mean) * rng.uniform(max(0, 1 - contrast), 1 + contrast) + mean
        elif op == 2 and saturation:
            gray = out.mean(axis=2, keepdims=True)
            out = (out - gray) * rng.uniform(max(0, 1 - saturation), 1 + saturation) + gray
        elif op == 3 and hue:
            hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
            shift = int(round(rng.uniform(-hue, hue) * 180))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 180).astype(np.uint8)
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
        out = np.clip(out, 0, 255)
    return out.astype(np.uint8)


def grayscale(image: Image, rng: Rng) -> Image:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return np.repeat(gray[..., None], 3, axis=2)


def blur(image: Image, rng: Rng) -> Image:
    sigma = rng.uniform(0.5, 2.5) * max(image.shape[:2]) / 128
    return cv2.GaussianBlur(image, (0, 0), sigma)


def jpeg(image: Image, rng: Rng) -> Image:
    quality = int(rng.choice([10, 20, 30, 50]))
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else image


def pixelize(image: Image, rng: Rng) -> Image:
    h, w = image.shape[:2]
    ratio = rng.uniform(0.1, 0.4)
    small = cv2.resize(image, (max(1, int(w * ratio)), max(1, int(h * ratio))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def shuffle_pixels(image: Image, rng: Rng, factor: float = 0.1) -> Image:
    flat = image.reshape(-1, 3).copy()
    n = int(len(flat) * factor)
    idx = rng.choice(len(flat), size=n, replace=False)
    flat[idx] = flat[rng.permutation(idx)]
    return flat.reshape(image.shape)


def edge_enhance(image: Image, rng: Rng) -> Image:
    strength = rng.uniform(0.5, 2.0)
    soft = cv2.GaussianBlur(image, (0, 0), 1.0)
    return cv2.addWeighted(image, 1 + strength, soft, -strength, 0)


def random_erasing(image: Image, rng: Rng) -> Image:
    """A random-noise rectangle over 2-33% of the image (torchvision's RandomErasing(value='random'))."""
    h, w = image.shape[:2]
    area = h * w * rng.uniform(0.02, 0.33)
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    eh, ew = min(h, int(np.sqrt(area / aspect))), min(w, int(np.sqrt(area * aspect)))
    if eh < 1 or ew < 1:
        return image
    y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
    out = image.copy()
    out[y:y + eh, x:x + ew] = rng.integers(0, 256, size=(eh, ew, 3), dtype=np.uint8)
    return out


# -- overlays ------------------------------------------------------------------------------------
def overlay_text(image: Image, rng: Rng) -> Image:
    """One to three lines of random characters, random font, size and colour (AugLy's overlay_text)."""
    out = image.copy()
    h, w = out.shape[:2]
    font = _FONTS[int(rng.integers(len(_FONTS)))]
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    scale = rng.uniform(0.1, 0.3) * h / 22.0  # a text line of 10-30% of the height
    thickness = max(1, int(round(scale * 1.5)))
    y = int(rng.uniform(0.15, 0.6) * h)
    for _ in range(int(rng.integers(1, 4))):
        text = "".join(rng.choice(list(_CHARS), size=int(rng.integers(4, 10))))
        cv2.putText(out, text, (int(rng.uniform(0.0, 0.4) * w), y), font, scale, color, thickness, cv2.LINE_AA)
        y += int(scale * 26)
        if y >= h:
            break
    return out


def overlay_emoji(image: Image, rng: Rng) -> Image:
    """A smiley of 10-30% of the image at a random place (AugLy's overlay_emoji)."""
    out = image.copy()
    h, w = out.shape[:2]
    r = max(2, int(rng.uniform(0.05, 0.15) * min(h, w)))
    cx, cy = int(rng.uniform(0, w)), int(rng.uniform(0, h))
    face = tuple(int(c) for c in rng.choice([(255, 204, 0), (255, 120, 160), (120, 200, 255), (140, 230, 90)]))
    cv2.circle(out, (cx, cy), r, face, -1, cv2.LINE_AA)
    eye = max(1, r // 5)
    cv2.circle(out, (cx - r // 3, cy - r // 4), eye, (20, 20, 20), -1)
    cv2.circle(out, (cx + r // 3, cy - r // 4), eye, (20, 20, 20), -1)
    cv2.ellipse(out, (cx, cy + r // 8), (r // 2, r // 3), 0, 10, 170, (20, 20, 20), max(1, r // 8))
    return out


def paste(background: Image, overlay: Image, rng: Rng, size=(0.4, 0.8), opacity=(0.6, 1.0)) -> Image:
    """``overlay`` scaled to ``size`` of the background's width, blended at a random place."""
    bh, bw = background.shape[:2]
    frac = rng.uniform(*size)
    ow = max(2, int(bw * frac))
    oh = max(2, min(bh, int(ow * overlay.shape[0] / overlay.shape[1])))
    small = resize(overlay, (ow, oh))
    x, y = int(rng.integers(0, bw - ow + 1)), int(rng.integers(0, bh - oh + 1))
    alpha = rng.uniform(*opacity)
    out = background.copy()
    region = out[y:y + oh, x:x + ow].astype(np.float32)
    out[y:y + oh, x:x + ow] = np.clip(alpha * small.astype(np.float32) + (1 - alpha) * region, 0, 255).astype(np.uint8)
    return out


# -- the hard training view (the seed's aug_hard, with our own ops) -------------------------------
PIXEL_OPS: Sequence[Tuple[Callable[[Image, Rng], Image], float]] = (
    (lambda im, r: color_jitter(im, r), 1.0),
    (pixelize, 0.25),
    (shuffle_pixels, 0.25),
    (jpeg, 0.25),
    (grayscale, 0.25),
    (blur, 0.25),
    (perspective, 0.25),
    (hflip, 0.5),
    (vflip, 0.1),
    (overlay_text, 0.25),
    (overlay_emoji, 0.25),
    (edge_enhance, 0.25),
)


def hard_view(image: Image, rng: Rng, out_size: int, others: Optional[Callable[[], Image]] = None,
              overlay_p: float = 0.05, op_scale: float = 1.0, crop_scale: float = 0.15) -> Image:
    """Rotation, then an overlay with another image (``overlay_p``, then a crop of scale >= 0.7) or
    a resized crop of scale >= ``crop_scale``, then the pixel ops in a shuffled order, each with its
    probability (x ``op_scale``), then random erasing (p 0.25 x ``op_scale``)."""
    if rng.random() < min(1.0, 0.25 * op_scale):
        image = rotate(image, rng)
    if others is not None and rng.random() < overlay_p:
        other = others()
        if rng.random() < 0.5:
            image = paste(other, image, rng, size=(0.4, 0.6), opacity=(0.6, 1.0))
        else:
            image = paste(image, other, rng, size=(0.4, 0.6), opacity=(0.6, 1.0))
        image = random_resized_crop(image, rng, out_size, scale=(0.7, 1.0))
    else:
        image = random_resized_crop(image, rng, out_size, scale=(crop_scale, 1.0))
    for index in rng.permutation(len(PIXEL_OPS)):
        op, p = PIXEL_OPS[index]
        if rng.random() < min(1.0, p * op_scale):
            image = op(image, rng)
    if image.shape[0] != out_size or image.shape[1] != out_size:
        image = resize(image, out_size)
    if rng.random() < min(1.0, 0.25 * op_scale):
        image = random_erasing(image, rng)
    return np.ascontiguousarray(image)


def moderate_view(image: Image, rng: Rng, out_size: int) -> Image:
    """The seed's aug_moderate: RandomResizedCrop(scale 0.7-1) + horizontal flip."""
    image = random_resized_crop(image, rng, out_size, scale=(0.7, 1.0))
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


# -- query edits (the synthetic generator) -------------------------------------------------------
def _edits(color, onto_size) -> List[Tuple[str, Callable[..., Image]]]:
    return [
        ("color", lambda im, r, bg: color_jitter(im, r, *color)),
        ("text", lambda im, r, bg: overlay_text(im, r)),
        ("emoji", lambda im, r, bg: overlay_emoji(overlay_emoji(im, r), r)),
        ("overlay_onto", lambda im, r, bg: paste(bg, im, r, size=onto_size, opacity=(0.8, 1.0))),
        ("overlay_on_top", lambda im, r, bg: paste(im, bg, r, size=(0.25, 0.45), opacity=(0.7, 1.0))),
        ("blur", lambda im, r, bg: blur(im, r)),
        ("jpeg", lambda im, r, bg: jpeg(im, r)),
        ("rotate", lambda im, r, bg: rotate(im, r)),
        ("flip", lambda im, r, bg: hflip(im, r)),
        ("pixelize", lambda im, r, bg: pixelize(im, r)),
        ("perspective", lambda im, r, bg: perspective(im, r)),
    ]


#: edit families by strength. ``strong`` is DISC21-like (hue shifts, grayscale, small pastes): a
#: pretrained network on a GPU learns it. ``moderate`` keeps every family but at strengths a network
#: trained from scratch on a CPU for minutes learns (brightness/contrast/saturation and a small hue
#: shift, pastes onto pictures at 70-95% of their size); an untrained network still fails it.
QUERY_EDITS: Dict[str, List[Tuple[str, Callable[..., Image]]]] = {
    "strong": _edits((0.6, 0.6, 0.8, 0.25), (0.5, 0.85)) + [("grayscale", lambda im, r, bg: grayscale(im, r))],
    "moderate": _edits((0.4, 0.4, 0.4, 0.05), (0.7, 0.95)),
}
QUERY_CROP = {"strong": (0.3, 0.8), "moderate": (0.4, 0.9)}
QUERY_N_EDITS = {"strong": (2, 4), "moderate": (1, 2)}


def query_edit(image: Image, rng: Rng, background: Image, strength: str = "strong",
               out_range=(96, 160)) -> Tuple[Image, List[str]]:
    """A copy edit as DISC21's queries: a crop of part of the area, then a few distinct edits in a
    random order, at a random output size (see ``QUERY_EDITS``). Returns the image and the edits."""
    if strength not in QUERY_EDITS:
        raise ValueError(f"query edit strength {strength!r}: use one of {', '.join(QUERY_EDITS)}")
    edits, (lo, hi) = QUERY_EDITS[strength], QUERY_N_EDITS[strength]
    side = int(rng.integers(out_range[0], out_range[1] + 1))
    aspect = rng.uniform(0.75, 1.33)
    size = (side, max(32, int(side / aspect)))
    image = random_resized_crop(image, rng, size, scale=QUERY_CROP[strength], ratio=(0.6, 1.6))
    count = int(rng.integers(lo, hi + 1))
    names = []
    for index in rng.choice(len(edits), size=count, replace=False):
        name, edit = edits[int(index)]
        image = edit(image, rng, background)
        names.append(name)
    return np.ascontiguousarray(image), names
