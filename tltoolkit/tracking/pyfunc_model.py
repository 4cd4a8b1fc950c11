"""MLflow models-from-code entry point: the logged model is this file plus the package, never a pickle."""

import mlflow

from tltoolkit.tracking.models import KerasClassifierModel

mlflow.models.set_model(KerasClassifierModel())
