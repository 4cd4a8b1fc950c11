"""Prediction in batches of one shape: the same outputs as Keras's `predict`, one trace instead of two."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tltoolkit.model.inference import predict_batches


def _model(outputs: int = 1) -> keras.Model:
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, activation="relu")(inputs)
    heads = [keras.layers.Dense(2, name=f"out{i}")(hidden) for i in range(outputs)]
    return keras.Model(inputs, heads if outputs > 1 else heads[0])


@pytest.mark.parametrize("count", [20, 5, 16])  # A short last batch; one batch only; batches that divide evenly.
@pytest.mark.parametrize("labelled", [False, True])
def test_predictions_match_keras_predict_and_the_model_traces_once(count, labelled):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(count, 4)).astype(np.float32)
    examples = (x, np.eye(2, dtype=np.float32)[np.arange(count) % 2]) if labelled else x
    batches = tf.data.Dataset.from_tensor_slices(examples).batch(8)
    model = _model()
    expected = model(x).numpy()

    got = predict_batches(model, batches, count, 8, verbose=0)

    assert got.shape == (count, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert model.predict_function.experimental_get_tracing_count() == 1


def test_without_padding_keras_predict_traces_the_short_batch_again():
    """Why the helper exists: the same data through `predict` itself traces twice (if Keras ever stops doing so,
    this fails and the helper can go)."""
    model = _model()
    model.predict(tf.data.Dataset.from_tensor_slices(np.zeros((20, 4), np.float32)).batch(8), verbose=0)
    assert model.predict_function.experimental_get_tracing_count() == 2


def test_every_output_of_a_model_with_several_is_cut_to_the_examples():
    model = _model(outputs=2)
    x = np.random.default_rng(1).normal(size=(11, 4)).astype(np.float32)
    got = predict_batches(model, tf.data.Dataset.from_tensor_slices(x).batch(4), 11, 4, verbose=0)
    assert [g.shape for g in got] == [(11, 2), (11, 2)]
    for g, e in zip(got, model(x)):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-5, atol=1e-6)
