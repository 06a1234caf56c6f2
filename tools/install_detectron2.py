"""Install Detectron2 into the running Python unless it already has one.

A Detectron2 that imports already (for example a user's own CUDA build) is kept as it is.
Otherwise this installs the PyPI wheel ``sal-detectron2==0.7.2``: FAIR's detectron2 at commit
a59f0563 (2024-04-17) plus three trivial edits.  That wheel is tagged cp310 only and bundles a
``_C`` extension built for Python 3.10, so we fetch it for that tag, check its sha256, and
repack it as a pure-Python wheel without ``_C`` (Detectron2 then uses torchvision's compiled
ops) and without its stray top-level ``tools`` package.  pip installs the repacked wheel, so
an interrupted run leaves nothing half-copied and ``pip uninstall sal-detectron2`` removes it.

Usage: python tools/install_detectron2.py [--cache-dir DIR]
"""
import argparse
import base64
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "sal-detectron2==0.7.2"
WHEEL_NAME = "sal_detectron2-0.7.2-cp310-none-any.whl"
WHEEL_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
REPACKED_NAME = "sal_detectron2-0.7.2-py3-none-any.whl"
DIST_INFO = "sal_detectron2-0.7.2.dist-info"


def fail(msg):
    print(f"install_detectron2: error: {msg}", file=sys.stderr)
    sys.exit(1)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(cache_dir: Path) -> Path:
    wheel = cache_dir / WHEEL_NAME
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.10", "--platform", "linux_x86_64", "--implementation", "cp",
               "--dest", str(cache_dir), WHEEL_SPEC]
        print("install_detectron2: fetching", WHEEL_SPEC, flush=True)
        if subprocess.call(cmd) != 0 or not wheel.exists():
            fail(f"could not download {WHEEL_SPEC} from PyPI (command: {' '.join(cmd)})")
    digest = sha256_of(wheel)
    if digest != WHEEL_SHA256:
        # Remove it so that the next run downloads afresh instead of failing forever.
        wheel.unlink()
        fail(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; the file was removed. "
             "Refusing to install an unverified Detectron2.")
    return wheel


def _record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _relax_requirements(metadata: bytes) -> bytes:
    """Drop the wheel's ``numpy<2`` cap and its ``black`` requirement.

    The snapshot predates numpy 2 but uses none of the aliases numpy 2 removed (our test suite
    runs it on numpy 2, which torch 2.14 and opencv need); black only pretty-prints
    ``LazyConfig.save`` output, which this project does not use.
    """
    lines = []
    for line in metadata.decode().splitlines():
        if line.startswith("Requires-Dist: numpy"):
            line = "Requires-Dist: numpy"
        elif line.startswith("Requires-Dist: black"):
            continue
        lines.append(line)
    return ("\n".join(lines) + "\n").encode()


def repack(wheel: Path, out_dir: Path) -> Path:
    """Write a py3-none-any wheel holding only the ``detectron2`` package minus ``_C``."""
    out = out_dir / REPACKED_NAME
    record = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            name = info.filename
            keep = (name.startswith("detectron2/") and "/_C." not in name) or (
                name.startswith(DIST_INFO + "/") and not name.endswith(("/RECORD", "/WHEEL")))
            if not keep:
                continue
            data = src.read(name)
            if name == f"{DIST_INFO}/top_level.txt":
                data = b"detectron2\n"
            elif name == f"{DIST_INFO}/METADATA":
                data = _relax_requirements(data)
            dst.writestr(name, data)
            record.append(_record_line(name, data))
        wheel_meta = (b"Wheel-Version: 1.0\nGenerator: msad-install-detectron2\n"
                      b"Root-Is-Purelib: true\nTag: py3-none-any\n")
        dst.writestr(f"{DIST_INFO}/WHEEL", wheel_meta)
        record.append(_record_line(f"{DIST_INFO}/WHEEL", wheel_meta))
        record.append(f"{DIST_INFO}/RECORD,,")
        dst.writestr(f"{DIST_INFO}/RECORD", "\n".join(record) + "\n")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=".cache/detectron2",
                        help="where the downloaded wheel is kept between runs")
    args = parser.parse_args(argv)
    if sys.version_info < (3, 10):
        fail(f"Python {sys.version.split()[0]} is too old: Detectron2 and msad need 3.10 or newer")
    spec = importlib.util.find_spec("detectron2")
    if spec is not None:
        print(f"install_detectron2: keeping the detectron2 already importable at "
              f"{Path(spec.origin).parent}")
        return
    wheel = fetch_wheel(Path(args.cache_dir))
    with tempfile.TemporaryDirectory() as tmp:
        repacked = repack(wheel, Path(tmp))
        cmd = [sys.executable, "-m", "pip", "install", str(repacked)]
        if subprocess.call(cmd) != 0:
            fail("pip could not install the repacked detectron2 wheel: " + " ".join(cmd))
    print(f"install_detectron2: installed {WHEEL_SPEC} (FAIR detectron2 a59f0563, sha256 "
          f"{WHEEL_SHA256[:12]}..., without _C)")


if __name__ == "__main__":
    main()
