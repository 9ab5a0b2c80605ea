"""The run summary the last task logs: each member's outcome and minutes, and the totals.

``run_member`` records one outcome per try as an XCom (key ``outcome``), failed tries included,
so the summary does not need the metadata database (Airflow 3 tasks have no access to it).
For the same reason the host's fate is read from XComs: create_host's facts (its return value),
delete_host's result (returned only once the host is gone), and what a failed create_host could
not clean up (key ``HOST_LEFT_KEY``). A host left behind bills until someone removes it, so the
summary names it and says how to remove it.
"""

from __future__ import annotations

from typing import Any

from aifs.members import member_label

OUTCOME_KEY = "outcome"
#: XCom key create_host pushes when its last try failed and deleting the half-made host failed too.
HOST_LEFT_KEY = "host_left_behind"


def outcome_record(member: int, exit_code: int, name: str, seconds: float, try_number: int) -> dict[str, Any]:
    return {"member": member, "exit_code": exit_code, "name": name, "minutes": round(seconds / 60.0, 2), "try": try_number}


def normalise_outcomes(pulled: Any) -> dict[int, dict[str, Any]]:
    """XCom pull results (one dict, a list, or None) -> {member: record}."""
    if pulled is None:
        return {}
    records = [pulled] if isinstance(pulled, dict) else list(pulled)
    return {r["member"]: r for r in records if isinstance(r, dict) and "member" in r}


def member_states(selected: list[int], planned: list[int] | None, outcomes: dict[int, dict[str, Any]], bad: set[int]) -> list[dict]:
    """One row per selected member: state is done, failed, skipped (finished earlier) or not run."""
    planned_set = set(planned or [])
    rows = []
    for member in selected:
        record = outcomes.get(member)
        if planned is not None and member not in planned_set:
            state, minutes = "skipped (finished before this run)", None
        elif record is None:
            state, minutes = "not run", None
        elif record["exit_code"] == 0:
            state, minutes = "done", record["minutes"]
        else:
            state, minutes = f"failed: {record['name']} (exit {record['exit_code']}, try {record['try']})", record["minutes"]
        if member in bad and state.startswith(("done", "skipped")):
            state += ", but NOT complete in the bucket"
        rows.append({"member": member, "state": state, "minutes": minutes})
    return rows


def half_made_host(backend: str, host_backend: Any, run: Any, error: BaseException) -> dict[str, Any]:
    """What create_host records (key HOST_LEFT_KEY) when it could not delete the host it half made."""
    facts: dict[str, Any] = {"backend": backend, "error": f"{type(error).__name__}: {error}"[:500]}
    instance_name = getattr(host_backend, "instance_name", None)  # gce: the VM is named by the run
    if callable(instance_name):
        settings = getattr(host_backend, "settings", {})
        facts.update(instance=instance_name(run), zone=settings.get("zone"), project_id=settings.get("project_id"))
    return facts


def removal_advice(backend: str, host: dict[str, Any]) -> str:
    """How to remove a host left behind by hand, from the facts create_host returned."""
    if backend == "gce" and host.get("instance"):
        return (f"delete the VM: gcloud compute instances delete {host['instance']} --zone {host.get('zone')} "
                f"--project {host.get('project_id')} --quiet (it deletes itself at its max_run_hours otherwise)")
    if backend == "local" and host.get("scratch"):
        return f"stop any 'python -m aifs.worker' of this run on the Airflow worker and remove {host['scratch']}"
    if backend == "ssh":
        return (f"on the host of connection {host.get('ssh_conn_id')!r}, stop this run's jobs "
                "(aifs-<date>-<run hash>-mNNN) if any still hold the GPU")
    if backend == "gke":
        return f"delete this run's member pods on cluster {host.get('cluster')} ({host.get('location')}), if any remain"
    return f"remove the {backend} host by hand"


def host_left_behind(
    backend: str, host: dict[str, Any] | None, deleted: Any, half_made: dict[str, Any] | None = None
) -> str | None:
    """A paragraph naming the host this run left behind and what to do, or None when none was.

    ``host``: create_host's return value (None: no host was made, or creation failed);
    ``deleted``: delete_host's return value (None: it did not succeed, or was skipped);
    ``half_made``: what a failed create_host could not delete (XCom ``HOST_LEFT_KEY``).
    """
    if half_made:
        what = ", ".join(f"{k} {v}" for k, v in half_made.items() if k not in ("backend", "error") and v)
        return (
            f"HOST LEFT BEHIND: create_host failed on its last try and could not delete the {backend} host it "
            f"half made{f' ({what})' if what else ''}: {half_made.get('error')}. To do: "
            f"{removal_advice(backend, half_made)}."
        )
    if host is None or deleted is not None:
        return None
    what = ", ".join(f"{k} {v}" for k, v in host.items() if k in ("instance", "zone", "project_id", "scratch", "ssh_conn_id", "cluster"))
    return (
        f"HOST LEFT BEHIND: delete_host did not succeed, so the {backend} host of this run may still exist"
        f"{f' ({what})' if what else ''} and bill. To do: clear delete_host of this run (its log says why it "
        f"failed) or {removal_advice(backend, host)}."
    )


def format_summary(date: str, bucket: str, rows: list[dict], host_left: str | None = None) -> str:
    done = sum(r["state"] == "done" for r in rows)
    failed = sum(r["state"].startswith("failed") for r in rows)
    skipped = sum(r["state"].startswith("skipped") for r in rows)
    not_run = sum(r["state"] == "not run" for r in rows)
    minutes = sum(r["minutes"] or 0 for r in rows)
    lines = [f"AIFS-ENS run summary for {date} (gs://{bucket}/{date}/forecasts/)", f"{'member':<12}{'minutes':>8}  outcome"]
    for r in rows:
        shown = f"{r['minutes']:.1f}" if r["minutes"] is not None else "-"
        lines.append(f"{member_label(r['member']):<12}{shown:>8}  {r['state']}")
    lines.append(
        f"members: {done} done, {failed} failed, {skipped} skipped, {not_run} not run; {minutes:.1f} member-minutes"
    )
    if host_left:
        lines.append(host_left)
    return "\n".join(lines)
