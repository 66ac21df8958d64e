"""Write scikit-learn's bundled handwritten digits as a folder-per-class image set.

    python examples/make_digits.py examples/digits

The writer is the installed demo's, `retrain.demo.write_digits` (`retrain-demo`
writes, trains and labels in one command): the 1,797 digits are 8x8 grey
images; each becomes an 8x8 PNG, dark ink on white paper, in
`OUT_DIR/<digit>/digit_<index>.png`.
"""

from __future__ import annotations

import argparse
import sys

from retrain.demo import write_digits

__all__ = ["write_digits"]


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
