"""The embedded default dataset: deterministic synthetic RGB images with real structure.

Each image is a smooth two-colour gradient with one to three filled shapes on top (plain
ellipses, "faces" with two eyes and a mouth, rotated rectangles, triangles). The structure
matters: a reconstruction, a random sample and pure noise must look visibly different, which
a dataset of flat colours or noise would not show.

Shapes are drawn at 4x the target size and downsampled with Lanczos, which antialiases the
edges so the images are not full of single-pixel staircases a VAE would waste capacity on.

All randomness of image ``i`` comes from ``numpy.random.default_rng([seed, i])``, so image
``i`` is the same whichever order, process or shard renders it.

Command line (idempotent; rerunning with the same arguments returns at once)::

    python -m introvae_dist.data.synthetic --out shards/synthetic --num-images 2048 \\
        --size-px 64 --images-per-shard 256 --seed 0
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from introvae_dist.data.shard_writer import MANIFEST_FORMAT, MANIFEST_NAME, read_manifest, write_shards

SHARD_NAME = "synthetic"
# Bump when render_image changes its output, so the CLI rewrites shards made by the old code
# instead of declaring them up to date.
GENERATOR_VERSION = 1
MIN_SIZE_PX = 8
_SUPERSAMPLE = 4
# Shapes whose colour is this close (Euclidean, 0-255 RGB) to the background are redrawn in
# another colour, so no shape vanishes into the gradient.
_MIN_CONTRAST = 110.0
_SHAPE_KINDS = ("ellipse", "face", "rectangle", "triangle")


def render_image(index: int, size_px: int, seed: int = 0) -> Image.Image:
    """Render synthetic image ``index`` as a ``size_px`` x ``size_px`` RGB image.

    Deterministic in ``(index, size_px, seed)``; different indices give different images.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    if size_px < MIN_SIZE_PX:
        raise ValueError(f"size_px must be at least {MIN_SIZE_PX}, got {size_px}")
    rng = np.random.default_rng([seed, index])
    canvas_px = size_px * _SUPERSAMPLE

    colour_a, colour_b = _random_colour(rng), _random_colour(rng)
    canvas = Image.fromarray(_gradient(canvas_px, colour_a, colour_b, rng))
    draw = ImageDraw.Draw(canvas)
    background = (colour_a, colour_b)
    for _ in range(int(rng.integers(1, 4))):
        kind = _SHAPE_KINDS[int(rng.integers(len(_SHAPE_KINDS)))]
        colour = _contrasting_colour(rng, background)
        centre = rng.uniform(0.2, 0.8, size=2) * canvas_px  # (x, y)
        radius = rng.uniform(0.12, 0.32, size=2) * canvas_px  # (rx, ry)
        if kind == "ellipse":
            _draw_ellipse(draw, centre, radius, colour)
        elif kind == "face":
            _draw_face(draw, rng, centre, radius, colour)
        elif kind == "rectangle":
            _draw_rectangle(draw, rng, centre, radius, colour)
        else:
            _draw_triangle(draw, rng, centre, float(radius.max()), colour)
    return canvas.resize((size_px, size_px), Image.LANCZOS)


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` (lossless, so the shards hold exactly what was rendered)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_params(num_images: int, size_px: int, images_per_shard: int, seed: int) -> dict[str, Any]:
    """The manifest ``params`` that identify one synthetic dataset."""
    return {
        "generator": "introvae_dist.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "num_images": num_images,
        "size_px": size_px,
        "images_per_shard": images_per_shard,
        "seed": seed,
    }


def write_synthetic_shards(
    out_dir: Path, num_images: int, size_px: int, images_per_shard: int, seed: int = 0
) -> list[Path]:
    """Render ``num_images`` images into PNG tar shards ``synthetic-%06d.tar`` in ``out_dir``.

    Sample keys are ``f"{index:08d}"``. Returns the shard paths; ``manifest.json`` beside them
    records :func:`synthetic_params`, ``source`` ``{"kind": "synthetic", "path": None}``
    (rendered, not read from anywhere) and ``resolution_px`` = ``size_px``.
    """
    _validate_arguments(num_images=num_images, size_px=size_px, images_per_shard=images_per_shard,
                        seed=seed)

    def samples() -> Iterator[tuple[str, bytes, str]]:
        for index in range(num_images):
            yield f"{index:08d}", encode_png(render_image(index, size_px, seed)), "png"

    return write_shards(
        samples(),
        Path(out_dir),
        SHARD_NAME,
        images_per_shard,
        params=synthetic_params(num_images, size_px, images_per_shard, seed),
        source={"kind": "synthetic", "path": None},
        resolution_px=size_px,
    )


def shards_are_current(out_dir: Path, params: dict[str, Any]) -> bool:
    """True when ``out_dir`` holds a current-format manifest with ``params`` and all its shards."""
    manifest_path = Path(out_dir) / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    try:
        manifest = read_manifest(manifest_path)
    except ValueError:
        return False
    # A manifest of an older format is rewritten rather than trusted: readers expect its fields.
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("params") != params:
        return False
    if not manifest["shards"]:  # an empty dataset is never current
        return False
    return all(
        (shard := Path(out_dir) / entry["file"]).is_file() and shard.stat().st_size > 0
        for entry in manifest["shards"]
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m introvae_dist.data.synthetic",
        description="Render the synthetic shapes dataset into WebDataset tar shards "
        "(idempotent: does nothing if OUT already holds the same dataset).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--num-images", type=int, default=2048, help="images to render (default 2048)")
    parser.add_argument("--size-px", type=int, default=64,
                        help=f"image side in pixels, >= {MIN_SIZE_PX} (default 64)")
    parser.add_argument("--images-per-shard", type=int, default=256,
                        help="images per tar shard (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed, >= 0 (default 0)")
    args = parser.parse_args(argv)
    try:
        _validate_arguments(num_images=args.num_images, size_px=args.size_px,
                            images_per_shard=args.images_per_shard, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2 and the usage line

    params = synthetic_params(args.num_images, args.size_px, args.images_per_shard, args.seed)
    if shards_are_current(args.out, params):
        print(f"{args.out}: already holds {args.num_images} synthetic {args.size_px}px images "
              f"with these parameters; nothing to do")
        return 0
    start_s = time.perf_counter()
    shards = write_synthetic_shards(args.out, args.num_images, args.size_px, args.images_per_shard, args.seed)
    elapsed_s = time.perf_counter() - start_s
    print(f"{args.out}: wrote {args.num_images} images in {len(shards)} shards "
          f"and {MANIFEST_NAME} in {elapsed_s:.1f} s")
    return 0


def _validate_arguments(*, num_images: int, size_px: int, images_per_shard: int, seed: int) -> None:
    # Messages use the CLI spelling of each argument, the name a user will look for.
    if num_images <= 0:
        raise ValueError(f"--num-images must be a positive integer, got {num_images}")
    if size_px < MIN_SIZE_PX:
        raise ValueError(f"--size-px must be an integer >= {MIN_SIZE_PX}, got {size_px}")
    if images_per_shard <= 0:
        raise ValueError(f"--images-per-shard must be a positive integer, got {images_per_shard}")
    if seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed}")


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = rng.integers(0, 256, size=3)
    return int(r), int(g), int(b)


def _contrasting_colour(
    rng: np.random.Generator, background: tuple[tuple[int, int, int], ...]
) -> tuple[int, int, int]:
    """A random colour far from every background colour (best of a few tries)."""
    best, best_distance = _random_colour(rng), -1.0
    for _ in range(16):
        candidate = _random_colour(rng)
        distance = min(math.dist(candidate, other) for other in background)
        if distance > best_distance:
            best, best_distance = candidate, distance
        if distance >= _MIN_CONTRAST:
            break
    return best


def _gradient(
    canvas_px: int, colour_a: tuple[int, int, int], colour_b: tuple[int, int, int], rng: np.random.Generator
) -> np.ndarray:
    """(H, W, 3) uint8 linear gradient from ``colour_a`` to ``colour_b`` in a random direction."""
    angle_rad = rng.uniform(0.0, 2.0 * math.pi)
    coords = (np.arange(canvas_px, dtype=np.float32) + 0.5) / canvas_px - 0.5  # (N,)
    # Broadcast a row against a column instead of building a meshgrid: this is most of the
    # rendering time, and it halves it.
    t = coords[None, :] * np.float32(math.cos(angle_rad)) + coords[:, None] * np.float32(math.sin(angle_rad))
    t -= t.min()
    t /= max(float(t.max()), 1e-6)  # (H, W) in [0, 1]
    a = np.asarray(colour_a, dtype=np.float32)
    b = np.asarray(colour_b, dtype=np.float32)
    pixels = t[..., None] * (b - a)  # (H, W, 3)
    pixels += a + 0.5  # + 0.5 so the truncating cast rounds to nearest
    return pixels.astype(np.uint8)


def _ellipse_box(centre: np.ndarray, radius: np.ndarray) -> list[float]:
    return [float(centre[0] - radius[0]), float(centre[1] - radius[1]),
            float(centre[0] + radius[0]), float(centre[1] + radius[1])]


def _draw_ellipse(
    draw: ImageDraw.ImageDraw, centre: np.ndarray, radius: np.ndarray, colour: tuple[int, int, int]
) -> None:
    draw.ellipse(_ellipse_box(centre, radius), fill=colour)


def _draw_face(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    centre: np.ndarray,
    radius: np.ndarray,
    colour: tuple[int, int, int],
) -> None:
    """An ellipse with two eye dots and a smile: a crude stand-in for the face datasets."""
    # Faces are taller than wide, as in CelebA-style crops.
    radius = np.array([min(radius), max(radius)])
    draw.ellipse(_ellipse_box(centre, radius), fill=colour)
    feature = _contrasting_colour(rng, (colour,))
    eye_radius = np.full(2, 0.14 * radius[0])
    for side in (-1.0, 1.0):
        eye_centre = centre + np.array([side * 0.4 * radius[0], -0.25 * radius[1]])
        draw.ellipse(_ellipse_box(eye_centre, eye_radius), fill=feature)
    mouth_radius = np.array([0.45 * radius[0], 0.3 * radius[1]])
    mouth_centre = centre + np.array([0.0, 0.15 * radius[1]])
    draw.arc(_ellipse_box(mouth_centre, mouth_radius), start=20, end=160, fill=feature,
             width=max(1, int(0.08 * radius[0])))


def _draw_rectangle(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    centre: np.ndarray,
    radius: np.ndarray,
    colour: tuple[int, int, int],
) -> None:
    angle_rad = rng.uniform(0.0, math.pi)
    rotation = np.array([[math.cos(angle_rad), -math.sin(angle_rad)],
                         [math.sin(angle_rad), math.cos(angle_rad)]])
    corners = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]) * radius  # (4, 2)
    points = corners @ rotation.T + centre  # (4, 2)
    draw.polygon([tuple(map(float, p)) for p in points], fill=colour)


def _draw_triangle(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    centre: np.ndarray,
    radius: float,
    colour: tuple[int, int, int],
) -> None:
    # Vertices spread around the circle with jitter, so triangles are not all equilateral
    # but never degenerate into slivers.
    start_rad = rng.uniform(0.0, 2.0 * math.pi)
    angles_rad = start_rad + np.arange(3) * (2.0 * math.pi / 3.0) + rng.uniform(-0.4, 0.4, size=3)
    points = centre + radius * np.stack([np.cos(angles_rad), np.sin(angles_rad)], axis=1)  # (3, 2)
    draw.polygon([tuple(map(float, p)) for p in points], fill=colour)


if __name__ == "__main__":
    sys.exit(main())
