"""The unknown detector (retrain.evaluation.unknown) and its sidecar file (retrain.export.unknown_file)."""

import logging

import h5py
import numpy as np
import pytest
from sklearn.datasets import load_digits

from retrain.data import images, sampling
from retrain.errors import RetrainError
from retrain.evaluation import unknown
from retrain.export import unknown_file
from retrain.files import atomic_write


def brute_force_scores(reference, queries, k):
    """1 - the k-th largest cosine similarity, by a full sort (no blocks, no partition)."""
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = np.sort(queries @ reference.T, axis=1)[:, ::-1]
    return 1.0 - similarity[:, k - 1]


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits as 64-d vectors: (x float32 [1797, 64], y int [1797])."""
    data = load_digits()
    return data.data.astype(np.float32), data.target


def unit_circle(angles_degrees):
    radians = np.deg2rad(np.asarray(angles_degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


# The conformal rank ceil(acceptance * 21) of 20 scores: 20 (19.95), 11 (10.5), 11, 21 -> 20.
@pytest.mark.parametrize("acceptance, accepted", [(0.95, 20), (0.5, 11), (0.51, 11), (1.0, 20)])
def test_threshold_accepts_exactly_the_requested_share(acceptance, accepted):
    # One reference vector at 0 degrees, k=1: a vector at angle a scores 1 - cos(a).
    validation = unit_circle(np.arange(1, 21) * 4.0)
    detector = unknown.fit(unit_circle([0.0]), validation, acceptance)
    scores = detector.scores(validation)
    np.testing.assert_allclose(scores, 1 - np.cos(np.deg2rad(np.arange(1, 21) * 4.0)), atol=1e-6)
    assert detector.k == 1
    assert int((~detector.is_unknown(scores)).sum()) == accepted
    assert detector.threshold == pytest.approx(float(np.sort(scores)[accepted - 1]))


@pytest.mark.parametrize("validation_size", [20, 60, 300])
def test_the_threshold_accepts_at_least_the_share_asked_of_new_pictures(validation_size):
    # Exchangeable scores: validation and a new picture drawn alike. Over 20,000
    # draws the share of new pictures accepted is at least 95% at every size
    # (the plain empirical quantile gives 90.5% at 20 validation images).
    rng = np.random.default_rng(validation_size)
    draws = rng.gamma(2.0, size=(20000, validation_size + 1))
    accepted = [draw[-1] <= unknown.acceptance_threshold(draw[:-1], 0.95) for draw in draws]
    assert np.mean(accepted) >= 0.95 - 0.004  # 3 standard errors


def test_scores_in_blocks_are_identical_and_match_a_full_sort(digits):
    x, _ = digits
    detector = unknown.fit(x[:700], x[700:900], 0.95, k=10)
    whole = detector.scores(x[900:])
    blocked = detector.scores(x[900:], block=7)
    # BLAS may round a row's dot products differently in a block of another
    # height (1 float32 ulp); the decisions are the same.
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=2e-7)
    np.testing.assert_array_equal(detector.is_unknown(blocked), detector.is_unknown(whole))
    np.testing.assert_allclose(whole, brute_force_scores(x[:700], x[900:], 10), atol=1e-5)


def test_without_validation_the_threshold_comes_from_leave_one_out(digits, caplog):
    x, _ = digits
    reference = x[:300]
    with caplog.at_level(logging.WARNING, logger="retrain.evaluation.unknown"):
        detector = unknown.fit(reference, None, 0.9, k=5)
    assert "No validation images" in caplog.text
    # Each vector's 5th neighbour among the others: the 6th counting itself.
    leave_one_out = brute_force_scores(reference, reference, 6)
    assert detector.threshold == pytest.approx(np.sort(leave_one_out)[int(np.ceil(0.9 * 301)) - 1])
    assert unknown.fit(reference, np.empty((0, 64)), 0.9, k=5).threshold == detector.threshold


def test_zero_vectors_and_a_tiny_reference_stay_finite():
    detector = unknown.fit(np.array([[0.0, 0.0], [1.0, 0.0]]), None, 1.0, k=10)
    assert detector.k == 2
    scores = detector.scores(np.zeros((3, 2)))
    assert np.isfinite(scores).all() and np.isfinite(detector.threshold)


def test_digits_of_other_classes_are_unknown(digits):
    x, y = digits
    inside, outside = np.flatnonzero(y < 5), np.flatnonzero(y >= 5)
    reference, validation, held_out = inside[::3], inside[1::3], inside[2::3]
    detector = unknown.fit(x[reference], x[validation], 0.95)
    flagged_in = detector.is_unknown(detector.scores(x[held_out])).mean()
    flagged_out = detector.is_unknown(detector.scores(x[outside])).mean()
    assert flagged_in <= 0.10
    assert flagged_out >= 0.5
    # Both directions: a detector whose reference is the other digits calls these unknown.
    swapped = unknown.fit(x[outside[::2]], x[outside[1::2]], 0.95)
    assert swapped.is_unknown(swapped.scores(x[held_out])).mean() >= 0.5


def entries_of(counts):
    return [
        images.ImageEntry(f"c{label}/{i}.jpg", f"c{label}", label, "training", f"{label}-{i:04d}")
        for label, count in enumerate(counts)
        for i in range(count)
    ]


def test_reference_entries_spread_over_the_classes_in_any_order():
    entries = entries_of([500, 20, 300])
    chosen = unknown.reference_entries(entries, 100)
    assert [sum(e.label_index == c for e in chosen) for c in range(3)] == [40, 20, 40]
    assert unknown.reference_entries(entries[::-1], 100) == chosen
    assert sampling.spread_over_classes(entries, 10_000) == unknown.reference_entries(entries)[:820]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"stands in for a .keras zip: only its bytes' digest matters here" * 100)
    return path


@pytest.fixture
def sidecar(digits, model_file):
    x, _ = digits
    detector = unknown.fit(x[:500], x[500:700], 0.95)
    return detector, unknown_file.save(detector, unknown_file.unknown_path(model_file), model_file)


def test_sidecar_round_trip(digits, model_file, sidecar):
    x, _ = digits
    detector, path = sidecar
    assert path == model_file.with_name("model.unknown.h5")
    assert not atomic_write.leftovers(path.parent)
    loaded = unknown_file.load(path, model_file)
    assert (loaded.k, loaded.threshold, loaded.acceptance) == (
        detector.k,
        detector.threshold,
        detector.acceptance,
    )
    assert loaded.reference.dtype == np.float32
    np.testing.assert_allclose(loaded.scores(x[700:]), detector.scores(x[700:]), atol=2e-3)
    with h5py.File(path) as file:
        assert file["reference"].dtype == np.float16


def test_a_sidecar_of_another_model_file_or_none_is_ignored_with_a_warning(
    model_file, sidecar, caplog
):
    _, path = sidecar
    model_file.write_bytes(b"a retrained model")
    with caplog.at_level(logging.WARNING):
        assert unknown_file.load(path, model_file) is None
    assert "belongs to another model file" in caplog.text
    caplog.clear()
    path.unlink()
    with caplog.at_level(logging.WARNING):
        assert unknown_file.load(path, model_file) is None
    assert len(caplog.records) == 1 and "has no unknown detector" in caplog.text


def rewrite(path, change):
    with h5py.File(path, "r+") as file:
        change(file)


def replace_reference(data=None, **options):
    def change(file):
        del file["reference"]
        file.create_dataset("reference", data=data, **options)

    return change


HOSTILE = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "not HDF5": lambda path: path.write_text("reference = [[1, 0]]\n"),
    "wrong dtype": lambda path: rewrite(path, replace_reference(np.ones((4, 64)))),
    "huge declared shape": lambda path: rewrite(
        path, replace_reference(shape=(60_000, 16_000), dtype=np.float16)
    ),
    "too many rows": lambda path: rewrite(
        path, replace_reference(np.ones((70_000, 1), np.float16))
    ),
    "compressed": lambda path: rewrite(
        path, replace_reference(np.ones((4, 64), np.float16), compression="gzip")
    ),
    "external link": lambda path: rewrite(
        path,
        lambda file: (
            file.__delitem__("reference"),
            file.__setitem__("reference", h5py.ExternalLink("/etc/passwd", "/x")),
        ),
    ),
    "text attribute": lambda path: rewrite(
        path, lambda file: file.attrs.__setitem__("method", "cosine_kth_nearest")
    ),
    "array attribute": lambda path: rewrite(
        path, lambda file: file.attrs.__setitem__("k", np.arange(10))
    ),
    "k beyond the rows": lambda path: rewrite(
        path, lambda file: file.attrs.__setitem__("k", np.int64(501))
    ),
    "not finite": lambda path: rewrite(
        path, replace_reference(np.full((500, 64), np.inf, np.float16))
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_sidecars_are_one_line_errors_naming_the_file(model_file, sidecar, case):
    _, path = sidecar
    HOSTILE[case](path)
    with pytest.raises(RetrainError) as raised:
        unknown_file.load(path, model_file)
    message = str(raised.value)
    assert str(path) in message and "\n" not in message


def test_a_link_or_fifo_as_the_sidecar_is_refused(tmp_path, model_file, sidecar):
    _, path = sidecar
    link = tmp_path / "linked.unknown.h5"
    link.symlink_to(path)
    with pytest.raises(RetrainError, match="symbolic link"):
        unknown_file.load(link, model_file)
