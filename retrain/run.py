"""One run from a folder of photos to an exported classifier: the stage sequence only.

    discover -> fill the bottleneck cache -> buckets -> train -> predict and
    evaluate -> run record and report -> export

`run(config)` is the library's orchestrating function: the command line only
builds the Config and calls it, and a notebook can do the same. Each stage is
a function with a typed result; the work itself lives in the stage packages.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from retrain import backbones, console, engines, presets
from retrain.cache import BottleneckCache, CacheReport
from retrain.config import Config, save_yaml
from retrain.data import images
from retrain.data.buckets import Buckets
from retrain.data.class_checks import check_classes, check_training_classes
from retrain.evaluation import assessment
from retrain.files import output_folder
from retrain.training.backbone import plain_backbone, tunable_backbone

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced; `evaluation` and paths are None for --cache_only.

    validation_accuracy: the exported model's share of validation images
    labelled right (None without validation images or without training).
    """

    image_list: images.ImageList
    cache_report: CacheReport
    evaluation: object = None
    validation_accuracy: float | None = None
    model_path: Path | None = None
    labels_path: Path | None = None
    deployment_paths: dict = field(default_factory=dict)  # "saved_model" / TFLite kind -> Path


@dataclass(frozen=True)
class FilledCache:
    """The cache after `fill_cache`: the store, what the update did, and every image not used.

    skipped: (relative path, reason) of the files discovery refused and of
    the images that failed to decode.
    """

    cache: BottleneckCache
    report: CacheReport
    skipped: list


def run(config: Config, *, after_checkpoint=()) -> RunResult:
    """Build or reuse the cache, train the head, evaluate on the test bucket, export.

    Every output is written into a staging folder that replaces output_dir
    only when the run completes (see retrain.files.output_folder); writers get the
    staging folder as `out_dir`. --cache_only and shard runs only fill the
    cache: they neither create, lock nor replace output_dir.

    after_checkpoint: Keras callbacks run after each checkpoint of the
    checkpointed fits (a test parks a run there to kill it; see training.fit).
    """
    spec = backbones.get(config.architecture)
    image_list = discover(config)
    if config.num_shards > 1:
        # K shard processes may share output_dir: they write nothing there.
        return run_shard(config, spec, image_list)
    if config.cache_only:
        # Nor does a cache-only run: it must not replace the previous run's outputs.
        return run_cache_only(config, spec, image_list)
    inputs = (("image_dir", config.image_dir), ("bottleneck_dir", config.bottleneck_dir))
    with (
        output_folder.staged(config.output_dir, inputs) as folder,
        _beside_training() as background,
    ):
        return _train_and_export(config, spec, image_list, folder, background, after_checkpoint)


