"""Decode only the annotated frames of the MTL-AQA videos into ``whole_videos_frames/NN/%06d.jpg``.

The seed ran ``ffmpeg -i NN.mp4 NN/%06d.jpg`` on every video (about 1.5 million JPEGs for the real
set), then deleted the ~90% that no clip uses. Here each video is read once with OpenCV: frames no
clip needs are only ``grab()``-ed (demuxed and decoded, never converted or encoded), the needed ones
are ``retrieve()``-d and written as JPEG. Videos run in parallel over the job's CPUs.

Layout and numbering match the seed's: ``whole_videos_frames/NN/000123.jpg`` is the video's 123rd
frame (ffmpeg numbers its output from 1), which is what the annotations' start_frame/end_frame
refer to. (For variable-frame-rate files ffmpeg's default constant-rate output may duplicate or drop
frames; MTL-AQA's videos are constant-rate, and so are the synthetic ones.)

Guarantees:
* idempotent: a video whose frames were all written gets ``NN/.done.json`` (written atomically after
  its frames); the next run skips it without touching a file;
* atomic: every JPEG is written to a hidden temporary name and renamed, so a killed job leaves only
  complete frames (and stray temporaries, removed on the next run);
* a missing, corrupt or truncated video is named in ``extract_report.json`` and the run fails with
  :class:`ExtractError` (after finishing every other video); with ``allow_missing=True`` those
  videos are skipped and the report says so. Frames already written are never deleted.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from hpc_jobs.fsutil import atomic_write_bytes, atomic_write_json, read_json
from .annotations import (Annotations, check_videos_annotated, frames_by_video, load_annotations,
                          parse_videos)
from .errors import ExtractError

DONE_MARKER = ".done.json"
REPORT_NAME = "extract_report.json"
_NUMBERING = "ffmpeg-1-based"  # part of the done-marker signature: change it and everything re-extracts

ProgressFn = Callable[[int, int], None]
LogFn = Callable[[str], None]


def default_workers() -> int:
    """CPUs this job may use: ``SLURM_CPUS_PER_TASK`` inside a Slurm job, else the affinity mask."""
    env = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def frame_name(frame_number: int) -> str:
    """``000123.jpg`` for frame 123 (1-based, as ffmpeg's ``%06d.jpg``)."""
    return f"{frame_number:06d}.jpg"


def video_frames_dir(frames_dir: os.PathLike, video: int) -> Path:
    return Path(frames_dir) / f"{video:02d}"


def is_video_done(frames_dir: os.PathLike, video: int) -> bool:
    """True when the video's done-marker is present (all its annotated frames were written)."""
    return (video_frames_dir(frames_dir, video) / DONE_MARKER).is_file()


def done_videos(frames_dir: os.PathLike) -> List[int]:
    """Video numbers whose frames are complete (done-marker present)."""
    root = Path(frames_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / DONE_MARKER).is_file())


@dataclass
class _VideoJob:
    video: int
    src: str
    out_dir: str
    frames: List[int]          # 1-based frame numbers the clips need, sorted
    to_write: List[int]        # those to write now (all, or the ones someone deleted)
    signature: str
    resize_short_side: Optional[int]
    jpeg_quality: int
    seek_gap: Optional[int]
    decoder_threads: Optional[int]


def _signature(frames: Sequence[int], video_size: int, resize_short_side: Optional[int],
               jpeg_quality: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_NUMBERING, video_size, resize_short_side, jpeg_quality]).encode())
    h.update(memoryview(bytes(json.dumps(list(frames)), "ascii")))
    return h.hexdigest()[:32]


# ---------------------------------------------------------------- worker side (one video per call)
_progress_queue = None


def _set_queue(q) -> None:
    global _progress_queue
    _progress_queue = q


def _init_worker(q) -> None:
    _set_queue(q)
    try:
        import cv2

        cv2.setNumThreads(1)  # one process per CPU already: no nested thread pools
    except Exception:  # pragma: no cover
        pass


