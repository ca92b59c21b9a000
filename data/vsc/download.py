"""Download the VSC 2022 videos (and the DISC21 images the seed trains on) from the competitions'
public S3 buckets into the layout.

The seed runs ``aws s3 cp s3://drivendata-competition-meta-vsc-data-sg/train/ ... --no-sign-request``
(and ``test/``); the transfer itself is isc's (``data.isc.download``: S3 listing over plain HTTPS,
resumable, each object written to a temporary name and renamed), pointed at these prefixes.
"""

from __future__ import annotations

from typing import Dict

#: VSC bucket prefix -> folder of the layout (videos, metadata and the train ground truth)
PARTS: Dict[str, str] = {"train/": "train", "test/": "test"}
#: the DISC21 parts the training stages read (training images; queries + references for v45)
DISC21_PARTS: Dict[str, str] = {
    "all/train_images/": "training_images",
    "all/reference_images/": "reference_images",
    "all/query_images/": "query_images",
}
