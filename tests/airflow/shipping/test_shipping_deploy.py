"""The deployment the operator's guide documents cannot break its Composer environment.

Airflow's plugin loader imports every ``.py`` under the plugins folder as a top-level module named
after the file (``aifs/testing/__main__.py`` as ``__main__``), in every Airflow process: API server,
scheduler, DAG processor, each task's worker. Whatever of ``aifs`` it ran would run there, under that
process's argv. So the test follows the guide to the letter: it reads the guide's `gcloud composer
environments storage ... import` commands, lays the files out as those commands do in a Composer-like
bucket folder (``dags/``, ``plugins/``, ``data/``), and, in a fresh process whose argv is a Composer
worker's (``airflow celery worker``), loads that plugins folder with Airflow's own plugin manager and
that dags folder with DagBag, importing ``aifs`` only from where the guide put it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
GUIDE = REPO / "docs" / "operators-guide.md"
DAG_ID = "aifs_ens_forecast"
#: What a Composer worker process runs (Celery executor); its argv is what argparse would read.
WORKER_ARGV = ["/usr/local/bin/airflow", "celery", "worker"]


def guide_commands() -> list[list[str]]:
    """Every shell command in the guide's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def flag(words: list[str], name: str) -> str | None:
    for i, word in enumerate(words):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name:
            return words[i + 1]
    return None


def guide_uploads() -> list[tuple[str, str, str]]:
    """(bucket folder, --source, --destination) of each ``gcloud composer environments storage X import``."""
    uploads = []
    for words in guide_commands():
        if words[:4] == ["gcloud", "composer", "environments", "storage"] and words[5:6] == ["import"]:
            uploads.append((words[4], flag(words, "--source"), flag(words, "--destination") or ""))
    return uploads


def lay_out_as_the_guide_does(bucket: Path) -> None:
    """What the uploads leave in the environment's bucket (and Composer syncs to its workers).

    ``storage <folder> import --source=S [--destination=D]`` copies S recursively, dot files
    included, to ``<folder>/D/<name of S>``.
    """
    for folder in ("dags", "plugins", "data"):
        (bucket / folder).mkdir(parents=True)
    for folder, source, destination in guide_uploads():
        src = REPO / source
        target = bucket / folder / destination / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)


CHILD = r"""
import json, os, sys
bucket = sys.argv[1]
plugins = os.path.join(bucket, "plugins")
# aifs comes only from where the guide put it, not from a checkout (the editable install's .pth)
sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or ".", "aifs", "__init__.py"))]
sys.argv = json.loads(sys.argv[2])
main_module = sys.modules["__main__"]
# every module body run from the plugins folder, whoever runs it (an import, the plugin loader)
executed = []
sys.addaudithook(lambda event, args: event == "exec" and executed.append(getattr(args[0], "co_filename", "")))

from airflow import plugins_manager, settings

plugins_manager.ensure_plugins_loaded()
loaded, plugin_errors = plugins_manager._get_plugins()
result = {"plugins": sorted(str(p.source) for p in loaded), "plugin_errors": plugin_errors,
          "main_replaced": sys.modules["__main__"] is not main_module,
          "run_by_loader": sorted({f for f in executed if f.startswith(plugins + os.sep)})}
if os.environ.get("AIFS_TEST_DAGBAG") == "1":
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=settings.DAGS_FOLDER)
    import aifs
    result.update(dags=sorted(bag.dag_ids), dag_errors={k: str(v)[-2000:] for k, v in bag.import_errors.items()},
                  aifs_from=aifs.__file__)
# a module of the package loaded under any other name than its own was run by the plugin loader
stray = {}
for name, module in list(sys.modules.items()):
    path = getattr(module, "__file__", None) or ""
    if path.startswith(plugins + os.sep):
        rel = os.path.relpath(path, plugins)[: -len(".py")].split(os.sep)
        expected = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        if name != expected:
            stray[name] = path
result["stray"] = stray
print("RESULT " + json.dumps(result))
"""


