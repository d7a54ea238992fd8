"""Local images through the real ``mvmr-distill`` with its default data flags (issue 20, item 1).

Folders of real files (scikit-image's photographs written as an RGB JPEG, an RGBA PNG, grayscale
PNG and JPEG, a CMYK JPEG, 16-bit PNGs, next to a truncated JPEG, text saved as ``.png`` and a
``notes.txt``), laid out flat, with class subfolders, with ``train/``, ``test/`` and ``validation/``
splits, or as parquet shards, are trained on with ``--epochs 1`` and no ``--max-steps``, streamed
and not: the length of the split must be known before the first row is read. Each decodable image
is trained on exactly once, each undecodable one is skipped and counted, and the views the student
sees are compared with the pixels the files were written from (an independent reference: numpy
and PIL's resizing, not the code under test). Folders without images, or with too few, are refused
in one line before the teacher loads. A streamed folder's length is the number of rows datasets
makes of it (metadata files, second extensions), or unknown (a .zip inside) rather than wrong.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import struct
import zipfile
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import read_metrics, snapshot, tiny_args
from PIL import Image
from skimage import data as skdata

from mvmr_hf.cli.train import distill_main
from mvmr_hf.data.decode import decode_image
from mvmr_hf.data.loader import build_dataloader
from mvmr_hf.data.loading import load_image_dataset
from mvmr_hf.data.views import ViewsDataset

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state", "one_torch_thread")

SIZE = 32  # tiny_args' --image-size
RESIZED = 36  # floor(SIZE / 0.875): x is the centre SIZE x SIZE of the image resized to this side
BATCH = 8  # tiny_args' --batch-size


# ----------------------------------------------------------------------------- the files


def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA) encoded by hand: PIL writes no 16-bit colour PNG."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _sixteen_bit(eight_bit: np.ndarray, seed: int) -> np.ndarray:
    """``eight_bit`` over 16 bits: x 257, plus noise that rounds away (v / 257 gives the photo back)."""
    noise = np.random.default_rng(seed).integers(-128, 129, eight_bit.shape)
    return np.clip(eight_bit.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    weight = alpha[..., None] / 255.0
    return np.round(rgb.astype(np.float64) * weight + 255.0 * (1.0 - weight)).astype(np.uint8)


@functools.cache
def _decodable() -> dict[str, tuple[bytes, np.ndarray]]:
    """16 valid files, ``name: (bytes, the RGB pixels they were written from)``; sides are multiples of 36."""
    astronaut, coffee, chelsea = skdata.astronaut(), skdata.coffee(), skdata.chelsea()
    rocket, camera, moon = skdata.rocket(), skdata.camera(), skdata.moon()
    photos = {
        "astronaut.jpg": astronaut[:288, :288],
        "coffee.jpg": coffee[:288, 100:388],
        "chelsea.jpg": chelsea[:288, 80:368],
        "rocket.jpg": rocket[:216, :216],
        "ihc.jpg": skdata.immunohistochemistry()[:180, :180],
        "colorwheel.jpg": skdata.colorwheel()[:360, :360],
    }
    files = {name: (_encoded(Image.fromarray(p), "JPEG", quality=90), p) for name, p in photos.items()}
    lossless = coffee[100:244, 300:444]
    files["coffee_lossless.png"] = (_encoded(Image.fromarray(lossless), "PNG"), lossless)
    # RGBA: an alpha ramp across the columns, black under the fully transparent ones (white once composited)
    rgba = {"astronaut_rgba.png": astronaut[200:416, 200:416], "chelsea_rgba.png": chelsea[:144, :144]}
    for name, rgb in rgba.items():
        alpha = np.linspace(0, 255, rgb.shape[1]).round().astype(np.uint8)[None, :].repeat(rgb.shape[0], 0)
        rgb = np.where(alpha[..., None] == 0, 0, rgb).astype(np.uint8)
        files[name] = (_encoded(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), _on_white(rgb, alpha))
    gray = {"camera_gray.png": ("PNG", camera[:288, :288]), "moon_gray.jpg": ("JPEG", moon[:216, :216])}
    for name, (fmt, pixels) in gray.items():
        files[name] = (_encoded(Image.fromarray(pixels), fmt), np.repeat(pixels[..., None], 3, axis=2))
    cmyk = {"coffee_cmyk.jpg": coffee[50:338, 200:488], "rocket_cmyk.jpg": rocket[100:280, 300:480]}
    for name, rgb in cmyk.items():
        files[name] = (_encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), rgb)
    # 16-bit gray as PIL writes it (mode I;16) and 16-bit RGB, which PIL reads but cannot write
    deep = {"camera16.png": camera[100:244, 100:244], "moon16.png": moon[:180, :180]}
    for seed, (name, pixels) in enumerate(deep.items()):
        files[name] = (
            _encoded(Image.fromarray(_sixteen_bit(pixels, seed)), "PNG"),
            np.repeat(pixels[..., None], 3, axis=2),
        )
    rgb16 = astronaut[100:244, 250:394]
    files["astronaut16_rgb.png"] = (_png16(_sixteen_bit(rgb16, 2)), rgb16)
    return files


def _undecodable(jpeg: bytes) -> dict[str, bytes]:
    """Files with an image extension that cannot be decoded: read, skipped and counted."""
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "readme.png": b"Not an image: the photos are next to me.\n",
    }


NOTES = b"notes.txt is no image: datasets never lists it, so it is no row either.\n"


def _check_the_modes(files: dict[str, tuple[bytes, np.ndarray]]) -> None:
    """The files are what their names say (PIL's own reading; the test relies on it)."""
    modes = {name: Image.open(io.BytesIO(encoded)).mode for name, (encoded, _) in files.items()}
    assert modes["coffee_cmyk.jpg"] == "CMYK"
    assert modes["camera_gray.png"] == modes["moon_gray.jpg"] == "L"
    assert modes["camera16.png"] == modes["moon16.png"] == "I;16"
    assert modes["astronaut_rgba.png"] == modes["chelsea_rgba.png"] == "RGBA"
    assert modes["astronaut.jpg"] == modes["astronaut16_rgb.png"] == "RGB"


def _key(encoded: bytes) -> str:
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


def _write(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)


LAYOUTS = ("flat", "classes", "splits", "parquet")


def _dataset(root: Path, layout: str) -> tuple[Path, dict[str, tuple[str, np.ndarray]], int]:
    """A data set of the 16 decodable files, 2 undecodable ones and notes.txt laid out as ``layout``.

    Returns its folder, the name and reference pixels of each decodable file by key and the number of rows
    the train split has (the files with an image extension).
    """
    good = _decodable()
    _check_the_modes(good)
    bad = _undecodable(good["astronaut.jpg"][0])
    everything = {**{name: encoded for name, (encoded, _) in good.items()}, **bad}
    folder = root / layout
    if layout == "flat":
        _write(folder, {**everything, "notes.txt": NOTES})
    elif layout in ("classes", "splits"):
        train = folder / "train" if layout == "splits" else folder
        names = sorted(everything)
        _write(train / "cat", {name: everything[name] for name in names[::2]})
        _write(train / "dog", {**{name: everything[name] for name in names[1::2]}, "notes.txt": NOTES})
        if layout == "splits":  # other images in the other splits: none of them may be trained on
            astronaut = skdata.astronaut()
            for split, offset in (("test", 300), ("validation", 400)):
                crops = {
                    f"{split}_{i}.jpg": astronaut[offset : offset + 108, i * 10 : i * 10 + 108]
                    for i in range(9)
                }
                _write(
                    folder / split / "cat",
                    {name: _encoded(Image.fromarray(c), "JPEG") for name, c in crops.items()},
                )
    else:  # parquet shards: the same bytes embedded in two shards of the train split
        (folder / "data").mkdir(parents=True)
        rows = [{"bytes": content, "path": name} for name, content in sorted(everything.items())]
        for index, part in enumerate((rows[:9], rows[9:])):
            table = datasets.Dataset.from_dict(
                {"image": part}, features=datasets.Features({"image": datasets.Image()})
            )
            table.to_parquet(str(folder / "data" / f"train-{index:05d}-of-00002.parquet"))
    references = {_key(encoded): (name, pixels) for name, (encoded, pixels) in good.items()}
    return folder, references, len(everything)


def test_each_mode_decodes_to_the_pixels_it_was_written_from():
    """Full resolution, before any resizing: the lossless files exactly (RGBA composited on white, gray
    repeated, 16-bit gray as round(v / 257)), the 16-bit RGB PNG within a level (PIL keeps its high
    bytes: v // 256), the JPEGs within their compression noise."""
    for name, (encoded, pixels) in _decodable().items():
        error = np.abs(decode_image(encoded).permute(1, 2, 0).numpy().astype(np.int64) - pixels)
        if name.endswith(".jpg"):
            assert error.mean() < 3.0, (name, error.mean())
        elif name == "astronaut16_rgb.png":
            assert error.max() <= 1, name
        else:
            assert error.max() == 0, name
    # PIL's own convert("RGB") clips 16-bit gray at 255: nearly white, which the decoder must not copy
    camera16 = Image.open(io.BytesIO(_decodable()["camera16.png"][0]))
    assert np.asarray(camera16.convert("RGB")).mean() > 250 > _decodable()["camera16.png"][1].mean() + 100


# ----------------------------------------------------------------------------- the runs


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """An empty datasets cache for this test alone (the user's is neither read nor written)."""
    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.fixture
def seen(monkeypatch) -> list[dict]:
    """Every batch the real run trains on: its keys and its non-augmented views x (uint8)."""
    batches: list[dict] = []
    views_on = ViewsDataset.views_on

    def recording(self, batch, device):
        batches.append(
            {"key": list(batch["key"]), "image": batch["image"].clone(), "skipped": batch["skipped"]}
        )
        return views_on(self, batch, device)

    monkeypatch.setattr(ViewsDataset, "views_on", recording)
    return batches


def _reference_view(pixels: np.ndarray) -> np.ndarray:
    """x of a square image by PIL: resized (anti-aliased) to 36 px, its centre 32 px (whole-pixel offsets)."""
    assert pixels.shape[0] == pixels.shape[1]
    assert pixels.shape[0] % RESIZED == 0
    resized = Image.fromarray(pixels).resize((RESIZED, RESIZED), Image.Resampling.BILINEAR)
    border = (RESIZED - SIZE) // 2
    return np.asarray(resized.crop((border, border, border + SIZE, border + SIZE))).astype(np.int64)


def _check_views(seen: list[dict], references: dict[str, tuple[str, np.ndarray]]) -> None:
    """Each image trained on, once, shown as the RGB its file was written from (up to JPEG and resampling)."""
    keys = [key for batch in seen for key in batch["key"]]
    assert sorted(keys) == sorted(references), "every decodable image, each once, and nothing else"
    views = {key: view for batch in seen for key, view in zip(batch["key"], batch["image"], strict=True)}
    for key, (name, pixels) in references.items():
        view = views[key].permute(1, 2, 0).numpy().astype(np.int64)
        error = np.abs(view - _reference_view(pixels))
        # PIL's and torchvision's anti-aliasing differ by a level, JPEG by up to 3 (measured); a wrong
        # mode conversion (inverted CMYK, alpha ignored, 16 bits clipped) is off by tens of levels.
        assert error.mean() < 1.0, (name, error.mean())
        assert error.max() <= 4, (name, error.max())
        if np.array_equal(pixels[..., 0], pixels[..., 2]) and np.array_equal(pixels[..., 0], pixels[..., 1]):
            assert np.array_equal(view[..., 0], view[..., 1]), name
            assert np.array_equal(view[..., 0], view[..., 2]), name


def _error_line(err: str) -> str:
    """A failed run's one error line: stderr's last (before it only progress bars: a conversion, steps)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    return lines[-1]


def _distill(data: Path, run: Path, teacher: Path, *extra: str) -> list[str]:
    return tiny_args(data, run, "--teacher", str(teacher), "--epochs", "1", "--log-every", "1", *extra)


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "not-streamed"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_decodable_image_is_trained_on_and_every_other_counted(
    layout, streaming, teacher, tmp_path, fresh_cache, seen, capsys
):
    """18 image files (16 decodable), batches of 8, --epochs 1: the 2 steps planned from the file count
    (or the parquet footers) train on the 16, the truncated JPEG and the text saved as .png are skipped
    and counted, notes.txt is not a row."""
    data, references, rows = _dataset(tmp_path, layout)
    run = tmp_path / "run"
    assert distill_main(_distill(data, run, teacher, *([] if streaming else ["--no-streaming"]))) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "skipped 2 images" in err.splitlines()
    assert [m["step"] for m in read_metrics(run)] == list(range(1, rows // BATCH + 1)) == [1, 2]
    assert read_metrics(run)[-1]["skipped"] == sum(batch["skipped"] for batch in seen) == 2
    _check_views(seen, references)
    if streaming:  # the length came from the files, not from a download or a converted copy
        assert [p.name for p in fresh_cache.rglob("*") if p.is_file() and p.suffix != ".lock"] == []


def test_the_label_subfolders_and_the_splits_are_read_as_such(tmp_path, fresh_cache):
    """What the runs above train on: train/, test/ and validation/ are the splits, the class subfolders
    the labels, and the train split has one row per file with an image extension, nothing else."""
    data, _, rows = _dataset(tmp_path, "splits")
    assert set(datasets.get_dataset_split_names(str(data))) == {"train", "test", "validation"}
    train = load_image_dataset(str(data))
    labels = train.features["label"].names
    assert labels == ["cat", "dog"]
    files = [
        (Path(row["image"]["path"]).parent.name, labels[row["label"]])
        for row in train.cast_column("image", datasets.Image(decode=False))
    ]
    assert all(folder == label for folder, label in files)
    assert (
        len(files)
        == rows
        == len([p for p in (data / "train").rglob("*") if p.suffix != ".txt" and p.is_file()])
    )


def test_another_split_of_the_folder_is_trained_on_its_own_images(
    teacher, tmp_path, fresh_cache, seen, capsys
):
    """--split validation with two workers: its 9 images, one batch; the train split's are never read."""
    data, _, _ = _dataset(tmp_path, "splits")
    expected = {_key(path.read_bytes()) for path in (data / "validation").rglob("*.jpg")}
    run = tmp_path / "run"
    assert distill_main(_distill(data, run, teacher, "--split", "validation", "--num-workers", "2")) == 0
    assert "skipped 0 images" in capsys.readouterr().err.splitlines()
    assert [m["step"] for m in read_metrics(run)] == [1]
    (batch,) = seen
    assert len(batch["key"]) == BATCH
    assert set(batch["key"]) < expected


# ----------------------------------------------------------------------------- refused before the teacher


def _empty(root: Path, kind: str) -> Path:
    folder = root / "data"
    folder.mkdir()
    if kind == "empty-class-folders":
        (folder / "cat").mkdir()
        (folder / "dog").mkdir()
    elif kind == "empty-splits":
        (folder / "train").mkdir()
        (folder / "test").mkdir()
    elif kind == "only-notes":
        (folder / "notes.txt").write_bytes(NOTES)
    return folder


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "not-streamed"])
@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("empty", "Found no data in"),
        ("empty-class-folders", "Found no data in"),
        ("empty-splits", "Found no data in"),
        ("only-notes", "Found no image column"),
    ],
)
def test_a_folder_without_images_is_one_line_exit_2_and_nothing_written(
    kind, match, streaming, tmp_path, fresh_cache, capsys
):
    """Told before any teacher loads (the teacher named does not exist) and before anything is written."""
    data = _empty(tmp_path, kind)
    run = tmp_path / "run"
    argv = tiny_args(data, run, "--teacher", str(tmp_path / "no-teacher"), "--epochs", "1",
                     *([] if streaming else ["--no-streaming"]))  # fmt: skip
    before = snapshot(data)
    assert distill_main(argv) == 2
    err = capsys.readouterr().err
    line = _error_line(err)
    if streaming or kind != "only-notes":  # converting a split of text files draws a progress bar first
        assert err.strip() == line
    assert match in line
    assert "no-teacher" not in line
    assert not run.exists()
    assert snapshot(data) == before


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "not-streamed"])
def test_a_folder_of_fewer_images_than_a_batch_is_refused_before_the_teacher(
    streaming, tmp_path, fresh_cache, capsys
):
    """7 image files for batches of 8: counted from the files, refused before the teacher and the output."""
    good = _decodable()
    data = tmp_path / "data"
    _write(data, {name: encoded for name, (encoded, _) in list(good.items())[:6]})
    _write(
        data, {"truncated.jpg": _undecodable(good["astronaut.jpg"][0])["truncated.jpg"], "notes.txt": NOTES}
    )
    run = tmp_path / "run"
    argv = tiny_args(data, run, "--teacher", str(tmp_path / "no-teacher"), "--epochs", "1",
                     *([] if streaming else ["--no-streaming"]))  # fmt: skip
    assert distill_main(argv) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: The split has 7 images, fewer than 8 per process"), line
    assert not run.exists()


