"""requirements.txt is what a Composer environment needs for the DAG, enough, and acceptable to Composer.

requirements.txt states floors (Composer keeps its own provider versions and applies the list whole
or not at all); requirements-airflow-local.txt pins the exact set the tests run with.

Proving "the DAG parses with requirements.txt alone" by installing Airflow and the providers into
a fresh virtualenv costs 2-5 minutes and the network on every run (the resolve alone took 2m11s
here), so the fast test builds that environment from what is already installed instead:

1. the Airflow environment running these tests was built by ``pip install -r
   requirements-airflow-local.txt`` (= the Composer Airflow pin + ``-r requirements.txt`` + the
   exact tested provider pins) plus the test tools; the test first checks that every pin of that
   file is installed at exactly its version here (so every floor of requirements.txt holds);
2. it walks the installed metadata (Requires-Dist, markers, extras) from those roots to the full
   dependency closure, failing on any requirement the environment cannot satisfy;
3. it lays out a site directory holding only that closure: each installed file, by its
   distribution's RECORD, linked in when its distribution is in the closure; a namespace directory
   shared with a package outside the closure is split file by file. The test tools (pytest,
   gcp-storage-emulator, shellcheck), the editable ``aifs`` install and anything installed by hand
   are left out, and so would torch or anemoi be;
4. a child Python started with ``-I -S`` (no site-packages, no PYTHON* variables, no user site)
   gets that directory through ``site.addsitedir`` and plugins/ on sys.path, as Composer does,
   proves torch, anemoi and the test tools are not importable, and parses
   dags/aifs_ens_forecast.py with Airflow's DagBag: no import errors, the DAG is there.

That Composer accepts requirements.txt is checked by asking pip (``--dry-run``, the registry only)
to install it on top of the tested Airflow with Composer-style preinstalled providers at other
versions than ours, held by a constraints file (``test_requirements_install_over_*``; the same
command the operator's guide gives for checking a new Composer image).

What this does not prove: that PyPI would resolve the same versions today (the pins make that
likely, and ``AIFS_TEST_RESOLVE=1`` runs the slow check that asks pip to resolve
requirements-airflow-local.txt afresh and compares), nor that the code works with every provider
version its floors admit (the floors are where its APIs appeared; the tests run the pinned set).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[3]
PLUGINS = REPO / "plugins"
DAG_FILE = REPO / "dags" / "aifs_ens_forecast.py"
DAG_ID = "aifs_ens_forecast"
#: The GPU stack: none of it belongs in Composer (the model runs on the GPU host).
WORKER_ONLY = {"torch", "anemoi-inference", "anemoi-models", "anemoi-utils", "anemoi-transform", "anemoi-graphs",
               "earthkit-data", "eccodes", "eccodeslib", "flash-attn", "torch-geometric", "triton"}


def requirement_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def local_pins() -> list[Requirement]:
    """requirements-airflow-local.txt without its ``-r requirements.txt``: Airflow and the tested providers."""
    return [Requirement(x) for x in requirement_lines(REPO / "requirements-airflow-local.txt") if not x.startswith("-")]


def composer_roots() -> list[Requirement]:
    """What a Composer environment has: its Airflow (the pin we test) plus requirements.txt."""
    airflow = [r for r in local_pins() if canonicalize_name(r.name) == "apache-airflow"]
    return airflow + [Requirement(x) for x in requirement_lines(REPO / "requirements.txt")]


def installed() -> dict[str, md.Distribution]:
    dists: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        dists.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    return dists


def closure(roots: list[Requirement], dists: dict[str, md.Distribution]) -> tuple[set[str], list[str]]:
    """Names of every distribution the roots need (markers and extras evaluated here), and problems."""
    needed: set[str] = set()
    seen: set[tuple[str, str]] = set()
    problems: list[str] = []
    todo: list[tuple[Requirement, str]] = [(r, "") for r in roots]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        dist = dists.get(name)
        if dist is None:
            problems.append(f"{req} is needed but not installed")
            continue
        if not req.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{req} is needed but {name} {dist.version} is installed")
        for wanted in [""] + sorted(req.extras):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            needed.add(name)
            for line in dist.requires or []:
                todo.append((Requirement(line), wanted))
    return needed, problems


def provider_imports() -> list[tuple[str, str]]:
    """(module, name) of every ``from airflow.providers... import name`` in the Airflow-side code.

    Most are lazy (inside functions, run only by one backend or one notifier), so parsing the DAG
    alone would not import them. Imports guarded by ``except ImportError`` are optional (Slack).
    """
    found: set[tuple[str, str]] = set()
    files = list((PLUGINS / "aifs" / "orchestration").rglob("*.py")) + list(DAG_FILE.parent.glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        optional: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
            ):
                optional.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("airflow.providers.") and id(node) not in optional:
                found.update((node.module, alias.name) for alias in node.names)
    return sorted(found)


def provider_distribution(module: str, dists: dict[str, md.Distribution]) -> str:
    """``airflow.providers.cncf.kubernetes.x`` -> ``apache-airflow-providers-cncf-kubernetes``."""
    parts = module.split(".")[2:]
    for n in range(len(parts), 0, -1):
        name = "apache-airflow-providers-" + "-".join(parts[:n])
        if name in dists:
            return name
    raise AssertionError(f"no installed provider distribution provides {module}")


def build_site(target: Path, allowed: set[str], dists: dict[str, md.Distribution]) -> int:
    """Link into ``target`` the installed files of the ``allowed`` distributions; returns links made."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    file_owners: dict[str, set[str]] = defaultdict(set)
    dir_owners: dict[str, set[str]] = defaultdict(set)
    for name, dist in dists.items():
        for f in dist.files or []:
            full = Path(dist.locate_file(f)).resolve() if not str(f).startswith("..") else None
            if full is None or site not in full.parents:
                continue
            rel = full.relative_to(site).parts
            file_owners["/".join(rel)].add(name)
            for i in range(1, len(rel)):
                dir_owners["/".join(rel[:i])].add(name)

    links = 0

    def place(rel: str) -> None:
        nonlocal links
        src = site / rel
        if src.is_dir() and not src.is_symlink():
            owners = dir_owners.get(rel, set())
            if owners and owners <= allowed:
                (target / rel).symlink_to(src, target_is_directory=True)
                links += 1
            elif owners & allowed:
                (target / rel).mkdir()
                for child in sorted(os.listdir(src)):
                    place(f"{rel}/{child}")
        elif file_owners.get(rel, set()) & allowed:
            (target / rel).symlink_to(src)
            links += 1

    for entry in sorted(os.listdir(site)):
        place(entry)
    return links


