"""One training session: a recipe on one image folder, from the backbone to the trained, scored classifier.

`TrainingSession` owns everything one training needs: the recipe, the data, the backbone, the classifier, its
batches and feature cache, the autoencoder of a pretraining recipe, and the distribution scope that wraps model and
optimizer creation. It runs the recipe's stage plan (pretraining first when the recipe has it, then the classifier
stages) in one loop, checkpointing after every epoch and stage, and calls `TrainingHooks` around it. `tltoolkit run`
and every search trial use it; nothing else loops over stages.

Example:
    >>> from tltoolkit.recipe import Recipe
    >>> recipe = Recipe.model_validate({"backbone": {"name": "test_tiny", "weights": "none"}, "stages": [
    ...     {"name": "head", "epochs": 2}, {"name": "finetune", "unfreeze": "all", "epochs": 1}]})
    >>> [(stage.name, stage.kind, stage.epoch_offset) for stage in plan_stages(recipe)]
    [('head', 'classifier', 0), ('finetune', 'classifier', 2)]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import keras
import pandas as pd

from tltoolkit.backbones import create_backbone
from tltoolkit.backbones.encoder import architecture_of, build_encoder
from tltoolkit.data import ImageFolder
from tltoolkit.model import check_points
from tltoolkit.model.calibration import Calibration, calibrate, rescored
from tltoolkit.model.inference import predict_batches
from tltoolkit.model.metrics import Evaluation, evaluate_items
from tltoolkit.recipe import Recipe, StageConfig
from tltoolkit.stages.callbacks import HookEpochs, StageRun
from tltoolkit.stages.checkpoint import (
    Checkpoint,
    CheckpointStore,
    StageResume,
    TrainingState,
    restore_variables,
    variable_values,
)
from tltoolkit.stages.devices import describe as describe_runtime
from tltoolkit.stages.devices import distribution_for, precision_policy, runtime_scope
from tltoolkit.stages.hooks import TrainingHooks
from tltoolkit.stages.pretrain import PRETRAIN_STREAM, Pretraining, fit_autoencoder, prepare_pretraining
from tltoolkit.stages.probe import ProbeResult, probe_backbone, resolve_auto
from tltoolkit.stages.runner import ClassifierOutcome, fit_stage
from tltoolkit.stages.training import Training, prepare_training

PRETRAIN, CLASSIFIER = "pretrain", "classifier"
_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedStage:
    """One entry of a session's stage plan."""

    index: int  # Position in the plan: what checkpoints and tracking call the stage.
    name: str  # "pretrain", or the recipe stage's name.
    kind: str  # PRETRAIN (the autoencoder) or CLASSIFIER (a recipe stage).
    stream: int  # The epoch stream its batches come from (a recipe stage's index; PRETRAIN_STREAM).
    epoch_offset: int = 0  # Classifier epochs in the stages before it.
    config: StageConfig | None = None  # The recipe's stage (classifier stages).


def plan_stages(recipe: Recipe) -> list[PlannedStage]:
    """The stages a session runs: autoencoder pretraining (unless `joint`), then the recipe's stages in order."""
    plan = []
    if recipe.pretrain is not None and not recipe.pretrain.autoencoder.joint:
        plan.append(PlannedStage(0, "pretrain", PRETRAIN, PRETRAIN_STREAM))
    offset = 0
    for number, stage in enumerate(recipe.stages):
        plan.append(PlannedStage(len(plan), stage.name, CLASSIFIER, number, offset, stage))
        offset += stage.epochs
    return plan


@dataclass
class StageOutcome:
    """What a finished stage gives its hooks."""

    stage: PlannedStage
    history: pd.DataFrame  # One row per epoch: epoch, loss, val_loss, learning_rate, accuracy...
    wall_s: float  # Fitting time (not scoring).
    fit: ClassifierOutcome | None = None  # Classifier stages: what trained, early stopping, the feature cache.
    evaluation: Evaluation | None = None  # Classifier stages: the trained model's scores on the validation part.


