"""keras-tuner over recipes: the oracle a recipe names, and a tuner whose trials run the recipe's stages.

keras-tuner owns the search: the oracle proposes values, records results, saves its state after every trial
(`<directory>/<name>/oracle.json`, `trial_*/trial.json`) and, on reload, sends the trial that was running when the
process died back for one more run. A trial here is not one `model.fit`: `TrialRunner` resolves the trial's
recipe and runs it in a `TrainingSession`, exactly as `tltoolkit run` does. Tracking plugs in through keras-tuner's
own trial hooks (`on_trial_begin`, `on_trial_end`), and our errors map onto keras-tuner's: a trial whose values do
not make a valid recipe raises `FailedTrialError` (the trial is skipped), a tracking store that stopped answering
raises `FatalError` (the search stops).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from tltoolkit.errors import BackboneError, DataError, DivergedError, RecipeError, TrackingError
from tltoolkit.quality.grouping import recipe_folder
from tltoolkit.recipe import Recipe
from tltoolkit.recipe.space import trial_recipe
from tltoolkit.stages import SessionOptions, TrainingHooks, TrainingSession, backbone_for
from tltoolkit.tuning.space import TUNER_PREFIX, declare, recipe_values

_logger = logging.getLogger(__name__)


class _RecipeFirst:
    """Makes an oracle's first trial the recipe as written (every hyperparameter at its default, the recipe's value),
    so a search never reports less than the recipe it started from. Later trials are the oracle's own."""

    def populate_space(self, trial_id):
        if not self.trials and not self._tried_so_far:
            values = {hp.name: hp.default for hp in self.hyperparameters.space if self.hyperparameters.is_active(hp)}
            return {"status": kt.engine.trial.TrialStatus.RUNNING, "values": values}
        return super().populate_space(trial_id)


class RandomSearchOracle(_RecipeFirst, kt.oracles.RandomSearchOracle):
    pass


class BayesianOptimizationOracle(_RecipeFirst, kt.oracles.BayesianOptimizationOracle):
    pass


# Grid search enumerates every combination and Hyperband runs its own brackets: both as keras-tuner has them.
ORACLES = {
    "random": RandomSearchOracle,
    "bayesian": BayesianOptimizationOracle,
    "hyperband": kt.oracles.HyperbandOracle,
    "grid": kt.oracles.GridSearchOracle,
}


def total_epochs(recipe: Recipe) -> int:
    return sum(stage.epochs for stage in recipe.stages)


def build_oracle(recipe: Recipe) -> kt.Oracle:
    """The recipe's tuner as a keras-tuner oracle (objective, trials, seed; Hyperband's budget in total epochs)."""
    search = recipe.search
    objective = kt.Objective(search.objective, direction=search.objective_direction)
    seed = recipe.seed if search.seed is None else search.seed
    if search.tuner == "hyperband":
        oracle = kt.oracles.HyperbandOracle(
            objective, max_epochs=search.max_epochs or total_epochs(recipe), factor=search.factor, seed=seed
        )
        oracle.max_trials = search.max_trials  # An upper bound on Hyperband's own count.
        return oracle
    return ORACLES[search.tuner](objective=objective, max_trials=search.max_trials, seed=seed)


class RecipeHyperModel(kt.HyperModel):
    """Declares the recipe's search space; `build` returns the trial's recipe (the runner builds the models)."""

    def __init__(self, recipe: Recipe):
        super().__init__(name=recipe.name or "recipe")
        self.recipe = recipe

    def declare_hyperparameters(self, hp: kt.HyperParameters) -> None:
        declare(hp, self.recipe)

    def build(self, hp: kt.HyperParameters) -> Recipe:
        declare(hp, self.recipe)
        return resolve_trial(self.recipe, hp.values)


