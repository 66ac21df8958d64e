"""`make bench`: retrain against what a user would run instead, in one table.

    python benchmarks/bench.py [--data FOLDER] [--images 3000] [--repeats 3] [--epochs 10]

On one folder of labelled photos (../shared/data/caltech101/train by default,
``--images`` of them spread evenly over the classes, linked into a temporary
folder so every method sees the same files and the same hash split), one run
measures:

1. forward-only images/s of each engine of ``--engines`` (Keras graph, LiteRT
   float, LiteRT int8) on pre-decoded, pre-resized tensors: the limit of a
   cache fill; building them here does each LiteRT conversion before any
   timing, as after any first run on a machine; measured again before each
   repeat of (2), so its medians interleave with the fills';
2. our cold run (``python -m retrain`` with an empty bottleneck cache, the
   ``--engine`` engine): extraction images/s once the engine is built, its
   share of the same engine's forward-only rate and of LiteRT float's, and
   the whole run end to end (wall, test accuracy); then a cold fill with each
   other LiteRT engine of (1), interleaved with it, reported the same way;
3. retrain.py's method: decode one image, one forward call per image;
4. the Keras transfer-learning recipe: ``image_dataset_from_directory`` +
   the same frozen backbone + a Dense head, ``model.fit`` for ``--epochs``
   epochs (the backbone recomputed every epoch), trained on our training
   bucket, validated on our validation bucket, tested on our test bucket;
5. our warm rerun (every vector cached), with where its seconds go;

and the peak resident memory of each (every measurement runs in its own
process). Figures of several repeats are medians; ratios come from this run.
The machine may be shared: compare ratios, not absolute speeds, across runs.
"""

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHARED_DATA = next(
    (
        folder / "shared" / "data"
        for folder in Path(__file__).resolve().parents
        if (folder / "shared" / "data").is_dir()
    ),
    Path("../shared/data"),
)
DEFAULT_DATA = SHARED_DATA / "caltech101" / "train"
_FORWARD_IMAGES = 64
# The forward-only engines, the float LiteRT one (the yardstick of every fill) second.
ENGINES = ("keras", "litert", "litert-int8")
FLOAT_LITERT = "litert"


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_rate(function, count, repeats):
    """Median images/s of ``repeats`` calls of ``function`` doing ``count`` images."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


# --- parts: each runs in its own process and prints one JSON line ------------


def part_forward(args):
    """Forward-only images/s of each engine of ``args.engines`` on pre-decoded tensors.

    A LiteRT engine that cannot be built here (no runtime, or its conversion
    fails its check) is left out, with the reason under "skipped".
    """
    import numpy as np

    from retrain import backbones, engines
    from retrain.data import decode, images, resizing

    spec = backbones.get(args.backbone)
    found = images.discover(args.folder)
    paths = [found.image_dir / e.relative_path for e in found.entries[:_FORWARD_IMAGES]]
    pixels = np.stack(
        [
            resizing.resize_to_input(decode.decode_rgb(p, spec.input_size), spec.input_size)
            for p in paths
        ]
    )
    model = backbones.load(spec.name)
    candidates, skipped = {}, {}
    for name in args.engines.split(","):
        if name != "keras" and not engines.runtime_available():
            skipped[name] = "the ai-edge-litert runtime is not installed"
            continue
        try:
            candidates[name] = engines.build(name, spec.name, model=model)
        except Exception as error:  # noqa: BLE001 - any failure to build: say which, go on
            skipped[name] = f"{type(error).__name__}: {error}"
    result = {"engines": {}, "skipped": skipped}
    for name, engine in candidates.items():
        batch = getattr(engine, "batch_size", None) if name != "keras" else 32
        batch = batch or engines.LITERT_BATCH
        chunks = [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
        engine(chunks[0])
        rate = median_rate(lambda: [engine(chunk) for chunk in chunks], len(pixels), args.repeats)
        result["engines"][name] = {"images_per_s": rate, "batch": batch}
    result["peak_mib"] = peak_mib()
    return result


def part_retrain_py(args):
    """retrain.py's method of filling its cache, image by image, with the same weights.

    Per image, as retrain.py's ``create_bottleneck_file``: read the file,
    one call that decodes (TensorFlow's decoder, full size) and resizes
    bilinearly, one forward call on a batch of one, then the vector written
    as a comma-separated text file (its cache format).
    """
    import numpy as np

    from retrain import backbones, engines
    from retrain.data import images
    from retrain.quiet_tensorflow import import_tensorflow

    tf = import_tensorflow()
    spec = backbones.get(args.backbone)
    found = images.discover(args.folder)
    step = max(1, len(found.entries) // args.retrain_py_images)
    paths = [found.image_dir / e.relative_path for e in found.entries[::step]]
    paths = paths[: args.retrain_py_images]
    engine = engines.KerasEngine(backbones.load(spec.name), spec.input_size, batch_size=1)

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def decode_and_resize(contents):
        pixels = tf.io.decode_image(contents, channels=3, expand_animations=False)
        pixels = tf.expand_dims(tf.cast(pixels, tf.float32), 0)
        return tf.image.resize(pixels, [spec.input_size, spec.input_size], method="bilinear")

    folder = Path(tempfile.mkdtemp(prefix="retrain-py-bottlenecks-"))

    def one(number, path):
        contents = tf.io.gfile.GFile(str(path), "rb").read()
        vector = np.squeeze(engine(decode_and_resize(tf.constant(contents)).numpy()))
        (folder / f"{number}.txt").write_text(",".join(str(x) for x in vector))

    try:
        one(0, paths[0])
        rate = median_rate(
            lambda: [one(n, path) for n, path in enumerate(paths)], len(paths), args.repeats
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"images_per_s": rate, "images": len(paths), "peak_mib": peak_mib()}


def part_ours(args):
    """One `python -m retrain` run in this process, timed phase by phase."""
    started = time.perf_counter()
    from retrain.quiet_tensorflow import import_tensorflow

    import_tensorflow()
    from retrain import backbones, evaluation, export, report, run
    from retrain.cache import bottleneck_cache
    from retrain.config import Config
    from retrain.training import classifier

    phases = {"import": time.perf_counter() - started}
    # Work the run does in its background threads, beside training: timed
    # apart, since it overlaps the main thread's phases.
    beside = {}

    def timed(owner, name, phase):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                into = phases if threading.current_thread() is threading.main_thread() else beside
                into[phase] = into.get(phase, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(bottleneck_cache.BottleneckCache, "update", "cache (plan, extract)")
    timed(bottleneck_cache.BottleneckCache, "read", "read vectors")
    timed(classifier, "train_classifier", "train head")
    timed(evaluation, "write_metrics", "evaluate, metrics")
    timed(report, "find_data_checks", "data checks")
    timed(report, "write_run_report", "report page, figures, thumbnails")
    timed(backbones, "load", "export: build backbone")
    timed(export, "build_classifier", "export: build classifier")
    timed(export, "save_classifier", "export: save .keras")
    config = Config(
        image_dir=str(args.folder),
        bottleneck_dir=str(args.cache),
        output_dir=str(args.output),
        engine=args.engine,
    )
    result = run.run(config)
    phases["total in process"] = time.perf_counter() - started
    accounted = sum(v for k, v in phases.items() if k != "total in process")
    phases["other (discover, settings, predict, waiting for the threads)"] = (
        phases["total in process"] - accounted
    )
    cache = result.cache_report
    return {
        "extracted": cache.extracted,
        "reused": cache.reused,
        "engine": cache.engine,
        "extract_seconds": cache.extract_seconds,
        "accuracy": result.evaluation.accuracy if result.evaluation else None,
        "phases": phases,
        "beside": beside,
        "peak_mib": peak_mib(),
    }


def part_keras_recipe(args):
    """image_dataset_from_directory + frozen backbone + Dense head, model.fit."""
    from retrain.quiet_tensorflow import import_tensorflow

    tf = import_tensorflow()
    import keras

    from retrain import backbones

    spec = backbones.get(args.backbone)
    size = (spec.input_size, spec.input_size)

    def dataset(bucket, shuffle):
        return keras.utils.image_dataset_from_directory(
            args.folder / bucket,
            image_size=size,
            batch_size=32,
            shuffle=shuffle,
            seed=0,
            verbose=False,
        ).prefetch(tf.data.AUTOTUNE)

    train_ds, val_ds = dataset("training", True), dataset("validation", False)
    test_ds = dataset("testing", False)
    classes = len(os.listdir(args.folder / "training"))
    base = backbones.load(spec.name)
    base.trainable = False
    inputs = keras.Input(size + (3,))
    x = base(inputs, training=False)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(classes)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train_ds, validation_data=val_ds, epochs=args.epochs, verbose=0)
    _, accuracy = model.evaluate(test_ds, verbose=0)
    return {"accuracy": float(accuracy), "peak_mib": peak_mib()}


PARTS = {
    "forward": part_forward,
    "retrain_py": part_retrain_py,
    "ours": part_ours,
    "keras_recipe": part_keras_recipe,
}


def run_part(name, **options):
    """Runs a part in a fresh interpreter: (its JSON result, wall seconds)."""
    command = [sys.executable, __file__, "--part", name]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench: part {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


# --- the table -----------------------------------------------------------------


def link_sample(image_dir, count, folder):
    """Links ``count`` images of ``image_dir`` (evenly over classes) under ``folder``.

    Returns {bucket: folder} trees for the Keras recipe, with the same hash
    split as retrain's (which runs on ``folder / "all"``).
    """
    from retrain.data import images

    found = images.discover(image_dir)
    entries = found.entries
    if 0 < count < len(entries):  # evenly spaced over the folder's (class-sorted) images
        entries = [entries[i * len(entries) // count] for i in range(count)]
    for entry in entries:
        source = (found.image_dir / entry.relative_path).resolve()
        for tree in ("all", entry.split_bucket):
            target = folder / tree / entry.relative_path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(source, target)
    for bucket in images.BUCKETS:  # image_dataset_from_directory needs every class
        for name in found.class_names:
            (folder / bucket / name).mkdir(parents=True, exist_ok=True)
    return len(entries), len(found.class_names)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="folder with one sub-folder of photos per class",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=3000,
        help="photos to use, spread over the classes (0: all; a folder of at most this many is used whole)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--retrain_py_images", type=int, default=200)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument(
        "--engine", default="auto", help="the engine of our end-to-end runs (retrain's --engine)"
    )
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="engines timed forward only, comma-separated; the LiteRT ones also fill a cold cache",
    )
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        if args.part == "ours":  # ends as `python -m retrain` does
            from retrain.cli import exit_without_teardown

            exit_without_teardown(0)
        return 0
    if not args.data.is_dir():
        print(
            f"bench: no photos at {args.data}; pass --data FOLDER (one sub-folder per class).",
            file=sys.stderr,
        )
        return 2
    if args.repeats < 1 or args.epochs < 1 or args.images < 0:
        parser.error(
            f"need --repeats >= 1, --epochs >= 1, --images >= 0. Received: "
            f"repeats={args.repeats}, epochs={args.epochs}, images={args.images}"
        )

    work = Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    try:
        return bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(args, work):
    count, classes = link_sample(args.data, args.images, work / "photos")
    folder = work / "photos" / "all"
    common = {"backbone": args.backbone, "repeats": args.repeats}
    print(
        f"bench: {count} photos, {classes} classes from {args.data}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the start",
        file=sys.stderr,
    )
    # The first forward part also does the machine's one-time conversions.
    forward, _ = run_part("forward", folder=folder, engines=args.engines, **common)
    for name, why in forward["skipped"].items():
        print(f"bench: no forward-only figure for the {name} engine: {why}", file=sys.stderr)
    runs = our_runs(args, work, folder, forward, common)
    forward = median_forward([forward, *runs.forwards])
    retrain_py, _ = run_part(
        "retrain_py", folder=folder, retrain_py_images=args.retrain_py_images, **common
    )
    recipe, recipe_seconds = run_part(
        "keras_recipe", folder=work / "photos", epochs=args.epochs, **common
    )
    print(
        f"{count} photos, {classes} classes ({args.data}); {os.cpu_count()} CPUs; medians "
        f"of {args.repeats} (forward, our runs, retrain.py's method); the recipe ran once"
    )
    rows = [("method", "images/s", "wall s", "vs", "test acc", "peak RSS MiB")]
    rows += extraction_rows(forward, runs)
    rows += end_to_end_rows(args, runs, retrain_py, (recipe, recipe_seconds))
    print_table(rows)
    print_warm_phases(runs.warms)
    return 0


@dataclasses.dataclass(frozen=True)
class OurRuns:
    """Our runs of every repeat: ``colds`` {engine: [(part result, wall s)]}, in
    the order run; ``main`` the engine ``--engine`` resolved to (its cold runs
    are the end-to-end ones); ``warms`` the warm reruns on its caches; ``forwards``
    the forward parts run between repeats."""

    colds: dict
    main: str
    warms: list
    forwards: list


def our_runs(args, work, folder, forward, common):
    """Per repeat: a cold and a warm run with ``--engine``, then a cold fill with
    each other LiteRT engine that ``forward`` could build (interleaved, so a
    slow minute of a shared machine touches every engine alike)."""
    colds, warms, forwards, main = {}, [], [], None
    fill_engines = [name for name in forward["engines"] if name != "keras"]
    for repeat in range(args.repeats):
        if repeat:  # forward only again, between the fills, for interleaved medians
            forwards.append(run_part("forward", folder=folder, engines=args.engines, **common)[0])
        cache, output = work / f"cache{repeat}", work / f"out{repeat}"
        options = dict(folder=folder, cache=cache, output=output, engine=args.engine, **common)
        cold = run_part("ours", **options)
        main = cold[0]["engine"]
        colds.setdefault(main, []).append(cold)
        warms.append(run_part("ours", **options))
        for name in fill_engines:
            if name != main:
                options.update(engine=name, cache=work / f"cache{repeat}-{name}")
                options.update(output=work / f"out{repeat}-{name}")
                colds.setdefault(name, []).append(run_part("ours", **options))
    return OurRuns(colds, main, warms, forwards)


def median_forward(parts):
    """One forward part's result from several: each engine's median images/s, the largest peak."""
    merged = dict(parts[0], engines={}, peak_mib=max(part["peak_mib"] for part in parts))
    for name, figure in parts[0]["engines"].items():
        rates = [part["engines"][name]["images_per_s"] for part in parts if name in part["engines"]]
        merged["engines"][name] = dict(figure, images_per_s=statistics.median(rates))
    return merged


def fill_rate(colds):
    """Median extraction images/s of cold runs [(part result, wall s)]."""
    return statistics.median(c["extracted"] / c["extract_seconds"] for c, _ in colds)


def extraction_rows(forward, runs):
    """Forward-only rows, then each engine's cold fill with its share of the
    same engine's forward-only rate and of LiteRT float's."""
    rates = {name: figure["images_per_s"] for name, figure in forward["engines"].items()}
    rows = []
    for name, figure in forward["engines"].items():
        rows.append(
            (
                f"forward only, {name} engine (batch {figure['batch']})",
                f"{figure['images_per_s']:.1f}",
                "",
                "",
                "",
                f"{forward['peak_mib']:.0f}",
            )
        )
    for name, colds in runs.colds.items():
        rate = fill_rate(colds)
        shares = [f"{rate / rates[name]:.2f} x {name} forward"] if name in rates else []
        if name != FLOAT_LITERT and FLOAT_LITERT in rates:
            shares.append(f"{rate / rates[FLOAT_LITERT]:.2f} x {FLOAT_LITERT} forward")
        rows.append(
            (
                f"our cold extraction ({name}, start-up excluded)",
                f"{rate:.1f}",
                "",
                ", ".join(shares),
                f"{statistics.median(c['accuracy'] for c, _ in colds):.3f}",
                f"{max(c['peak_mib'] for c, _ in colds):.0f}",
            )
        )
    return rows


def end_to_end_rows(args, runs, retrain_py, recipe_run):
    """retrain.py's method, the Keras recipe, and our cold and warm runs end to end."""
    recipe, recipe_seconds = recipe_run
    colds = runs.colds[runs.main]
    cold_rate = fill_rate(colds)
    cold_wall = statistics.median(s for _, s in colds)
    warm_wall = statistics.median(s for _, s in runs.warms)
    cold, warm = colds[0][0], runs.warms[0][0]
    return [
        (
            "retrain.py's method (one image per forward call)",
            f"{retrain_py['images_per_s']:.1f}",
            "",
            f"ours ({runs.main}) {cold_rate / retrain_py['images_per_s']:.1f} x this",
            "",
            f"{retrain_py['peak_mib']:.0f}",
        ),
        (
            f"Keras recipe, {args.epochs} epochs, end to end",
            "",
            f"{recipe_seconds:.0f}",
            "1",
            f"{recipe['accuracy']:.3f}",
            f"{recipe['peak_mib']:.0f}",
        ),
        (
            f"our cold run ({runs.main}), end to end",
            "",
            f"{cold_wall:.1f}",
            f"{recipe_seconds / cold_wall:.1f} x faster",
            f"{cold['accuracy']:.3f}",
            f"{cold['peak_mib']:.0f}",
        ),
        (
            "our warm rerun, end to end",
            "",
            f"{warm_wall:.1f}",
            f"{recipe_seconds / warm_wall:.1f} x faster",
            f"{warm['accuracy']:.3f}",
            f"{warm['peak_mib']:.0f}",
        ),
    ]


def print_warm_phases(warms):
    """Where the warm reruns' seconds go (medians), main thread and background threads."""
    warm_wall = statistics.median(s for _, s in warms)
    warm = warms[0][0]
    phases = {k: statistics.median(w["phases"][k] for w, _ in warms) for k in warm["phases"]}
    phases["interpreter start, exit (wall - in process)"] = warm_wall - phases["total in process"]
    print(f"\nwhere the warm rerun's {warm_wall:.1f} s go (medians; main thread):")
    print_table([("phase", "s")] + [(k, f"{v:.2f}") for k, v in phases.items()])
    beside = {
        k: statistics.median(w["beside"].get(k, 0.0) for w, _ in warms) for k in warm["beside"]
    }
    print("\nbeside it, in the run's background threads (overlapping the phases above):")
    print_table([("work", "s")] + [(k, f"{v:.2f}") for k, v in beside.items()])


def print_table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for number, row in enumerate(rows):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if number == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    sys.exit(main())