@dataclass
class SessionResult:
    """A finished session: every classifier epoch, and the final model's scores."""

    history: pd.DataFrame  # Every epoch of every classifier stage (column `stage`).
    evaluations: dict[str, Evaluation]  # Part ("val", "test") -> the final model's scores.
    stage_runs: dict[str, str]  # Stage name -> the id its hooks kept (an MLflow run id).
    state: TrainingState
    stage_evaluations: dict[str, Evaluation] = field(default_factory=dict)  # Classifier stages run in this process.
    calibration: Calibration | None = None  # The temperature fitted on val after the last stage (`evaluations` use it).
    tta: dict[str, Evaluation] = field(default_factory=dict)  # Part -> scores with test-time augmentation.

    @property
    def metrics(self) -> dict[str, float]:
        """`<part>_<metric>`, e.g. `val_accuracy`, `test_loss`; `<part>_tta_<metric>` with test-time augmentation;
        `val_ece_uncalibrated` and `temperature` when calibrated."""
        scores = {
            f"{part}_{k}": v for part, evaluation in self.evaluations.items() for k, v in evaluation.metrics.items()
        }
        scores.update(
            {f"{part}_tta_{k}": v for part, evaluation in self.tta.items() for k, v in evaluation.metrics.items()}
        )
        if self.calibration is not None:
            scores.update(
                {"val_ece_uncalibrated": self.calibration.ece_before, "temperature": self.calibration.temperature}
            )
        return scores


@dataclass
class SessionOptions:
    """How a session runs, besides the recipe.

    Args:
        seed: Initialisation, shuffling and augmentation seed. Defaults to the recipe's `seed`.
        verbose: Keras fit verbosity (None: a progress bar on a terminal, a line per epoch elsewhere).
        unlabeled: Unlabelled images for a recipe's `pretrain.autoencoder`. Defaults to its `data.unlabeled`.
        progress: Show the unlabelled folder's scan progress.
        final_parts: The parts the final model is scored on. Defaults to every part but `train`.
        distribution: A `tf.distribute.Strategy`: models and optimizers are created in its scope. Defaults to the
            recipe's `runtime` (see `tltoolkit.stages.devices`).
    """

    seed: int | None = None
    verbose: int | None = None
    unlabeled: str | Path | None = None
    progress: bool = True
    final_parts: tuple[str, ...] | None = None
    distribution: object = None


def backbone_for(recipe: Recipe) -> keras.Model:
    """The recipe's backbone: its registered `backbone`, or the encoder of its `pretrain.autoencoder`."""
    if recipe.pretrain is not None:
        return build_encoder(architecture_of(recipe.pretrain.autoencoder), recipe.data.image_size)
    return create_backbone(recipe.backbone.name, recipe.backbone.weights, input_size=recipe.data.image_size)


