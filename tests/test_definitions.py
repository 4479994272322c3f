"""What a pipeline groups by, and definitions that must never replace a good result."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest

from kappa.errors import KappaError
from kappa.kafka.admin import end_offsets, ensure_topic, partition_count
from kappa.pipeline import Definition, resolve
from tests.datagen import pandas_expectation, sample_frame
from tests.helpers import high_watermarks
from tests.oracle import assert_matches, latest_dir, read_latest


def registry(kappa, pipeline: str) -> dict:
    return json.loads((kappa.snapshot_dir / pipeline / "generations.json").read_text())


def test_the_group_key_is_the_rows_key_field_whatever_key_the_loader_used(kappa, tmp_path):
    """Loaded keyed by `cut`, replayed with --key color: grouped by color, as pandas does."""
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "cut": rng.choice(["Ideal", "Fair", "Good"], size=3_000),
            "color": rng.choice(["D", "E", "F", "G", "007", "a,b"], size=3_000),
            "price": rng.normal(500, 100, size=3_000).round(2),
        }
    )
    frame.loc[::97, "color"] = None
    path = tmp_path / "diamonds.csv"
    frame.to_csv(path, index=False)
    topic = kappa.topic()
    kappa.load(path, "cut", topic, partitions=4)
    kappa.replay_batch(topic, "price", "color")
    csv_table, parquet_table, manifest = read_latest(kappa.snapshot_dir, topic)
    expected = pandas_expectation(str(path), "color", "price")
    assert_matches(csv_table, expected)
    assert_matches(parquet_table, expected)
    assert manifest["definition"]["key"] == "color"


def test_a_field_no_row_has_is_refused_and_the_current_result_stays(kappa, tmp_path):
    path = tmp_path / "rows.csv"
    sample_frame(4_000, 50).to_csv(path, index=False)
    topic = kappa.topic()
    kappa.load(path, "city", topic, partitions=4)
    kappa.replay_batch(topic, "amount", "city")
    before = latest_dir(kappa.snapshot_dir, topic)

    for option, args in (("--value", ("nosuchval", "city")), ("--key", ("amount", "nosuchkey"))):
        result = kappa.replay_batch(topic, *args, check=False)
        message = result.stderr.decode()
        assert result.returncode != 0
        assert f"{option} 'nosuch" in message and "fields seen: " in message and "amount" in message, message
        assert message.count("\n") <= 3, message  # a line, not a traceback
        assert latest_dir(kappa.snapshot_dir, topic) == before
        assert registry(kappa, topic)["current"] == 1
        assert set(registry(kappa, topic)["generations"]) == {"1"}, "nothing may be built"
        assert not (kappa.data_dir / "state" / topic / "g2").exists()

    beside = kappa.run("replay", "--topic", topic, "--value", "nosuchval", "--key", "city", check=False)
    assert beside.returncode != 0 and "--value 'nosuchval'" in beside.stderr.decode()
    assert latest_dir(kappa.snapshot_dir, topic) == before

    # a worker: a misspelt field is named as such, and another definition is shown as the options that give it
    misspelt = kappa.run("worker", "--topic", topic, "--value", "amuont", "--key", "city", check=False, timeout=120)
    assert misspelt.returncode != 0 and "--value 'amuont' is a field of none" in misspelt.stderr.decode()
    other = kappa.run("worker", "--topic", topic, "--value", "seq", "--key", "city", check=False, timeout=120)
    lines = other.stderr.decode().strip().splitlines()
    assert other.returncode != 0 and len(lines) == 1, lines
    assert (
        f"computes `--topic {topic} --value amount --key city`, not `--topic {topic} --value seq --key city`"
        in (lines[0])
    )
    assert latest_dir(kappa.snapshot_dir, topic) == before
    assert set(registry(kappa, topic)["generations"]) == {"1"}


def test_an_empty_log_is_not_a_reason_to_refuse(kappa):
    topic = kappa.topic()
    kappa.run("load", "-", "--key", "city", "--topic", topic, stdin=b"")
    kappa.replay_batch(topic, "anything", "city")
    _, _, manifest = read_latest(kappa.snapshot_dir, topic)
    assert manifest["keys"] == 0 and manifest["complete"] is True


def test_a_generation_that_counted_nothing_never_replaces_the_current_one(kappa, tmp_path):
    """`empty` is a field of every row but never has a value: the sample passes, the result is empty."""
    frame = sample_frame(3_000, 40)
    frame["empty"] = np.nan
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    topic = kappa.topic()
    kappa.load(path, "city", topic, partitions=4)
    kappa.replay_batch(topic, "amount", "city")
    before = latest_dir(kappa.snapshot_dir, topic)

    refused = kappa.replay_batch(topic, "empty", "city", check=False)
    assert refused.returncode != 0
    assert "counted no value out of 3,000 records" in refused.stderr.decode()
    assert latest_dir(kappa.snapshot_dir, topic) == before
    assert registry(kappa, topic)["current"] == 1
    assert not (kappa.data_dir / "state" / topic / "g2").exists(), "an empty generation is not kept"

    beside = kappa.run("replay", "--topic", topic, "--value", "empty", "--key", "city", check=False, timeout=300)
    assert beside.returncode != 0 and "counted no value" in beside.stderr.decode(), beside.stderr.decode()
    assert latest_dir(kappa.snapshot_dir, topic) == before
    assert registry(kappa, topic)["current"] == 1

    kappa.replay_batch(topic, "empty", "city", "--force")
    table, _, manifest = read_latest(kappa.snapshot_dir, topic)
    assert manifest["records"]["counted"] == 0 and (table["count"] == 0).all()


def test_a_definition_whose_rules_reject_every_sampled_record_is_refused_before_building(kappa):
    """Epoch milliseconds read as seconds (a wrong --time-unit) are beyond the year 9999: the
    replay copied the whole log to the dead-letter topic, then refused the empty result and
    told the user to check --value and --key."""
    topic = kappa.topic()
    rows = [{"city": f"c{n % 7}", "amount": n, "at": 1_709_287_200_000 + n * 60_000} for n in range(2_000)]
    kappa.run(
        "load", "-", "--key", "city", "--topic", topic, stdin=b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    )
    window = ("--window", "1d", "--time", "at")
    refused = kappa.replay_batch(topic, "amount", "city", *window, check=False)
    stderr = refused.stderr.decode()
    assert refused.returncode == 2 and "would be rejected, the first with: time" in stderr, stderr
    assert "is --time-unit right?" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    dlq = partition_count(kappa.broker, f"{topic}.dlq")
    assert dlq is None or sum(end_offsets(kappa.broker, f"{topic}.dlq", dlq).values()) == 0, "nothing rejected"
    assert not (kappa.snapshot_dir / topic / "generations.json").exists(), "nothing built"

    kappa.replay_batch(topic, "amount", "city", *window, "--time-unit", "ms")
    _, _, manifest = read_latest(kappa.snapshot_dir, topic)
    assert manifest["records"]["counted"] == 2_000 and manifest["records"]["rejected"] == 0


@pytest.mark.parametrize(
    ("time", "unit", "shown"),
    [
        ("@timestamp", "s", "--window 1h --time @timestamp"),
        ("@timestamp", "ms", "--window 1h --time @timestamp --time-unit ms"),
        ("at", "s", "--window 1h --time at"),
        ("at", "ms", "--window 1h --time at --time-unit ms"),
    ],
)
def test_a_definition_is_shown_as_the_options_that_give_it(time, unit, shown):
    """Status showed `--time-unit s` for a window over the record timestamp, which has no unit,
    and for an ISO text time field, where the default unit means nothing."""
    definition = Definition(
        topic="t", value_fields=("fare",), key_fields=("city",), window="1h", time_field=time, time_unit=unit
    )
    args = definition.computation_args()
    assert " ".join(args) == f"--value fare --key city {shown}"
    options = dict(zip(args[::2], args[1::2], strict=True))
    _, again = resolve(
        None, None, topic="t", key=options["--key"], value=options["--value"], window=options["--window"],
        time=options["--time"], time_unit=options.get("--time-unit"),
    )  # fmt: skip
    assert again == definition and again.to_record() == definition.to_record()


def test_a_field_name_with_a_comma_from_kappa_toml_is_refused(tmp_path):
    """Definitions are recorded and passed to worker processes as `a,b`: a field named `a,b` in
    kappa.toml's key list became two fields, `a` and `b`, in every process it was passed to."""
    config = tmp_path / "kappa.toml"
    config.write_text('[pipelines.trips]\ntopic = "t"\nkey = ["city", "zone,area"]\nvalue = ["fare"]\n')
    with pytest.raises(KappaError, match=r"--key field 'zone,area' holds a comma, which kappa puts between field"):
        resolve("trips", config, topic=None, key=None, value=None, window=None, time=None, time_unit=None)


