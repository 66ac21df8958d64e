"""File size, single-image latency and held-out accuracy of every export format.

    python benchmarks/exports.py [--image_dir FOLDER] [--classes N] [--train_per_class 60]
                                 [--held_out_per_class 20] [--work_dir DIR]

Protocol (the one the issue's acceptance check uses): from each of the first
--classes class folders of --image_dir, --train_per_class photos go into a
training folder and the next --held_out_per_class into a held-out folder (each
class's files in sha256-of-name order, so the choice is fixed). A real
`python -m retrain` run on the training folder writes model.keras, the
SavedModel and model_float32/float16/int8.tflite; then every export labels the
held-out folder through the real `python -m retrain.label_image --json`, and
the SavedModel's serving_default signature is called with the JPEG bytes from
a fresh process that imports only TensorFlow.

Printed: a Markdown table (file size; median single-image latency in this
process, of `predict` on one resized image, or of the serving signature on one
JPEG's bytes; held-out top-1 accuracy; top-1 agreement with model.keras), then
how often the serving signature and label_image give the same label. Default data: ../shared/data/flowers128, 5 classes x (60 + 68),
so 340 held-out photos as in the check (which has 17 classes x (60 + 20)).
"""

import argparse
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()

from retrain.data import decode, resizing  # noqa: E402
from retrain.export import loaders

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers128"
KINDS = ("float32", "float16", "int8")
LATENCY_ROUNDS = 30
SERVING_ROW = "SavedModel serving_default (JPEG bytes)"

SERVING_SCRIPT = """
import json, sys
import tensorflow as tf
serving = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
paths = sys.argv[2:]
labels = []
for start in range(0, len(paths), 32):
    batch = tf.constant([open(path, "rb").read() for path in paths[start:start + 32]])
    labels += [label.decode() for label in serving(images=batch)["label"].numpy()]
print(json.dumps(dict(zip(paths, labels))))
"""


def split_folders(image_dir, classes, train_per_class, held_out_per_class, work_dir):
    """Symlinks the chosen photos into work_dir/train/<class> and work_dir/held_out/<class>."""
    chosen = 0
    for class_dir in sorted(p for p in Path(image_dir).iterdir() if p.is_dir()):
        files = sorted(
            (p for p in class_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")),
            key=lambda p: hashlib.sha256(p.name.encode()).hexdigest(),
        )
        if len(files) < train_per_class + held_out_per_class:
            continue
        for part, selected in (
            ("train", files[:train_per_class]),
            ("held_out", files[train_per_class : train_per_class + held_out_per_class]),
        ):
            (work_dir / part / class_dir.name).mkdir(parents=True, exist_ok=True)
            for path in selected:
                link = work_dir / part / class_dir.name / path.name
                if not link.exists():
                    link.symlink_to(path.resolve())
        chosen += 1
        if chosen == classes:
            return
    sys.exit(
        f"exports.py: only {chosen} classes of {image_dir} have "
        f"{train_per_class + held_out_per_class} JPEGs; lower --classes or the counts."
    )


def run(*command):
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True)
    if result.returncode not in (0, 1):
        sys.exit(
            f"exports.py: {' '.join(command[:3])} failed ({result.returncode}): {result.stderr}"
        )
    return result.stdout


def label_through_cli(graph, labels, folder):
    """{image path: top label} from `python -m retrain.label_image --json`."""
    document = json.loads(
        run(
            "-m",
            "retrain.label_image",
            "--graph",
            str(graph),
            "--labels",
            str(labels),
            "--image",
            str(folder),
            "--json",
            "--top_k",
            "1",
        )
    )
    return {result["image"]: result["predictions"][0]["label"] for result in document["results"]}


def latencies_ms(graphs, image, rounds=LATENCY_ROUNDS):
    """{name: (median, best) milliseconds of one single-image call}, the models taking turns.

    Each export's predict() gets one image already decoded and resized; the
    serving signature gets the JPEG bytes (decoding and resizing included).
    Taking turns spreads a busy machine's noise over all of them alike.
    """
    tf = import_tensorflow()
    calls = {}
    for name, graph in graphs.items():
        model = loaders.load_pixel_classifier(str(graph))
        size = model.input_size
        pixels = resizing.resize_to_input(decode.decode_rgb(image, target_size=size), size)[None]
        calls[name] = lambda model=model, pixels=pixels: model.predict(pixels)
    serving = tf.saved_model.load(str(graphs["SavedModel (pixels)"])).signatures["serving_default"]
    content = tf.constant([Path(image).read_bytes()])
    calls[SERVING_ROW] = lambda: serving(images=content)["label"].numpy()
    times = {name: [] for name in calls}
    for round_ in range(rounds + 3):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_ >= 3:  # the first calls trace, allocate and warm caches
                times[name].append(time.perf_counter() - start)
    return {
        name: (1000 * statistics.median(values), 1000 * min(values))
        for name, values in times.items()
    }


