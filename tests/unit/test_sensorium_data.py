"""The Sensorium layout: the synthetic set in the real per-mouse layout, the seed's fold split,
training windows, whole-trial prediction windows, and the resumable, verified download."""

from __future__ import annotations

import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from data.sensorium import download as dl
from data.sensorium import layout, synthetic
from data.sensorium.dataset import TrainWindows, TrialReader, mouse_stats, window_frames, window_starts


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("sensorium") / "synthetic"
    synthetic.generate(path, "tiny", seed=0)
    return path


def test_synthetic_set_has_the_real_per_mouse_layout(root):
    mice = layout.list_mice(root)
    assert mice == ["synthetic-mouse-a", "synthetic-mouse-b"]
    for name, neurons in zip(mice, (40, 30)):
        assert layout.check_mouse(root, name) == {"trials": 47, "neurons": neurons}
        base = root / name
        tiers = np.load(base / "meta/trials/tiers.npy")
        assert set(tiers) == {"train", "oracle", *layout.UNLABELED_SPLITS}
        assert np.load(base / "data/videos/0.npy").shape == (16, 32, 64)      # (H, W, T)
        assert np.load(base / "data/behavior/0.npy").shape == (2, 64)
        assert np.load(base / "data/pupil_center/0.npy").shape == (2, 64)
        assert np.load(base / "data/responses/0.npy").shape == (neurons, 64)  # (N, T)
        lengths = {layout.trial_length(np.load(base / f"data/behavior/{t}.npy")) for t in range(len(tiers))}
        assert lengths == {64, 56}  # one NaN-padded trial, as in the real set
    again = synthetic.generate(root, "tiny", seed=0)
    assert again["generated"] is False  # idempotent


def test_responses_follow_the_receptive_fields_and_running_speed(root):
    mouse = layout.load_mice(root, 7)[0]
    coords = np.load(root / mouse.name / "meta/neurons/cell_motor_coordinates.npy")
    assert coords.shape == (40, 3)
    rates, speeds = [], []
    for t in mouse.labeled_trials()[:20]:
        b = mouse.load("behavior", t)
        n = layout.trial_length(b)
        rates.append(mouse.load("responses", t)[:, :n].mean())
        speeds.append(b[1, :n].mean())
    assert np.corrcoef(rates, speeds)[0, 1] > 0.5  # faster running, more spikes


def test_folds_are_the_seeds_split(root):
    tiers = np.load(root / "synthetic-mouse-a/meta/trials/tiers.npy")
    folded = layout.fold_tiers(tiers, 7)
    labeled = np.flatnonzero(np.isin(tiers, ["train", "oracle"]))
    ids = labeled.copy()
    np.random.default_rng(12).shuffle(ids)
    for k, part in enumerate(np.array_split(ids, 7)):
        assert set(np.flatnonzero(folded == f"fold_{k}")) == set(part)
    assert (folded[~np.isin(tiers, ["train", "oracle"])] == tiers[~np.isin(tiers, ["train", "oracle"])]).all()
    mouse = layout.load_mice(root, 7)[0]
    assert len(mouse.trials("fold_3")) == 5 and len(mouse.train_trials(3)) == 30
    assert not set(mouse.trials("fold_3")) & set(mouse.train_trials(3))
    with pytest.raises(ValueError, match="at least 2"):
        layout.fold_tiers(tiers, 1)


def test_training_windows_stack_video_behaviour_and_pupil(root, monkeypatch):
    mice = layout.load_mice(root, 7)
    readers = [TrialReader(m, mouse_stats(m, m.labeled_trials()), (16, 32)) for m in mice]
    ds = TrainWindows(readers, [m.train_trials(0) for m in mice], size=8, step=2, epoch_size=50)
    assert len(ds) == 50
    seen = set()
    for i in range(20):
        np.random.seed(i)
        x, y, w = ds[i]
        assert x.shape == (5, 8, 16, 32) and y.shape == (70, 8) and w.shape == (2,)
        m = int(w.argmax())
        seen.add(m)
        assert w.sum() == 1
        other = slice(40, 70) if m == 0 else slice(0, 40)
        assert (y[other] == 0).all()
        assert (x[1:, :, 0, 0][:, :, None, None] == x[1:]).all()  # behaviour / pupil planes are constant
    assert seen == {0, 1}
    # the reader resizes frames to image_size when the video differs
    small = TrialReader(mice[0], readers[0].stats, (8, 16))
    assert small.inputs(0, window_frames(0, 4, 1)).shape == (5, 4, 8, 16)


