"""The usable images sorted into their split buckets: entries, labels and cache keys per split.

Built once after the cache is filled (images that failed to decode are left
out); training, prediction, the data checks and the run record all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrain.data.images import BUCKETS, ImageList, labels_of


@dataclass(frozen=True)
class Split:
    """One split bucket's usable images, in image-list order (class, then path).

    entries: ImageEntry list.
    labels: int64 [n] class indices of the entries.
    keys: the entries' cache keys (sha256 hex of the relative path), [n].
    """

    entries: list
    labels: np.ndarray
    keys: list

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class Buckets:
    """The training, validation and testing splits of a run's usable images.

    image_dir: Path (or gs:// str) the relative paths start from.
    class_names: the class names, label index order.
    """

    image_dir: object
    class_names: list
    training: Split
    validation: Split
    testing: Split

    @classmethod
    def of(cls, image_list: ImageList, unusable=()) -> Buckets:
        """The entries of image_list whose relative path is not in `unusable`, by bucket."""
        unusable = set(unusable)
        usable = [entry for entry in image_list.entries if entry.relative_path not in unusable]
        splits = {}
        for name in BUCKETS:
            entries = [entry for entry in usable if entry.split_bucket == name]
            splits[name] = Split(entries, labels_of(entries), [entry.key for entry in entries])
        return cls(image_list.image_dir, image_list.class_names, **splits)

    def __getitem__(self, name: str) -> Split:
        return {"training": self.training, "validation": self.validation, "testing": self.testing}[
            name
        ]

    @property
    def entries(self) -> list:
        """Every usable entry, the buckets in BUCKETS order (the run record's row order)."""
        return [entry for name in BUCKETS for entry in self[name].entries]

    @property
    def labels(self) -> np.ndarray:
        """int64 [n] class indices of `entries`."""
        return np.concatenate([self[name].labels for name in BUCKETS])

    @property
    def paths(self) -> list[str]:
        """Relative paths of `entries`."""
        return [entry.relative_path for entry in self.entries]

    @property
    def splits(self) -> list[str]:
        """Split bucket names of `entries`."""
        return [entry.split_bucket for entry in self.entries]
