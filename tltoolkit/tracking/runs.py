"""A `tltoolkit run` in MLflow: a parent run, a child run per stage, every epoch, the reports and the final model.

`RunTracker` is the session's `TrainingHooks` for `run`: it opens (or, resuming, reopens) the parent run, makes or
reopens each stage's child run, logs every epoch once, the stage's reports when it ends, and at the end the curves,
evaluations, encoder and model on the parent. When the session fails it marks the runs KILLED (Ctrl-C, SIGTERM) or
FAILED, so the MLflow UI never shows a dead run as running.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric, Param

from tltoolkit.backbones.encoder import architecture_of, save_encoder
from tltoolkit.errors import ResumeError
from tltoolkit.recipe import Recipe, dump_recipe, with_data
from tltoolkit.recipe.schema import flatten
from tltoolkit.stages.checkpoint import Checkpoint, CheckpointStore
from tltoolkit.stages.hooks import TrainingHooks
from tltoolkit.stages.pretrain import autoencoder_data, reconstruction_errors, samples
from tltoolkit.stages.session import CLASSIFIER, PRETRAIN, PlannedStage, SessionResult, StageOutcome, TrainingSession
from tltoolkit.stages.training import cache_params
from tltoolkit.tracking.models import MODEL_TAG, log_classifier, model_name_for
from tltoolkit.tracking.outage import EpochSender, PatientClient, unreachable
from tltoolkit.tracking.plots import error_histogram, reconstruction_figure
from tltoolkit.tracking.processes import PROCESS_TAG, is_alive, lease_timeout_s, live_lease, process_tag
from tltoolkit.tracking.reports import (
    log_calibration,
    log_curves,
    log_data_report,
    log_evaluation,
    log_interpretation,
    log_probe,
    log_skipped_files,
)
from tltoolkit.tracking.store import checkpoint_root

_logger = logging.getLogger(__name__)


# What the parent run logs per epoch, at the global step: the whole training as one curve in the MLflow UI.
_FINAL_TAG = "tltoolkit.final_scores"
CURVE_KEYS = ("loss", "val_loss", "accuracy", "val_accuracy", "learning_rate")


def global_step(stage: PlannedStage, epoch: int) -> int:
    """An epoch's step in MLflow: counted across the classifier stages (pretraining counts its own epochs)."""
    return stage.epoch_offset + epoch


def backbone_label(recipe: Recipe) -> str:
    """The backbone as runs are tagged: its name, or the autoencoder's encoder."""
    if recipe.pretrain is None:
        return recipe.backbone.name
    return f"autoencoder ({recipe.pretrain.autoencoder.encoder} encoder)"


