"""Small real image data sets written to disk offline, for tests, the demo and the benchmarks.

Nothing here downloads anything: the pixels come from packages that ship them.

* :func:`write_digits` writes scikit-learn's 1,797 labelled 8x8 handwritten digits, upscaled,
  as a local Hugging Face data set (parquet shards or an image folder) with ``train`` and
  ``test`` splits that ``datasets.load_dataset(folder)`` recognises.
* :func:`write_digit_pairs` writes pairs of those digits side by side, each labelled with the
  digits it shows: a small multi-label data set (a list of classes, or a multi-hot vector, per
  image), like VOC07's images listing their objects.
* :func:`write_sample_images` writes scikit-image's sample photographs (various sizes and
  colour modes) as an image folder, optionally with images in unusual modes and with broken
  files, to exercise the decoding in :mod:`mvmr_hf.data.decode`.

Example::

    from mvmr_hf.data.sample_data import write_digits
    from mvmr_hf.data.loading import load_image_dataset

    folder = write_digits("digits")            # digits/data/train-00000-of-00004.parquet, ...
    stream = load_image_dataset(str(folder))   # streaming, split "train"
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
from PIL import Image

from mvmr_hf.errors import ConfigError

DIGIT_CLASSES = [str(digit) for digit in range(10)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _digit_images(image_size: int) -> tuple[list[bytes], np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # scikit-learn's digits hold 17 grey levels (0..16) on an 8x8 grid.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    encoded = [
        _png(Image.fromarray(p, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR))
        for p in pixels
    ]
    return encoded, digits.target.astype(np.int64)


def _split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return {"train": np.asarray(train), "test": np.asarray(test)}


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence the progress bar ``Dataset.to_parquet`` draws for every shard."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def write_digits(
    folder: str | Path,
    *,
    image_size: int = 32,
    fmt: Literal["parquet", "imagefolder"] = "parquet",
    test_fraction: float = 0.2,
    num_shards: int = 4,
    seed: int = 0,
) -> Path:
    """Write scikit-learn's labelled digits as a local image data set and return ``folder``.

    Each 8x8 digit becomes a grayscale PNG of ``image_size`` pixels (bilinear upscaling) with
    an integer ``label`` (a ``ClassLabel`` named "0".."9"). The split into ``train`` and
    ``test`` is stratified by label and fixed by ``seed``.

    Args:
        folder: where to write; created if missing.
        image_size: side of the written square images, at least 8.
        fmt: ``"parquet"`` writes ``folder/data/{split}-0000k-of-0000n.parquet`` (``num_shards``
            shards per split, so that splitting across processes and workers is exercised);
            ``"imagefolder"`` writes ``folder/{split}/{label}/{index}.png``.
        test_fraction: share of the 1,797 digits in the ``test`` split, in (0, 1).
        num_shards: parquet files per split (ignored for ``"imagefolder"``).
        seed: seed of the train/test split.

    Needs scikit-learn (in the ``dev`` extra) for the digits and the stratified split.
    """
    if fmt not in ("parquet", "imagefolder"):
        raise ConfigError(f"Unknown digits format {fmt!r}: use fmt='parquet' or fmt='imagefolder'.")
    if image_size < 8:
        raise ConfigError(f"image_size={image_size} is smaller than the 8x8 digits: use at least 8.")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction={test_fraction} must lie strictly between 0 and 1, e.g. 0.2.")
    if num_shards < 1:
        raise ConfigError(f"num_shards={num_shards} must be at least 1.")

    folder = Path(folder)
    encoded, labels = _digit_images(image_size)
    for split, indices in _split_indices(labels, test_fraction, seed).items():
        if fmt == "imagefolder":
            for index in indices:
                path = folder / split / str(labels[index]) / f"{index}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(encoded[index])
            continue
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_CLASSES)}
        )
        table = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": encoded[i], "path": None} for i in indices],
                "label": [int(labels[i]) for i in indices],
            },
            features=features,
        )
        (folder / "data").mkdir(parents=True, exist_ok=True)
        for shard in range(num_shards):
            name = f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"
            with _no_progress_bars():
                table.shard(num_shards, shard, contiguous=True).to_parquet(str(folder / "data" / name))
    return folder


def digit_pairs(
    train_pairs: int = 1000, test_pairs: int = 300, *, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pairs of scikit-learn's digits per split: ``(N, 2)`` digit indices, ``(N, 10)`` multi-hot targets.

    Train pairs are drawn from a fixed 1,400 of the 1,797 digits, test pairs from the other 397,
    so no digit image is in both splits; the two digits of a pair are distinct images (they may
    show the same class, which then counts once).
    """
    from sklearn.datasets import load_digits

    labels = load_digits().target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    pairs = {}
    for split, pool, count in (("train", order[:1400], train_pairs), ("test", order[1400:], test_pairs)):
        indices = np.stack([rng.choice(pool, 2, replace=False) for _ in range(count)])
        targets = np.zeros((count, 10), dtype=np.int64)
        np.put_along_axis(targets, labels[indices], 1, axis=1)
        pairs[split] = indices, targets
    return pairs


