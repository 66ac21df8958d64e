"""Label issues and near-duplicates on vectors whose answer is known.

The vectors here are built by the test (clusters with planted mistakes); the
same checks on real photos through the real backbone are in test_run_report.py.
"""

import json

import numpy as np
import pytest

from retrain.errors import RetrainError
from retrain.evaluation import check_files, check_limits, label_issues, near_duplicates


def clustered(classes=4, per_class=40, dim=64, seed=0, spread=0.35):
    """Non-negative vectors (like pooled ReLU features) in one cluster per class.

    With spread=1, two images of one class are about 0.17 apart in cosine
    distance, well above DUPLICATE_DISTANCE, as distinct photos are.
    """
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, (classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    vectors = centres[labels] + rng.gamma(1.0, spread, (len(labels), dim))
    paths = [f"c{label}/{i:03d}.jpg" for i, label in enumerate(labels)]
    return vectors.astype(np.float32), labels, paths


def test_planted_label_errors_come_first():
    vectors, labels, paths = clustered()
    names = ["a", "b", "c", "d"]
    planted = [5, 47, 90, 133]
    wrong = labels.copy()
    wrong[planted] = (labels[planted] + 1) % 4
    issues = label_issues.find_label_issues(vectors, wrong, names, paths)
    assert {issue.image for issue in issues[: len(planted)]} == {paths[i] for i in planted}
    first = {issue.image: issue for issue in issues}[paths[5]]
    assert (first.given, first.suggested) == ("b", "a")
    scores = [issue.score for issue in issues]
    assert scores == sorted(scores) and all(0 <= s <= 1 for s in scores)


def test_clean_labels_raise_few_issues():
    vectors, labels, paths = clustered()
    assert len(label_issues.find_label_issues(vectors, labels, list("abcd"), paths)) <= 2


def test_a_class_with_one_image_does_not_break_the_check():
    vectors, labels, paths = clustered(classes=3, per_class=20)
    labels = labels.copy()
    labels[0] = 3  # the only image of class "d"
    issues = label_issues.find_label_issues(vectors, labels, list("abcd"), paths)
    assert all(issue.given in "abcd" and issue.suggested in "abcd" for issue in issues)


def test_planted_duplicates_are_the_closest_pairs_and_straddling_is_flagged():
    vectors, _, paths = clustered(per_class=50, spread=1.0)
    rng = np.random.default_rng(1)
    originals = [3, 60, 121, 180]
    copies = vectors[originals] * 1.02 + rng.normal(0, 0.01, (4, vectors.shape[1])).astype(
        np.float32
    )
    all_vectors = np.concatenate([vectors, copies])
    all_paths = paths + [f"copy_{i}.jpg" for i in range(4)]
    splits = ["training"] * len(paths) + ["testing", "training", "training", "validation"]
    pairs = near_duplicates.find_near_duplicates(all_vectors, all_paths, splits, max_distance=1.0)
    top = {frozenset((p.image_a, p.image_b)) for p in pairs[:4]}
    assert top == {frozenset((paths[o], f"copy_{i}.jpg")) for i, o in enumerate(originals)}
    assert [p.distance for p in pairs] == sorted(p.distance for p in pairs)
    assert [p.straddles_splits for p in pairs[:4]].count(True) == 2
    default = near_duplicates.find_near_duplicates(all_vectors, all_paths, splits)
    assert {frozenset((p.image_a, p.image_b)) for p in default[:4]} == top
    assert all(p.distance <= near_duplicates.DUPLICATE_DISTANCE for p in default)
    assert len(default) < len(pairs)


def test_near_duplicate_search_does_not_build_all_pairs(monkeypatch):
    """At most n * DUPLICATE_NEIGHBOURS candidate pairs are scored, whatever n is."""
    vectors, _, paths = clustered(classes=8, per_class=250, dim=96)
    pairs = near_duplicates.find_near_duplicates(
        vectors, paths, ["training"] * len(paths), max_distance=2.0
    )
    assert len(pairs) <= len(paths) * near_duplicates.DUPLICATE_NEIGHBOURS
    assert len(pairs) >= len(paths) // 2


def test_csv_round_trip_and_header(tmp_path):
    issues = [
        label_issues.LabelIssue("a/1.jpg", "a", "b", 0.01),
        label_issues.LabelIssue("b/é,2.jpg", "b", "a", 0.2),
    ]
    pairs = [near_duplicates.NearDuplicate("a/1.jpg", "b/2.jpg", "training", "testing", 0.003)]
    check_files.write_label_issues(issues, tmp_path / "issues.csv")
    check_files.write_near_duplicates(pairs, tmp_path / "pairs.csv")
    assert (tmp_path / "issues.csv").read_text(encoding="utf-8").splitlines()[
        0
    ] == "image,given,suggested,score"
    assert (tmp_path / "pairs.csv").read_text().splitlines()[
        0
    ] == "image_a,image_b,split_a,split_b,distance"
    assert check_files.read_label_issues(tmp_path / "issues.csv") == issues
    assert check_files.read_near_duplicates(tmp_path / "pairs.csv") == pairs
    with pytest.raises(RetrainError, match="header must be image_a,image_b"):
        check_files.read_near_duplicates(tmp_path / "issues.csv")


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: near_duplicates.find_near_duplicates(
                np.zeros((3, 4)), ["a", "b"], ["training"] * 3
            ),
            "2 paths",
        ),
        (
            lambda: label_issues.find_label_issues(
                np.zeros((3, 4)), np.array([0, 1, 2]), ["a", "b"], list("xyz")
            ),
            r"range=\[0, 2\]",
        ),
        (
            lambda: label_issues.find_label_issues(
                np.zeros((3, 4)), np.array([0, 1]), ["a", "b"], list("xy")
            ),
            r"labels.shape=\(2,\)",
        ),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(RetrainError, match=message):
        call()


