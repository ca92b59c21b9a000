"""A synthetic Visual Product Recognition 2023 set in the real layouts, small enough for CI.

``generate(root)`` writes what the real data would be, where it would be::

    root/Product10K/train/*.jpg, train.csv              # name,class (training, the ArcFace phases)
    root/Product10K/test/*.jpg, test_kaggletest.csv     # name,class (same classes, held-out images)
    root/development_test_data/gallery/*.jpg, gallery.csv   # img_path,product_id (seller images)
    root/development_test_data/queries/*.jpg, queries.csv   # img_path,product_id,bbox_x,bbox_y,bbox_w,bbox_h
    root/amazon/reviews/<Category>.json                 # Amazon-review 2018 layout: one review a line,
    root/amazon/reviews/meta_<Category>.json            #   ``image`` URLs; meta: ``imageURLHighRes``
    root/amazon/remote/...                              # "the internet": the files those URLs name
    root/amazon/filter_truth.json                       # which user images were injected as wrong
    root/SYNTHETIC.json, root/README.txt                # say loudly that this is not the real data

A product is a procedural object: a silhouette (box, bottle, can, round, tag, pouch) in one of a
few body colours, a pattern (stripes, dots, checks, bands) in another, and a logo. Colours come
from a small palette shared by all products, so colour alone does not tell products apart: the
pattern, shape and logo do. A *seller* image is the object centred on white; a *user* image is the
object rotated, rescaled and relit, pasted into clutter at a random place (queries record that
box). The review set also holds *wrong* user images, as real reviews do: another product
(``other``), or an extreme close-up of the product's surface (``zoom``); the cosine filter of the
data preparation must remove them, and ``filter_truth.json`` says which they were so its
precision and recall can be measured. Review image URLs are ``file://`` URLs into
``amazon/remote/`` (thumbnail form ``..._SY88.jpg``, as Amazon's), so the download code is the
real one. Products of Product10K, of the dev set and of the review set are all distinct.

Everything is a pure function of the seed; a finished set (its marker matches) is reused as is.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np

from . import CATEGORIES  # a preset writes the first ``categories`` of them

MARKER = "SYNTHETIC.json"
FORMAT_VERSION = 2

PRESETS: Dict[str, Dict[str, Any]] = {
    # unit tests: a second or two
    "micro": dict(size=64, p10k_classes=12, p10k_images=(3, 5), p10k_test=1, dev_products=10, dev_gallery=2,
                  dev_queries=1, dev_distractors=4, categories=2, products_per_category=6, seller_images=2,
                  user_images=3, wrong_images=2),
    # the tiny preset's pipeline (CI, the dev cluster, a laptop): a few seconds to write
    "tiny": dict(size=96, p10k_classes=60, p10k_images=(4, 10), p10k_test=1, dev_products=30, dev_gallery=2,
                 dev_queries=2, dev_distractors=20, categories=3, products_per_category=14, seller_images=2,
                 user_images=4, wrong_images=2),
    # a larger demo for a GPU
    "small": dict(size=224, p10k_classes=1000, p10k_images=(4, 16), p10k_test=2, dev_products=300,
                  dev_gallery=2, dev_queries=2, dev_distractors=300, categories=9, products_per_category=300,
                  seller_images=3, user_images=5, wrong_images=2),
}
DEFAULT_PRESET = "tiny"


PALETTE = np.array([(214, 40, 40), (38, 84, 196), (34, 150, 64), (240, 196, 36), (36, 36, 40),
                    (146, 58, 168), (238, 124, 30), (128, 128, 132), (40, 180, 190), (250, 250, 250)], np.float32)
SILHOUETTES = ("box", "bottle", "can", "round", "tag", "pouch")
PATTERNS = ("hstripes", "vstripes", "dots", "checks", "band", "diagonal")
LOGOS = ("circle", "square", "triangle", "star", "ring", "bar")
WRONG_KINDS = ("other", "zoom")
#: a customer's own photo of an item shows it large (the dev queries, which come with boxes, show
#: it smaller in more clutter)
REVIEW_SCALE = (0.7, 0.92)


# -- one product --------------------------------------------------------------------------------
def product_design(rng: np.random.Generator) -> Dict[str, Any]:
    """The look of one product (plain data: a product is drawn again from it at every view)."""
    body, pattern_color, logo_color = rng.choice(len(PALETTE), size=3, replace=False)
    return {"silhouette": int(rng.integers(len(SILHOUETTES))), "aspect": float(rng.uniform(0.45, 1.0)),
            "body": int(body), "pattern": int(rng.integers(len(PATTERNS))), "pattern_color": int(pattern_color),
            "period": float(rng.uniform(0.1, 0.3)), "logo": int(rng.integers(len(LOGOS))),
            "logo_color": int(logo_color), "logo_pos": [float(v) for v in rng.uniform(0.3, 0.7, size=2)],
            "logo_size": float(rng.uniform(0.14, 0.26))}


def _silhouette(design: Dict[str, Any], s: int) -> np.ndarray:
    mask = np.zeros((s, s), np.uint8)
    aspect = design["aspect"]
    w, h = (int(s * aspect), s) if design["silhouette"] % 2 == 0 else (s, int(s * aspect))
    w, h = max(8, w - 2), max(8, h - 2)
    x0, y0 = (s - w) // 2, (s - h) // 2
    kind = SILHOUETTES[design["silhouette"]]
    if kind == "box":
        cv2.rectangle(mask, (x0, y0), (x0 + w, y0 + h), 255, -1)
    elif kind == "bottle":
        neck = max(3, w // 3)
        cv2.rectangle(mask, (x0, y0 + h // 4), (x0 + w, y0 + h), 255, -1)
        cv2.rectangle(mask, (s // 2 - neck // 2, y0), (s // 2 + neck // 2, y0 + h // 4), 255, -1)
        cv2.circle(mask, (s // 2, y0 + h // 4), w // 2, 255, -1)
    elif kind == "can":
        cv2.ellipse(mask, (s // 2, s // 2), (w // 2, h // 2), 0, 0, 360, 255, -1)
        cv2.rectangle(mask, (x0, y0 + h // 6), (x0 + w, y0 + h - h // 6), 255, -1)
    elif kind == "round":
        cv2.circle(mask, (s // 2, s // 2), min(w, h) // 2 + s // 8, 255, -1)
    elif kind == "tag":
        pts = np.array([(x0 + w // 4, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0 + w // 4, y0 + h), (x0, s // 2)])
        cv2.fillPoly(mask, [pts.astype(np.int32)], 255)
    else:  # pouch: a trapezoid
        pts = np.array([(x0 + w // 6, y0), (x0 + w - w // 6, y0), (x0 + w, y0 + h), (x0, y0 + h)])
        cv2.fillPoly(mask, [pts.astype(np.int32)], 255)
    return mask


def render_product(design: Dict[str, Any], s: int) -> Tuple[np.ndarray, np.ndarray]:
    """The object on an ``s`` x ``s`` canvas: (RGB uint8, mask uint8 0/255)."""
    mask = _silhouette(design, s)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    period = design["period"]
    kind = PATTERNS[design["pattern"]]
    if kind == "hstripes":
        t = (yy / period) % 1.0 < 0.5
    elif kind == "vstripes":
        t = (xx / period) % 1.0 < 0.5
    elif kind == "dots":
        t = np.hypot((xx / period) % 1.0 - 0.5, (yy / period) % 1.0 - 0.5) < 0.28
    elif kind == "checks":
        t = ((xx // period) + (yy // period)) % 2 == 0
    elif kind == "band":
        t = np.abs(yy - 0.5) < period
    else:
        t = ((xx + yy) / period) % 1.0 < 0.4
    image = np.where(t[..., None], PALETTE[design["pattern_color"]], PALETTE[design["body"]])
    # the logo: a shape in a third colour at a fixed place of the object
    logo = np.zeros((s, s), np.uint8)
    cx, cy = int(design["logo_pos"][0] * s), int(design["logo_pos"][1] * s)
    r = max(2, int(design["logo_size"] * s / 2))
    shape = LOGOS[design["logo"]]
    if shape == "circle":
        cv2.circle(logo, (cx, cy), r, 255, -1)
    elif shape == "square":
        cv2.rectangle(logo, (cx - r, cy - r), (cx + r, cy + r), 255, -1)
    elif shape == "triangle":
        cv2.fillPoly(logo, [np.array([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], np.int32)], 255)
    elif shape == "star":
        pts = [(cx + (r if i % 2 == 0 else r // 2) * math.cos(i * math.pi / 5 - math.pi / 2),
                cy + (r if i % 2 == 0 else r // 2) * math.sin(i * math.pi / 5 - math.pi / 2)) for i in range(10)]
        cv2.fillPoly(logo, [np.array(pts, np.int32)], 255)
    elif shape == "ring":
        cv2.circle(logo, (cx, cy), r, 255, max(2, r // 2))
    else:
        cv2.rectangle(logo, (cx - r, cy - r // 3), (cx + r, cy + r // 3), 255, -1)
    image[logo > 0] = PALETTE[design["logo_color"]]
    image[mask == 0] = 255.0
    edge = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    image[edge] = 30.0
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _transform(image: np.ndarray, mask: np.ndarray, size: int, angle: float) -> Tuple[np.ndarray, np.ndarray]:
    """The object resized to ``size`` and rotated by ``angle`` degrees (mask follows)."""
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
    image = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255))
    mask = cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_NEAREST, borderValue=0)
    return image, mask


def seller_image(design: Dict[str, Any], size: int, rng: np.random.Generator) -> np.ndarray:
    """The product centred on white, as a shop photographs it."""
    obj, mask = render_product(design, size + size // 2)
    side = int(size * rng.uniform(0.7, 0.88))
    obj, mask = _transform(obj, mask, side, float(rng.uniform(-8, 8)))
    canvas = np.full((size, size, 3), 255, np.uint8)
    x = (size - side) // 2 + int(rng.integers(-size // 20, size // 20 + 1))
    y = (size - side) // 2 + int(rng.integers(-size // 20, size // 20 + 1))
    x, y = int(np.clip(x, 0, size - side)), int(np.clip(y, 0, size - side))
    region = canvas[y:y + side, x:x + side]
    region[mask > 0] = obj[mask > 0]
    return canvas


def clutter(size: int, rng: np.random.Generator) -> np.ndarray:
    """A busy background: a coloured base, 8-16 random shapes in any colour, a little noise."""
    base = rng.uniform(60, 200, size=3)
    img = np.empty((size, size, 3), np.float32)
    img[:] = base
    for _ in range(int(rng.integers(8, 17))):
        color = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        c = tuple(int(v) for v in rng.integers(0, size, size=2))
        r = int(rng.uniform(0.05, 0.25) * size)
        if rng.random() < 0.5:
            cv2.circle(img, c, r, color, -1)
        else:
            cv2.rectangle(img, c, (c[0] + r, c[1] + int(r * rng.uniform(0.3, 2))), color, -1)
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def user_image(design: Dict[str, Any], size: int, rng: np.random.Generator,
               scale: Tuple[float, float] = (0.45, 0.7)) -> Tuple[np.ndarray, Tuple[int, int, int, int]]:
    """The product as a customer photographs it: rotated, rescaled (its side a ``scale`` fraction
    of the image's), relit, in clutter. Returns the image and the object's box ``(x, y, w, h)``."""
    obj, mask = render_product(design, size)
    side = int(size * rng.uniform(*scale))
    obj, mask = _transform(obj, mask, side, float(rng.uniform(-30, 30)))
    gain = rng.uniform(0.75, 1.15) * rng.uniform(0.92, 1.08, size=3)
    obj = np.clip(obj.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    canvas = clutter(size, rng)
    x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    region = canvas[y:y + side, x:x + side]
    region[mask > 0] = obj[mask > 0]
    if rng.random() < 0.3:
        canvas = cv2.GaussianBlur(canvas, (3, 3), 0)
    ys, xs = np.nonzero(mask)
    box = (x + int(xs.min()), y + int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    return canvas, box


def zoom_image(design: Dict[str, Any], size: int, rng: np.random.Generator) -> np.ndarray:
    """A wrong user image: an extreme close-up of the product's surface (a reviewer showing a
    detail), 12-20% of the object's side filling the frame."""
    big = 4 * size
    obj, mask = render_product(design, big)
    side = int(big * rng.uniform(0.12, 0.2))
    ys, xs = np.nonzero(mask[side // 2: big - side // 2, side // 2: big - side // 2] > 0)
    i = int(rng.integers(len(ys)))
    cy, cx = ys[i] + side // 2, xs[i] + side // 2
    y0, x0 = int(np.clip(cy - side // 2, 0, big - side)), int(np.clip(cx - side // 2, 0, big - side))
    crop = obj[y0:y0 + side, x0:x0 + side]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


# -- writing ------------------------------------------------------------------------------------
def write_jpeg(path: Path, image: np.ndarray, quality: int = 92) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"cannot encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    buf.tofile(str(path))


def _write_csv(path: Path, header: List[str], rows: List[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: List[Dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _params(preset: str, overrides: Dict[str, Any], seed: int) -> Dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"synthetic preset '{preset}' is unknown: use one of {', '.join(PRESETS)}")
    params = {**PRESETS[preset], **overrides, "seed": int(seed), "format": FORMAT_VERSION}
    params["p10k_images"] = list(params["p10k_images"])
    if not 1 <= params["categories"] <= len(CATEGORIES):
        raise ValueError(f"categories={params['categories']}: between 1 and {len(CATEGORIES)}")
    if params["products_per_category"] < 2:
        raise ValueError("products_per_category must be at least 2 (an 'other product' wrong image needs one)")
    return params


def is_complete(root: Path, params: Optional[Dict[str, Any]] = None) -> bool:
    try:
        data = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return params is None or data.get("params") == params


def generate(root: str | os.PathLike, preset: str = DEFAULT_PRESET, seed: int = 0, force: bool = False,
             **overrides: Any) -> Dict[str, Any]:
    """Write the synthetic set under ``root`` (idempotent: a complete set with the same parameters
    is kept; a half-written one is removed and written again); returns a summary."""
    root = Path(root)
    params = _params(preset, overrides, seed)
    if not force and is_complete(root, params):
        return {**json.loads((root / MARKER).read_text())["summary"], "reused": True}
    started = time.monotonic()
    for name in ("Product10K", "development_test_data", "amazon"):
        shutil.rmtree(root / name, ignore_errors=True)
    (root / MARKER).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    size = int(params["size"])
    master = np.random.default_rng(params["seed"])
    n_products = params["p10k_classes"] + params["dev_products"] + params["dev_distractors"] \
        + params["categories"] * params["products_per_category"]
    designs = [product_design(master) for _ in range(n_products)]
    rng = np.random.default_rng(master.integers(0, 2**63))
    cursor = 0

    def take(n: int) -> List[Dict[str, Any]]:
        nonlocal cursor
        cursor += n
        return designs[cursor - n:cursor]

    # Product10K: shop and customer photos of each class, a few held out as the test split
    p10k = root / "Product10K"
    train_rows, test_rows = [], []
    lo, hi = params["p10k_images"]
    for cls, design in enumerate(take(params["p10k_classes"])):
        count = int(rng.integers(lo, hi + 1)) + params["p10k_test"]
        for j in range(count):
            image = seller_image(design, size, rng) if j % 2 == 0 else user_image(design, size, rng, REVIEW_SCALE)[0]
            name = f"{cls:05d}_{j:02d}.jpg"
            split, rows = ("test", test_rows) if j >= count - params["p10k_test"] else ("train", train_rows)
            write_jpeg(p10k / split / name, image)
            rows.append((name, cls))
    _write_csv(p10k / "train.csv", ["name", "class"], train_rows)
    _write_csv(p10k / "test_kaggletest.csv", ["name", "class"], test_rows)

    # the development set: seller images as the gallery, customer photos (with boxes) as queries
    dev = root / "development_test_data"
    gallery_rows, query_rows = [], []
    dev_designs = take(params["dev_products"])
    distractors = take(params["dev_distractors"])
    for pid, design in enumerate(dev_designs + distractors):
        for j in range(params["dev_gallery"] if pid < len(dev_designs) else 1):
            path = f"gallery/{pid:05d}_{j}.jpg"
            write_jpeg(dev / path, seller_image(design, size, rng))
            gallery_rows.append((path, pid))
        if pid < len(dev_designs):
            for j in range(params["dev_queries"]):
                image, (x, y, w, h) = user_image(design, size, rng)
                path = f"queries/{pid:05d}_{j}.jpg"
                write_jpeg(dev / path, image)
                query_rows.append((path, pid, x, y, w, h))
    _write_csv(dev / "gallery.csv", ["img_path", "product_id"], gallery_rows)
    _write_csv(dev / "queries.csv", ["img_path", "product_id", "bbox_x", "bbox_y", "bbox_w", "bbox_h"], query_rows)

    # Amazon reviews: per category, products (meta) and reviews with customer images, some wrong
    amazon = root / "amazon"
    remote = amazon / "remote" / "images" / "I"
    truth: Dict[str, Dict[str, Any]] = {}
    counts = {"right": 0, "other": 0, "zoom": 0}
    image_no = 0

    def put(image: np.ndarray, thumbnail: bool) -> str:
        nonlocal image_no
        image_no += 1
        stem = f"S{params['seed']:02d}{image_no:07d}"
        write_jpeg(remote / f"{stem}.jpg", image)
        return f"file://{(remote / stem).resolve()}" + ("._SY88.jpg" if thumbnail else ".jpg")

    for c in range(params["categories"]):
        category = CATEGORIES[c]
        cat_designs = take(params["products_per_category"])
        meta, reviews = [], []
        for p, design in enumerate(cat_designs):
            asin = f"B{c:02d}{p:07d}"
            urls = [put(seller_image(design, size, rng), thumbnail=False) for _ in range(params["seller_images"])]
            meta.append({"asin": asin, "title": f"synthetic {category} product {p}", "main_cat": category,
                         "imageURL": [u.replace(".jpg", "._US40_.jpg") for u in urls], "imageURLHighRes": urls})
            kinds = ["right"] * params["user_images"] + [WRONG_KINDS[k % 2] for k in range(params["wrong_images"])]
            for r, kind in enumerate(kinds):
                if kind == "right":
                    image = user_image(design, size, rng, REVIEW_SCALE)[0]
                elif kind == "other":
                    other = cat_designs[(p + 1 + int(rng.integers(len(cat_designs) - 1))) % len(cat_designs)]
                    image = user_image(other, size, rng, REVIEW_SCALE)[0]
                else:
                    image = zoom_image(design, size, rng)
                url = put(image, thumbnail=True)
                truth[url] = {"asin": asin, "kind": kind, "wrong": kind != "right"}
                counts[kind] += 1
                reviews.append({"overall": float(rng.integers(1, 6)), "verified": True,
                                "reviewTime": "01 5, 2018", "reviewerID": f"A{c:02d}{p:05d}{r:02d}",
                                "asin": asin, "reviewerName": "synthetic", "reviewText": "synthetic review",
                                "summary": kind, "unixReviewTime": 1515110400 + r, "image": [url]})
            # reviews without images, as most are: get_pairs must skip them
            reviews.append({"overall": 4.0, "verified": False, "reviewTime": "01 6, 2018",
                            "reviewerID": f"A{c:02d}{p:05d}xx", "asin": asin, "reviewText": "no photo",
                            "summary": "text only", "unixReviewTime": 1515196800})
        # a product reviewed with images but without product images in its metadata: no pair
        meta.append({"asin": f"B{c:02d}9999999", "title": "no images", "main_cat": category, "imageURL": [],
                     "imageURLHighRes": []})
        reviews.append({"overall": 3.0, "verified": True, "reviewerID": "ANOPRODUCT", "asin": f"B{c:02d}9999999",
                        "unixReviewTime": 1515196800, "image": [put(clutter(size, rng), thumbnail=True)]})
        order = rng.permutation(len(reviews))
        _write_jsonl(amazon / "reviews" / f"{category}.json", [reviews[i] for i in order])
        _write_jsonl(amazon / "reviews" / f"meta_{category}.json", meta)
    (amazon / "filter_truth.json").write_text(json.dumps(truth))

    summary = {"root": str(root), "preset": preset, "size": size, "p10k_train": len(train_rows),
               "p10k_test": len(test_rows), "p10k_classes": params["p10k_classes"], "gallery": len(gallery_rows),
               "queries": len(query_rows), "categories": list(CATEGORIES[:params["categories"]]),
               "user_images": counts, "seconds": round(time.monotonic() - started, 2)}
    (root / "README.txt").write_text(
        "SYNTHETIC DATA: procedural products, not Product10K, not the AIcrowd development set and not "
        "Amazon reviews.\nWritten by data/product/synthetic.py for tests and demos; set data.root for the real data.\n")
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"params": params, "summary": summary}, indent=1))
    os.replace(tmp, root / MARKER)
    return summary
