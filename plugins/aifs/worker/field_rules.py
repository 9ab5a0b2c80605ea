"""Per-variable rules between the checkpoint's variables, the input pickles and the GRIB written.

One table each, keyed by variable or GRIB parameter; every rule applies only when the
checkpoint's metadata has the variables it names, so the same code serves AIFS-ENS 1.0 (no rule
applies) and 2.0 (waves, snow cover) and any checkpoint with the same kinds of fields.
Everything here goes through anemoi-inference's own machinery: the runner's ``typed_variables``
and ``allow_nans``, the GRIB output's ``post_processors`` and ``grib2_keys``, anemoi-transform's
filters.

Light at import (no torch, anemoi or eccodes): the functions import what they use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class DirectionTransform:
    """A field the model carries as other fields (e.g. a direction as its cosine and sine)."""

    written: str  # the variable in the input pickles and in the GRIB output
    carried: tuple[str, ...]  # what the model reads and writes instead
    filter: str  # the anemoi-transform filter (forward: written -> carried; backward: carried -> written)
    mars: dict  # the GRIB request of the written variable


#: ECMWF's AIFS-ENS 2.0 configuration: mean wave direction (degrees, as ECMWF open data publishes it)
#: is cos_mwd/sin_mwd inside the model and mwd in degrees 0..360 in the output. The backward filter
#: takes atan2(sin, cos), so the model's cos/sin need not be unit vectors.
TRANSFORMS = (
    DirectionTransform("mwd", ("cos_mwd", "sin_mwd"), "cos_sin_mean_wave_direction",
                       {"param": "mwd", "levtype": "sfc"}),
)

#: GRIB parameter for a variable whose anemoi name is not the parameter ECMWF encodes it as.
#: snowc (snow cover fraction) is GRIB2 ``fscov`` in ECMWF's v2 configuration.
GRIB_PARAMETER = {"snowc": "fscov"}

#: GRIB2 keys per parameter for an ensemble member, where the individual-ensemble template (1) the
#: worker asks for does not fit: significant wave height in a period range needs template 104
#: (individual ensemble forecast for waves in a period range); eccodes refuses template 1 for them.
ENSEMBLE_GRIB2_KEYS = {
    param: {"productDefinitionTemplateNumber": 104}
    for param in ("h1012", "h1214", "h1417", "h1721", "h2125", "h2530")
}


def _training_config(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    return (raw.get("config") or {}) if isinstance(raw, Mapping) else {}


def imputed_variables(raw_metadata: Mapping[str, Any]) -> frozenset[str]:
    """Variables whose NaNs the checkpoint's own processors fill in (and restore on the way out).

    Read as anemoi-models reads ``config.data.processors``: each processor whose target is an
    imputer lists variables per method (``default`` applies to every variable not listed, ``none``
    means not imputed); ``remap`` is not imputation. anemoi-inference passes NaNs through to the
    model (``allow_nans``), so these are exactly the variables an input may have NaN in.
    """
    config = _training_config(raw_metadata)
    processors = ((config.get("data") or {}).get("processors")) or {}
    variables = list(((raw_metadata.get("dataset") or {}).get("variables")) or [])
    imputed: set[str] = set()
    for processor in processors.values():
        if not isinstance(processor, Mapping) or "imputer" not in str(processor.get("_target_", "")).lower():
            continue
        methods = processor.get("config") or {}
        listed: set[str] = set()
        for method, names in methods.items():
            if method in ("default", "remap", "normalizer") or names in (None, "none"):
                continue
            names = [names] if isinstance(names, str) else list(names)
            listed |= set(names)
            if method != "none":
                imputed |= set(names)
        if methods.get("default", "none") != "none":
            imputed |= {v for v in variables if v not in listed}
    return frozenset(imputed)


@dataclasses.dataclass(frozen=True)
class FieldPlan:
    """What the rules make of one checkpoint."""

    nan_allowed: frozenset[str]  # model input variables an input may hold NaN in
    input_sources: dict[str, str]  # model input variable -> the pickle variable it can be made from
    input_transforms: tuple[DirectionTransform, ...]
    output_transforms: tuple[DirectionTransform, ...]
    written_variables: tuple[str, ...]  # one GRIB message each a step, in the order written

    # -- the runner (anemoi-inference RunConfiguration) and its GRIB outputs -----------------------
    def runner_options(self, variables_metadata: Mapping[str, Any]) -> dict[str, Any]:
        """``typed_variables`` (GRIB request of renamed/derived fields) and ``allow_nans`` for SimpleRunner."""
        typed = {t.written: {"mars": dict(t.mars)} for t in self.output_transforms}
        for variable, param in GRIB_PARAMETER.items():
            if variable in self.written_variables:
                mars = dict((variables_metadata.get(variable) or {}).get("mars") or {"levtype": "sfc"})
                typed[variable] = {**(variables_metadata.get(variable) or {}), "mars": {**mars, "param": param}}
        # missing values (the imputed fields' NaNs, restored by the model) are written as a GRIB bitmap
        return {"typed_variables": typed, "allow_nans": bool(self.nan_allowed)}

    def grib_output_options(self) -> dict[str, Any]:
        """``post_processors`` and ``grib2_keys`` for anemoi-inference's GRIB outputs (file and in-memory)."""
        options: dict[str, Any] = {}
        if self.output_transforms:
            options["post_processors"] = [{"backward_transform_filter": {"filter": t.filter}} for t in self.output_transforms]
        params = {GRIB_PARAMETER.get(v, v) for v in self.written_variables}
        keys = {p: dict(k) for p, k in ENSEMBLE_GRIB2_KEYS.items() if p in params}
        if keys:
            options["grib2_keys"] = keys
        return options


