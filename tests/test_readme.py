"""Every Python example in the README runs as written (and prints what it says it prints)."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) == 3


@pytest.mark.filterwarnings("ignore::ztriton.SilentLayerWarning")
@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_example_runs(number, capsys):
    exec(compile(BLOCKS[number], f"README block {number}", "exec"), {})
    assert capsys.readouterr().out.strip()
