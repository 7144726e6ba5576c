"""Run the Triton tests against each supported Triton version, each in a throwaway virtual environment.

Per version: a new venv gets torch TORCH (the CPU build here), then that Triton, then the project
(`pip install -e <repo>[dev]`), all under one constraints file that keeps torch, that Triton and
the version's numpy cap. The Triton test modules then run (kernels through the interpreter, and the
sm_80/sm_90 compile test), and a markdown table prints. Exits non-zero if any version fails.

    python bench/triton_versions.py [--versions 3.6.0 3.8.0 3.9.0] [--keep]
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("3.6.0", "3.8.0", "3.9.0")
TORCH = "2.13.0"
#: numpy caps by Triton minor version. Triton 3.6's interpreter turns a scalar (a 1-element array)
#: into a Python int with int(array) (`tensor.__index__`, e.g. in `range(n)` over a kernel argument);
#: numpy 2.4 made that a TypeError ("only 0-dimensional arrays can be converted to Python scalars",
#: deprecated since 1.25), so every interpreted kernel with a loop fails. numpy 2.3 only warns.
NUMPY_CAPS = {"3.6": "numpy<2.4"}
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
#: the test runs per version: modules that exercise the kernels or the Triton backend as a whole,
#: and the Triton-parametrised tests of the other modules (selected by -k triton)
TEST_RUNS = (
    ["tests/test_kernels.py", "tests/test_triton_family.py", "tests/test_compile.py", "tests/test_rng.py",
     "tests/test_device_work.py", "tests/test_bench.py::test_gpu_report_cost_model_on_a_small_shape"],
    ["-k", "triton", "tests/test_autograd.py", "tests/test_backends.py", "tests/test_fallbacks.py",
     "tests/test_input_buffers.py"],
)
COUNTED = ("passed", "failed", "skipped")
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?)\b")


@dataclass
class Result:
    version: str
    numpy: str = "-"
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))
    seconds: float = 0.0
    problem: str = ""  # why the version failed beyond failing tests: an install or a run without a summary

    @property
    def ok(self) -> bool:
        return not self.problem and self.counts["failed"] == 0 and self.counts["passed"] > 0


def minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def pip(python: Path, constraints: Path, *args: str, log: Path) -> None:
    """pip install under the constraints, its output appended to `log`; raises on failure."""
    with log.open("a") as out:
        subprocess.run([str(python), "-m", "pip", "install", "-c", str(constraints), *args],
                       stdout=out, stderr=subprocess.STDOUT, check=True)


def install(version: str, root: Path) -> Path:
    """A venv under `root` with torch, Triton `version` and the project; returns its python."""
    venv = root / f"triton-{version}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    constraints = venv / "constraints.txt"
    pins = [f"torch=={TORCH}", f"triton=={version}", NUMPY_CAPS.get(minor(version), "")]
    constraints.write_text("\n".join(pins) + "\n")
    log = venv / "pip.log"
    pip(python, constraints, f"torch=={TORCH}", log=log)
    pip(python, constraints, f"triton=={version}", log=log)
    pip(python, constraints, "-e", f"{REPO}[dev]", log=log)
    return python


def add_counts(counts: dict[str, int], output: str) -> bool:
    """Add the closing summary line's counts (errors as failed); False if there is none."""
    lines = [line for line in output.splitlines() if SUMMARY.search(line) and re.search(r" in [\d.]+s", line)]
    if not lines:
        return False
    for number, word in SUMMARY.findall(lines[-1]):
        counts[word if word in ("passed", "skipped") else "failed"] += int(number)
    return True


def run_tests(python: Path, result: Result) -> None:
    start = time.monotonic()
    for args in TEST_RUNS:
        done = subprocess.run([str(python), *PYTEST, *args], cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            print(done.stdout[-3000:], done.stderr[-2000:], sep="\n", flush=True)
        if not add_counts(result.counts, done.stdout):
            result.problem = f"pytest exited {done.returncode} without a summary line"
        elif done.returncode not in (0, 1):
            result.problem = f"pytest exited {done.returncode}"
    result.seconds = time.monotonic() - start


def check(version: str, root: Path) -> Result:
    result = Result(version)
    print(f"## triton {version}", flush=True)
    try:
        python = install(version, root)
    except subprocess.CalledProcessError as error:
        log = root / f"triton-{version}" / "pip.log"
        tail = log.read_text()[-3000:] if log.exists() else ""
        print(tail, flush=True)
        result.problem = f"install failed: {shlex.join(map(str, error.cmd))}"
        return result
    numpy = subprocess.run([str(python), "-c", "import numpy; print(numpy.__version__)"],
                           capture_output=True, text=True)
    result.numpy = numpy.stdout.strip() or "-"
    run_tests(python, result)
    return result


def table(results: list[Result]) -> str:
    rows = ["| triton | numpy | passed | failed | skipped | seconds |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        failed = f"{r.counts['failed']} ({r.problem})" if r.problem else str(r.counts["failed"])
        rows.append(f"| {r.version} | {r.numpy} | {r.counts['passed']} | {failed} | {r.counts['skipped']} "
                    f"| {r.seconds:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS),
                        help=f"Triton versions (default: {' '.join(VERSIONS)})")
    parser.add_argument("--keep", action="store_true", help="keep the virtual environments (their path is printed)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ztriton-triton-versions-"))
    try:
        results = [check(version, root) for version in args.versions]
    finally:
        if args.keep:
            print(f"virtual environments kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(table(results))
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    for run in TEST_RUNS:
        print(f"tests: python {shlex.join(PYTEST + run)}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
