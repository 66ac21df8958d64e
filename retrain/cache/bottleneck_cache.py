"""BottleneckCache: extract what is missing or changed, read what is cached."""

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

from retrain import backbones
from retrain.cache import lock, merge, reading, shards, store, view
from retrain.cache import plan as plan_lib
from retrain.cache.identity import CacheIdentity
from retrain.cache.journal import Journal, batch_records, journal_touched
from retrain.config import check_setting, check_shard
from retrain.data import decode
from retrain.engines import EngineChoice, build_or_fall_back, extraction, identity_name
from retrain.errors import RetrainError
from retrain.files import paths

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CacheReport:
    """What ``BottleneckCache.update`` (or ``update_shard``) did.

    ``extracted``: images run through the backbone; ``reused``: images whose
    cached vector was kept (for a shard: in the cache or in finished shard
    files); ``failed``: (relative path, reason) of images that could not be
    read or decoded, with no vector; ``path``: the cache file; ``merged``:
    shard files merged into it; ``shard_files``: files a shard run wrote;
    ``engine``: the engine that made the vectors; ``extract_seconds``: wall
    time of extraction once the engine is built (decoding, forward passes,
    journal writes), 0.0 when nothing was extracted; ``images_per_second``:
    the extraction speed recorded with the cache (``store.RATE``: this run's
    when it measured one), None when none is.
    """

    extracted: int
    reused: int
    failed: list
    path: Path
    merged: int = 0
    shard_files: list = dataclasses.field(default_factory=list)
    engine: str = "keras"
    extract_seconds: float = 0.0
    images_per_second: float | None = None


