"""Synthetic member forecasts for aifs.products tests and its benchmark: GRIB windows and manifests.

Writes a member's windows into a bucket as the worker names them (aifs.layout) with a schema-2
manifest as the worker writes it (aifs.manifest: sizes, crc32c read back from the bucket, message
and field counts), so aifs.completeness finds the member complete. To keep it cheap, the windows
the products read (those holding steps 432-768) carry ``2t``, ``msl`` and ``tp``; the others only
``2t`` (a real member has ~100 fields a step in every window).

``values(short_name, step, member) -> ndarray`` chooses the field values (eccodes, 16-bit simple
packing; ``tp`` is accumulated from the start, stepRange ``0-N``, like the worker's output).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np

from aifs import layout
from aifs.manifest import Manifest, ManifestObject

PRODUCT_FIELDS = ("2t", "msl", "tp")
STEP = 6
SAMPLES = {"N32": "reduced_gg_pl_32_grib2", "N48": "reduced_gg_pl_48_grib2", "N320": "reduced_gg_pl_320_grib2"}


def grid_size(grid: str) -> int:
    import eccodes

    h = eccodes.codes_grib_new_from_samples(SAMPLES[grid])
    try:
        return eccodes.codes_get_size(h, "values")
    finally:
        eccodes.codes_release(h)


def grid_latlons(grid: str) -> tuple[np.ndarray, np.ndarray]:
    import eccodes

    h = eccodes.codes_grib_new_from_samples(SAMPLES[grid])
    try:
        return eccodes.codes_get_array(h, "latitudes"), eccodes.codes_get_array(h, "longitudes")
    finally:
        eccodes.codes_release(h)


class _Encoder:
    def __init__(self, grid: str, date: str, member: int):
        import eccodes

        self.e = eccodes
        when = layout.parse_date(date)
        self.templates = {}
        for short in PRODUCT_FIELDS:
            h = eccodes.codes_grib_new_from_samples(SAMPLES[grid])
            eccodes.codes_set(h, "productDefinitionTemplateNumber", 11 if short == "tp" else 1)
            eccodes.codes_set(h, "shortName", short)
            eccodes.codes_set(h, "dataDate", int(when.strftime("%Y%m%d")))
            eccodes.codes_set(h, "dataTime", when.hour * 100 + when.minute)
            eccodes.codes_set(h, "number", member)
            eccodes.codes_set(h, "bitsPerValue", 16)
            self.templates[short] = h

    def message(self, short: str, step: int, values: np.ndarray) -> bytes:
        h = self.e.codes_clone(self.templates[short])
        try:
            if short == "tp":
                self.e.codes_set(h, "stepRange", f"0-{step}")
            else:
                self.e.codes_set(h, "step", step)
            self.e.codes_set_values(h, np.asarray(values, dtype=np.float64))
            return self.e.codes_get_message(h)
        finally:
            self.e.codes_release(h)

    def close(self):
        for h in self.templates.values():
            self.e.codes_release(h)


def write_member(bucket, date: str, member: int, values: Callable[[str, int, int], np.ndarray], grid: str = "N32",
                 lead_time: int = layout.DEFAULT_LEAD_TIME_HOURS, wall_s: float = 450.0,
                 read_range: tuple[int, int] = (432, 768), skip_windows: tuple[int, ...] = ()) -> Manifest:
    """Upload every window of one member and its manifest; ``skip_windows`` (window starts) are left out of the bucket."""
    encoder = _Encoder(grid, date, member)
    objects = []
    try:
        for w in layout.windows(lead_time):
            wanted = any(w.contains(s) for s in range(read_range[0], read_range[1] + 1, STEP))
            fields = PRODUCT_FIELDS if wanted else ("2t",)
            buf = io.BytesIO()
            steps = list(range(w.start + STEP, w.end + 1, STEP))
            for step in steps:
                for short in fields:
                    buf.write(encoder.message(short, step, values(short, step, member)))
            name = layout.forecast_object(date, member, w.start, w.end)
            data = buf.getvalue()
            blob = bucket.blob(name)
            if w.start not in skip_windows:
                blob.upload_from_string(data, content_type="application/octet-stream", checksum="crc32c")
                blob.reload()
                crc = blob.crc32c
            else:
                import base64

                import google_crc32c

                crc = base64.b64encode(google_crc32c.Checksum(data).digest()).decode()
            objects.append(ManifestObject(name, len(data), crc, (w.start, w.end), len(steps) * len(fields), len(fields)))
    finally:
        encoder.close()
    manifest = Manifest(date=date, member=member, seed=member, lead_time=lead_time, checkpoint="synthetic.ckpt",
                        objects=objects, checkpoint_identity="sha256:" + "0" * 64, step_hours=STEP,
                        timings={"wall_s": wall_s, "model_s": wall_s * 0.7}, host="synthetic")
    bucket.blob(layout.manifest_object(date, member)).upload_from_string(manifest.to_json(), content_type="application/json")
    return manifest