def test_too_few_images_give_empty_results():
    assert label_issues.find_label_issues(np.ones((1, 4)), np.array([0]), ["a", "b"], ["x"]) == []
    assert near_duplicates.find_near_duplicates(np.ones((1, 4)), ["x"], ["training"]) == []


def test_capped_folds_partition_the_rows_and_cap_every_fit():
    labels = np.repeat(np.arange(4), [500, 300, 30, 3])
    splits = list(label_issues._capped_folds(labels, 3, fit_rows=200, seed=0))
    held_out = np.sort(np.concatenate([test for _, test in splits]))
    np.testing.assert_array_equal(held_out, np.arange(len(labels)))  # each row scored once
    for train, test in splits:
        assert len(train) <= 200 and not set(train) & set(test)
        assert set(labels[train]) == {0, 1, 2, 3}  # the rare classes keep their rows


def test_a_group_of_copies_is_listed_once_per_image():
    """Four copies of one image: 3 rows (each joins the group once), not all 6 pairs."""
    vectors, _, paths = clustered(per_class=30, spread=1.0)
    rng = np.random.default_rng(2)
    copies = vectors[7] + rng.normal(0, 0.01, (3, vectors.shape[1])).astype(np.float32)
    all_paths = paths + ["copy_a.jpg", "copy_b.jpg", "copy_c.jpg"]
    pairs = near_duplicates.find_near_duplicates(
        np.concatenate([vectors, copies]),
        all_paths,
        ["training"] * len(all_paths),
        max_distance=0.01,
    )
    group = {paths[7], "copy_a.jpg", "copy_b.jpg", "copy_c.jpg"}
    assert len(pairs) == 3
    assert set().union(*({p.image_a, p.image_b} for p in pairs)) == group


