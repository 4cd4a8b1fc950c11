"""The `audit` benchmark (registered in `run.py`): planted wrong labels and duplicates, found or not.

On the digits demo (`recipes/quickstart.yaml`) and on hymenoptera (`recipes/mobilenet_v2.yaml`): a seeded 10% of
the training images moved to another class folder (their labels flipped) and 20 training images copied into the
held-out part (some exactly, some resized, some re-encoded as JPEG at quality 70). The audit runs on that folder;
then the recipe trains once on it as it is and once with the flagged images left out (`data.exclude`), and both
models are scored on the held-out images as they were before anything was planted.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

FLIPPED = 0.10
COPIES = 20


def plant(source: Path, held_out: str, out: Path, seed: int = 0) -> dict:
    """A copy of `source` (train/ and `held_out`/ class folders) with flipped labels and planted copies; returns
    what was planted: `flips` {new path: true class}, `copies` [(train path, copy path, how)], `clean` (a copy of
    `held_out` as it was)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source / "train", out / "train")
    shutil.copytree(source / held_out, out / held_out)
    shutil.copytree(source / held_out, out.parent / f"{out.name}-clean-{held_out}")
    classes = sorted(p.name for p in (out / "train").iterdir() if p.is_dir())
    files = sorted(p for p in (out / "train").rglob("*") if p.is_file())
    chosen = rng.choice(len(files), COPIES + int(FLIPPED * len(files)), replace=False)
    copies = []
    for rank, index in enumerate(chosen[:COPIES]):
        original = files[index]
        how = ("exact", "resized", "jpeg70")[rank % 3]
        target = out / held_out / original.parent.name / f"planted_{how}_{original.stem}"
        image = Image.open(original).convert("RGB")
        if how == "exact":
            target = target.with_suffix(original.suffix)
            shutil.copy(original, target)
        elif how == "resized":
            target = target.with_suffix(".png")
            image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.Resampling.BICUBIC).save(target)
        else:
            target = target.with_suffix(".jpg")
            image.save(target, quality=70)
        copies.append((str(original), str(target), how))
    flips = {}
    copied = {c[0] for c in copies}
    for index in chosen[COPIES:]:
        original = files[index]
        if str(original) in copied:
            continue
        true = original.parent.name
        other = [c for c in classes if c != true][int(rng.integers(len(classes) - 1))]
        target = out / "train" / other / f"flipped_{original.name}"
        shutil.move(original, target)
        flips[str(target)] = true
    return {"flips": flips, "copies": copies, "clean": out.parent / f"{out.name}-clean-{held_out}"}


def score_audit(result, planted: dict) -> dict:
    """Precision and recall of the flips among the top 10% of the train/ folder's images (train and val parts, where
    the flips are) by label-issue score and among confident learning's flags; recall of the planted copies (each a
    pair of the duplicates found)."""
    pool = result.images[result.images.path.str.contains("/train/", regex=False)]
    train = pool.sort_values("score", ascending=False, kind="stable")
    top = train.head(max(1, int(round(FLIPPED * len(train)))))
    flipped = set(planted["flips"])
    hits = len(flipped & set(top.path))
    flagged = set(result.label_issues.path)
    pairs = {frozenset(p) for p in result.duplicates[["path_a", "path_b"]].values}
    found = [frozenset((a, b)) in pairs for a, b, _ in planted["copies"]]
    by_kind = {}
    for (_, _, how), hit in zip(planted["copies"], found):
        by_kind.setdefault(how, []).append(hit)
    return {
        "flipped": len(flipped),
        "top_10pct_precision": round(hits / len(top), 3),
        "top_10pct_recall": round(hits / max(1, len(flipped)), 3),
        "flagged": len(flagged),
        "flagged_precision": round(len(flipped & flagged) / max(1, len(flagged)), 3),
        "flagged_recall": round(len(flipped & flagged) / max(1, len(flipped)), 3),
        "copies_found": f"{sum(found)}/{len(found)}",
        "copies_recall": round(sum(found) / len(found), 3),
        "copies_recall_by_kind": {how: f"{sum(h)}/{len(h)}" for how, h in by_kind.items()},
        "duplicate_pairs": len(result.duplicates),
        "leaking_pairs": len(result.leaks),
        "noise_rate_estimate": result.summary["label_noise_rate"],
        "extraction_s": result.summary["extraction_s"],
        "audit_s": result.summary["audit_s"],
        "audit_over_extraction": round(result.summary["audit_s"] / max(result.summary["extraction_s"], 1e-9), 2),
        "seconds": {k: v for k, v in result.summary.items() if k.endswith("_s")},
        "pixel_confirmed_pairs": result.summary["pixel_confirmed_pairs"],
    }


def _clean_vs_noisy(args, recipe: Path, dirty: Path, issues: Path, clean_test: Path, name: str) -> dict:
    """The recipe on the dirty folder as it is and with the audit's flagged images left out, same budget; both
    models scored on the held-out images as they were."""
    from mlflow import MlflowClient

    import tltoolkit
    from tltoolkit.commands.evaluate import evaluate

    scores = {}
    for side, overrides in (("noisy", []), ("cleaned", [f"data.exclude={issues}"])):
        started = time.perf_counter()
        result = tltoolkit.run(recipe, dirty, overrides, args.tracking_uri, f"bench-audit-{name}", verbose=0)
        evaluation = evaluate(result.run_id, clean_test, result.tracking_uri, log=False)
        scores[f"{side}_test_accuracy"] = round(evaluation.metrics["accuracy"], 4)
        params = MlflowClient(result.tracking_uri).get_run(result.run_id).data.params
        scores[f"{side}_train_images"] = int(params["data.train_images"])
        scores[f"{side}_wall_s"] = round(time.perf_counter() - started, 1)
    return scores


def audit_bench(args) -> tuple[list[dict], dict]:
    """Planted flips and copies on the digits and hymenoptera, found by `tltoolkit.audit`; training on the cleaned
    folder against the noisy one (see the module docstring). Goals: on the digits, recall of the flips >= 0.8 at
    precision >= 0.8 in the top 10%; every planted copy found; the audit at most 1.5x one extraction pass."""
    import tltoolkit
    from tltoolkit.data.demo import write_digits

    repo = Path(__file__).resolve().parents[1]
    work = Path(args.workdir)
    digits = write_digits(work / "digits")
    sets = [("digits", digits, "test", repo / "recipes" / "quickstart.yaml")]
    hymenoptera = repo.parent / "shared" / "data" / "hymenoptera"
    if hymenoptera.is_dir():
        sets.append(("hymenoptera", hymenoptera, "val", repo / "recipes" / "mobilenet_v2.yaml"))
    rows, figures = [], {}
    for name, source, held_out, recipe in sets:
        dirty = work / f"{name}-dirty"
        planted = plant(source, held_out, dirty)
        result = tltoolkit.audit(dirty, recipe, work / f"audit-{name}", args.tracking_uri, f"bench-audit-{name}")
        found = score_audit(result, planted)
        found.update(
            _clean_vs_noisy(args, recipe, dirty, work / f"audit-{name}" / "label_issues.csv", planted["clean"], name)
        )
        rows.append({"set": name, **{k: v for k, v in found.items() if not isinstance(v, dict)}})
        figures[name] = found
    return rows, figures
