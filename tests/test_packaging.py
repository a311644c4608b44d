"""The wheel puts no top-level ``configs``/``flows``/``tasks`` on a shared ``sys.path``: they install as
``finetune_flow/{configs,flows,tasks}``, and the ``finetune-flow`` command finds them there (flows/launch.py)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the console script's body (`main()`), reporting what was importable before it ran and where configs came from
PROBE = """
import atexit, importlib.util, sys
from finetune_flow.flows.launch import main
clash = [n for n in ('configs', 'flows', 'tasks') if importlib.util.find_spec(n)]
atexit.register(lambda: print('CLASH', clash, 'SCHEMA', sys.modules['configs.schema'].__file__, file=sys.stderr))
sys.argv = ['finetune-flow', *sys.argv[1:]]
sys.exit(main())
"""


def test_the_wheel_installs_the_folders_under_one_package_and_the_command_runs_from_it(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("finetune_flow-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"finetune_flow", wheel.name.split("-py")[0] + ".dist-info"}
    for module in ("configs/schema.py", "configs/banking77.yaml", "configs/sweeps/banking77.yaml",
                   "flows/finetune.py", "flows/launch.py", "tasks/stages/train.py"):
        assert f"finetune_flow/{module}" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "finetune-flow = finetune_flow.flows.launch:main" in entry

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target)}
    # outside any clone: nothing named configs/flows/tasks is importable until the command puts finetune_flow/ first
    plain = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                            "print([n for n in ('configs', 'flows', 'tasks') if u.find_spec(n)])"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert plain.stdout.strip() == "[]", plain.stderr
    helped = subprocess.run([sys.executable, "-c", PROBE, "run", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0, helped.stderr
    assert "lora.target_modules" in helped.stdout.split("config fields")[1]
    clash, schema = helped.stderr.split("CLASH ")[1].split(" SCHEMA ")
    assert clash == "[]" and Path(schema.strip()) == target / "finetune_flow" / "configs" / "schema.py"
