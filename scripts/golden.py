"""Regenerate the built-in model's golden images for this platform.

    python scripts/golden.py --update        new reference PNGs + this platform's pixel hash (others dropped)
    python scripts/golden.py --add-platform  keep the references, add this platform's hash (checked against them)
    python scripts/golden.py                 say how this platform compares, change nothing

Run it when a change alters the built-in model's output on purpose, and say so in the commit.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's tests.golden

from tests import golden  # noqa: E402


def main() -> int:
    """Check, update or extend the golden images."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--update", action="store_true", help="replace the reference PNGs and the hashes")
    mode.add_argument("--add-platform", action="store_true", help="add this platform's hash to the manifest")
    args = p.parse_args()
    if args.update or args.add_platform:
        data = golden.update(add_platform_only=args.add_platform)
        print(f"{golden.MANIFEST}: {len(data['platforms'])} platform(s); this one: {golden.platform_key()}")
        return 0
    images, key = golden.render(), golden.platform_key()
    known = golden.manifest()["platforms"].get(key)
    diff = golden.difference(images, golden.reference_images())
    print(f"platform: {key}\nrecorded hash: {known or 'none'}\nthis run:      {golden.pixel_hash(images)}\n"
          f"difference from the reference PNGs: {diff} (tolerance {golden.TOLERANCE})")
    return 0 if (golden.pixel_hash(images) == known if known else golden.within_tolerance(diff)) else 1


if __name__ == "__main__":
    sys.exit(main())