def write_digit_pairs(
    folder: str | Path,
    *,
    labels: Literal["classes", "multi-hot"] = "classes",
    image_size: int = 32,
    train_pairs: int = 1000,
    test_pairs: int = 300,
    seed: int = 0,
) -> Path:
    """Write :func:`digit_pairs` as a local multi-label image data set and return ``folder``.

    Each image is two 8x8 digits side by side on a 16x16 canvas, upscaled (bilinear) to
    ``image_size``; its ``labels`` column lists the digits shown (``List(ClassLabel)``, names
    "0".."9") or, with ``labels="multi-hot"``, is a vector of ten 0/1 (``List(Value("int8"),
    length=10)``). Splits ``train`` and ``test`` as ``folder/data/{split}-00000-of-00001.parquet``.

    Args:
        folder: where to write; created if missing.
        labels: ``"classes"`` (a list of the digits shown) or ``"multi-hot"`` (ten 0/1 per image).
        image_size: side of the written square images, at least 16.
        train_pairs: images in the ``train`` split.
        test_pairs: images in the ``test`` split.
        seed: seed of the digits' split into the two pools and of the pairs drawn.

    Needs scikit-learn (in the ``dev`` extra) for the digits.
    """
    if labels not in ("classes", "multi-hot"):
        raise ConfigError(f"Unknown labels {labels!r}: use labels='classes' or labels='multi-hot'.")
    if image_size < 16:
        raise ConfigError(f"image_size={image_size} is smaller than a pair's 16x16 canvas: use at least 16.")
    from sklearn.datasets import load_digits

    grey = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    classes = labels == "classes"
    if classes:
        feature = datasets.List(datasets.ClassLabel(names=DIGIT_CLASSES))
    else:
        feature = datasets.List(datasets.Value("int8"), length=10)
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, (indices, targets) in digit_pairs(train_pairs, test_pairs, seed=seed).items():
        canvases = np.zeros((len(indices), 16, 16), dtype=np.uint8)
        canvases[:, 4:12, :8], canvases[:, 4:12, 8:] = grey[indices[:, 0]], grey[indices[:, 1]]
        images = [
            _png(Image.fromarray(c, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR))
            for c in canvases
        ]
        table = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": image, "path": None} for image in images],
                "labels": [np.flatnonzero(t).tolist() if classes else t.tolist() for t in targets],
            },
            features=datasets.Features({"image": datasets.Image(), "labels": feature}),
        )
        with _no_progress_bars():
            table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def _sample_photographs() -> dict[str, Image.Image]:
    from skimage import data

    return {
        "astronaut.jpg": Image.fromarray(data.astronaut()),
        "coffee.jpg": Image.fromarray(data.coffee()),
        "chelsea.png": Image.fromarray(data.chelsea()),
        "camera.png": Image.fromarray(data.camera()),  # grayscale (L)
        "page.png": Image.fromarray(data.page()),  # grayscale (L)
        "horse.png": Image.fromarray(data.horse()),  # bilevel (1)
        "logo.png": Image.fromarray(data.logo()),  # RGBA with a transparent background
        "colorwheel.png": Image.fromarray(data.colorwheel()),
        "microaneurysms.png": Image.fromarray(data.microaneurysms()),  # 102x102 grayscale
    }


