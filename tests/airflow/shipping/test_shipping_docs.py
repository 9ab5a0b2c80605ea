"""The operator's guide and the cost page stay true to the code: names, presets, paths and sums."""

from __future__ import annotations

import re
from pathlib import Path

from aifs import hostcontract, layout
from aifs.orchestration.alerts import ALERTS_CONN_ID, ALERTS_VARIABLE
from aifs.orchestration.backends.gce import GPU_MACHINE_TYPES, GCEBackend

REPO = Path(__file__).resolve().parents[3]
GUIDE = (REPO / "docs" / "operators-guide.md").read_text()
COST = (REPO / "docs" / "cost.md").read_text()


def test_files_and_commands_the_guide_names_exist():
    for rel in set(re.findall(r"\b((?:include|dags|plugins|docs)/[\w./-]+\.(?:sh|py|yaml|md|txt)|requirements[\w-]*\.txt|docker-compose\.yaml)\b", GUIDE + COST)):
        assert (REPO / rel).exists() or (REPO / "docs" / rel).exists(), rel
    assert "include/Dockerfile" in GUIDE and (REPO / "include" / "Dockerfile").is_file()


def test_gpu_presets_and_host_settings_match_the_gce_backend():
    rows = dict(re.findall(r"^\| `([a-z0-9-]+)`[^|]*\| ([a-z0-9-]+),", GUIDE, flags=re.MULTILINE))
    assert rows == GPU_MACHINE_TYPES
    for gpu, machine in GPU_MACHINE_TYPES.items():
        assert re.search(rf"\(`{gpu}`\) \| {machine} ", COST), f"cost.md has no row for {gpu} on {machine}"
    # every key of the documented host JSON is a setting of the gce backend
    host = re.search(r'AIFS_ENS_HOST: \|\n  \{(.*?)\n  \}', GUIDE, flags=re.DOTALL).group(1)
    keys = set(re.findall(r'"([a-z_]+)":', host))
    properties = GCEBackend.SETTINGS_SCHEMA["properties"]
    assert keys <= set(properties), keys - set(properties)
    assert set(GCEBackend.SETTINGS_SCHEMA["required"]) <= keys
    for setting in ("max_run_hours", "boot_disk_gb"):
        assert setting in properties and setting in GUIDE


def test_contract_names_in_the_guide():
    for text in (hostcontract.READY_MARKER, hostcontract.FAILED_MARKER, ALERTS_CONN_ID, ALERTS_VARIABLE, layout.DEFAULT_CHECKPOINT):
        assert text in GUIDE, text
    assert layout.forecast_filename("20251127_0000", 1, 0, 72) in GUIDE
    assert layout.forecast_filename("20251127_0000", 50, 720, 792) in GUIDE
    assert layout.input_filename(1) in GUIDE
    assert Path(layout.manifest_object("20251127_0000", 17)).name in GUIDE
    deployment = (REPO / "plugins" / "aifs" / "orchestration" / "deployment.py").read_text()
    for name in set(re.findall(r"AIFS_ENS_[A-Z_]+", GUIDE)):
        assert name in deployment, f"the guide documents {name}, which the DAG does not read"


def test_cost_table_adds_up():
    prices = {m: (float(od), float(sp)) for m, od, sp in
              re.findall(r"\| ([a-z0-9-]+) \([^)]*\) \| \$([\d.]+) \| \$([\d.]+) \|", COST)}
    assert set(prices) == set(GPU_MACHINE_TYPES.values())
    gpu_machine = {"A100 80 GB": "a2-ultragpu-1g", "A100 40 GB": "a2-highgpu-1g", "H100 80 GB": "a3-highgpu-1g", "L4 24 GB": "g2-standard-16"}
    rows = re.findall(r"^\| (A100 80 GB|A100 40 GB|H100 80 GB|L4 24 GB)[^|]*\| ~?(\d+) s \+ 30 s \|[^|]*\| ([\d.]+) h \| \**\$(\d+)\** \| \**\$(\d+)\** \|",
                      COST, flags=re.MULTILINE)
    assert len(rows) == 4
    for gpu, member_s, hours, od, sp in rows:
        vm_hours = (50 * (int(member_s) + 30) + 15 * 60) / 3600
        assert abs(vm_hours - float(hours)) < 0.06, (gpu, vm_hours, hours)
        on_demand, spot = prices[gpu_machine[gpu]]
        assert abs(vm_hours * on_demand - int(od)) <= 1, (gpu, vm_hours * on_demand, od)
        assert abs(vm_hours * spot - int(sp)) <= 1, (gpu, vm_hours * spot, sp)