def test_a_folder_of_undecodable_images_fails_in_one_line(teacher, tmp_path, fresh_cache, capsys):
    """8 files with image extensions, none decodable: only reading them tells, so the run starts, reads
    the epoch, finds no batch and stops with one line and status 1 (no traceback, no crash)."""
    jpeg = _decodable()["astronaut.jpg"][0]
    data = tmp_path / "data"
    _write(data, {f"broken_{i}.jpg": jpeg[: 1000 + 100 * i] for i in range(8)})
    assert distill_main(_distill(data, tmp_path / "run", teacher)) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: epoch 0 gave no full batch of 8 images"), line


# ----------------------------------------------------------------------------- a streamed folder's length


def _length_and_rows(folder: Path) -> tuple[int | None, int]:
    """The length a streamed folder states before it is read, and the rows an epoch reads (kept, skipped)."""
    loader, stats = build_dataloader(load_image_dataset(str(folder)), image_size=SIZE, batch_size=1)
    return stats.num_examples, sum(len(batch["key"]) + batch["skipped"] for batch in loader)


def _photos(folder: Path, count: int) -> list[str]:
    """``count`` small distinct JPEGs, ``photo_<i>.jpg``."""
    astronaut = skdata.astronaut()
    names = [f"photo_{i}.jpg" for i in range(count)]
    _write(
        folder,
        {n: _encoded(Image.fromarray(astronaut[i * 8 :][:64, :64]), "JPEG") for i, n in enumerate(names)},
    )
    return names


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv", "metadata.parquet"])
def test_a_folder_with_metadata_states_one_row_per_metadata_row(metadata, tmp_path, fresh_cache):
    """datasets makes a folder with a metadata file one row per metadata row: 12 photos, 6 of them named
    with a caption and a name whose file is missing (a row, skipped and counted) are 7 rows, not 12."""
    names = _photos(tmp_path / "data", 12)
    table = datasets.Dataset.from_dict(
        {"file_name": [*names[:6], "missing.jpg"], "caption": [f"photo {i}" for i in range(7)]}
    )
    {".jsonl": table.to_json, ".csv": table.to_csv, ".parquet": table.to_parquet}[Path(metadata).suffix](
        str(tmp_path / "data" / metadata)
    )
    assert _length_and_rows(tmp_path / "data") == (7, 7)


