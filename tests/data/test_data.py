import io
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images
from PIL import Image

from tltoolkit.data import load_image_array, prepare_data
from tltoolkit.data.pipeline import image_dataset
from tltoolkit.errors import DataError
from tltoolkit.recipe import DataConfig


def test_bad_files_are_skipped_with_reasons_and_nothing_is_lost(image_folder):
    (image_folder / "red" / "page.jpg").write_text("<html>saved web page</html>")
    (image_folder / "red" / "empty.png").write_bytes(b"")
    good = image_folder / "blue" / "blue_0.png"
    (image_folder / "blue" / "truncated.png").write_bytes(good.read_bytes()[:60])
    (image_folder / "green" / "._green_0.png").write_bytes(b"\x00\x05\x16\x07")
    (image_folder / "notes.txt").write_text("stray file at the top")

    folder = prepare_data(image_folder, val_split=0.25, seed=1)

    reasons = {path.split("/")[-1]: reason for path, reason in folder.skipped_frame().itertuples(index=False)}
    assert set(reasons) == {"page.jpg", "empty.png", "truncated.png", "._green_0.png", "notes.txt"}
    assert "not an image" in reasons["page.jpg"] and "0 bytes" in reasons["empty.png"]
    assert "truncated" in reasons["truncated.png"] and "AppleDouble" in reasons["._green_0.png"]
    on_disk = sum(1 for p in image_folder.rglob("*") if p.is_file())
    used = sum(len(items) for items in folder.parts.values())
    assert used + len(folder.skipped) == on_disk


def test_split_is_stratified_seeded_and_disjoint(tmp_path):
    root = write_images(tmp_path / "imgs", per_class=20)
    a = prepare_data(root, val_split=0.25, seed=7, progress=False)
    b = prepare_data(root, val_split=0.25, seed=7, progress=False)
    c = prepare_data(root, val_split=0.25, seed=8, progress=False)
    assert a.parts == b.parts
    assert a.parts["val"] != c.parts["val"]
    assert not set(a.parts["train"]) & set(a.parts["val"])
    assert a.counts()["val"].tolist() == [5, 5, 5]
    assert a.class_names == ["blue", "green", "red"]


def test_train_val_test_subtrees_are_used_as_given(tmp_path):
    write_images(tmp_path / "ds" / "train", per_class=4)
    write_images(tmp_path / "ds" / "val", per_class=2, seed=1)
    write_images(tmp_path / "ds" / "test", classes={"red": (200, 0, 0)}, per_class=3, seed=2)
    folder = prepare_data(tmp_path / "ds", progress=False)
    assert folder.layout == "splits"
    assert {k: len(v) for k, v in folder.parts.items()} == {"train": 12, "val": 6, "test": 3}
    assert {label for _, label in folder.parts["test"]} == {folder.class_names.index("red")}


def test_val_class_missing_from_train_is_an_error(tmp_path):
    write_images(tmp_path / "ds" / "train", per_class=3)
    write_images(tmp_path / "ds" / "val", classes={"purple": (120, 0, 120)}, per_class=2)
    with pytest.raises(DataError, match="purple"):
        prepare_data(tmp_path / "ds", progress=False)


@pytest.mark.parametrize(
    "layout, fragment",
    [
        ("missing", "does not exist"),
        ("no_classes", "no class subfolders"),
        ("one_class", "single class"),
        ("empty_class", "hold no usable image"),
        ("too_few", "fewer than 2 images"),
    ],
)
def test_unusable_folders_are_clear_errors(tmp_path, layout, fragment):
    root = tmp_path / "ds"
    if layout == "no_classes":
        root.mkdir()
        Image.new("RGB", (8, 8)).save(root / "loose.png")
    elif layout == "one_class":
        write_images(root, classes={"red": (255, 0, 0)})
    elif layout == "empty_class":
        write_images(root)
        (root / "empty").mkdir()
    elif layout == "too_few":
        write_images(root, per_class=1)
    with pytest.raises(DataError) as info:
        prepare_data(root, progress=False)
    assert fragment in str(info.value)


def test_image_modes_become_rgb(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((10, 10), 128, np.uint8), "L").save(gray)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(rgba)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((10, 10), 65535, np.uint16)).save(deep)
    assert load_image_array(gray, 4)[0, 0].tolist() == [128, 128, 128]
    assert load_image_array(rgba, 4)[0, 0].tolist() == [255, 255, 255], "transparent pixels show white"
    assert load_image_array(deep, 4)[0, 0].tolist() == [255, 255, 255], "16-bit is scaled, not clipped"