class RunTracker(TrainingHooks):
    """Tracks one `tltoolkit run` session in MLflow.

    Args:
        client: On the tracking store.
        experiment_id: Where the runs go.
        session: The session, data loaded (its recipe, folder and models are what is logged).
        key: The command's resume key, tagged on the parent so `--resume` finds it.
        parent_id: The parent run to continue (resuming); a new one is started otherwise.
        overrides: The command's `--set` flags: a new run's name carries them, so runs that differ look different.
    """

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        session: TrainingSession,
        key: str,
        parent_id: str | None = None,
        overrides: tuple[str, ...] = (),
    ):
        # Calls outside the epochs wait for a store that blinks; epochs are queued (`EpochSender`).
        self.client, self.experiment_id, self.session = (
            PatientClient(client, client.tracking_uri),
            experiment_id,
            session,
        )
        self.recipe, self.folder, self.key = session.recipe, session.folder, key
        self.parent_id, self.child_id = parent_id, None
        self.resumed = parent_id is not None
        self.sender = EpochSender(
            lambda run_id, metrics: client.log_batch(run_id, metrics=metrics), client.tracking_uri
        )
        dataset = self.folder.root.resolve().name
        self.tags = {
            "tltoolkit.recipe": self.recipe.name or "recipe",
            "tltoolkit.backbone": backbone_label(self.recipe),
            "tltoolkit.weights": "autoencoder" if self.recipe.pretrain else self.recipe.backbone.weights,
            "tltoolkit.dataset": dataset,
            PROCESS_TAG: process_tag(),
            **self.recipe.tracking.tags,
        }
        label = backbone_label(self.recipe).split(" ")[0]
        self.run_name = self.recipe.tracking.run_name or f"{self.recipe.name or 'recipe'}-{label}-{dataset}"
        if overrides:
            self.run_name = f"{self.run_name} [{' '.join(overrides)}]"[:200]
        self.model_uri: str | None = None
        unlabeled = session.pretraining.unlabeled_dir if session.pretraining is not None else None
        self.saved_recipe = dump_recipe(with_data(self.recipe, self.folder.root, unlabeled))  # Runs on its own.

    def start(self) -> str:
        """Starts the parent run (logging the recipe, data report and manifest once) or reopens it; its id."""
        resumed = self.parent_id is not None
        if resumed:
            self.run_name = self.client.get_run(self.parent_id).info.run_name
        else:
            self.run_name = self._unique(self.run_name)
        tags = {
            **self.tags,
            "tltoolkit.kind": "run",
            "tltoolkit.data_dir": str(self.folder.root.resolve()),
            "tltoolkit.resume_key": self.key,
        }
        parent = mlflow.start_run(
            run_id=self.parent_id,
            experiment_id=self.experiment_id,
            run_name=None if resumed else self.run_name,
            tags=tags,
        )
        self.parent_id = parent.info.run_id
        if not resumed:
            self._log_inputs()
            self.client.set_tag(self.parent_id, "mlflow.note.content", self._description())
        else:  # What a resume may change (learning rates) is logged beside what the run started with.
            self._log_params(self.parent_id, self.recipe.flat())
        return self.parent_id

    def _unique(self, name: str) -> str:
        """`name`, or `name #N` when the experiment has runs of that name already (the N-th of them)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string="tags.`tltoolkit.kind` = 'run'", max_results=5000
        )
        taken = {run.info.run_name for run in runs}
        if name not in taken:
            return name
        return next(f"{name} #{n}" for n in range(2, len(taken) + 3) if f"{name} #{n}" not in taken)

    def _description(self, result: SessionResult | None = None) -> str:
        """The run in one paragraph (its MLflow description): recipe, backbone, data, stages and, at the end, scores."""
        recipe, folder = self.recipe, self.folder
        counts = " / ".join(f"{len(items)} {part}" for part, items in folder.parts.items())
        stages = ", ".join(f"{s.name} ({s.epochs} epochs)" for s in recipe.stages)
        text = (
            f"Recipe {recipe.name or 'recipe'!r}: {backbone_label(recipe)} (weights {self.tags['tltoolkit.weights']}) "
            f"at {recipe.data.image_size} px on {folder.root.resolve()} ({folder.num_classes} classes; {counts} "
            f"images); stages {stages}."
        )
        if result is not None:
            scores = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k.endswith("accuracy"))
            text += f" Final model: {scores}."
        return text

    def tag_checkpoints(self, folder: Path | None) -> None:
        """Tags where the run's checkpoints are, or (`None`, once they are removed) drops the tag."""
        if folder is not None:
            self.client.set_tag(self.parent_id, "tltoolkit.checkpoints", str(folder))
        elif "tltoolkit.checkpoints" in self.client.get_run(self.parent_id).data.tags:
            self.client.delete_tag(self.parent_id, "tltoolkit.checkpoints")

    def _log_inputs(self) -> None:
        """What a new run logs once: the flattened recipe, image counts, the resolved recipe and the data report."""
        folder, recipe = self.folder, self.recipe
        counts = {"data.classes": folder.num_classes, **{f"data.{p}_images": len(i) for p, i in folder.parts.items()}}
        caches = cache_params(self.session.training) if self.session.training is not None else {}
        counts.update({f"data.{k}": v for k, v in (folder.duplicates or {}).items()})
        counts["data.skipped_files"] = len(folder.skipped)
        self._log_params(self.parent_id, {**recipe.flat(), **counts, **caches})
        self.client.log_text(self.parent_id, self.saved_recipe, "recipe.yaml")
        log_data_report(self.client, self.parent_id, folder)
        if self.session.probe is not None:  # `auto` freeze points: the measurement that set them.
            log_probe(self.client, self.parent_id, self.session.probe, f"{self.run_name}: probe")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MLflow's hints about inferring the manifest's schema.
            name = folder.root.resolve().name
            manifest = mlflow.data.from_pandas(folder.manifest(), source=str(folder.root.resolve()), name=name)
            mlflow.log_input(manifest, context="training")

    def _log_params(self, run_id: str, params: dict) -> None:
        """Logs `params`; one a resumed run logged before with another value (a learning rate changed to resume after
        the loss diverged) is kept, and the new value logged as `resumed.<name>` (MLflow params never change)."""
        values = {k: str(v)[:6000] for k, v in params.items()}
        if self.resumed:
            logged = self.client.get_run(run_id).data.params
            for key in [k for k, v in values.items() if k in logged and logged[k] != v]:
                value = values.pop(key)
                name = next(
                    f"resumed{n or ''}.{key}"
                    for n in range(100)
                    if logged.get(f"resumed{n or ''}.{key}") in (None, value)
                )
                values[name] = value
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in values.items()])

    # --- Stages ---

    def on_stage_begin(self, session, stage: PlannedStage, run_id, resume):
        """Makes the stage's child run, or reopens the one it had before a kill (and logs the epochs it missed)."""
        run_id = run_id or self._earlier_child(stage.index)
        if run_id is None:
            tags = {
                **self.tags,
                "mlflow.parentRunId": self.parent_id,
                "tltoolkit.kind": "stage",
                "tltoolkit.stage": stage.name,
                "tltoolkit.stage_index": str(stage.index),
            }
            name = f"{self.run_name} / {stage.name}"
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.child_id = run_id
        if resume is not None:
            self._log_missing_epochs(stage, resume.rows)
        if stage.kind == CLASSIFIER:  # Logged again on resume: the same values, in case the kill came before.
            prefix = f"stages.{stage.stream}."
            self._log_params(
                run_id, {k.removeprefix(prefix): v for k, v in self.recipe.flat().items() if k.startswith(prefix)}
            )
        else:
            self._log_pretrain_params(run_id)
        return run_id

    def _earlier_child(self, index: int) -> str | None:
        """A child run made for this stage just before a kill, before the checkpoint could name it."""
        earlier = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' "
            f"and tags.`tltoolkit.stage_index` = '{index}'",
        )
        return earlier[0].info.run_id if earlier else None

    def _log_missing_epochs(self, stage: PlannedStage, rows: list[dict]) -> None:
        """Epochs the checkpoint holds whose metrics did not reach MLflow before the kill (it is written first)."""
        logged = {
            run_id: {m.step for m in self.client.get_metric_history(run_id, "loss")}
            for run_id in (self.child_id, self.parent_id)
        }
        for row in rows:
            epoch, logs = int(row["epoch"]), {k: float(v) for k, v in row.items() if k != "epoch"}
            missing = {run_id for run_id, steps in logged.items() if global_step(stage, epoch) not in steps}
            self._log_epoch(stage, epoch, logs, missing)

    def on_epoch_end(self, stage, epoch, logs):
        self._log_epoch(stage, epoch, logs, {self.child_id, self.parent_id})

    def _log_epoch(self, stage: PlannedStage, epoch: int, logs: dict[str, float], runs: set[str]) -> None:
        """The epoch on the stage's run and, for classifier stages, the curve keys on the parent too, both at the
        global step (the head's epochs, then fine-tune's after them), so the parent's chart is the whole training."""
        now, step = int(time.time() * 1000), global_step(stage, epoch)
        if self.child_id in runs:
            self.sender.add(self.child_id, [Metric(k, v, now, step) for k, v in sorted(logs.items())])
        if stage.kind == CLASSIFIER and self.parent_id in runs:
            self.sender.add(self.parent_id, [Metric(k, logs[k], now, step) for k in CURVE_KEYS if k in logs])
        self.sender.flush()  # A store that does not answer keeps them for later (see `EpochSender`).

    def on_stage_end(self, session, stage: PlannedStage, outcome: StageOutcome):
        self.sender.flush(wait=True)
        if stage.kind == PRETRAIN:
            self._end_pretrain(outcome)
        else:
            self._end_classifier(outcome)
        self.client.set_terminated(self.child_id, "FINISHED")
        self.child_id = None

    def _end_classifier(self, outcome: StageOutcome) -> None:
        fit, run_id, name = outcome.fit, self.child_id, outcome.stage.name
        self._log_params(
            run_id,
            {
                "frozen_layers": fit.trainable.frozen_layers,
                "trainable_backbone_layers": fit.trainable.trainable_layers,
                "trainable_params": fit.trainable.trainable_params,
                "feature_cache": fit.cached_above or "off",
                "input_path": fit.input_path,
            },
        )
        summary = {"wall_s": outcome.wall_s, "epochs_run": len(fit.history)}
        if fit.best_epoch is not None:
            summary["best_epoch"] = fit.best_epoch
        if fit.train_images_per_s is not None:
            summary["train_images_per_s"] = fit.train_images_per_s
        if fit.feature_extraction_s is not None:
            summary["feature_extraction_s"] = fit.feature_extraction_s
        self._log_metrics(run_id, summary)
        log_curves(self.client, run_id, outcome.history, f"{self.run_name} / {name}", "curves.png")
        log_evaluation(self.client, run_id, outcome.evaluation, self.folder.class_names, "final_val")
        if f"{name}_val_accuracy" not in self.client.get_run(self.parent_id).data.metrics:
            self._log_metrics(self.parent_id, {f"{name}_val_accuracy": outcome.evaluation.metrics["accuracy"]})
        _logger.info(
            "Stage %r done in %.0fs: val accuracy %.4f", name, outcome.wall_s, outcome.evaluation.metrics["accuracy"]
        )

    def _log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def _log_pretrain_params(self, run_id: str) -> None:
        pretraining, config = self.session.pretraining, self.recipe.pretrain.autoencoder
        self._log_params(
            run_id,
            {
                **flatten(config.model_dump(mode="json")),
                "unlabeled_dir": pretraining.unlabeled_dir,
                "train_images": len(pretraining.train),
                "val_images": len(pretraining.val),
            },
        )
        log_skipped_files(self.client, run_id, pretraining.skipped)

    def _end_pretrain(self, outcome: StageOutcome) -> None:
        """The autoencoder's curves, reconstructions, error histogram, anomaly threshold, encoder and snapshot."""
        pretraining, config, run_id = self.session.pretraining, self.recipe.pretrain.autoencoder, self.child_id
        ae, data, title = (
            pretraining.autoencoder,
            autoencoder_data(config, self.recipe.data),
            f"{self.run_name} / pretrain",
        )
        val_error = float(reconstruction_errors(ae.scorer, pretraining.val, data, config.loss).mean())
        errors = reconstruction_errors(ae.scorer, pretraining.train, data, config.loss)
        threshold = float(np.percentile(errors, config.anomaly_percentile))
        self._log_metrics(
            run_id,
            {
                "wall_s": outcome.wall_s,
                "epochs_run": len(outcome.history),
                "anomaly_threshold": threshold,
                "train_reconstruction_error": float(errors.mean()),
                "val_reconstruction_error": val_error,
            },
        )
        log_curves(self.client, run_id, outcome.history.assign(stage="pretrain"), title, "curves.png")
        percentile = f"training images; threshold = {config.anomaly_percentile:g}th percentile"
        for figure, name in (
            (
                reconstruction_figure(*samples(ae, pretraining.val, data), title=f"{title}: held-out images"),
                "reconstructions.png",
            ),
            (error_histogram(errors, threshold, percentile), "reconstruction_errors.png"),
        ):
            self.client.log_figure(run_id, figure, name)
            plt.close(figure)
        with tempfile.TemporaryDirectory() as tmp:
            encoder = save_encoder(ae.encoder, Path(tmp) / "encoder", architecture_of(config))
            self.client.log_artifacts(run_id, str(encoder), "encoder")
            ae.scorer.save(Path(tmp) / "autoencoder.keras")  # A snapshot: fine-tuning will move the encoder on.
            self.client.log_artifact(run_id, str(Path(tmp) / "autoencoder.keras"), "autoencoder")
        _logger.info(
            "Stage 'pretrain' done: reconstruction %s %.5f on held-out images; anomaly threshold %.5f (%gth percentile "
            "of training images).",
            config.loss,
            val_error,
            threshold,
            config.anomaly_percentile,
        )

    # --- The end ---

    def on_session_end(self, session, result: SessionResult):
        """Curves and history of every stage, the final evaluations, the encoder, and the model, on the parent."""
        client, parent_id = self.client, self.parent_id
        log_curves(client, parent_id, result.history, self.run_name, "curves.png")
        client.log_text(parent_id, result.history.to_csv(index=False), "history.csv")
        history = result.history
        steps = [
            global_step(s, e)
            for s in session.plan
            if s.kind == CLASSIFIER
            for e in history.loc[history.stage == s.name, "epoch"]
        ]
        last = max(steps, default=0)  # The final scores sit at the last epoch's step: the run's latest values.
        # A run killed after logging its final scores (while logging the model, say) does not log them twice.
        if not (self.resumed and client.get_run(parent_id).data.tags.get(_FINAL_TAG) == "logged"):
            for part, evaluation in result.evaluations.items():
                log_evaluation(client, parent_id, evaluation, self.folder.class_names, part, step=int(last))
            for part, evaluation in result.tta.items():
                log_evaluation(client, parent_id, evaluation, self.folder.class_names, f"{part}_tta", step=int(last))
            if result.calibration is not None:
                log_calibration(client, parent_id, result.calibration, step=int(last))
            client.set_tag(parent_id, _FINAL_TAG, "logged")
        if self.recipe.evaluation.top_losses and "val" in result.evaluations:
            self._log_interpretation(result.evaluations["val"])
        client.set_tag(parent_id, "mlflow.note.content", self._description(result))
        anomaly = self._final_autoencoder(result) if self.session.pretraining is not None else None
        if self.recipe.tracking.log_model:
            if self.resumed:
                self._drop_unfinished_models()
            _logger.info("Logging the model to MLflow...")
            name = model_name_for(self.run_name)  # Says whose it is in the UI's model lists.
            client.set_tag(parent_id, MODEL_TAG, name)
            self.model_uri = log_classifier(
                self.session.training.model,
                self.folder.class_names,
                self.recipe.data.resize,
                self.saved_recipe,
                self.recipe.data.interpolation,
                anomaly,
                name,
            )
        mlflow.end_run()

    def _drop_unfinished_models(self) -> None:
        """Deletes models this run began to log but never finished (the process was killed while logging), so a
        resumed run leaves one model, not a PENDING orphan beside it."""
        found = self.client.search_logged_models(
            experiment_ids=[self.experiment_id], filter_string=f"source_run_id = '{self.parent_id}'"
        )
        for model in found:
            if model.status == LoggedModelStatus.PENDING:
                _logger.info("Deleting model %s, left unfinished when the run was stopped.", model.model_id)
                self.client.delete_logged_model(model.model_id)

    def _log_interpretation(self, val) -> None:
        """Most confused classes, top losses and Grad-CAM of the final model on the val split."""
        from tltoolkit.model.interpret import interpret

        paths = [path for path, _ in self.folder.parts["val"]]
        model, names = self.session.training.model, self.folder.class_names
        found = interpret(model, paths, val, names, self.recipe.data, self.recipe.evaluation.top_losses)
        log_interpretation(self.client, self.parent_id, found)

    def _final_autoencoder(self, result: SessionResult) -> dict:
        """Logs the final encoder to the parent run; returns the anomaly scorer and threshold to log with the model.

        After a separate pretraining, the scorer is the autoencoder as pretrained (a snapshot in the pretrain run: the
        fine-tuned encoder no longer matches its decoder); in `joint` mode it is the autoencoder as trained, calibrated
        now.
        """
        config, autoencoder = self.recipe.pretrain.autoencoder, self.session.pretraining.autoencoder
        with tempfile.TemporaryDirectory() as tmp:
            encoder = save_encoder(autoencoder.encoder, Path(tmp) / "encoder", architecture_of(config))
            self.client.log_artifacts(self.parent_id, str(encoder), "encoder")
        if PRETRAIN in result.stage_runs:
            pretrain_run = result.stage_runs[PRETRAIN]
            path = self.client.download_artifacts(pretrain_run, "autoencoder/autoencoder.keras")
            threshold = self.client.get_run(pretrain_run).data.metrics["anomaly_threshold"]
        else:
            data = autoencoder_data(config, self.recipe.data)
            errors = reconstruction_errors(autoencoder.scorer, self.session.pretraining.train, data, config.loss)
            threshold = float(np.percentile(errors, config.anomaly_percentile))
            self.client.log_metric(self.parent_id, "anomaly_threshold", threshold)
            path = str(Path(tempfile.mkdtemp(prefix="tltoolkit-ae-")) / "autoencoder.keras")
            autoencoder.scorer.save(path)
        return {
            "autoencoder": path,
            "threshold": threshold,
            "loss": config.loss,
            "percentile": config.anomaly_percentile,
        }

    def on_session_failed(self, session, error):
        self.fail(error)

    def fail(self, error: BaseException) -> None:
        """Marks the open runs KILLED (Ctrl-C, SIGTERM) or FAILED and ends the parent; a store that does not answer
        leaves them as they are (the next `run` or `--resume` on this host tidies them)."""
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        try:
            for run_id in (self.child_id, self.parent_id):
                if run_id:
                    self.client.raw.set_terminated(run_id, status)  # Failing already: no waiting.
            if mlflow.active_run() is not None:
                mlflow.end_run(status)
        except Exception as exc:
            if not unreachable(exc):
                raise
            _logger.warning("Could not mark the runs %s: the tracking store does not answer.", status)


