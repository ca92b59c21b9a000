"""The product workflow's data side: the synthetic set's layouts, get_pairs, the cosine filter,
the snapshot resume of extract_features (killed mid-way), the resumable verified download and
the merged training CSV."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.product import amazon, synthetic

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("product-micro")
    summary = synthetic.generate(root, preset="micro", seed=0)
    return root, summary


def _csv(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_generator_writes_the_real_layouts(micro):
    root, summary = micro
    p10k = root / "Product10K"
    train, test = _csv(p10k / "train.csv"), _csv(p10k / "test_kaggletest.csv")
    assert list(train[0]) == ["name", "class"] and list(test[0]) == ["name", "class"]
    assert all((p10k / "train" / r["name"]).is_file() for r in train)
    assert all((p10k / "test" / r["name"]).is_file() for r in test)
    assert {r["class"] for r in test} <= {r["class"] for r in train}  # held-out images of known classes
    dev = root / "development_test_data"
    gallery, queries = _csv(dev / "gallery.csv"), _csv(dev / "queries.csv")
    assert list(gallery[0]) == ["img_path", "product_id"]
    assert list(queries[0]) == ["img_path", "product_id", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]
    assert {q["product_id"] for q in queries} <= {g["product_id"] for g in gallery}
    assert len({g["product_id"] for g in gallery}) > len({q["product_id"] for q in queries})  # distractors
    import cv2

    for q in queries:
        image = cv2.imread(str(dev / q["img_path"]))
        x, y, w, h = (int(q[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
        assert 0 <= x and 0 <= y and w > 4 and h > 4 and x + w <= image.shape[1] and y + h <= image.shape[0]
        inside = image[y:y + h, x:x + w].astype(float)
        assert inside.std() > 5  # the box holds the (patterned) product
    # product ids of the three sets never meet (Product10K classes vs dev products vs reviews)
    reviews = root / "amazon" / "reviews"
    meta = [json.loads(line) for line in (reviews / "meta_AMAZON_FASHION.json").read_text().splitlines()]
    assert {"asin", "imageURLHighRes", "imageURL"} <= set(meta[0])
    rows = [json.loads(line) for line in (reviews / "AMAZON_FASHION.json").read_text().splitlines()]
    with_images = [r for r in rows if r.get("image")]
    assert {"overall", "reviewerID", "asin", "unixReviewTime", "image"} <= set(with_images[0])
    assert all(u.startswith("file://") and u.endswith("._SY88.jpg") for r in with_images for u in r["image"])
    assert len(with_images) < len(rows)  # text-only reviews too
    truth = json.loads((root / "amazon" / "filter_truth.json").read_text())
    assert sorted(summary["user_images"]) == ["other", "right", "zoom"]
    assert sum(v["wrong"] for v in truth.values()) == summary["user_images"]["other"] + summary["user_images"]["zoom"]
    assert synthetic.generate(root, preset="micro", seed=0)["reused"] is True


def test_get_pairs_keeps_products_with_both_kinds_of_images(micro):
    root, _ = micro
    reviews = root / "amazon" / "reviews"
    rows, counts = amazon.get_pairs(reviews / "All_Beauty.json", reviews / "meta_All_Beauty.json")
    params = synthetic.PRESETS["micro"]
    assert counts["products"] == params["products_per_category"]  # the product with no images is left out
    assert counts["user_images"] == params["products_per_category"] * (params["user_images"] + params["wrong_images"])
    assert counts["product_images"] == params["products_per_category"] * params["seller_images"]
    assert all(r["kind"] in ("product", "user") and "._SY88" not in r["url"] for r in rows)
    assert all(Path(r["url"][len("file://"):]).is_file() for r in rows)  # full-size URLs resolve
    path = amazon.write_table(root / "out", "pairs", rows, amazon.PAIR_COLUMNS)
    assert path.suffix == (".parquet" if amazon.have_parquet() else ".csv")
    back = amazon.read_table(root / "out", "pairs")
    assert [(r["asin"], r["kind"], r["url"]) for r in back] == [(r["asin"], r["kind"], r["url"]) for r in rows]


def test_cosine_filter_removes_the_injected_wrong_images(micro):
    """Embeddings that behave like a trained model's: a product's images near its own direction,
    a wrong image (another product, a close-up) near another product's. The filter must remove
    all wrong images at both thresholds and keep the right ones; the report counts it."""
    root, _ = micro
    reviews = root / "amazon" / "reviews"
    rows, _ = amazon.get_pairs(reviews / "AMAZON_FASHION.json", reviews / "meta_AMAZON_FASHION.json")
    truth = json.loads((root / "amazon" / "filter_truth.json").read_text())
    truth_full = {amazon.full_size_url(u): v for u, v in truth.items()}
    rng = np.random.default_rng(0)
    asins = sorted({r["asin"] for r in rows})
    direction = {a: rng.normal(size=32) for a in asins}
    urls = list(dict.fromkeys(r["url"] for r in rows))
    owner = {r["url"]: r["asin"] for r in rows}
    emb = []
    for url in urls:
        asin = owner[url]
        if truth_full.get(url, {}).get("wrong"):
            asin = asins[(asins.index(asin) + 1) % len(asins)]  # looks like something else
        emb.append(direction[asin] + 0.3 * rng.normal(size=32))
    scores = amazon.mean_cosines(rows, urls, np.array(emb, np.float32))
    kept = amazon.analyse_pairs(rows, scores, (0.6, 0.5))
    report = amazon.filter_report(scores, kept, truth)
    for th in ("0.6", "0.5"):
        r = report[th]
        assert r["wrong"] > 0 and r["wrong_removed"] == r["wrong"] and r["recall"] == 1.0, r
        assert r["right_kept"] == r["right"] and r["precision"] == 1.0, r
    kept_user = {r["url"] for r in kept[0.6] if r["kind"] == "user"}
    assert all(not truth_full[u]["wrong"] for u in kept_user)
    assert all(r["kind"] == "product" or r["mean_cos"] > 0.6 for r in kept[0.6])
    # the lower threshold keeps a superset
    assert kept_user <= {r["url"] for r in kept[0.5] if r["kind"] == "user"}
    # an image that could not be fetched (NaN embedding) is never kept
    emb[urls.index(next(iter(kept_user)))] = np.full(32, np.nan)
    scores = amazon.mean_cosines(rows, urls, np.array(emb, np.float32))
    assert np.isnan(scores[next(iter(kept_user))])
    assert next(iter(kept_user)) not in {r["url"] for r in amazon.analyse_pairs(rows, scores, (0.6,))[0.6]}


_EXTRACT = """
import sys, time
import numpy as np
from pathlib import Path
from data.product import amazon
urls = [l.strip() for l in open(sys.argv[1])]
def embed(images):
    time.sleep(0.05)
    out = np.stack([im.reshape(-1, 3).mean(0) if im is not None else np.full(3, np.nan) for im in images])
    for _ in images:
        print("item", flush=True)
    return out
