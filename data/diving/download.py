"""Download the MTL-AQA videos, annotation pickles and (optionally) a TimeSformer checkpoint.

Runs on a login node (compute nodes of most clusters, CARC Discovery's included, cannot reach the
internet). Every file is fetched with HTTP range requests into ``<name>.part`` (an interrupted
download resumes where it stopped), its size is checked against the server's (and the known size or
SHA-256 where we have one), then it is renamed into place. Files already present are skipped.

Sources (defaults; override with ``urls=`` / ``--urls-file`` or a ``base_url`` mirror):

* the 15 competition videos: the Dropbox folder the seed's ``download_videos.sh`` uses;
* the annotation and split pickles: the official MTL-AQA release (split 0);
* TimeSformer checkpoints: the Dropbox links of the seed's table (``dl=1``).

A ``base_url`` mirror must hold the data root's layout: ``{base_url}/whole_videos/01.mp4``,
``{base_url}/final_annotations_dict.pkl``, ... ``no_network=True`` never opens a connection: it
checks what is present and names what is missing.

Command line: ``python -m data.diving.download ROOT [--checkpoint NAME] [--base-url URL]
[--urls-file FILE] [--no-network] [--videos 01 02]``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .annotations import VIDEO_NUMS, parse_videos
from .errors import DownloadError

_DROPBOX_VIDEOS = "https://www.dropbox.com/sh/rt2eo97qt2bnrd4"
#: relative path in the data root -> URL (the share folder's per-file links, as the seed uses them)
VIDEO_URLS: Dict[str, str] = {
    f"whole_videos/{name}.mp4": f"{_DROPBOX_VIDEOS}/{token}/{name}.mp4?dl=1"
    for name, token in [
        ("01", "AAAKpkawpb4mJJ4nhQmAPjxUa"), ("02", "AADkp8iXHM4fgnzmy1jFwvKja"),
        ("03", "AAARN1DMLxf8NABpSHKvZoZsa"), ("04", "AABpMY694YU4XMJoWqg1JcYua"),
        ("05", "AADVBL0Yfa3ZPGM8pknrBUbwa"), ("06", "AACXAvHw8WHx7QabD9oeWLDCa"),
        ("07", "AACTHGOs-kMzUVwVjxIv75pTa"), ("09", "AAD3X5fCcQxsyiKlf6N_WDPva"),
        ("10", "AAA_rOnzvnQ5rAWwhcRONjl9a"), ("13", "AABT3mEX95cq9CHFJneV0wDCa"),
        ("14", "AADDDD_g-dMONfAECq8Q5f9ma"), ("17", "AAD0wDeC5SO_I62ndVWYqDn2a"),
        ("18", "AAD-pVk90-ojr8TvNyrmo5iBa"), ("22", "AADqXRHZpqLH-DlfKW3uNjb6a"),
        ("26", "AAC0z96ivZibxUGctjEPSqexa"),
    ]
}

_MTL_AQA = ("https://raw.githubusercontent.com/ParitoshParmar/MTL-AQA/master/"
            "MTL-AQA_dataset_release/Ready_2_Use/MTL-AQA_split_0_data")
#: relative path -> (URL, size in bytes, sha256) of the official split-0 annotation files
ANNOTATION_FILES: Dict[str, tuple] = {
    "final_annotations_dict.pkl": (f"{_MTL_AQA}/final_annotations_dict.pkl", 107283,
                                   "8fda2f55be4f7e8031923c796d5599c357582df759dbd476de6cc40c2b3c81f3"),
    "train_split_0.pkl": (f"{_MTL_AQA}/train_split_0.pkl", 9835,
                          "87d5dd2fe704af5ae1130b8d3ab66d2d4287346363fa37f52cee27dfb6730e52"),
    "test_split_0.pkl": (f"{_MTL_AQA}/test_split_0.pkl", 2773,
                         "c25d6619e0044182ab303b64f4c0386510c2e17d302aad28f08c5e461319904a"),
}

#: TimeSformer checkpoints of the seed's table (a dict whose ``model_state`` holds the weights)
CHECKPOINT_URLS: Dict[str, str] = {
    name: f"https://www.dropbox.com/s/{token}/{name}.pyth?dl=1"
    for name, token in [
        ("TimeSformer_divST_8x32_224_K400", "g5t24we9gl5yk88"),
        ("TimeSformer_divST_16x16_448_K400", "6f0x172lpqy3oxt"),
        ("TimeSformer_divST_96x4_224_K400", "r1iuxahif3sgimo"),
        ("TimeSformer_divST_8x32_224_K600", "4h2qt41m2z3aqrb"),
        ("TimeSformer_divST_16x16_448_K600", "ft1e92g2vhvxecv"),
        ("TimeSformer_divST_96x4_224_K600", "857rx6xeclxfhdg"),
        ("TimeSformer_divST_8_224_SSv2", "tybhuml57y24wpm"),
        ("TimeSformer_divST_16_448_SSv2", "9t68uzk8w2fpfnv"),
        ("TimeSformer_divST_64_224_SSv2", "3f1rm2al8mhprwa"),
        ("TimeSformer_divST_8x32_224_HowTo100M", "9v8hcm88b9tc6ff"),
        ("TimeSformer_divST_32x32_224_HowTo100M", "4roflx4q1gscu85"),
        ("TimeSformer_divST_64x32_224_HowTo100M", "15bvqltl1j5vyp3"),
        ("TimeSformer_divST_96x32_224_HowTo100M", "t2mzgahnfhgakma"),
    ]
}

LogFn = Callable[[str], None]
_RETRYABLE = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
              TimeoutError, OSError)


def _print(msg: str) -> None:
    print(msg, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _total_from_content_range(value: Optional[str]) -> Optional[int]:
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def download_file(url: str, dest: os.PathLike, *, expected_size: Optional[int] = None,
                  sha256: Optional[str] = None, retries: int = 5, timeout: float = 60.0,
                  chunk_size: int = 1 << 20, backoff: float = 2.0, log: Optional[LogFn] = _print,
                  log_every: float = 10.0) -> Dict[str, Any]:
    """Fetch ``url`` into ``dest`` resumably (``dest.part`` + HTTP Range), verify, rename into place.

    Returns {path, status: "present" | "downloaded" | "resumed", bytes}. A present file of the
    expected size (any size when none is known) is skipped. Raises :class:`DownloadError` when the
    server sends a web page instead of the file, sizes or checksums disagree, or ``retries``
    attempts all fail.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        size = dest.stat().st_size
        if expected_size is None or size == expected_size:
            if sha256 is None or _sha256(dest) == sha256:
                return {"path": str(dest), "status": "present", "bytes": size}
        if expected_size is not None and size < expected_size and not part.exists():
            os.replace(dest, part)  # an earlier, cut-short copy: resume it
        else:
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    resumed = part.exists() and part.stat().st_size > 0
    total: Optional[int] = expected_size
    attempt, last_err = 0, ""
    t_start, last_log = time.monotonic(), 0.0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        if total is not None and offset == total:
            break
        if total is not None and offset > total:
            part.unlink()
            offset = 0
        req = urllib.request.Request(url, headers={"User-Agent": "hpc-jobs-diving/1"})
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                ctype = resp.headers.get("Content-Type", "")
                if ctype.startswith("text/html") and not dest.name.endswith((".html", ".htm")):
                    raise DownloadError(
                        f"{url} returned a web page, not {dest.name} (a share link without dl=1, a "
                        "login page or an exceeded quota). Fix the URL (--urls-file) or fetch the "
                        f"file by hand into {dest}.")
                if offset and resp.status == 206:
                    start = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
                    if not start or int(start.group(1)) != offset:
                        raise DownloadError(f"{url}: server answered range {offset}- with "
                                            f"{resp.headers.get('Content-Range')!r}")
                    total = _total_from_content_range(resp.headers.get("Content-Range")) or total
                    mode = "ab"
                else:  # 200: the whole file (the server ignores ranges, or we start afresh)
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else total
                    mode, resumed = "wb", False
                with open(part, mode) as fh:
                    while True:
                        block = resp.read(chunk_size)
                        if not block:
                            break
                        fh.write(block)
                        now = time.monotonic()
                        if log is not None and now - last_log >= log_every:
                            last_log = now
                            got = fh.tell()
                            rate = got / max(1e-6, now - t_start)
                            log(f"download: {dest.name} {_mb(got)}"
                                f"{'/' + _mb(total) if total else ''} ({_mb(rate)}/s)")
            size = part.stat().st_size
            if total is not None and size < total:
                raise ConnectionError(f"connection closed after {size} of {total} bytes")
            break
        except DownloadError:
            raise
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # nothing left to send: the part may already be whole
                total = _total_from_content_range(exc.headers.get("Content-Range")) or total
                if total is not None and offset == total:
                    break
                part.unlink()
                last_err = "HTTP 416 for a partial file; restarting"
            elif exc.code in (401, 403, 404, 410):
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}. The link is gone or private: put "
                                    f"a working one in --urls-file, or copy the file into {dest}.") from None
            else:
                last_err = f"HTTP {exc.code} {exc.reason}"
        except _RETRYABLE as exc:
            last_err = f"{type(exc).__name__}: {exc}"
        attempt += 1
        if attempt > retries:
            kept = _mb(part.stat().st_size if part.exists() else 0)
            raise DownloadError(f"{url}: failed after {retries} retries ({last_err}); {kept} kept in "
                                f"{part}: run the download again to resume.")
        if log is not None:
            log(f"download: {dest.name}: {last_err}; retry {attempt}/{retries}")
        time.sleep(min(backoff * attempt, 30.0))
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise DownloadError(f"{url}: got {size} bytes, expected {expected_size}; the partial file was "
                            "removed. Check the URL and download again.")
    if sha256 is not None and _sha256(part) != sha256:
        part.unlink()
        raise DownloadError(f"{url}: SHA-256 mismatch for {dest.name} (expected {sha256}); the file was "
                            "removed. Check the URL and download again.")
    os.replace(part, dest)
    return {"path": str(dest), "status": "resumed" if resumed else "downloaded", "bytes": size}


