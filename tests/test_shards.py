"""Sharded cache builds: --num_shards processes, the merge, killed shards, Beam.

The reference is an undisturbed single-process build of the same images: a
sharded build followed by the merge must hold exactly its keys, file states,
failures and (bit for bit) vectors.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import parking
import pytest
from test_cache import photos, write

from retrain import backbones, cli, engines, run
from retrain.cache import BottleneckCache, journal, plan, shards
from retrain.config import Config
from retrain.data import decode, images
from retrain.engines import extraction
from retrain.errors import RetrainError
from retrain.files import atomic_write

LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """14 real photo crops in two classes, and one damaged PNG (a failure record)."""
    root = tmp_path_factory.mktemp("shards") / "photos"
    for i, pixels in enumerate(photos(14, seed=3)):
        write(
            pixels, root / ("cats" if i % 2 else "cups") / f"img{i:02d}.{'jpg' if i % 3 else 'png'}"
        )
    (root / "cups" / "garbled.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    return root


@pytest.fixture(scope="module")
def single_build(image_dir, tmp_path_factory, backbone_builds):
    """The contents of a single-process build (``update``) of ``image_dir``."""
    cache = BottleneckCache(tmp_path_factory.mktemp("single"), LITE0)
    report = cache.update(images.discover(image_dir), batch_size=4, progress=False)
    assert (report.extracted, [path for path, _ in report.failed]) == (14, ["cups/garbled.png"])
    return contents(cache.path)


def contents(path):
    """{key: row fields} and {key: failure fields} of a cache file, vectors as bytes."""
    with h5py.File(path, "r") as file:
        rows = file["images"]
        fields = [
            rows[name][()]
            for name in ("key", "relative_path", "size", "mtime_ns", "sha256", "bottleneck")
        ]
        failed = file["failed"]
        failures = {
            key: (path, int(size), int(mtime), reason)
            for key, path, size, mtime, reason in zip(
                *(
                    failed[name][()]
                    for name in ("key", "relative_path", "size", "mtime_ns", "reason")
                )
            )
        }
    keys = fields[0].tolist()
    assert len(keys) == len(set(keys)), "a key is stored twice"
    table = {
        key: (path, int(size), int(mtime), sha, vector.tobytes())
        for key, path, size, mtime, sha, vector in zip(*fields)
    }
    return table, failures


def shard_files(folder):
    return sorted(path.name for path in folder.glob("*.shard-*"))


def test_two_shards_then_merge_equal_a_single_process_build(
    tmp_path, image_dir, single_build, backbone_builds
):
    found = images.discover(image_dir)
    cache = BottleneckCache(tmp_path, LITE0)
    parts = [
        cache.update_shard(found, 2, index, batch_size=4, progress=False, chunk_rows=3)
        for index in range(2)
    ]
    assert not cache.path.exists(), "a shard wrote the main cache file"
    assert sum(part.extracted for part in parts) == 14 and min(p.extracted for p in parts) > 0
    assert sum(len(part.failed) for part in parts) == 1
    written = [file for part in parts for file in part.shard_files]
    assert len(written) >= 2 * 2 and len(set(written)) == len(written)
    assert shard_files(tmp_path) == sorted(os.path.basename(f) for f in written)
    part_of = {
        e.key: index for index in range(2) for e in found.entries if shards.in_part(e.key, 2, index)
    }
    for index, part in enumerate(parts):
        for file in part.shard_files:
            keys = shards.load(file, cache.identity, ("key",))["key"]
            assert all(part_of[key.decode()] == index for key in keys), "key in the wrong part"

    again = cache.update_shard(found, 2, 0, batch_size=4, progress=False)
    assert (again.extracted, again.shard_files) == (0, []), "a finished shard was redone"
    assert cache.plan(found, progress=False).todo == []

    merged = cache.update(found, batch_size=4, progress=False)
    assert (merged.extracted, merged.reused, merged.merged) == (0, 14, len(written))
    assert [path for path, _ in merged.failed] == ["cups/garbled.png"]
    assert shard_files(tmp_path) == [], "merged shard files were left behind"
    assert contents(cache.path) == single_build


def test_a_vector_does_not_depend_on_the_batch_it_was_extracted_in(image_dir, backbone_builds):
    found = images.discover(image_dir)
    files = [image_dir / entry.relative_path for entry in found.entries[:4]]
    engine = engines.KerasEngine(backbones.load(LITE0), 224)
    together = next(extraction.bottleneck_batches(files, engine, 224, batch_size=4)).bottlenecks
    alone = [
        next(extraction.bottleneck_batches([path], engine, 224, batch_size=4)).bottlenecks[0]
        for path in files
    ]
    assert together.shape == (4, 1280)
    assert np.array_equal(np.stack(alone), together)


def test_shards_of_other_settings_or_damaged_are_never_merged(
    tmp_path, image_dir, backbone_builds, caplog
):
    found = images.discover(image_dir)
    cache = BottleneckCache(tmp_path, LITE0)
    entry = found.entries[0]
    state = decode.file_state(image_dir / entry.relative_path)
    other = dataclasses.replace(cache.identity, fingerprint="0" * 64)
    foreign = shards.ShardWriter(tmp_path, cache.path.name, other, "0of1")
    record = journal.Records()
    record.add_row(
        entry.key, entry.relative_path, state, np.ones(1280, np.float32), plan.folder_id(image_dir)
    )
    foreign.append(record)
    foreign.close()
    damaged = tmp_path / f"{cache.path.name}.shard-0of1-feedfeedfeed-000001.npz"
    damaged.write_bytes(b"PK\x03\x04 cut short")
    assert cache.plan(found, progress=False).sharded == 0

    report = cache.update(found, batch_size=8, progress=False)
    assert (report.extracted, report.merged) == (14, 0)
    assert sorted(shard_files(tmp_path)) == sorted(
        [os.path.basename(foreign.files[0]) + ".unused", damaged.name + ".unused"]
    )
    messages = [
        r.getMessage() for r in caplog.records if "not merging shard file" in r.getMessage()
    ]
    assert len(messages) == 2 and any("built for" in m for m in messages)
    row = cache.read([entry])[0]
    assert not np.allclose(row, 1.0), "the foreign vector was merged"


def test_killed_shard_process_is_redone(tmp_path, image_dir, single_build, backbone_builds):
    """A shard killed while writing leaves a temporary file that nothing reads."""
    cache_dir, output_dir = tmp_path / "cache", tmp_path / "out"
    argv = [
        "--image_dir",
        str(image_dir),
        "--bottleneck_dir",
        str(cache_dir),
        "--output_dir",
        str(output_dir),
        "--cache_only",
        "--num_shards",
        "2",
        "--extraction_batch_size",
        "4",
        "--engine",
        "keras",
    ]
    code = parking.cli_driver("shard-partial:1", [*argv, "--shard_index", "0"])
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    while not list(cache_dir.glob("*.paused")):
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "the shard never reached its first write"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    for marker in cache_dir.glob("*.paused"):
        marker.unlink()
    found = images.discover(image_dir)
    cache = BottleneckCache(cache_dir, LITE0)
    partial = atomic_write.leftovers(cache_dir)
    assert len(partial) == 1 and not shards.finished(cache_dir, cache.path.name)
    in_part = sum(shards.in_part(e.key, 2, 0) for e in found.entries)
    assert len(cache.plan(found, progress=False).todo) == len(found.entries), "partial was read"
    for index in range(2):
        config = cli.resolve_config([*argv, "--shard_index", str(index)])
        result = run.run(config)
        assert not output_dir.exists(), "a shard process wrote into output_dir"
        assert result.cache_report.extracted + len(result.cache_report.failed) == (
            in_part if index == 0 else len(found.entries) - in_part
        )

    # A normal run merges the finished shards and ignores the fresh .partial file;
    # once stale it is removed.
    report = run.run(
        Config(
            image_dir=str(image_dir),
            bottleneck_dir=str(cache_dir),
            output_dir=str(output_dir),
            cache_only=True,
            engine="keras",
        )
    ).cache_report
    assert report.extracted == 0 and report.merged >= 2
    assert contents(cache.path) == single_build
    assert not shards.finished(cache_dir, cache.path.name)
    assert atomic_write.leftovers(cache_dir) == partial
    old = time.time() - shards.STALE_PARTIAL_SECONDS - 60
    os.utime(partial[0], (old, old))
    cache.update(found, progress=False)
    assert not atomic_write.leftovers(cache_dir)


def test_beam_direct_runner_fills_the_same_rows(
    tmp_path, image_dir, single_build, backbone_builds, monkeypatch
):
    pytest.importorskip("apache_beam")
    from retrain.beam import pipeline as beam_pipeline
    from retrain.beam.__main__ import parse

    cache_dir = tmp_path / "cache"
    runner = [
        "--runner",
        "DirectRunner",
        "--direct_num_workers",
        "1",
        "--direct_running_mode",
        "in_memory",
    ]
    config, pipeline_args = parse(
        [
            "--image_dir",
            str(image_dir),
            "--bottleneck_dir",
            str(cache_dir),
            "--extraction_batch_size",
            "4",
            "--engine",
            "keras",
            *runner,
        ]
    )
    assert pipeline_args == runner
    # Long lists reach the workers through a listing file instead of the job graph.
    monkeypatch.setattr(beam_pipeline, "CREATE_LIMIT", 5)
    listings, write_listing = [], beam_pipeline.write_listing
    monkeypatch.setattr(
        beam_pipeline,
        "write_listing",
        lambda *args: listings.append(write_listing(*args)) or listings[-1],
    )
    summary = beam_pipeline.run(config, pipeline_args)
    assert summary == {"to_extract": 15, "already_cached": 0, "extracted": 14, "failed": 1}
    assert shard_files(cache_dir) and not list(cache_dir.glob("*.partial"))
    assert len(listings) == 1 and not os.path.exists(listings[0]), "listing not used or left"
    assert beam_pipeline.run(config, pipeline_args)["to_extract"] == 0, "shards not seen"

    cache = BottleneckCache(cache_dir, LITE0)
    report = cache.update(images.discover(image_dir), progress=False)
    assert (report.extracted, report.reused) == (0, 14)
    assert contents(cache.path) == single_build


def test_beam_reads_images_and_writes_shards_through_gfile_urls(
    tmp_path, image_dir, single_build, backbone_builds
):
    """ram:// stands for gs://: the same tf.io.gfile code paths, in this process."""
    pytest.importorskip("apache_beam")
    from retrain.beam import pipeline as beam_pipeline
    from retrain.beam.__main__ import parse
    from retrain.quiet_tensorflow import import_tensorflow

    gfile = import_tensorflow().io.gfile
    bucket = f"ram://{tmp_path.name}"
    for path in image_dir.rglob("*.*"):
        target = f"{bucket}/photos/{path.relative_to(image_dir).as_posix()}"
        gfile.makedirs(target.rsplit("/", 1)[0])
        gfile.copy(str(path), target)
    config, pipeline_args = parse(
        [
            "--image_dir",
            f"{bucket}/photos/",
            "--bottleneck_dir",
            f"{bucket}/cache",
            "--engine",
            "keras",
            "--runner",
            "DirectRunner",
        ]
    )
    summary = beam_pipeline.run(config, pipeline_args)
    assert (summary["extracted"], summary["failed"]) == (14, 1)
    written = gfile.glob(f"{bucket}/cache/*.shard-beam-*.npz")
    assert written and not gfile.glob(f"{bucket}/cache/*.partial")

    # Copied down beside a local cache, a normal update merges them; the
    # copies' mtimes differ, so the digests confirm the files are unchanged.
    cache = BottleneckCache(tmp_path / "cache", LITE0)
    cache.path.parent.mkdir()
    for shard in written:
        gfile.copy(shard, str(cache.path.parent / shard.rsplit("/", 1)[1]))
    report = cache.update(images.discover(image_dir), progress=False)
    assert (report.extracted, report.reused, report.merged) == (0, 14, len(written))
    rows, failures = contents(cache.path)
    expected_rows, expected_failures = single_build
    assert rows == expected_rows and failures.keys() == expected_failures.keys()
    with pytest.raises(RetrainError, match="must be in a local folder.*bottleneck_dir=ram://"):
        BottleneckCache(f"{bucket}/cache", LITE0).update(images.discover(image_dir))


def test_beam_command_without_apache_beam_says_how_to_install(monkeypatch, capsys):
    from retrain.beam import __main__ as command

    real_find_spec = command.importlib.util.find_spec
    monkeypatch.setattr(
        command.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "apache_beam" else real_find_spec(name, *a),
    )
    assert command.main(["--image_dir", "photos"]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[beam]'" in err and err.count("\n") == 1


def test_beam_command_usage_errors_exit_2(tmp_path, capsys):
    from retrain.beam import __main__ as command

    assert command.main(["--bottleneck_dir", str(tmp_path)]) == 2
    assert "--image_dir is required" in capsys.readouterr().err
    assert command.main(["--image_dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "Received: image_dir=" in err and err.count("\n") == 1