def _refuse_live_owner(run, folder: Path) -> None:
    """A run whose process still trains it is not resumed twice: on this host its process tag names a live process;
    on another, its lease in the checkpoint `folder` was renewed less than `lease_timeout_s()` ago."""
    owner = run.data.tags.get(PROCESS_TAG, "")
    if not owner or owner == process_tag():
        return
    alive = is_alive(owner)
    lease = live_lease(folder) if alive is None else None
    if not alive and lease is None:
        return
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    beat = f" (its lease was renewed {lease[1]:.0f} s ago)" if lease else ""
    wait = (
        f", or if {host} is gone, wait {lease_timeout_s() - lease[1]:.0f} s for its lease to expire"
        if lease
        else f", or stop it (kill {pid})"
    )
    raise ResumeError(
        f"Run {run.info.run_id} is still being trained by process {pid} on {host}{beat}; resuming it too would make "
        f"two processes write one run. Let it finish{wait}, and resume then."
    )


@dataclass
class ResumePoint:
    """An unfinished run to continue: its parent run, checkpoint folder and newest readable checkpoint."""

    parent_id: str
    store: CheckpointStore
    checkpoint: Checkpoint

    def run_ids(self) -> set[str]:
        return {self.parent_id, *self.checkpoint.state.stage_runs.values()}


