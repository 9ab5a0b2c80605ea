"""Failure alerts for tasks and runs, sent through a provider's notifier.

Where alerts go is configuration, not code:

* the Airflow Variable ``aifs_alerts`` (JSON), when set, decides:
  ``{"notifier": "apprise", "conn_id": "aifs_alerts"}``,
  ``{"notifier": "slack", "conn_id": "slack_api_default", "channel": "#forecasts"}`` or
  ``{"notifier": "smtp", "conn_id": "smtp_default", "to": "team@example.org"}``;
* otherwise the connection ``aifs_alerts`` alone is enough: its type picks the notifier
  (``apprise``, ``slack``, ``smtp``/``email``; for SMTP its extra gives ``to``);
* with neither, a failure is only logged (saying how to configure alerts).

Everything is looked up when a failure happens, never when the DAG is parsed, and an alert
that cannot be sent is logged, never raised: a broken alert channel must not hide the failure.
"""

from __future__ import annotations

import html
import json
import logging
from typing import Any

from aifs.members import member_label
from aifs.orchestration.outcomes import rerun_instructions

ALERTS_CONN_ID = "aifs_alerts"
ALERTS_VARIABLE = "aifs_alerts"
#: XCom key under which verify leaves what it found missing, for the run-failure alert.
FINDINGS_KEY = "findings"
#: Tasks that leave findings: the forecast DAG's verify, the products DAG's check_products.
FINDINGS_TASKS = ("verify", "check_products")
FORECAST_DAG_ID = "aifs_ens_forecast"
NOTIFIERS = ("apprise", "slack", "smtp")

log = logging.getLogger(__name__)


class AlertConfigError(ValueError):
    pass


# -- where alerts go ---------------------------------------------------------------------------


def alert_settings() -> dict[str, Any] | None:
    """The alert channel from the Variable, else from the connection's type; None when not configured."""
    from airflow.sdk import Variable

    raw = Variable.get(ALERTS_VARIABLE, default=None)
    if raw:
        settings = json.loads(raw) if isinstance(raw, str) else dict(raw)
        settings.setdefault("conn_id", ALERTS_CONN_ID)
        if settings.get("notifier") not in NOTIFIERS:
            raise AlertConfigError(f"Variable {ALERTS_VARIABLE}: 'notifier' must be one of {', '.join(NOTIFIERS)}")
        return settings

    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(ALERTS_CONN_ID)
    except Exception:  # AirflowNotFoundException, but also no metadata access at all
        return None
    kind = {"apprise": "apprise", "slack": "slack", "slackwebhook": "slack", "smtp": "smtp", "email": "smtp"}.get(
        (conn.conn_type or "").lower()
    )
    if kind is None:
        raise AlertConfigError(f"connection {ALERTS_CONN_ID} has type {conn.conn_type!r}; use apprise, slack or smtp")
    return {"notifier": kind, "conn_id": ALERTS_CONN_ID, **(conn.extra_dejson.get("alerts") or {}), **_smtp_to(conn)}


def _smtp_to(conn) -> dict[str, Any]:
    to = conn.extra_dejson.get("to")
    return {"to": to} if to else {}


def build_notifier(settings: dict[str, Any], title: str, body: str):
    """A provider notifier for the message; providers are imported only when used."""
    kind, conn_id = settings["notifier"], settings["conn_id"]
    if kind == "apprise":
        from airflow.providers.apprise.notifications.apprise import AppriseNotifier
        from apprise import NotifyType

        return AppriseNotifier(
            title=title, body=body, notify_type=NotifyType.FAILURE, apprise_conn_id=conn_id, tag=settings.get("tag", "all")
        )
    if kind == "slack":
        try:
            from airflow.providers.slack.notifications.slack import SlackNotifier
        except ImportError as exc:
            raise AlertConfigError("Slack alerts need apache-airflow-providers-slack in the Airflow environment") from exc
        kwargs = {"channel": settings["channel"]} if settings.get("channel") else {}
        return SlackNotifier(slack_conn_id=conn_id, text=f"*{title}*\n```\n{body}\n```", **kwargs)
    if kind == "smtp":
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        if not settings.get("to"):
            raise AlertConfigError("SMTP alerts need a recipient: 'to' in the Variable or the connection's extra")
        return SmtpNotifier(
            to=settings["to"], smtp_conn_id=conn_id, subject=title, html_content=f"<pre>{html.escape(body)}</pre>"
        )
    raise AlertConfigError(f"unknown notifier {kind!r}")


