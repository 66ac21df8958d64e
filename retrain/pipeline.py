"""One run from a folder of photos to an exported classifier.

    discover -> bottleneck cache -> train the new softmax layer -> evaluate -> export

`run(config)` is the library's orchestrating function: the command line only
builds the Config and calls it, and a notebook can do the same.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from retrain import backbones
from retrain.data import images
from retrain.files import output_folder
from retrain.cache import BottleneckCache, CacheReport
from retrain.config import Config, save_yaml
from retrain.errors import RetrainError
from retrain.files.text_escapes import one_line

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced; `evaluation` and paths are None for --cache_only."""

    image_list: images.ImageList
    cache_report: CacheReport
    evaluation: object = None
    model_path: Path | None = None
    labels_path: Path | None = None
    deployment_paths: dict = field(default_factory=dict)  # "saved_model" / TFLite kind -> Path


def run(config: Config) -> RunResult:
    """Build or reuse the cache, train the head, evaluate on the test bucket, export.

    Every output is written into a staging folder that replaces output_dir
    only when the run completes (see retrain.files.output_folder); writers get the
    staging folder as `out_dir`. --cache_only and shard runs only fill the
    cache: they neither create, lock nor replace output_dir.
    """
    spec = backbones.get(config.architecture)
    image_list = images.discover(config.image_dir, config.testing_percentage,
                                 config.validation_percentage)
    check_classes(image_list)
    if config.num_shards > 1:
        # K shard processes may share output_dir: they write nothing there.
        return run_shard(config, spec, image_list)
    if config.cache_only:
        # Nor does a cache-only run: it must not replace the previous run's outputs.
        return run_cache_only(config, spec, image_list)
    inputs = (("image_dir", config.image_dir), ("bottleneck_dir", config.bottleneck_dir))
    with output_folder.staged(config.output_dir, inputs) as folder, _beside_training() as background:
        return _run(config, spec, image_list, folder, background)


