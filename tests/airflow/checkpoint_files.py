"""Checkpoint files for tests: the tiny model with another recorded anemoi-models (its generation).

A checkpoint's generation (aifs.generations) is what its metadata records about the anemoi-models it
was trained with; rewriting that record (entry by entry, as anemoi.utils.checkpoints.replace_metadata
does) gives the tiny model of the other generation, or of one no environment loads.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path


def with_recorded_models(source: str | Path, target: Path, version: str, padding: int = 0) -> Path:
    """A copy of ``source`` whose metadata says it was trained with anemoi-models ``version``.

    ``padding`` adds a stored entry of that many bytes before the metadata (stands in for the weights).
    """
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            if os.path.basename(info.filename) == "anemoi.json":
                if padding:
                    new.writestr(os.path.dirname(info.filename).replace("anemoi-metadata", "data/padding"), bytes(padding))
                metadata = json.loads(data)
                metadata["provenance_training"]["module_versions"]["anemoi.models"] = {"version": version}
                data = json.dumps(metadata).encode()
            new.writestr(info, data)
    return target
