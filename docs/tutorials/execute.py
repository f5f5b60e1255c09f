"""Execute the tutorial notebooks: in place with their outputs stored (``make tutorials``), or as a CI check.

``python docs/tutorials/execute.py`` re-executes every notebook here and writes it back with its outputs and
figures, which the documentation renders as stored. ``--check`` executes copies at reduced size
(``SAMS_TUTORIAL_MAX_EPOCHS``, default 2 here) and writes nothing back, so CI keeps the notebooks from rotting in a
few minutes. Either way a failing cell fails the run and names the notebook.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


# tqdm's notice, in a kernel without ipywidgets, that it falls back to text bars: about the machine, not the tutorial.
_FALLBACK_NOTICE = re.compile(r"^.*TqdmWarning: IProgress not found.*\n(?:\s+from \.autonotebook import.*\n)?", re.M)


def _as_displayed(text: str) -> str:
    """What a terminal or Jupyter shows of ``text``: on each line, only what follows its last carriage return."""
    lines = text.split("\n")
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines)


def tidy_outputs(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Store each cell's stream outputs as they are displayed.

    Progress bars redraw a line with carriage returns, which the site would otherwise print once per update;
    consecutive streams of one kind are merged.
    """
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.get("outputs", []):
            if output.output_type == "stream" and outputs and outputs[-1].output_type == "stream" and (
                outputs[-1].name == output.name
            ):
                outputs[-1].text += output.text
            else:
                outputs.append(output)
        for output in outputs:
            if output.output_type == "stream":
                text = _FALLBACK_NOTICE.sub("", _as_displayed(output.text))
                # a redrawn bar leaves an empty line behind; keep single blank lines (they separate table blocks)
                output.text = re.sub(r"\n{3,}", "\n\n", text).lstrip("\n")
        cell.outputs = [o for o in outputs if o.output_type != "stream" or o.text.strip()]
    return notebook


def execute(path: Path, timeout: int) -> nbformat.NotebookNode:
    """Run every cell of the notebook at ``path`` in a fresh kernel, in this directory; return it with outputs."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", record_timing=False, resources={"metadata": {"path": HERE}}
    )
    client.execute()
    notebook.metadata.setdefault(
        "kernelspec", {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    )
    return tidy_outputs(notebook)


def main(argv: list[str] | None = None) -> int:
    """Command line: execute the notebooks given (default: all); 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebook names or paths (default: every notebook here)")
    parser.add_argument("--check", action="store_true", help="run at reduced size and do not write outputs back")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    paths = [Path(p) if Path(p).exists() else HERE / p for p in args.notebooks] or sorted(HERE.glob("*.ipynb"))
    if args.check:
        os.environ.setdefault("SAMS_TUTORIAL_MAX_EPOCHS", "2")
    failed = []
    for path in paths:
        start = time.perf_counter()
        try:
            notebook = execute(path, args.timeout)
        except Exception as error:  # noqa: BLE001 - report every notebook's failure, then fail the run
            print(f"FAILED {path.name}: {error}", file=sys.stderr)
            failed.append(path.name)
            continue
        if not args.check:
            nbformat.write(notebook, path)
        print(f"ok {path.name} ({time.perf_counter() - start:.0f} s)")
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
