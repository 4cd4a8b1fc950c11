"""Named intermediate feature maps (timm's `features_only`): on a keras.applications backbone and on each port."""

import keras
import numpy as np
import pytest

import tltoolkit
from tltoolkit.backbones import feature_info, features_only
from tltoolkit.backbones.efficientnet_lite import efficientnet_lite0
from tltoolkit.backbones.mobilenet_v2_torch import mobilenet_v2_torchvision
from tltoolkit.errors import BackboneError

MOBILENET_V2_ENDS = [
    ("block_1_expand_relu", 2, 96),
    ("block_3_expand_relu", 4, 144),
    ("block_6_expand_relu", 8, 192),
    ("block_13_expand_relu", 16, 576),
    ("out_relu", 32, 1280),
]


def ends(model):
    return [(f.name, f.reduction, f.channels) for f in feature_info(model)]


def test_keras_applications_backbone_exposes_its_stage_ends_and_shares_weights():
    backbone = tltoolkit.create_backbone("mobilenet_v2", weights="none", input_size=64)
    assert ends(backbone) == MOBILENET_V2_ENDS, "the layers the TensorFlow segmentation tutorial picks by hand"
    features = tltoolkit.create_backbone("mobilenet_v2", weights="none", input_size=64, features_only=True)
    assert [tuple(o.shape) for o in features.outputs] == [(None, 64 // r, 64 // r, c) for _, r, c in MOBILENET_V2_ENDS]
    picked = features_only(backbone, (1, -1, "block_2_add"))
    assert picked.output_names == ["block_3_expand_relu", "out_relu", "block_2_add"]
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(picked.predict(images, verbose=0)[1], backbone.predict(images, verbose=0), atol=1e-5)
    assert {id(v) for v in picked.weights} <= {id(v) for v in backbone.weights}, "the same layers, not copies"


def test_resnet_stage_ends_are_its_block_outputs():
    backbone = tltoolkit.create_backbone("resnet50", weights="none", input_size=64)
    assert [name for name, _, _ in ends(backbone)] == [
        "conv1_relu",
        "conv2_block3_out",
        "conv3_block4_out",
        "conv4_block6_out",
        "conv5_block3_out",
    ]


@pytest.mark.parametrize(
    "port, expected",
    [
        (mobilenet_v2_torchvision, MOBILENET_V2_ENDS),  # The port keeps Keras's names: the same maps by name.
        (
            efficientnet_lite0,
            [
                ("block2a_expand_activation", 2, 96),
                ("block3a_expand_activation", 4, 144),
                ("block4a_expand_activation", 8, 240),
                ("block6a_expand_activation", 16, 672),
                ("top_activation", 32, 1280),
            ],
        ),
    ],
)
def test_each_offline_port_exposes_its_stage_ends(port, expected):
    model = port(keras.Input((64, 64, 3)), False, {})
    assert ends(model) == expected
    assert [tuple(o.shape)[1] for o in features_only(model).outputs] == [64 // r for _, r, _ in expected]


def test_an_unknown_index_or_layer_names_the_stage_ends():
    backbone = tltoolkit.create_backbone("test_tiny", weights="none", input_size=32)
    with pytest.raises(BackboneError, match=r"out_indices 5 .*0: block1_relu \(1/2, 8 channels\)"):
        features_only(backbone, (5,))
    with pytest.raises(BackboneError, match="nope"):
        tltoolkit.create_backbone("test_tiny", weights="none", input_size=32, features_only=True, out_indices=("nope",))
