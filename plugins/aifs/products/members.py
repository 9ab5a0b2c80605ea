"""Which members the products use: the selection's members whose forecasts verify (aifs.completeness).

A member counts when its completion manifest exists, reaches the last step the periods need, agrees
with the ensemble's lead time and checkpoint, and every object it lists is in the bucket with its
recorded size and crc32c. Everyone else is left out with the reason, and the products say so.
"""

from __future__ import annotations

import collections
import dataclasses

from aifs import completeness, layout
from aifs.manifest import Manifest
from aifs.products.periods import LAST_STEP


@dataclasses.dataclass
class Selection:
    used: list[int]
    excluded: dict[int, str]  # member -> why
    manifests: dict[int, Manifest]
    lead_time: int = 0

    @property
    def partial(self) -> bool:
        return bool(self.excluded)


def select(bucket, date: str, members: list[int], **request) -> Selection:
    states = {}
    manifests: dict[int, Manifest] = {}
    listed = {b.name for b in bucket.list_blobs(prefix=layout.manifest_prefix(date), **request)}
    for member in members:
        if layout.manifest_object(date, member) not in listed:
            states[member] = completeness.NO_MANIFEST
            continue
        name = layout.manifest_object(date, member)
        try:
            manifests[member] = Manifest.from_json(bucket.blob(name).download_as_bytes(**request))
        except (ValueError, TypeError, KeyError) as exc:
            states[member] = f"manifest gs://{bucket.name}/{name} unreadable: {exc}"
    # the ensemble is what most manifests say: same lead time and checkpoint (an odd one out is left out)
    votes = collections.Counter((m.lead_time, m.checkpoint, m.checkpoint_identity) for m in manifests.values())
    selection = Selection([], {}, {}, 0)
    if votes:
        (lead_time, checkpoint, identity), _ = votes.most_common(1)[0]
        selection.lead_time = lead_time
        run = completeness.RunSpec(date, lead_time, checkpoint=checkpoint, checkpoint_identity=identity or None)
        stored = completeness.stored_objects(bucket, layout.forecast_prefix(date), **request)
        for member, manifest in manifests.items():
            problems = completeness.problems(manifest, run, member, stored, bucket.name)
            if lead_time < LAST_STEP:
                problems.insert(0, f"lead time {lead_time} h does not reach the products' last step {LAST_STEP} h")
            if problems:
                states[member] = "; ".join(problems)
            else:
                selection.manifests[member] = manifest
    selection.used = sorted(selection.manifests)
    selection.excluded = {m: states[m] for m in sorted(states)}
    return selection
