"""Download DISC21 (the ISC 2021 data) from the competition's public S3 bucket into the layout.

The seed runs ``aws s3 cp s3://drivendata-competition-fb-isc-data/all/<part>/ ... --no-sign-request``;
this does the same over plain HTTPS with the standard library (no AWS CLI or credentials): list
the prefix with S3's ListObjectsV2, fetch every object the root does not already hold at its size
(resumable: an interrupted run continues where it stopped), each written to a temporary name and
renamed. The ground-truth CSVs are not in the bucket's image prefixes: they come from the
competition's data page; a missing one is named with where to put it.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

BUCKET_URL = "https://drivendata-competition-fb-isc-data.s3.amazonaws.com"
#: bucket prefix -> folder of the layout (the seed's README downloads these four)
PARTS: Dict[str, str] = {
    "all/query_images/": "query_images",
    "all/reference_images/": "reference_images",
    "all/train_images/": "training_images",
    "all/query_images_phase2/": "query_images_phase2",
}
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class DownloadError(RuntimeError):
    pass


def parse_listing(xml_text: str) -> Tuple[List[Tuple[str, int]], Optional[str]]:
    """``([(key, size), ...], next continuation token or None)`` of one ListObjectsV2 page."""
    root = ET.fromstring(xml_text)
    items = []
    for node in root.iter(f"{_NS}Contents"):
        key = node.findtext(f"{_NS}Key")
        size = node.findtext(f"{_NS}Size")
        if key and not key.endswith("/"):
            items.append((key, int(size or 0)))
    truncated = (root.findtext(f"{_NS}IsTruncated") or "false").lower() == "true"
    token = root.findtext(f"{_NS}NextContinuationToken") if truncated else None
    return items, token


def _get(url: str, timeout: float = 60.0, retries: int = 4) -> bytes:
    delay = 1.0
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404) or attempt == retries:
                raise DownloadError(f"GET {url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            if attempt == retries:
                raise DownloadError(f"GET {url}: {exc} (is the internet reachable from this node?)") from None
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def list_prefix(prefix: str, base_url: str = BUCKET_URL) -> Iterator[Tuple[str, int]]:
    token = None
    while True:
        query = {"list-type": "2", "prefix": prefix}
        if token:
            query["continuation-token"] = token
        items, token = parse_listing(_get(f"{base_url}/?{urllib.parse.urlencode(query)}").decode())
        yield from items
        if not token:
            return


def _fetch(base_url: str, key: str, size: int, dest: Path) -> bool:
    if dest.exists() and dest.stat().st_size == size:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = _get(f"{base_url}/{urllib.parse.quote(key)}")
    if len(data) != size:
        raise DownloadError(f"{key}: {len(data)} bytes received, the listing says {size}")
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return True


def _partial_marker(root: Path, folder: str) -> Path:
    return root / f".{folder}.downloading"


def missing_parts(root: str | os.PathLike, parts: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The parts to (re)download: folders that do not exist, and folders whose download started
    but did not finish (a marker says so). A folder that exists without the marker is taken as the
    user's data and left alone."""
    root = Path(root)
    return {prefix: folder for prefix, folder in (parts or PARTS).items()
            if not (root / folder).is_dir() or _partial_marker(root, folder).exists()}


def download_disc21(root: str | os.PathLike, parts: Optional[Dict[str, str]] = None, base_url: str = BUCKET_URL,
                    workers: int = 16, progress: Optional[Callable[[str, int, int], None]] = None) -> Dict[str, Dict[str, int]]:
    """Bring every part into ``root``; returns ``{folder: {"objects": n, "fetched": m}}``."""
    root = Path(root)
    report: Dict[str, Dict[str, int]] = {}
    for prefix, folder in (parts or PARTS).items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        _partial_marker(root, folder).write_text(prefix)  # removed once the part is whole
        items = list(list_prefix(prefix, base_url))
        if not items:
            raise DownloadError(f"{base_url}/{prefix} lists no objects: the bucket moved? Set data.base_url")
        fetched = 0
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = [pool.submit(_fetch, base_url, key, size, root / folder / key[len(prefix):]) for key, size in items]
            for done, job in enumerate(jobs, start=1):
                fetched += bool(job.result())
                if progress and (done % 1000 == 0 or done == len(jobs)):
                    progress(folder, done, len(jobs))
        report[folder] = {"objects": len(items), "fetched": fetched}
        _partial_marker(root, folder).unlink()
    return report
