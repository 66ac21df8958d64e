"""Thumbnails of the images the report page shows: small JPEGs in OUTPUT_DIR/thumbnails/.

A thumbnail is named from the image's path as the record and CSVs write it
(`text_escapes.one_line`), hashed, so a page rebuilt from the output folder
finds it, whatever bytes the image's name holds.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

from retrain.data.decode import ImageDecodeError, decode_rgb
from retrain.data.images import cache_key
from retrain.errors import RetrainError
from retrain.files import atomic_write
from retrain.files.text_escapes import one_line

logger = logging.getLogger(__name__)

THUMBNAIL_DIR = "thumbnails"
THUMBNAIL_SIDE = 128
# Largest thumbnail read back from a previous run's folder (they are ~5 KB).
MAX_THUMBNAIL_BYTES = 1 << 20


def thumbnail_path(image: str) -> str:
    """Where the thumbnail of a relative image path lives, relative to the output folder.

    Named from the path as the record and CSVs write it (`one_line`), so an
    image whose name is not UTF-8 finds its thumbnail on a rebuilt page too.
    """
    return f"{THUMBNAIL_DIR}/{cache_key(one_line(image))[:24]}.jpg"


def render_thumbnails(image_dir, paths: list[str]) -> dict[str, bytes]:
    """{relative path: JPEG bytes of at most THUMBNAIL_SIDE px per side} of the paths.

    Nothing is written. An image that no longer decodes gets no thumbnail
    (the page then shows its path only); any other failure for one image is
    a warning naming it, and the others are still made.
    """
    rendered = {}
    for relative in dict.fromkeys(paths):
        try:
            rendered[relative] = _thumbnail_jpeg(Path(image_dir) / relative)
        except (ImageDecodeError, FileNotFoundError):
            continue  # removed or damaged since the run read it: the page shows the path
        except Exception as error:  # noqa: BLE001 - one thumbnail never costs the others
            logger.warning(
                "Report: no thumbnail of %s (%s: %s).",
                one_line(relative),
                type(error).__name__,
                one_line(str(error)),
            )
    return rendered


def _thumbnail_jpeg(path: Path) -> bytes:
    from PIL import Image

    image = Image.fromarray(decode_rgb(path, target_size=THUMBNAIL_SIDE))
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_thumbnails(image_dir, paths: list[str], output_dir, rendered=None) -> int:
    """Writes the thumbnail of each path into output_dir; returns how many were written.

    ``rendered``: thumbnails already made ({path: JPEG bytes}, see
    `render_thumbnails`); the others are made here. One is never written twice.

    Raises:
      RetrainError when output_dir/thumbnails is a symbolic link (never
      written through).
    """
    folder = Path(output_dir) / THUMBNAIL_DIR
    if folder.is_symlink():
        raise RetrainError(
            f"{folder} is a symbolic link; retrain writes thumbnails only into "
            "a folder of its own. Remove the link."
        )
    folder.mkdir(parents=True, exist_ok=True)
    rendered = dict(rendered or {})
    missing = [
        path
        for path in paths
        if path not in rendered and not os.path.lexists(Path(output_dir) / thumbnail_path(path))
    ]
    rendered.update(render_thumbnails(image_dir, missing))
    written = 0
    for relative in dict.fromkeys(paths):
        target = Path(output_dir) / thumbnail_path(relative)
        if relative in rendered and not os.path.lexists(target):
            atomic_write.write_bytes(target, rendered[relative])
            written += 1
    return written