def load_in_a_worker_process(bucket: Path, tmp_path: Path, *, dagbag: bool, syntax: str = "glob") -> tuple[subprocess.CompletedProcess, dict | None]:
    home = tmp_path / "airflow-home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__DAGS_FOLDER": str(bucket / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(bucket / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAG_IGNORE_FILE_SYNTAX": syntax,
        "AIFS_TEST_DAGBAG": "1" if dagbag else "0",
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(bucket), json.dumps(WORKER_ARGV)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    return proc, json.loads(line[len("RESULT "):]) if line else None


def test_the_guide_uploads_the_dag_the_package_the_startup_script_and_requirements_txt():
    uploads = guide_uploads()
    for dag_file in sorted(REPO.glob("dags/*.py")):  # every DAG the repository ships: inputs, forecast, products
        assert ("dags", f"dags/{dag_file.name}", "") in uploads, dag_file.name
    assert ("plugins", "plugins/aifs", "") in uploads
    assert ("data", "include/startup-script.sh", "") in uploads
    for _, source, _ in uploads:
        assert (REPO / source).exists(), source
    # what travels with the package keeps the plugin loader out of it
    assert (REPO / "plugins" / "aifs" / ".airflowignore").is_file()
    packages = [flag(w, "--update-pypi-packages-from-file") for w in guide_commands() if w[:3] == ["gcloud", "composer", "environments"]]
    assert "requirements.txt" in packages


@pytest.mark.parametrize("syntax", ["glob", "regexp"])
def test_guide_exact_deployment_loads_under_a_composer_workers_argv(tmp_path, syntax):
    bucket = tmp_path / "bucket"
    lay_out_as_the_guide_does(bucket)
    proc, result = load_in_a_worker_process(bucket, tmp_path, dagbag=True, syntax=syntax)
    # no RESULT: something under plugins/ ended the process (SystemExit from an aifs entry point)
    assert proc.returncode == 0 and result is not None, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert result["plugin_errors"] == {}, result["plugin_errors"]
    assert result["plugins"] == [] and result["run_by_loader"] == [], f"the plugin loader ran {result['run_by_loader']}"
    assert result["stray"] == {}, f"aifs modules run by the plugin loader: {result['stray']}"
    assert not result["main_replaced"]
    assert result["dag_errors"] == {}, json.dumps(result["dag_errors"], indent=1)
    assert {DAG_ID, "aifs_ens_inputs", "aifs_ens_products"} <= set(result["dags"]), result["dags"]
    assert result["aifs_from"].startswith(str(bucket / "plugins" / "aifs")), result["aifs_from"]
    assert "usage:" not in proc.stderr


def test_without_any_airflowignore_no_aifs_entry_point_runs(tmp_path):
    """The second line of defence: a copy that lost its .airflowignore still runs no aifs command."""
    bucket = tmp_path / "bucket"
    lay_out_as_the_guide_does(bucket)
    for ignore in (bucket / "plugins").rglob(".airflowignore"):
        ignore.unlink()
    proc, result = load_in_a_worker_process(bucket, tmp_path, dagbag=False)
    assert proc.returncode == 0 and result is not None, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    # the loader did run the entry points' files (as "__main__"), and they did nothing
    for entry_point in ("testing", "worker"):
        assert str(bucket / "plugins" / "aifs" / entry_point / "__main__.py") in result["run_by_loader"], result["run_by_loader"]
    assert "usage:" not in proc.stderr and "invalid choice" not in proc.stderr


def test_the_compose_stack_mounts_the_package_as_the_guide_uploads_it():
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    plugins_mounts = {}
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes") or []:
            host, _, container = volume.partition(":")
            if container.startswith("/opt/airflow/plugins"):
                plugins_mounts[name] = (host, container)
    assert plugins_mounts, "the stack mounts no plugins"
    guide = {(folder, source) for folder, source, _ in guide_uploads() if folder == "plugins"}
    for name, (host, container) in plugins_mounts.items():
        rel = Path(container).relative_to("/opt/airflow/plugins")
        assert ("plugins", host.removeprefix("./")) in guide and rel == Path(Path(host).name), (name, host, container)
