"""Exit codes become clear task outcomes; alerts go where configuration says, with what to do."""

from __future__ import annotations

import json
import types

import pytest

from aifs.exitcodes import ExitCode
from aifs.orchestration import alerts
from aifs.orchestration.outcomes import classify, rerun_instructions


@pytest.mark.parametrize(
    "code", [ExitCode.USAGE, ExitCode.INPUT_MISSING, ExitCode.INPUT_INVALID, ExitCode.OUT_OF_DISK, ExitCode.CHECKPOINT_FAILED]
)
def test_failures_retrying_cannot_fix_are_not_retried(code):
    outcome = classify(17, code)
    assert not outcome.ok and not outcome.retryable
    assert outcome.message.startswith("member 017 failed: ")
    assert code.name in outcome.message and "not retried" in outcome.message


@pytest.mark.parametrize("code", [ExitCode.INFERENCE_FAILED, ExitCode.UPLOAD_FAILED, ExitCode.MEMBERS_FAILED, -9, 139])
def test_transient_failures_and_crashes_are_retried(code):
    outcome = classify(3, int(code))
    assert not outcome.ok and outcome.retryable
    assert "will retry" in outcome.message


def test_success():
    outcome = classify(1, 0)
    assert outcome.ok and outcome.name == "OK"


def test_rerun_instructions_name_the_map_index_and_the_date():
    text = rerun_instructions("aifs_ens_forecast", "scheduled__2025-06-01", "20250601_0000", [(17, 16), (20, None)])
    assert "run_member [16] (member 017)" in text
    body = json.loads(text.split("clearTaskInstances ", 1)[1].splitlines()[0])
    assert body["task_ids"] == [["run_member", 16]] and body["dag_run_id"] == "scheduled__2025-06-01"
    assert """airflow dags trigger aifs_ens_forecast --conf '{"date": "20250601_0000", "members": "17,20"}'""" in text


# -- alert routing ----------------------------------------------------------------------------------


def fake_context(task_id="run_member", member=17, map_index=16):
    ti = types.SimpleNamespace(
        dag_id="aifs_ens_forecast",
        task_id=task_id,
        run_id="manual__1",
        map_index=map_index,
        try_number=3,
        max_tries=2,
        log_url="http://airflow.example/dags/aifs_ens_forecast/runs/manual__1/tasks/run_member/mapped/16?try_number=3",
        task=types.SimpleNamespace(op_kwargs={"member": member}),
        xcom_pull=lambda **kw: {"date": "20250601_0000", "bucket": "b", "members_text": "1-50"},
    )
    return {"ti": ti, "exception": RuntimeError("member 017 failed: input state invalid"), "params": {}}


def test_task_alert_names_dag_date_member_try_log_and_rerun():
    title, body = alerts.task_failure_message(fake_context())
    assert title == "AIFS-ENS 20250601_0000: run_member [16] (member 017) failed"
    for expected in (
        "DAG: aifs_ens_forecast",
        "Date: 20250601_0000",
        "Member: member 017",
        "try 3 of 3",
        "Log: http://airflow.example/",
        "Error: member 017 failed: input state invalid",
        '"task_ids": [["run_member", 16]]',
    ):
        assert expected in body, expected


def test_alert_goes_to_the_apprise_connection(alert_sink):
    assert alerts.send_alert("title", "body text", fake_context())
    [message] = alert_sink.messages
    assert (message["title"], message["message"], message["type"]) == ("title", "body text", "failure")


def test_variable_overrides_the_connection(alert_sink, monkeypatch):
    """The Variable can route alerts through any connection: here another Apprise one."""
    monkeypatch.setenv("AIRFLOW_CONN_TEAM_CHAT", alert_sink.connection_env())
    monkeypatch.setenv("AIRFLOW_CONN_AIFS_ALERTS", json.dumps({"conn_type": "apprise", "extra": {"config": {"path": "json://127.0.0.1:9/"}}}))
    monkeypatch.setenv("AIRFLOW_VAR_AIFS_ALERTS", json.dumps({"notifier": "apprise", "conn_id": "team_chat"}))
    assert alerts.alert_settings() == {"notifier": "apprise", "conn_id": "team_chat"}
    assert alerts.send_alert("via variable", "b", fake_context())
    assert [m["title"] for m in alert_sink.messages] == ["via variable"]


def test_no_channel_configured_logs_instead(monkeypatch, caplog):
    monkeypatch.delenv("AIRFLOW_CONN_AIFS_ALERTS", raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_AIFS_ALERTS", raising=False)
    assert alerts.alert_settings() is None
    assert alerts.send_alert("t", "the body", fake_context()) is False
    assert "no alert channel configured" in caplog.text and "the body" in caplog.text


def test_connection_type_picks_the_notifier(monkeypatch):
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    monkeypatch.delenv("AIRFLOW_VAR_AIFS_ALERTS", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_AIFS_ALERTS", json.dumps({"conn_type": "smtp", "host": "localhost", "extra": {"to": "team@example.org"}}))
    settings = alerts.alert_settings()
    assert settings == {"notifier": "smtp", "conn_id": "aifs_alerts", "to": "team@example.org"}
    notifier = alerts.build_notifier(settings, "subject", "body <b>")
    assert isinstance(notifier, SmtpNotifier) and "body &lt;b&gt;" in notifier.html_content


def test_misconfiguration_is_reported_not_raised(monkeypatch, caplog):
    monkeypatch.setenv("AIRFLOW_VAR_AIFS_ALERTS", json.dumps({"notifier": "pager"}))
    with pytest.raises(alerts.AlertConfigError):
        alerts.alert_settings()
    assert alerts.send_alert("t", "b", fake_context()) is False
    assert "could not send the alert" in caplog.text
