"""Crafted hostile files for benchmarks/hostile_check.py, and the photo subsets.

A sparse file, a socket, a PNG bomb, a JPEG of a given byte length, an HDF5
cache whose vectors live in another file, the secret those vectors come
from, and the script that builds Keras models whose Lambda writes a file.
Each writes only the path it is given.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np


def copy_images(source: Path, target: Path, classes: dict, start: int, count: int) -> Path:
    """Copies files [start, start+count) of each source class (sorted) as target/<name>.

    `classes` maps target class name -> source class folder name. Modification
    times are kept (``copy2``), so a copy of a copy stays warm in a cache.
    """
    for name, source_class in classes.items():
        files = sorted(p for p in (source / source_class).iterdir() if p.is_file())
        (target / name).mkdir(parents=True, exist_ok=True)
        for path in files[start : start + count]:
            shutil.copy2(path, target / name / path.name)
    return target


def clone(folder: Path, target: Path) -> Path:
    """A copy of an image folder with the same relative paths, sizes and mtimes."""
    shutil.copytree(folder, target, copy_function=shutil.copy2)
    return target


def sparse_file(path: Path, head: bytes, size: int) -> bool:
    """`head` then a hole up to `size` bytes; False (file removed) if the disk is not sparse."""
    with open(path, "wb") as file:
        file.write(head)
        file.truncate(size)
    if os.stat(path).st_blocks * 512 > (8 << 20):
        os.unlink(path)
        return False
    return True


def unix_socket(path: Path) -> None:
    """A socket file at `path` (bound, then closed: the file stays)."""
    cwd = os.getcwd()
    os.chdir(path.parent)  # a socket path is limited to ~107 bytes; the name is short
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path.name)
    finally:
        os.chdir(cwd)


def png_bomb(path: Path, side: int) -> None:
    """A valid grayscale PNG side x side of zeros: a few hundred KB declaring side² pixels."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    compressor = zlib.compressobj(9)
    rows = bytes(side + 1) * 500  # filter byte 0 + a row of zeros, 500 rows at a time
    body = io.BytesIO()
    for start in range(0, side, 500):
        body.write(
            compressor.compress(
                rows if side - start >= 500 else rows[: (side - start) * (side + 1)]
            )
        )
    body.write(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", body.getvalue())
        + chunk(b"IEND", b"")
    )


def jpeg_of_size(source: Path, size: int) -> bytes:
    """`source` re-encoded as a JPEG of exactly `size` bytes (zeros after the end marker)."""
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGB")
    for scale in (1.0, 0.75, 0.5, 0.35, 0.25):
        small = image.resize((max(8, int(image.width * scale)), max(8, int(image.height * scale))))
        for quality in range(95, 4, -5):
            buffer = io.BytesIO()
            small.save(buffer, "JPEG", quality=quality)
            if buffer.tell() <= size:
                return buffer.getvalue() + bytes(size - buffer.tell())
    raise ValueError(f"cannot encode {source} in {size} bytes")


def external_cache(planted: Path, model: Path, secret: Path, rows) -> int:
    """A cache file like `model`, holding its `rows`, whose vectors live in the file `secret`.

    Same attributes, keys, paths, sizes, mtimes and digests as those rows of
    `model` (row numbers, ascending), so a run takes them for valid rows;
    ``images/bottleneck`` uses HDF5 external storage: reading it reads
    `secret`'s bytes. Returns the number of bytes it reads from `secret`.
    """
    import h5py

    rows = np.asarray(rows)
    with h5py.File(model, "r") as source, h5py.File(planted, "w") as out:
        out.attrs.update(dict(source.attrs))
        images = out.create_group("images")
        for name, dataset in source["images"].items():
            if name != "bottleneck":
                images.create_dataset(name, data=dataset[()][rows], dtype=dataset.dtype)
        shape = (len(rows),) + source["images/bottleneck"].shape[1:]
        dtype = source["images/bottleneck"].dtype
        nbytes = int(np.prod(shape)) * dtype.itemsize
        images.create_dataset("bottleneck", shape, dtype, external=[(str(secret), 0, nbytes)])
        failed = out.create_group("failed")
        for name, dataset in source["failed"].items():
            failed.create_dataset(name, data=dataset[()], dtype=dataset.dtype)
    return nbytes


def secret_token(seed: int = 21) -> bytes:
    """64 bytes of ordinary float16 values, unlikely to occur anywhere by chance."""
    values = np.random.default_rng(seed).uniform(-1, 1, 32).astype(np.float16)
    return values.tobytes()


def files_holding(folder: Path, token: bytes) -> list[str]:
    """Regular files under `folder` whose bytes contain `token` (symlinks not followed)."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            if path.is_file() and not path.is_symlink() and token in path.read_bytes():
                found.append(str(path.relative_to(folder)))
    return found


LAMBDA_MODEL_BUILDER = r"""
import os, sys
import keras
folder = sys.argv[1]
# The Lambda appends to the file named by $HOSTILE_MARKER whenever it runs
# (building, loading with safe_mode=False, predicting).
run = eval("lambda x: x + 0.0 * len(open(__import__('os').environ['HOSTILE_MARKER'], 'a').name)")
inputs = keras.Input((None, None, 3))
x = keras.layers.Lambda(run)(inputs)
x = keras.layers.GlobalAveragePooling2D()(x)
model = keras.Model(inputs, keras.layers.Dense(int(sys.argv[2]), activation="softmax")(x))
model.save(os.path.join(folder, "lambda.h5"))
model.save(os.path.join(folder, "lambda.keras"))
for name in ("lambda.h5", "lambda.keras"):  # proof that the files run code when trusted
    os.unlink(os.environ["HOSTILE_MARKER"])
    keras.models.load_model(os.path.join(folder, name), safe_mode=False)
    assert os.path.exists(os.environ["HOSTILE_MARKER"]), name
os.unlink(os.environ["HOSTILE_MARKER"])
"""


def npz_bomb(source: Path, target: Path, member: str = "bottleneck", size: int = 1 << 30) -> None:
    """A copy of the .npz `source` whose `member` array is `size` bytes of deflated zeros.

    The other members are kept, so a reader that checks the identity first
    gets as far as `member`; the file is about 1/1000 of `size`.
    """
    import zipfile

    header = io.BytesIO()
    rows = size // (1280 * 2)
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f2", "fortran_order": False, "shape": (rows, 1280)}
    )
    chunk = bytes(16 << 20)
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for name in old.namelist():
            if name != f"{member}.npy":
                new.writestr(name, old.read(name))
        with new.open(f"{member}.npy", "w", force_zip64=True) as out:
            out.write(header.getvalue())
            total = rows * 1280 * 2
            for start in range(0, total, len(chunk)):
                out.write(chunk[: total - start])
