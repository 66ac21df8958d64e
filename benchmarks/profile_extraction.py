"""Where a cold cache fill spends its time, stage by stage, per image.

    python benchmarks/profile_extraction.py [--data FOLDER] [--images 320]

Each stage runs alone, on one thread unless said, over the same photos
(spread over all classes of ``--data``, ../shared/data/caltech101/train by
default), and prints milliseconds per image: reading the file, sha256,
decoding (JPEG draft mode as extraction does it; simplejpeg and Pillow), the
antialiased resize (extraction's uint8, the float one it replaced, TensorFlow's), the ``tf.numpy_function`` hop of the
tf.data pipeline, the forward pass of each engine at several batch sizes,
and the cache's journal writes and fold. Then the whole pipeline (``extraction.bottleneck_batches``) with each
engine, for comparison with its forward-only figure. Stages that overlap in
the pipeline (decoding runs beside the forward pass) add up to more than the
pipeline's time per image.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from retrain import backbones, engines
from retrain.cache import journal as journal_lib
from retrain.cache import merge
from retrain.cache.bottleneck_cache import BottleneckCache
from retrain.cache.identity import CacheIdentity
from retrain.data import decode, decoded_batches, images, resizing
from retrain.engines import extraction
from retrain.engines import litert as litert_lib
from retrain.quiet_tensorflow import import_tensorflow

DEFAULT_DATA = next(
    (
        folder / "shared" / "data" / "caltech101" / "train"
        for folder in Path(__file__).resolve().parents
        if (folder / "shared" / "data").is_dir()
    ),
    Path("../shared/data/caltech101/train"),
)


def per_image_ms(function, count, repeats=3):
    """Median over ``repeats`` of the ms per image of ``function()`` doing ``count`` images."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / count


def pillow_rgb(content, size):
    """uint8 [h, w, 3] decoded by Pillow alone (the draft ``decode`` applies)."""
    with Image.open(io.BytesIO(content)) as image:
        image.draft(None, (decode.PIXEL_SETTINGS["jpeg_draft_margin"] * size,) * 2)
        return np.asarray(image.convert("RGB"))


def cpu_and_wall_ms(function, count, repeats=3):
    """Medians over ``repeats`` of (process CPU ms, wall ms) per image of ``function()``."""
    cpu, wall = [], []
    for _ in range(repeats):
        started, clock = time.process_time(), time.perf_counter()
        function()
        cpu.append(time.process_time() - started)
        wall.append(time.perf_counter() - clock)
    return 1000 * statistics.median(cpu) / count, 1000 * statistics.median(wall) / count


def feed_rows(paths, size):
    """The pixel feed alone (``BatchDecoder`` as extraction runs it: read,
    hash, decode, resize on every core, 32 files a batch), no engine; CPU and
    wall ms per image, to set beside the one-thread stages above."""

    def feed():
        with decoded_batches.BatchDecoder(size) as decode:
            for start in range(0, len(paths), 32):
                decode(paths[start : start + 32])

    feed()
    cpu, wall = cpu_and_wall_ms(feed, len(paths))
    return [
        ("feed: BatchDecoder, all cores, CPU time", cpu),
        ("feed: BatchDecoder, all cores, wall time", wall),
    ]


