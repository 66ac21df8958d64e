"""The digits demo, from an installed retrain alone: `retrain-demo` or `python -m retrain.demo`.

    retrain-demo [--output_dir DIR] [--per_class N]

Writes scikit-learn's 1,797 handwritten digits (bundled with scikit-learn, so
no download) as 8x8 PNGs, dark ink on white paper, one folder per class
(DIR/digits/0 ... 9); trains with the settings of examples/digits.yaml
(DEMO_SETTINGS: EfficientNet-Lite0, 10% test, 10% validation, seed 0), its
bottleneck cache in DIR/cache and its output folder DIR/output; then labels
DIR/digits/3/digit_0003.png with the exported model. A second run rewrites
the same images and reuses every cached vector. The backbone resizes the digits
smoothly (antialiased bilinear) to its input size.

Exit status: 0 when the run and the labelling succeeded, else theirs (2 for
bad input, one stderr line).
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from retrain.arguments import OneLineErrorParser, add_version, at_least, exit_without_teardown

logger = logging.getLogger(__name__)

# The settings of examples/digits.yaml other than its folders (tests/test_packaging.py
# keeps the two alike).
DEMO_SETTINGS = {
    "architecture": "efficientnet_lite0",
    "testing_percentage": 10,
    "validation_percentage": 10,
    "seed": 0,
}
# The picture the demo labels after training (digit 3's first image).
DEMO_IMAGE = Path("3", "digit_0003.png")


def write_digits(out_dir: str | Path, classes=range(10), per_class: int | None = None) -> int:
    """Write the digits of `classes` (at most `per_class` each) as PNGs; return how many.

    Each is an 8x8 grey image (values 0..16 in scikit-learn) written as uint8
    [8, 8] with 255 for paper and 0 for full ink, to OUT_DIR/<digit>/digit_<index>.png
    (index: its row in scikit-learn's set, so the names are the same on every run).
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (255 - digits.images * (255 / 16)).round().astype(np.uint8)  # uint8 [n, 8, 8]
    out_dir = Path(out_dir)
    written = 0
    for digit in classes:
        folder = out_dir / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        indices = np.flatnonzero(digits.target == digit)[:per_class]
        for index in indices:
            Image.fromarray(pixels[index]).save(folder / f"digit_{index:04d}.png")
        written += len(indices)
    return written


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        prog="retrain-demo",
        description="Train on scikit-learn's handwritten digits and label one of them: "
        "retrain's demo, with nothing but the installed package.",
    )
    add_version(parser)
    parser.add_argument(
        "--output_dir",
        default="retrain-demo",
        metavar="DIR",
        help="folder for everything the demo writes: DIR/digits (the images), DIR/cache "
        "(the bottleneck cache) and DIR/output (the model, labels and report) "
        "(default: retrain-demo)",
    )
    parser.add_argument(
        "--per_class",
        # Fewer than ten a class leaves the 10% test and validation buckets empty.
        type=at_least(10, "an integer of at least 10"),
        default=None,
        metavar="N",
        help="at most N images per digit, for a quicker look (default: all 1,797 images)",
    )
    return parser.parse_args(argv)


def demo_argv(output_dir: str | Path) -> list[str]:
    """The `retrain` command line of the demo's run, its folders under `output_dir`."""
    base = Path(output_dir)
    argv = [
        f"--image_dir={base / 'digits'}",
        f"--bottleneck_dir={base / 'cache'}",
        f"--output_dir={base / 'output'}",
    ]
    return argv + [f"--{name}={value}" for name, value in DEMO_SETTINGS.items()]


def main(argv=None) -> int:
    """Write the digits, train on them, label one; returns the exit status."""
    args = parse_args(argv)
    base = Path(args.output_dir)
    images = base / "digits"
    # Written every time (about a second): the same bytes, so the cache reuses every vector.
    count = write_digits(images, per_class=args.per_class)
    print(f"Wrote {count} digit images to {images}")
    found = sum(1 for _ in images.glob("[0-9]/digit_*.png"))
    if found > count:
        logger.warning(
            "%s holds %d digit images from an earlier demo, not only the %d just written: "
            "the run trains on all of them (a new --output_dir starts afresh).",
            images,
            found,
            count,
        )
    from retrain import cli, label_image  # deferred: `--version` and `--help` stay fast

    status = cli.main(demo_argv(base))
    if status != 0:
        return status
    output = base / "output"
    model = ["--graph", str(output / "model.keras"), "--labels", str(output / "labels.txt")]
    status = label_image.main([*model, "--image", str(images / DEMO_IMAGE)])
    if status == 0:
        print(f"Label your own pictures: retrain-label-image {shlex.join(model)} --image PICTURE")
    return status


def entry_point() -> None:
    """The `retrain-demo` command: main(), then a fast exit (see exit_without_teardown)."""
    exit_without_teardown(main())


if __name__ == "__main__":
    entry_point()
