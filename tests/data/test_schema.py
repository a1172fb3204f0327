"""Row validation: every quarantine reason, typed output, nothing dropped."""

import json

import pandas as pd
import pyarrow as pa
import pytest

from leadre.data import schema as S
from leadre.data.schema import Reason

KNOWN = {"ad1", "ad2"}


def _event(**kw):
    row = {"user_id": "u1", "ts": "2025-01-02T10:00:00Z", "domain": "ad", "action": "click",
           "ad_id": "ad1", "title": None}
    row.update(kw)
    return row


EVENT_CASES = [
    (_event(user_id=None), Reason.MISSING_FIELD),
    (_event(user_id="  "), Reason.MISSING_FIELD),
    (_event(ts=None), Reason.MISSING_FIELD),
    (_event(ts="not a time"), Reason.WRONG_TYPE),
    (_event(user_id=3.5), Reason.WRONG_TYPE),
    (_event(ad_id=["ad1"]), Reason.WRONG_TYPE),
    (_event(domain="tv", action="play", ad_id=None, title="x"), Reason.UNKNOWN_DOMAIN),
    (_event(action="share"), Reason.UNKNOWN_ACTION),
    (_event(action="play"), Reason.ACTION_DOMAIN_MISMATCH),
    (_event(domain="video", action="click", ad_id=None, title="x"), Reason.ACTION_DOMAIN_MISMATCH),
    (_event(ad_id=None), Reason.MISSING_FIELD),
    (_event(domain="news", action="read", ad_id=None, title=""), Reason.MISSING_FIELD),
    (_event(ad_id="ad999"), Reason.UNKNOWN_AD_ID),
    (_event(ts="1999-12-31T00:00:00Z"), Reason.TS_OUT_OF_RANGE),
    (_event(ts="2101-01-01T00:00:00Z"), Reason.TS_OUT_OF_RANGE),
]


@pytest.mark.parametrize("row,reason", EVENT_CASES, ids=[f"{r.value}-{i}" for i, (_, r) in enumerate(EVENT_CASES)])
def test_each_bad_event_is_quarantined_with_its_reason(row, reason):
    good = [_event(), _event(domain="video", action="play", ad_id=None, title="badminton")]
    v = S.validate_events(pd.DataFrame(good + [row]), known_ad_ids=KNOWN)
    assert v.clean.num_rows == 2 and v.clean.schema == S.EVENTS
    assert v.quarantine.num_rows == 1
    q = v.quarantine.to_pylist()[0]
    assert q["table"] == "events" and q["reason"] == reason.value and q["detail"]
    # the original row is preserved so nothing is lost
    original = json.loads(q["row"])
    assert set(original) == set(row)


def test_clean_events_are_typed_and_coerced():
    rows = [_event(user_id=42, ts=1735812000), _event(ts=pd.Timestamp("2025-01-02 10:00"))]
    v = S.validate_events(pd.DataFrame(rows), known_ad_ids=KNOWN)
    assert v.quarantine.num_rows == 0
    out = v.clean.to_pylist()
    assert out[0]["user_id"] == "42"  # integer ids become strings
    assert out[0]["ts"] == pd.Timestamp("2025-01-02 10:00", tz="UTC")
    assert out[1]["ts"] == pd.Timestamp("2025-01-02 10:00", tz="UTC")  # naive = UTC


def test_unknown_ad_check_can_be_skipped():
    v = S.validate_events(pd.DataFrame([_event(ad_id="anything")]), known_ad_ids=None)
    assert v.clean.num_rows == 1


def _ad(**kw):
    row = {"ad_id": "a1", "title": "shoes", "description": "d", "category": "sports",
           "advertiser": "Peak", "ecpm": 1.5, "active": True}
    row.update(kw)
    return row


AD_CASES = [
    (_ad(ad_id=None), Reason.MISSING_FIELD),
    (_ad(title=""), Reason.MISSING_FIELD),
    (_ad(category=None), Reason.MISSING_FIELD),
    (_ad(active=None), Reason.MISSING_FIELD),
    (_ad(ecpm="cheap"), Reason.WRONG_TYPE),
    (_ad(active="maybe"), Reason.WRONG_TYPE),
    (_ad(title=12.5), Reason.WRONG_TYPE),
    (_ad(ecpm=-1.0), Reason.INVALID_VALUE),
    (_ad(ecpm=float("inf")), Reason.INVALID_VALUE),
]


@pytest.mark.parametrize("row,reason", AD_CASES, ids=[f"{r.value}-{i}" for i, (_, r) in enumerate(AD_CASES)])
def test_each_bad_ad_is_quarantined_with_its_reason(row, reason):
    v = S.validate_ads(pd.DataFrame([_ad(ad_id="good"), row]))
    assert v.clean.num_rows == 1 and v.clean.schema == S.ADS
    assert v.quarantine.column("reason").to_pylist() == [reason.value]


def test_ads_accept_common_encodings():
    v = S.validate_ads(pd.DataFrame([_ad(active="yes", ecpm="2.5"), _ad(ad_id=7, active=0, ecpm=None)]))
    assert v.quarantine.num_rows == 0
    rows = v.clean.to_pylist()
    assert rows[0]["active"] is True and rows[0]["ecpm"] == 2.5
    assert rows[1]["ad_id"] == "7" and rows[1]["active"] is False and rows[1]["ecpm"] is None


def test_users_validation_and_optional_profile():
    rows = [{"user_id": "u1"}, {"user_id": "u2", "age": 200}, {"user_id": "u3", "age": "old"},
            {"user_id": None, "age": 30}, {"user_id": "u5", "age": 31.0, "gender": "female"}]
    v = S.validate_users(pd.DataFrame(rows))
    assert v.clean.column("user_id").to_pylist() == ["u1", "u5"]
    assert v.clean.schema == S.USERS
    assert v.quarantine.column("reason").to_pylist() == [
        Reason.INVALID_VALUE.value, Reason.WRONG_TYPE.value, Reason.MISSING_FIELD.value]


def test_duplicate_ids_keep_first():
    t = S.validate_ads(pd.DataFrame([_ad(ad_id="a", title="first"), _ad(ad_id="b"),
                                     _ad(ad_id="a", title="second")])).clean
    v = S.flag_duplicate_keys(t, "ads", "ad_id")
    assert v.clean.column("title").to_pylist() == ["first", "shoes"]
    assert v.quarantine.column("reason").to_pylist() == [Reason.DUPLICATE_ID.value]
    assert json.loads(v.quarantine.column("row")[0].as_py())["title"] == "second"


def test_duplicate_events_are_flagged_and_output_sorted():
    rows = [_event(ts="2025-01-03"), _event(ts="2025-01-02"), _event(ts="2025-01-03"),
            _event(ts="2025-01-03", action="conversion")]
    clean = S.validate_events(pd.DataFrame(rows), KNOWN).clean
    v = S.flag_duplicate_events(clean)
    assert v.clean.num_rows == 3
    ts = v.clean.column("ts").to_pylist()
    assert ts == sorted(ts)
    assert v.quarantine.column("reason").to_pylist() == [Reason.DUPLICATE_EVENT.value]


def test_missing_columns_are_missing_fields_not_crashes():
    v = S.validate_events(pa.table({"user_id": ["u1"]}), KNOWN)
    assert v.clean.num_rows == 0
    assert v.quarantine.column("reason").to_pylist() == [Reason.MISSING_FIELD.value]


def test_empty_batch():
    v = S.validate_events(S.EVENTS.empty_table(), KNOWN)
    assert v.clean.num_rows == 0 and v.quarantine.num_rows == 0
