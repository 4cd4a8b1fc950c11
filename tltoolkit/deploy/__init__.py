"""After training: a classifier in the formats it ships in (SavedModel, TFLite, ONNX), the files that travel with
it, running the artifact, and checking it against the Keras model. `tltoolkit export` (`commands/export.py`) drives
it; the registry and serving are MLflow's (`commands/register.py`, `tracking/models.py`)."""

from tltoolkit.deploy.artifacts import ExportedModel, ExportMetadata, find_export
from tltoolkit.deploy.formats import FORMATS, QUANTIZATIONS, ExportSpec

__all__ = ["FORMATS", "QUANTIZATIONS", "ExportMetadata", "ExportSpec", "ExportedModel", "find_export"]
