"""Nearest neighbours on unit-length embeddings: near-duplicate pairs (and the groups they form) and outlier scores.

Exact below `EXACT_MAX` images: every similarity, in chunks of rows (BLAS matrix products). Above it, an inverted
file index (the method of faiss's `IndexIVFFlat`): scikit-learn's `MiniBatchKMeans` splits the embeddings into
about 4 sqrt(N) lists, each image is compared with the images of its `PROBES` nearest lists only, so the cost grows
as N^1.5 instead of N^2; the similarities it reports are exact, only a neighbour in a list not probed can be missed.
Written with scikit-learn rather than faiss: no native dependency of 30 MB for a pass that takes seconds at 10^5.

A copy re-encoded as JPEG or resized can land just below the similarity threshold while natural look-alikes land
above it (the digits demo, upscaled from 8x8 pixels, has ~100 natural pairs at >= 0.95 and planted JPEG-70 copies at
0.945). `near_duplicates` therefore also takes the pairs up to `PIXEL_MARGIN` below the threshold whose pixels agree:
32x32 grey thumbnails (Pillow's box filter, mean removed) correlated at >= `PIXEL_MATCH`, which planted copies reach
(>= 0.987 for resized ones, 0.999 for JPEG-70) and few natural pairs do. Only the images of those pairs are decoded
again (at most each image's `NEIGHBOURS` lists).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

_logger = logging.getLogger(__name__)

EXACT_MAX = 20_000
PROBES = 3
ROWS = 1024  # Rows per chunk of similarities (ROWS x N float32 at a time).
DUPLICATE_SIMILARITY = 0.95  # Cosine similarity from which two images count as near-duplicates.
NEIGHBOURS = 10
OUTLIER_NEIGHBOURS = 5
OUTLIER_Z = 3.5
PIXEL_MARGIN = 0.05  # Pairs this far below the threshold count where their pixels agree (`near_duplicates`).
PIXEL_MATCH = 0.985  # Correlation of grey thumbnails from which such a pair is a near-duplicate.
THUMBNAIL = 32  # Modified z-score (Iglewicz and Hoaglin) above which an image is an outlier.


@dataclass
class Neighbours:
    """Each image's nearest other images, most similar first."""

    indices: np.ndarray  # (images, k) int64
    similarities: np.ndarray  # (images, k) float32, cosine
    exact: bool


def nearest(vectors: np.ndarray, k: int = NEIGHBOURS, seed: int = 0) -> Neighbours:
    """The `k` nearest other rows of `vectors` (unit length) by cosine similarity (see the module docstring)."""
    count = len(vectors)
    k = max(1, min(k, count - 1))
    if count <= EXACT_MAX:
        return Neighbours(*_top_k(vectors, np.arange(count), vectors, np.arange(count), k), exact=True)
    return _inverted_file(vectors, k, seed)


def _top_k(queries, query_ids, base, base_ids, k):
    """For each query row, its `k` most similar `base` rows other than itself: `(ids, similarities)`."""
    ids = np.full((len(queries), k), -1, np.int64)
    sims = np.full((len(queries), k), -np.inf, np.float32)
    if not len(base):
        return ids, sims
    take = min(k, len(base))
    for first in range(0, len(queries), ROWS):
        block = queries[first : first + ROWS] @ base.T
        block[query_ids[first : first + ROWS, None] == base_ids[None, :]] = -np.inf  # Not itself.
        top = np.argpartition(-block, take - 1, axis=1)[:, :take]
        values = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        ids[first : first + ROWS, :take] = base_ids[np.take_along_axis(top, order, axis=1)]
        sims[first : first + ROWS, :take] = np.take_along_axis(values, order, axis=1)
    return ids, sims


def _inverted_file(vectors: np.ndarray, k: int, seed: int) -> Neighbours:
    from sklearn.cluster import MiniBatchKMeans

    count = len(vectors)
    lists = int(4 * np.sqrt(count))
    sample = vectors[np.random.default_rng(seed).choice(count, min(count, 50 * lists), replace=False)]
    centroids = MiniBatchKMeans(lists, batch_size=4096, n_init=1, max_iter=50, random_state=seed).fit(sample)
    centres = centroids.cluster_centers_.astype(np.float32)
    probes = np.empty((count, PROBES), np.int64)
    for first in range(0, count, ROWS * 8):
        scores = vectors[first : first + ROWS * 8] @ centres.T
        probes[first : first + ROWS * 8] = np.argsort(-scores, axis=1)[:, :PROBES]
    members = [np.flatnonzero(probes[:, 0] == c) for c in range(lists)]  # Each image in its nearest list.
    found_ids = np.full((count, PROBES * k), -1, np.int64)
    found = np.full((count, PROBES * k), -np.inf, np.float32)
    for rank in range(PROBES):
        for c in range(lists):
            queries = np.flatnonzero(probes[:, rank] == c)
            if len(queries):
                ids, sims = _top_k(vectors[queries], queries, vectors[members[c]], members[c], k)
                found_ids[queries, rank * k : (rank + 1) * k] = ids
                found[queries, rank * k : (rank + 1) * k] = sims
    order = np.argsort(-found, axis=1, kind="stable")[:, :k]
    _logger.info("Neighbours: an inverted file of %d lists, %d probed per image (approximate).", lists, PROBES)
    return Neighbours(np.take_along_axis(found_ids, order, 1), np.take_along_axis(found, order, 1), exact=False)