@contextlib.contextmanager
def _beside_training():
    """Two threads for work that needs neither the head nor the main thread.

    They run beside training on the second core: the data checks and, on the
    cached path, building the backbone the export needs; then the report
    page while the model is saved (README, How it works: "What runs beside
    training"). A failing run waits only for the page, which writes into the
    staging folder.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2,
                                                 thread_name_prefix="retrain-background")
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _run(config: Config, spec, image_list, folder: output_folder.OutputFolder,
         background: concurrent.futures.Executor) -> RunResult:
    out_dir = folder.staging
    save_yaml(config, out_dir / "settings.yaml")

    backbone = None
    if config.fine_tune_layers:
        # Built before any long work, so a bad --fine_tune_layers fails fast.
        from retrain.training import fine_tune

        backbone = backbones.load(spec.name, include_top=False, weights_file=config.backbone_weights)
        fine_tune.unfreeze(backbone, config.fine_tune_layers)
        fine_tune.freeze(backbone)

    cache = BottleneckCache(config.bottleneck_dir, spec.name,
                            weights_file=config.backbone_weights, dtype=config.bottleneck_dtype,
                            engine=config.engine)
    cache_report = cache.update(image_list, batch_size=config.extraction_batch_size)
    skipped = list(image_list.skipped) + list(cache_report.failed)
    result = RunResult(image_list, cache_report)
    write_skipped(skipped, out_dir / "skipped_images.txt")
    if skipped:
        print(f"{len(skipped)} images skipped; listed in {folder.final / 'skipped_images.txt'}",
              file=sys.stderr)
    print(cache_summary(cache_report, len(skipped)))
    export_backbone = None
    if backbone is None and not config.distorted():
        # Built beside everything from here on: a warm rerun otherwise waited
        # for it after training.
        export_backbone = background.submit(backbones.load, spec.name, include_top=False,
                                            weights_file=config.backbone_weights)

    failed = {path for path, _ in cache_report.failed}
    usable = [e for e in image_list.entries if e.relative_path not in failed]
    check_classes(replace(image_list, entries=usable))
    by_bucket = {name: [e for e in usable if e.split_bucket == name] for name in images.BUCKETS}
    check_training_classes(image_list.class_names, by_bucket["training"], config)

    # Vectors are never all in memory: training and the predictions stream the
    # cache, and the data checks read at most data_checks.CHECKED_IMAGES of them.
    labels = {name: images.labels_of(entries) for name, entries in by_bucket.items()}
    ordered = [entry for name in images.BUCKETS for entry in by_bucket[name]]
    ordered_paths = [entry.relative_path for entry in ordered]
    ordered_labels = np.concatenate([labels[name] for name in images.BUCKETS])
    ordered_splits = [entry.split_bucket for entry in ordered]
    from retrain import evaluation, export  # deferred: these import TensorFlow
    from retrain.evaluation import run_record
    from retrain.training import train, train_paths

    checks = None
    if config.report:
        from retrain.evaluation import data_checks  # deferred: matplotlib, Jinja2 and cleanlab, only when needed
        from retrain import report

        try:
            checked = data_checks.checked_rows(len(ordered), config.seed)
            checks = background.submit(
                report.find_data_checks, cache.read([ordered[row] for row in checked]),
                ordered_labels[checked], image_list.class_names,
                [ordered_paths[row] for row in checked], [ordered_splits[row] for row in checked],
                image_list.image_dir, config.seed, previous_dir=folder.final,
                total_images=len(ordered))
        except Exception as error:  # noqa: BLE001 - the report's failure, said at its end
            checks = concurrent.futures.Future()
            checks.set_exception(error)
    outputs = config.resolved_outputs()
    class_weights = None
    if config.class_weights == "balanced":
        class_weights = train.balanced_class_weights(labels["training"], len(image_list.class_names))
    # The checkpoint lives beside the output folder, not in the staging folder,
    # which a killed run's successor removes.
    checkpoint_root = folder.final.parent / f".{folder.final.name}.checkpoint"
    trained = train_paths.train_classifier(config, spec, cache, image_list.image_dir, by_bucket,
                                           len(image_list.class_names),
                                           folder.place_folder(outputs["summaries_dir"]),
                                           checkpoint_root, backbone, class_weights=class_weights)
    backbone = trained.backbone
    if trained.fine_tune_result is None:
        probabilities = {name: predict_cached(trained.head, cache, by_bucket[name],
                                              config.test_batch_size)
                         for name in run_record.EVALUATED_SPLITS}
    else:
        # The tuned backbone no longer matches the cached vectors: decode the images.
        probabilities = {name: train_paths.test_probabilities(config, spec, cache,
                                                              image_list.image_dir,
                                                              by_bucket[name], trained)
                         for name in run_record.EVALUATED_SPLITS}

    test_entries = by_bucket["testing"]
    if test_entries:
        test_evaluation = evaluation.evaluate(probabilities["testing"], labels["testing"],
                                              image_list.class_names)
        misclassified = evaluation.misclassified(probabilities["testing"], test_entries,
                                                 image_list.class_names)
        evaluation.write_metrics(test_evaluation, out_dir, misclassified)
        print(evaluation.summary(test_evaluation))
        if config.print_misclassified_test_images:
            evaluation.print_misclassified(misclassified)
        result.evaluation = test_evaluation
    else:
        log.warning("The test bucket is empty (testing_percentage=%s): no test accuracy.",
                    config.testing_percentage)

    record = run_record.RunRecord(
        image_dir=str(image_list.image_dir), class_names=image_list.class_names,
        settings=dataclasses.asdict(config),
        images=ordered_paths, labels=ordered_labels, splits=ordered_splits,
        history=trained.head_result.history, best_step=trained.head_result.best_step,
        stopped_early=trained.head_result.stopped_early,
        class_weights=None if class_weights is None else class_weights.tolist(),
        probabilities=probabilities, skipped=[(str(path), str(reason)) for path, reason in skipped],
    )
    run_record.save(record, out_dir)
    page = None
    if checks is not None:
        # The figures and the page are drawn while the model is exported.
        # write_run_report turns any failure of the checks or of a report part into a warning.
        page = background.submit(report.write_run_report, record, checks.result, out_dir)

    try:
        if backbone is None:
            backbone = (export_backbone.result() if export_backbone is not None else
                        backbones.load(spec.name, include_top=False,
                                       weights_file=config.backbone_weights))
        classifier = export.build_classifier(backbone, trained.head, spec.input_size)
        export.save_classifier(classifier, folder.place(outputs["output_graph"]))
        export.write_labels(image_list.class_names, folder.place(outputs["output_labels"]))
    finally:
        if page is not None:  # it writes into the staging folder: done before that goes
            concurrent.futures.wait([page])
    result.model_path, result.labels_path = outputs["output_graph"], outputs["output_labels"]
    print(f"Saved model {result.model_path} and labels {result.labels_path}.")
    if page is not None:
        outcome = page.result()
        if outcome.checks is not None:
            print(report.checks_summary(outcome.checks))
        if outcome.page is not None:
            print(f"Report: {folder.final / outcome.page.name}")
        if outcome.parts.missing:
            print(outcome.parts.line(), file=sys.stderr)
    if config.saved_model_dir or config.tflite:
        result.deployment_paths = export_for_deployment(classifier, image_list, by_bucket["training"],
                                                        config, folder)
    return result


def export_for_deployment(classifier, image_list, training_entries, config: Config,
                          folder: output_folder.OutputFolder) -> dict:
    """The SavedModel and TFLite exports, all from one fixed-size classifier.

    They are written where `folder` places them (the staging folder, for paths
    inside output_dir). Returns {"saved_model" or TFLite kind: final Path}.
    """
    from retrain import export  # deferred: these import TensorFlow
    from retrain.export import saved_model, tflite

    fixed = export.fixed_size_classifier(classifier)
    written = {}
    if config.saved_model_dir:
        saved_model.save_saved_model(fixed, image_list.class_names,
                                     folder.place_folder(config.saved_model_dir))
        written["saved_model"] = Path(config.saved_model_dir)
        print(f"Saved SavedModel {config.saved_model_dir} (serving_default takes encoded images).")
    calibration = None
    if "int8" in config.tflite:
        sample = calibration_entries(training_entries, tflite.CALIBRATION_IMAGES)
        calibration = tflite.calibration_pixels(
            [image_list.image_dir / entry.relative_path for entry in sample], export.input_size(classifier))
    for kind, path in config.tflite_paths().items():
        staged = tflite.save_tflite(fixed, kind, image_list.class_names, folder.place(path), calibration)
        written[kind] = path
        print(f"Saved TFLite {kind} model {path} ({staged.stat().st_size / 1e6:.1f} MB).")
    return written


def calibration_entries(training_entries, count: int) -> list:
    """Up to `count` training images, the classes taking turns in label order, each class's
    images in cache-key (hash) order: a fixed sample, spread over the classes."""
    by_class: dict = {}
    for entry in sorted(training_entries, key=lambda entry: entry.key):
        by_class.setdefault(entry.label_index, []).append(entry)
    turns = itertools.zip_longest(*(by_class[label] for label in sorted(by_class)))
    chosen = [entry for turn in turns for entry in turn if entry is not None]
    return chosen[:count]


def run_cache_only(config: Config, spec, image_list) -> RunResult:
    """--cache_only: build or update the cache; output_dir is neither created nor touched.

    The images that could not be used are named on stderr (a training run
    lists them all in skipped_images.txt).
    """
    cache = BottleneckCache(config.bottleneck_dir, spec.name,
                            weights_file=config.backbone_weights, dtype=config.bottleneck_dtype,
                            engine=config.engine)
    report = cache.update(image_list, batch_size=config.extraction_batch_size)
    skipped = list(image_list.skipped) + list(report.failed)
    print(cache_summary(report, len(skipped)))
    shown = 5
    for path, reason in skipped[:shown]:
        print(f"skipped {one_line(path)}: {one_line(str(reason))}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"... and {len(skipped) - shown} more images skipped; a training run lists them "
              "all in skipped_images.txt", file=sys.stderr)
    return RunResult(image_list, report)


def cache_summary(report: CacheReport, skipped: int) -> str:
    """The run's one line about the cache: extracted (with the rate), reused, skipped, merged."""
    merged = f" ({report.merged} shard files merged)" if report.merged else ""
    rate = ""
    if report.extracted and report.extract_seconds > 0:
        rate = (f" ({report.extracted / report.extract_seconds:.1f} images/s, "
                f"{report.engine} engine)")
    return (f"Bottleneck cache {report.path}: {report.extracted} extracted{rate}, "
            f"{report.reused} reused, {skipped} skipped{merged}.")


