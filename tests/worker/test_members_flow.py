"""Several members in one run: skip complete ones, keep going after a failure, summary, [RERUN], exit codes."""

from __future__ import annotations

import pickle
import re
import shlex

import pytest
from worker_helpers import (
    DATE,
    Dirs,
    expected_forecast_objects,
    forecast_names,
    make_state,
    manifest_names,
    read_manifest,
    seed,
    tagged,
    upload_bytes,
    worker_args,
)

from aifs import layout

LEAD = 12  # one short window per member keeps these fast
pytestmark = pytest.mark.timeout(150)


def _summary_status(text: str, member: int) -> str | None:
    """The status word in the [SUMMARY] row of ``member``."""
    for line in tagged(text, "[SUMMARY]"):
        row = line.split("[SUMMARY]", 1)[1]
        match = re.match(rf"\s*0*{member}\s+(done|skipped|failed)\s+\d", row)
        if match:
            return match.group(1)
    return None


def _args(bucket, checkpoint, dirs, members, *extra):
    return worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members=members, lead_time=LEAD,
                       extra=list(extra))


def test_skip_complete_member_and_force(run_main, client, bucket, checkpoint, dirs):
    seed(bucket, checkpoint, [1])
    code, text = run_main(_args(bucket, checkpoint, dirs, "1"))
    assert code == 0, text[-4000:]
    assert _summary_status(text, 1) == "done"
    (grib,) = expected_forecast_objects(1, LEAD)
    generation = bucket.get_blob(grib).generation  # if the worker redid the member, the object would be rewritten

    code, text = run_main(_args(bucket, checkpoint, dirs, "1"))
    assert code == 0, text[-4000:]
    assert _summary_status(text, 1) == "skipped", tagged(text, "[SUMMARY]")
    assert bucket.get_blob(grib).generation == generation
    assert dirs.files() == []

    # (a fresh output dir: re-running one member in one process is test_main_is_reentrant's subject)
    code, text = run_main(_args(bucket, checkpoint, Dirs(dirs.input.parent / "again"), "1", "--force"))
    assert code == 0, text[-4000:]
    assert _summary_status(text, 1) == "done"
    assert bucket.get_blob(grib).generation != generation
    assert read_manifest(bucket, 1).objects[0].crc32c == bucket.get_blob(grib).crc32c


def test_main_is_reentrant(run_main, client, bucket, checkpoint, dirs):
    """main(argv) twice in one process for the same member and dirs (the in-process API, a retry loop).

    anemoi-inference remembers every output path a process ever opened (decorators.UNIQUE_PATHS)
    and refuses to open one again; the worker must not trip over that.
    """
    seed(bucket, checkpoint, [6])
    code, text = run_main(_args(bucket, checkpoint, dirs, "6"))
    assert code == 0, text[-4000:]
    code, text = run_main(_args(bucket, checkpoint, dirs, "6", "--force"))
    assert code == 0, text[-4000:]
    assert _summary_status(text, 6) == "done"


def test_failed_member_does_not_stop_the_next(run_main, client, bucket, checkpoint, dirs):
    seed(bucket, checkpoint, [1, 3])  # member 2's input is missing
    code, text = run_main(_args(bucket, checkpoint, dirs, "1-3"))
    assert code == 10, text[-4000:]
    assert manifest_names(client, bucket.name) == [layout.manifest_object(DATE, 1), layout.manifest_object(DATE, 3)]
    assert forecast_names(client, bucket.name) == sorted(expected_forecast_objects(1, LEAD) + expected_forecast_objects(3, LEAD))
    assert [_summary_status(text, m) for m in (1, 2, 3)] == ["done", "failed", "done"]
    assert dirs.files() == []

    (rerun,) = tagged(text, "[RERUN]")
    command = rerun.split("[RERUN]", 1)[1].strip()
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "aifs.worker"]
    assert words[words.index("--members") + 1] == "2"
    assert words[words.index("--date") + 1] == DATE
    assert words[words.index("--bucket") + 1] == bucket.name

    # the printed command works as printed once the input is there: only member 2 runs
    seed(bucket, checkpoint, [2])
    code, text = run_main(words[3:])
    assert code == 0, text[-4000:]
    assert _summary_status(text, 2) == "done"
    assert _summary_status(text, 1) is None and _summary_status(text, 3) is None
    assert len(manifest_names(client, bucket.name)) == 3


def test_summary_columns(run_main, client, bucket, checkpoint, dirs):
    seed(bucket, checkpoint, [4])
    code, text = run_main(_args(bucket, checkpoint, dirs, "4"))
    assert code == 0, text[-4000:]
    header = " ".join(tagged(text, "[SUMMARY]")).lower()
    for column in ("member", "status", "minutes", "gb"):
        assert column in header, header
    total = read_manifest(bucket, 4).total_bytes
    row = next(line for line in tagged(text, "[SUMMARY]") if _summary_status(line, 4))
    numbers = [float(x) for x in re.findall(r"\d+\.\d+", row.split("[SUMMARY]", 1)[1])]
    assert any(abs(n - total / 1e9) < 0.01 for n in numbers), (row, total)


def test_same_code_for_all_failures(run_main, client, bucket, checkpoint, dirs):
    code, text = run_main(_args(bucket, checkpoint, dirs, "5,7"))  # both inputs missing
    assert code == 10, text[-4000:]
    (rerun,) = tagged(text, "[RERUN]")
    assert "--members 5,7" in rerun


def test_mixed_failures_exit_1(run_main, client, bucket, checkpoint, dirs):
    state = make_state(checkpoint, DATE, 2)
    del state["fields"]["2t"]
    upload_bytes(bucket, layout.input_object(DATE, 2), pickle.dumps(state))  # 2 invalid (11), 1 missing (10)
    seed(bucket, checkpoint, [3])
    code, text = run_main(_args(bucket, checkpoint, dirs, "1-3"))
    assert code == 1, text[-4000:]
    assert [_summary_status(text, m) for m in (1, 2, 3)] == ["failed", "failed", "done"]
    (rerun,) = tagged(text, "[RERUN]")
    assert "--members 1-2" in rerun
    assert manifest_names(client, bucket.name) == [layout.manifest_object(DATE, 3)]


def test_bad_checkpoint_exit_15(run_main, client, bucket, checkpoint, dirs, tmp_path):
    seed(bucket, checkpoint, [1, 2])
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=str(broken), dirs=dirs, members="1-2", lead_time=LEAD))
    assert code == 15, text[-4000:]
    assert [_summary_status(text, m) for m in (1, 2)] == ["failed", "failed"]
    assert "--members 1-2" in tagged(text, "[RERUN]")[-1]
    assert manifest_names(client, bucket.name) == [] and forecast_names(client, bucket.name) == []
    assert dirs.files() == []