def duplicate_pairs(neighbours: Neighbours, threshold: float = DUPLICATE_SIMILARITY) -> list[tuple[int, int, float]]:
    """`(a, b, similarity)` with `a < b` for every pair at or above `threshold`, most similar first."""
    pairs: dict[tuple[int, int], float] = {}
    rows, columns = np.nonzero(neighbours.similarities >= threshold)
    for row, column in zip(rows, columns):
        other = int(neighbours.indices[row, column])
        if other >= 0:
            pair = (min(int(row), other), max(int(row), other))
            pairs[pair] = max(pairs.get(pair, -1.0), float(neighbours.similarities[row, column]))
    return sorted(((a, b, s) for (a, b), s in pairs.items()), key=lambda p: (-p[2], p[0], p[1]))


def near_duplicates(
    neighbours: Neighbours, paths: list[str], threshold: float = DUPLICATE_SIMILARITY
) -> list[tuple[int, int, float]]:
    """The pairs at or above `threshold`, and those up to `PIXEL_MARGIN` below it whose thumbnails correlate at
    `PIXEL_MATCH` or more (see the module docstring); `(a, b, embedding similarity)`, most similar first."""
    pairs = duplicate_pairs(neighbours, threshold - PIXEL_MARGIN)
    close = [pair for pair in pairs if pair[2] < threshold]
    thumbnails = {i: thumbnail(paths[i]) for i in sorted({i for a, b, _ in close for i in (a, b)})}
    kept = [
        (a, b, s)
        for a, b, s in pairs
        if s >= threshold
        or (thumbnails[a] is not None and thumbnails[b] is not None and thumbnails[a] @ thumbnails[b] >= PIXEL_MATCH)
    ]
    confirmed = sum(s < threshold for _, _, s in kept)
    if close:
        _logger.info(
            "Near-duplicates: %d pair(s) at similarity >= %.3f, and %d of the %d pair(s) within %.2f below it whose "
            "pixels agree (thumbnail correlation >= %.3f).",
            len(kept) - confirmed,
            threshold,
            confirmed,
            len(close),
            PIXEL_MARGIN,
            PIXEL_MATCH,
        )
    return kept


def thumbnail(path: str) -> np.ndarray | None:
    """A `THUMBNAIL`-pixel square grey copy of the image, mean removed, of unit length (None if it cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("L", (THUMBNAIL * 2, THUMBNAIL * 2))  # JPEG: decode at a reduced size (much faster).
            grey = image.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    except (OSError, ValueError) as exc:
        _logger.warning("Near-duplicates: cannot read %s again (%s); its pixels are not compared.", path, exc)
        return None
    pixels = np.asarray(grey, np.float32).ravel()
    pixels -= pixels.mean()
    return pixels / max(float(np.linalg.norm(pixels)), 1e-6)


def groups(count: int, pairs: list[tuple[int, int, float]]) -> np.ndarray:
    """A group id per image: images joined by near-duplicate pairs share one (connected components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not pairs:
        return np.arange(count)
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    graph = coo_matrix((np.ones(len(pairs)), (a, b)), shape=(count, count))
    return connected_components(graph, directed=False)[1]


def outlier_scores(neighbours: Neighbours, k: int = OUTLIER_NEIGHBOURS) -> np.ndarray:
    """1 - the mean similarity to an image's `k` nearest neighbours: high where it is far from every class."""
    sims = neighbours.similarities[:, :k]
    return (1.0 - np.where(np.isfinite(sims), sims, 0.0).mean(axis=1)).astype(np.float32)


def outliers(scores: np.ndarray, z: float = OUTLIER_Z) -> np.ndarray:
    """Which scores stand out: a modified z-score (median and median absolute deviation) above `z`."""
    median = np.median(scores)
    spread = 1.4826 * np.median(np.abs(scores - median))
    return (scores - median) / max(spread, 1e-9) > z