def send_alert(title: str, body: str, context: dict[str, Any]) -> bool:
    """Send one alert; True when a notifier accepted it. Never raises."""
    try:
        settings = alert_settings()
        if settings is None:
            log.warning(
                "no alert channel configured (connection %s or Variable %s); the alert was:\n%s\n%s",
                ALERTS_CONN_ID, ALERTS_VARIABLE, title, body,
            )
            return False
        # notify(), not __call__: the body is final text, Jinja must not touch it
        build_notifier(settings, title, body).notify(context)
        log.info("alert sent via %s: %s", settings["notifier"], title)
        return True
    except Exception:
        log.exception("could not send the alert %r", title)
        return False


# -- what alerts say ---------------------------------------------------------------------------


def _run_config(context: dict[str, Any]) -> dict[str, Any]:
    """The run's resolved config (check_params' XCom), or what can be rebuilt from params."""
    ti = context.get("ti")
    try:
        config = ti.xcom_pull(task_ids="check_params") if ti else None
        if isinstance(config, dict):
            return config
    except Exception:  # the callback may run where XComs cannot be read
        pass
    params = dict(context.get("params") or {})
    date = params.get("date")
    if not date:
        try:
            from aifs.orchestration.params import forecast_date

            dag_run = context.get("dag_run")
            date = forecast_date(
                None,
                getattr(dag_run, "logical_date", None),
                getattr(dag_run, "run_after", None),
                int(params.get("cycle_hour", 0)),
            )
        except Exception:
            date = "unknown"
    return {"date": date, "bucket": params.get("bucket", "?"), "members_text": params.get("members", "?")}


def _member_of(ti) -> int | None:
    if ti is None or getattr(ti, "task_id", None) != "run_member":
        return None
    task = getattr(ti, "task", None)
    member = getattr(task, "member", None)  # the run_member operator (aifs.orchestration.member_task)
    if not isinstance(member, int):
        member = (getattr(task, "op_kwargs", None) or {}).get("member")
    return member if isinstance(member, int) else None


def task_failure_message(context: dict[str, Any]) -> tuple[str, str]:
    ti = context["ti"]
    dag_id = ti.dag_id
    config = _run_config(context)
    member = _member_of(ti)
    map_index = getattr(ti, "map_index", -1)
    what = f"{ti.task_id} [{map_index}] ({member_label(member)})" if member is not None else ti.task_id
    max_tries = getattr(ti, "max_tries", None)
    tries = f"try {ti.try_number}" + (f" of {max_tries + 1}" if isinstance(max_tries, int) else "")
    error = context.get("exception")
    title = f"AIFS-ENS {config['date']}: {what} failed"
    lines = [
        f"DAG: {dag_id}",
        f"Run: {ti.run_id}",
        f"Date: {config['date']}",
        f"Task: {what}, {tries}",
    ]
    if member is not None:
        lines.append(f"Member: {member_label(member)}")
    if error is not None:
        lines.append(f"Error: {error}")
    lines.append(f"Log: {ti.log_url}")
    if member is not None:
        lines.append(rerun_instructions(dag_id, ti.run_id, config["date"], [(member, map_index)]))
    else:
        lines.append(
            f"How to rerun: fix the cause, then clear {ti.task_id} in run {ti.run_id} (Airflow UI, or "
            f"airflow tasks clear {dag_id} -t '^{ti.task_id}$' -s <date> -e <date>), or trigger the date again."
        )
    return title, "\n".join(lines)


def run_failure_message(context: dict[str, Any]) -> tuple[str, str]:
    ti = context.get("ti")
    dag = context.get("dag")
    dag_id = getattr(dag, "dag_id", None) or getattr(ti, "dag_id", "?")
    run_id = context.get("run_id") or getattr(ti, "run_id", "?")
    config = _run_config(context)
    title = f"AIFS-ENS {config['date']}: run {run_id} failed"
    lines = [
        f"DAG: {dag_id}",
        f"Run: {run_id}",
        f"Date: {config['date']}",
        f"Members selected: {config.get('members_text', '?')}",
        f"Reason: {context.get('reason', 'task_failure')}",
    ]
    if ti is not None:
        lines.append(f"Last failed task: {ti.task_id}" + (f" [{ti.map_index}]" if getattr(ti, "map_index", -1) >= 0 else ""))
        lines.append(f"Log: {ti.log_url}")
        lines += _report_lines(ti, config, context)
        findings = _verify_findings(ti, context)
        if findings:
            lines.append(f"Verify found: {findings}")
            if "How to rerun" in findings:
                return title, "\n".join(lines)
    lines.append(
        "How to rerun: clear the failed tasks of this run in the Airflow UI (each failed run_member comes "
        f"back with its own host), or trigger the date again, which skips finished members: "
        f"airflow dags trigger {dag_id} --conf '{json.dumps({'date': config['date'], 'members': config.get('members_text', '1-50')})}'"
    )
    return title, "\n".join(lines)