# -- the fast checks --------------------------------------------------------------------------------


def test_requirements_are_floors_and_the_local_file_pins_the_tested_set():
    lines = requirement_lines(REPO / "requirements.txt")
    assert lines, "requirements.txt is empty"
    floors = {}
    for line in lines:
        req = Requirement(line)
        ops = sorted(s.operator for s in req.specifier)
        # an exact pin of a package Composer preinstalls at another version blocks the whole update
        assert ops in ([">="], ["<", ">="]), f"{line}: Composer gets floors (name>=version, optionally <next major)"
        assert not req.extras and req.marker is None, line
        assert canonicalize_name(req.name) not in WORKER_ONLY, f"{line}: the worker stack does not belong in Composer"
        floors[canonicalize_name(req.name)] = req
    # the local Airflow environment: the Composer Airflow pin, requirements.txt, and the exact tested
    # version of each of its packages (plus providers Airflow itself needs, pinned as tested)
    local = requirement_lines(REPO / "requirements-airflow-local.txt")
    assert [x for x in local if x.startswith("-")] == ["-r requirements.txt"]
    pins = {canonicalize_name(r.name): r for r in local_pins()}
    for name, req in pins.items():
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{req}: the local file pins exact versions"
        assert name == "apache-airflow" or name.startswith("apache-airflow-providers-"), f"{req}: not Airflow or a provider"
    assert "apache-airflow" in pins
    for name, floor in floors.items():
        assert name in pins, f"{name}: requirements-airflow-local.txt must pin the version the tests run with"
        tested = next(iter(pins[name].specifier)).version
        assert floor.specifier.contains(tested), f"{floor} excludes the tested {name}=={tested}"


def test_this_environment_has_the_tested_set_exactly():
    dists = installed()
    for req in local_pins() + composer_roots():
        dist = dists.get(canonicalize_name(req.name))
        assert dist is not None, f"{req} is not installed: rebuild the Airflow environment (make env)"
        assert req.specifier.contains(dist.version), f"{req} required, {dist.version} installed: rebuild (make env)"


