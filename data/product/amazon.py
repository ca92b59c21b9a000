"""The seed's Amazon-review preparation, one category at a time (its four scripts, as functions).

1. :func:`get_pairs`: a category's reviews + its metadata -> one row per image of every product
   that has both product (seller) images and customer images: ``asin, kind, url, review``
   (``kind``: ``product`` or ``user``). Written as parquet when pyarrow is installed, else CSV
   (:func:`write_table` / :func:`read_table` take either).
2. :func:`extract_embeddings`: an embedding per distinct image URL, in snapshots of ``every``
   items (``snapshots/00000000.npy``...). A rerun (requeue, resume) keeps the complete snapshots
   and continues after the last one: at most one snapshot of work is lost.
3. :func:`analyse_pairs`: each customer image's mean cosine to its product's images; the images
   above each threshold are kept (the seed: 0.6 and 0.5, two lists). With the synthetic set's
   ``filter_truth.json`` it also scores the filter (precision and recall of removing wrong images).
4. :func:`download_images`: the kept images (and their products' images), resumable and verified.
5. :func:`prepare_training_set`: every category's kept images in one CSV ``image_path, label``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from hpc_jobs.fsutil import atomic_write_bytes, atomic_write_json, read_json

PAIR_COLUMNS = ("asin", "kind", "url", "review")
#: Amazon serves a review image's thumbnail as ``<id>._SY88.jpg``; the full image drops the suffix
_SIZE_SUFFIX = re.compile(r"\._[A-Z0-9_,]+_?(?=\.(?:jpg|jpeg|png)$)", re.IGNORECASE)


# -- tables (parquet when pyarrow is there) -------------------------------------------------------
def have_parquet() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


def write_table(folder: Path, name: str, rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> Path:
    """``folder/name.parquet`` (pyarrow) or ``folder/name.csv`` (without it); atomic."""
    folder.mkdir(parents=True, exist_ok=True)
    if have_parquet():
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / f"{name}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), tmp)
        os.replace(tmp, path)
        return path
    path = folder / f"{name}.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode(), mode=None, fsync=False)
    return path


def read_table(folder_or_file: Path, name: Optional[str] = None) -> List[Dict[str, Any]]:
    path = Path(folder_or_file)
    if path.is_dir():
        found = [path / f"{name}.parquet", path / f"{name}.csv"]
        path = next((p for p in found if p.exists()), None)
        if path is None:
            raise FileNotFoundError(f"{folder_or_file}: neither {name}.parquet nor {name}.csv")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- 1. pairs --------------------------------------------------------------------------------------
def _json_lines(path: Path) -> Iterator[Dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        for line in fh:
            line = line.strip()
            if line:
                yield json.loads(line)


def full_size_url(url: str) -> str:
    """``.../71abc._SY88.jpg`` -> ``.../71abc.jpg`` (Amazon's thumbnail suffix dropped)."""
    return _SIZE_SUFFIX.sub("", url)


def get_pairs(reviews: Path, meta: Path) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    """Rows ``asin, kind, url, review`` for the products with product images and customer images."""
    user: Dict[str, List[Tuple[str, str]]] = {}
    reviews_read = with_images = 0
    for review in _json_lines(reviews):
        reviews_read += 1
        images = review.get("image") or []
        if not images or not review.get("asin"):
            continue
        with_images += 1
        rid = f"{review.get('reviewerID', '')}:{review.get('unixReviewTime', '')}"
        for url in images:
            user.setdefault(review["asin"], []).append((full_size_url(url), rid))
    rows: List[Dict[str, Any]] = []
    products = 0
    for item in _json_lines(meta):
        asin = item.get("asin")
        if asin not in user:
            continue
        urls = item.get("imageURLHighRes") or [full_size_url(u) for u in item.get("imageURL") or []]
        if not urls:
            continue
        products += 1
        seen = set()
        for url in urls:
            if url not in seen:
                seen.add(url)
                rows.append({"asin": asin, "kind": "product", "url": url, "review": ""})
        for url, rid in user.pop(asin):
            if url not in seen:
                seen.add(url)
                rows.append({"asin": asin, "kind": "user", "url": url, "review": rid})
    return rows, {"reviews": reviews_read, "reviews_with_images": with_images, "products": products,
                  "product_images": sum(r["kind"] == "product" for r in rows),
                  "user_images": sum(r["kind"] == "user" for r in rows)}


# -- fetching ----------------------------------------------------------------------------------------
def fetch(url: str, timeout: float = 30.0, retries: int = 3) -> bytes:
    """The bytes a URL names (http(s) or file://), with a few retries on network errors."""
    last: Optional[Exception] = None
    for attempt in range(retries):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "hpc-jobs-product/1"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = response.read()
                expected = response.headers.get("Content-Length") if hasattr(response, "headers") else None
            if expected is not None and expected.isdigit() and int(expected) != len(data):
                raise OSError(f"{url}: got {len(data)} bytes of {expected}")
            return data
        except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
            last = exc
            if getattr(exc, "code", None) == 404 or url.startswith("file:"):
                break
            time.sleep(min(8.0, 0.5 * 2 ** attempt))
    raise OSError(f"cannot fetch {url}: {last}")


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 image from encoded bytes; ValueError when they are not an image."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ValueError("not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def fetch_images(urls: Sequence[str], workers: int = 8) -> List[Optional[np.ndarray]]:
    """Decoded images of ``urls`` (None for one that cannot be fetched or decoded), in order."""
    def one(url: str) -> Optional[np.ndarray]:
        try:
            return decode_image(fetch(url))
        except (OSError, ValueError):
            return None

    if workers <= 1 or len(urls) <= 1:
        return [one(u) for u in urls]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, urls))