def plan_fields(raw_metadata: Mapping[str, Any], input_variables, output_variables) -> FieldPlan:
    """The rules that apply to a checkpoint with these model input and output variables."""
    inputs, outputs = set(input_variables), list(output_variables)
    input_transforms = tuple(t for t in TRANSFORMS if set(t.carried) <= inputs)
    output_transforms = tuple(t for t in TRANSFORMS if set(t.carried) <= set(outputs))
    written = [v for v in outputs if not any(v in t.carried for t in output_transforms)]
    written += [t.written for t in output_transforms]  # the backward filter appends the field it makes
    imputed = imputed_variables(raw_metadata)
    return FieldPlan(
        nan_allowed=frozenset(v for v in inputs if v in imputed),
        input_sources={c: t.written for t in input_transforms for c in t.carried},
        input_transforms=input_transforms,
        output_transforms=output_transforms,
        written_variables=tuple(written),
    )


def forward_transform(fields: dict, transform: DirectionTransform) -> dict:
    """``fields`` with ``transform.written`` (time levels x points) replaced by the carried fields.

    Through anemoi-transform's filter on an earthkit view of the state (anemoi-inference's
    ``forward_transform_filter`` processor does the same on its own inputs), one time level at a time.
    """
    import datetime as dt

    import numpy as np
    from anemoi.inference.post_processors.earthkit_state import unwrap_state, wrap_state
    from anemoi.transform.filters import filter_registry
    from anemoi.transform.variables import Variable

    flt = filter_registry.create(transform.filter)
    typed = {transform.written: Variable.from_dict(transform.written, {"mars": dict(transform.mars)})}

    def namer(field, metadata) -> str:  # the carried fields are surface fields named by their parameter
        return metadata.get("param") or metadata["name"]

    source = np.asarray(fields[transform.written])
    levels: dict[str, list] = {c: [] for c in transform.carried}
    for values in source:
        state = {"date": dt.datetime(2000, 1, 1), "fields": {transform.written: values}}
        out = unwrap_state(flt.forward(wrap_state(state, typed)), state, namer=namer)
        for c in transform.carried:
            levels[c].append(np.asarray(out["fields"][c], dtype=source.dtype))
    result = {k: v for k, v in fields.items() if k != transform.written}
    result.update({c: np.stack(v) for c, v in levels.items()})
    return result
