"""Data: scan and check image folders, split them, and feed tf.data pipelines."""

from tltoolkit.data.folder import ImageFolder, image_files, labelled_images, prepare_data
from tltoolkit.data.images import UnreadableImage, load_image_array, read_image
from tltoolkit.data.scan import SkippedFile, skipped_frame

__all__ = [
    "ImageFolder",
    "SkippedFile",
    "UnreadableImage",
    "image_files",
    "labelled_images",
    "load_image_array",
    "prepare_data",
    "read_image",
    "skipped_frame",
]