# -- 2. embeddings in snapshots ---------------------------------------------------------------------
def _snapshot_path(folder: Path, start: int) -> Path:
    return folder / f"{start:08d}.npy"


def completed_snapshots(folder: Path, urls: Sequence[str], every: int) -> int:
    """How many items the complete snapshots in ``folder`` already cover (0 when they were made
    for another URL list: then they are discarded)."""
    digest = hashlib.sha256("\n".join(urls).encode()).hexdigest()
    info = read_json(folder / "snapshots.json", default=None, corrupt_ok=True)
    if not info or info.get("urls_sha256") != digest or info.get("every") != every:
        for old in folder.glob("*.npy"):
            old.unlink()
        atomic_write_json(folder / "snapshots.json", {"urls_sha256": digest, "every": every, "total": len(urls)},
                          mode=None)
        return 0
    done = 0
    while done < len(urls) and _snapshot_path(folder, done).exists():
        done = min(len(urls), done + every)
    return done


def extract_embeddings(urls: Sequence[str], embed: Callable[[List[Optional[np.ndarray]]], np.ndarray],
                       folder: Path, every: int = 1000, batch_size: int = 64, fetch_workers: int = 8,
                       progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """Embed every URL's image, writing a snapshot after each ``every`` items; continue after the
    last complete snapshot of an earlier attempt. ``embed`` maps a list of images (None: no image)
    to an ``[n, d]`` float array (NaN rows for None). Returns ``{"embeddings", "resumed_at", ...}``."""
    folder.mkdir(parents=True, exist_ok=True)
    start = completed_snapshots(folder, urls, every)
    resumed_at = start
    computed = 0
    while start < len(urls):
        stop = min(len(urls), start + every)
        parts = []
        for lo in range(start, stop, batch_size):
            batch = list(urls[lo:min(stop, lo + batch_size)])
            parts.append(np.asarray(embed(fetch_images(batch, fetch_workers)), np.float32))
            computed += len(batch)
            if progress is not None:
                progress(lo + len(batch), len(urls))
        buf = io.BytesIO()
        np.save(buf, np.concatenate(parts))
        atomic_write_bytes(_snapshot_path(folder, start), buf.getvalue(), mode=None, fsync=True)
        start = stop
    chunks = [np.load(_snapshot_path(folder, s)) for s in range(0, len(urls), every)]
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return {"embeddings": embeddings, "resumed_at": resumed_at, "computed": computed,
            "failed": int(np.isnan(embeddings).any(axis=1).sum()) if len(embeddings) else 0}


def save_features(path: Path, urls: Sequence[str], embeddings: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, urls=np.array(list(urls), dtype=object).astype(str), embeddings=embeddings.astype(np.float32))
    atomic_write_bytes(path, buf.getvalue(), mode=None, fsync=True)


def load_features(path: Path) -> Tuple[List[str], np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return [str(u) for u in f["urls"]], f["embeddings"].astype(np.float32)


# -- 3. the cosine filter ----------------------------------------------------------------------------
def mean_cosines(rows: Sequence[Dict[str, Any]], urls: Sequence[str], embeddings: np.ndarray) -> Dict[str, float]:
    """Each customer image's mean cosine to its product's images (NaN when either side has no
    embedding: an image that could not be fetched)."""
    index = {u: i for i, u in enumerate(urls)}
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.where(norms > 0, norms, 1.0)
    by_product: Dict[str, Dict[str, List[str]]] = {}
    for r in rows:
        by_product.setdefault(r["asin"], {"product": [], "user": []})[r["kind"]].append(r["url"])
    out: Dict[str, float] = {}
    for group in by_product.values():
        product = [unit[index[u]] for u in group["product"] if u in index and not np.isnan(unit[index[u]]).any()]
        for url in group["user"]:
            vec = unit[index[url]] if url in index else None
            if not product or vec is None or np.isnan(vec).any():
                out[url] = float("nan")
            else:
                out[url] = float(np.mean(np.stack(product) @ vec))
    return out


def analyse_pairs(rows: Sequence[Dict[str, Any]], scores: Dict[str, float],
                  thresholds: Sequence[float]) -> Dict[float, List[Dict[str, Any]]]:
    """Per threshold: the product images and the customer images whose mean cosine is above it,
    for the products left with at least two images (a class needs a positive pair)."""
    kept: Dict[float, List[Dict[str, Any]]] = {}
    for th in thresholds:
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for r in rows:
            if r["kind"] == "product" or scores.get(r["url"], float("nan")) > th:
                groups.setdefault(r["asin"], []).append({**r, "mean_cos": scores.get(r["url"], "")})
        kept[th] = [r for group in groups.values() if len(group) >= 2 for r in group]
    return kept


def filter_report(scores: Dict[str, float], kept: Dict[float, List[Dict[str, Any]]],
                  truth: Optional[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
    """How the filter did: counts per threshold and, when the truth is known (synthetic set),
    precision and recall of *removing* wrong images, and the share of right images kept."""
    if truth:  # the truth names review URLs as the reviews give them (thumbnails): as the pairs do
        truth = {full_size_url(url): value for url, value in truth.items()}
    report: Dict[str, Any] = {"user_images": len(scores),
                              "unscored": sum(1 for v in scores.values() if np.isnan(v))}
    for th, rows in kept.items():
        kept_urls = {r["url"] for r in rows if r["kind"] == "user"}
        entry: Dict[str, Any] = {"kept": len(kept_urls), "removed": len(scores) - len(kept_urls)}
        if truth:
            known = [u for u in scores if u in truth]
            wrong = {u for u in known if truth[u]["wrong"]}
            removed = {u for u in known if u not in kept_urls}
            right = set(known) - wrong
            hit = len(removed & wrong)
            entry.update({
                "wrong": len(wrong), "wrong_removed": hit, "right": len(right),
                "right_kept": len(right - removed),
                "precision": hit / len(removed) if removed else 1.0,  # removed images that were wrong
                "recall": hit / len(wrong) if wrong else 1.0,          # wrong images removed
                "right_kept_fraction": len(right - removed) / len(right) if right else 1.0,
                "by_kind": {kind: {"total": sum(1 for u in known if truth[u]["kind"] == kind),
                                   "removed": sum(1 for u in removed if truth[u]["kind"] == kind)}
                            for kind in sorted({truth[u]["kind"] for u in known})},
            })
        report[f"{th:g}"] = entry
    return report


# -- 4. download ------------------------------------------------------------------------------------
def local_name(url: str) -> str:
    """A stable file name for a URL: its own name when it has one, else a hash."""
    base = full_size_url(url).rsplit("/", 1)[-1].split("?")[0]
    digest = hashlib.sha1(url.encode()).hexdigest()[:10]
    stem, dot, ext = base.rpartition(".")
    if not stem or ext.lower() not in ("jpg", "jpeg", "png", "webp"):
        return f"{digest}.jpg"
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}-{digest}.{ext.lower()}"


def download_images(urls: Iterable[str], dest: Path, workers: int = 16,
                    progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """Fetch ``urls`` into ``dest`` (file ``local_name(url)``), each written to a ``.part`` file,
    verified (non-empty, decodes as an image), then renamed. ``dest/index.json`` records every
    verified file (url -> name, bytes, sha256); a rerun skips the files it lists whose size still
    matches, so an interrupted download resumes. Returns counts and the index."""
    dest.mkdir(parents=True, exist_ok=True)
    index_path = dest / "index.json"
    index: Dict[str, Dict[str, Any]] = read_json(index_path, default={}, corrupt_ok=True) or {}
    todo, reused = [], 0
    wanted = list(dict.fromkeys(urls))
    for url in wanted:
        entry = index.get(url)
        if entry and (dest / entry["name"]).is_file() and (dest / entry["name"]).stat().st_size == entry["bytes"]:
            reused += 1
        else:
            todo.append(url)
    failed: Dict[str, str] = {}

    def one(url: str) -> Tuple[str, Optional[Dict[str, Any]], Optional[str]]:
        name = local_name(url)
        try:
            data = fetch(url)
            if not data:
                raise ValueError("empty file")
            decode_image(data)
        except (OSError, ValueError) as exc:
            return url, None, str(exc)
        part = dest / (name + ".part")
        part.write_bytes(data)
        os.replace(part, dest / name)
        return url, {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, None

    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for url, entry, error in pool.map(one, todo):
            done += 1
            if entry is None:
                failed[url] = error or "unknown error"
            else:
                index[url] = entry
            if done % 200 == 0:
                atomic_write_json(index_path, index, mode=None, fsync=False)
            if progress is not None:
                progress(reused + done, len(wanted))
    atomic_write_json(index_path, index, mode=None)
    return {"wanted": len(wanted), "fetched": len(todo) - len(failed), "reused": reused, "failed": failed,
            "index": index}


# -- 5. the training set ------------------------------------------------------------------------------
def prepare_training_set(kept_files: Sequence[Path], index: Dict[str, Dict[str, Any]], images: Path,
                         out: Path) -> Dict[str, Any]:
    """One CSV ``image_path, label`` over every category's kept images (downloaded ones only);
    labels number the products (asins, sorted) from 0. Products left with one image are dropped."""
    by_asin: Dict[str, List[str]] = {}
    missing = 0
    for path in kept_files:
        for r in read_table(Path(path)):
            entry = index.get(r["url"])
            if entry is None:
                missing += 1
                continue
            by_asin.setdefault(r["asin"], []).append(str(images / entry["name"]))
    asins = sorted(a for a, paths in by_asin.items() if len(paths) >= 2)
    rows = [(p, label) for label, asin in enumerate(asins) for p in by_asin[asin]]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image_path", "label"])
    writer.writerows(rows)
    atomic_write_bytes(out, buf.getvalue().encode(), mode=None)
    return {"images": len(rows), "classes": len(asins), "not_downloaded": missing}