def test_every_pin_is_used():
    """Each pin is a provider the code imports, or part of Airflow itself (pinned as Composer has it)."""
    dists = installed()
    used = {provider_distribution(module, dists) for module, _ in provider_imports()}
    airflow_deps = {canonicalize_name(Requirement(r).name) for r in dists["apache-airflow"].requires or []
                    if "extra ==" not in r} | {canonicalize_name(Requirement(r).name) for r in dists["apache-airflow-core"].requires or []
                    if "extra ==" not in r}
    for line in requirement_lines(REPO / "requirements.txt"):
        name = canonicalize_name(Requirement(line).name)
        assert name in used or name in airflow_deps, f"{line}: nothing in plugins/ or dags/ imports it; drop it"
    for req in local_pins():  # the tested set pins nothing else either
        name = canonicalize_name(req.name)
        assert name == "apache-airflow" or name in used or name in airflow_deps, f"{req}: neither used nor part of Airflow"
    pinned = {canonicalize_name(Requirement(x).name) for x in requirement_lines(REPO / "requirements.txt")}
    missing = sorted(used - pinned - airflow_deps)
    assert not missing, f"the code imports providers that requirements.txt does not pin: {missing}"


def test_dag_parses_with_requirements_txt_alone(tmp_path):
    assert DAG_FILE.is_file(), f"{DAG_FILE} is missing"
    dists = installed()
    needed, problems = closure(composer_roots(), dists)
    assert not problems, "requirements.txt + Airflow do not resolve in this environment:\n" + "\n".join(problems)
    assert not needed & WORKER_ONLY, f"the Composer closure pulls in the worker stack: {sorted(needed & WORKER_ONLY)}"
    left_out = set(dists) - needed
    assert {"pytest", "gcp-storage-emulator"} <= left_out  # the sandbox below is really smaller than this env

    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    assert build_site(site_dir, needed, dists) > 0
    home = tmp_path / "airflow-home"
    home.mkdir()

    child = f"""
import importlib, importlib.util, json, site, sys
site.addsitedir({str(site_dir)!r})
sys.path.insert(0, {str(PLUGINS)!r})
real_site = {sysconfig.get_paths()["purelib"]!r}
leaks = [p for p in sys.path if p.startswith(real_site)]
importable = [m for m in ("torch", "anemoi", "earthkit", "pytest", "gcp_storage_emulator") if importlib.util.find_spec(m)]
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(DAG_FILE)!r}, safe_mode=False)
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "anemoi", "earthkit", "eccodes"}})
unimportable = []
for module, name in {provider_imports()!r}:
    try:
        getattr(importlib.import_module(module), name)
    except Exception as exc:
        unimportable.append(f"{{module}}.{{name}}: {{type(exc).__name__}}: {{exc}}")
import aifs.orchestration.backends.base as backends
for backend in backends.BACKEND_NAMES:
    try:
        importlib.import_module(backends._MODULES[backend])
    except Exception as exc:
        unimportable.append(f"backend {{backend}}: {{type(exc).__name__}}: {{exc}}")
import airflow
print("RESULT " + json.dumps({{"leaks": leaks, "importable": importable, "heavy": heavy, "unimportable": unimportable,
    "errors": {{k: str(v)[-2000:] for k, v in bag.import_errors.items()}}, "dags": sorted(bag.dag_ids),
    "airflow": airflow.__version__, "airflow_from": airflow.__file__}}))
"""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
    }
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", child], env=env, capture_output=True, text=True, timeout=240)
    result_lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and result_lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(result_lines[-1][len("RESULT "):])
    assert result["leaks"] == [], "the child saw the full environment"
    assert result["importable"] == [], f"importable without being in requirements.txt: {result['importable']}"
    assert result["airflow_from"].startswith(str(site_dir)), result["airflow_from"]
    assert result["errors"] == {}, json.dumps(result["errors"], indent=1)
    assert DAG_ID in result["dags"]
    assert result["heavy"] == [], f"parsing the DAG imported {result['heavy']}"
    # what the backends and notifiers import when they run, also there with requirements.txt alone
    assert result["unimportable"] == [], "\n".join(result["unimportable"])


# -- Composer accepts requirements.txt: pip against preinstalled providers (the registry, ~20 s) ------