@pytest.mark.parametrize("mode, expected", [("squash", (6, 6, 3)), ("crop", (6, 6, 3)), ("pad", (6, 6, 3))])
def test_resize_modes(tmp_path, mode, expected):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (30, 10), (255, 255, 255)).save(wide)
    array = load_image_array(wide, 6, mode)
    assert array.shape == expected and array.dtype == np.uint8
    if mode == "pad":
        assert array[0, 0].tolist() == [0, 0, 0], "letterbox bars are black"
    else:
        assert array[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("shape", [(37, 53), (300, 200), (10, 7)])
def test_bilinear_interpolation_is_tf_image_resize(tmp_path, shape):
    import tensorflow as tf

    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    ours = load_image_array(path, 24, "squash", "bilinear").astype(int)
    keras_way = np.rint(tf.image.resize(pixels, (24, 24), method="bilinear").numpy()).astype(int)
    assert np.abs(ours - keras_way).max() <= 1, "as image_dataset_from_directory resizes"
    antialiased = load_image_array(path, 24, "squash", "antialiased").astype(int)
    if shape[0] > 48:
        assert np.abs(antialiased - keras_way).mean() > 5, "shrinking with antialiasing smooths; the two differ"
    for mode in ("crop", "pad"):
        assert load_image_array(path, 24, mode, "bilinear").shape == (24, 24, 3)
    wide = np.full((10, 30, 3), 255, np.uint8)
    Image.fromarray(wide).save(path)
    padded = load_image_array(path, 6, "pad", "bilinear")
    assert padded[0, 0].tolist() == [0, 0, 0] and padded[3, 3].tolist() == [255, 255, 255]
    assert load_image_array(path, 6, "crop", "bilinear")[0, 0].tolist() == [255, 255, 255]


def test_pipeline_batches_float_pixels_and_one_hot_labels(image_folder):
    folder = prepare_data(image_folder, progress=False)
    config = DataConfig(image_size=16, batch_size=4)
    x, y = next(iter(image_dataset(folder.parts["val"], 3, config, training=False)))
    assert x.shape == (4, 16, 16, 3) and x.dtype.name == "float32"
    assert float(x.numpy().max()) > 100.0, "pixels stay in 0-255; preprocessing is inside the model"
    assert y.shape == (4, 3) and np.allclose(y.numpy().sum(axis=1), 1.0)


def test_augmentation_runs_in_training_only(image_folder):
    folder = prepare_data(image_folder, progress=False)
    config = DataConfig(image_size=16, batch_size=100, cache=False, augment={"rotation": 0.25, "contrast": 0.5})
    items = sorted(folder.parts["train"])
    plain = np.concatenate([x.numpy() for x, _ in image_dataset(items, 3, config, training=False)])
    again = np.concatenate([x.numpy() for x, _ in image_dataset(items, 3, config, training=False)])
    assert np.array_equal(plain, again), "evaluation pipelines are deterministic"
    augmented = np.concatenate([x.numpy() for x, _ in image_dataset(items, 3, config, training=True)])
    assert not np.allclose(np.sort(plain.ravel()), np.sort(augmented.ravel()))


def messy_folder(root: Path) -> tuple[dict[str, tuple[int, int, int]], set[str]]:
    """Every kind of file a real photo folder holds: the usable ones (name -> colour) and the names to skip."""
    write_images(root, per_class=3)
    red, green = root / "red", root / "green"
    usable = {
        "gray.png": Image.fromarray(np.full((24, 24), 90, np.uint8), "L"),
        "cmyk.jpg": Image.new("CMYK", (24, 24), (0, 255, 255, 0)),
        "rgba.png": Image.new("RGBA", (24, 24), (200, 0, 0, 255)),
        "palette.png": Image.new("RGB", (24, 24), (200, 0, 0)).convert("P"),
        "deep16.png": Image.fromarray(np.full((24, 24), 50000, np.uint16)),
        "photo.bmp": Image.new("RGB", (24, 24), (210, 10, 10)),
        "photo.webp": Image.new("RGB", (24, 24), (210, 10, 10)),
        "photo.tiff": Image.new("RGB", (24, 24), (210, 10, 10)),
        "UPPER.JPG": Image.new("RGB", (24, 24), (210, 10, 10)),
        "ñandú_蜂.png": Image.new("RGB", (24, 24), (210, 10, 10)),
    }
    for name, image in usable.items():
        image.save(red / name)
    frames = [Image.new("RGB", (24, 24), c) for c in ((220, 0, 0), (0, 0, 220))]
    frames[0].save(red / "animated.gif", save_all=True, append_images=frames[1:])
    rotated = np.zeros((10, 20, 3), np.uint8)
    rotated[:, :10] = (250, 0, 0)  # Stored 20 wide, 10 high; EXIF says: turn 90 degrees clockwise to show.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rotated).save(green / "exif_rotated.jpg", exif=exif)
    skipped = {
        "page.jpg",
        "empty.png",
        "truncated.jpg",
        "._red_0.png",
        ".hidden.png",
        "notes.txt",
        "bomb.png",
        "._meta.png",
        "cover.png",
    }
    (red / "page.jpg").write_text("<!doctype html><html>a saved web page</html>")
    (red / "empty.png").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 0, 0)).save(jpeg, "JPEG")
    (green / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    (red / "._red_0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    Image.new("RGB", (24, 24)).save(green / ".hidden.png")
    (green / "notes.txt").write_text("not an image")
    Image.new("RGB", (200, 200)).save(green / "bomb.png")  # Over the (lowered) pixel limit below.
    (root / "__MACOSX" / "red").mkdir(parents=True)
    Image.new("RGB", (24, 24)).save(root / "__MACOSX" / "red" / "._meta.png")
    Image.new("RGB", (24, 24)).save(root / "cover.png")  # Not inside a class folder.
    return {**{n: None for n in usable}, "animated.gif": None, "exif_rotated.jpg": None}, skipped


def test_a_messy_folder_uses_every_image_reports_every_skip_and_is_read_alike_everywhere(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from tltoolkit.data.folder import image_files
    from tltoolkit.data.images import read_image
    from tltoolkit.data.pipeline import image_batches

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)  # 200 x 200 is then a decompression bomb.
    root = tmp_path / "messy"
    usable, skipped = messy_folder(root)
    folder = prepare_data(root, val_split=0.25, seed=0, progress=False)
    used = {Path(p).name for items in folder.parts.values() for p, _ in items}
    reasons = {Path(p).name: r for p, r in folder.skipped_frame().itertuples(index=False)}
    assert set(usable) <= used and not set(usable) & set(reasons)
    assert set(reasons) == skipped
    assert "decompression bomb" in reasons["bomb.png"] and "__MACOSX" in reasons["._meta.png"]
    assert "hidden" in reasons[".hidden.png"] and "not inside a class folder" in reasons["cover.png"]
    assert "not an image" in reasons["notes.txt"] and "truncated" in reasons["truncated.jpg"]
    on_disk = sum(1 for p in root.rglob("*") if p.is_file())
    assert len(used) + len(reasons) == on_disk, "files used + files skipped = files on disk"

    gif = read_image(root / "red" / "animated.gif")
    assert gif.getpixel((0, 0)) == (220, 0, 0), "a GIF is its first frame"
    upright = read_image(root / "green" / "exif_rotated.jpg")
    assert upright.size == (10, 20), "EXIF orientation honoured"
    assert upright.getpixel((5, 2))[0] > 200 and upright.getpixel((5, 17))[0] < 60, "turned clockwise: red on top"
    assert read_image(root / "red" / "cmyk.jpg").getpixel((5, 5))[0] > 200, "CMYK cyan-free is red in RGB"

    # Prediction finds the same images in a class folder and decodes them to the same pixels as training.
    for name in ("red", "green"):
        predicted = image_files([root / name], progress=False)
        assert {Path(p).name for p in predicted.images} == {n for n in used if (root / name / n).exists()}
    config = DataConfig(image_size=16, batch_size=64)
    items = sorted(p for part in folder.parts.values() for p in part)
    training = np.concatenate([x.numpy() for x, _ in image_dataset(items, 3, config)])
    predicting = np.concatenate([x.numpy() for x in image_batches([p for p, _ in items], config)])
    np.testing.assert_array_equal(training, predicting)


def test_a_rescan_decodes_only_new_or_changed_files(tmp_path, monkeypatch):
    import tltoolkit.data.scan as scan

    root = write_images(tmp_path / "ds", per_class=6)
    decoded = []
    original = scan.read_image
    monkeypatch.setattr(scan, "read_image", lambda path, *a: decoded.append(Path(path).name) or original(path, *a))
    first = prepare_data(root, progress=False)
    assert len(decoded) == 18
    decoded.clear()
    again = prepare_data(root, progress=False)
    assert decoded == [] and again.parts == first.parts, "unchanged files: verdicts from the cache"

    changed = root / "red" / "red_0.png"
    changed.write_bytes(b"<html>now a web page</html>")  # New size and mtime.
    Image.new("RGB", (24, 24), (250, 0, 0)).save(root / "red" / "new.png")
    third = prepare_data(root, progress=False)
    assert sorted(decoded) == ["new.png", "red_0.png"]
    assert [Path(s.path).name for s in third.skipped] == ["red_0.png"]


def test_links_cannot_falsify_a_dataset(tmp_path):
    root = write_images(tmp_path / "photos", per_class=3)  # red, green, blue: 9 images.
    outside = write_images(tmp_path / "elsewhere", {"grey": (128, 128, 128)}, per_class=2)
    (root / "zz").symlink_to(".")  # Would be a class holding every image.
    (root / "grey").symlink_to(outside / "grey")  # A class folder that lives elsewhere.
    red, blue = root / "red", root / "blue"
    (red / "blue_0.png").symlink_to(blue / "blue_0.png")  # The same image under a second label.
    (red / "again.png").symlink_to(red / "red_1.png")  # The same image twice in one class.
    (red / "far.png").symlink_to(outside / "grey" / "grey_0.png")  # Leaves the data folder.
    (red / "loop").symlink_to(red)  # A folder link back to its own class.
    (red / "gone.png").symlink_to(red / "no-such.png")
    (blue / "shelf").mkdir()
    (red / "shelf").symlink_to(blue / "shelf")  # A linked folder inside the tree, holding one more image.
    Image.new("RGB", (24, 24), (30, 30, 220)).save(blue / "shelf" / "extra.png")

    folder = prepare_data(root, 0.34, seed=0, progress=False)
    assert folder.class_names == ["blue", "green", "red"]
    used = {Path(path).resolve(): label for items in folder.parts.values() for path, label in items}
    assert len(used) == sum(len(items) for items in folder.parts.values()) == 10, "9 images and the shelf's, once"
    assert used[(blue / "blue_0.png").resolve()] == 0 and used[(blue / "shelf" / "extra.png").resolve()] == 0
    reasons = {Path(s.path).name: s.reason for s in folder.skipped}
    assert "not a class folder" in reasons["zz"] and "not a class folder" in reasons["grey"]
    assert "one image cannot carry two labels" in reasons["blue_0.png"] and "class 'blue'" in reasons["blue_0.png"]
    assert "the same file as" in reasons["again.png"] and "two labels" not in reasons["again.png"]
    assert "outside" in reasons["far.png"] and "loop" in reasons["loop"] and "broken link" in reasons["gone.png"]
    assert "extra.png" in reasons and "the same file as" in reasons["extra.png"], "reached again through red/shelf"
    # Everything on disk is accounted for: each entry of the tree is used or reported.
    entries = [p for p in root.rglob("*") if not p.is_dir() or p.is_symlink()]
    assert len(used) + len(folder.skipped) == len(entries)


def test_epoch_streams_are_set_up_lazily_and_any_epoch_starts_where_it_would_be():
    import time

    import tensorflow as tf

    from tltoolkit.data.pipeline import epoch_stream

    tf.random.set_seed(7)  # As a recipe's seed does (with 0, TensorFlow needs the epochs built one by one).
    examples = tf.data.Dataset.range(10)
    started = time.perf_counter()
    long = epoch_stream(examples, 10, batch_size=4, seed=3, stream=1, first_epoch=0, last_epoch=3000)
    assert time.perf_counter() - started < 2.0, "3,000 epochs cost what one does to set up (eagerly: minutes)"
    batches = [list(b) for b in long.take(9).as_numpy_iterator()]  # Three epochs of 4 + 4 + 2.
    assert [len(b) for b in batches] == [4, 4, 2] * 3 and sorted(sum(batches[:3], [])) == list(range(10))
    assert batches[:3] != batches[3:6], "each epoch its own order"
    later = epoch_stream(examples, 10, batch_size=4, seed=3, stream=1, first_epoch=2, last_epoch=3)
    assert [list(b) for b in later.as_numpy_iterator()] == batches[6:9], "epoch 2 alone, as in the long stream"
    other = epoch_stream(examples, 10, batch_size=4, seed=3, stream=2, first_epoch=0, last_epoch=1)
    assert [list(b) for b in other.as_numpy_iterator()] != batches[:3], "another stage, another order"


def test_a_folder_that_cannot_be_read_is_one_error_naming_it(tmp_path, monkeypatch):
    root = write_images(tmp_path / "photos", per_class=3)
    locked = root / "green"
    original = os.scandir

    def scandir(path="."):
        if Path(path) == locked:  # What chmod 000 does to a user who is not root.
            raise PermissionError(13, "Permission denied", str(path))
        return original(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=f"Cannot read the folder {locked} \\(Permission denied\\).*chmod"):
        prepare_data(root, 0.34, seed=0, progress=False)


def test_a_file_that_cannot_be_opened_is_skipped_saying_why(tmp_path, monkeypatch):
    import tltoolkit.data.images as images

    root = write_images(tmp_path / "photos", per_class=3)
    locked = root / "red" / "red_1.png"
    original = images.Image.open

    def open_image(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(images.Image, "open", open_image)
    folder = prepare_data(root, 0.34, seed=0, progress=False)
    (skipped,) = [s for s in folder.skipped if s.path == str(locked)]
    assert "cannot be opened (PermissionError: Permission denied)" in skipped.reason