class BottleneckCache:
    """The HDF5 bottleneck cache of one backbone in ``bottleneck_dir``.

    The file is ``<backbone>-<fingerprint[:16]>-<engine>-<pixels>-<dtype>.h5``
    (``identity.CacheIdentity``): another backbone, other weights, another
    engine, other decoding settings or another storage dtype never share
    vectors. Rows are keyed
    by ``ImageEntry.key``; each records the file's size, mtime and sha256, so
    a replaced image is extracted again and a merely touched one is not.
    Images that fail to decode are remembered with their size and mtime and
    not decoded again until the file changes; they are reported on every run.

    Args:
      bottleneck_dir: folder of the cache files (created when needed).
      backbone_name: a key of ``backbones.names()``.
      weights_file: for Keras-application backbones, a local weights file.
      dtype: "float16" (half the disk) or "float32" storage; ``read`` always
        returns float32.
      lock_timeout: seconds to wait for another process using the same cache
        before raising RetrainError.
      engine: an ``engines.EngineChoice`` (``engines.choose``), built only
        when something must be extracted; default the Keras reference. When
        a LiteRT conversion fails its check, ``engines.build_or_fall_back``
        gives Keras and the cache moves to the Keras engine's file.
    """

    def __init__(
        self,
        bottleneck_dir,
        backbone_name,
        weights_file=None,
        dtype="float16",
        lock_timeout=6 * 3600.0,
        engine=None,
    ):
        check_setting("bottleneck_dtype", dtype, argument="dtype")
        self._spec = backbones.get(backbone_name)
        self._choice = engine or EngineChoice("keras", self._spec.name, weights_file)
        self._engine = None
        self.folder = str(bottleneck_dir)
        self._folder = Path(bottleneck_dir)
        self._fingerprint = backbones.fingerprint(self._spec.name, weights_file)
        self._dtype = dtype
        self._use_engine(self._choice.name)
        self.lock_timeout = lock_timeout
        self.extract_seconds = 0.0

    def _use_engine(self, engine_name):
        """Points identity and path at the cache of vectors made by ``engine_name``."""
        self.engine_name = engine_name
        self.identity = CacheIdentity(
            self._spec.name,
            self._fingerprint,
            self._spec.feature_dim,
            self._dtype,
            identity_name(engine_name),
            decode.pixel_settings_id(),
        )
        self.path = self._folder / self.identity.file_name()

    def update(self, image_list, batch_size=32, progress=True):
        """Extracts the bottlenecks of ``image_list`` that are missing or stale.

        First merges every finished shard file (``--num_shards`` runs, the
        Beam pipeline) into the cache. Builds the backbone only if something
        must be extracted. Vectors are journalled batch by batch, so memory
        does not grow with the number of images and a killed run loses at
        most one batch. Bad images are warned about one line each and listed
        in ``CacheReport.failed``.

        Args:
          image_list: an ImageList from ``images.discover``.
          batch_size: int, images per backbone call.
          progress: show a progress bar (images/s, ETA) on stderr.

        Returns:
          CacheReport.
        """
        _check_batch_size(batch_size)
        self._check_local()
        return self._again_if_engine_changed(self._update, image_list, batch_size, progress)

    def _update(self, image_list, batch_size, progress):
        with self._writing():
            with lock.locked(self.path, self.lock_timeout):
                # Either merge may be deferred (too little space for the new
                # file): the plan and later reads then see the journal too.
                merged = merge.fold(self.path, self.identity).merged
                cache = view.open_view(
                    self.folder,
                    self.path,
                    self.identity,
                    lambda: store.open_or_set_aside(self.path, self.identity),
                )
                journal = Journal(self.path, self.identity)
                plan, extracted, failed = self._fill(
                    image_list, image_list.entries, cache, journal, batch_size, progress
                )
                rate = store.rate_to_record(self.path, extracted, self.extract_seconds)
                merged += self.merge(rate)
                rate = rate or store.recorded_rate(self.path)
        return self._report(plan, extracted, failed, merged=merged, images_per_second=rate)

    def _again_if_engine_changed(self, work, *args):
        """Runs ``work``, and once more if building the engine moved the cache
        to another file (a LiteRT conversion that failed its check, which
        happens before any vector is written, gave the Keras engine)."""
        try:
            return work(*args)
        except _EngineChanged:
            return work(*args)

    def update_shard(
        self,
        image_list,
        num_shards,
        shard_index,
        batch_size=32,
        progress=True,
        chunk_rows=shards.CHUNK_ROWS,
    ):
        """Extracts one shard's part of what ``update`` would, into shard files.

        The images whose cache key falls in part ``shard_index`` of
        ``num_shards`` (``shards.in_part``) and that neither the cache nor a
        finished shard file holds are extracted into new shard files beside
        the cache; ``update`` merges them later. Neither takes the cache lock
        nor changes the cache file, so K processes on K machines can run
        the K parts at once. Running a part again extracts only what its
        finished files lack (a killed shard loses at most ``chunk_rows``).

        Returns:
          CacheReport with ``shard_files``: the files written.
        """
        _check_batch_size(batch_size)
        check_shard(num_shards, shard_index)
        part = [e for e in image_list.entries if shards.in_part(e.key, num_shards, shard_index)]
        return self._again_if_engine_changed(
            self._update_shard,
            image_list,
            part,
            f"{shard_index}of{num_shards}",
            batch_size,
            progress,
            chunk_rows,
        )

    def _update_shard(self, image_list, part, label, batch_size, progress, chunk_rows):
        writer = self.shard_writer(label, chunk_rows)
        with self._writing():
            plan, extracted, failed = self._fill(
                image_list, part, self._open_read_only(), writer, batch_size, progress
            )
            writer.close()
        return self._report(plan, extracted, failed, shard_files=writer.files)

    def plan(self, image_list, entries=None, progress=True):
        """Which of ``entries`` (default: all of ``image_list``) need extraction.

        Read-only: compares each file's size and mtime with the cache and the
        finished shard files; takes no lock and changes nothing.

        Returns:
          plan.Plan; ``todo`` lists the entries to extract.
        """
        entries = image_list.entries if entries is None else entries
        cache = self._open_read_only()
        try:
            return self._plan(image_list, entries, cache, progress)
        finally:
            if cache is not None:
                cache.close()

    def _plan(self, image_list, entries, cache, progress):
        return plan_lib.plan(image_list.image_dir, entries, cache, progress)

    def extract_to_shard(
        self, image_dir, entries, writer, batch_size=32, progress=True, engine=None
    ):
        """Extracts ``entries`` into ``writer`` (a shards.ShardWriter or the journal).

        ``engine``: the engine (``build_engine``), when the caller has built it
        already (a Beam worker builds it once); otherwise it is built here.
        Returns engines.extraction.Extraction (number extracted, [(relative
        path, reason)] of failures); ``extract_seconds`` is set to the time
        taken once the engine is built.
        """
        if not entries:
            return extraction.Extraction(0, [])
        if engine is None:
            identity = self.identity
            engine = self.build_engine(
                [paths.join(image_dir, entry.relative_path) for entry in entries[:8]]
            )
            if self.identity != identity:
                raise _EngineChanged()
        folder = plan_lib.folder_id(image_dir)
        started = time.perf_counter()
        done = extraction.extract(
            image_dir,
            entries,
            engine,
            self._spec.input_size,
            lambda batch: writer.append(batch_records(batch, folder)),
            batch_size,
            progress,
        )
        self.extract_seconds = time.perf_counter() - started
        return done

    def build_engine(self, check_paths=()):
        """The engine handed in, built once (converted and checked if needed).

        When it falls back to Keras (``engines.build_or_fall_back``), this
        cache switches to the Keras engine's identity and file first.
        """
        if self._engine is None:
            self._engine = build_or_fall_back(self._choice, check_paths=check_paths)
            self._use_engine(self._engine.name)
        return self._engine

    def shard_writer(self, label, chunk_rows=shards.CHUNK_ROWS):
        """A new shards.ShardWriter for this cache (``label``: letters and digits)."""
        return shards.ShardWriter(self.folder, self.path.name, self.identity, label, chunk_rows)

    def merge(self, images_per_second=None):
        """Merges finished shard files (and a killed run's journal) into the cache.

        The caller holds the cache lock (``update`` does). Returns the number
        of shard files merged; they are deleted once the cache holds them.
        When the merged file would not fit on the disk, the merge is deferred
        with a warning (the journal and shard files are read beside the main
        file until a later merge has the space) and 0 is returned.
        ``images_per_second``: the extraction speed the merged file records
        (``store.RATE``; default: the one it held).
        """
        folded = merge.fold(self.path, self.identity, images_per_second)
        if folded.deferred:
            logger.warning("%s", folded.deferred)
        return folded.merged

    def _fill(self, image_list, entries, cache, sink, batch_size, progress):
        """Plans ``entries`` against ``cache`` (closed here) and extracts the todo into sink."""
        try:
            plan = self._plan(image_list, entries, cache, progress)
            journal_touched(plan.touched, cache, sink, plan_lib.folder_id(image_list.image_dir))
        finally:
            if cache is not None:
                cache.close()
        for relative_path, reason in plan.failed:
            logger.warning("skipped %s: %s", relative_path, reason)
        extracted, failed = self.extract_to_shard(
            image_list.image_dir, plan.todo, sink, batch_size, progress
        )
        return plan, extracted, failed

    def _report(self, plan, extracted, failed, **details):
        failed = plan.failed + failed
        if failed:
            logger.warning("%d image(s) could not be read or decoded and were skipped", len(failed))
        return CacheReport(
            extracted=extracted,
            reused=plan.reused + plan.sharded + len(plan.touched),
            failed=sorted(failed),
            path=self.path,
            **details,
            engine=self.engine_name,
            extract_seconds=self.extract_seconds,
        )

    def _check_local(self):
        if paths.is_url(self.folder):
            raise RetrainError(
                "The bottleneck cache must be in a local folder; only shard files can be "
                "written to a URL (by --num_shards runs or python -m retrain.beam): copy "
                "them into a local bottleneck_dir, where the next run merges them. "
                f"Received: bottleneck_dir={self.folder}"
            )

    def _open_read_only(self):
        """A view.CacheView of the main file (left out when absent or unreadable:
        ``update`` deals with it) and the unmerged records, or None."""
        return view.open_view(self.folder, self.path, self.identity, self._main_read_only)

    def _main_read_only(self):
        if paths.is_url(self.folder) or not self.path.exists():
            return None
        try:
            return store.CacheFile(self.path, self.identity)
        except store.UnreadableCache:
            return None

    @contextlib.contextmanager
    def _writing(self):
        """Turns OS errors while writing the cache into a RetrainError naming the folder."""
        try:
            if not paths.is_url(self.folder):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            yield
        except OSError as error:
            # Disk full, permissions, a file where the folder should be: the
            # user fixes the folder, so say which one instead of a traceback.
            raise lock.cache_error("write", self.path, error) from None

    def read(self, entries):
        """The cached bottlenecks of ``entries``, float32 [len(entries), feature_dim].

        Raises RetrainError if an entry is not in the cache (run ``update``
        first; images in ``CacheReport.failed`` have no vector).
        """
        cache = self._open_for_reading(entries)
        try:
            return cache.bottlenecks([cache.rows[e.key] for e in entries])
        finally:
            cache.close()

    def stream(self, entries, block_rows=256, order_seed=None):
        """The cached bottlenecks of ``entries`` block by block.

        Memory holds one block of vectors at a time (plus the cache's index),
        so a cache larger than RAM can be read through. Rows are grouped by
        ``block_rows`` consecutive rows of the file (the HDF5 chunk size), each
        group read as one contiguous slice.

        Args:
          entries: ImageEntry list, all in the cache.
          block_rows: int, rows of the file per block.
          order_seed: None yields the blocks in file order; an int, in an
            order shuffled with that seed.

        Returns:
          an iterator of (positions int64 [k] into ``entries``, float32
          [k, feature_dim]); the file stays open until it is exhausted or
          closed.

        Raises RetrainError as ``read`` does, at the call (not at the first block).
        """
        return view.blocks(self._open_for_reading(entries), entries, block_rows, order_seed)

    def _open_for_reading(self, entries):
        self._check_local()
        return reading.open_for_reading(self.folder, self.path, self.identity, entries)


class _EngineChanged(Exception):
    """The engine built is not the one this cache's work was planned for."""


def _check_batch_size(batch_size):
    check_setting("extraction_batch_size", batch_size, argument="batch_size")
