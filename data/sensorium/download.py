"""The real Sensorium 2023 data: one zip per mouse from the seed's GIN repositories, resumable
and verified.

Each ``<mouse>.zip`` is fetched into ``<root>/<mouse>.zip.part`` with HTTP ``Range`` requests, so
an interrupted download continues where it stopped; it is complete when its size equals the
server's ``Content-Length``. Before extraction every member's CRC is checked
(``ZipFile.testzip``); a damaged archive is deleted with a message instead of being extracted.
After extraction the mouse directory is checked against the layout (``layout.check_mouse``) and
``<root>/<mouse>/.download.json`` records the archive's size and sha256: a mouse with that record
is not fetched again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

from .layout import check_mouse

NEW_MICE = (
    "dynamic29515-10-12-Video-9b4f6a1a067fe51e15306b9628efea20",
    "dynamic29623-4-9-Video-9b4f6a1a067fe51e15306b9628efea20",
    "dynamic29647-19-8-Video-9b4f6a1a067fe51e15306b9628efea20",
    "dynamic29712-5-9-Video-9b4f6a1a067fe51e15306b9628efea20",
    "dynamic29755-2-8-Video-9b4f6a1a067fe51e15306b9628efea20",
)
OLD_MICE = (
    "dynamic29156-11-10-Video-8744edeac3b4d1ce16b680916b5267ce",
    "dynamic29228-2-10-Video-8744edeac3b4d1ce16b680916b5267ce",
    "dynamic29234-6-9-Video-8744edeac3b4d1ce16b680916b5267ce",
    "dynamic29513-3-5-Video-8744edeac3b4d1ce16b680916b5267ce",
    "dynamic29514-2-9-Video-8744edeac3b4d1ce16b680916b5267ce",
)
MICE = NEW_MICE + OLD_MICE
URLS = {"new": "https://gin.g-node.org/pollytur/sensorium_2023_dataset/raw/master/{file}",
        "old": "https://gin.g-node.org/pollytur/Sensorium2023Data/raw/master/{file}"}
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


def mouse_url(mouse: str, base_url: Optional[str] = None) -> str:
    if base_url:
        return f"{base_url.rstrip('/')}/{mouse}.zip"
    return URLS["new" if mouse in NEW_MICE else "old"].format(file=f"{mouse}.zip")


def fetch(url: str, dest: Path, progress: Optional[Callable[[int, int], None]] = None, timeout: float = 60) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, continuing a partial file with a Range
    request. Returns ``dest`` once the size matches the server's."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # asked past the end: the part is already whole
            part.replace(dest)
            return dest
        raise DownloadError(f"GET {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"GET {url}: {exc}. Check the network, or set data.base_url to a mirror") from None
    with response:
        resumed = have and response.status == 206
        if have and not resumed:  # the server ignored the Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if resumed else "wb") as fh:
            done = have
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                fh.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total or 0)
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"{url}: got {size} of {total} bytes; run again to continue from {part}")
    part.replace(dest)
    return dest


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{path} is not a whole zip archive ({exc})") from None
    if bad is not None:
        raise DownloadError(f"{path}: member {bad} fails its CRC check")


def download_mouse(root: Path, mouse: str, base_url: Optional[str] = None, no_network: bool = False,
                   progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, object]:
    root = Path(root)
    record_path = root / mouse / ".download.json"
    if record_path.exists():
        return {**json.loads(record_path.read_text()), "fetched": False}
    if no_network:
        raise DownloadError(f"mouse {mouse} is not in {root} and data.no_network=true forbids the download")
    archive = root / f"{mouse}.zip"
    if not archive.exists():
        fetch(mouse_url(mouse, base_url), archive, progress)
    try:
        verify_zip(archive)
    except DownloadError:
        archive.unlink(missing_ok=True)  # the next run fetches it again
        raise
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(root)
    shutil.rmtree(root / "__MACOSX", ignore_errors=True)
    counts = check_mouse(root, mouse)
    record = {"mouse": mouse, "size": archive.stat().st_size, "sha256": sha256(archive), **counts}
    record_path.write_text(json.dumps(record))
    archive.unlink()
    return {**record, "fetched": True}


def download_all(root: Path, mice: Optional[Sequence[str]] = None, base_url: Optional[str] = None,
                 no_network: bool = False, progress: Optional[Callable[[str, int, int], None]] = None) -> Dict[str, object]:
    names = list(mice) if mice else list(MICE)
    unknown = [m for m in names if m not in MICE and not (Path(root) / m).is_dir()]
    if unknown and not base_url:
        raise DownloadError(f"unknown mice {unknown}: the Sensorium 2023 mice are {', '.join(MICE)}")
    out = {}
    for mouse in names:
        out[mouse] = download_mouse(root, mouse, base_url, no_network,
                                    (lambda d, t, m=mouse: progress(m, d, t)) if progress else None)
    return out
