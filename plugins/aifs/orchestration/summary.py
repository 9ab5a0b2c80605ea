"""The run summary the last task logs: each member's outcome and minutes, and the totals.

``run_member`` records one outcome per try as an XCom (key ``outcome``), failed tries included,
so the summary does not need the metadata database (Airflow 3 tasks have no access to it).
"""

from __future__ import annotations

from typing import Any

from aifs.members import member_label

OUTCOME_KEY = "outcome"


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


def format_summary(date: str, bucket: str, rows: list[dict]) -> str:
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
    return "\n".join(lines)