#: Composer-style environments: Airflow as tested, its providers preinstalled at versions other than
#: the tested set (real PyPI releases), which pip may not move. "older-image": what an image built a
#: few months before our pins could hold; "at-the-floors": every floor of requirements.txt itself.
COMPOSER_STYLE_IMAGES = {
    "older-image": {
        "apache-airflow-providers-google": "21.1.0",
        "apache-airflow-providers-cncf-kubernetes": "10.22.0",
        "apache-airflow-providers-ssh": "6.1.0",
        "apache-airflow-providers-apprise": "2.3.4",
        "apache-airflow-providers-standard": "1.20.0",
    },
    "at-the-floors": None,  # filled from requirements.txt
}
#: pip settings that reach the registry; the rest of this machine's pip configuration (find-links,
#: global constraints, extra indexes) is left out so the check asks only PyPI.
PIP_REGISTRY_ENV = ("PIP_INDEX_URL", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT")


def guide_check_command() -> list[str]:
    """The operator's guide's command for checking an image: ``pip install --dry-run -c <image list> ...``."""
    guide = (REPO / "docs" / "operators-guide.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", guide, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if Path(word).name == "pip" and words[i + 1:i + 3] == ["install", "--dry-run"]:
                    return words[i + 1:]
    raise AssertionError("the operator's guide gives no `pip install --dry-run` command for checking a Composer image")


@pytest.fixture(scope="module")
def registry_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update({k: os.environ[k] for k in PIP_REGISTRY_ENV if k in os.environ})
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    index = env.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/") + "/pip/"
    try:
        urllib.request.urlopen(index, timeout=10).close()
    except OSError as exc:  # the only reason to skip: CI has PyPI
        pytest.skip(f"package registry unreachable ({index}: {exc})")
    return env


@pytest.mark.timeout(300)
@pytest.mark.parametrize("image", sorted(COMPOSER_STYLE_IMAGES))
def test_requirements_install_over_composer_style_preinstalled_providers(tmp_path, registry_env, image):
    preinstalled = COMPOSER_STYLE_IMAGES[image] or {
        canonicalize_name(r.name): next((s.version for s in r.specifier if s.operator == ">="), None)
        for r in map(Requirement, requirement_lines(REPO / "requirements.txt"))
    }
    assert None not in preinstalled.values(), f"requirements.txt states no floor for some of {sorted(preinstalled)}"
    tested = {canonicalize_name(r.name): next(iter(r.specifier)).version for r in local_pins()}
    assert all(tested.get(canonicalize_name(n)) != v for n, v in preinstalled.items()), "pick versions other than ours"
    image_list = tmp_path / "image-packages.txt"
    image_list.write_text("".join(f"{n}=={v}\n" for n, v in {"apache-airflow": tested["apache-airflow"], **preinstalled}.items()))
    args = guide_check_command()
    constraints = args[args.index("-c") + 1]
    args[args.index("-c") + 1] = str(image_list)
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--quiet", "--report", str(report)],
        cwd=REPO, env=registry_env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, f"requirements.txt does not install over {image} ({constraints}):\n{proc.stderr[-3000:]}"
    moved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    # Airflow stays as it is; each preinstalled provider is kept at the image's version
    assert not {"apache-airflow", "apache-airflow-core", "apache-airflow-task-sdk"} & set(moved), moved
    for name, version in preinstalled.items():
        assert moved.get(canonicalize_name(name), version) == version, (name, moved)


# -- the slow check: a fresh resolve by pip (network, ~2 minutes) ----------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("AIFS_TEST_RESOLVE") != "1", reason="set AIFS_TEST_RESOLVE=1: asks PyPI, ~2 min")
def test_fresh_resolve_matches_this_environment(tmp_path):
    """pip resolves requirements-airflow-local.txt afresh to what the fast test used."""
    report = tmp_path / "report.json"
    args = [str(r) for r in local_pins() + composer_roots()]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *args],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    dists = installed()
    needed, _ = closure(composer_roots(), dists)
    mismatched = {n: (v, dists[n].version if n in dists else None) for n, v in resolved.items()
                  if n != "setuptools" and (n not in dists or dists[n].version != v)}
    assert mismatched == {}, f"fresh resolve (version, installed here): {mismatched}"
    assert needed - {"setuptools"} <= set(resolved), sorted(needed - set(resolved))
    assert not any(re.fullmatch(n, "torch") for n in resolved)
