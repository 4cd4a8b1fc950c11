"""An image folder made ready for training: classes, checked files, train/val(/test) parts, skipped files."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tltoolkit.data.scan import (
    SPLITS,
    ScanResult,
    SkippedFile,
    check_files,
    list_files,
    scan_class_folders,
    skipped_frame,
)
from tltoolkit.data.split import Item, stratified_split
from tltoolkit.errors import DataError

_logger = logging.getLogger(__name__)


@dataclass
class ImageFolder:
    """A scanned, split image folder.

    Attributes:
        root: The folder the user pointed at.
        class_names: Class names in label order (sorted folder names); they travel with the model.
        parts: `"train"`, `"val"` and maybe `"test"`, each a list of `(path, label)`.
        skipped: Files that were not used, with the reason.
        layout: `"classes"` (class folders, split here) or `"splits"` (train/ and val/ given).
    """

    root: Path
    class_names: list[str]
    parts: dict[str, list[Item]]
    skipped: list[SkippedFile]
    layout: str
    val_split_here: bool = False  # `val` was split from `train` here (no val/ folder): it may be split again.
    duplicates: dict | None = None  # With `data.split_by_duplicates`: near-duplicate counts, logged with the run.

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def manifest(self) -> pd.DataFrame:
        """Every used file with its class and part (columns `path`, `label`, `class`, `split`)."""
        rows = [
            (path, label, self.class_names[label], part) for part, items in self.parts.items() for path, label in items
        ]
        return pd.DataFrame(rows, columns=["path", "label", "class", "split"])

    def counts(self) -> pd.DataFrame:
        """Images per class (rows) and part (columns)."""
        table = self.manifest().pivot_table(
            index="class", columns="split", values="path", aggfunc="count", fill_value=0
        )
        return table.reindex(index=self.class_names, columns=[p for p in SPLITS if p in self.parts], fill_value=0)

    def skipped_frame(self) -> pd.DataFrame:
        return skipped_frame(self.skipped)

    def summary(self) -> str:
        """Classes and images per part, and the first skipped files with their reasons, as printed before training."""
        counts = self.counts()
        parts = ", ".join(f"{p} {int(counts[p].sum())}" for p in counts)
        lines = [f"Data {self.root}: {self.num_classes} classes, {parts}", counts.to_string()]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} file(s) (also logged as data/skipped_files.csv):")
            lines += [f"  {item.path}: {item.reason}" for item in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)


def prepare_data(
    root: str | Path, val_split: float = 0.2, seed: int = 42, progress: bool = True, exclude: str | Path | None = None
) -> ImageFolder:
    """Scans `root`, checks every file once, and splits it.

    `root` is either a class-per-subfolder tree (split here, stratified and seeded) or holds `train/` and `val/`
    (and optionally `test/`) subtrees with the same class subfolders. With `train/` but no `val/`, `train/` is split.

    Args:
        exclude: A file naming images to leave out (`read_exclusions`), e.g. an edited `label_issues.csv` of
            `tltoolkit audit`: they are reported as skipped, before the split.

    Raises:
        DataError: Missing folder, no images, a single class, a class without usable images, or val/test classes
            that do not exist in train/; an `exclude` file that cannot be read.
    """
    root = Path(root).expanduser()
    if (root / "train").is_dir():
        names, train, skipped = scan_class_folders(root / "train", progress=progress)
        parts = {"train": train}
        for part in ("val", "test"):
            if (root / part).is_dir():
                parts[part], part_skipped = _scan_with_classes(root / part, names, "train/", progress=False)
                skipped.extend(part_skipped)
        layout = "splits"
    else:
        names, train, skipped = scan_class_folders(root, progress=progress)
        parts, layout = {"train": train}, "classes"
    if len(names) < 2:
        raise DataError(
            f"Image folder {root} has a single class ({names[0]!r}); a classifier needs at least two class subfolders."
        )
    if exclude is not None:
        parts, left_out = _excluded(parts, Path(exclude))
        skipped.extend(left_out)
    split_here = "val" not in parts
    if split_here:
        parts["train"], parts["val"] = stratified_split(parts["train"], val_split, seed, names)
    return ImageFolder(
        root=root, class_names=names, parts=parts, skipped=skipped, layout=layout, val_split_here=split_here
    )


def read_exclusions(file: Path) -> set[str]:
    """The paths a `data.exclude` file names, absolute: a CSV with a `path` column, or one path per line.

    Raises:
        DataError: The file is missing or unreadable, or a CSV without a `path` column.
    """
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(
            f"data.exclude: cannot read {file} ({exc.strerror or type(exc).__name__}); give a CSV with a `path` column "
            "(e.g. tltoolkit audit's label_issues.csv) or a file of one path per line."
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and "," in lines[0]:
        import io

        table = pd.read_csv(io.StringIO(text), dtype=str)
        if "path" not in table.columns:
            raise DataError(
                f"data.exclude: {file} is a CSV without a `path` column (its columns: {', '.join(table.columns)})."
            )
        lines = list(table["path"].dropna())
    elif lines and lines[0] == "path":
        lines = lines[1:]
    return {os.path.realpath(line) for line in lines}


def _excluded(parts: dict[str, list[Item]], file: Path) -> tuple[dict[str, list[Item]], list[SkippedFile]]:
    excluded = read_exclusions(file)
    reason = f"left out by data.exclude ({file})"
    kept, skipped, matched = {}, [], set()
    for part, items in parts.items():
        kept[part] = []
        for path, label in items:
            real = os.path.realpath(path)
            if real in excluded:
                skipped.append(SkippedFile(path, reason))
                matched.add(real)
            else:
                kept[part].append((path, label))
    unknown = sorted(excluded - matched)
    if unknown:
        _logger.warning(
            "data.exclude: %d path(s) of %s are not images of this folder (first: %s); they leave nothing out.",
            len(unknown),
            file,
            unknown[0],
        )
    _logger.info("data.exclude: %d image(s) left out (%s).", len(skipped), file)
    return kept, skipped


def _scan_with_classes(
    folder: Path, class_names: list[str], owner: str, progress: bool
) -> tuple[list[Item], list[SkippedFile]]:
    """Scans a class-per-subfolder tree and labels it with `class_names`, the classes of `owner`."""
    names, items, skipped = scan_class_folders(folder, progress=progress)
    unknown = sorted(set(names) - set(class_names))
    if unknown:
        raise DataError(f"{folder} has class folders {unknown} that {owner} lacks; its classes are {class_names}.")
    remap = {i: class_names.index(name) for i, name in enumerate(names)}
    return [(path, remap[label]) for path, label in items], skipped


def labelled_images(
    root: str | Path, class_names: list[str], progress: bool = True
) -> tuple[list[Item], list[SkippedFile]]:
    """Images of a class-per-subfolder tree labelled with a model's classes (for evaluation).

    A tree with `test/` (or else `val/`) subfolders is read from there.

    Raises:
        DataError: The folder has a class the model does not know.
    """
    root = Path(root).expanduser()
    for part in ("test", "val"):
        if (root / part).is_dir() and (root / "train").is_dir():
            root = root / part
            break
    return _scan_with_classes(root, class_names, "the model", progress=progress)


def image_files(paths: list[str | Path], progress: bool = True) -> ScanResult:
    """Images among files and folders (any depth), checked; for prediction. Returns a `ScanResult`."""
    files: list[Path] = []
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise DataError(f"Cannot predict on {', '.join(missing)}: no such file or folder.")
    for path in map(Path, paths):
        files.extend(list_files(path) if path.is_dir() else [path])
    result = check_files(files, progress=progress)
    if not result.images:
        raise DataError(f"No readable image among {len(files)} file(s) in {', '.join(map(str, paths))}.")
    return result