r = amazon.extract_embeddings(urls, embed, Path(sys.argv[2]), every=int(sys.argv[3]), batch_size=2, fetch_workers=1)
print("resumed_at", r["resumed_at"], "computed", r["computed"], flush=True)
np.save(sys.argv[2] + ".final.npy", r["embeddings"])
"""


def test_extract_features_killed_midway_loses_at_most_one_snapshot(micro, tmp_path):
    root, _ = micro
    reviews = root / "amazon" / "reviews"
    rows, _ = amazon.get_pairs(reviews / "AMAZON_FASHION.json", reviews / "meta_AMAZON_FASHION.json")
    urls = list(dict.fromkeys(r["url"] for r in rows))
    assert len(urls) >= 30
    (tmp_path / "urls.txt").write_text("\n".join(urls))
    script = tmp_path / "extract.py"
    script.write_text(_EXTRACT)
    every = 6
    args = [sys.executable, str(script), str(tmp_path / "urls.txt"), str(tmp_path / "snap"), str(every)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    done = 0
    for line in proc.stdout:  # kill it once 2.5 snapshots' worth of items are embedded
        done += line.startswith("item")
        if done >= 2 * every + every // 2:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)
    saved = amazon.completed_snapshots(tmp_path / "snap", urls, every)
    assert saved % every == 0 and 0 < saved < len(urls)
    assert done - saved <= every, (done, saved)  # at most one snapshot of work lost
    second = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert second.returncode == 0, second.stderr
    last = second.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["resumed_at", str(saved)] and int(last[3]) == len(urls) - saved
    assert second.stdout.count("item") == len(urls) - saved
    # the resumed result equals an uninterrupted run's
    fresh = subprocess.run([*args[:3], str(tmp_path / "fresh"), str(every)], capture_output=True, text=True,
                           env=env, cwd=REPO, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    a, b = np.load(str(tmp_path / "snap") + ".final.npy"), np.load(str(tmp_path / "fresh") + ".final.npy")
    assert a.shape == (len(urls), 3) and np.allclose(a, b)
    # snapshots made for another URL list are not reused
    assert amazon.completed_snapshots(tmp_path / "snap", urls[:-1], every) == 0


def test_download_is_resumable_and_verified(micro, tmp_path):
    root, _ = micro
    reviews = root / "amazon" / "reviews"
    rows, _ = amazon.get_pairs(reviews / "Appliances.json" if (reviews / "Appliances.json").exists()
                               else reviews / "All_Beauty.json", reviews / "meta_All_Beauty.json")
    urls = [r["url"] for r in rows][:12]
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"<html>404</html>")
    dest = tmp_path / "images"
    first = amazon.download_images(urls[:5] + [f"file://{bad}"], dest, workers=2)
    assert first["fetched"] == 5 and first["reused"] == 0 and list(first["failed"]) == [f"file://{bad}"]
    assert "decodable" in first["failed"][f"file://{bad}"]
    assert not list(dest.glob("*.part")) and len(list(dest.glob("*.jpg"))) == 5
    # interrupted after 5: the rerun fetches only the rest; a truncated file is fetched again
    victim = dest / first["index"][urls[0]]["name"]
    victim.write_bytes(victim.read_bytes()[:100])
    second = amazon.download_images(urls, dest, workers=2)
    assert second["reused"] == 4 and second["fetched"] == len(urls) - 4 and not second["failed"]
    for url in urls:
        entry = second["index"][url]
        data = (dest / entry["name"]).read_bytes()
        assert len(data) == entry["bytes"] and amazon.decode_image(data).ndim == 3
    assert json.loads((dest / "index.json").read_text()).keys() == second["index"].keys()


def test_training_csv_merges_categories(micro, tmp_path):
    root, _ = micro
    reviews = root / "amazon" / "reviews"
    kept_files = []
    for i, category in enumerate(("AMAZON_FASHION", "All_Beauty")):
        rows, _ = amazon.get_pairs(reviews / f"{category}.json", reviews / f"meta_{category}.json")
        kept_files.append(amazon.write_table(tmp_path / f"k{i}", "kept", rows, amazon.PAIR_COLUMNS))
        all_rows = rows
    urls = [r["url"] for p in kept_files for r in amazon.read_table(p)]
    result = amazon.download_images(urls[:-3], tmp_path / "images", workers=2)  # three never arrive
    out = tmp_path / "train.csv"
    summary = amazon.prepare_training_set(kept_files, result["index"], tmp_path / "images", out)
    table = _csv(out)
    assert list(table[0]) == ["image_path", "label"]
    assert summary["not_downloaded"] == 3 and summary["images"] == len(table)
    labels = {int(r["label"]) for r in table}
    assert labels == set(range(summary["classes"])) and summary["classes"] == 2 * synthetic.PRESETS["micro"]["products_per_category"]
    assert all(Path(r["image_path"]).is_file() for r in table)
    assert all(sum(1 for r in table if int(r["label"]) == lab) >= 2 for lab in labels)
    assert all_rows  # both categories read