def run_shard(config: Config, spec, image_list) -> RunResult:
    """--num_shards K --shard_index I: extract part I into shard files, merged later."""
    cache = BottleneckCache(config.bottleneck_dir, spec.name,
                            weights_file=config.backbone_weights, dtype=config.bottleneck_dtype,
                            engine=config.engine)
    report = cache.update_shard(image_list, config.num_shards, config.shard_index,
                                batch_size=config.extraction_batch_size)
    print(f"Shard {config.shard_index} of {config.num_shards}: {report.extracted} extracted, "
          f"{report.reused} already cached, {len(report.failed)} failed; wrote "
          f"{len(report.shard_files)} shard file(s) beside {report.path}. The next run without "
          "--num_shards merges them.")
    return RunResult(image_list, report)


def check_classes(image_list: images.ImageList) -> None:
    """At least two classes with names a labels file can hold, each with a usable image."""
    names = image_list.class_names
    from retrain import export  # deferred: it imports TensorFlow

    export.check_class_names(names)
    if len(names) < 2:
        raise RetrainError(
            f"Need at least two classes (sub-folders with images) in {image_list.image_dir}; "
            f"found {len(names)}: {names}. Add one sub-folder of images per class."
        )
    counts = {name: 0 for name in names}
    for entry in image_list.entries:
        counts[entry.label] += 1
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise RetrainError(
            f"Class folders with no usable images in {image_list.image_dir}: {empty}. "
            "Add images (JPEG, PNG, BMP, GIF, WebP) or remove the folders."
        )


