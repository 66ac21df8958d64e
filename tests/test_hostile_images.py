"""Reading images is bounded (issue 21): huge and sparse files, FIFOs, sockets,
devices, decompression bombs, and a memory budget that counts the real peak.

Every hostile file is built here: a sparse 64 GB "JPEG", a FIFO, a UNIX
socket, a link to /dev/zero, a PNG whose header claims more pixels than its
body holds.
"""

import errno
import hashlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain import label_image
from retrain.data import decode, decode_memory, images, pixel_batches
from retrain.files import paths
from retrain.quiet_tensorflow import import_tensorflow

JPEG_HEADER = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def save(array, path, format=None, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=format, **options)
    return path


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(path, width, height, body_bytes=0):
    """A gray PNG whose header says width x height; its IDAT holds ``body_bytes`` of zeros."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", bytes(body_bytes))
        + png_chunk(b"IEND", b"")
    )
    return path


def vm_peak_delta(action):
    """(result of action(), bytes the peak RSS rose above the RSS before it), Linux only."""

    def status(key):
        with open("/proc/self/status") as file:
            return int(next(line for line in file if line.startswith(key)).split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # resets VmHWM to the current RSS
    before = status("VmRSS")
    result = action()
    return result, status("VmHWM") - before


def can_reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def photo():
    return data.chelsea()[:96, :128]


@pytest.fixture
def sparse_jpeg(tmp_path, photo):
    """photos/cats/x.jpg: a JPEG header, then 64 GB of holes; photos/cats/ok.jpg: a photo."""
    root = tmp_path / "photos"
    save(photo, root / "cats" / "ok.jpg")
    path = root / "cats" / "x.jpg"
    with open(path, "wb") as file:
        file.write(JPEG_HEADER)
        try:
            file.truncate(64 << 30)
        except OSError as error:
            pytest.skip(f"this file system cannot hold a sparse 64 GB file: {error}")
    if os.stat(path).st_blocks * 512 > 1 << 20:
        pytest.skip("the 64 GB file is not sparse here")
    return root, path


# --- huge files ----------------------------------------------------------------------------


def test_a_sparse_64_gb_jpeg_is_skipped_at_discovery_with_one_line_unread(sparse_jpeg, caplog):
    root, path = sparse_jpeg
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    found, rise = (
        vm_peak_delta(lambda: images.discover(root))
        if can_reset_peak()
        else (images.discover(root), 0)
    )
    assert time.monotonic() - start < 5
    assert rise < 64 << 20
    assert [e.relative_path for e in found.entries] == ["cats/ok.jpg"]
    [(relative, reason)] = found.skipped
    assert relative == "cats/x.jpg"
    assert reason.startswith("file too large (68,719,476,736 bytes; images over 256 MB")
    lines = [r.getMessage() for r in caplog.records if "x.jpg" in r.getMessage()]
    assert lines == [f"skipped cats/x.jpg: {reason}"]


def test_load_and_every_reader_refuse_the_sparse_file_fast_and_flat(sparse_jpeg):
    """The race: x.jpg became huge after discovery. load, decode_rgb (thumbnails,
    the conversion check) and the dataset builder refuse it without reading it."""
    _, path = sparse_jpeg
    import_tensorflow()  # for the dataset builder: its start-up is not what is timed
    start = time.monotonic()
    (pixels, outcome), rise = (
        vm_peak_delta(lambda: decode.load(path, 224, with_state=True))
        if can_reset_peak()
        else (decode.load(path, 224, with_state=True), 0)
    )
    assert pixels is None and outcome.reason.startswith("file too large (68,719,476,736 bytes")
    assert outcome.lasting and outcome.state.size == 64 << 30  # remembered by size and mtime
    with pytest.raises(decode.ImageDecodeError, match="file too large"):
        decode.decode_rgb(path, 224)
    outcomes = {}
    batches = list(pixel_batches.image_batches([path], 224, 4, outcomes=outcomes))
    assert not batches[0][2].numpy()[0] and outcomes[0].reason.startswith("file too large")
    assert time.monotonic() - start < 5
    assert rise < 64 << 20


def test_a_file_that_grew_past_the_cap_after_its_check_is_refused(tmp_path, photo, monkeypatch):
    path = save(photo, tmp_path / "a.jpg")
    cap = os.path.getsize(path)
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", cap)
    assert decode.load(path, 224)[0] is not None
    real_open = paths.open_regular

    def open_then_grow(name):  # fstat says cap bytes, then the file grows
        opened = real_open(name)
        result = opened.__enter__()
        with open(name, "ab") as file:
            file.write(bytes(100_000))
        return _Entered(opened, result)

    monkeypatch.setattr(paths, "open_regular", open_then_grow)
    pixels, outcome = decode.load(path, 224)
    assert pixels is None and outcome.reason.startswith("file too large (it grew past that")


class _Entered:
    """A context manager already entered (for wrapping ``paths.open_regular``)."""

    def __init__(self, manager, result):
        self.manager, self.result = manager, result

    def __enter__(self):
        return self.result

    def __exit__(self, *exc):
        return self.manager.__exit__(*exc)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_header_is_checked_before_the_body_is_read(tmp_path, monkeypatch):
    # 12000 x 12000 claimed by a 2 MB file: over the budget, found from the first bytes.
    path = png_claiming(tmp_path / "claims.png", 12000, 12000, body_bytes=2 << 20)
    real_open, read = paths.open_regular, []

    class Counting:
        def __init__(self, file):
            self.file = file

        def read(self, size=-1):
            chunk = self.file.read(size)
            read.append(len(chunk))
            return chunk

        def seek(self, *args):
            return self.file.seek(*args)

    def counting_open(name):
        opened = real_open(name)
        file, size, mtime_ns = opened.__enter__()
        return _Entered(opened, (Counting(file), size, mtime_ns))

    monkeypatch.setattr(paths, "open_regular", counting_open)
    pixels, outcome = decode.load(path, 224, with_state=True)
    assert pixels is None
    assert "12000x12000 PNG needs about" in outcome.reason and "budget is 512 MB" in outcome.reason
    assert sum(read) <= decode_memory.HEADER_BYTES
    assert outcome.state.size == os.path.getsize(path)  # remembered by size and mtime


@pytest.mark.parametrize("side", [100, 400])  # within and beyond the first HEADER_BYTES
def test_the_digest_covers_exactly_the_bytes_decoded(tmp_path, side):
    rng = np.random.default_rng(side)
    path = save(rng.integers(0, 255, (side, side, 3), dtype=np.uint8), tmp_path / "n.png")
    assert (os.path.getsize(path) > decode_memory.HEADER_BYTES) == (side == 400)
    pixels, outcome = decode.load(path, 224, with_state=True)
    assert pixels.shape == (side, side, 3)
    assert outcome.state.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert outcome.state == decode.file_state(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_stays_refused_from_its_header(tmp_path):
    # 20000 x 20000 = 400 megapixels in a few hundred bytes: over Pillow's bomb limit.
    path = png_claiming(tmp_path / "bomb.png", 20000, 20000, body_bytes=100)
    assert os.path.getsize(path) < 1000
    pixels, outcome = decode.load(path, 224)
    assert pixels is None and outcome.reason.startswith("image too large (")
    assert "decompression bomb" in outcome.reason
    with pytest.raises(decode.ImageDecodeError, match="image too large"):
        decode.decode_rgb(path, 224)


# --- FIFOs, sockets, devices -------------------------------------------------------------------


@pytest.fixture
def special_files(tmp_path, photo):
    """photos/cats holding ok.jpg and, all named *.jpg: a FIFO, a link to it, a UNIX
    socket and a link to /dev/zero. Returns (root, {name: expected reason})."""
    root = tmp_path / "photos"
    cats = root / "cats"
    save(photo, cats / "ok.jpg")
    os.mkfifo(cats / "pipe.jpg")
    os.symlink(cats / "pipe.jpg", cats / "to_pipe.jpg")
    os.symlink("/dev/zero", cats / "zero.jpg")
    expected = {
        "pipe.jpg": "not a regular file (FIFO)",
        "to_pipe.jpg": "not a regular file (FIFO)",
        "zero.jpg": "not a regular file (character device)",
    }
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(cats / "sock.jpg"))
        expected["sock.jpg"] = "not a regular file (socket)"
    except OSError:  # a socket path longer than the 108 bytes AF_UNIX allows
        pass
    yield root, expected
    server.close()


def run_python(script, *args, timeout=120):
    """Runs ``script`` in a fresh interpreter; a blocked open fails the test instead of hanging."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done