def read_urls_file(path: os.PathLike) -> Dict[str, str]:
    """Lines ``relative/path URL`` (blank lines and ``#`` comments ignored)."""
    out: Dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DownloadError(f"{path}:{n}: expected 'relative/path URL', got {line!r}")
        out[parts[0]] = parts[1]
    return out


def checkpoint_path(name: str, checkpoint_dir: os.PathLike) -> Path:
    stem = name[:-5] if name.endswith(".pyth") else name
    return Path(checkpoint_dir) / f"{stem}.pyth"


def plan_downloads(videos: Any = "all", *, annotations: bool = True, checkpoint: Optional[str] = None,
                   urls: Optional[Mapping[str, str]] = None, base_url: Optional[str] = None
                   ) -> List[Dict[str, Any]]:
    """What :func:`download_dataset` would fetch: [{rel, url, size, sha256}] (no network)."""
    items: List[Dict[str, Any]] = []
    if annotations:
        for rel, (url, size, digest) in ANNOTATION_FILES.items():
            items.append({"rel": rel, "url": url, "size": size, "sha256": digest})
    for v in parse_videos(videos) or VIDEO_NUMS:
        rel = f"whole_videos/{v:02d}.mp4"
        if rel not in VIDEO_URLS and not (urls and rel in urls) and not base_url:
            raise DownloadError(f"video {v:02d} is not one of MTL-AQA's ({', '.join(f'{n:02d}' for n in VIDEO_NUMS)})")
        items.append({"rel": rel, "url": VIDEO_URLS.get(rel), "size": None, "sha256": None})
    if checkpoint:
        stem = checkpoint[:-5] if checkpoint.endswith(".pyth") else checkpoint
        if stem not in CHECKPOINT_URLS and not (urls and f"checkpoints/{stem}.pyth" in urls) and not base_url:
            raise DownloadError(f"checkpoint {checkpoint!r} is unknown; choose one of "
                                f"{', '.join(CHECKPOINT_URLS)}")
        items.append({"rel": f"checkpoints/{stem}.pyth", "url": CHECKPOINT_URLS.get(stem), "size": None,
                      "sha256": None})
    for item in items:
        if base_url:
            item["url"] = f"{base_url.rstrip('/')}/{item['rel']}"
            item["sha256"] = item["sha256"] if item["rel"] in ANNOTATION_FILES else None
        if urls and item["rel"] in urls:
            item["url"] = urls[item["rel"]]
    return items


