"""What a classifier gets wrong and why: the most confused class pairs, the images it gets most wrong (top losses),
and Grad-CAM heat maps of where it looked.

Grad-CAM (Selvaraju et al., 2017) weights the channels of the backbone's last feature map by the mean gradient of
the class score over them. tltoolkit's classifiers call the backbone through one `InferenceMode` layer named
`backbone`, so its output in the outer graph is that feature map for every backbone (keras.applications, the
offline ports, an autoencoder's encoder) and no backbone-specific layer name is needed. The computation follows the
Keras example (`examples/vision/grad_cam.py`) in a few lines; no maintained library covers nested Keras 3 models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tltoolkit.model.metrics import Evaluation

TOP_LOSSES = 8


@dataclass
class Interpretation:
    """The tables and heat maps of one evaluated split."""

    most_confused: pd.DataFrame  # true, predicted, count (off-diagonal confusion), most first.
    top_losses: pd.DataFrame  # path, true, predicted, probability (of the prediction), true_probability, loss.
    images: np.ndarray  # The top-loss images as the model saw them, uint8 (k, size, size, 3).
    heatmaps: np.ndarray  # Grad-CAM of the predicted class, in [0, 1], at the images' size (k, size, size).


def most_confused(evaluation: Evaluation, class_names: list[str]) -> pd.DataFrame:
    """Off-diagonal confusion counts as `(true, predicted, count)` rows, the most frequent first.

    Example:
        >>> from tltoolkit.model.metrics import evaluate_probabilities
        >>> e = evaluate_probabilities(np.array([0, 0, 1]), np.array([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7]]), ["a", "b"])
        >>> most_confused(e, ["a", "b"]).to_dict("records")
        [{'true': 'a', 'predicted': 'b', 'count': 1}]
    """
    matrix = evaluation.confusion
    rows = [
        {"true": class_names[t], "predicted": class_names[p], "count": int(matrix[t, p])}
        for t in range(len(class_names))
        for p in range(len(class_names))
        if t != p and matrix[t, p] > 0
    ]
    table = pd.DataFrame(rows, columns=["true", "predicted", "count"])
    return table.sort_values("count", ascending=False, kind="stable").reset_index(drop=True)


def top_losses(paths: list[str], evaluation: Evaluation, class_names: list[str], k: int = TOP_LOSSES) -> pd.DataFrame:
    """The `k` images with the highest cross-entropy loss (right or wrong), highest first."""
    probabilities, labels = evaluation.probabilities, evaluation.labels
    rows = np.arange(len(labels))
    true_probability = probabilities[rows, labels]
    losses = -np.log(np.clip(true_probability, 1e-7, 1.0))
    predicted = probabilities.argmax(axis=1)
    order = np.argsort(-losses, kind="stable")[:k]
    return pd.DataFrame(
        {
            "path": [str(paths[i]) for i in order],
            "true": [class_names[labels[i]] for i in order],
            "predicted": [class_names[predicted[i]] for i in order],
            "probability": probabilities[order, predicted[order]].astype(float),
            "true_probability": true_probability[order].astype(float),
            "loss": losses[order].astype(float),
        }
    )


def gradcam(model, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Grad-CAM heat maps of `classes` (one per image) over `images` (float pixels, the model's input size), in
    [0, 1] and resized (bilinear) to the images' height and width."""
    import tensorflow as tf

    from tltoolkit.model.build import apply_head

    # The backbone runs outside the tape: the gradient is taken at its output, so recording its hundreds of
    # operations only slowed the backward pass (0.45 s of 0.8 s for 8 images on MobileNetV2).
    features = model.get_layer("backbone")(tf.convert_to_tensor(images, tf.float32), training=False)
    with tf.GradientTape() as tape:
        tape.watch(features)
        probabilities = apply_head(model, features)
        scores = tf.gather(probabilities, tf.convert_to_tensor(classes), axis=1, batch_dims=1)
    gradients = tape.gradient(scores, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    maps = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    peak = tf.reduce_max(maps, axis=(1, 2), keepdims=True)
    maps = tf.math.divide_no_nan(maps, peak)
    return tf.image.resize(maps[..., None], images.shape[1:3], method="bilinear")[..., 0].numpy()


def interpret(
    model, paths: list[str], evaluation: Evaluation, class_names: list[str], data_config, k: int = TOP_LOSSES
) -> Interpretation:
    """Most confused pairs, the top `k` losses, and Grad-CAM of the predicted class over each of them."""
    from tltoolkit.data.pipeline import resized_images

    losses = top_losses(paths, evaluation, class_names, k)
    images = resized_images(list(losses["path"]), data_config)
    classes = np.array([class_names.index(name) for name in losses["predicted"]], dtype=np.int32)
    heatmaps = gradcam(model, images.astype(np.float32), classes) if len(losses) else np.zeros(images.shape[:3])
    return Interpretation(most_confused(evaluation, class_names), losses, images, heatmaps)