def _products_targets(context: dict[str, Any]) -> list[dict[str, Any]]:
    """A products run's (bucket, date) pairs from its params or its triggering asset events (no XCom needed)."""
    params = dict(context.get("params") or {})
    if params.get("date") and params.get("bucket"):
        return [{"bucket": params["bucket"], "date": params["date"]}]
    events = getattr(context.get("dag_run"), "consumed_asset_events", None) or []
    extras = [getattr(e, "extra", None) or {} for e in events]
    return [{"bucket": x["bucket"], "date": x["date"]} for x in extras if isinstance(x.get("bucket"), str) and isinstance(x.get("date"), str)]


def _report_lines(ti, config: dict[str, Any], context: dict[str, Any]) -> list[str]:
    """The products report's addresses, for aifs_ens_products' alert: check_products' XCom, else the bucket.

    Like verify's findings, the XCom may be out of reach where the callback runs; the run's targets
    (check_params' config) and the bucket are not.
    """
    from aifs.orchestration.products_report import REPORT_KEY, report_addresses

    reports = None
    try:
        reports = ti.xcom_pull(task_ids="check_products", key=REPORT_KEY)
    except Exception:  # the callback may run where XComs cannot be read
        log.debug("could not read the report's address for the alert", exc_info=True)
    targets = config.get("targets") or _products_targets(context)
    if not reports and targets:
        try:
            from aifs import layout
            from aifs.orchestration.storage import get_blob, storage_client

            client = storage_client(config.get("gcp_conn_id", "google_cloud_default"))
            reports = [report_addresses(t["bucket"], layout.products_report_object(t["date"])) for t in targets
                       if get_blob(client, t["bucket"], layout.products_report_object(t["date"])) is not None]
        except Exception:
            log.debug("could not look for the report in the bucket", exc_info=True)
    return [f"Report: {r['gs']} ({r['console']})" for r in (reports or []) if isinstance(r, dict) and r.get("gs")]


def _verify_findings(ti, context: dict[str, Any]) -> str | None:
    """What verify found; read back from the bucket when its XCom is out of reach.

    DAG callbacks run outside any task (in the dag-processor, or inline under dag.test()), where
    XComs may not be readable; the bucket always is, and it is the truth verify reports on.
    """
    try:
        for task_id in FINDINGS_TASKS:
            findings = ti.xcom_pull(task_ids=task_id, key=FINDINGS_KEY)
            if isinstance(findings, str):
                return findings
    except Exception:
        pass
    if getattr(context.get("dag_run"), "dag_id", None) != FORECAST_DAG_ID:
        return None  # the bucket re-check below is the forecast run's
    try:
        from aifs.members import format_members
        from aifs.orchestration.deployment import DeploymentSettings
        from aifs.orchestration.params import resolve_run_config
        from aifs.orchestration.storage import storage_client
        from aifs.orchestration.verify import verify_run

        dag_run = context["dag_run"]
        config = resolve_run_config(
            dict(context.get("params") or {}),
            deployment=DeploymentSettings.from_env(),
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
            logical_date=dag_run.logical_date,
            run_after=getattr(dag_run, "run_after", None),
        )
        report = verify_run(storage_client(config["gcp_conn_id"]), config)
    except Exception:
        log.debug("could not re-check the bucket for the run alert", exc_info=True)
        return None
    if report.ok:
        return None
    return f"members {format_members(report.bad_members)} not complete:\n{report.describe_problems()}"


def task_failure_alert(context: dict[str, Any]) -> None:
    """on_failure_callback of the DAG's tasks."""
    title, body = task_failure_message(context)
    send_alert(title, body, context)


def run_failure_alert(context: dict[str, Any]) -> None:
    """on_failure_callback of the DAG (the whole run failed)."""
    title, body = run_failure_message(context)
    send_alert(title, body, context)
