"""The report never costs the run, and what it writes and reads is safe (issue 21).

* names that are not UTF-8 are written with the escapes of skipped_images.txt
  in every CSV, JSON and HTML file (they crashed near_duplicates.csv);
* CSV cells a spreadsheet would evaluate are quoted (OWASP), and read back
  exactly;
* `python -m retrain.report DIR` on a received folder never writes through a
  symbolic link and never opens a FIFO, a link or an oversized file;
* a failing report part is a warning and a "Report incomplete" line, never a
  lost run: whole runs with the real Lite0 through `retrain.cli.main`.

Every hostile file (FIFO, sparse file, symbolic links, pickled and
deflate-bomb .npz) is built here.
"""

import csv
import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data
from test_figures import assert_png

from retrain import cli, evaluation, report
from retrain.errors import RetrainError
from retrain.evaluation import check_files, label_issues, near_duplicates, run_record
from retrain.files import text_escapes
from retrain.report import figures, thumbnails

ROOT = Path(__file__).parents[1]
LATIN1 = os.fsdecode(b"caf\xe9.jpg")  # 'caf\udce9.jpg'
FORMULAS = ["=1+2", "+x", "-y", "@SUM(A1)", "\tz", "\rw", "'=quoted", "''@two", "'plain", "plain"]


# ---------------------------------------------------------------- escapes and CSV cells


def test_one_line_escapes_undecodable_bytes_like_skipped_images_txt():
    assert text_escapes.one_line(f"cat/{LATIN1}") == "cat/caf\\xe9.jpg"
    assert text_escapes.one_line("a\tb\nc\u2028d é") == "a\\tb\\nc\\u2028d é"
    for text in (f"x/{LATIN1}", "tab\tname/1.jpg", "plain/é.jpg", "back\\slash"):
        once = text_escapes.one_line(text)
        assert text_escapes.one_line(once) == once
        once.encode("utf-8")  # never raises


@pytest.mark.parametrize("value", FORMULAS)
def test_formula_cells_are_quoted_and_read_back_exactly(value):
    written = text_escapes.csv_text(value)
    assert written[0] not in text_escapes.FORMULA_STARTS
    assert text_escapes.from_csv(written) == value


def test_numbers_stay_numbers():
    assert text_escapes.csv_rows(["a", "b"], [[-3, -0.5]]) == "a,b\r\n-3,-0.5\r\n"