def test_fifos_sockets_and_devices_are_skipped_unopened_by_discovery(special_files):
    root, expected = special_files
    done = run_python(
        """
        import json, logging, sys
        logging.basicConfig(format="%(message)s")
        from retrain.data import images
        found = images.discover(sys.argv[1])
        print(json.dumps([[e.relative_path for e in found.entries], found.skipped]))
        """,
        root,
        timeout=60,
    )
    entries, skipped = json.loads(done.stdout)
    assert entries == ["cats/ok.jpg"]
    assert dict(skipped) == {f"cats/{name}": reason for name, reason in expected.items()}
    assert sorted(done.stderr.splitlines()) == sorted(
        f"skipped cats/{name}: {reason}" for name, reason in expected.items()
    )


def test_every_reader_refuses_a_special_file_put_in_place_of_an_image(special_files):
    """After discovery, a file may be replaced: load (extraction, label_image,
    calibration), decode_rgb (thumbnails, the conversion check), file_state
    (the plan's digest) and label_image's folder walk never block on it."""
    root, expected = special_files
    done = run_python(
        """
        import json, sys
        from retrain.data import decode, pixel_batches
        from retrain import label_image
        result = {}
        for path in sys.argv[2:]:
            pixels, outcome = decode.load(path, 224, with_state=True)
            try:
                decode.decode_rgb(path, 224)
                thumbnail = "decoded"
            except decode.ImageDecodeError as error:
                thumbnail = error.reason
            try:
                decode.file_state(path)
                state = "read"
            except OSError as error:
                state = error.strerror
            result[path] = [outcome.reason, thumbnail, state]
        outcomes = {}
        list(pixel_batches.image_batches(sys.argv[2:], 224, 8, outcomes=outcomes, hash_files=True))
        result["batches"] = [outcomes[i].reason for i in range(len(sys.argv) - 2)]
        result["label_image"] = label_image.image_paths([sys.argv[1]])[0]
        print(json.dumps(result))
        """,
        root,
        *(root / "cats" / name for name in expected),
        timeout=60,
    )
    result = json.loads(done.stdout)
    for name, reason in expected.items():
        path = str(root / "cats" / name)
        if reason.endswith("(socket)"):  # open() of a socket fails: ENXIO
            reason = os.strerror(errno.ENXIO)
        assert result[path] == [f"cannot read: {reason}", f"cannot read: {reason}", reason]
    assert result["batches"] == [result[str(root / "cats" / n)][0] for n in expected]
    assert result["label_image"] == [str(root / "cats" / "ok.jpg")]


