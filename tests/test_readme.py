"""Every Python example in the README runs as written and prints what its comments say it prints.

A `print(...)` line's trailing comment states figures of what it prints, as `label value` (or
`label = value`), comma-separated; a remark in parentheses is not a figure and `...` stands for
printed figures left out. The printed line must show each label once, followed by its value
(`'label': value` for a dict, `label value` in text), equal to the stated value to the stated
digits (0.0069 stands for anything that rounds to it; no more digits than printed). A line that
prints a bare number is compared with its comment's one figure. The examples are seeded; on the
native backend they print the same figures at every thread count (measured at 1 and 2), so no
wider tolerance is allowed.
"""

import ast
import re
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
VALUE = r"'[^']*'|-?\d+(?:\.\d+)?(?:e-?\d+)?"
#: packages of the optional extras (`interop`, spikingjelly with --no-deps): a block importing one
#: is skipped where it is not installed
OPTIONAL = {"snntorch", "spikingjelly", "nir"}


def optional_imports(block: str) -> list[str]:
    """The optional packages a block imports."""
    names = set()
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return sorted(names & OPTIONAL)


def stated_figures(comment: str) -> list[tuple[str, str]]:
    """(label, value) pairs of a print line's comment."""
    comment = re.sub(r"\([^)]*\)", "", comment)
    return re.findall(rf"([A-Za-z_][\w-]*)\s*=?\s*({VALUE})", comment)


def printed_value(line: str, label: str) -> str:
    found = re.findall(rf"(?<![\w-])'?{re.escape(label)}'?\s*[:=]?\s*({VALUE})", line)
    assert len(found) == 1, f"{label!r} shown {len(found)} times in {line!r}"
    return found[0]


def agrees(printed: str, stated: str) -> bool:
    if stated.startswith("'"):
        return printed == stated
    printed, stated = Decimal(printed), Decimal(stated)
    if stated.as_tuple().exponent < printed.as_tuple().exponent:
        return False  # more digits stated than printed
    return printed.quantize(stated, rounding=ROUND_HALF_EVEN) == stated


def expected_prints(block: str) -> list[list[tuple[str, str]]]:
    prints = [line for line in block.splitlines() if line.lstrip().startswith("print(")]
    figures = [stated_figures(line.partition("  #")[2]) for line in prints]
    assert all(figures), f"a print without stated figures: {prints}"
    return figures


def test_the_readme_has_its_examples():
    assert len(BLOCKS) == 7
    assert [len(expected_prints(block)) for block in BLOCKS] == [2, 1, 1, 1, 2, 2, 1]


def test_a_block_needing_an_optional_package_is_recognised():
    block = "import torch, snntorch as snn\nfrom spikingjelly.activation_based import neuron\nimport sklearn\n"
    assert optional_imports(block) == ["snntorch", "spikingjelly"]
    assert optional_imports("def f():\n    import nir.ir\n") == ["nir"]


def test_figures_are_compared_to_the_stated_digits():
    assert stated_figures("active_fraction 0.0069, path 'sparse', ...") == [("active_fraction", "0.0069"),
                                                                             ("path", "'sparse'")]
    assert stated_figures("B_th = 0.0399 (Table 1)") == [("B_th", "0.0399")]
    assert printed_value("{'path': 'sparse', 'active_fraction': 0.006865625}", "active_fraction") == "0.006865625"
    assert printed_value("loss 1.98, held-out accuracy 61.9 %", "accuracy") == "61.9"
    assert agrees("0.006865625", "0.0069") and not agrees("0.00694", "0.0068")
    assert agrees("263640", "263640") and not agrees("263641", "263640")
    assert not agrees("0.105", "0.1050")  # no more digits than printed
    assert not agrees("'dense'", "'sparse'")


@pytest.mark.filterwarnings("ignore::ztriton.SilentLayerWarning")
@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_example_prints_its_stated_figures(number, capsys):
    for package in optional_imports(BLOCKS[number]):
        pytest.importorskip(package)
    exec(compile(BLOCKS[number], f"README block {number}", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    expected = expected_prints(BLOCKS[number])
    assert len(lines) == len(expected), lines
    for line, figures in zip(lines, expected):
        if re.fullmatch(VALUE, line.strip()):  # a bare number: the comment's one figure
            assert len(figures) == 1 and agrees(line.strip(), figures[0][1]), (line, figures)
            continue
        for label, stated in figures:
            printed = printed_value(line, label)
            assert agrees(printed, stated), f"{label}: printed {printed}, the README states {stated}"
