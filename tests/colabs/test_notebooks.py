"""Execute every notebook in colabs/ top to bottom in a fresh kernel; any cell error fails.

The kernel is this interpreter (``sys.executable``) through a throw-away kernel spec, so
the notebooks see exactly the environment the tests run in, whatever kernels the machine
has installed, with this checkout first on ``PYTHONPATH`` so that they exercise this
checkout's ``rlhf_jax``. Plots go to the non-interactive Agg backend.
"""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[2]
COLABS = REPO / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
KERNEL_NAME = "rlhf-jax-test-python"
# Each notebook must run on a CPU runtime in a few minutes; a single cell far over a
# minute means something regressed (a lost jit, an iteration count gone wild).
CELL_TIMEOUT_S = 300
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def kernel_manager(kernel_dir: Path) -> KernelManager:
    """A kernel manager whose only kernel spec runs this interpreter with matplotlib's Agg."""
    spec_dir = kernel_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rlhf-jax tests",
        "language": "python",
        "env": {
            "MPLBACKEND": "Agg",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def execute(nb: nbformat.NotebookNode, kernel_dir: Path, cwd: Path) -> nbformat.NotebookNode:
    """Run ``nb`` in place in a fresh kernel started in ``cwd``, then shut the kernel down."""
    km = kernel_manager(kernel_dir)
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(cwd)}},
    )
    try:
        client.execute()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {COLABS}"


def test_kernel_runs_this_interpreter_with_agg(tmp_path):
    code = "import sys, matplotlib; print(sys.executable); print(matplotlib.get_backend())"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    execute(nb, tmp_path / "kernels", tmp_path)
    printed = "".join(out.get("text", "") for out in nb.cells[0].outputs)
    executable, backend = printed.splitlines()
    assert executable == sys.executable  # the very path, not just the same base interpreter
    assert backend.lower() == "agg"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    try:
        execute(nb, tmp_path / "kernels", path.parent)
    except CellExecutionError as error:
        # nbclient's message holds the failing cell's source and its (coloured) traceback.
        pytest.fail(f"{path.name} failed:\n{ANSI_ESCAPE.sub('', str(error))}", pytrace=False)
