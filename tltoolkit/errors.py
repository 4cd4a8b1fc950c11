"""The toolkit's exceptions, in one place.

Every error a user can cause derives from `TltoolkitError`; the CLI prints its message (a full sentence that names
the file, field or value and the fix) without a traceback and exits with status 2. Anything else is a bug and keeps
its traceback.
"""


class TltoolkitError(Exception):
    """Base class of every error caused by the user's input or environment."""


class RecipeError(TltoolkitError, ValueError):
    """A recipe file or a `--set` override is invalid. Raised before any data is read."""


class DataError(TltoolkitError, ValueError):
    """An image folder cannot be used: missing, empty, one class, or classes that do not match a model."""


class BackboneError(TltoolkitError, ValueError):
    """A backbone name, weight source or freeze point is unknown or cannot be loaded."""


class TrackingError(TltoolkitError, RuntimeError):
    """The MLflow store cannot be reached or written, or a run id does not exist."""


class ModelLoadError(TltoolkitError, ValueError):
    """A model path or run id does not hold a tltoolkit model."""


class ResumeError(TltoolkitError, RuntimeError):
    """A training cannot be resumed: nothing to resume, or its checkpoint no longer fits the recipe or data."""


class ExportError(TltoolkitError, ValueError):
    """A model cannot be exported as asked: an unknown format or quantization, an op a format lacks, an exported
    artifact that disagrees with the Keras model, or an output folder that exists."""


class RegistryError(TltoolkitError, ValueError):
    """A registered model name or alias MLflow would refuse, or a model that cannot be registered."""


class DivergedError(TltoolkitError, ArithmeticError):
    """The training loss stopped being a finite number (NaN or infinity): the stage is stopped, the last finite
    checkpoint kept."""
