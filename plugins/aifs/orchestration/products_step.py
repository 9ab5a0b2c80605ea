"""make_products: ``python -m aifs.products`` for one bucket and date, as a CPU step (aifs.orchestration.steps).

The arguments are the target's (date, bucket, members) and the deployment's (team, model,
climatology, minimum members, points, submission; aifs.orchestration.products_settings); nothing
else a trigger could set reaches the command line. The competition's credentials are read from the
Airflow connection when the step runs and handed over as its secret environment: they are never a
constructor argument (which Airflow renders and stores with the run), never XCom, never logged.

Each target's step has a name of its own (``products``, ``products2``, ...) and its date: the backend
names the step's job after the run, the date and the step, so that a retry re-attaches to its own
job, never to the job of another target of the same run.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from aifs.orchestration.products_settings import ProductsSettings, credential_env

#: XCom key under which each make_products instance records how its step ended (check_products reads it).
STEP_OUTCOME_KEY = "step_outcome"


def step_name(index: int) -> str:
    """``products`` for the first target, then ``products2``... (short: it goes into job, pod and VM names)."""
    return "products" if index == 0 else f"products{index + 1}"


def command_arguments(target: Mapping[str, Any], products: ProductsSettings, service_account: str | None) -> list[str]:
    """``python -m aifs.products`` arguments for one target (no program name)."""
    args = ["--date", target["date"], "--bucket", target["bucket"], "--members", target["members_text"]]
    if service_account:
        args += ["--service-account", service_account]
    return args + products.command_args()


def step_kwargs_for(config: Mapping[str, Any], products: ProductsSettings, deployment) -> list[dict[str, Any]]:
    """make_products' mapped keyword arguments: one step per target of the run, each with its own job name."""
    return [
        {
            "step": step_name(i),
            "arguments": command_arguments(target, products, deployment.service_account),
            # names the step's job after the target's date (RunInfo); the backend is checked against the deployment's
            "config": {"dag_id": config["dag_id"], "run_id": config["run_id"], "date": target["date"], "backend": config["backend"]},
        }
        for i, target in enumerate(config["targets"])
    ]


class _ProductsBackend:
    """The deployment's backend, handing ``env`` to the step's job beside the operator's own secret env,
    and keeping the command's JSON summary (its last stdout line) as the log streams by."""

    def __init__(self, backend, env: Mapping[str, str]):
        self._backend, self._env = backend, dict(env)
        self.summary: dict[str, Any] | None = None

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def run_step(self, run, step, module, args, env, log, **kwargs):
        def log_and_keep(line: str) -> None:
            log(line)
            text = line.strip()
            if text.startswith("{") and text.endswith("}"):
                try:
                    self.summary = json.loads(text)
                except ValueError:
                    pass

        return self._backend.run_step(run, step, module, args, {**env, **self._env}, log_and_keep, **kwargs)


def products_step_operator(products: ProductsSettings):
    """The operator class of make_products: the generic CPU step, with the competition's credentials."""
    from aifs.orchestration.steps import RunStepOperator

    class MakeProducts(RunStepOperator):
        def __init__(self, **kwargs):
            kwargs.setdefault("module", "aifs.products")
            kwargs.setdefault("step_timeout", products.timeout)
            super().__init__(**kwargs)

        def make_backend(self, config):
            from airflow.sdk.log import mask_secret

            # read when the step runs (a connection changed since the DAG was parsed is the one used),
            # masked in every log from here on, and handed to the job's environment only
            secrets = credential_env(products.aiwq_conn_id)
            for name, value in secrets.items():
                mask_secret(value, name)
            self._products_backend = _ProductsBackend(super().make_backend(config), secrets)
            return self._products_backend

        def execute(self, context):
            ti = context["ti"]
            self._products_backend = None
            target = {"date": self.config["date"], "bucket": _argument(self.arguments, "--bucket")}
            try:
                result = super().execute(context)
            except BaseException as exc:
                ti.xcom_push(key=STEP_OUTCOME_KEY, value={**target, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                                                          "summary": self._summary()})
                raise
            ti.xcom_push(key=STEP_OUTCOME_KEY, value={**target, "ok": True, "summary": self._summary()})
            return result

        def _summary(self) -> dict[str, Any] | None:
            """What check_products shows of the command's summary (no secrets in it: members, files, submission)."""
            said = getattr(self._products_backend, "summary", None) or {}
            keep = ("members_used", "partial", "submission", "report", "status", "error")
            return {k: said[k] for k in keep if k in said} or None

    return MakeProducts


def _argument(args, flag: str) -> str | None:
    args = list(args or [])
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None
