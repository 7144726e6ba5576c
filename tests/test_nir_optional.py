"""Without the nir package: `import ztriton` works and NIR export / import say what to install."""

import subprocess
import sys

import pytest
import torch

import ztriton


def test_a_missing_nir_package_says_what_to_install(monkeypatch):
    model = torch.nn.Sequential(ztriton.SparseLIFLinear(4, 3, beta=0.9, reset="zero"))
    monkeypatch.setitem(sys.modules, "nir", None)  # import nir now raises ImportError
    for call in (lambda: ztriton.to_nir(model), lambda: ztriton.from_nir("net.nir")):
        with pytest.raises(ImportError, match=r'pip install nir \(or pip install "ztriton\[interop\]"\)'):
            call()


def test_import_ztriton_does_not_import_nir():
    code = "import sys; sys.modules['nir'] = None; import ztriton; print(ztriton.to_nir.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ztriton.interop.nir"