def _post(video: int, n: int) -> None:
    if _progress_queue is not None and n:
        try:
            _progress_queue.put_nowait((video, n))
        except Exception:  # pragma: no cover - progress is best effort
            pass


def _resize(frame, short_side: Optional[int]):
    if not short_side:
        return frame
    import cv2

    h, w = frame.shape[:2]
    s = min(h, w)
    if s <= short_side:
        return frame  # never upscale
    scale = short_side / s
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def _extract_video(job: _VideoJob) -> Dict[str, Any]:
    """Decode one video, write the requested frames; return its report entry (never raises)."""
    import cv2

    t0 = time.perf_counter()
    out = Path(job.out_dir)
    entry: Dict[str, Any] = {"video": f"{job.video:02d}", "source": job.src, "frames_needed": len(job.frames),
                             "frames_written": 0}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp-*"):  # temporaries of a killed run: incomplete by definition
            stale.unlink(missing_ok=True)
        (out / DONE_MARKER).unlink(missing_ok=True)
        wanted = job.to_write
        params: List[int] = []
        if job.decoder_threads and hasattr(cv2, "CAP_PROP_N_THREADS"):
            params = [cv2.CAP_PROP_N_THREADS, int(job.decoder_threads)]
        cap = cv2.VideoCapture(job.src, cv2.CAP_FFMPEG, params) if params else cv2.VideoCapture(job.src)
        if not cap.isOpened():
            entry.update(status="corrupt", error=f"OpenCV cannot open {job.src} (corrupt, truncated or "
                                                 "not a video)")
            return entry
        quality = [cv2.IMWRITE_JPEG_QUALITY, int(job.jpeg_quality)]
        pos = 0  # 0-based index of the next frame the decoder will return; file number = pos + 1
        written, pending, last_post = 0, 0, time.monotonic()
        try:
            for number in wanted:
                target = number - 1
                if job.seek_gap is not None and target - pos > job.seek_gap:
                    cap.set(cv2.CAP_PROP_POS_FRAMES, target)
                    pos = int(round(cap.get(cv2.CAP_PROP_POS_FRAMES)))
                    if pos != target:
                        entry.update(status="error", error=f"seek to frame {number} landed on frame "
                                                           f"{pos + 1}; extract without seek_gap")
                        return entry
                while pos < target:
                    if not cap.grab():
                        break
                    pos += 1
                ok = pos == target and cap.grab()
                frame = cap.retrieve()[1] if ok else None
                if frame is None:
                    entry.update(status="corrupt", error=(
                        f"the video stream ends or breaks at frame {pos + 1}, but its clips need frames up "
                        f"to {job.frames[-1]} (truncated or corrupt file)"))
                    return entry
                pos += 1
                ok, buf = cv2.imencode(".jpg", _resize(frame, job.resize_short_side), quality)
                if not ok:
                    raise RuntimeError(f"JPEG encoding failed for frame {number}")
                atomic_write_bytes(out / frame_name(number), buf.tobytes(), mode=None, fsync=False)
                written += 1
                pending += 1
                now = time.monotonic()
                if now - last_post > 0.25:
                    _post(job.video, pending)
                    pending, last_post = 0, now
        finally:
            cap.release()
            _post(job.video, pending)
            entry["frames_written"] = written
        done = {"video": f"{job.video:02d}", "frames": len(job.frames), "first": job.frames[0],
                "last": job.frames[-1], "signature": job.signature,
                "resize_short_side": job.resize_short_side, "jpeg_quality": job.jpeg_quality}
        atomic_write_json(out / DONE_MARKER, done, mode=None)
        entry.update(status="extracted")
        return entry
    except Exception as exc:  # disk full, permissions...: reported, never lost silently
        entry.update(status="error", error=f"{type(exc).__name__}: {exc}")
        return entry
    finally:
        entry["seconds"] = round(time.perf_counter() - t0, 3)