def cells(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return [cell for row in csv.reader(handle) for cell in row]


def test_check_csvs_quote_formulas_escape_paths_and_read_back(tmp_path):
    issues = [label_issues.LabelIssue(f"{name}/{LATIN1}", name, "=1+2", 0.25) for name in FORMULAS]
    pairs = [
        near_duplicates.NearDuplicate(f"=1+2/{LATIN1}", "-a/b.jpg", "training", "testing", 0.0)
    ]
    check_files.write_label_issues(issues, tmp_path / "issues.csv")
    check_files.write_near_duplicates(pairs, tmp_path / "pairs.csv")
    for name in ("issues.csv", "pairs.csv"):
        assert all(
            cell[:1] not in text_escapes.FORMULA_STARTS for cell in cells(tmp_path / name) if cell
        )
        assert "caf\\xe9.jpg" in (tmp_path / name).read_text(encoding="utf-8")
    read = check_files.read_label_issues(tmp_path / "issues.csv")
    assert [(i.given, i.suggested, i.score) for i in read] == [(n, "=1+2", 0.25) for n in FORMULAS]
    assert [i.image for i in read] == [text_escapes.one_line(i.image) for i in issues]
    [pair] = check_files.read_near_duplicates(tmp_path / "pairs.csv")
    assert (pair.image_a, pair.image_b) == ("=1+2/caf\\xe9.jpg", "-a/b.jpg")


def test_metrics_files_quote_class_names_and_escape_paths(tmp_path, capsys):
    names = ["=1+2", "-neg", "plain"]
    result = evaluation.evaluate(
        np.eye(3, dtype=np.float32)[[0, 1, 2, 0]], np.array([0, 1, 2, 1]), names
    )
    wrong = [(f"-neg/{LATIN1}", "-neg", "=1+2", 0.9)]
    evaluation.write_metrics(result, tmp_path, wrong)
    written = cells(tmp_path / "confusion_matrix.csv")
    assert "'=1+2" in written and "'-neg" in written
    assert all(cell[:1] not in text_escapes.FORMULA_STARTS for cell in written)
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["misclassified"][0]["path"] == "-neg/caf\\xe9.jpg"
    evaluation.print_misclassified(wrong)  # a strict UTF-8 stdout must not fail either
    assert "caf\\xe9.jpg" in capsys.readouterr().out


def test_run_record_writes_undecodable_paths_escaped(tmp_path):
    from test_run_record import small_record

    record = small_record()
    record.images[0] = f"cat/{LATIN1}"
    record.skipped = [(f"dog/{LATIN1}", "damaged")]
    run_record.save(record, tmp_path)
    (tmp_path / run_record.RECORD_FILE).read_text(encoding="utf-8")
    loaded = run_record.load(tmp_path)
    assert loaded.images[0] == "cat/caf\\xe9.jpg" and loaded.skipped[0][0] == "dog/caf\\xe9.jpg"


def test_the_page_shows_undecodable_settings_escaped(tmp_path):
    from test_run_record import small_record

    record = small_record()
    record.settings["image_dir"] = record.image_dir = f"/photos/{LATIN1}"
    run_record.save(record, tmp_path)
    assert (
        json.loads((tmp_path / run_record.RECORD_FILE).read_text())["settings"]["image_dir"]
        == f"/photos/{LATIN1}"
    )  # kept exactly (as \\udce9 in the JSON)
    page = report.build(tmp_path).read_text(encoding="utf-8")  # UnicodeEncodeError before
    assert page.count("/photos/caf\\xe9.jpg") >= 3  # title, lead line, settings


# ---------------------------------------------------------------- a received output folder


@pytest.fixture
def folder(tmp_path):
    """A small output folder as a run leaves it (record, probabilities, both CSVs)."""
    from test_run_record import small_record

    out = tmp_path / "received"
    out.mkdir()
    run_record.save(small_record(), out)
    check_files.write_label_issues(
        [label_issues.LabelIssue("cat/1.jpg", "cat", "dog", 0.1)],
        out / check_files.LABEL_ISSUES_FILE,
    )
    check_files.write_near_duplicates([], out / check_files.NEAR_DUPLICATES_FILE)
    return out


def rebuild(out, timeout=120):
    """`python -m retrain.report out` in a subprocess: a FIFO read would block it."""
    return subprocess.run(
        [sys.executable, "-m", "retrain.report", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def assert_one_line_refusal(done, *fragments):
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
        done.stderr
    )
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


def test_rebuild_of_a_clean_folder_works(folder):
    done = rebuild(folder)
    assert done.returncode == 0, done.stderr
    assert_png(folder / report.CURVES_FILE)
    assert "cat/1.jpg" in (folder / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "name",
    [
        run_record.RECORD_FILE,
        check_files.LABEL_ISSUES_FILE,
        report.CHECKS_FILE,
        run_record.PROBABILITIES_FILE,
    ],
)
def test_a_fifo_left_in_the_folder_is_refused_not_read(folder, name):
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    assert_one_line_refusal(rebuild(folder, timeout=60), name, "not a regular file")


@pytest.mark.parametrize("name", [run_record.RECORD_FILE, check_files.NEAR_DUPLICATES_FILE])
def test_a_link_to_a_file_outside_is_refused(folder, tmp_path, name):
    outside = tmp_path / "outside.txt"
    outside.write_bytes((folder / name).read_bytes())
    (folder / name).unlink()
    (folder / name).symlink_to(outside)
    assert_one_line_refusal(rebuild(folder), name, "symbolic link")


@pytest.mark.parametrize("name", [report.REPORT_FILE, report.CURVES_FILE, report.CONFUSION_FILE])
def test_the_page_and_figures_replace_links_never_write_through_them(folder, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (folder / name).symlink_to(victim)
    done = rebuild(folder)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious\n"
    assert not (folder / name).is_symlink() and (folder / name).stat().st_size > 1000


def test_a_linked_thumbnails_folder_is_not_shown(folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / Path(thumbnails.thumbnail_path("cat/1.jpg")).name)
    (folder / thumbnails.THUMBNAIL_DIR).symlink_to(elsewhere)
    assert rebuild(folder).returncode == 0
    assert "thumbnails/" not in (folder / "report.html").read_text(encoding="utf-8")
    with pytest.raises(RetrainError, match="symbolic link"):
        thumbnails.write_thumbnails(tmp_path, ["cat/1.jpg"], folder, {"cat/1.jpg": b"jpeg"})


def test_a_huge_sparse_record_is_refused_before_it_is_read(folder):
    with open(folder / run_record.RECORD_FILE, "r+b") as handle:
        handle.truncate(5 * 1024**3)  # 5 GB, sparse: costs no disk
    assert_one_line_refusal(rebuild(folder, timeout=60), run_record.RECORD_FILE, "bytes")


def npz_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npy_claiming(shape, data: bytes) -> bytes:
    """A float32 .npy header claiming `shape`, followed by `data`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue() + data


@pytest.mark.parametrize(
    "members, fragment",
    [
        # A pickled object array: reading it would run code; refused without loading pickles.
        ({"testing.npy": npy(np.array([object(), None], dtype=object))}, "probabilities.npz"),
        # A deflate bomb: 200 MB of zeros in a few hundred KB, claiming a huge array.
        (
            {"testing.npy": npy_claiming((50_000_000, 1), bytes(200 * 1024**2))},
            "the record implies",
        ),
        ({"other.npy": npy(np.zeros((2, 2), np.float32))}, "unexpected array"),
    ],
)
def test_probabilities_are_checked_before_they_are_read(folder, members, fragment):
    (folder / run_record.PROBABILITIES_FILE).write_bytes(npz_bytes(members))
    assert_one_line_refusal(rebuild(folder, timeout=60), fragment)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"image,given,suggested,score\r\ncat/1.jpg,cat,dog,nan\r\n", "not a finite number"),
        (b"image,given,suggested,score\r\ncat/1.jpg,cat\r\n", "more or fewer cells"),
        (b"who,what\r\n", "header must be"),
        (b"image,given,suggested,score\r\n\xff,cat,dog,0.1\r\n", "codec"),
    ],
)
def test_a_csv_retrain_did_not_write_is_one_line(folder, content, fragment):
    (folder / check_files.LABEL_ISSUES_FILE).write_bytes(content)
    assert_one_line_refusal(rebuild(folder), fragment)


def test_a_record_retrain_did_not_write_is_one_line(folder):
    document = json.loads((folder / run_record.RECORD_FILE).read_text())
    document["images"][0]["label"] = 99  # out of range: an IndexError deep in the page before
    (folder / run_record.RECORD_FILE).write_text(json.dumps(document))
    assert_one_line_refusal(rebuild(folder), "run_record.json", "labels must be in")


# ---------------------------------------------------------------- a failing part is a warning


def test_a_failing_part_is_a_warning_and_the_page_is_still_written(folder, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(figures, "plot_confusion_matrix", fail)
    record = run_record.load(folder)
    outcome = report.write_run_report(record, fail, folder)
    assert outcome.checks is None and outcome.page == folder / report.REPORT_FILE
    missing = [name for name, _ in outcome.parts.missing]
    assert missing == [
        f"data checks ({check_files.LABEL_ISSUES_FILE}, {check_files.NEAR_DUPLICATES_FILE})",
        report.CONFUSION_FILE,
    ]
    assert outcome.parts.line() == (
        "Report incomplete: "
        + "; ".join(f"{name} missing (RuntimeError: planted)" for name in missing)
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "planted" in w]) == 2, warnings
    page = (folder / report.REPORT_FILE).read_text(encoding="utf-8")
    assert report.CONFUSION_FILE not in page and report.CURVES_FILE in page


def test_interrupts_are_not_turned_into_warnings(folder):
    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        report.write_run_report(run_record.load(folder), interrupt, folder)


# ---------------------------------------------------------------- whole runs

# Hostile to a spreadsheet (formulas) and to matplotlib's mathtext parser.
CLASSES = ["=1+2", "$\\alpha$", "$\\frac{$", "@home"]
PER_CLASS = 6
FAST = [
    "--how_many_training_steps",
    "20",
    "--eval_step_interval",
    "10",
    "--extraction_batch_size",
    "8",
    "--testing_percentage",
    "35",
    "--validation_percentage",
    "0",
]


def write_photos(root):
    """PER_CLASS crops of a different scikit-image photo per class, and in the first
    class an exact copy of its first photo under a Latin-1 name (a near-duplicate pair)."""
    rng = np.random.default_rng(0)
    for name, pixels in zip(
        CLASSES, [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    ):
        (root / name).mkdir(parents=True)
        height, width = pixels.shape[:2]
        for number in range(PER_CLASS):
            top, left = rng.integers(0, height // 4), rng.integers(0, width // 4)
            Image.fromarray(pixels[top : top + 3 * height // 4, left : left + 3 * width // 4]).save(
                root / name / f"{number}.jpg"
            )
    first = root / CLASSES[0]
    Path(os.fsdecode(bytes(first) + b"/caf\xe9.jpg")).write_bytes((first / "0.jpg").read_bytes())
    return root


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("report_safety")
    photos = write_photos(base / "photos")
    argv = ["--image_dir", str(photos), "--bottleneck_dir", str(base / "cache"), *FAST]
    status = cli.main([*argv, "--output_dir", str(base / "out")])
    return {"status": status, "out": base / "out", "argv": argv, "base": base}


def test_a_non_utf8_name_in_the_checks_does_not_cost_the_run(hostile_run):
    assert hostile_run["status"] == 0
    out = hostile_run["out"]
    pairs = check_files.read_near_duplicates(out / check_files.NEAR_DUPLICATES_FILE)
    escaped = f"{CLASSES[0]}/caf\\xe9.jpg"
    assert any(escaped in (pair.image_a, pair.image_b) for pair in pairs)
    record = json.loads((out / run_record.RECORD_FILE).read_text(encoding="utf-8"))
    assert escaped in [image["path"] for image in record["images"]]
    page = (out / report.REPORT_FILE).read_text(encoding="utf-8")
    assert escaped in page
    thumbnail = thumbnails.thumbnail_path(escaped)
    assert thumbnail in page and (out / thumbnail).is_file()
    assert thumbnails.thumbnail_path(f"{CLASSES[0]}/{LATIN1}") == thumbnail


def test_formula_class_names_are_quoted_in_every_csv(hostile_run):
    out = hostile_run["out"]
    for name in ("label_issues.csv", "near_duplicates.csv", "confusion_matrix.csv"):
        written = cells(out / name)
        assert all(cell[:1] not in text_escapes.FORMULA_STARTS for cell in written if cell), name
    assert "'=1+2" in cells(out / "confusion_matrix.csv")
    pairs = check_files.read_near_duplicates(out / check_files.NEAR_DUPLICATES_FILE)
    assert any(pair.image_a.startswith("=1+2/") for pair in pairs)


def test_class_names_are_drawn_as_written(hostile_run):
    assert_png(hostile_run["out"] / report.CONFUSION_FILE)
    names = [f"$\\{command}$" for command in ("notacommand", "frac{")] + ["a$b", "\\", "_x^2", "$x"]
    figure = figures.draw_confusion_matrix(np.eye(len(names), dtype=np.int64), names)
    figure.canvas.draw()  # the mathtext parser raised ValueError here
    assert sorted(tick.get_text() for tick in figure.axes[0].get_yticklabels()) == sorted(names)


def test_a_failing_figure_and_checks_are_warnings_and_the_model_is_kept(
    hostile_run, monkeypatch, caplog, capsys
):
    def fail(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(figures, "plot_training_curves", fail)
    monkeypatch.setattr(label_issues, "find_label_issues", fail)
    out = hostile_run["base"] / "failing"
    assert cli.main([*hostile_run["argv"], "--output_dir", str(out)]) == 0
    assert (out / "model.keras").is_file() and (out / "labels.txt").is_file()
    assert (out / report.REPORT_FILE).is_file() and (out / report.CONFUSION_FILE).is_file()
    assert not (out / report.CURVES_FILE).exists() and not (out / "label_issues.csv").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "training_curves.png not written (RuntimeError: planted failure)" in w for w in warnings
    ), warnings
    captured = capsys.readouterr()
    [line] = [line for line in captured.err.splitlines() if line.startswith("Report incomplete")]
    assert "training_curves.png missing (RuntimeError: planted failure)" in line
    assert "data checks (label_issues.csv, near_duplicates.csv) missing" in line
    assert "Traceback" not in captured.err and "Data checks:" not in captured.out
    assert "Report: " in captured.out
