"""Images: discovery of a class-per-folder tree and the hash split.

``discover`` lists ``image_dir/<class>/**/<image>`` and gives every image a
split bucket and a cache key that depend only on its path relative to
``image_dir``, so moving the folder, copying it to another machine or adding
images never moves an existing image between buckets.

Turning files into pixels is ``retrain.data.decode``'s job.
"""

import dataclasses
import hashlib
import logging
import os
import re
import unicodedata
from pathlib import Path

import numpy as np

from retrain.config import check_split
from retrain.data.decode import FORMAT_NAMES, SNIFF_BYTES, sniff_format
from retrain.data.decode_memory import MAX_FILE_BYTES, file_too_large
from retrain.errors import RetrainError
from retrain.files import paths, regular_file

logger = logging.getLogger(__name__)

BUCKETS = ("training", "validation", "testing")

# Files and folders that tools leave in photo folders; hidden names (".*")
# are ignored as well.
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})

_NOHASH = re.compile(r"_nohash_.*$")
_SPLIT_RESOLUTION = 2**27

# Formats people put in photo folders that we refuse, named so the user knows
# what to convert: (offset, magic bytes, name).
_KNOWN_UNSUPPORTED = (
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"%PDF", "PDF"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One image: where it is, its class, its split bucket and its cache key."""

    relative_path: str
    label: str
    label_index: int
    split_bucket: str
    key: str


def labels_of(entries):
    """int64 [n] class indices of ImageEntry objects."""
    return np.fromiter((entry.label_index for entry in entries), np.int64, len(entries))


@dataclasses.dataclass
class ImageList:
    """The images found under ``image_dir``, sorted by class then path.

    ``image_dir`` is a Path, or a str URL (``gs://...``) read through
    ``tf.io.gfile``. ``skipped`` lists files inside class folders that are
    not images of a supported format, as (relative path, reason).
    """

    image_dir: Path
    class_names: list
    entries: list
    skipped: list = dataclasses.field(default_factory=list)

    def bucket(self, name):
        """The entries of split bucket ``name``: training, validation or testing."""
        if name not in BUCKETS:
            raise RetrainError(
                f"Unknown split bucket; expected one of {', '.join(BUCKETS)}. "
                f"Received: name={name!r}"
            )
        return [entry for entry in self.entries if entry.split_bucket == name]


def _hash_name(relative_path):
    # NFC so that a name written by macOS (decomposed accents) hashes like the
    # same name written on Linux or Windows.
    normal = unicodedata.normalize("NFC", relative_path)
    return normal.encode("utf-8", "surrogateescape")


def cache_key(relative_path):
    """The cache key of an image: sha256 hex digest of its relative posix path."""
    return hashlib.sha256(_hash_name(relative_path)).hexdigest()


def split_percentage(relative_path):
    """Where an image falls in [0, 100) for the split.

    Any ``_nohash_...`` suffix of the file name is dropped first, so
    ``x_nohash_1.jpg`` and ``x_nohash_2.jpg`` always fall together.
    """
    folder, _, name = relative_path.rpartition("/")
    grouped = f"{folder}/{_NOHASH.sub('', name)}" if folder else _NOHASH.sub("", name)
    digest = int(hashlib.sha256(_hash_name(grouped)).hexdigest(), 16)
    return (digest % _SPLIT_RESOLUTION) * 100.0 / _SPLIT_RESOLUTION


def split_bucket(relative_path, testing_percentage=10.0, validation_percentage=10.0):
    """The split bucket ("training", "validation" or "testing") of one image."""
    percentage = split_percentage(relative_path)
    if percentage < testing_percentage:
        return "testing"
    if percentage < testing_percentage + validation_percentage:
        return "validation"
    return "training"


def rejection(path):
    """Why ``path`` is not a supported image, or None when it is one.

    Reads at most its first SNIFF_BYTES, and nothing of a file that is not a
    regular file (FIFO, socket, device; links followed) or is larger than
    ``decode_memory.MAX_FILE_BYTES``. Discovery and label_image's folder walk use it.
    """
    try:
        if not paths.is_url(path):
            # Judged before anything is opened (links followed): a FIFO, socket
            # or device would block or never end a read, and a huge (even
            # sparse) file is not read at all.
            status = os.stat(path)
            reason = regular_file.not_regular(status.st_mode)
            if reason:
                return reason
            if status.st_size > MAX_FILE_BYTES:
                return file_too_large(status.st_size)
        head, size, _ = paths.read(path, SNIFF_BYTES)
    except FileNotFoundError:
        return "cannot read: broken symbolic link"
    except OSError as error:
        return f"cannot read: {error.strerror or error}"
    if size > MAX_FILE_BYTES:  # a URL, or a file that grew meanwhile
        return file_too_large(size)
    if not head:
        return "empty file"
    if sniff_format(head):
        return None
    for offset, magic, name in _KNOWN_UNSUPPORTED:
        if head[offset : offset + len(magic)] == magic:
            return f"unsupported format ({name}); convert it to JPEG or PNG"
    return f"unsupported format (content starts with {head[:8]!r}; accepted: {FORMAT_NAMES})"


def _is_ignored(name):
    return name.startswith(".") or name in IGNORED_NAMES


def _class_files(class_dir, seen_dirs):
    """Files below ``class_dir`` (following links, each folder once), sorted."""
    files = []
    for folder, dirnames, filenames in paths.walk(class_dir, onerror=_warn_unreadable):
        kept = []
        for name in sorted(dirnames):
            if _is_ignored(name):
                continue
            identity = _dir_identity(paths.join(folder, name))
            if identity in seen_dirs:
                logger.warning(
                    "ignoring folder %s: it links to a folder already scanned",
                    os.path.join(folder, name),
                )
                continue
            seen_dirs.add(identity)
            kept.append(name)
        dirnames[:] = kept
        files.extend(paths.join(folder, name) for name in filenames if not _is_ignored(name))
    return sorted(files)


def _warn_unreadable(error):
    logger.warning("ignoring folder %s: %s", error.filename, error.strerror)


def _dir_identity(path):
    if paths.is_url(path):
        return path  # object stores have no links, so no loops
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _class_folders(root, image_dir):
    """The sorted class folder names under ``root``; warns about loose files.

    Raises RetrainError for a missing or unreadable folder, or one without
    class folders (``image_dir`` is the folder as the user gave it).
    """
    if not paths.is_dir(root):
        raise RetrainError(
            "image_dir must be an existing folder with one sub-folder per class. "
            f"Received: image_dir={image_dir}"
        )
    try:
        children = sorted(paths.list_dir(root))
    except OSError as error:
        raise RetrainError(
            f"Cannot list image_dir: {error.strerror or error}. Make the folder "
            f"readable. Received: image_dir={image_dir}"
        ) from None
    class_names, loose_files = [], []
    for child in children:
        if _is_ignored(child):
            continue
        (class_names if paths.is_dir(paths.join(root, child)) else loose_files).append(child)
    if not class_names:
        raise RetrainError(
            "image_dir has no class folders; put the images of each class in its "
            "own sub-folder, e.g. image_dir/daisy/1.jpg. "
            f"Received: image_dir={image_dir}"
        )
    if loose_files:
        logger.warning(
            "ignoring %d file(s) directly in %s (images must be in a class sub-folder): %s",
            len(loose_files),
            image_dir,
            ", ".join(loose_files[:5]) + (", ..." if len(loose_files) > 5 else ""),
        )
    return class_names


def discover(image_dir, testing_percentage=10.0, validation_percentage=10.0):
    """Lists the images of ``image_dir``, one sub-folder per class.

    Classes are the sorted names of the non-hidden sub-folders; images in
    nested folders belong to the class of their top folder. A file is accepted
    by its content (JPEG, PNG, GIF, BMP, WebP), whatever its extension;
    other files in class folders go to ``ImageList.skipped`` with the reason
    and one warning line each.
    Files directly in ``image_dir`` are ignored with one warning. Of two
    names that differ only in Unicode normalisation (so share a cache key),
    the second is skipped.

    Raises RetrainError for a missing or unreadable folder, a folder without
    class folders, or bad percentages.
    """
    check_split(testing_percentage, validation_percentage)
    root = str(image_dir).rstrip("/") if paths.is_url(image_dir) else Path(image_dir)
    class_names = _class_folders(root, image_dir)
    entries, skipped = [], []
    path_of_key = {}
    seen_dirs = {_dir_identity(paths.join(root, name)) for name in class_names}
    for label_index, label in enumerate(class_names):
        for path in _class_files(paths.join(root, label), seen_dirs):
            relative_path = (
                path[len(root) + 1 :]
                if paths.is_url(root)
                else Path(path).relative_to(root).as_posix()
            )
            key = cache_key(relative_path)
            reason = rejection(path)
            if not reason and key in path_of_key:
                # Two spellings of one name (NFC and NFD) can coexist on Linux;
                # sharing a cache key, they would share one cached vector.
                reason = (
                    f"same name as {path_of_key[key]} after Unicode "
                    "normalisation; rename one of them"
                )
            if reason:
                skipped.append((relative_path, reason))
                continue
            path_of_key[key] = relative_path
            entries.append(
                ImageEntry(
                    relative_path=relative_path,
                    label=label,
                    label_index=label_index,
                    split_bucket=split_bucket(
                        relative_path, testing_percentage, validation_percentage
                    ),
                    key=key,
                )
            )
    for relative_path, reason in skipped:
        logger.warning("skipped %s: %s", relative_path, reason)
    return ImageList(root, class_names, entries, skipped)
