"""Test set-up: Triton kernels run through the interpreter where there is no GPU, and no calibration
file of the machine (`ztriton calibrate`) changes the scheduler's choices during the tests.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set here.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ZTRITON_CALIBRATION"] = os.path.join(tempfile.mkdtemp(prefix="ztriton-tests-"), "calibration.json")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
