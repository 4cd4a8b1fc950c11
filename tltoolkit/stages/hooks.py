"""The hooks a training session calls: where tracking (MLflow, or anything else) plugs in.

The session owns the loop; these methods are its only outward calls, in this order: `on_stage_begin`, then
`on_epoch_end` after every epoch (once the epoch is checkpointed), `on_stage_end`; after the last stage
`on_session_end`; and `on_session_failed` when anything (Ctrl-C included) stops it. Every method does nothing here,
so a subclass overrides only what it records. `stages/` never imports a tracking library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tltoolkit.stages.checkpoint import StageResume
    from tltoolkit.stages.session import PlannedStage, SessionResult, StageOutcome, TrainingSession


class TrainingHooks:
    """No-op hooks: subclass and override what you record (`tracking.runs.RunTracker`, `tracking.search.TrialHooks`)."""

    def on_stage_begin(
        self, session: TrainingSession, stage: PlannedStage, run_id: str | None, resume: StageResume | None
    ) -> str | None:
        """A stage starts (or resumes, with `resume`). `run_id` is what this hook returned for the stage before a
        kill (kept in the checkpoint); return an id to keep for it now, or `None`."""
        return run_id

    def on_epoch_end(self, stage: PlannedStage, epoch: int, logs: dict[str, float]) -> None:
        """An epoch of `stage` finished and is checkpointed; `logs` are Keras's plus `learning_rate`."""

    def on_stage_end(self, session: TrainingSession, stage: PlannedStage, outcome: StageOutcome) -> None:
        """A stage finished: its epochs, wall time, what trained, and (classifier stages) its validation scores."""

    def on_session_end(self, session: TrainingSession, result: SessionResult) -> None:
        """Every stage finished and the final model is scored."""

    def on_session_failed(self, session: TrainingSession, error: BaseException) -> None:
        """The session stops with `error` (a `KeyboardInterrupt` for Ctrl-C or SIGTERM); it is raised again after."""
