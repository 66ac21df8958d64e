"""The cases of benchmarks/hostile_check.py about names and untrusted files.

Non-UTF-8 file names, class names a spreadsheet or mathtext would parse,
FIFOs, sockets and devices named like images, a sparse 64 GB file, a
decompression bomb, damaged and planted cache files, a cache shared by two
image folders, models that run code when loaded, and a received output
folder full of symlinks and FIFOs (see hostile_cases for what a case is).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import hostile_files as hf
import hostile_support as hs
import numpy as np
from hostile_cases import Case, Context, Skip, outputs_complete, skipped_listed
from hostile_support import Planted, rows_problems

NAMES = ("=1+2", "$\\alpha$", "-dash", "two  spaces", "café 花")
CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")  # OWASP: cells a spreadsheet evaluates

# -- cases: names ----------------------------------------------------------------------


def case_non_utf8_name(ctx: Context, case: Case) -> None:
    """A photo named caf\\xe9.jpg (not UTF-8): exit 0, model saved, names escaped in the CSVs."""
    images, out = ctx.clone("img_latin1"), ctx.work / "out_latin1"
    photo = ctx.first_photo(images)
    shutil.copy2(photo, os.fsencode(photo.parent) + b"/caf\xe9.jpg")  # a copy: a near-duplicate
    if case.expect(ctx.retrain("run", images, out, ctx.cache), 0).code != 0:
        return
    outputs_complete(case, out)
    for path in sorted(out.glob("*.csv")):
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            case.problems.append(f"{path.name} is not UTF-8 ({error})")
    duplicates = out / "near_duplicates.csv"
    text = duplicates.read_text(encoding="utf-8", errors="replace") if duplicates.is_file() else ""
    case.check(
        "caf\\xe9.jpg" in text,
        "near_duplicates.csv does not name caf\\xe9.jpg (escaped as in skipped_images.txt)",
    )
    case.check((out / "report.html").is_file(), "report.html missing")


def case_hard_class_names(ctx: Context, case: Case) -> None:
    """Classes '=1+2', '$\\alpha$', '-dash', 'two  spaces', 'café 花': labels, report, CSVs."""
    sources = {name: ctx.classes_all[i % len(ctx.classes_all)] for i, name in enumerate(NAMES)}
    images = hf.copy_images(ctx.source, ctx.work / "img_names", sources, ctx.per_class, 20)
    out = ctx.work / "out_names"
    case.expect(ctx.retrain("run", images, out, ctx.cache), 0)
    outputs_complete(case, out)
    labels = out / "labels.txt"
    if labels.is_file():
        found = [n for n in labels.read_text(encoding="utf-8").split("\n") if n]
        case.check(sorted(found) == sorted(NAMES), f"labels.txt holds {found}")
    for name in ("report.html", "confusion_matrix.png", "training_curves.png"):
        case.check((out / name).is_file(), f"{name} missing")
    photo = sorted((images / NAMES[0]).iterdir())[0]
    result = case.expect(
        ctx.run(
            "label_image",
            hs.python(
                "-m",
                "retrain.label_image",
                "--graph",
                out / "model.keras",
                "--labels",
                labels,
                "--image",
                photo,
                "--json",
            ),
        ),
        0,
    )
    if result.code == 0:
        predicted = {
            p["label"] for r in json.loads(result.stdout)["results"] for p in r["predictions"]
        }
        case.check(predicted <= set(NAMES), f"label_image printed labels {predicted - set(NAMES)}")
    formula_cells(ctx.case("csv_formula_cells"), out)


def formula_cells(case: Case, out: Path) -> None:
    """No CSV cell a spreadsheet would evaluate (a plain number is not a formula)."""
    files, live = sorted(out.rglob("*.csv")), {}
    case.check(files, "no CSV written")
    for path in files:
        with open(path, encoding="utf-8", errors="replace", newline="") as file:
            for row in csv.reader(file):
                for cell in row:
                    if cell.startswith(CSV_TRIGGERS) and not _is_number(cell):
                        live.setdefault(path.name, set()).add(cell)
    for name, cells in live.items():
        case.problems.append(f"{name} has live cells {sorted(cells)[:3]}")
    case.notes.append(f"{len(files)} CSV files, no live formula")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# -- cases: untrusted files --------------------------------------------------------------


def case_special_files(ctx: Context, case: Case) -> None:
    """A FIFO, a socket and a symlink to /dev/zero named *.jpg: skipped unopened, exit 0."""
    images, out, planted = ctx.clone("img_special"), ctx.work / "out_special", Planted()
    folder = images / ctx.classes[0]
    os.mkfifo(folder / "fifo.jpg")
    hf.unix_socket(folder / "socket.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    other = sorted((ctx.source / ctx.classes_all[-1]).iterdir())[-1]
    victim = planted.file(ctx.work / "victims" / "victim.jpg", other.read_bytes())
    os.symlink(victim, folder / "link.jpg")  # a photo kept elsewhere: read, never written
    case.expect(ctx.retrain("run", images, out, ctx.cache, timeout=240), 0)
    outputs_complete(case, out)
    skipped_listed(case, out, "fifo.jpg", "socket.jpg", "zero.jpg")
    case.problems += planted.problems()


def case_sparse_64gb(ctx: Context, case: Case) -> None:
    """A sparse 64 GB x.jpg (a JPEG header, then a hole): skipped with one line, fast."""
    images, out, planted = ctx.clone("img_sparse"), ctx.work / "out_sparse", Planted()
    sparse = images / ctx.classes[0] / "x.jpg"
    if not hf.sparse_file(sparse, ctx.first_photo().read_bytes()[:4096], 64 << 30):
        raise Skip(f"{ctx.work} does not keep sparse files")
    planted.record(sparse)
    bound = max(90.0, 3 * ctx.baseline_seconds)
    result = case.expect(ctx.retrain("run", images, out, ctx.cache, timeout=bound + 60), 0)
    case.check(result.seconds <= bound, f"took {result.seconds:.0f} s (more than {bound:.0f} s)")
    outputs_complete(case, out)
    skipped_listed(case, out, "x.jpg")
    case.problems += planted.problems()
    sparse.unlink()


def case_decompression_bomb(ctx: Context, case: Case) -> None:
    """A 400-megapixel PNG of a few hundred KB: skipped, and memory stays near a normal run's."""
    images, out = ctx.clone("img_bomb"), ctx.work / "out_bomb"
    hf.png_bomb(images / ctx.classes[0] / "bomb.png", 20000)
    result = case.expect(ctx.retrain("run", images, out, ctx.cache), 0)
    outputs_complete(case, out)
    skipped_listed(case, out, "bomb.png")
    limit = ctx.baseline_peak_mb + 1024
    case.check(
        result.peak_mb <= limit,
        f"peak memory {result.peak_mb:.0f} MB (a normal run: {ctx.baseline_peak_mb:.0f} MB)",
    )
    case.notes.append(f"peak {result.peak_mb:.0f} MB")