def download_dataset(root: os.PathLike, *, videos: Any = "all", annotations: bool = True,
                     checkpoint: Optional[str] = None, checkpoint_dir: Optional[os.PathLike] = None,
                     urls: Optional[Mapping[str, str]] = None, base_url: Optional[str] = None,
                     no_network: bool = False, retries: int = 5, timeout: float = 60.0,
                     log: Optional[LogFn] = _print) -> Dict[str, Any]:
    """Bring the real MTL-AQA files into ``root`` (see the module doc); return a report.

    Report: {root, files: [{rel, path, status, bytes}], downloaded, present, missing}. With
    ``no_network`` nothing is fetched and missing files raise :class:`DownloadError` listing them.
    ``checkpoint`` (e.g. ``TimeSformer_divST_8x32_224_K400``) goes to ``checkpoint_dir``
    (default ``root/checkpoints``).
    """
    root = Path(root)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else root / "checkpoints"
    items = plan_downloads(videos, annotations=annotations, checkpoint=checkpoint, urls=urls,
                           base_url=base_url)
    files: List[Dict[str, Any]] = []
    missing: List[str] = []
    for item in items:
        dest = (ckpt_dir / Path(item["rel"]).name) if item["rel"].startswith("checkpoints/") else root / item["rel"]
        if no_network:
            ok = dest.is_file() and (item["size"] is None or dest.stat().st_size == item["size"])
            files.append({"rel": item["rel"], "path": str(dest), "status": "present" if ok else "missing",
                          "bytes": dest.stat().st_size if dest.is_file() else 0})
            if not ok:
                missing.append(str(dest))
            continue
        if item["url"] is None:
            raise DownloadError(f"no URL for {item['rel']}: give one with --urls-file or --base-url")
        if log is not None and not dest.is_file():
            log(f"download: {item['rel']} <- {item['url']}")
        res = download_file(item["url"], dest, expected_size=item["size"], sha256=item["sha256"],
                            retries=retries, timeout=timeout, log=log)
        if item["rel"].endswith(".mp4") and res["status"] != "present":
            with open(dest, "rb") as fh:
                head = fh.read(12)
            if head[4:8] != b"ftyp":
                bad = dest.with_name(dest.name + ".not-mp4")
                os.replace(dest, bad)
                raise DownloadError(f"{item['url']} did not send an mp4 (saved as {bad} for a look); "
                                    "fix the URL and download again.")
        files.append({"rel": item["rel"], **res})
    if missing:
        raise DownloadError(
            f"no network (--no-network): {len(missing)} file(s) missing: {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''}. Download them on a login node (python -m "
            f"data.diving.download {root}) or copy them there; or run the workflow on synthetic data.")
    report = {"root": str(root), "files": files,
              "downloaded": sum(f["status"] in ("downloaded", "resumed") for f in files),
              "present": sum(f["status"] == "present" for f in files), "missing": missing}
    if log is not None:
        log(f"download: {report['downloaded']} downloaded, {report['present']} already present -> {root}")
    return report


def _main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m data.diving.download", description=__doc__.split("\n")[0])
    ap.add_argument("root", help="data root: whole_videos/ and the annotation pickles go here")
    ap.add_argument("--videos", nargs="+", default=["all"])
    ap.add_argument("--checkpoint", default=None, help=f"one of: {', '.join(CHECKPOINT_URLS)}")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--base-url", default=None, help="a mirror holding the data root's layout")
    ap.add_argument("--urls-file", default=None, help="lines 'relative/path URL' overriding the defaults")
    ap.add_argument("--no-annotations", action="store_true")
    ap.add_argument("--no-network", action="store_true", help="only check what is present")
    args = ap.parse_args(argv)
    try:
        download_dataset(args.root, videos=args.videos, annotations=not args.no_annotations,
                         checkpoint=args.checkpoint, checkpoint_dir=args.checkpoint_dir,
                         urls=read_urls_file(args.urls_file) if args.urls_file else None,
                         base_url=args.base_url, no_network=args.no_network)
    except DownloadError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