def decode_agreement(paths, size):
    """(identical, compared, largest difference) of the serving graph's decode + resize vs
    label_image's (Pillow), on each JPEG and its 4x and 8x enlargements (so decoded by
    libjpeg at reduced scale whenever the enlarged side reaches 4x the input side)."""
    from PIL import Image

    from retrain.export import saved_model

    identical, compared, largest = 0, 0, 0.0
    for path in paths:
        original = Path(path).read_bytes()
        versions = [original]
        with Image.open(io.BytesIO(original)) as image:
            for factor in (4, 8):
                buffer = io.BytesIO()
                image.convert("RGB").resize(
                    (image.width * factor, image.height * factor), Image.BICUBIC
                ).save(buffer, "JPEG", quality=90)
                versions.append(buffer.getvalue())
        for content in versions:
            expected = resizing.resize_to_input(
                decode.decode_rgb(path, size, content=content), size
            )
            decoded = np.asarray(saved_model.decode_image_bytes(content, size))
            difference = float(np.abs(decoded - expected).max())
            identical += difference == 0
            compared += 1
            largest = max(largest, difference)
    return identical, compared, largest


def size_mb(path):
    path = Path(path)
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_dir", default=str(DEFAULT_DATA))
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--train_per_class", type=int, default=60)
    parser.add_argument("--held_out_per_class", type=int, default=68)
    parser.add_argument("--work_dir", default="output/bench_exports")
    parser.add_argument(
        "--decode_sample_every",
        type=int,
        default=5,
        help="compare the in-graph decoding on every Nth held-out photo",
    )
    args = parser.parse_args()
    if not Path(args.image_dir).is_dir():
        sys.exit(f"exports.py: no photo folder at {args.image_dir}; pass --image_dir.")
    work = Path(args.work_dir)
    split_folders(args.image_dir, args.classes, args.train_per_class, args.held_out_per_class, work)
    out = work / "run"
    started = time.perf_counter()
    run(
        "-m",
        "retrain",
        "--image_dir",
        str(work / "train"),
        "--bottleneck_dir",
        str(work / "cache"),
        "--output_dir",
        str(out),
        "--saved_model_dir",
        str(out / "saved_model"),
        "--tflite",
        *KINDS,
    )
    print(f"Training run with all exports: {time.perf_counter() - started:.0f} s", file=sys.stderr)

    held_out = work / "held_out"
    truth = {str(p): p.parent.name for p in sorted(held_out.glob("*/*"))}
    graphs = {
        "model.keras": out / "model.keras",
        "SavedModel (pixels)": out / "saved_model",
        **{f"model_{kind}.tflite": out / f"model_{kind}.tflite" for kind in KINDS},
    }
    predicted = {
        name: label_through_cli(graph, out / "labels.txt", held_out)
        for name, graph in graphs.items()
    }
    predicted[SERVING_ROW] = json.loads(
        subprocess.run(
            [sys.executable, "-c", SERVING_SCRIPT, str(out / "saved_model"), *truth],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        ).stdout.splitlines()[-1]
    )
    reference = predicted["model.keras"]
    latency = latencies_ms(graphs, next(iter(truth)))
    print(
        f"{len(truth)} held-out photos, {args.classes} classes, {args.train_per_class} "
        f"training photos a class ({args.image_dir}).\n"
    )
    print(
        "| export | file size (MB) | single-image latency, median / best (ms) | held-out top-1 "
        "| agrees with .keras |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, labels in predicted.items():
        accuracy = np.mean([labels[p] == truth[p] for p in truth])
        agreement = np.mean([labels[p] == reference[p] for p in truth])
        size = size_mb(graphs.get(name, out / "saved_model"))
        median, best = latency[name]
        print(
            f"| {name} | {size:.1f} | {median:.1f} / {best:.1f} | {accuracy:.3f} | {agreement:.3f} |"
        )
    same = sum(predicted[SERVING_ROW][p] == predicted["SavedModel (pixels)"][p] for p in truth)
    print(
        f"\nserving_default on JPEG bytes, called from a fresh process with plain TensorFlow: "
        f"same label as label_image for {same}/{len(truth)} photos."
    )
    float32, int8 = (size_mb(out / f"model_{kind}.tflite") for kind in ("float32", "int8"))
    print(f"int8 file / float32 file: {int8 / float32:.2f}")
    size = loaders.load_pixel_classifier(str(out / "model_float32.tflite")).input_size
    identical, compared, largest = decode_agreement(list(truth)[:: args.decode_sample_every], size)
    print(
        f"In-graph decode + resize vs Pillow's: identical pixels for {identical}/{compared} JPEGs "
        f"(every {args.decode_sample_every}th held-out photo, and it enlarged 4x and 8x); "
        f"largest difference {largest:g} (of 255)."
    )


if __name__ == "__main__":
    main()
