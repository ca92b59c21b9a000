"""MTL-AQA diving data: download, synthetic set, frame extraction, clip dataset.

Modules (imported on first use, so ``import data.diving`` stays cheap: no numpy, cv2 or torch):

* :mod:`.annotations` - safe loading and validation of the annotation and split pickles;
* :mod:`.synthetic`   - ``generate(root)``: a small learnable MTL-AQA look-alike in the real layout;
* :mod:`.extract`     - ``extract_frames(root)``: annotated frames to ``whole_videos_frames/NN/``;
* :mod:`.dataset`     - ``build_datasets(root, ...)``: train/val/test ``DivingClips`` (torch);
* :mod:`.download`    - ``download_dataset(root)``: videos, pickles, TimeSformer checkpoints;
* :mod:`.mp4check`    - ``require_videos(root)``: launch-time check of the videos (no decoding).
"""


import importlib
from typing import Any

from .errors import (AnnotationError, DivingDataError, DownloadError, ExtractError,
                     FramesMissingError)

_EXPORTS = {
    "VIDEO_NUMS": "annotations", "load_annotations": "annotations", "load_split": "annotations",
    "safe_load_pickle": "annotations", "frames_by_video": "annotations", "parse_videos": "annotations",
    "generate": "synthetic", "is_synthetic": "synthetic", "synthetic_info": "synthetic",
    "extract_frames": "extract", "extract_with_ffmpeg_baseline": "extract", "default_workers": "extract",
    "done_videos": "extract", "read_report": "extract",
    "DivingClips": "dataset", "build_datasets": "dataset", "decode_score": "dataset",
    "FRAME_METHODS": "dataset",
    "download_dataset": "download", "download_file": "download",
    "check_videos": "mp4check", "require_videos": "mp4check", "inspect_mp4": "mp4check",
}

__all__ = sorted(_EXPORTS) + ["AnnotationError", "DivingDataError", "DownloadError", "ExtractError",
                              "FramesMissingError"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