def test_prediction_windows_cover_every_frame():
    for length, size, step in [(64, 8, 1), (56, 8, 2), (300, 16, 2), (32, 16, 2), (16, 8, 2)]:
        covered = np.zeros(length, int)
        for s in window_starts(length, size, step):
            frames = window_frames(s, size, step)
            assert frames[-1] < length and frames[0] >= 0
            covered[frames] += 1
        assert covered.min() >= 1, (length, size, step)
    for length in (10, 31):
        with pytest.raises(ValueError, match="shorter than one window"):
            window_starts(length, 8 if length == 10 else 16, 2)


# -- download --------------------------------------------------------------------------------------------
def _mouse_zip(tmp: Path) -> bytes:
    src = tmp / "src"
    synthetic.generate(src, "tiny", seed=1, mice=(("m1", 5),), labeled=7, unlabeled=1, frames=16,
                       height=8, width=8)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted((src / "m1").rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(src).as_posix())
    return buf.getvalue()


class _RangeServer(http.server.BaseHTTPRequestHandler):
    payload = b""
    cut_after = None  # bytes sent before the first response is cut short
    requests = []

    def do_GET(self):  # noqa: N802
        start = 0
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_after is not None:
            body, type(self).cut_after = body[: type(self).cut_after], None
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_a_cut_transfer_and_verifies_the_archive(tmp_path):
    payload = _mouse_zip(tmp_path)
    _RangeServer.payload, _RangeServer.cut_after, _RangeServer.requests = payload, len(payload) // 3, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    root = tmp_path / "data"
    try:
        with pytest.raises(dl.DownloadError, match="run again to continue"):
            dl.download_all(root, mice=["m1"], base_url=base)
        assert (root / "m1.zip.part").stat().st_size == len(payload) // 3
        out = dl.download_all(root, mice=["m1"], base_url=base)
        assert _RangeServer.requests == [None, f"bytes={len(payload) // 3}-"]  # the second continued
        assert out["m1"]["fetched"] is True and out["m1"]["neurons"] == 5
        record = json.loads((root / "m1" / ".download.json").read_text())
        assert record["size"] == len(payload) and len(record["sha256"]) == 64
        assert not (root / "m1.zip").exists()
        assert dl.download_all(root, mice=["m1"], base_url=base)["m1"]["fetched"] is False
    finally:
        server.shutdown()


def test_a_damaged_archive_is_refused_and_removed(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    payload = bytearray(_mouse_zip(tmp_path))
    payload[200:260] = b"\0" * 60  # inside the first member's data: CRC fails
    (root / "m1.zip").write_bytes(bytes(payload))
    with pytest.raises(dl.DownloadError, match="CRC|not a whole zip"):
        dl.download_mouse(root, "m1", base_url="http://127.0.0.1:9")
    assert not (root / "m1.zip").exists()
    with pytest.raises(dl.DownloadError, match="no_network"):
        dl.download_mouse(root, "m1", no_network=True)


def test_the_seeds_mice_and_urls():
    assert len(dl.MICE) == 10
    assert dl.mouse_url(dl.NEW_MICE[0]).startswith("https://gin.g-node.org/pollytur/sensorium_2023_dataset/raw/master/")
    assert dl.mouse_url(dl.OLD_MICE[0]).endswith(f"Sensorium2023Data/raw/master/{dl.OLD_MICE[0]}.zip")
