"""A wheel build carries the mapped packages (reference/, tuning/, db/ -> kernelhub.*) and runs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_imports(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
                   check=True, timeout=300)
    (wheel,) = wheels.glob("kernelhub-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    probe = ("import kernelhub, kernelhub.ops, kernelhub.reference.int8_gemm, kernelhub.db, kernelhub.tuning.tuner;"
             "from kernelhub.kernels.loader import families;"
             "from kernelhub.db.shipped import PACKAGE_SHIPPED_DIR;"
             "print(kernelhub.__file__); print([f.name for f in families()]);"
             "print((PACKAGE_SHIPPED_DIR / 'README.md').is_file())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path, names, shipped_dir_installed = result.stdout.splitlines()
    assert path.startswith(str(target)) and "int8_gemm" in names
    assert shipped_dir_installed == "True"  # the package data (db/shipped/*.json) travels in the wheel