def fill_ms(args, engine_name):
    """Wall ms per image of a cold ``BottleneckCache.update`` of ``--images``
    photos: extraction, journal and fold (the engine's flatbuffer is
    converted already, so building it is loading it)."""
    found = images.discover(args.data)
    step = max(1, len(found.entries) // args.images)
    subset = dataclasses.replace(found, entries=found.entries[::step][: args.images])
    with tempfile.TemporaryDirectory() as folder:
        choice = engines.EngineChoice(engine_name, args.backbone)
        cache = BottleneckCache(folder, args.backbone, engine=choice)
        started = time.perf_counter()
        report = cache.update(subset, progress=False)
        return 1000 * (time.perf_counter() - started) / max(1, report.extracted)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--backbone", default=backbones.DEFAULT_BACKBONE)
    parser.add_argument(
        "--litert_batches",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[1, 4, 8, 16, 32],
        help="LiteRT batch sizes to convert and time, e.g. 4 (each takes a conversion)",
    )
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"No photos: {args.data} is not a folder. Pass --data FOLDER.", file=sys.stderr)
        return 2
    tf = import_tensorflow()
    spec = backbones.get(args.backbone)
    size = spec.input_size
    found = images.discover(args.data)
    step = max(1, len(found.entries) // args.images)
    paths = [str(found.image_dir / e.relative_path) for e in found.entries[::step][: args.images]]
    count = len(paths)
    contents = [Path(p).read_bytes() for p in paths]
    print(
        f"{count} photos from {args.data}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; ms per image, median of 3"
    )

    rows = []
    rows.append(("read file", per_image_ms(lambda: [Path(p).read_bytes() for p in paths], count)))
    rows.append(
        ("sha256", per_image_ms(lambda: [hashlib.sha256(c).hexdigest() for c in contents], count))
    )
    rows.append(
        (
            "decode (draft; simplejpeg, Pillow if it cannot), to RGB array",
            per_image_ms(
                lambda: [decode.decode_rgb(p, size, content=c) for p, c in zip(paths, contents)],
                count,
            ),
        )
    )
    decoded = [decode.decode_rgb(p, size, content=c) for p, c in zip(paths, contents)]
    rows.append(
        (
            "  same, no draft mode",
            per_image_ms(
                lambda: [decode.decode_rgb(p, None, content=c) for p, c in zip(paths, contents)],
                count,
            ),
        )
    )
    rows.append(
        (
            "  Pillow alone (draft), to RGB array",
            per_image_ms(lambda: [pillow_rgb(c, size) for c in contents], count),
        )
    )
    sides = [max(a.shape[:2]) for a in decoded]
    resize = tf.function(
        lambda x: resizing.resize_to_input(x, size),
        input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)],
    )
    for array in decoded[:3]:
        resize(array)
    rows.append(
        (
            "antialiased resize, Pillow uint8 (extraction's)",
            per_image_ms(lambda: [resizing.resize_uint8(a, size) for a in decoded], count),
        )
    )
    floats = [a.astype(np.float32) for a in decoded]
    rows.append(
        (
            "  same filter, Pillow float band by band (until version 2)",
            per_image_ms(lambda: [resizing.resize_to_input(a, size) for a in floats], count),
        )
    )
    rows.append(
        (
            "  same filter, tf graph op (the exported model's)",
            per_image_ms(lambda: [resize(tf.constant(a)).numpy() for a in decoded], count),
        )
    )
    small = np.zeros((1, 1, 3), np.uint8)
    hop = tf.data.Dataset.range(count).map(
        lambda i: tf.numpy_function(lambda j: small, [i], tf.uint8)
    )
    rows.append(("tf.numpy_function hop, 1 thread", per_image_ms(lambda: list(hop), count)))
    rows += feed_rows(paths, size)
    with tempfile.TemporaryDirectory() as folder:
        identity = CacheIdentity(
            spec.name, "0" * 64, spec.feature_dim, "float16", "litert", "profile"
        )
        path = Path(folder) / "profile.h5"

        def journal_writes():
            journal = journal_lib.Journal(path, identity)
            for start in range(0, count, 32):
                records = journal_lib.Records()
                for i in range(start, min(count, start + 32)):
                    records.key.append(f"{i:064x}")
                    records.relative_path.append(paths[i])
                    records.size.append(1)
                    records.mtime_ns.append(1)
                    records.sha256.append("0" * 64)
                    records.bottleneck.append(np.ones(spec.feature_dim, np.float32))
                journal.append(records)

        def fold():
            merge.fold(path, identity)
            path.unlink()

        writes, folds = [], []
        for _ in range(3):
            writes.append(per_image_ms(journal_writes, count, 1))
            folds.append(per_image_ms(fold, count, 1))
        rows.append(("journal writes (batches of 32)", statistics.median(writes)))
        rows.append(("fold of that journal into the main file", statistics.median(folds)))

    pixels = np.stack([resizing.resize_to_input(a, size) for a in decoded[:64]])
    model = backbones.load(spec.name, include_top=False)
    keras_engine = engines.KerasEngine(model, size)
    forward = {}
    for batch in (8, 32, 64):
        chunks = [pixels[i : i + batch] for i in range(0, 64, batch)]
        keras_engine(chunks[0])
        forward[("keras", batch)] = per_image_ms(lambda: [keras_engine(c) for c in chunks], 64)
    litert = None
    if engines.runtime_available():
        with contextlib.suppress(engines.EngineCheckFailed):
            litert = engines.build("litert", spec.name, model=model)
    if litert is not None:
        for batch in args.litert_batches:
            data = litert_lib.convert_backbone(model, size, batch)
            with tempfile.NamedTemporaryFile(suffix=".tflite") as file:
                file.write(data)
                file.flush()
                engine = engines.LiteRTEngine(file.name)
                engine(pixels[:batch])
                forward[("litert", batch)] = per_image_ms(lambda: engine(pixels), 64)
    for (name, batch), ms in forward.items():
        rows.append((f"forward {name}, batch {batch}, all threads", ms))

    for name, engine in (("keras", keras_engine), ("litert", litert)):
        if engine is None:
            continue

        def pipeline():
            for _ in extraction.bottleneck_batches(paths, engine, size, 32):
                pass

        rows.append((f"whole pipeline ({name}), batch 32", per_image_ms(pipeline, count, 1)))
    if litert is not None:
        rows.append(
            ("cold fill (BottleneckCache.update, litert), batch 32", fill_ms(args, litert.name))
        )
    shares = ""
    if ("litert", getattr(litert, "batch_size", None)) in forward:
        forward_ms = forward[("litert", litert.batch_size)]
        shares = f"; the cold fill at {forward_ms / rows[-1][1]:.2f} of forward-only litert"

    width = max(len(name) for name, _ in rows)
    for name, ms in rows:
        print(f"{name:<{width}}  {ms:7.2f} ms  ({1000 / ms:6.0f} images/s)")
    print(f"decoded sides: median {int(np.median(sides))} px (largest side, after draft){shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