def find_resume_point(
    client: MlflowClient,
    experiment_id: str,
    resume: bool | str,
    key: str,
    uri: str,
    what: str = "this recipe on this data folder",
    compatible=None,
) -> ResumePoint:
    """The run `--resume` continues: the run id given, else the newest unfinished run with this resume key (`what`
    describes the command for the message when there is none).

    `compatible(run)`: whether a run named by id whose resume key differs may still be continued (the command
    decides: `tltoolkit run` allows changed learning rates).

    Raises:
        ResumeError: No such run, it finished, it has no readable checkpoint, or it was started with another
            recipe or data folder.
    """
    if isinstance(resume, str):
        try:
            candidates = [client.get_run(resume)]
        except Exception:
            raise ResumeError(f"--resume {resume}: no such run in the MLflow store {uri}.") from None
        if candidates[0].data.tags.get("tltoolkit.kind") != "run":
            raise ResumeError(
                f"--resume {resume}: that run is not a `tltoolkit run` parent run (its stages resume with it)."
            )
    else:
        candidates = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`tltoolkit.kind` = 'run' and tags.`tltoolkit.resume_key` = '{key}' "
            "and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
    for candidate in candidates:
        point = _checkpointed(candidate, uri, explicit=isinstance(resume, str))
        if point is None:
            continue
        _refuse_live_owner(candidate, point.store.folder)
        if point.checkpoint.state.key != key and not (compatible and compatible(candidate)):
            raise ResumeError(
                f"Run {point.parent_id} was started with a different recipe (or --set overrides) or data folder; "
                "resume it with exactly the same command plus --resume, or start a new run without --resume."
            )
        return point
    raise ResumeError(
        f"Nothing to resume: no unfinished run of {what} with a checkpoint in experiment "
        f"{client.get_experiment(experiment_id).name!r} at {uri}. Run the command without --resume to start one."
    )


def _checkpointed(run, uri: str, explicit: bool) -> ResumePoint | None:
    run_id = run.info.run_id
    if run.info.status == "FINISHED":
        raise ResumeError(
            f"Run {run_id} already finished; there is nothing to resume. Start a new run without --resume."
        )
    folder = run.data.tags.get("tltoolkit.checkpoints") or str(checkpoint_root(uri) / run_id)
    store = CheckpointStore(folder)
    checkpoint = store.latest()
    if checkpoint is None and explicit:
        raise ResumeError(f"Run {run_id} has no readable checkpoint in {folder}; it cannot be resumed.")
    return None if checkpoint is None else ResumePoint(run_id, store, checkpoint)
