"""A stand-in for full-resolution photos, for benchmarks: a folder's images enlarged.

    python benchmarks/make_full_resolution.py SOURCE TARGET [--size 500x375] [--quality 88]

Issue #10's floors are set on 3,000 full-resolution flower photos (TF's
flower_photos: mostly 320-500 px wide JPEGs of 30-100 KB), which cost more to
decode and resize than the small photos in ../shared/data. This writes every
image of SOURCE (one sub-folder per class, e.g. ../shared/data/flowers128)
into TARGET at --size with a little grain (Gaussian, sigma 4 of 255, seeded),
re-encoded as JPEG, so decoding and resizing cost what such photos cost. The
pictures hold no more detail than the originals: accuracies on TARGET say
nothing about real full-resolution photos.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from retrain.data import decode, images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the written images")
    parser.add_argument("--quality", type=int, default=88)
    args = parser.parse_args(argv)
    try:
        width, height = (int(side) for side in args.size.split("x"))
    except ValueError:
        parser.error(f"--size must be WIDTHxHEIGHT, e.g. 500x375. Received: {args.size!r}")
    if not args.source.is_dir():
        parser.error(f"no folder at {args.source}")
    found = images.discover(args.source)  # the tool's own walk: class, then path order
    rng = np.random.default_rng(0)
    written = 0
    for entry in tqdm(found.entries, desc="writing", unit="img"):
        path = found.image_dir / entry.relative_path
        try:
            pixels = decode.decode_rgb(path)
        except decode.ImageDecodeError as error:
            print(f"skipped {path}: {error.reason}", file=sys.stderr)
            continue
        resized = np.asarray(
            Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS), np.float32
        )
        pixels = np.clip(resized + rng.normal(0, 4, resized.shape), 0, 255).astype(np.uint8)
        target = args.target / path.parent.name / (path.stem + ".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target, quality=args.quality)
        written += 1
    print(f"{written} images written to {args.target} at {width}x{height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
