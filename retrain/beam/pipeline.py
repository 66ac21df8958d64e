"""The Beam pipeline that fills the bottleneck cache: plan, extract into shards.

``run(config, pipeline_args)`` lists the images, leaves out those the cache
or its finished shard files already hold (``BottleneckCache.plan``), and
extracts the rest, as one ``ShardExtraction`` says, in a DoFn that builds the
backbone once per worker (``setup``), on batches formed by ``BatchElements``. Each batch becomes one
shard file beside the cache (``BottleneckCache.extract_to_shard``, the code
the single-process path runs); the next ``python -m retrain`` run merges them.
"""

import dataclasses
import json
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from retrain import engines
from retrain.cache import BottleneckCache
from retrain.data import images
from retrain.files import paths

MAX_BATCH = 256
NAMESPACE = "retrain"
# beam.Create carries its elements inside the job graph, which Dataflow
# limits to about 10 MB; longer lists go through a file the workers read.
CREATE_LIMIT = 20_000


@dataclasses.dataclass(frozen=True)
class ShardExtraction:
    """What every worker needs to extract images into shard files.

    image_dir: the folder the entries are relative to (str or Path).
    bottleneck_dir: the cache folder (str or Path, or a tf.io.gfile URL); shards go there.
    architecture, weights_file, dtype: as for BottleneckCache.
    batch_size: int, images per backbone call.
    engine: "keras" or "litert", resolved and checked (``BottleneckCache.build_engine``
      on the launching machine), so every worker makes the same vectors.
    """

    image_dir: str
    bottleneck_dir: str
    architecture: str
    weights_file: str | None = None
    dtype: str = "float16"
    batch_size: int = 32
    engine: str = "keras"


class ExtractToShard(beam.DoFn):
    """A batch of ImageEntry -> one shard file (its path is the output).

    The engine (backbone) is built once per worker, in ``setup``. Counters
    ``retrain/extracted`` and ``retrain/failed`` count images.
    """

    def __init__(self, extraction: ShardExtraction):
        self._image_dir = str(extraction.image_dir)
        self._cache_arguments = (
            str(extraction.bottleneck_dir),
            extraction.architecture,
            extraction.weights_file,
            extraction.dtype,
        )
        self._engine_choice = engines.EngineChoice(
            extraction.engine, extraction.architecture, extraction.weights_file
        )
        self._batch_size = extraction.batch_size
        self._extracted = Metrics.counter(NAMESPACE, "extracted")
        self._failed = Metrics.counter(NAMESPACE, "failed")
        self._cache = self._engine = None

    def setup(self):
        self._cache = BottleneckCache(*self._cache_arguments, engine=self._engine_choice)
        self._engine = self._cache.build_engine()

    def process(self, entries):
        writer = self._cache.shard_writer("beam", chunk_rows=len(entries))
        extracted, failed = self._cache.extract_to_shard(
            self._image_dir,
            entries,
            writer,
            self._batch_size,
            progress=False,
            engine=self._engine,
        )
        writer.close()
        self._extracted.inc(extracted)
        self._failed.inc(len(failed))
        yield from writer.files


def build_pipeline(pipeline, entries, extraction: ShardExtraction):
    """Adds the extraction to ``pipeline``; returns the PCollection of shard file paths.

    Args:
      pipeline: a beam.Pipeline.
      entries: list of images.ImageEntry to extract (``BottleneckCache.plan().todo``),
        or the path of a listing of them written by ``write_listing``.
      extraction: the ShardExtraction. BatchElements forms batches of the
        multiple of its ``batch_size`` nearest below MAX_BATCH (at least one
        batch), one shard file each.
    """
    # Whole backbone batches: only a bundle's last batch is padded.
    batch_size = extraction.batch_size
    shard_rows = batch_size * max(1, MAX_BATCH // batch_size)
    if isinstance(entries, str):
        found = (
            pipeline
            | "Listing" >> beam.io.ReadFromText(entries)
            | "Images" >> beam.Map(lambda line: images.ImageEntry(**json.loads(line)))
        )
    else:
        found = pipeline | "Images" >> beam.Create(entries)
    return (
        found
        | "Batch" >> beam.BatchElements(min_batch_size=shard_rows, max_batch_size=shard_rows)
        | "Extract" >> beam.ParDo(ExtractToShard(extraction))
    )


def run(config, pipeline_args, image_list=None):
    """Plans against the cache, then runs the pipeline over what is missing.

    Args:
      config: a validated Config; uses image_dir, bottleneck_dir,
        architecture, backbone_weights, bottleneck_dtype, extraction_batch_size.
      pipeline_args: list of Beam pipeline option flags (``--runner`` ...).
      image_list: ``images.discover(config.image_dir)``, when already made.

    Returns:
      dict of ints: ``to_extract``, ``already_cached``, ``extracted``, ``failed``.
    """
    image_list = image_list or images.discover(config.image_dir)
    cache = BottleneckCache(
        config.bottleneck_dir,
        config.architecture,
        weights_file=config.backbone_weights,
        dtype=config.bottleneck_dtype,
        engine=engines.choose(config.engine, config.architecture, config.backbone_weights),
    )
    plan = cache.plan(image_list)
    if plan.todo and cache.engine_name != "keras":
        # Convert and check LiteRT once here; if the check fails the cache
        # switches to the Keras engine's file, whose plan differs.
        engine = cache.engine_name
        cache.build_engine(
            check_paths=[
                paths.join(image_list.image_dir, entry.relative_path) for entry in plan.todo[:8]
            ]
        )
        if cache.engine_name != engine:
            plan = cache.plan(image_list)
    summary = {
        "to_extract": len(plan.todo),
        "already_cached": plan.reused + plan.sharded + len(plan.touched),
        "extracted": 0,
        "failed": len(plan.failed),
    }
    print(
        f"{summary['to_extract']} images to extract, {summary['already_cached']} already "
        f"cached, {summary['failed']} unreadable or failed before."
    )
    if not plan.todo:
        return summary
    if not any(arg.startswith("--default_sdk_harness_log_level") for arg in pipeline_args):
        # Worker processes otherwise log every bundle at INFO.
        pipeline_args = [*pipeline_args, "--default_sdk_harness_log_level=WARNING"]
    pipeline = beam.Pipeline(options=PipelineOptions(pipeline_args))
    listing = write_listing(plan.todo, cache.folder) if len(plan.todo) > CREATE_LIMIT else None
    try:
        extraction = ShardExtraction(
            image_list.image_dir,
            cache.folder,
            config.architecture,
            config.backbone_weights,
            config.bottleneck_dtype,
            config.extraction_batch_size,
            cache.engine_name,
        )
        build_pipeline(pipeline, listing or plan.todo, extraction)
        result = pipeline.run()
        result.wait_until_finish()
    finally:
        if listing:
            paths.remove(listing)
    counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    for counter in counters:
        summary[counter.key.metric.name] += counter.committed or 0
    return summary


def write_listing(entries, folder):
    """Writes ``entries`` (ImageEntry) as JSON lines into ``folder``; returns the path."""
    path = paths.join(folder, f"retrain-beam-listing-{uuid.uuid4().hex[:16]}.jsonl")
    lines = (json.dumps(dataclasses.asdict(entry)) + "\n" for entry in entries)
    paths.write(path, "".join(lines).encode())
    return path
