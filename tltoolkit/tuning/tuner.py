"""keras-tuner over recipes: the oracle a recipe names, and a tuner whose trials run the recipe's stages.

keras-tuner owns the search: the oracle proposes values, records results, saves its state after every trial
(`<directory>/<name>/oracle.json`, `trial_*/trial.json`) and, on reload, sends the trial that was running when the
process died back for one more run. A trial here is not one `model.fit`: `TrialRunner` resolves the trial's
recipe and runs all its stages (head, then fine-tune) through the same machinery as `tltoolkit run`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import keras
import keras_tuner as kt
import numpy as np
import pandas as pd

from tltoolkit.recipe import Recipe
from tltoolkit.recipe.space import trial_recipe
from tltoolkit.tuning.space import TUNER_PREFIX, declare, recipe_values

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
    stages = [stage.model_copy(update={"epochs": max(1, round(stage.epochs * budget / full))}) for stage in resolved.stages]
    return resolved.model_copy(update={"stages": stages})


class RecipeTuner(kt.engine.base_tuner.BaseTuner):
    """A keras-tuner tuner whose `run_trial` hands the trial to `runner` and returns its objective."""

    def __init__(self, recipe: Recipe, runner: Callable[[kt.engine.trial.Trial], dict[str, float]], **kwargs):
        super().__init__(build_oracle(recipe), hypermodel=RecipeHyperModel(recipe), **kwargs)
        self.runner = runner

    def run_trial(self, trial, *args, **kwargs) -> dict[str, float]:
        return self.runner(trial)


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
        from tltoolkit.data import prepare_data

        key = (recipe.data.val_split, recipe.seed)
        if key not in self.folders:
            self.folders[key] = prepare_data(self.data_dir, recipe.data.val_split, recipe.seed)
            print(self.folders[key].summary())
        return self.folders[key]

    def backbone(self, recipe: Recipe) -> keras.Model:
        from tltoolkit.backbones import create_backbone

        key = (recipe.backbone.name, recipe.backbone.weights, recipe.data.image_size)
        if key not in self.backbones:
            built = create_backbone(recipe.backbone.name, recipe.backbone.weights, input_size=recipe.data.image_size)
            self.backbones[key] = (built, built.get_weights())
        backbone, pretrained = self.backbones[key]
        backbone.set_weights(pretrained)  # A previous trial may have fine-tuned it.
        return backbone

    def _pretrain(self, recipe: Recipe, folder, seed: int, callbacks: list):
        """A trial's encoder: built from its `pretrain.autoencoder`, pretrained (unless `joint`) as `run` does."""
        from tltoolkit.backbones.encoder import architecture_of, build_encoder
        from tltoolkit.stages.pretrain import fit_autoencoder, prepare_pretraining

        config = recipe.pretrain.autoencoder
        encoder = build_encoder(architecture_of(config), recipe.data.image_size)
        pretraining = prepare_pretraining(recipe, encoder, folder.parts["train"], self.unlabeled, seed, progress=False)
        if not config.joint:
            fit_autoencoder(pretraining.autoencoder, config, recipe.data, pretraining.train, pretraining.val, seed,
                            callbacks, self.verbose)  # fmt: skip
        return encoder, pretraining.autoencoder, pretraining.train

    def run(self, recipe: Recipe, executions: int, objective: str, callbacks_for: Callable[[str], list]) -> TrialResult:
        """Trains `recipe`'s stages `executions` times (seeds seed, seed+1, ...); the objective is their mean.

        Args:
            callbacks_for: Given a metric prefix (`"head/"`, or `"e1/head/"` for later executions), the Keras
                callbacks that log that stage's epochs.
        """
        from tltoolkit.model import check_points
        from tltoolkit.model.metrics import evaluate_items
        from tltoolkit.stages import fit_stage, prepare_training

        started = time.perf_counter()
        folder = self.folder(recipe)
        histories, finals, evaluation = [], [], None
        stage_scores: dict[str, list[float]] = {}
        for execution in range(executions):
            seed = recipe.seed + execution
            keras.utils.set_random_seed(seed)
            autoencoder, ae_images = None, None
            if recipe.pretrain is None:
                backbone = self.backbone(recipe)
            else:  # Every trial trains its own autoencoder: its settings may be what the search varies.
                backbone, autoencoder, ae_images = self._pretrain(recipe, folder, seed, callbacks_for(
                    (f"e{execution}/" if execution else "") + "pretrain/"))  # fmt: skip
            check_points(backbone, recipe.backbone.freeze, recipe.stages)
            training = prepare_training(recipe, folder, backbone, seed, autoencoder, ae_images)
            for index, stage in enumerate(recipe.stages):
                prefix = (f"e{execution}/" if execution else "") + f"{stage.name}/"
                outcome = fit_stage(
                    training.model, backbone, recipe, stage, training.train, training.eval["val"],
                    training.class_weight, callbacks_for(prefix), self.verbose, training.features, stream=index,
                    joint=training.joint, epoch_offset=sum(s.epochs for s in recipe.stages[:index]),
                )  # fmt: skip
                histories.append(outcome.history.assign(stage=stage.name, execution=execution))
                evaluation = evaluate_items(folder.parts["val"], outcome.predict_val(), folder.class_names)
                stage_scores.setdefault(f"{stage.name}_val_accuracy", []).append(evaluation.metrics["accuracy"])
            finals.append({f"val_{k}": v for k, v in evaluation.metrics.items()})
        metrics = pd.DataFrame(finals).mean().to_dict()
        metrics.update({key: float(np.mean(v)) for key, v in stage_scores.items()})
        if executions > 1:
            metrics[f"{objective}_std"] = float(pd.DataFrame(finals)[objective].std())
        return TrialResult(metrics[objective], metrics, pd.concat(histories, ignore_index=True), evaluation,
                           time.perf_counter() - started)  # fmt: skip
