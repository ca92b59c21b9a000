"""Sensorium 2023 data: the per-mouse layout, the seed's fold split, training windows, the
correlation metric, a synthetic set in the same layout, and the download of the real one.

Modules import numpy only (torch where a dataset needs it, inside the function)."""