def check_training_classes(class_names, training_entries, config: Config) -> None:
    """Every class needs a training image after the split and after failed decodes."""
    present = {entry.label for entry in training_entries}
    missing = [name for name in class_names if name not in present]
    if missing:
        raise RetrainError(
            f"Classes with no training image after the split: {missing}. Add images to them "
            "or lower --testing_percentage / --validation_percentage "
            f"(now {config.testing_percentage} / {config.validation_percentage})."
        )


def predict(head, bottlenecks: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities float32 [n, k] of the head for bottlenecks [n, d]; batch_size -1 = all."""
    if not len(bottlenecks):
        return np.zeros((0, head.output_shape[-1]), np.float32)
    batch = len(bottlenecks) if batch_size == -1 else batch_size
    # predict_on_batch, not predict: predict builds a tf.data pipeline with
    # the autotuner on, whose teardown can wait seconds (see retrain.data.tf_data).
    return np.concatenate([head.predict_on_batch(bottlenecks[start:start + batch])
                           for start in range(0, len(bottlenecks), batch)])


# File rows per block when predicting from the cache: at most 8,192 vectors
# (42 MB of Lite0 float32) in memory at once, whatever the set's size.
PREDICT_BLOCK_ROWS = 8192


def predict_cached(head, cache: BottleneckCache, entries, batch_size: int,
                   block_rows: int = PREDICT_BLOCK_ROWS) -> np.ndarray:
    """`predict` on the cached bottlenecks of entries, read block by block; rows in entry order."""
    probabilities = np.zeros((len(entries), head.output_shape[-1]), np.float32)
    if entries:
        for positions, vectors in cache.stream(entries, block_rows=block_rows):
            probabilities[positions] = predict(head, vectors, batch_size)
    return probabilities


def write_skipped(skipped, path: Path) -> None:
    """List every image the run could not use, one `path<TAB>reason` line each (none: no file).

    Paths and reasons as `text_escapes.one_line`, the escapes of every file a run writes.
    """
    if skipped:
        path.write_text("".join(f"{one_line(rel)}\t{one_line(str(reason))}\n"
                                for rel, reason in skipped), encoding="utf-8")