# ---------------------------------------------------------------- driver
@dataclass
class _Progress:
    total_frames: int
    total_videos: int
    log: Optional[LogFn]
    progress: Optional[ProgressFn]
    log_every: float
    done_frames: int = 0
    done_videos: int = 0
    t0: float = field(default_factory=time.perf_counter)
    _last_log: float = 0.0
    _last_cb: float = 0.0

    def rate(self) -> float:
        return self.done_frames / max(1e-9, time.perf_counter() - self.t0)

    def line(self) -> str:
        return (f"extract: {self.done_videos}/{self.total_videos} videos, {self.done_frames}/"
                f"{self.total_frames} frames, {self.rate():.0f} frames/s")

    def tick(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.progress is not None and (force or now - self._last_cb >= 1.0):
            self._last_cb = now
            self.progress(self.done_frames, self.total_frames)
        if self.log is not None and (force or now - self._last_log >= self.log_every):
            self._last_log = now
            self.log(self.line())


def _print(msg: str) -> None:
    print(msg, flush=True)


def extract_frames(root: os.PathLike, annotations: Optional[Annotations] = None, *,
                   videos: Any = "all", videos_dir: Optional[os.PathLike] = None,
                   frames_dir: Optional[os.PathLike] = None, workers: Optional[int] = None,
                   allow_missing: bool = False, resize_short_side: Optional[int] = None,
                   jpeg_quality: int = 95, seek_gap: Optional[int] = None,
                   decoder_threads: Optional[int] = None,
                   progress: Optional[ProgressFn] = None, log: Optional[LogFn] = _print,
                   log_every: float = 5.0) -> Dict[str, Any]:
    """Write the annotated frames of every video; return the report (also saved as JSON).

    root: the data root (``whole_videos/``, ``final_annotations_dict.pkl``); frames go to
    ``frames_dir`` (default ``root/whole_videos_frames``). ``annotations`` defaults to the root's
    annotation file; ``videos`` is the seed's argument ("all" or video numbers). ``workers``
    defaults to :func:`default_workers`; 1 runs in this process. ``resize_short_side`` shrinks
    frames whose short side is larger (default: keep the original resolution). ``seek_gap`` (off by
    default) seeks instead of grabbing over gaps longer than that many frames: faster on long
    videos, but it trusts the container's timestamps. ``progress(done_frames, total_frames)`` is
    called about once a second (a heartbeat hook); ``log`` gets a progress line every
    ``log_every`` seconds.

    Report keys: status ("ok", "ok_with_skipped" or "failed"), videos (per video: status
    "extracted", "already_done", "missing", "corrupt" or "error", frames_needed, frames_written,
    seconds, error, skipped), failed (video names), frames_written, seconds, frames_per_s, workers.
    Raises :class:`ExtractError` when a video failed and ``allow_missing`` is false.
    """
    t0 = time.perf_counter()
    root = Path(root)
    videos_dir = Path(videos_dir) if videos_dir is not None else root / "whole_videos"
    frames_dir = Path(frames_dir) if frames_dir is not None else root / "whole_videos_frames"
    if annotations is None:
        annotations = load_annotations(root / "final_annotations_dict.pkl")
    selected = parse_videos(videos)
    check_videos_annotated(selected, annotations)
    needed = frames_by_video(annotations, selected)
    frames_dir.mkdir(parents=True, exist_ok=True)

    entries: Dict[str, Dict[str, Any]] = {}
    jobs: List[_VideoJob] = []
    for video, frames in needed.items():
        name = f"{video:02d}"
        src = videos_dir / f"{name}.mp4"
        out = video_frames_dir(frames_dir, video)
        if not src.is_file():
            entries[name] = {"video": name, "source": str(src), "status": "missing", "frames_needed": len(frames),
                             "frames_written": 0, "error": f"{src} does not exist"}
            continue
        sig = _signature(frames, src.stat().st_size, resize_short_side, jpeg_quality)
        marker = read_json(out / DONE_MARKER, corrupt_ok=True)
        to_write = frames
        if isinstance(marker, dict) and marker.get("signature") == sig:
            present = set(os.listdir(out))
            to_write = [f for f in frames if frame_name(f) not in present]
            if not to_write:
                entries[name] = {"video": name, "source": str(src), "status": "already_done",
                                 "frames_needed": len(frames), "frames_written": 0}
                continue
            # else someone deleted frames: rewrite just those
        jobs.append(_VideoJob(video, str(src), str(out), frames, to_write, sig, resize_short_side,
                              jpeg_quality, seek_gap, decoder_threads))

    n_workers = max(1, min(workers or default_workers(), len(jobs) or 1))
    total = sum(len(j.to_write) for j in jobs)
    prog = _Progress(total, len(needed), log, progress, log_every)
    prog.done_videos = sum(1 for e in entries.values() if e["status"] == "already_done")
    if log is not None:
        log(f"extract: {len(needed)} videos, {len(jobs)} to decode ({total} frames), "
            f"{prog.done_videos} already done, {len(needed) - len(jobs) - prog.done_videos} missing; "
            f"{n_workers} worker(s) -> {frames_dir}")
    jobs.sort(key=lambda j: -j.to_write[-1])  # longest decode first: better balance over the workers

    def finished(entry: Dict[str, Any]) -> None:
        entries[entry["video"]] = entry
        if entry["status"] == "extracted":
            prog.done_videos += 1
        elif log is not None:
            log(f"extract: video {entry['video']} {entry['status']}: {entry.get('error', '')}")
        prog.tick(force=True)

    if n_workers == 1 or len(jobs) <= 1:
        q: Any = queue_mod.SimpleQueue()
        _set_queue(q)
        try:
            for job in jobs:
                entry = _extract_video(job)
                while not q.empty():
                    prog.done_frames += q.get()[1]
                finished(entry)
        finally:
            _set_queue(None)
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        q = ctx.Queue()
        with cf.ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker,
                                    initargs=(q,)) as pool:
            futures = {pool.submit(_extract_video, j): j for j in jobs}
            pending = set(futures)
            while pending:
                done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                while True:
                    try:
                        prog.done_frames += q.get_nowait()[1]
                    except queue_mod.Empty:
                        break
                for fut in done:
                    job = futures[fut]
                    try:
                        entry = fut.result()
                    except Exception as exc:  # a worker died (killed, out of memory)
                        entry = {"video": f"{job.video:02d}", "source": job.src, "status": "error",
                                 "frames_needed": len(job.frames), "frames_written": 0,  # unknown
                                 "error": f"worker failed: {type(exc).__name__}: {exc}"}
                    finished(entry)
                prog.tick()
        while True:  # what the workers posted last (their queues are flushed when they exit)
            try:
                prog.done_frames += q.get_nowait()[1]
            except (queue_mod.Empty, OSError, ValueError):
                break

    failed = sorted(k for k, e in entries.items() if e["status"] not in ("extracted", "already_done"))
    for name in failed:
        entries[name]["skipped"] = bool(allow_missing)
    written = sum(e.get("frames_written", 0) for e in entries.values())
    seconds = time.perf_counter() - t0
    report = {
        "status": "failed" if failed and not allow_missing else ("ok_with_skipped" if failed else "ok"),
        "allow_missing": bool(allow_missing), "videos_dir": str(videos_dir), "frames_dir": str(frames_dir),
        "workers": n_workers, "failed": failed, "frames_written": written,
        "seconds": round(seconds, 3), "frames_per_s": round(written / seconds, 1) if seconds > 0 else 0.0,
        "resize_short_side": resize_short_side, "jpeg_quality": jpeg_quality,
        "videos": {k: entries[k] for k in sorted(entries)},
    }
    atomic_write_json(frames_dir / REPORT_NAME, report, mode=None, indent=2)
    prog.done_frames = max(prog.done_frames, written)
    if progress is not None:
        progress(prog.done_frames, prog.total_frames)
    if failed:
        details = "; ".join(f"{n} ({entries[n]['status']}: {entries[n].get('error', '')})" for n in failed)
        if not allow_missing:
            raise ExtractError(
                f"{len(failed)} of {len(needed)} videos could not be extracted: {details}. Download them "
                f"again into {videos_dir}, or skip them with --set data.allow_missing=true (their clips "
                f"are then left out). Frames already extracted were kept; report: "
                f"{frames_dir / REPORT_NAME}")
        if log is not None:
            log(f"extract: skipped {len(failed)} video(s) (allow_missing): {details}")
    if log is not None:
        log(f"extract: done: {written} frames written in {seconds:.1f} s "
            f"({report['frames_per_s']:.0f} frames/s), {len(entries) - len(failed)}/{len(needed)} videos ready")
    return report


