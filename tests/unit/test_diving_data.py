"""The diving data package: safe pickles, synthetic set, frame extraction, dataset, download."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from data.diving import annotations as ann_mod
from data.diving import download as dl
from data.diving import extract as ex
from data.diving import synthetic
from data.diving.errors import (AnnotationError, DownloadError, ExtractError, FramesMissingError)


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny synthetic set (3 videos x 6 clips), generated once; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("diving") / "data"
    synthetic.generate(root, preset="tiny", seed=3)
    return root


@pytest.fixture(scope="module")
def tiny_extracted(tmp_path_factory, tiny_root) -> Path:
    root = tmp_path_factory.mktemp("diving_x") / "data"
    shutil.copytree(tiny_root, root)
    ex.extract_frames(root, workers=1, log=None)
    return root


@pytest.fixture
def fresh(tmp_path, tiny_root) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    return root


def _mtimes(d: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.iterdir())}


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(np.asarray(a, float))).astype(float)
    rb = np.argsort(np.argsort(np.asarray(b, float))).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


# ------------------------------------------------------------------------- restricted unpickler
class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_unpickler_accepts_the_synthetic_pickles(tiny_root):
    a = ann_mod.load_annotations(tiny_root / "final_annotations_dict.pkl")
    train = ann_mod.load_split(tiny_root / "train_split_0.pkl", a)
    test = ann_mod.load_split(tiny_root / "test_split_0.pkl", a)
    assert len(a) == 18 and len(train) + len(test) == 18 and not set(train) & set(test)
    value = next(iter(a.values()))
    assert set(value) == set(ann_mod.REQUIRED_FIELDS)
    # sets/frozensets pickled the old way (a call to the builtin) are plain data too
    path = tiny_root.parent / "sets.pkl"
    path.write_bytes(pickle.dumps({"s": {1, 2}, "f": frozenset({3})}, protocol=2))
    assert ann_mod.safe_load_pickle(path) == {"s": {1, 2}, "f": frozenset({3})}


def test_unpickler_refuses_code(tmp_path):
    evil = tmp_path / "final_annotations_dict.pkl"
    evil.write_bytes(pickle.dumps({(1, 1): _System()}))
    with pytest.raises(AnnotationError) as err:
        ann_mod.load_annotations(evil)
    msg = str(err.value)
    assert str(evil) in msg and ("posix.system" in msg or "os.system" in msg)
    # a class from numpy is refused as well: the real files need no global at all
    np_pickle = tmp_path / "np.pkl"
    np_pickle.write_bytes(pickle.dumps({(1, 1): np.float64(3.0)}))
    with pytest.raises(AnnotationError, match="numpy"):
        ann_mod.safe_load_pickle(np_pickle)


@pytest.mark.parametrize("obj, fragment", [
    ([1, 2, 3], "expected a dict"),
    ({(1, 1): {"start_frame": 1}}, "missing field"),
    ({"01-1": {}}, "not a (video_num, clip_idx) pair"),
    ({(1, 1): dict(primary_view=0, start_frame=50, end_frame=10, position=0, difficulty=2.0, armstand=0,
                   rotation_type=0, ss_no=1, tw_no=0, final_score=40.0)}, "start_frame 50 > end_frame 10"),
    ({(1, 1): dict(primary_view=0, start_frame="5", end_frame=10, position=0, difficulty=2.0, armstand=0,
                   rotation_type=0, ss_no=1, tw_no=0, final_score=40.0)}, "wrong type"),
])
def test_malformed_annotations_are_refused(tmp_path, obj, fragment):
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=3))
    with pytest.raises(AnnotationError) as err:
        ann_mod.load_annotations(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_garbage_and_truncated_pickles_are_refused(tmp_path, tiny_root):
    garbage = tmp_path / "g.pkl"
    garbage.write_bytes(b"\x00not a pickle at all")
    with pytest.raises(AnnotationError, match="not a readable pickle"):
        ann_mod.load_annotations(garbage)
    truncated = tmp_path / "t.pkl"
    truncated.write_bytes((tiny_root / "final_annotations_dict.pkl").read_bytes()[:200])
    with pytest.raises(AnnotationError, match="truncated or corrupt"):
        ann_mod.load_annotations(truncated)
    with pytest.raises(AnnotationError, match="file not found"):
        ann_mod.load_annotations(tmp_path / "nope.pkl")


def test_split_naming_unknown_clips_fails_clearly(tmp_path, tiny_root):
    a = ann_mod.load_annotations(tiny_root / "final_annotations_dict.pkl")
    split = tmp_path / "train_split_0.pkl"
    split.write_bytes(pickle.dumps([(1, 1), (9, 99)], protocol=3))
    with pytest.raises(AnnotationError) as err:
        ann_mod.load_split(split, a, "final_annotations_dict.pkl")
    assert "(9, 99)" in str(err.value) and "different releases" in str(err.value)
    split.write_bytes(pickle.dumps([(1, 1), (1, 1)], protocol=3))
    with pytest.raises(AnnotationError, match="listed twice"):
        ann_mod.load_split(split, a)


# ----------------------------------------------------------------------------- synthetic set
def test_generator_writes_the_real_layout_deterministically(tmp_path, tiny_root):
    names = sorted(p.name for p in (tiny_root / "whole_videos").iterdir())
    assert names == ["01.mp4", "02.mp4", "03.mp4"]
    for f in ("final_annotations_dict.pkl", "train_split_0.pkl", "test_split_0.pkl", "README.txt"):
        assert (tiny_root / f).is_file()
    assert synthetic.is_synthetic(tiny_root) and "NOT the MTL-AQA" in (tiny_root / "README.txt").read_text()
    again = synthetic.generate(tmp_path / "again", preset="tiny", seed=3)
    assert again["clips"] == 18
    for rel in ["final_annotations_dict.pkl", "train_split_0.pkl", "test_split_0.pkl"] + \
               [f"whole_videos/{n}" for n in names]:
        assert (tmp_path / "again" / rel).read_bytes() == (tiny_root / rel).read_bytes(), rel
    other = synthetic.generate(tmp_path / "other", preset="tiny", seed=4)
    assert (tmp_path / "other" / "final_annotations_dict.pkl").read_bytes() != \
        (tiny_root / "final_annotations_dict.pkl").read_bytes()
    assert other["reused"] is False
    assert synthetic.generate(tmp_path / "other", preset="tiny", seed=4)["reused"] is True
    # an interrupted generation (marker says incomplete) is redone, not refused nor reused
    info = json.loads((tmp_path / "other" / synthetic.MARKER).read_text())
    (tmp_path / "other" / synthetic.MARKER).write_text(json.dumps({**info, "complete": False}))
    (tmp_path / "other" / "whole_videos" / "02.mp4").unlink()
    redone = synthetic.generate(tmp_path / "other", preset="tiny", seed=4)
    assert redone["reused"] is False and (tmp_path / "other" / "whole_videos" / "02.mp4").is_file()
    a = ann_mod.load_annotations(tiny_root / "final_annotations_dict.pkl")
    for v in a.values():
        assert 1.5 <= v["difficulty"] <= 4.1 and 0 <= v["final_score"] <= 104.5
        judges = v["final_score"] / v["difficulty"]
        assert abs(judges * 2 - round(judges * 2)) < 1e-6  # difficulty x (sum of 3 marks, 0.5 steps)


def test_generator_refuses_to_overwrite_real_data(tmp_path):
    (tmp_path / "whole_videos").mkdir()
    with pytest.raises(Exception, match="real MTL-AQA"):
        synthetic.generate(tmp_path, preset="tiny")
    assert not synthetic.is_synthetic(tmp_path)


# --------------------------------------------------------------------------------- extraction
def test_extraction_writes_exactly_the_annotated_frames(fresh):
    a = ann_mod.load_annotations(fresh / "final_annotations_dict.pkl")
    calls, lines = [], []
    report = ex.extract_frames(fresh, workers=2, progress=lambda d, t: calls.append((d, t)),
                               log=lines.append, log_every=0.0)
    assert report["status"] == "ok" and report["workers"] == 2
    for video, frames in ann_mod.frames_by_video(a).items():
        d = fresh / "whole_videos_frames" / f"{video:02d}"
        assert sorted(p.name for p in d.glob("*.jpg")) == [f"{f:06d}.jpg" for f in frames]
        assert not list(d.glob(".*.tmp-*")) and (d / ex.DONE_MARKER).is_file()
    total = sum(len(f) for f in ann_mod.frames_by_video(a).values())
    assert report["frames_written"] == total and calls[-1] == (total, total)
    assert any(line.startswith("extract: 3/3 videos") and "frames/s" in line for line in lines)
    saved = json.loads((fresh / "whole_videos_frames" / ex.REPORT_NAME).read_text())
    assert saved["status"] == "ok" and set(saved["videos"]) == {"01", "02", "03"}
    # idempotent: the second run skips every video and touches no file
    before = {v: _mtimes(fresh / "whole_videos_frames" / v) for v in ("01", "02", "03")}
    again = ex.extract_frames(fresh, workers=2, log=None)
    assert again["frames_written"] == 0
    assert {e["status"] for e in again["videos"].values()} == {"already_done"}
    assert before == {v: _mtimes(fresh / "whole_videos_frames" / v) for v in ("01", "02", "03")}
    # a deleted frame is noticed and rewritten, the others stay untouched
    victim = sorted((fresh / "whole_videos_frames" / "02").glob("*.jpg"))[3]
    victim.unlink()
    third = ex.extract_frames(fresh, workers=1, log=None)
    assert third["frames_written"] == 1 and victim.is_file()


def test_extraction_matches_frame_numbers_of_a_plain_decode(tiny_extracted):
    import cv2

    a = ann_mod.load_annotations(tiny_extracted / "final_annotations_dict.pkl")
    cap = cv2.VideoCapture(str(tiny_extracted / "whole_videos" / "01.mp4"))
    decoded = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        decoded.append(frame.astype(np.int16))
    clip = a[(1, 2)]
    for number in (clip["start_frame"], clip["end_frame"]):
        jpg = cv2.imread(str(tiny_extracted / "whole_videos_frames" / "01" / f"{number:06d}.jpg")).astype(np.int16)
        errors = [np.abs(jpg - decoded[i]).mean() for i in range(len(decoded))]
        assert int(np.argmin(errors)) == number - 1  # file N = the video's N-th frame (1-based)


def test_corrupt_and_missing_videos_are_reported_and_nothing_is_lost(fresh):
    ex.extract_frames(fresh, videos=["01"], workers=1, log=None)  # video 01 done earlier
    before = _mtimes(fresh / "whole_videos_frames" / "01")
    (fresh / "whole_videos" / "02.mp4").write_bytes(os.urandom(5000))  # garbage
    (fresh / "whole_videos" / "03.mp4").unlink()  # missing
    with pytest.raises(ExtractError) as err:
        ex.extract_frames(fresh, workers=2, log=None)
    msg = str(err.value)
    assert "02 (corrupt" in msg and "03 (missing" in msg and "data.allow_missing=true" in msg
    report = ex.read_report(fresh / "whole_videos_frames")
    assert report["status"] == "failed" and report["failed"] == ["02", "03"]
    assert report["videos"]["01"]["status"] == "already_done"
    assert _mtimes(fresh / "whole_videos_frames" / "01") == before
    # allow_missing: the run succeeds and the report says what was skipped
    ok = ex.extract_frames(fresh, workers=1, allow_missing=True, log=None)
    assert ok["status"] == "ok_with_skipped" and ok["failed"] == ["02", "03"]
    assert ok["videos"]["02"]["skipped"] is True and ex.done_videos(fresh / "whole_videos_frames") == [1]


def test_truncated_video_keeps_frames_written_before_the_break(fresh):
    src = fresh / "whole_videos" / "02.mp4"
    data = src.read_bytes()
    # keep the header and cut the stream: the file may not even open, or end early
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExtractError, match="02 \\(corrupt"):
        ex.extract_frames(fresh, videos="02", workers=1, log=None)
    assert not (fresh / "whole_videos_frames" / "02" / ex.DONE_MARKER).exists()


def test_clip_beyond_the_end_of_its_video_is_reported(fresh):
    a = ann_mod.load_annotations(fresh / "final_annotations_dict.pkl")
    last = max((k for k in a if k[0] == 3), key=lambda k: a[k]["end_frame"])
    a[last]["end_frame"] += 500  # the video ends long before that
    with pytest.raises(ExtractError, match="ends or breaks at frame"):
        ex.extract_frames(fresh, annotations=a, videos=[3], workers=1, log=None)
    d = fresh / "whole_videos_frames" / "03"
    assert len(list(d.glob("*.jpg"))) > 0 and not (d / ex.DONE_MARKER).exists()  # partial work kept


def test_preflight_video_check_finds_damage_without_decoding(fresh):
    import cv2

    from data.diving import mp4check

    info = mp4check.inspect_mp4(fresh / "whole_videos" / "01.mp4")
    cap = cv2.VideoCapture(str(fresh / "whole_videos" / "01.mp4"))
    n = 0
    while cap.grab():
        n += 1
    assert info["ok"] and info["frames"] == n
    assert set(mp4check.require_videos(fresh).values()) == {None}
    data = (fresh / "whole_videos" / "02.mp4").read_bytes()
    (fresh / "whole_videos" / "02.mp4").write_bytes(data[: len(data) - 1000])
    (fresh / "whole_videos" / "03.mp4").write_bytes(b"<html>quota exceeded</html>")
    problems = mp4check.check_videos(fresh)
    assert problems["01"] is None and "truncated" in problems["02"] and "not an MP4" in problems["03"]
    with pytest.raises(ExtractError, match="data.allow_missing=true"):
        mp4check.require_videos(fresh)
    assert mp4check.require_videos(fresh, allow_missing=True)["02"]
    # a clip past the end of its video is caught from the index alone
    a = ann_mod.load_annotations(fresh / "final_annotations_dict.pkl")
    a[(1, 1)] = dict(a[(1, 1)], end_frame=n + 10)
    assert "has %d frames but clip (1, 1)" % n in mp4check.check_videos(fresh, a, videos="01")["01"]


def test_seek_gap_gives_the_same_frames(tmp_path, tiny_extracted):
    out = tmp_path / "frames"
    ex.extract_frames(tiny_extracted, videos="01", frames_dir=out, seek_gap=2, workers=1, log=None)
    ref = tiny_extracted / "whole_videos_frames" / "01"
    names = sorted(p.name for p in ref.glob("*.jpg"))
    assert sorted(p.name for p in (out / "01").glob("*.jpg")) == names
    for name in names[::7]:
        assert (out / "01" / name).read_bytes() == (ref / name).read_bytes()


def test_resize_on_extraction_and_worker_count(tmp_path, tiny_extracted, monkeypatch):
    import cv2

    out = tmp_path / "small"
    ex.extract_frames(tiny_extracted, videos="01", frames_dir=out, resize_short_side=36, workers=1, log=None)
    first = sorted((out / "01").glob("*.jpg"))[0]
    assert cv2.imread(str(first)).shape == (36, 64, 3)
    # other settings, other frames: the done-marker no longer matches and the video is redone
    again = ex.extract_frames(tiny_extracted, videos="01", frames_dir=out, workers=1, log=None)
    assert again["videos"]["01"]["status"] == "extracted" and cv2.imread(str(first)).shape == (72, 128, 3)
    with pytest.raises(AnnotationError, match="videos: 22 not in"):
        ex.extract_frames(tiny_extracted, videos="01 22", frames_dir=out, log=None)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "7")
    assert ex.default_workers() == 7
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert ex.default_workers() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_ffmpeg_baseline_has_the_same_layout(tmp_path, tiny_extracted):
    out = tmp_path / "ff"
    res = ex.extract_with_ffmpeg_baseline(tiny_extracted, frames_dir=out, videos="01 02", log=None)
    for v in ("01", "02"):
        ours = sorted(p.name for p in (tiny_extracted / "whole_videos_frames" / v).glob("*.jpg"))
        assert sorted(p.name for p in (out / v).glob("*.jpg")) == ours
    assert res["frames_decoded"] > res["frames_kept"] > 0


# ------------------------------------------------------------------------------------ dataset
@pytest.mark.parametrize("method", ["random", "spaced_fixed", "spaced_varied", "spaced_fixed_new",
                                    "spaced_varied_new"])
def test_dataset_shapes_and_targets(tiny_extracted, method):
    import torch
    from data.diving.dataset import build_datasets, decode_score

    splits = build_datasets(tiny_extracted, frame_method=method, frame_num=8, spatial_size=32,
                            data_aug=True, normalize=True, train_val_split_ratio=0.75)
    a = ann_mod.load_annotations(tiny_extracted / "final_annotations_dict.pkl")
    assert len(splits.train) + len(splits.val) == len(ann_mod.load_split(tiny_extracted / "train_split_0.pkl"))
    for ds in splits:
        clip, target, score, key = ds[0]
        assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.float32
        assert target.dtype == torch.float32 and target.shape == (2,)
        assert score == a[key]["final_score"] and float(target[1]) == pytest.approx(a[key]["difficulty"])
        assert float(decode_score(target)) == pytest.approx(score, rel=1e-5, abs=1e-4)
    # deterministic in (seed, epoch, index); random methods change with the epoch
    train = splits.train
    assert torch.equal(train[1][0], train[1][0]) and torch.equal(train[(1, 5)][0], train[(1, 5)][0])
    if method != "spaced_fixed":
        assert any(not torch.equal(train[(i, 0)][0], train[(i, 1)][0]) for i in range(len(train)))


def test_frame_sampling_stays_in_the_clip():
    from data.diving.dataset import FRAME_METHODS, sample_frame_numbers

    rng = np.random.default_rng(0)
    for method in FRAME_METHODS:
        for n in (3, 8, 55, 274):
            f = sample_frame_numbers(100, 100 + n - 1, 8, method, rng)
            assert len(f) == 8 and f == sorted(f) and 100 <= f[0] and f[-1] <= 100 + n - 1
    assert sample_frame_numbers(1, 80, 8, "spaced_fixed", rng) == [1, 11, 21, 31, 41, 51, 61, 71]


def test_dataset_fails_fast_when_frames_are_missing(tmp_path, tiny_extracted):
    from data.diving.dataset import build_datasets

    root = tmp_path / "data"
    shutil.copytree(tiny_extracted, root)
    shutil.rmtree(root / "whole_videos_frames" / "02")
    with pytest.raises(FramesMissingError) as err:
        build_datasets(root, spatial_size=32)
    msg = str(err.value)
    assert "clip (2, " in msg and str(root / "whole_videos_frames") in msg and "prepare stage" in msg
    with pytest.warns(UserWarning, match="left out"):
        splits = build_datasets(root, spatial_size=32, allow_missing=True)
    assert all(k[0] != 2 for ds in splits for k in ds.keys())


def test_dataset_refuses_a_split_with_unknown_clips(tmp_path, tiny_extracted):
    from data.diving.dataset import build_datasets

    bad = tmp_path / "test_split_0.pkl"
    bad.write_bytes(pickle.dumps([(1, 1), (22, 5)], protocol=3))
    with pytest.raises(AnnotationError, match=r"clip \(22, 5\) is not in"):
        build_datasets(tiny_extracted, test_path=bad)


# -------------------------------------------------------------------------------- learnability
def test_the_score_is_visible_at_64_px(tmp_path):
    """Hand-made proxies (board height, splash area) computed from 64 px clips predict the score."""
    from data.diving.dataset import build_datasets

    root = tmp_path / "ci"
    synthetic.generate(root, preset="ci", seed=11)
    ex.extract_frames(root, workers=2, log=None)
    splits = build_datasets(root, spatial_size=64, frame_num=8, train_val_split_ratio=1.0)

    def features(ds):
        rows, scores, diffs = [], [], []
        for i in range(len(ds)):
            clip, target, score, _ = ds[i]
            x = clip.numpy()  # [3, T, 64, 64]
            bright = (x > 0.85).all(axis=0)  # white: the board and the splash
            board_row = np.argmax(bright[0].any(axis=1))
            splash = np.sqrt(max(0, bright[-3:].sum(axis=(1, 2)).max() - bright[0].sum()))
            rows.append([1.0, -board_row, splash, -board_row * splash])
            scores.append(score)
            diffs.append(float(target[1]))
        return np.array(rows), np.array(scores), np.array(diffs)

    xtr, ytr, dtr = features(splits.train)
    xte, yte, _ = features(splits.test)
    assert _spearman(xtr[:, 1], dtr) > 0.9  # board height <-> difficulty
    coef, *_ = np.linalg.lstsq(xtr, ytr, rcond=None)
    assert _spearman(xte @ coef, yte) > 0.5


# ------------------------------------------------------------------------------------ download
class _Files(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    cut_next = 0        # serve only half of the body for this many requests
    log: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        cls = type(self)
        cls.log.append((self.path, self.headers.get("Range")))
        body, ctype = cls.files.get(self.path.split("?")[0], (None, None))
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if cls.cut_next > 0:
            cls.cut_next -= 1
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)


@pytest.fixture
def server():
    payload = np.random.default_rng(0).bytes(300_000)
    _Files.files = {"/blob.bin": (payload, "application/octet-stream"),
                    "/page.bin": (b"<html>log in</html>", "text/html; charset=utf-8"),
                    "/whole_videos/01.mp4": (b"\x00\x00\x00\x18ftypmp42" + payload[:5000], "video/mp4")}
    _Files.cut_next, _Files.log = 0, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", payload
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_verifies_and_skips(tmp_path, server):
    base, payload = server
    dest = tmp_path / "blob.bin"
    _Files.cut_next = 1
    with pytest.raises(DownloadError, match="run the download again to resume"):
        dl.download_file(f"{base}/blob.bin", dest, retries=0, backoff=0, log=None)
    part = tmp_path / "blob.bin.part"
    assert part.is_file() and 0 < part.stat().st_size < len(payload) and not dest.exists()
    done = dl.download_file(f"{base}/blob.bin", dest, expected_size=len(payload), log=None)
    assert done["status"] == "resumed" and dest.read_bytes() == payload and not part.exists()
    assert _Files.log[-1] == ("/blob.bin", f"bytes={len(payload) // 2}-")
    n = len(_Files.log)
    assert dl.download_file(f"{base}/blob.bin", dest, expected_size=len(payload), log=None)["status"] == "present"
    assert len(_Files.log) == n  # skipped without a request
    # a drop in the middle is retried (resumed) within one call
    _Files.cut_next = 1
    dest2 = tmp_path / "again.bin"
    res = dl.download_file(f"{base}/blob.bin", dest2, sha256=hashlib.sha256(payload).hexdigest(),
                           backoff=0, log=None)
    assert res["status"] == "downloaded" and dest2.read_bytes() == payload


def test_download_refuses_wrong_size_web_pages_and_dead_links(tmp_path, server):
    base, payload = server
    with pytest.raises(DownloadError, match="expected 12"):
        dl.download_file(f"{base}/blob.bin", tmp_path / "x.bin", expected_size=12, log=None)
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.part").exists()
    with pytest.raises(DownloadError, match="web page"):
        dl.download_file(f"{base}/page.bin", tmp_path / "p.bin", log=None)
    with pytest.raises(DownloadError, match="HTTP 404"):
        dl.download_file(f"{base}/gone.bin", tmp_path / "g.bin", log=None)


def test_download_dataset_from_a_mirror_and_without_network(tmp_path, server):
    base, payload = server
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="no network"):
        dl.download_dataset(root, videos="01", annotations=False, no_network=True, log=None)
    rep = dl.download_dataset(root, videos="01", annotations=False, base_url=base, log=None)
    assert rep["downloaded"] == 1 and (root / "whole_videos" / "01.mp4").stat().st_size == 5012
    rep = dl.download_dataset(root, videos="01", annotations=False, no_network=True, log=None)
    assert rep["present"] == 1 and rep["missing"] == []
    plan = dl.plan_downloads("all", checkpoint="TimeSformer_divST_8x32_224_K400")
    assert len(plan) == 3 + 15 + 1 and all(p["url"] and "dl=0" not in p["url"] for p in plan)


def test_import_is_cheap():
    import subprocess

    code = ("import sys, data.diving; print(','.join(m for m in ('torch', 'cv2', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout.strip()
    assert out == ""