def test_a_second_extension_makes_an_image_file_as_datasets_reads_it(tmp_path, fresh_cache):
    """datasets lists ``a.jpg.bak`` and ``b.jpg.gz`` as images (a row each: the first decodes, the gzip
    does not and is skipped): the length counts them too."""
    _photos(tmp_path / "data", 8)
    photo = (tmp_path / "data" / "photo_0.jpg").read_bytes()
    _write(tmp_path / "data", {"a.jpg.bak": photo, "b.jpg.gz": gzip.compress(photo)})
    assert _length_and_rows(tmp_path / "data") == (10, 10)


def test_a_folder_with_a_zip_of_images_states_no_length_rather_than_a_wrong_one(tmp_path, fresh_cache):
    """The images inside a .zip are rows too; counting them means reading the archive, so the length is
    unknown (--epochs then asks for --max-steps in one line, before the teacher) rather than short."""
    names = _photos(tmp_path / "data", 10)
    with zipfile.ZipFile(tmp_path / "data" / "more.zip", "w") as archive:
        for name in names[:4]:
            archive.write(tmp_path / "data" / name, f"zipped_{name}")
    assert _length_and_rows(tmp_path / "data") == (None, 14)


def test_epochs_over_a_folder_with_metadata_run_the_steps_they_plan(teacher, tmp_path, fresh_cache, capsys):
    """24 photos, 16 named by metadata.jsonl, --epochs 2: 2 steps an epoch planned and run, the learning
    rate's schedule ends at 0 (planned from the 24 files, 6 steps were planned and 4 run)."""
    names = _photos(tmp_path / "data", 24)
    datasets.Dataset.from_dict({"file_name": names[:16], "caption": ["a photo"] * 16}).to_json(
        str(tmp_path / "data" / "metadata.jsonl")
    )
    run = tmp_path / "run"
    argv = tiny_args(tmp_path / "data", run, "--teacher", str(teacher), "--epochs", "2", "--log-every", "1")
    assert distill_main(argv) == 0
    assert "skipped 0 images" in capsys.readouterr().err.splitlines()
    metrics = read_metrics(run)
    assert [(m["step"], m["epoch"]) for m in metrics] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert metrics[-1]["lr"] == 0.0