class TrainingSession:
    """One training of `recipe`: build with the backbone, `load_data`, then `run`.

    Args:
        recipe: A validated `Recipe`.
        options: See `SessionOptions`.
        backbones: Builds the recipe's backbone (a search passes one that reuses backbones across trials).
    """

    def __init__(
        self,
        recipe: Recipe,
        options: SessionOptions | None = None,
        backbones: Callable[[Recipe], keras.Model] = backbone_for,
    ):
        self.recipe, self.options = recipe, options or SessionOptions()
        self.seed = recipe.seed if self.options.seed is None else self.options.seed
        self.plan = plan_stages(recipe)
        self.folder: ImageFolder | None = None
        self.pretraining: Pretraining | None = None
        self.training: Training | None = None
        self.probe: ProbeResult | None = None  # With `auto` freeze points: the probe that resolved them.
        self._stage_evals: dict[str, Evaluation] = {}
        self.distribution = self.options.distribution or distribution_for(recipe.runtime)
        self.precision = precision_policy(recipe.runtime)
        level = logging.DEBUG if self.distribution is None and self.precision == "float32" else logging.INFO
        _logger.log(level, "Training on %s.", describe_runtime(self.distribution, self.precision))
        keras.utils.set_random_seed(self.seed)
        with self.scope():
            self.backbone = backbones(recipe)

    def scope(self):
        """The distribution strategy's scope (if any) and the dtype policy: models and optimizers are created, and
        stages fit, inside it."""
        return runtime_scope(self.distribution, self.precision)

    def check_points(self, where: Callable[[str], str] | None = None) -> None:
        """Every freeze and unfreeze point exists in the backbone (before any image is read); `where` locates a
        field in the user's file for the message."""
        taps = [head.at for head in self.recipe.head.auxiliary]
        check_points(self.backbone, self.recipe.backbone.freeze, self.recipe.stages, where or (lambda field: ""), taps)

    def load_data(self, folder: ImageFolder) -> TrainingSession:
        """Builds the classifier (and autoencoder) and the pipelines on `folder`, from `prepare_data`."""
        self.folder, unlabeled = folder, self.options.unlabeled or self.recipe.data.unlabeled
        if self.recipe.uses_auto:
            self.probe = probe_backbone(self.backbone, folder.parts, self.recipe.data, self.options.progress)
            self.recipe = resolve_auto(self.recipe, self.probe)
            self.plan = plan_stages(self.recipe)
            _logger.info("Probe: %s. %s", self.probe.suggestion, self.probe.evidence)
        with self.scope():
            if self.recipe.pretrain is not None:
                self.pretraining = prepare_pretraining(
                    self.recipe, self.backbone, folder.parts["train"], unlabeled, self.seed, self.options.progress
                )
            self.training = prepare_training(
                self.recipe, folder, self.backbone, self.seed, self.pretraining, self.options.progress
            )
        return self

    def run(
        self,
        hooks: TrainingHooks | None = None,
        checkpoints: CheckpointStore | None = None,
        state: TrainingState | None = None,
        resume: Checkpoint | None = None,
    ) -> SessionResult:
        """Runs the stage plan, or what is left of it after `resume`, and scores the final model.

        Args:
            hooks: Told of every stage, epoch and the end (tracking). Defaults to none.
            checkpoints: Where a checkpoint goes after every epoch and stage. Defaults to none.
            state: The state to start from (its `key` and `data` identify the command). Defaults to an empty one.
            resume: A checkpoint to continue from: its variables are restored and the plan continues at its stage.
        """
        hooks = hooks or TrainingHooks()
        state = resume.state if resume is not None else state or TrainingState(key="", data="")
        try:
            if resume is not None:
                self._restore(resume)
            for stage in self.plan[state.stage :]:
                state = self._run_stage(stage, state, hooks, checkpoints, self._stage_resume(stage, resume))
            result = self._finish(state)
            hooks.on_session_end(self, result)
        except BaseException as error:
            hooks.on_session_failed(self, error)
            raise
        return result

    def _restore(self, checkpoint: Checkpoint) -> None:
        """The checkpoint's variables: the autoencoder's mid-pretraining, else the classifier's."""
        state = checkpoint.state
        stage = self.plan[state.stage] if state.stage < len(self.plan) else None
        in_pretrain = stage is not None and stage.kind == PRETRAIN and state.epoch >= 0
        target = self.pretraining.autoencoder.trainer if in_pretrain else self.training.checkpoint_model
        restore_variables(target.variables, checkpoint.arrays["model"], "model", checkpoint.path)

    def _stage_resume(self, stage: PlannedStage, resume: Checkpoint | None) -> StageResume | None:
        if resume is None or stage.index != resume.state.stage or resume.state.epoch < 0:
            return None
        saved = resume.state
        return StageResume(
            saved.epoch + 1,
            saved.rows,
            resume.arrays.get("optimizer", []),
            saved.stopper,
            resume.arrays.get("best"),
            saved.stopped,
            resume.path,
        )

    def _run_stage(
        self,
        stage: PlannedStage,
        state: TrainingState,
        hooks: TrainingHooks,
        checkpoints: CheckpointStore | None,
        resume: StageResume | None,
    ) -> TrainingState:
        """One stage between its hooks; returns the state after it (checkpointed)."""
        run_id = hooks.on_stage_begin(self, stage, state.stage_runs.get(str(stage.index)), resume)
        if run_id is not None:
            state = replace(state, stage_runs={**state.stage_runs, str(stage.index): run_id})
        run = StageRun(
            stage.config,
            stage.stream,
            stage.epoch_offset,
            resume,
            checkpoints,
            replace(state, stage=stage.index),
            [HookEpochs(hooks, stage)],
            self.options.verbose,
        )
        with self.scope():
            outcome = self._fit_pretrain(stage, run) if stage.kind == PRETRAIN else self._fit_classifier(stage, run)
        hooks.on_stage_end(self, stage, outcome)
        rows = outcome.history.drop(columns="stage", errors="ignore").to_dict("records")  # The plan names the stage.
        state = state.at_stage(stage.index + 1, histories=[*state.histories, rows])
        if checkpoints is not None:
            checkpoints.save(state, {"model": variable_values(self.training.checkpoint_model.variables)})
        return state

    def _fit_pretrain(self, stage: PlannedStage, run: StageRun) -> StageOutcome:
        started = time.perf_counter()
        history = fit_autoencoder(self.pretraining, self.recipe.pretrain.autoencoder, self.recipe.data, self.seed, run)
        return StageOutcome(stage, history, time.perf_counter() - started)

    def _fit_classifier(self, stage: PlannedStage, run: StageRun) -> StageOutcome:
        started = time.perf_counter()
        fit = fit_stage(self.training, run)
        wall = time.perf_counter() - started
        val = self.folder.parts["val"]
        probabilities = fit.predict_val(len(val), self.recipe.data.batch_size)
        evaluation = evaluate_items(val, probabilities, self.folder.class_names)
        self._stage_evals[stage.name] = evaluation
        return StageOutcome(stage, fit.history.assign(stage=stage.name), wall, fit, evaluation)

    def _finish(self, state: TrainingState) -> SessionResult:
        """Every classifier epoch in one table, and the final model scored on each part."""
        history = pd.concat(
            [
                pd.DataFrame(rows).assign(stage=self.plan[i].name)
                for i, rows in enumerate(state.histories)
                if self.plan[i].kind == CLASSIFIER
            ],
            ignore_index=True,
        )
        evaluations = {}
        for part, batches in self.training.eval.items():
            if self.options.final_parts is not None and part not in self.options.final_parts:
                continue
            last = self._stage_evals.get(self.plan[-1].name)
            if part == "val" and last is not None:
                evaluations[part] = last  # The last stage already scored these very weights on val.
            else:
                count, size = len(self.folder.parts[part]), self.recipe.data.batch_size
                probabilities = predict_batches(self.training.model, batches, count, size, verbose=0)
                evaluations[part] = evaluate_items(self.folder.parts[part], probabilities, self.folder.class_names)
        stage_runs = {self.plan[int(i)].name: run_id for i, run_id in state.stage_runs.items()}
        calibration = self._calibrate(evaluations)
        tta = self._tta(evaluations)
        return SessionResult(history, evaluations, stage_runs, state, dict(self._stage_evals), calibration, tta)

    def _calibrate(self, evaluations: dict[str, Evaluation]) -> Calibration | None:
        """Fits the model's temperature on val (recipe `evaluation.calibrate`) and rescores every part with it."""
        if not self.recipe.evaluation.calibrate or "val" not in evaluations:
            return None
        names = self.folder.class_names
        calibration = calibrate(self.training.model, evaluations["val"])
        if calibration is not None:
            for part, evaluation in evaluations.items():
                evaluations[part] = rescored(evaluation, calibration.temperature, names)
        return calibration

    def _tta(self, evaluations: dict[str, Evaluation]) -> dict[str, Evaluation]:
        """The final model scored with the recipe's test-time augmentation (`evaluation.tta`), part by part."""
        mode = self.recipe.evaluation.tta
        if mode == "none":
            return {}
        from tltoolkit.model.tta import predict_tta

        return {
            part: evaluate_items(
                self.folder.parts[part],
                predict_tta(self.training.model, self.training.eval[part], mode),
                self.folder.class_names,
            )
            for part in evaluations
        }
