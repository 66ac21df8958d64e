"""Write scikit-learn's bundled handwritten digits as a folder-per-class image set.

    python examples/make_digits.py examples/digits

The 1,797 digits are 8x8 grey images with values 0..16; each becomes an 8x8
PNG, dark ink on white paper, in `OUT_DIR/<digit>/digit_<index>.png`. The
backbone resizes them smoothly (antialiased bilinear) to its input size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(out_dir: str | Path, classes=range(10), per_class: int | None = None) -> int:
    """Write the digits of `classes` (at most `per_class` each) as PNGs; return how many."""
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write, e.g. examples/digits")
    parser.add_argument("--per_class", type=int, default=None, help="at most this many per digit")
    args = parser.parse_args(argv)
    count = write_digits(args.out_dir, per_class=args.per_class)
    print(f"Wrote {count} digit images to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