def test_epochs_over_a_folder_with_a_zip_ask_for_max_steps_before_the_teacher(tmp_path, fresh_cache, capsys):
    """10 photos and a zip of 10 more, --epochs 1: the length is unknown, so one line asks for --max-steps
    before the (missing) teacher and nothing is written (counted from the 10 files, each epoch was cut
    to half its images)."""
    names = _photos(tmp_path / "data", 10)
    with zipfile.ZipFile(tmp_path / "data" / "more.zip", "w") as archive:
        for name in names:
            archive.write(tmp_path / "data" / name, f"zipped_{name}")
    run = tmp_path / "run"
    argv = tiny_args(tmp_path / "data", run, "--teacher", str(tmp_path / "no-teacher"), "--epochs", "1")
    assert distill_main(argv) == 2
    line = _error_line(capsys.readouterr().err)
    assert "pass --max-steps" in line
    assert "no-teacher" not in line
    assert not run.exists()


def test_a_folder_named_relative_to_the_working_directory_is_counted(tmp_path, fresh_cache, monkeypatch):
    """``--dataset photos`` (no ./) names the local folder, not a Hub id: its length is counted too."""
    _photos(tmp_path / "photos", 9)
    monkeypatch.chdir(tmp_path)
    assert _length_and_rows(Path("photos")) == (9, 9)
