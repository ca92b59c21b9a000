"""MTL-AQA annotation and split pickles, loaded without ever running code from them.

The official files (``final_annotations_dict.pkl``, ``train_split_0.pkl``, ``test_split_0.pkl``,
pickle protocol 3) hold only dicts, lists, tuples, ints, floats and strings: they import no global at
all. So the unpickler below refuses every global except ``set``/``frozenset`` (which older protocols
pickle as a call to the builtin): a pickle that reaches for ``os.system``, ``numpy`` or any class is
refused before anything is built. Then the structure is checked, field by field.

Annotation file: ``{(video_num, clip_idx): {primary_view, start_frame, end_frame, position,
difficulty, armstand, rotation_type, ss_no, tw_no, final_score}}``. Split file: ``[(video_num,
clip_idx), ...]``. Frame numbers are the 1-based numbers of the ``%06d.jpg`` files that
``ffmpeg -i NN.mp4 %06d.jpg`` writes (file ``000001.jpg`` is the video's first frame).
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import AnnotationError

Key = Tuple[int, int]
Annotations = Dict[Key, Dict[str, Any]]

#: the 15 competition videos of MTL-AQA, as numbered in the official release
VIDEO_NUMS: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 9, 10, 13, 14, 17, 18, 22, 26)

INT_FIELDS = ("primary_view", "start_frame", "end_frame", "position", "armstand",
              "rotation_type", "ss_no", "tw_no")
FLOAT_FIELDS = ("difficulty", "final_score")
REQUIRED_FIELDS = INT_FIELDS + FLOAT_FIELDS

# The only globals a plain-data pickle may need (protocols 0-3 pickle a set as a call to it).
_ALLOWED_GLOBALS = {("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
                    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset}
_MAX_PROBLEMS_SHOWN = 5


class _PlainDataUnpickler(pickle.Unpickler):
    def __init__(self, fh, path: str):
        super().__init__(fh)
        self._path = path

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise AnnotationError(
                f"{self._path}: refused to load: the pickle asks for the global "
                f"'{module}.{name}', and annotation files may hold only plain data (dicts, lists, "
                "tuples, numbers, strings). It is not an MTL-AQA annotation file, or it was "
                "tampered with: use the official file (or regenerate the synthetic set)."
            ) from None

    def persistent_load(self, pid):
        raise AnnotationError(f"{self._path}: refused to load: the pickle uses persistent ids "
                              "(plain-data annotation files never do).")


def safe_load_pickle(path: os.PathLike) -> Any:
    """Unpickle ``path`` accepting only plain containers, numbers, strings, bools and None.

    Raises :class:`AnnotationError` naming the file (and the forbidden global, if any).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found. Point annotation_path/train_path/test_path "
                              "at the MTL-AQA files (or let the download stage fetch them).") from None
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot be read ({exc}).") from None
    try:
        return _PlainDataUnpickler(io.BytesIO(data), path).load()
    except AnnotationError:
        raise
    except Exception as exc:  # truncated or garbage bytes: UnpicklingError, EOFError, ValueError...
        raise AnnotationError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc}). The file "
                              "is truncated or corrupt: download it again.") from None