def _main_cache_file(ctx: Context) -> Path:
    files = sorted(ctx.cache.glob("[!.]*.h5"))
    if not files:
        raise Skip("no warm cache file (the baseline failed)")
    return files[0]


def case_truncated_cache(ctx: Context, case: Case) -> None:
    """A cache file cut in half: set aside whole with a warning, rebuilt, exit 0."""
    model, cache = _main_cache_file(ctx), ctx.work / "cache_truncated"
    cache.mkdir()
    damaged = cache / model.name
    shutil.copy2(model, damaged)
    os.truncate(damaged, damaged.stat().st_size // 2)
    damaged_digest = hs.digest(damaged)
    result = case.expect(ctx.retrain("run", ctx.photos, ctx.work / "out_truncated", cache), 0)
    warned = [
        line
        for line in result.stderr.splitlines()
        if line.startswith("WARNING") and model.name in line
    ]
    case.check(warned, "no warning naming the damaged cache file")
    aside = sorted(p for p in cache.iterdir() if p.name.startswith(model.name + ".corrupt"))
    case.check(
        len(aside) == 1 and hs.digest(aside[0]) == damaged_digest,
        f"the damaged file was not set aside whole ({[p.name for p in aside]})",
    )
    images = sum(1 for _ in ctx.photos.glob("*/*"))
    rows = hs.cache_rows(cache)
    case.check(len(rows) == images, f"rebuilt cache holds {len(rows)} rows for {images} images")


def case_external_storage_cache(ctx: Context, case: Case) -> None:
    """A planted cache file whose vectors live in a secret file: the secret is never copied."""
    model, cache, planted = _main_cache_file(ctx), ctx.work / "cache_external", Planted()
    cache.mkdir()
    # Half the photos' rows planted: the run extracts the other half, and its
    # merge then copies the planted rows, unless the file is refused.
    photos = {str(p.relative_to(ctx.photos)) for p in ctx.photos.glob("*/*")}
    rows = [row for row, (_, path, _) in enumerate(hs.main_rows(model)) if path in photos]
    token = hf.secret_token()
    secret = planted.file(ctx.work / "secret.bin", token * (len(rows) * 1280 * 2 // len(token) + 1))
    needed = hf.external_cache(cache / model.name, model, secret, rows[: len(rows) // 2])
    case.check(needed <= secret.stat().st_size, "the secret file is too short (script error)")
    case.expect(ctx.retrain("run", ctx.photos, ctx.work / "out_external", cache), 0)
    holding = hf.files_holding(cache, token)
    case.check(not holding, f"the secret's bytes were copied into {holding}")
    case.problems += planted.problems()


def case_shared_cache_collision(ctx: Context, case: Case) -> None:
    """Two image folders, one cache, cls/001.jpg of equal size and mtime: each gets its own vector."""
    photo = ctx.first_photo()
    relative = f"{photo.parent.name}/{photo.name}"
    other_folder = ctx.clone("img_b")
    crafted = other_folder / relative
    other = sorted((ctx.source / ctx.classes_all[-1]).iterdir())[0]
    crafted.write_bytes(hf.jpeg_of_size(other, photo.stat().st_size))
    info = photo.stat()
    os.utime(crafted, ns=(info.st_atime_ns, info.st_mtime_ns))
    shared, alone = ctx.work / "cache_shared", ctx.work / "cache_b_alone"
    shared.mkdir()
    for path in ctx.cache.glob("[!.]*.h5"):
        shutil.copy2(path, shared / path.name)
    before = hs.cache_rows(shared)
    case.expect(
        ctx.retrain("b-shared", other_folder, ctx.work / "unused", shared, "--cache_only"), 0
    )
    case.expect(ctx.retrain("b-alone", other_folder, ctx.work / "unused", alone, "--cache_only"), 0)
    after = hs.cache_rows(shared)
    case.problems += rows_problems(before, after, exempt_paths={relative})
    own_a, own_b = hs.vectors_of(before, relative), hs.vectors_of(hs.cache_rows(alone), relative)
    if not (
        case.check(len(own_a) == 1 and len(own_b) == 1, "no row for the colliding path")
        and case.check(not _same(own_a[0], own_b[0]), "the crafted picture gave the same vector")
    ):
        return
    case.check(
        any(_same(v, own_b[0]) for v in hs.vectors_of(after, relative)),
        "the second folder was given the first folder's vector",
    )
    case.expect(ctx.retrain("a-again", ctx.photos, ctx.work / "unused", shared, "--cache_only"), 0)
    case.check(
        any(_same(v, own_a[0]) for v in hs.vectors_of(hs.cache_rows(shared), relative)),
        "back on the first folder, its own vector is gone",
    )


def _same(a, b) -> bool:
    return bool(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32))) < 1e-2)


def case_label_image_untrusted(ctx: Context, case: Case) -> None:
    """label_image --graph with models whose Lambda writes a file: exit 2, nothing runs."""
    models = ctx.work / "models"
    models.mkdir()
    probe, marker = models / "probe", models / "marker"
    built = ctx.run(
        "build",
        hs.python("-c", hf.LAMBDA_MODEL_BUILDER, models, 3),
        env={"HOSTILE_MARKER": str(probe)},
    )
    if built.code:
        case.problems.append(
            f"could not build the crafted models: {hs.message_lines(built.stderr)[-1:]}"
        )
        return
    shutil.copy2(models / "lambda.h5", models / "h5_named.keras")
    labels = models / "labels.txt"
    labels.write_text("a\nb\nc\n", encoding="utf-8")
    for this, graph in (
        (case, "lambda.h5"),
        (ctx.case("label_image_keras_lambda"), "lambda.keras"),
        (ctx.case("label_image_h5_named_keras"), "h5_named.keras"),
    ):
        this.expect(
            ctx.run(
                graph,
                hs.python(
                    "-m",
                    "retrain.label_image",
                    "--graph",
                    models / graph,
                    "--labels",
                    labels,
                    "--image",
                    ctx.first_photo(),
                ),
                env={"HOSTILE_MARKER": str(marker)},
            ),
            2,
        )
        this.check(not marker.exists(), f"{graph}'s Lambda ran (it wrote {marker.name})")
        if marker.exists():
            marker.unlink()
    trusted = ctx.case("label_image_help_trusted")
    result = trusted.expect(ctx.run("help", hs.python("-m", "retrain.label_image", "--help")), 0)
    trusted.check(
        "trusted" in result.stdout,
        "--help does not say SavedModel and .tflite files must come from a trusted source",
    )


def case_received_report(ctx: Context, case: Case) -> None:
    """retrain.report on a received folder of symlinks and FIFOs: no write through, no hang."""
    if not (ctx.work / "finished").is_dir():
        raise Skip("no finished output folder (the baseline failed)")
    received, planted = ctx.work / "received", Planted()
    shutil.copytree(ctx.work / "finished", received, symlinks=True)
    victims = ctx.work / "victims_report"
    for name in ("report.html", "training_curves.png", "confusion_matrix.png"):
        victim = planted.file(victims / name, f"the user's own {name}\n".encode())
        (received / name).unlink(missing_ok=True)
        os.symlink(victim, received / name)
    planted.file(victims / "thumbnails" / "mine.jpg", b"the user's own picture\n")
    planted.record(victims / "thumbnails")
    shutil.rmtree(received / "thumbnails", ignore_errors=True)
    os.symlink(victims / "thumbnails", received / "thumbnails")
    for name in ("near_duplicates.csv", "data_checks.json"):
        (received / name).unlink(missing_ok=True)
        os.mkfifo(received / name)
    case.expect(ctx.run("report", hs.python("-m", "retrain.report", received), timeout=120), 0, 2)
    case.problems += planted.problems()


def case_npz_bomb(ctx: Context, case: Case) -> None:
    """Shard and journal files whose vectors inflate to 1 GB: refused unread, memory bounded."""
    cache = ctx.work / "cache_npz_bomb"
    case.expect(
        ctx.retrain(
            "shard",
            ctx.photos,
            ctx.work / "unused",
            cache,
            "--cache_only",
            "--num_shards",
            "2",
            "--shard_index",
            "0",
        ),
        0,
    )
    shards = sorted(cache.glob("[!.]*.h5.shard-*.npz"))
    if not case.check(shards, "the shard run wrote no shard file"):
        return
    bomb = ctx.work / "bomb.npz"
    hf.npz_bomb(shards[0], bomb)
    shutil.copy2(bomb, shards[0])
    journal = Path(f"{str(shards[0]).split('.shard-')[0]}.journal")
    journal.mkdir(exist_ok=True)
    shutil.copy2(bomb, journal / "00000001.npz")
    result = case.expect(ctx.retrain("run", ctx.photos, ctx.work / "out_npz_bomb", cache), 0)
    outputs_complete(case, ctx.work / "out_npz_bomb")
    limit = ctx.baseline_peak_mb + 512
    case.check(
        result.peak_mb <= limit,
        f"peak memory {result.peak_mb:.0f} MB: a 1 GB member was "
        f"inflated (a normal run: {ctx.baseline_peak_mb:.0f} MB)",
    )
    case.notes.append(f"peak {result.peak_mb:.0f} MB")


def case_lock_symlinks(ctx: Context, case: Case) -> None:
    """Lock files planted as symlinks to a user's files: the files are not truncated.

    One run per lock (a refused output lock would stop the run before the
    cache lock is taken): the cache's, then the output folder's.
    """
    model, cache, planted = _main_cache_file(ctx), ctx.work / "cache_locks", Planted()
    cache.mkdir()
    shutil.copy2(model, cache / model.name)
    victims = ctx.work / "victims_locks"
    os.symlink(
        planted.file(victims / "cache_victim.txt", b"precious\n"), cache / f"{model.name}.lock"
    )
    os.symlink(
        planted.file(victims / "output_victim.txt", b"precious\n"), ctx.work / ".out_locks2.lock"
    )
    for name, out, bottlenecks in (
        ("cache-lock", "out_locks1", cache),
        ("output-lock", "out_locks2", ctx.cache),
    ):
        if case.expect(ctx.retrain(name, ctx.photos, ctx.work / out, bottlenecks), 0, 2).code == 0:
            outputs_complete(case, ctx.work / out)
    case.problems += planted.problems()