@pytest.mark.parametrize("window", ["99999999999999999999d", "36501d", "3153600001s"])
def test_a_window_longer_than_a_century_is_refused(window):
    """`--window 99999999999999999999d` was accepted, and the fold then failed on an integer
    beyond 64 bits with a traceback and advice to resume that failed again; a 10,000-year
    window was accepted too (found by helper-27). A definition recorded with a longer window
    still reads back (kappa status reads every generation's)."""
    with pytest.raises(KappaError, match=r"--window .* is longer than 36500 days \(a century\)"):
        resolve(None, None, topic="t", key="city", value="fare", window=window, time="at", time_unit=None)
    _, longest = resolve(None, None, topic="t", key="city", value="fare", window="36500d", time="at", time_unit=None)
    assert longest.window_s == 36_500 * 86_400
    recorded = {**longest.to_record(), "window": "36501d"}
    assert Definition.from_record(recorded).window_s == 36_501 * 86_400


def test_a_time_unit_without_a_window_is_refused():
    """`--time-unit ms` without --window was accepted and did nothing, while --time without
    --window is refused."""
    with pytest.raises(KappaError, match="--time-unit applies to epoch numbers in the --time field of a --window"):
        resolve(None, None, topic="t", key="city", value="fare", window=None, time=None, time_unit="ms")
    _, plain = resolve(None, None, topic="t", key="city", value="fare", window=None, time=None, time_unit="s")
    assert plain.window is None


