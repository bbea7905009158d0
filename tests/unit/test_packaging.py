"""The package as users install it: a non-editable `pip install .` carries everything,
the Slurm templates included, and works outside the source tree."""
import os
import shutil
import subprocess
import sys
import venv

from hpcaccel.config import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "unit", "golden", "cpu-minimal.sbatch")


def test_every_package_of_hpcaccel_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        listed = set(tomllib.load(fh)["tool"]["setuptools"]["packages"])
    on_disk = {os.path.relpath(d, ROOT).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(ROOT, "hpcaccel")) if "__init__.py" in files}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_non_editable_install_renders_the_templates(tmp_path):
    # a copy of what the install needs, so the build writes nothing into the checkout
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "hpcaccel"), src / "hpcaccel",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "slurm"), src / "slurm")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # fresh: no editable hpcaccel
    python = str(env_dir / "bin" / "python")
    # the dependencies (torch, h5py, ...) from this environment's site-packages; a path
    # from a .pth line does not run that directory's own .pth files, so the checkout's
    # editable install stays out of sight
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    with open(os.path.join(site, "deps.pth"), "w") as fh:
        fh.write("\n".join(deps) + "\n")
    # what `pip install .` does, offline: this interpreter's pip and setuptools build the
    # wheel, pip installs it into the fresh environment
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheels"), str(src)], check=True, timeout=120, capture_output=True)
    wheel = next((tmp_path / "wheels").glob("hpcaccel-*.whl"))
    subprocess.run([*pip, "--python", python, "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=120, capture_output=True)
    shutil.rmtree(src)  # the installed package must not need its source any more
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPCACCEL_SLURM_TEMPLATES")}
    where = subprocess.run([python, "-c", "import hpcaccel; print(hpcaccel.__file__)"], cwd=outside,
                           env=env, capture_output=True, text=True, timeout=60, check=True)
    assert where.stdout.startswith(str(env_dir)), where.stdout
    listed = subprocess.run([python, "-m", "hpcaccel.slurm", "templates"], cwd=outside, env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.split() == ["cpu", "gpu", "sweep"], listed
    rendered = subprocess.run([python, "-m", "hpcaccel.slurm", "render", "cpu", "--set",
                               "cores_per_socket=32"], cwd=outside, env=env,
                              capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    with open(GOLDEN) as fh:
        assert rendered.stdout == fh.read()