@contextlib.contextmanager
def _beside_training():
    """Two threads for work that needs neither the head nor the main thread.

    They run beside training on the second core: the data checks and, on the
    cached path, building the backbone the export needs; then the report
    page while the model is saved (README, How it works: "What runs beside
    training"). A failing run waits only for the page, which writes into the
    staging folder.
    """
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=2, thread_name_prefix="retrain-background"
    )
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _train_and_export(
    config: Config,
    spec,
    image_list,
    folder: output_folder.OutputFolder,
    background: concurrent.futures.Executor,
    after_checkpoint,
) -> RunResult:
    save_yaml(config, folder.staging / "settings.yaml")
    # Built before any long work, so a bad --fine_tune_layers fails fast.
    backbone = None
    if config.fine_tune_layers:
        backbone = tunable_backbone(spec, config.backbone_weights, config.fine_tune_layers)
    filled = fill_cache(config, spec, image_list)
    result = RunResult(image_list, filled.report)
    console.write_skipped(filled.skipped, folder.staging / "skipped_images.txt")
    console.print_skipped_count(filled.skipped, folder.final / "skipped_images.txt")
    console.result(console.cache_summary(filled.report, len(filled.skipped)))
    export_backbone = None
    if backbone is None and not config.distorted():
        # Built beside everything from here on: a warm rerun otherwise waited
        # for it after training.
        export_backbone = background.submit(plain_backbone, spec, config.backbone_weights)
    buckets = split(config, image_list, filled.report)

    # Vectors are never all in memory: training and the predictions stream the
    # cache, and the data checks read at most check_limits.CHECKED_IMAGES of them.
    checks = start_data_checks(config, filled.cache, buckets, folder, background)
    trained = train(config, spec, filled.cache, buckets, folder, backbone, after_checkpoint)
    assessed = assessment.assess(
        config, spec, trained, filled.cache, buckets, filled.skipped, folder.staging
    )
    result.evaluation, confidence, record = (
        assessed.evaluation,
        assessed.confidence,
        assessed.record,
    )
    result.validation_accuracy = validation_accuracy(confidence, buckets)
    page = None
    if checks is not None:
        # The figures and the page are drawn while the model is exported.
        # write_run_report turns any failure of the checks or of a report part into a warning.
        from retrain import report

        page = background.submit(report.write_run_report, record, checks.result, folder.staging)
    try:
        backbone = trained.backbone
        if backbone is None:
            backbone = (
                export_backbone.result()
                if export_backbone is not None
                else plain_backbone(spec, config.backbone_weights)
            )
        classifier = save_model(config, spec, trained, backbone, confidence, buckets, folder)
    finally:
        if page is not None:  # it writes into the staging folder: done before that goes
            concurrent.futures.wait([page])
    outputs = config.resolved_outputs()
    result.model_path, result.labels_path = outputs["output_graph"], outputs["output_labels"]
    console.result(f"Saved model {result.model_path} and labels {result.labels_path}.")
    if page is not None:
        console.print_report_outcome(page.result(), folder.final)
    if config.saved_model_dir or config.tflite or config.onnx:
        from retrain.export import deployment

        result.deployment_paths = deployment.export_for_deployment(
            classifier, image_list, buckets.training.entries, config, folder, confidence.detector
        )
    presets.log_best_cost(config, buckets, filled.report.images_per_second)
    return result


def validation_accuracy(confidence, buckets: Buckets) -> float | None:
    """Accuracy of the calibrated probabilities (the exported model's) on the validation bucket."""
    labels = buckets.validation.labels
    if not len(labels):
        return None
    predicted = confidence.probabilities["validation"].argmax(axis=-1)
    return float((predicted == labels).mean())


def discover(config: Config) -> images.ImageList:
    """The images of config.image_dir with their classes and split buckets; classes checked."""
    image_list = images.discover(
        config.image_dir, config.testing_percentage, config.validation_percentage
    )
    check_classes(image_list)
    return image_list


def _open_cache(config: Config, spec) -> BottleneckCache:
    return BottleneckCache(
        config.bottleneck_dir,
        spec.name,
        weights_file=config.backbone_weights,
        dtype=config.bottleneck_dtype,
        engine=engines.choose(config.engine, spec.name, config.backbone_weights),
    )


def fill_cache(config: Config, spec, image_list: images.ImageList) -> FilledCache:
    """Extracts the bottlenecks the cache lacks; reuses the others."""
    cache = _open_cache(config, spec)
    report = cache.update(
        image_list, batch_size=config.extraction_batch_size, progress=console.progress_bars()
    )
    return FilledCache(cache, report, list(image_list.skipped) + list(report.failed))


def split(config: Config, image_list: images.ImageList, report: CacheReport) -> Buckets:
    """The usable images by bucket; every class still needs an image, and a training image."""
    buckets = Buckets.of(image_list, {path for path, _ in report.failed})
    check_classes(dataclasses.replace(image_list, entries=buckets.entries))
    check_training_classes(image_list.class_names, buckets.training.entries, config)
    return buckets


