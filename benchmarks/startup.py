"""Start-up time: ``import sams_scvi``, the first model access, ``sams-scvi --help`` and ``import scvi``.

Run ``python benchmarks/startup.py [--repeats N]``; each command runs in a fresh interpreter ``N`` times (default 5)
after one untimed run that warms the file cache, and the median wall time is printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("sams-scvi")
COMMANDS = {
    "import sams_scvi": [sys.executable, "-c", "import sams_scvi"],
    "sams-scvi --help": [str(SCRIPT), "--help"],
    "sams-scvi train --max-epochs -1 (argument error)": [str(SCRIPT), "train", "x.h5ad", "--max-epochs", "-1"],
    "import scvi": [sys.executable, "-c", "import scvi"],
    "import sams_scvi; sams_scvi.SAMSVAE": [sys.executable, "-c", "import sams_scvi; sams_scvi.SAMSVAE"],
}


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| command | median s | min s |\n|---|---|---|")
    for name, command in COMMANDS.items():
        wall_time(command)
        times = [wall_time(command) for _ in range(args.repeats)]
        print(f"| `{name}` | {statistics.median(times):.2f} | {min(times):.2f} |")


if __name__ == "__main__":
    main()