def test_a_log_whose_first_records_are_rejected_is_judged_by_its_tails_too(kappa):
    """The sample read the tails only while a named field was missing: a log whose first loads
    wrote epoch ms (rejected under --time-unit s) and later ones seconds was refused whole."""
    topic = kappa.topic()
    early = [{"city": "a", "amount": n, "at": 1_709_287_200_000 + n} for n in range(150)]
    later = [{"city": "b", "amount": n, "at": 1_709_287_200 + n} for n in range(150)]
    for rows in (early, later):
        lines = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
        kappa.run("load", "-", "--key", "city", "--topic", topic, "--partitions", "1", stdin=lines)
    kappa.replay_batch(topic, "amount", "city", "--window", "1d", "--time", "at")
    _, _, manifest = read_latest(kappa.snapshot_dir, topic)
    assert manifest["records"]["counted"] == 150 and manifest["records"]["rejected"] == 150


def test_a_worker_starts_on_a_log_that_holds_only_rejected_records(kappa):
    """A worker has no --force: a log of a few bad records (a kcat smoke test) must not keep it
    from starting; they go to the dead-letter topic like any bad record."""
    from tests.helpers import wait_until
    from tests.live import kill_group, start_worker

    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 1)
    subprocess.run(["kcat", "-P", "-b", kappa.broker, "-t", topic], input=b"hello\nworld\n", check=True, timeout=60)
    worker = start_worker(kappa, topic, "amount", "city", processes=1, interval=0.5)
    try:
        dlq = f"{topic}.dlq"
        assert wait_until(
            lambda: sum(end_offsets(kappa.broker, dlq, partition_count(kappa.broker, dlq) or 1).values()) == 2, 120
        )
    finally:
        kill_group(worker)


def test_a_generation_kept_with_keep_old_says_it_is_no_longer_read_until_gc_kept_deletes_it(kappa, tmp_path):
    """A kept generation showed a lag that grew with every load, as if a worker were behind."""
    topic = kappa.topic()
    first, more = tmp_path / "first.csv", tmp_path / "more.csv"
    sample_frame(2_000, 50, seed=5).to_csv(first, index=False)
    sample_frame(500, 50, seed=6).to_csv(more, index=False)
    kappa.load(first, "city", topic, partitions=2)
    kappa.replay_batch(topic, "amount", "city")
    kappa.replay_batch(topic, "amount", "city", "--keep-old")  # generation 2 replaces 1, which is kept
    covered = sum(high_watermarks(kappa.broker, topic).values())
    kappa.load(more, "city", topic, partitions=2)
    lag = sum(high_watermarks(kappa.broker, topic).values()) - covered  # 500 rows and the commit markers
    status = kappa.run("status", "--pipeline", topic).stdout.decode()
    kept = next(line for line in status.splitlines() if "generation 1 [" in line)
    assert kept.startswith("  generation 1 [kept, batch, replaced: no longer read;"), status
    assert "`kappa gc --kept` deletes it" in kept and "lag" not in kept, kept
    assert f"generation 2 [complete, batch] --value amount --key city, lag {lag:,} " in status, status
    assert (kappa.data_dir / "state" / topic / "g1").exists()
    assert "nothing to clean" in kappa.run("gc", "--pipeline", topic).stdout.decode()
    gc = kappa.run("gc", "--pipeline", topic, "--kept").stdout.decode()
    assert "deleted generation 1 (replaced earlier and kept with --keep-old)" in gc, gc
    assert not (kappa.data_dir / "state" / topic / "g1").exists()
    assert registry(kappa, topic)["generations"]["1"]["state"] == "retired"
    assert "generation 1 [" not in kappa.run("status", "--pipeline", topic).stdout.decode()