def test_label_image_keeps_only_regular_image_files_of_a_folder(special_files, tmp_path):
    root, _ = special_files
    huge = root / "cats" / "huge.jpg"
    with open(huge, "wb") as file:
        file.write(JPEG_HEADER)
        file.truncate(decode_memory.MAX_FILE_BYTES + 1)
    assert label_image.image_paths([str(root)])[0] == [str(root / "cats" / "ok.jpg")]


# --- the memory budget counts the real peak ----------------------------------------------------

MODES = ["L", "RGB", "RGBA", "P", "I;16", "CMYK", "LA"]


def mode_file(folder, mode, width, height):
    """An image file of ``mode`` (P with transparency; CMYK as JPEG; others PNG), noisy content."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    path = folder / f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    if mode == "I;16":
        gray = (rng.integers(0, 65535, (height, width))).astype(">u2")
        raw = b"".join(b"\x00" + row.tobytes() for row in gray)
        header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
        path.write_bytes(
            b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(raw, 1))
            + png_chunk(b"IEND", b"")
        )
    elif mode == "P":
        rgb.convert("P").save(path, transparency=0, compress_level=1)
    elif mode == "CMYK":
        rgb.convert("CMYK").save(path, quality=90)
    else:
        image = rgb.convert(mode)
        if "A" in mode:
            image.putalpha(Image.fromarray(rng.integers(0, 255, (height, width), dtype=np.uint8)))
        image.save(path, compress_level=1)
    with Image.open(path) as check:
        assert check.mode == mode and ("transparency" in check.info or mode != "P")
    return path


def estimate(path, target_size):
    with Image.open(path) as image:
        full_size = image.size
        if target_size and image.format == "JPEG":
            image.draft(None, (decode.PIXEL_SETTINGS["jpeg_draft_margin"] * target_size,) * 2)
        return decode_memory.peak_bytes(image, os.path.getsize(path), full_size, target_size)


@pytest.mark.parametrize("mode", MODES)
def test_an_image_just_over_the_budget_is_refused_and_one_just_under_decodes(tmp_path, mode):
    path = mode_file(tmp_path, mode, 300, 200)
    needed = estimate(path, 224)
    pixels, outcome = decode.load(path, 224, memory_budget=needed)
    assert pixels is not None and pixels.shape == (200, 300, 3), outcome
    pixels, outcome = decode.load(path, 224, memory_budget=needed - 1)
    assert pixels is None and "too large to decode within the memory budget" in outcome.reason


@pytest.mark.parametrize("mode", MODES + ["I"])
def test_conversion_in_strips_gives_the_pixels_of_the_whole_image(tmp_path, mode, monkeypatch):
    if mode == "I":  # no supported format decodes to "I" in Pillow 13; it can still be met
        image = Image.fromarray(np.random.default_rng(1).integers(-9, 70000, (37, 53), np.int32))
    else:
        image = Image.open(mode_file(tmp_path, mode, 53, 37))
        image.load()
    whole = np.asarray(decode._to_rgb(image))
    monkeypatch.setattr(decode_memory, "STRIP_PIXELS", 100)  # strips of 1 row, the last one shorter
    assert np.array_equal(decode.rgb_pixels(image), whole)
    monkeypatch.setattr(decode_memory, "STRIP_PIXELS", 53 * 5)
    assert np.array_equal(decode.rgb_pixels(image), whole)


MEASURE = """
import ctypes, json, os, sys
import numpy as np
from PIL import Image
from retrain.data import decode, decode_memory, resizing

