"""TensorFlow's start-up notices, kept off the terminal of a CPU machine without hiding real errors.

TensorFlow's C++ runtime writes its first messages straight to the process's stderr before its logging is set up,
so `TF_CPP_MIN_LOG_LEVEL` cannot silence them: the oneDNN notice, "Could not find cuda drivers" and, on a machine
with no NVIDIA driver at all, "failed call to cuInit". `quiet_tensorflow_startup` makes the first `import
tensorflow` (wherever it happens, Keras's included) run with file descriptor 2 captured, probes the devices inside
the capture, and writes back every captured line except those notices. No library offers this; the CLI installs it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path

# Lines TensorFlow prints on every start; the cuInit line only where no NVIDIA driver is installed.
_NOTICES = (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"^I\d{4} .*\] oneDNN custom operations are on",
    r"^I\d{4} .*cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    r"^I\d{4} .*\] TensorFlow binary is optimized to use available CPU instructions",
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.",
)
_NO_DRIVER = r"^E\d{4} .*cuda_platform\.cc:\d+\] failed call to cuInit"


def has_nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def is_notice(line: str, driver: bool) -> bool:
    """Whether a captured stderr line is one of TensorFlow's start-up notices (never a real problem here)."""
    patterns = _NOTICES if driver else (*_NOTICES, _NO_DRIVER)
    return any(re.search(pattern, line) for pattern in patterns)


class _QuietStart(importlib.abc.MetaPathFinder):
    """Wraps the loading of the top-level `tensorflow` package once; every other import passes untouched."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # Once: find the real spec without coming back here.
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            with captured_stderr() as lines:
                load(module)
                module.config.list_physical_devices()  # Probes CUDA now, inside the capture.
            driver = has_nvidia_driver()
            kept = [line for line in lines if not is_notice(line, driver)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")

        spec.loader.exec_module = exec_module
        return spec


class captured_stderr:
    """File descriptor 2 into a temporary file for the block; its lines are in the list it yields."""

    def __enter__(self) -> list[str]:
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.file = tempfile.TemporaryFile(mode="w+b")
        os.dup2(self.file.fileno(), 2)
        self.lines: list[str] = []
        return self.lines

    def __exit__(self, *exc_info) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.lines.extend(self.file.read().decode(errors="replace").splitlines())
        self.file.close()


def quiet_tensorflow_startup() -> None:
    """Installs the wrapper, unless TensorFlow is already loaded or it is installed already."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietStart) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietStart())