def resolve_trial(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """The recipe a trial runs. Hyperband's `tuner/epochs` scales every stage's epochs (at least 1 each)."""
    resolved = trial_recipe(recipe, recipe_values(recipe, values))
    budget = values.get(f"{TUNER_PREFIX}epochs")
    if budget is None:
        return resolved
    full = recipe.search.max_epochs or total_epochs(recipe)
    stages = [
        stage.model_copy(update={"epochs": max(1, round(stage.epochs * budget / full))}) for stage in resolved.stages
    ]
    return resolved.model_copy(update={"stages": stages})


class RecipeTuner(kt.engine.base_tuner.BaseTuner):
    """A keras-tuner tuner whose trials run recipes through `runner`, tracked by `tracker` (a `TrialTracker`).

    Args:
        recipe: The search's recipe.
        runner: Runs a trial's recipe (`TrialRunner`).
        tracker: Makes, fills and ends each trial's run; `None` tracks nothing.
        **kwargs: keras-tuner's (`directory`, `project_name`, `overwrite`...).
    """

    def __init__(self, recipe: Recipe, runner: TrialRunner, tracker=None, **kwargs):
        super().__init__(build_oracle(recipe), hypermodel=RecipeHyperModel(recipe), **kwargs)
        self.recipe, self.runner, self.tracker = recipe, runner, tracker

    def on_trial_begin(self, trial) -> None:
        values = recipe_values(self.recipe, trial.hyperparameters.values)
        shown = ", ".join(f"{path}: {json.dumps(value)}" for path, value in values.items())
        _logger.info("Trial %s: %s", trial.trial_id, shown)
        if self.tracker is None:
            return
        try:
            resolved = resolve_trial(self.recipe, trial.hyperparameters.values)
        except RecipeError:
            resolved = None  # `run_trial` fails it with the reason.
        self.tracker.begin(trial, resolved)

    def run_trial(self, trial, *args, **kwargs) -> dict[str, float]:
        search = self.recipe.search
        try:
            resolved = resolve_trial(self.recipe, trial.hyperparameters.values)
            hooks = self.tracker.hooks if self.tracker is not None else lambda execution: TrainingHooks()
            result = self.runner.run(resolved, search.executions_per_trial, search.objective, hooks)
            if self.tracker is not None:
                self.tracker.record(trial.trial_id, result, self.runner.folder(resolved).class_names)
        except (RecipeError, BackboneError, DataError, DivergedError) as exc:
            _logger.warning("Trial %s failed: %s: %s", trial.trial_id, type(exc).__name__, exc)
            raise kt.errors.FailedTrialError(f"{type(exc).__name__}: {exc}") from exc
        except (TrackingError, MlflowException) as exc:
            raise kt.errors.FatalError(f"The tracking store stopped answering ({type(exc).__name__}: {exc}).") from exc
        _logger.info("Trial %s: %s %.4f in %.1fs", trial.trial_id, search.objective, result.objective, result.wall_s)
        return {search.objective: result.objective}

    def on_trial_end(self, trial) -> None:
        if self.tracker is not None:
            self.tracker.end("FINISHED" if trial.status == kt.engine.trial.TrialStatus.COMPLETED else "FAILED")
        super().on_trial_end(trial)


@dataclass
class TrialResult:
    objective: float
    metrics: dict[str, float]  # Final validation scores (mean over executions) and per-stage val accuracy.
    history: pd.DataFrame  # Every epoch of every stage and execution.
    evaluation: object  # The last execution's final `Evaluation` on val.
    wall_s: float


@dataclass
class TrialRunner:
    """Runs trial recipes on one data folder, reusing what trials can share.

    Shared across trials: the scanned and split folder (per split seed and fraction), each backbone (its pretrained
    weights restored before every trial, as building it again costs seconds), and the feature cache, so trials
    that freeze the same prefix compute its outputs once.
    """

    data_dir: str
    verbose: int | None = None
    unlabeled: str | None = None  # Unlabelled images, for recipes with `pretrain.autoencoder`.
    folders: dict[tuple, Any] = field(default_factory=dict)
    backbones: dict[tuple, tuple[keras.Model, list[np.ndarray]]] = field(default_factory=dict)

    def folder(self, recipe: Recipe):
        data = recipe.data
        key = (data.val_split, recipe.seed, data.exclude, data.split_by_duplicates, data.duplicate_similarity)
        if data.split_by_duplicates:  # Grouped on the trial's backbone (its pretrained weights).
            key += (recipe.backbone.name, recipe.backbone.weights, data.image_size)
        if key not in self.folders:
            self.folders[key] = recipe_folder(recipe, self.data_dir, progress=self.verbose != 0)
            _logger.info(self.folders[key].summary())
        return self.folders[key]

    def backbone(self, recipe: Recipe) -> keras.Model:
        """The recipe's backbone with its pretrained weights; an autoencoder recipe's encoder is new every time
        (its settings may be what the search varies)."""
        if recipe.pretrain is not None:
            return backbone_for(recipe)
        key = (recipe.backbone.name, recipe.backbone.weights, recipe.data.image_size)
        if key not in self.backbones:
            built = backbone_for(recipe)
            self.backbones[key] = (built, built.get_weights())
        backbone, pretrained = self.backbones[key]
        backbone.set_weights(pretrained)  # A previous trial may have fine-tuned it.
        return backbone

    def run(
        self,
        recipe: Recipe,
        executions: int,
        objective: str,
        hooks_for: Callable[[int], TrainingHooks] = lambda execution: TrainingHooks(),
    ) -> TrialResult:
        """Trains `recipe` `executions` times (seeds seed, seed+1, ...); the objective is their mean.

        Args:
            hooks_for: Given the execution's number, the hooks its session calls (e.g. `TrialHooks`).
        """
        started = time.perf_counter()
        folder = self.folder(recipe)
        # A trial scores the model as trained: a temperature fitted on the very split that ranks the trials would
        # bias a loss objective, and test-time augmentation scores are not what is ranked.
        plain = recipe.evaluation.model_copy(update={"calibrate": False, "tta": "none"})
        recipe = recipe.model_copy(update={"evaluation": plain})
        histories, finals, evaluation = [], [], None
        stage_scores: dict[str, list[float]] = {}
        for execution in range(executions):
            options = SessionOptions(
                seed=recipe.seed + execution,
                verbose=self.verbose,
                unlabeled=self.unlabeled,
                progress=False,
                final_parts=("val",),
            )
            session = TrainingSession(recipe, options, backbones=self.backbone)
            session.check_points()
            result = session.load_data(folder).run(hooks_for(execution))
            histories.append(result.history.assign(execution=execution))
            evaluation = result.evaluations["val"]
            finals.append({f"val_{k}": v for k, v in evaluation.metrics.items()})
            for name, scores in result.stage_evaluations.items():
                stage_scores.setdefault(f"{name}_val_accuracy", []).append(scores.metrics["accuracy"])
        metrics = pd.DataFrame(finals).mean().to_dict()
        metrics.update({key: float(np.mean(v)) for key, v in stage_scores.items()})
        if executions > 1:
            metrics[f"{objective}_std"] = float(pd.DataFrame(finals)[objective].std())
        return TrialResult(
            metrics[objective],
            metrics,
            pd.concat(histories, ignore_index=True),
            evaluation,
            time.perf_counter() - started,
        )