def test_checks_are_reused_only_for_the_same_inputs(tmp_path):
    """find_data_checks reads the previous run's findings when, and only when, the
    vectors, labels, paths, splits and seed are those they were computed from."""
    from retrain import report

    vectors, labels, paths = clustered()
    names, splits = ["a", "b", "c", "d"], ["training"] * len(paths)
    previous = tmp_path / "previous"
    previous.mkdir()
    fresh = report.find_data_checks(
        vectors, labels, names, paths, splits, tmp_path, previous_dir=previous
    )
    assert not fresh.reused and fresh.key
    # A previous run's files from these inputs, with a finding the checks would not make.
    planted = [label_issues.LabelIssue("c0/000.jpg", "a", "b", 0.001)]
    check_files.write_label_issues(planted, previous / check_files.LABEL_ISSUES_FILE)
    check_files.write_near_duplicates([], previous / check_files.NEAR_DUPLICATES_FILE)
    (previous / report.CHECKS_FILE).write_text(json.dumps({"key": fresh.key}))

    again = report.find_data_checks(
        vectors, labels, names, paths, splits, tmp_path, previous_dir=previous
    )
    assert again.reused and again.issues == planted and again.duplicates == []
    moved = labels.copy()
    moved[3] = 1
    nudged = vectors.copy()
    nudged[7, 0] += 1e-3
    for changed in (
        dict(labels=moved),
        dict(bottlenecks=nudged),
        dict(seed=1),
        dict(splits=["testing"] + splits[1:]),
        dict(images=paths[::-1]),
        dict(total_images=len(paths) + 1),
    ):
        arguments = dict(
            bottlenecks=vectors,
            labels=labels,
            class_names=names,
            images=paths,
            splits=splits,
            image_dir=tmp_path,
            seed=0,
            previous_dir=previous,
        )
        arguments.update(changed)
        checks = report.find_data_checks(**arguments)
        assert not checks.reused and checks.key != fresh.key, changed
    # A damaged previous file is not an error: the checks run again.
    (previous / check_files.LABEL_ISSUES_FILE).write_text("not,our,header\n")
    damaged = report.find_data_checks(
        vectors, labels, names, paths, splits, tmp_path, previous_dir=previous
    )
    assert not damaged.reused and damaged.issues == fresh.issues


def test_a_large_set_is_checked_on_a_seeded_sample_and_says_so(tmp_path):
    from retrain import report

    assert list(check_limits.checked_rows(5, seed=3, most=5)) == [0, 1, 2, 3, 4]
    rows = check_limits.checked_rows(1000, seed=3, most=100)
    assert len(rows) == 100 == len(set(rows.tolist())) and list(rows) == sorted(rows)
    assert 0 <= rows.min() and rows.max() < 1000
    assert np.array_equal(rows, check_limits.checked_rows(1000, seed=3, most=100))
    assert not np.array_equal(rows, check_limits.checked_rows(1000, seed=4, most=100))

    vectors, labels, paths = clustered()
    names, splits = ["a", "b", "c", "d"], ["training"] * len(paths)
    every = report.find_data_checks(vectors, labels, names, paths, splits, tmp_path)
    assert (every.checked, every.total, every.sampled) == (160, 160, "")
    assert "sample" not in report.checks_summary(every)
    sampled = report.find_data_checks(
        vectors, labels, names, paths, splits, tmp_path, total_images=16_000
    )
    assert (sampled.checked, sampled.total) == (160, 16_000)
    assert "), among a random sample of 160 of the 16,000 images." in report.checks_summary(sampled)
    assert sampled.key != every.key


def test_pair_distances_in_chunks_equal_all_at_once():
    vectors, _, _ = clustered()
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = np.random.default_rng(0).integers(0, len(unit), (50, 2))
    pairs[0] = [4, 4]  # a vector with itself: distance 0, not a rounding error below it
    whole = near_duplicates._cosine_distances(unit, pairs, chunk=len(pairs))
    np.testing.assert_array_equal(near_duplicates._cosine_distances(unit, pairs, chunk=3), whole)
    expected = 1 - np.sum(unit[pairs[:, 0]] * unit[pairs[:, 1]], axis=1)
    np.testing.assert_allclose(whole, np.maximum(expected, 0), atol=1e-6)
    assert whole[0] == 0 and whole.min() >= 0