def _unusual_images() -> dict[str, tuple[Image.Image, dict]]:
    """Valid images in the modes that need care when converted to 8-bit RGB."""
    from skimage import data

    gradient16 = np.linspace(0, 65535, 64 * 256).reshape(64, 256).astype(np.uint16)
    chelsea = Image.fromarray(data.chelsea())
    astronaut = data.astronaut()
    alpha = np.linspace(0, 255, astronaut.shape[1]).astype(np.uint8)[None, :].repeat(astronaut.shape[0], 0)
    palette = chelsea.quantize(colors=32)
    camera = data.camera()
    rocket = Image.fromarray(data.rocket())
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels must be rotated 90 degrees clockwise to display
    return {
        "gradient16.png": (Image.fromarray(gradient16), {}),  # I;16
        "gradient_float.tiff": (Image.fromarray((gradient16 / 65535.0).astype(np.float32)), {}),  # F
        "palette.png": (palette, {}),  # P
        "palette_transparent.png": (palette, {"transparency": 0}),  # P with a transparent colour
        "astronaut_rgba.png": (Image.fromarray(np.dstack([astronaut, alpha])), {}),  # RGBA
        "camera_la.png": (Image.fromarray(np.dstack([camera, camera[::-1]]), mode="LA"), {}),
        "coffee_cmyk.jpg": (Image.fromarray(data.coffee()).convert("CMYK"), {"quality": 95}),
        "rocket_exif_rotated.jpg": (rocket.transpose(Image.Transpose.ROTATE_90), {"exif": exif}),
    }


def _broken_files(valid_jpeg: bytes) -> dict[str, bytes]:
    """Files a crawled data set contains: none of them should reach training."""
    return {
        "bad_truncated.jpg": valid_jpeg[: len(valid_jpeg) // 2],
        "bad_empty.png": b"",
        "bad_not_an_image.jpg": b"<html><body>404 Not Found</body></html>",
        "bad_1x1.png": _png(Image.new("RGB", (1, 1), (255, 0, 0))),
        "bad_strip.png": _png(Image.new("L", (300, 4), 128)),
    }


def write_sample_images(folder: str | Path, *, unusual: bool = False, broken: bool = False) -> Path:
    """Write scikit-image's sample photographs as an image folder ``folder/train/`` and return ``folder``.

    Nine real images (JPEG and PNG; RGB, grayscale, bilevel and RGBA; 102 to 600 pixels wide)
    that ``datasets.load_dataset(folder)`` reads as one ``train`` split with an ``image`` column.

    Args:
        folder: where to write; created if missing.
        unusual: also write valid images that need care to become 8-bit RGB: a 16-bit grayscale
            gradient PNG (``I;16``), a float TIFF (``F``), palette PNGs with and without a
            transparent colour, an RGBA PNG with an alpha gradient, a grayscale+alpha PNG, a CMYK
            JPEG and a JPEG whose EXIF orientation says "rotate 90 degrees".
        broken: also write files that must be skipped, all named ``bad_*``: a truncated JPEG, a
            zero-byte file, HTML saved as ``.jpg``, a 1x1 image and a 300x4 strip.
    """
    split = Path(folder) / "train"
    split.mkdir(parents=True, exist_ok=True)
    for name, image in _sample_photographs().items():
        image.save(split / name)
    if unusual:
        for name, (image, options) in _unusual_images().items():
            image.save(split / name, **options)
    if broken:
        for name, content in _broken_files((split / "astronaut.jpg").read_bytes()).items():
            (split / name).write_bytes(content)
    return Path(folder)