def dump_pickle(obj: Any, path: os.PathLike) -> None:
    """Write ``obj`` as a protocol-3 pickle (as the official files are), atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        pickle.dump(obj, fh, protocol=3)
    os.replace(tmp, path)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_key(k: Any) -> bool:
    return isinstance(k, tuple) and len(k) == 2 and _is_int(k[0]) and _is_int(k[1])


def _raise_problems(path: str, problems: List[str], advice: str) -> None:
    shown = "; ".join(problems[:_MAX_PROBLEMS_SHOWN])
    more = f" (and {len(problems) - _MAX_PROBLEMS_SHOWN} more)" if len(problems) > _MAX_PROBLEMS_SHOWN else ""
    raise AnnotationError(f"{path}: {shown}{more}. {advice}")


def validate_annotations(ann: Any, path: str = "<annotations>") -> Annotations:
    """Check the structure of an annotation dict; return it (values untouched)."""
    advice = ("Use the official final_annotations_dict.pkl of MTL-AQA (split 0) or regenerate the "
              "synthetic set.")
    if not isinstance(ann, dict):
        raise AnnotationError(f"{path}: expected a dict keyed by (video_num, clip_idx), found "
                              f"{type(ann).__name__}. {advice}")
    if not ann:
        raise AnnotationError(f"{path}: the annotation dict is empty. {advice}")
    problems: List[str] = []
    for key, value in ann.items():
        if not _is_key(key):
            problems.append(f"key {key!r} is not a (video_num, clip_idx) pair of ints")
            continue
        if not isinstance(value, dict):
            problems.append(f"clip {key}: value is a {type(value).__name__}, not a dict")
            continue
        missing = [f for f in REQUIRED_FIELDS if f not in value]
        if missing:
            problems.append(f"clip {key}: missing field(s) {', '.join(missing)}")
            continue
        bad = [f for f in INT_FIELDS if not _is_int(value[f])]
        bad += [f for f in FLOAT_FIELDS if not _is_number(value[f])]
        if bad:
            problems.append(f"clip {key}: field(s) {', '.join(f'{f}={value[f]!r}' for f in bad)} "
                            "have the wrong type")
            continue
        if value["start_frame"] < 1:
            problems.append(f"clip {key}: start_frame {value['start_frame']} < 1 (frames are numbered "
                            "from 1, as ffmpeg's %06d.jpg files are)")
        if value["start_frame"] > value["end_frame"]:
            problems.append(f"clip {key}: start_frame {value['start_frame']} > end_frame "
                            f"{value['end_frame']}")
        if not value["difficulty"] > 0:
            problems.append(f"clip {key}: difficulty {value['difficulty']} is not positive")
        if value["final_score"] < 0:
            problems.append(f"clip {key}: final_score {value['final_score']} is negative")
    if problems:
        _raise_problems(path, problems, advice)
    return ann


def load_annotations(path: os.PathLike) -> Annotations:
    """Load and validate ``final_annotations_dict.pkl`` (restricted unpickler)."""
    path = os.fspath(path)
    return validate_annotations(safe_load_pickle(path), path)


def validate_split(keys: Any, path: str = "<split>",
                   annotations: Optional[Mapping[Key, Any]] = None,
                   annotation_path: str = "the annotation file") -> List[Key]:
    """Check a split: a list of distinct (video_num, clip_idx) pairs, all present in ``annotations``."""
    if not isinstance(keys, (list, tuple)):
        raise AnnotationError(f"{path}: expected a list of (video_num, clip_idx) pairs, found "
                              f"{type(keys).__name__}. Use the official train_split_0.pkl / "
                              "test_split_0.pkl.")
    out: List[Key] = []
    problems: List[str] = []
    seen = set()
    for item in keys:
        key = tuple(item) if isinstance(item, list) else item
        if not _is_key(key):
            problems.append(f"entry {item!r} is not a (video_num, clip_idx) pair of ints")
            continue
        if key in seen:
            problems.append(f"clip {key} is listed twice")
            continue
        seen.add(key)
        out.append(key)
    if problems:
        _raise_problems(path, problems, "Use the official split file or regenerate the synthetic set.")
    if annotations is not None:
        unknown = [k for k in out if k not in annotations]
        if unknown:
            _raise_problems(
                path, [f"clip {k} is not in {annotation_path}" for k in unknown],
                f"{len(unknown)} of {len(out)} clips of the split have no annotation: the split and "
                "the annotation file come from different releases. Use the split files that ship "
                "with that annotation file.")
    return out


def load_split(path: os.PathLike, annotations: Optional[Mapping[Key, Any]] = None,
               annotation_path: str = "the annotation file") -> List[Key]:
    """Load ``train_split_0.pkl``/``test_split_0.pkl``; with ``annotations``, every clip must exist."""
    path = os.fspath(path)
    return validate_split(safe_load_pickle(path), path, annotations, annotation_path)


def check_disjoint(train: Iterable[Key], test: Iterable[Key], train_path: str = "train split",
                   test_path: str = "test split") -> None:
    """Refuse a train split that shares clips with the test split (the test score would lie)."""
    shared = sorted(set(train) & set(test))
    if shared:
        _raise_problems(train_path, [f"clip {k} is also in {test_path}" for k in shared],
                        "Train and test splits must not overlap: use matching split files.")


def parse_videos(videos: Any) -> Optional[Tuple[int, ...]]:
    """The seed's ``videos`` argument: ``"all"``, ``"01 02"``, ``[1, 2]`` or ``["01", "02"]``.

    Returns the video numbers, or None for "all" (every annotated video)."""
    if videos is None:
        return None
    if isinstance(videos, (int, str)):
        videos = str(videos).replace(",", " ").split()
    items = list(videos)
    if not items or (len(items) == 1 and str(items[0]).lower() == "all"):
        return None
    out = []
    for v in items:
        try:
            out.append(int(v))
        except (TypeError, ValueError):
            raise AnnotationError(f"videos: {v!r} is not a video number; use 'all' or numbers such "
                                  f"as '01 02' (MTL-AQA has {', '.join(f'{n:02d}' for n in VIDEO_NUMS)})"
                                  ) from None
    return tuple(out)


def check_videos_annotated(videos: Optional[Sequence[int]], annotations: Mapping[Key, Any],
                           path: str = "the annotation file") -> None:
    """Refuse a ``videos`` selection naming a video no clip comes from (a typo, most likely)."""
    if videos is None:
        return
    have = {k[0] for k in annotations}
    unknown = sorted(set(videos) - have)
    if unknown:
        raise AnnotationError(f"videos: {', '.join(f'{v:02d}' for v in unknown)} not in {path} (it has "
                              f"{', '.join(f'{v:02d}' for v in sorted(have))}); fix the videos setting "
                              "or use 'all'")


def frames_by_video(annotations: Mapping[Key, Mapping[str, Any]],
                    videos: Optional[Sequence[int]] = None) -> Dict[int, List[int]]:
    """Sorted, distinct frame numbers (1-based) every video needs: the union of its clip ranges."""
    wanted = None if videos is None else set(videos)
    needed: Dict[int, set] = {}
    for (video, _clip), value in annotations.items():
        if wanted is not None and video not in wanted:
            continue
        needed.setdefault(video, set()).update(range(value["start_frame"], value["end_frame"] + 1))
    return {v: sorted(f) for v, f in sorted(needed.items())}


def clip_ranges_by_video(annotations: Mapping[Key, Mapping[str, Any]]) -> Dict[int, List[Tuple[int, int]]]:
    """Merged, sorted (first, last) frame ranges per video (overlapping clips merged)."""
    out: Dict[int, List[Tuple[int, int]]] = {}
    for video, frames in frames_by_video(annotations).items():
        ranges: List[Tuple[int, int]] = []
        for f in frames:
            if ranges and f == ranges[-1][1] + 1:
                ranges[-1] = (ranges[-1][0], f)
            else:
                ranges.append((f, f))
        out[video] = ranges
    return out
