"""The CLI keeps TensorFlow's start-up notices off the terminal, and lets every other line through."""

import subprocess
import sys

from tltoolkit.startup import is_notice

NOTICES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796013648.439534     576 port.cc:153] oneDNN custom operations are on. You may see slightly ...",
    "I0000 00:00:1796013648.441369     576 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU ...",
]
CUINIT = "E0000 00:00:1796013655.159289     576 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error"


def test_only_the_known_notices_are_dropped():
    assert all(is_notice(line, driver=False) for line in [*NOTICES, CUINIT])
    assert not is_notice(CUINIT, driver=True), "with an NVIDIA driver installed, a failing cuInit is a real error"
    for real in (
        "E0000 00:00:1796013655.159289     576 some_kernel.cc:12] Out of memory while allocating",
        "Traceback (most recent call last):",
        "W0000 00:00:1796013655.159289     576 op_kernel.cc:1] Invalid argument: ...",
    ):
        assert not is_notice(real, driver=False), real


def test_the_cli_starts_tensorflow_quietly_where_plain_python_does_not(tmp_path):
    plain = subprocess.run(
        [sys.executable, "-c", "import tensorflow as tf; tf.config.list_physical_devices()"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert any(is_notice(line, driver=True) for line in plain.stderr.splitlines()), "the notices exist to be hidden"
    listing = subprocess.run(
        [sys.executable, "-m", "tltoolkit", "backbones", "--layers", "test_tiny"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert listing.returncode == 0 and "block3_conv" in listing.stdout
    assert listing.stderr == "", listing.stderr