def start_data_checks(config: Config, cache, buckets: Buckets, folder, background):
    """With --report, the data checks started beside training: a Future of their findings, else None.

    A failure to start them is the report's failure, said at its end (the Future holds it).
    """
    if not config.report:
        return None
    # Deferred: matplotlib, Jinja2 and cleanlab, only when needed.
    from retrain import report
    from retrain.evaluation import check_limits

    try:
        entries, labels, paths, splits = (
            buckets.entries,
            buckets.labels,
            buckets.paths,
            buckets.splits,
        )
        checked = check_limits.checked_rows(len(entries), config.seed)
        return background.submit(
            report.find_data_checks,
            cache.read([entries[row] for row in checked]),
            labels[checked],
            buckets.class_names,
            [paths[row] for row in checked],
            [splits[row] for row in checked],
            buckets.image_dir,
            config.seed,
            previous_dir=folder.final,
            total_images=len(entries),
        )
    except Exception as error:  # noqa: BLE001 - the report's failure, said at its end
        checks = concurrent.futures.Future()
        checks.set_exception(error)
        return checks


def train(config: Config, spec, cache, buckets: Buckets, folder, backbone, after_checkpoint):
    """The training path the settings ask for; a training.classifier.TrainedClassifier."""
    # Deferred: these import TensorFlow.
    from retrain.training import class_weights, classifier
    from retrain.training.settings import RunOptions

    weights = None
    if config.class_weights == "balanced":
        weights = class_weights.balanced_class_weights(
            buckets.training.labels, len(buckets.class_names)
        )
    # The checkpoint lives beside the output folder, not in the staging folder,
    # which a killed run's successor removes.
    checkpoint_root = folder.final.parent / f".{folder.final.name}.checkpoint"
    summaries_dir = folder.place_folder(config.resolved_outputs()["summaries_dir"])
    options = RunOptions(
        summaries_dir=str(summaries_dir), progress=console.progress_bars(), class_weights=weights
    )
    training_run = classifier.TrainingRun(
        options, checkpoint_root, backbone, tuple(after_checkpoint)
    )
    return classifier.train_classifier(config, spec, cache, buckets, training_run)


def save_model(config: Config, spec, trained, backbone, confidence, buckets, folder):
    """The classifier (backbone + calibrated head), its unknown detector and its labels file.

    Returns the Keras classifier.
    """
    from retrain import export
    from retrain.export import unknown_file

    outputs = config.resolved_outputs()
    classifier = export.build_classifier(
        backbone, trained.head, spec.input_size, config.test_time_flip, confidence.temperature
    )
    model_path = export.save_classifier(classifier, folder.place(outputs["output_graph"]))
    if confidence.detector is not None:
        sidecar = unknown_file.unknown_path(outputs["output_graph"])
        try:
            unknown_file.save(confidence.detector, folder.place(sidecar), model_path)
        except OSError as error:  # secondary: the model still labels, without "unknown"
            logger.warning(
                "Cannot write the unknown detector %s (%s): the model labels without 'unknown'.",
                sidecar,
                error.strerror or error,
            )
    export.write_labels(buckets.class_names, folder.place(outputs["output_labels"]))
    return classifier


def run_cache_only(config: Config, spec, image_list) -> RunResult:
    """--cache_only: build or update the cache; output_dir is neither created nor touched.

    The images that could not be used are named on stderr (a training run
    lists them all in skipped_images.txt).
    """
    filled = fill_cache(config, spec, image_list)
    console.result(console.cache_summary(filled.report, len(filled.skipped)))
    console.print_skipped_images(filled.skipped)
    return RunResult(image_list, filled.report)


def run_shard(config: Config, spec, image_list) -> RunResult:
    """--num_shards K --shard_index I: extract part I into shard files, merged later."""
    report = _open_cache(config, spec).update_shard(
        image_list,
        config.num_shards,
        config.shard_index,
        batch_size=config.extraction_batch_size,
        progress=console.progress_bars(),
    )
    console.result(console.shard_summary(report, config.num_shards, config.shard_index))
    return RunResult(image_list, report)