def extract_with_ffmpeg_baseline(root: os.PathLike, annotations: Optional[Annotations] = None, *,
                                 videos: Any = "all", videos_dir: Optional[os.PathLike] = None,
                                 frames_dir: Optional[os.PathLike] = None, ffmpeg: str = "ffmpeg",
                                 log: Optional[LogFn] = _print) -> Dict[str, Any]:
    """The seed's method, for benchmarks: per video, ``ffmpeg -i NN.mp4 NN/%06d.jpg`` writes every
    frame, then the frames no clip uses are deleted. Same output layout as :func:`extract_frames`
    (no done-markers). Returns {seconds, frames_decoded, frames_kept, frames_per_s (kept/s)}."""
    exe = shutil.which(ffmpeg)
    if exe is None:
        raise ExtractError(f"{ffmpeg} not found on PATH: install ffmpeg (apt-get install ffmpeg, or "
                           "`module load ffmpeg` on the cluster) to run the baseline")
    t0 = time.perf_counter()
    root = Path(root)
    videos_dir = Path(videos_dir) if videos_dir is not None else root / "whole_videos"
    frames_dir = Path(frames_dir) if frames_dir is not None else root / "whole_videos_frames"
    if annotations is None:
        annotations = load_annotations(root / "final_annotations_dict.pkl")
    needed = frames_by_video(annotations, parse_videos(videos))
    decoded = kept = 0
    for video, frames in needed.items():
        out = video_frames_dir(frames_dir, video)
        out.mkdir(parents=True, exist_ok=True)
        src = videos_dir / f"{video:02d}.mp4"
        proc = subprocess.run([exe, "-nostdin", "-loglevel", "error", "-y", "-i", str(src),
                               str(out / "%06d.jpg")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExtractError(f"ffmpeg failed on {src}: {proc.stderr.strip()[-500:]}")
        keep = {frame_name(f) for f in frames}
        for name in os.listdir(out):
            if name.endswith(".jpg"):
                decoded += 1
                if name in keep:
                    kept += 1
                else:
                    os.remove(out / name)
        if log is not None:
            log(f"ffmpeg baseline: video {video:02d}: kept {len(keep)} frames")
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "frames_decoded": decoded, "frames_kept": kept,
            "frames_per_s": round(kept / seconds, 1) if seconds > 0 else 0.0}


def read_report(frames_dir: os.PathLike) -> Optional[Dict[str, Any]]:
    """The last ``extract_report.json`` under ``frames_dir`` (None if there is none)."""
    return read_json(Path(frames_dir) / REPORT_NAME, corrupt_ok=True)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m data.diving.extract",
                                 description="Extract the annotated frames of the MTL-AQA videos.")
    ap.add_argument("root", help="data root holding whole_videos/ and final_annotations_dict.pkl")
    ap.add_argument("--videos", nargs="+", default=["all"])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--allow-missing", action="store_true")
    ap.add_argument("--resize-short-side", type=int, default=None)
    ap.add_argument("--ffmpeg-baseline", metavar="FRAMES_DIR", default=None,
                    help="run the seed's ffmpeg method into FRAMES_DIR instead")
    args = ap.parse_args(argv)
    try:
        if args.ffmpeg_baseline:
            print(json.dumps(extract_with_ffmpeg_baseline(args.root, videos=args.videos,
                                                          frames_dir=args.ffmpeg_baseline)))
        else:
            extract_frames(args.root, videos=args.videos, workers=args.workers,
                           allow_missing=args.allow_missing, resize_short_side=args.resize_short_side)
    except ExtractError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
