#!/usr/bin/env bash
# Release readiness (`make release-check`): build the sdist and wheel, check them with twine and check what they
# contain, then install the wheel into a fresh virtual environment and use it from outside this checkout
# (import, bundled data loaders, console script, a one-epoch train: tests/test_release.py with SAMS_RELEASE_CHECK=1).
#
# Environment: BIN, the bin directory of the development environment (with build and twine: `pip install -e
# ".[release]"`); PYTHON, the interpreter for the fresh environment; TORCH_SPEC, what to install torch from first.
# SAMS_RELEASE_KEEP=1 keeps the temporary directory (the built files and the fresh environment) for inspection.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$(cd "${BIN:-$REPO/.venv/bin}" && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sams-release.XXXXXX")"
case "$WORK/" in
"$REPO"/*)
    echo "release-check: the temporary directory $WORK lies inside the checkout; set TMPDIR elsewhere" >&2
    exit 1
    ;;
esac
cleanup() {
    if [[ "${SAMS_RELEASE_KEEP:-0}" == 1 ]]; then
        echo "release-check: kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
SECONDS=0
step() { printf '\n== [%3ds] %s\n' "$SECONDS" "$*"; }

step "Build the sdist and the wheel (the wheel from the sdist) into $WORK/dist"
"$BIN/python" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || {
    cat "$WORK/build.log" >&2
    exit 1
}
tail -n 1 "$WORK/build.log"
shopt -s nullglob
wheels=("$WORK"/dist/*.whl)
sdists=("$WORK"/dist/*.tar.gz)
shopt -u nullglob
if [[ ${#wheels[@]} -ne 1 || ${#sdists[@]} -ne 1 ]]; then
    echo "release-check: expected one wheel and one sdist, got: $(ls "$WORK/dist")" >&2
    exit 1
fi
WHEEL="${wheels[0]}"
SDIST="${sdists[0]}"

step "twine check --strict"
"$BIN/python" -m twine check --strict "$WHEEL" "$SDIST"

step "Contents of the wheel and the sdist"
VERSION="$("$BIN/python" - "$WHEEL" "$SDIST" <<'EOF'
import re
import sys
import tarfile
import tomllib
import zipfile
from email.parser import HeaderParser
from pathlib import Path

wheel, sdist = map(Path, sys.argv[1:3])
problems = []


def need(condition, message):
    if not condition:
        problems.append(message)


version = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
match = re.fullmatch(r"sams_scvi-(?P<version>[^-]+)-py3-none-any\.whl", wheel.name)
need(match is not None, f"wheel {wheel.name}: expected a pure-Python sams_scvi-<version>-py3-none-any.whl")
wheel_version = match["version"] if match else "?"
need(wheel_version == version, f"wheel version {wheel_version} != pyproject.toml {version}")
need(sdist.name == f"sams_scvi-{version}.tar.gz", f"sdist {sdist.name}: expected sams_scvi-{version}.tar.gz")

# Every file of the package source (no caches) must ship, the bundled data byte for byte.
package = Path("src/sams_scvi")
sources = {
    p.relative_to("src").as_posix(): p
    for p in sorted(package.rglob("*"))
    if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".pyo"}
}
data = {name: p for name, p in sources.items() if name.startswith("sams_scvi/data/files/")}
need(
    {"LICENSES.md", "papalexi2021_thp1_sceptredata.h5ad", "schraivogel2020_tapseq_k562.h5ad"}
    <= {Path(n).name for n in data},
    f"src/sams_scvi/data/files lacks the bundled data: {sorted(data)}",
)

with zipfile.ZipFile(wheel) as zf:
    names = set(zf.namelist())
    dist_info = f"sams_scvi-{wheel_version}.dist-info"
    missing = sorted(set(sources) - names)
    need(not missing, f"wheel lacks package files: {missing}")
    need("sams_scvi/py.typed" in names, "wheel lacks sams_scvi/py.typed (PEP 561: type checkers read the annotations)")
    for name, path in data.items():
        if name in names:
            need(zf.read(name) == path.read_bytes(), f"wheel: {name} differs from the source file")
    stray = sorted(n for n in names if not (n.startswith("sams_scvi/") or n.startswith(f"{dist_info}/")))
    need(not stray, f"wheel has files outside the package: {stray}")
    need(not any("__pycache__" in n or n.endswith(".pyc") for n in names), "wheel has bytecode caches")
    for required in ("METADATA", "WHEEL", "RECORD", "entry_points.txt", "licenses/LICENSE"):
        need(f"{dist_info}/{required}" in names, f"wheel lacks {dist_info}/{required}")
    entry_points = zf.read(f"{dist_info}/entry_points.txt").decode() if f"{dist_info}/entry_points.txt" in names else ""
    need(
        re.search(r"^sams-scvi\s*=\s*sams_scvi\.cli:main$", entry_points, re.M) is not None,
        "wheel: no console script sams-scvi = sams_scvi.cli:main",
    )
    meta = HeaderParser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
    need(meta["Name"] == "sams-scvi" and meta["Version"] == version, f"METADATA {meta['Name']} {meta['Version']}")
    need(meta["License-Expression"] == "BSD-3-Clause", f"METADATA License-Expression {meta['License-Expression']}")
    for license_file in meta.get_all("License-File") or []:
        need(f"{dist_info}/licenses/{license_file}" in names, f"wheel lacks the licence file {license_file}")
    need(meta["Description-Content-Type"] == "text/markdown", "METADATA: README is not text/markdown")
    need(bool(meta["Requires-Python"]), "METADATA: no Requires-Python")

with tarfile.open(sdist) as tf:
    prefix = f"sams_scvi-{version}/"
    members = {m.name.removeprefix(prefix): m for m in tf.getmembers() if m.isfile()}
    for required in ("PKG-INFO", "pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"):
        need(required in members, f"sdist lacks {required}")
    missing = sorted(f"src/{name}" for name in sources if f"src/{name}" not in members)
    need(not missing, f"sdist lacks package files: {missing}")
    for name, path in data.items():
        member = members.get(f"src/{name}")
        if member is not None:
            need(tf.extractfile(member).read() == path.read_bytes(), f"sdist: src/{name} differs from the source")
    tests = sorted(str(p) for p in Path("tests").rglob("*.py") if "__pycache__" not in p.parts)
    missing = [t for t in tests if t not in members]
    need(not missing, f"sdist lacks tests: {missing}")
    need("tests/test_release.py" in members and "tests/conftest.py" in members, "sdist lacks the test suite")
    caches = sorted(n for n in members if "__pycache__" in n or n.endswith(".pyc") or "/.venv" in f"/{n}")
    need(not caches, f"sdist has caches or environments: {caches[:5]}")
    need("CITATION.cff" in members, "sdist lacks CITATION.cff (tests/test_release.py reads it)")

if problems:
    print("release-check: packaging problems:", *problems, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"wheel: {len(names)} files, {len(sources)} package files, data {sorted(Path(n).name for n in data)}",
      file=sys.stderr)
print(f"sdist: {len(members)} files, {len(tests)} test modules", file=sys.stderr)
print(version)
EOF
)"
echo "version $VERSION: wheel and sdist contents OK"

step "Fresh virtual environment ($("$PYTHON" --version 2>&1)) with $TORCH_SPEC, then the wheel"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --upgrade pip
"$VPY" -m pip install --quiet "$TORCH_SPEC"
"$VPY" -m pip install --quiet "${WHEEL}[test]"
"$VPY" -m pip check

# From outside the checkout, with nothing pointing at it, so only the installed wheel can be imported.
mkdir "$WORK/run"
cd "$WORK/run"
unset PYTHONPATH PYTHONHOME

step "Import, version and console script in the fresh environment"
"$VPY" - "$REPO" "$VERSION" <<'EOF'
import sys
import sysconfig
from pathlib import Path

import sams_scvi

repo, version = Path(sys.argv[1]).resolve(), sys.argv[2]
where = Path(sams_scvi.__file__).resolve()
site = Path(sysconfig.get_paths()["purelib"]).resolve()
print(f"sams_scvi {sams_scvi.__version__} from {where}")
assert where.is_relative_to(site), f"imported from {where}, not from {site}"
assert not where.is_relative_to(repo), f"imported the source tree: {where}"
assert sams_scvi.__version__ == version, f"__version__ {sams_scvi.__version__} != wheel {version}"
EOF
"$WORK/venv/bin/sams-scvi" --help >"$WORK/help.txt"
grep -q "demo" "$WORK/help.txt"
head -n 1 "$WORK/help.txt"

step "tests/test_release.py in the fresh environment (loaders, one-epoch train, the wheel's import)"
SAMS_RELEASE_CHECK=1 SAMS_EXPECTED_VERSION="$VERSION" PYTHONDONTWRITEBYTECODE=1 \
    "$VPY" -m pytest "$REPO/tests/test_release.py" -p no:cacheprovider -q --junitxml="$WORK/release.xml"
"$VPY" - "$WORK/release.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
assert counts["tests"] > 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
EOF

step "release-check passed: sams-scvi $VERSION ($(basename "$WHEEL"), $(basename "$SDIST"))"
