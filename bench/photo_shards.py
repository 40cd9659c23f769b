"""Real photographs as training shards, from files that ship inside a pip package: the sample
images of scikit-image (`pip install scikit-image`; nothing is fetched at run time).

    python bench/photo_shards.py --out shards/photos
    # -> shards/photos/train (8,192 crops) and shards/photos/heldout (512 crops of unseen photos)

scikit-image ships 15 photographs (a portrait, a cat, a rocket, a coffee cup, motorcycles, a
retina, a Hubble field, microscopy, the moon, coins, textures of grass, gravel and brick, the
cameraman). Too few to train on whole, so each sample is a square crop of a random side
(between --min-crop-px and the photo's short side) at a random place, resized to --size-px
with Lanczos: thousands of distinct natural-image patches at every scale. Grey photos become
RGB. The held-out set is cut from photos the training set never sees (--heldout-photos), so
reconstruction figures on it measure generalisation, not memory.

The shards are written with introvae_dist's own writer (data.shard_writer.write_shards), with
a manifest, like any user's shards. Seeded: the same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from introvae_dist.data.shard_writer import write_shards

#: scikit-image's photographs (skimage/data); its synthetic images (logo, chessboard,
#: phantom, colour wheel, text) are left out.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
          "motorcycle_right.png", "retina.jpg", "rocket.jpg", "camera.png", "grass.png", "gravel.png", "brick.png",
          "moon.png", "coins.png")
HELDOUT = ("rocket.jpg", "coffee.png")


def photo(name: str) -> Image.Image:
    path = importlib.resources.files("skimage") / "data" / name
    with path.open("rb") as f:  # type: ignore[union-attr]
        return Image.open(io.BytesIO(f.read())).convert("RGB")


def crops(names: tuple[str, ...], count: int, size_px: int, min_crop_px: int, seed: int) -> Iterator[tuple[str, bytes, str]]:
    """``count`` samples (key, PNG bytes, "png"): random square crops, photos drawn by area."""
    images = [photo(n) for n in names]
    areas = [im.width * im.height for im in images]
    rng = random.Random(seed)
    for i in range(count):
        im = rng.choices(images, weights=areas)[0]
        short = min(im.size)
        side = rng.randint(min(min_crop_px, short), short)
        left, top = rng.randint(0, im.width - side), rng.randint(0, im.height - side)
        patch = im.crop((left, top, left + side, top + side)).resize((size_px, size_px), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        patch.save(buffer, format="PNG")
        yield f"{i:08d}", buffer.getvalue(), "png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("shards/photos"))
    parser.add_argument("--size-px", type=int, default=32)
    parser.add_argument("--train", type=int, default=8192, help="training crops (default: %(default)s)")
    parser.add_argument("--heldout", type=int, default=512, help="held-out crops (default: %(default)s)")
    parser.add_argument("--min-crop-px", type=int, default=48)
    parser.add_argument("--heldout-photos", nargs="+", default=list(HELDOUT))
    parser.add_argument("--samples-per-shard", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    unknown = sorted(set(args.heldout_photos) - set(PHOTOS))
    if unknown:
        parser.error(f"--heldout-photos: {unknown} are not among {PHOTOS}")
    train_names = tuple(n for n in PHOTOS if n not in args.heldout_photos)
    for split, names, count, seed in (("train", train_names, args.train, args.seed),
                                      ("heldout", tuple(args.heldout_photos), args.heldout, args.seed + 1)):
        write_shards(crops(names, count, args.size_px, args.min_crop_px, seed), args.out / split, f"photos-{split}",
                     samples_per_shard=args.samples_per_shard, resolution_px=args.size_px)
        print(f"{args.out / split}: {count} crops of {len(names)} photographs at {args.size_px} px")


if __name__ == "__main__":
    main()