def status(key):
    with open("/proc/self/status") as file:
        return int(next(line for line in file if line.startswith(key)).split()[1]) * 1024

def measured(action):
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    before = status("VmRSS")
    action()
    return status("VmHWM") - before

def decode_and_resize(path, size):
    pixels, outcome = decode.load(path, size)
    assert pixels is not None, outcome
    resizing.resize_to_input(pixels, size)

warm, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if path != "I":
    decode_and_resize(os.path.join(warm, os.path.basename(path)), size)  # codecs loaded
    decode_and_resize(path, size)  # the allocator in the state of a long run
    print(measured(lambda: decode_and_resize(path, size)))
    sys.exit()
# No supported format decodes to "I" in Pillow 13: a TIFF does, and decoding
# it from the file (not from an array: that makes a copy) is what is measured.
tiff = os.path.join(warm, "i.tiff")
Image.fromarray(np.random.default_rng(0).integers(-9, 70000, (1500, 2000), np.int32)).save(tiff)

def decoded():  # as decode_rgb: the image is gone before the resize
    with Image.open(tiff) as image:
        image.load()
        return decode.rgb_pixels(image)

resizing.resize_to_input(decoded(), size)
with Image.open(tiff) as image:
    print(json.dumps([decode_memory.peak_bytes(image, 0, target_size=size),
                      measured(lambda: resizing.resize_to_input(decoded(), size))]))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not can_reset_peak(),
    reason="measures the peak RSS through /proc/self/clear_refs (Linux)",
)
def test_the_estimate_bounds_the_measured_peak_of_each_mode(tmp_path):
    """Peak RSS of load + resize, in a fresh process per mode, against ``peak_bytes``:
    never under, at most 1.5 times over (3 megapixels; 12 for the JPEGs, drafted)."""
    (tmp_path / "big").mkdir()
    (tmp_path / "warm").mkdir()
    cases = {}
    for mode in MODES:
        path = mode_file(tmp_path / "big", mode, 2000, 1500)
        mode_file(tmp_path / "warm", mode, 64, 48)
        cases[mode] = (str(path), 224, estimate(path, 224))
    cases["CMYK"] = (cases["CMYK"][0], 1000, estimate(cases["CMYK"][0], 1000))  # full size
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8))
    for name, options in (("JPEG drafted", {}), ("progressive JPEG", {"progressive": True})):
        path = tmp_path / "big" / f"{name}.jpg"
        photo.save(path, quality=90, **options)
        photo.resize((64, 48)).save(tmp_path / "warm" / path.name, quality=90, **options)
        cases[name] = (str(path), 224, estimate(path, 224))
    for name, mode in (("WebP RGB", "RGB"), ("WebP RGBA", "RGBA")):
        path = tmp_path / "big" / f"{mode}.webp"
        Image.open(cases[mode][0]).save(path, quality=80)
        Image.open(tmp_path / "warm" / f"{mode}.png").save(tmp_path / "warm" / path.name)
        cases[name] = (str(path), 224, estimate(path, 224))
    # One fresh process a case: how much a decode adds to the peak depends on
    # what the allocator kept from earlier ones.
    results = {
        name: [needed, int(run_python(MEASURE, tmp_path / "warm", path, size).stdout)]
        for name, (path, size, needed) in cases.items()
    }
    results["I"] = json.loads(run_python(MEASURE, tmp_path / "warm", "I", 224).stdout)
    print(
        {
            name: f"{peak / 2**20:.1f} MB, estimate x{needed / peak:.2f}"
            for name, (needed, peak) in results.items()
        }
    )
    for name, (needed, peak) in results.items():
        assert peak <= needed <= 1.5 * peak, (name, needed / 2**20, peak / 2**20)


