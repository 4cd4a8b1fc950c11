"""Reading one image file: the single decoder used by the scan, training, evaluation and prediction.

Pillow decodes (JPEG, PNG, GIF, BMP, WebP, TIFF, ...), honours EXIF orientation and converts any mode (grayscale,
palette, RGBA, CMYK, 16-bit) to 8-bit RGB, so a picture looks the same to the model at training and at prediction.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("squash", "crop", "pad")


class UnreadableImage(Exception):
    """A file that cannot be used as an image; `reason` says why, in words for the skipped-files report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def skip_reason(path: Path) -> str | None:
    """Why a file is skipped without being opened (hidden, macOS metadata, empty), or `None`."""
    if "__MACOSX" in path.parts:
        return "macOS archive metadata (__MACOSX)"
    if path.name.startswith("._"):
        return "macOS AppleDouble metadata file (._*)"
    if path.name.startswith("."):
        return "hidden file"
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return None


def read_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Decodes `path` fully into an RGB Pillow image, EXIF orientation applied.

    Args:
        path: The image file.
        draft_size: If given, lets JPEG decoding shrink by a power of two while staying >= this side.

    Raises:
        UnreadableImage: The file is not a decodable image; `reason` says why.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if getattr(image, "is_animated", False):
                    image.seek(0)
                if draft_size and image.format == "JPEG":
                    image.draft("RGB", (draft_size, draft_size))
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image Pillow can identify (wrong extension, text or HTML?)") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise UnreadableImage(f"cannot be opened ({type(exc).__name__}: {exc.strerror}): {exc.filename}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"corrupt or truncated image: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clip (Pillow's convert("L") clips at 255).
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency over white, as viewers show it, instead of keeping hidden colours.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


INTERPOLATIONS = ("antialiased", "bilinear")


def _bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Plain bilinear resampling with half-pixel centres and no antialiasing: `tf.image.resize(method="bilinear")`,
    as Keras's `image_dataset_from_directory` resizes (float result, rounded to uint8)."""

    def weights(out_size: int, in_size: int):
        centre = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
        floor = np.floor(centre)
        lower = np.clip(floor, 0, in_size - 1).astype(np.int64)
        upper = np.clip(np.ceil(centre), 0, in_size - 1).astype(np.int64)
        return lower, upper, (centre - floor).astype(np.float32)

    top, bottom, dy = weights(height, array.shape[0])
    left, right, dx = weights(width, array.shape[1])
    # Rows are picked from the uint8 image before converting: only they are needed in float (half the time of
    # converting the whole photo first, the same values).
    upper = array[top].astype(np.float32)
    rows = upper + (array[bottom].astype(np.float32) - upper) * dy[:, None, None]
    lower = rows[:, left]
    out = lower + (rows[:, right] - lower) * dx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_image_array(
    path: str | Path, size: int, resize: str = "squash", interpolation: str = "antialiased"
) -> np.ndarray:
    """Decodes and resizes an image to a `(size, size, 3)` uint8 RGB array.

    Args:
        path: The image file.
        size: Output side in pixels.
        resize: `"squash"` stretches to the square, `"crop"` centre-crops to it, `"pad"` letterboxes with black.
            Defaults to `"squash"`.
        interpolation: `"antialiased"`: Pillow's bilinear, which widens its filter when shrinking (as torchvision's
            transforms do). `"bilinear"`: plain bilinear, no antialiasing, exactly as `tf.image.resize` and Keras's
            `image_dataset_from_directory` (sharper when shrinking). Defaults to `"antialiased"`.

    Raises:
        UnreadableImage: The file is not a decodable image.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    # JPEG draft decoding (shrinking by powers of two inside the decoder) low-pass filters like antialiasing does,
    # so plain bilinear decodes in full, as Keras does.
    image = read_image(path, draft_size=size if interpolation == "antialiased" else None)
    if interpolation == "antialiased":
        target = (size, size)
        if resize == "crop":
            image = ImageOps.fit(image, target, Image.Resampling.BILINEAR)
        elif resize == "pad":
            image = ImageOps.pad(image, target, Image.Resampling.BILINEAR, color=(0, 0, 0))
        else:
            image = image.resize(target, Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    width, height = image.size
    if resize == "crop":
        side = min(width, height)  # The centred square, as ImageOps.fit takes it.
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        return _bilinear(np.asarray(image.crop(tuple(round(v) for v in box)), dtype=np.uint8), size, size)
    if resize == "pad":
        scale = size / max(width, height)
        inner_w, inner_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = np.zeros((size, size, 3), np.uint8)
        top, left = (size - inner_h) // 2, (size - inner_w) // 2
        canvas[top : top + inner_h, left : left + inner_w] = _bilinear(np.asarray(image, np.uint8), inner_h, inner_w)
        return canvas
    return _bilinear(np.asarray(image, dtype=np.uint8), size, size)
