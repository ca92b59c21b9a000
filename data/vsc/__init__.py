"""VSC 2022 (Video Similarity Challenge, matching track) data for the vsc workflow.

Modules (import the one you need; ``import data.vsc`` itself stays cheap):

* :mod:`.layout`       - the VSC layout: video lists from the metadata CSVs, launch-time check;
* :mod:`.matches`      - ``Match`` (query, reference, both time spans, score) and its CSV format;
* :mod:`.synthetic`    - ``generate(root)``: small videos in that layout, training images in DISC21's;
* :mod:`.frames`       - uniformly spaced frames of a video with their times (OpenCV);
* :mod:`.localization` - copied segments from a query x reference frame-similarity matrix;
* :mod:`.metrics`      - the matching track's segment AP and the video-pair micro AP;
* :mod:`.download`     - the competition's videos from its public bucket.
"""