def test_a_run_skips_each_hostile_file_with_one_line_and_finishes(special_files, tmp_path):
    """The whole run: a sparse 64 GB x.jpg, a FIFO, a link to it, a socket and
    /dev/zero among photos; exit 0, one warning line each, all in skipped_images.txt."""
    root, expected = special_files
    rng = np.random.default_rng(0)
    for name, pixels in (("cats", data.chelsea()), ("cups", data.coffee())):
        for number in range(8):
            top, left = rng.integers(0, 40, 2)
            save(pixels[top : top + 200, left : left + 250], root / name / f"{number}.jpg")
    with open(root / "cats" / "x.jpg", "wb") as file:
        file.write(JPEG_HEADER)
        try:
            file.truncate(64 << 30)
        except OSError as error:
            pytest.skip(f"this file system cannot hold a sparse 64 GB file: {error}")
    expected["x.jpg"] = "file too large (68,719,476,736 bytes"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "retrain",
            "--image_dir",
            str(root),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    listed = (tmp_path / "out" / "skipped_images.txt").read_text().splitlines()
    for name, reason in expected.items():
        lines = [line for line in done.stderr.splitlines() if f"cats/{name}:" in line]
        assert len(lines) == 1 and f"skipped cats/{name}: {reason}" in lines[0], done.stderr
        assert [line for line in listed if line.startswith(f"cats/{name}\t{reason}")]
