"""Ray Data ingest end to end: accounting invariant, every reason through the real stage,
the LC-Rec adapter on the real datasets, clear errors on bad input."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from leadre import artifacts

from leadre.data import schema
from leadre.artifacts import ArtifactError
from leadre.data.config import IngestConfig
from leadre.data.ingest import run
from leadre.runtime import RayConfig
from leadre.data.config import SynthConfig
from leadre.data.synth import run as synth_run

RAY = RayConfig(num_cpus=2)


def _counts(out):
    return artifacts.read_manifest(out, stage="ingest")["counts"]


def test_synthetic_world_with_injected_faults(ray_local, tmp_path):
    world = tmp_path / "world"
    synth_run(SynthConfig(out=str(world), users=300, ads=120, corrupt_share=0.02, seed=1))
    raw = artifacts.read_table(world, "events").to_pandas()
    out = tmp_path / "ingest"
    run(IngestConfig(input_dir=str(world), out=str(out), ray=RAY, batch_size=5000))

    c = _counts(out)["events"]
    assert c["rows_in"] == len(raw) == c["clean"] + c["quarantined"]
    events = artifacts.read_table(out, "events")
    assert events.num_rows == c["clean"] and events.schema.equals(schema.EVENTS)
    q = artifacts.read_table(out, "quarantine").to_pandas()
    by = q[q.table == "events"].reason.value_counts().to_dict()
    assert by == c["by_reason"]
    # each injected fault kind is found exactly
    assert by["unknown_ad_id"] == (raw.ad_id == "ad_unknown").sum()
    assert by["unknown_action"] == (raw.action == "share").sum()
    assert by["timestamp_out_of_range"] == (raw.ts < pd.Timestamp("2000-01-01", tz="UTC")).sum()
    assert by["missing_required_field"] == raw.user_id.isna().sum()
    valid = raw[raw.user_id.notna() & (raw.action != "share") & (raw.ad_id != "ad_unknown")
                & (raw.ts > pd.Timestamp("2000-01-01", tz="UTC"))]
    assert by["duplicate_event"] == valid.duplicated(list(schema.EVENT_IDENTITY)).sum() > 0
    # events come out sorted by user then time
    df = events.to_pandas()
    assert (df.groupby("user_id").ts.apply(lambda s: s.is_monotonic_increasing)).all()
    m = artifacts.read_manifest(out)
    assert m["versions"]["ray"] and m["timings_s"]["events"] > 0


def test_every_reason_through_the_stage(ray_local, tmp_path):
    """Raw parquet with wrong types, duplicates and dangling references."""
    src = tmp_path / "raw"
    ads = pd.DataFrame({
        "ad_id": ["a1", "a2", "a2", "a3", None],
        "title": ["shoes", "bag", "bag again", "", "x"],
        "description": [None] * 5, "category": ["sports", "fashion", "fashion", "x", "x"],
        "advertiser": [None] * 5, "ecpm": ["1.0", "2", "3", "bad", "1"],
        "active": [True, True, True, True, True]})
    users = pd.DataFrame({"user_id": ["u1", "u1", "u2"], "age": [30, 31, -4]})
    events = pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u2", "u2", "u3", "u3", None],
        "ts": ["2025-01-01", "2025-01-01", "garbage", "2025-01-02", "1980-01-01", "2025-01-03",
               "2025-01-03", "2025-01-01"],
        "domain": ["ad", "ad", "ad", "ad", "ad", "radio", "video", "ad"],
        "action": ["click"] * 5 + ["play", "play", "click"],
        "ad_id": ["a1", "a1", "a1", "a3", "a1", None, None, "a1"],
        "title": [None] * 5 + ["song", "clip", None]})
    for name, df in (("ads", ads), ("users", users), ("events", events)):
        (src / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pandas(df.astype(object), preserve_index=False),
                       src / name / "part-0.parquet")
    out = tmp_path / "out"
    # Most rows here are bad on purpose: lift the broken-upstream guard for this test.
    m = run(IngestConfig(input_dir=str(src), out=str(out), ray=RAY, max_quarantine_share=1.0))
    c = m["counts"]
    # a3 has both an empty title and a bad ecpm: the first failed check is reported
    assert c["ads"]["by_reason"] == {"duplicate_id": 1, "missing_required_field": 1,
                                     "wrong_type": 1}
    assert artifacts.read_table(out, "ads").column("ad_id").to_pylist() == ["a1", "a2"]
    assert c["users"]["by_reason"] == {"duplicate_id": 1, "invalid_value": 1}
    assert c["events"]["by_reason"] == {
        "duplicate_event": 1, "wrong_type": 1, "unknown_ad_id": 1, "timestamp_out_of_range": 1,
        "unknown_domain": 1, "missing_required_field": 1}
    assert c["events"]["clean"] == 2
    q = artifacts.read_table(out, "quarantine").to_pandas()
    assert len(q) == sum(t["quarantined"] for t in c.values())
    assert all(json.loads(r) for r in q.row)


def test_missing_input_is_a_clear_error(ray_local, tmp_path):
    with pytest.raises(ArtifactError, match="ads/ and events/"):
        run(IngestConfig(input_dir=str(tmp_path / "nope"), out=str(tmp_path / "o"), ray=RAY))


def test_lcrec_scientific(ray_local, scientific_dir, tmp_path):
    out = tmp_path / "sci"
    m = run(IngestConfig(source="lcrec", input_dir=str(scientific_dir), out=str(out), ray=RAY))
    c = m["counts"]
    assert c["ads"]["clean"] == 4344 and c["users"]["clean"] == 8317
    assert c["events"]["rows_in"] == 58492 == c["events"]["clean"] + c["events"]["quarantined"]
    ads = artifacts.read_table(out, "ads").to_pandas()
    assert ads.title.str.len().min() > 0 and ads.ecpm.isna().all()
    assert ads.category.nunique() > 15 and "Industrial & Scientific" not in set(ads.category)
    # interactions keep their order as strictly increasing click times
    ev = artifacts.read_table(out, "events").to_pandas()
    assert set(ev.action) == {"click"}
    inter = json.loads((scientific_dir / "Scientific.inter.json").read_text())
    u = next(iter(inter))
    got = ev[ev.user_id == u].sort_values("ts").ad_id.tolist()
    assert got == [str(i) for i in inter[u]][: len(got)]


def test_lcrec_beauty_without_item_text(ray_local, beauty_dir, tmp_path):
    from leadre.data import lcrec
    tables, notes = lcrec.load(beauty_dir)
    assert notes["placeholder_titles"] == tables["ads"].num_rows == 12101
    assert tables["events"].num_rows == 198502


def test_lcrec_malformed_files(tmp_path):
    from leadre.data import lcrec
    (tmp_path / "X.inter.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        lcrec.load(tmp_path)
    (tmp_path / "X.inter.json").write_text(json.dumps({"u1": [1, "2", 3.5, None], "u2": 5}))
    (tmp_path / "X.item.json").write_text(json.dumps({"1": {"title": "a", "categories": "r,c"},
                                                      "2": {"title": ["b", "c"]}}))
    tables, notes = lcrec.load(tmp_path)
    assert tables["ads"].column("title").to_pylist() == ["a", "b c"]
    assert tables["ads"].column("category").to_pylist() == ["c", "unknown"]
    # non-id items keep a row (null ad_id) so validation quarantines them instead of losing them
    assert tables["events"].num_rows == 5 and notes["non_id_items"] == 1
    v = schema.validate_events(tables["events"], {"1", "2"})
    assert v.clean.num_rows == 2 and v.quarantine.num_rows == 3


def _small_world(tmp_path, users=60, ads=30):
    world = tmp_path / "world"
    synth_run(SynthConfig(out=str(world), users=users, ads=ads, seed=3))
    return world


def _rewrite(world, name, fn):
    """Replace table ``name`` of a generated world by ``fn(table)`` in one parquet file."""
    table = fn(artifacts.read_table(world, name))
    for f in (world / name).iterdir():
        f.unlink()
    pq.write_table(table, world / name / "part-0.parquet")


def test_table_missing_a_required_column_fails_before_any_work(ray_local, tmp_path):
    world = _small_world(tmp_path)
    _rewrite(world, "events", lambda t: t.drop_columns(["action"]))
    out = tmp_path / "ingest"
    with pytest.raises(schema.SchemaError) as e:
        run(IngestConfig(input_dir=str(world), out=str(out), ray=RAY))
    msg = str(e.value)
    assert "events table" in msg and "part-0.parquet" in msg and "'action'" in msg
    assert not (out / "events").exists() and not (out / "quarantine").exists()


def test_truncated_parquet_file_is_a_one_line_error_naming_it(ray_local, tmp_path):
    world = _small_world(tmp_path)
    victim = sorted((world / "ads").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(schema.SchemaError) as e:
        run(IngestConfig(input_dir=str(world), out=str(tmp_path / "o"), ray=RAY))
    assert str(victim) in str(e.value) and "\n" not in str(e.value)


def test_cli_reports_a_schema_error_in_one_line_with_exit_2(ray_local, tmp_path, capsys):
    from leadre.cli import main

    world = _small_world(tmp_path)
    _rewrite(world, "ads", lambda t: t.drop_columns(["title", "category"]))
    rc = main(["ingest", "--input-dir", str(world), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "ads table" in err and "'title', 'category'" in err


def test_overlong_text_is_quarantined_with_its_reason(ray_local, tmp_path):
    world = _small_world(tmp_path)
    long_title = "x" * 200_000

    def lengthen(t):
        titles = t.column("title").to_pylist()
        titles[0] = long_title
        return t.set_column(t.schema.get_field_index("title"), "title", pa.array(titles))

    _rewrite(world, "ads", lengthen)
    out = tmp_path / "ingest"
    m = run(IngestConfig(input_dir=str(world), out=str(out), ray=RAY, max_quarantine_share=0.5))
    assert m["counts"]["ads"]["by_reason"] == {"text_too_long": 1}
    q = artifacts.read_table(out, "quarantine").to_pandas()
    row = q[q.reason == "text_too_long"].iloc[0]
    assert row.detail == "title has 200,000 characters (limit 1,000)"
    assert json.loads(row.row)["title"] == long_title  # kept whole for inspection
    assert max(len(x) for x in artifacts.read_table(out, "ads").column("title").to_pylist()) < 1000
    # the limit is a setting
    m = run(IngestConfig(input_dir=str(world), out=str(out), ray=RAY, max_title_chars=300_000))
    assert m["counts"]["ads"]["quarantined"] == 0


def test_quarantine_share_over_the_threshold_fails_with_counts(ray_local, tmp_path):
    world = tmp_path / "world"
    synth_run(SynthConfig(out=str(world), users=60, ads=30, seed=3, corrupt_share=0.3))
    out = tmp_path / "ingest"
    run(IngestConfig(input_dir=str(world), out=str(out), ray=RAY, max_quarantine_share=0.9))
    assert artifacts.exists(out / "manifest.json")
    from leadre.data.ingest import QuarantineError
    with pytest.raises(QuarantineError) as e:
        run(IngestConfig(input_dir=str(world), out=str(out), ray=RAY, max_quarantine_share=0.1))
    msg = str(e.value)
    assert "events:" in msg and "unknown_ad_id=" in msg and "max_quarantine_share=0.1" in msg
    # the quarantine stays for inspection; no manifest vouches for the partial output
    assert artifacts.read_table(out, "quarantine").num_rows > 0
    assert not artifacts.exists(out / "manifest.json")


def test_events_and_users_are_written_as_user_shards_recorded_in_the_manifest(ray_local,
                                                                              tmp_path):
    """The ingest -> prompts contract: shard k of events and of users holds the same users,
    no user is in two files, every events file is sorted by (user_id, ts), and the manifest
    vouches for it."""
    from leadre.data import shards

    world = tmp_path / "world"
    synth_run(SynthConfig(out=str(world), users=300, ads=60, seed=2))
    out = str(tmp_path / "ingest")
    run(IngestConfig(input_dir=str(world), out=out, ray=RAY, batch_size=3000))
    layout = shards.read_layout(artifacts.read_manifest(out, stage="ingest"))
    assert layout is not None and layout["shards"] > 3
    ids = shards.shard_ids(out)
    assert len(ids) > 3 and max(ids) < layout["shards"]
    seen: dict[str, int] = {}
    total = 0
    for k in ids:
        ev = shards.read_shard(out, "events", k)
        users = shards.read_shard(out, "users", k)
        assert ev is not None and ev.schema.equals(schema.EVENTS)
        assert ev.equals(ev.sort_by(shards.SORT_KEYS))
        for u in set(ev.column("user_id").to_pylist()):
            assert seen.setdefault(u, k) == k
        assert (shards.shard_of(ev.column("user_id"), layout["shards"]) == k).all()
        if users is not None:
            assert (shards.shard_of(users.column("user_id"), layout["shards"]) == k).all()
        total += ev.num_rows
    assert total == _counts(out)["events"]["clean"] > 0
    # a reader of the whole tables sees no difference
    assert artifacts.read_table(out, "users").num_rows == _counts(out)["users"]["clean"]
    assert shards.read_layout({}) is None


# --- ids: the serving API's rule, applied at ingest -------------------------------------------

def _append(world, name, rows):
    """Add ``rows`` (dicts of raw values) to table ``name`` of a generated world."""
    def add(t):
        extra = pa.Table.from_pylist(rows, schema=schema.RAW_SCHEMAS[name])
        return pa.concat_tables([t.cast(schema.RAW_SCHEMAS[name]), extra])
    _rewrite(world, name, add)


def _raw_rows(world) -> dict[str, int]:
    return {name: pq.ParquetDataset(world / name).read().num_rows
            for name in ("ads", "users", "events")}


def _assert_every_row_counted(out, raw_rows):
    """The manifest counts each input row once: kept, or under its quarantine reason; and the
    counts agree with the raw files and with the tables written."""
    counts = _counts(out)
    q = artifacts.read_table(out, "quarantine").to_pandas()
    for name, n in raw_rows.items():
        c = counts[name]
        assert c["rows_in"] == n == c["clean"] + sum(c["by_reason"].values()), (name, c)
        assert c["quarantined"] == sum(c["by_reason"].values())
        assert c["clean"] == artifacts.read_table(out, name).num_rows
        assert q[q.table == name].reason.value_counts().to_dict() == c["by_reason"]


def test_ids_outside_the_serving_rule_are_quarantined_as_bad_id(ray_local, tmp_path):
    """An id with a space or over 128 characters (user_id or ad_id, in any table) is
    quarantined as ``bad_id`` with the rule named; 128 characters still pass; and every id of
    the clean tables is one the serving API accepts, every quarantined one one it refuses."""
    from pydantic import ValidationError

    from leadre.cli import main
    from leadre.serve.api import request_model

    world = _small_world(tmp_path)
    ad = artifacts.read_table(world, "ads").slice(0, 1).to_pylist()[0]
    ev = artifacts.read_table(world, "events")
    ad_event = ev.filter(pc.equal(ev.column("domain"), "ad")).slice(0, 1).to_pylist()[0]
    longest, too_long = "v" * schema.ID_MAX_CHARS, "w" * (schema.ID_MAX_CHARS + 1)
    _append(world, "ads", [{**ad, "ad_id": "ad 7"}, {**ad, "ad_id": "a" * 300}])
    _append(world, "users", [{"user_id": "u 1"}, {"user_id": too_long}, {"user_id": longest}])
    _append(world, "events", [{**ad_event, "user_id": "bad user"},
                              {**ad_event, "user_id": too_long},
                              {**ad_event, "user_id": longest},
                              {**ad_event, "ad_id": "ad 7"}])
    raw = _raw_rows(world)
    out = tmp_path / "ingest"
    assert main(["ingest", "--input-dir", str(world), "--out", str(out)]) == 0

    counts = _counts(out)
    assert counts["ads"]["by_reason"] == {"bad_id": 2}
    assert counts["users"]["by_reason"] == {"bad_id": 2}
    assert counts["events"]["by_reason"]["bad_id"] == 3
    _assert_every_row_counted(out, raw)
    q = artifacts.read_table(out, "quarantine").to_pandas()
    bad = q[q.reason == "bad_id"]
    assert len(bad) == 7
    assert all(f"is not {schema.ID_PATTERN}" in d for d in bad.detail)
    assert "[A-Za-z0-9_.:@-]{1,128}" in bad.detail.iloc[0]
    assert any("'u 1'" in d for d in bad.detail)
    assert any(f"({schema.ID_MAX_CHARS + 1} characters)" in d for d in bad.detail)
    # the clean tables hold only ids serving can answer; the quarantined ones it would refuse
    request = request_model(10, 100, 50)
    users = artifacts.read_table(out, "users").column("user_id").to_pylist()
    assert longest in users and too_long not in users
    events = artifacts.read_table(out, "events")
    assert longest in events.column("user_id").to_pylist()
    ids = set(users) | set(events.column("user_id").to_pylist()) | set(
        artifacts.read_table(out, "ads").column("ad_id").to_pylist()) | {
        a for a in events.column("ad_id").to_pylist() if a is not None}
    assert all(schema.is_valid_id(i) for i in ids)
    for u in users[:50] + [longest]:
        request(user_id=u)
    for row in bad.row:
        rec = json.loads(row)
        for col in ("user_id", "ad_id"):
            if rec.get(col) is not None and not schema.is_valid_id(rec[col]):
                with pytest.raises(ValidationError):
                    request(user_id=rec[col])


def test_the_real_datasets_ids_pass_the_id_rule(scientific_dir, beauty_dir):
    """LC-Rec's ids (numeric user and item ids; Amazon ASINs in other releases) fit the rule:
    applying it at ingest quarantines nothing of the real data."""
    from leadre.data import lcrec

    for d in (scientific_dir, beauty_dir):
        tables, _ = lcrec.load(d)
        for name, col in (("ads", "ad_id"), ("users", "user_id"), ("events", "user_id"),
                          ("events", "ad_id")):
            ids = [i for i in tables[name].column(col).to_pylist() if i is not None]
            assert ids and all(schema.is_valid_id(i) for i in ids), (d, name, col)
    assert all(schema.is_valid_id(i) for i in ("B000052YAN", "0972683275", "A1Z54EM24Y40LL"))


# --- input with nothing usable in it: one line, exit 2, no manifest ---------------------------

def _set(world, name, column, values):
    _rewrite(world, name, lambda t: t.set_column(t.schema.get_field_index(column), column,
                                                 pa.array(values(t), pa.string())))


def _all_ads_bad(world):
    _set(world, "ads", "ad_id", lambda t: [f"ad #{i}" for i in range(t.num_rows)])


def _no_ads(world):
    _rewrite(world, "ads", lambda t: t.slice(0, 0))


def _no_events(world):
    _rewrite(world, "events", lambda t: t.slice(0, 0))


def _all_events_bad(world):
    _set(world, "events", "action", lambda t: ["share"] * t.num_rows)


def _events_name_no_known_ad(world):
    _set(world, "events", "ad_id",
         lambda t: [None if a is None else "ad_gone" for a in t.column("ad_id").to_pylist()])


def _users_of_another_world(world):
    _set(world, "users", "user_id", lambda t: [f"other{i}" for i in range(t.num_rows)])


UNUSABLE = [
    (_all_ads_bad, ["ads table: all 30 rows of", "are quarantined (bad_id=30)"]),
    (_no_ads, ["ads table:", "/ads holds no rows"]),
    (_no_events, ["events table:", "/events holds no rows"]),
    (_all_events_bad, ["events table: all", "are quarantined (unknown_action="]),
    (_events_name_no_known_ad, ["is an ad event naming an ad of the ads table",
                                "(events quarantined: unknown_ad_id="]),
    (_users_of_another_world, ["is by one of the 60 users of", "not from the same source"]),
]


@pytest.mark.parametrize("damage,names", UNUSABLE, ids=[f.__name__[1:] for f, _ in UNUSABLE])
def test_input_with_nothing_usable_exits_2_with_one_line(ray_local, tmp_path, capsys, damage,
                                                         names):
    """Tables with the right schema and nothing usable: no ads or events at all, a table
    whose every row is quarantined, events that name no ad of the ads table or no user of the
    users table. ``leadre ingest`` says which, in one line, exit 2; no manifest is written."""
    from leadre.cli import main

    world = _small_world(tmp_path)
    damage(world)
    out = tmp_path / "ingest"
    rc = main(["ingest", "--input-dir", str(world), "--out", str(out)])  # raises on a traceback
    # Ray Data's progress logs share stderr: the error is its last line, and the only one
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("leadre ingest: error: ")]
    print(f"\n{damage.__name__[1:]}: rc {rc}: {errors}")
    assert rc == 2 and len(errors) == 1
    err = errors[0]
    assert "no manifest was written" in err
    for name in names:
        assert name in err
    assert not (out / "manifest.json").exists()
