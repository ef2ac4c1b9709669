"""The ingest path's speed-ups keep behaviour: shared observables equal freshly built ones and
fail the same way, the CEF extension unescaping fast path splits as before, and the cyclic
garbage collector's pause is counted across threads and restores what it found.

The reference functions below are the implementations these fast paths replaced (copied from
commit cfea15a), kept here so that hypothesis compares the two on the same inputs."""

from __future__ import annotations

import datetime as dt
import gc
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.events import gen_cef, gen_leef, gen_syslog
from ray_qalloc.exceptions import InvalidEvent
from ray_qalloc.integration import cef, fields, leef, syslog
from ray_qalloc.integration.events import Observable, hash_kind
from ray_qalloc.integration.gcpause import paused_gc

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- the reference implementations (before the speed-ups) ------------------------------------------
def reference_observables_from(ext: dict[str, str], keys: dict[str, str], fmt: str,
                               prefix: str = "extension") -> list[Observable]:
    out: list[Observable] = []
    for key, value in ext.items():
        kind = keys.get(key)
        if kind is None or value == "":
            continue
        if kind == "ip":
            if not fields.is_ip(value):
                raise InvalidEvent("bad ip", field=f"{prefix}.{key}", format=fmt)
        elif kind == "port":
            if not (value.isascii() and value.isdigit() and len(value) <= 5 and int(value) <= 65535):
                raise InvalidEvent("bad port", field=f"{prefix}.{key}", format=fmt)
        elif kind == "hash":
            kind = hash_kind(value)
        out.append(Observable.of(kind, value, key))
    return out


def reference_host_observable(host: str, name: str) -> Observable:
    return Observable.of("ip" if fields.is_ip(host) else "hostname", host, name)


def _outcome(fn, *args):
    """The observables' plain content, or the field an error names."""
    try:
        return [o.model_dump() for o in fn(*args)]
    except InvalidEvent as exc:
        return ("error", exc.field)


# values that hit every check: addresses good and bad, ports in and out of range, digests
values = st.one_of(
    st.ip_addresses().map(str), st.sampled_from(["10.0.0.1", "256.1.1.1", "::1", "fe80::1%eth0", "", "0",
                                                 "65535", "65536", "080", "1e3", "x" * 300]),
    st.integers(0, 99_999).map(str), st.text(max_size=12),
    st.sampled_from([32, 40, 64, 128, 50]).map(lambda n: "a" * n))
cef_keys = st.sampled_from(sorted(cef.OBSERVABLE_KEYS) + ["msg", "act", "cs1"])
leef_keys = st.sampled_from(sorted(leef.OBSERVABLE_KEYS) + ["cat", "sev"])


@FAST
@given(records=st.lists(st.dictionaries(cef_keys, values, max_size=8), min_size=1, max_size=4),
       fmt=st.sampled_from(["cef", "leef"]), leef_keys_=st.lists(st.dictionaries(leef_keys, values, max_size=6),
                                                                  max_size=2))
def test_observables_from_matches_the_reference(records, fmt, leef_keys_):
    # several records in a row: the later ones meet what the earlier ones left in the table
    for ext in records:
        assert _outcome(fields.observables_from, ext, cef.OBSERVABLE_KEYS, fmt) == \
            _outcome(reference_observables_from, ext, cef.OBSERVABLE_KEYS, fmt)
    for ext in leef_keys_:
        assert _outcome(fields.observables_from, ext, leef.OBSERVABLE_KEYS, "leef", "attributes") == \
            _outcome(reference_observables_from, ext, leef.OBSERVABLE_KEYS, "leef", "attributes")


@FAST
@given(host=values, name=st.sampled_from(["syslog.hostname", "dvchost"]))
def test_host_observable_matches_the_reference(host, name):
    for _ in range(2):   # cold, then shared
        assert fields.host_observable(host, name) == reference_host_observable(host, name)


def test_a_bad_value_is_refused_every_time_it_comes():
    ext = {"src": "10.0.0.999"}
    for _ in range(3):
        with pytest.raises(InvalidEvent) as exc:
            fields.observables_from(ext, cef.OBSERVABLE_KEYS, "cef")
        assert exc.value.field == "extension.src"


def test_the_shared_table_is_bounded(monkeypatch):
    monkeypatch.setattr(fields, "_SHARED_MAX", 50)
    fields._SHARED.clear()
    for i in range(500):
        fields.observables_from({"suser": f"user{i}"}, cef.OBSERVABLE_KEYS, "cef")
        assert len(fields._SHARED) <= 50
    long_value = "u" * (fields._SHARED_LEN + 1)
    [obs] = fields.observables_from({"suser": long_value}, cef.OBSERVABLE_KEYS, "cef")
    assert obs.value == long_value and all(o.value != long_value for o in fields._SHARED.values())


def test_declared_hash_and_final_kind_do_not_mix():
    digest = "ab" * 32
    [first] = fields.observables_from({"fileHash": digest}, cef.OBSERVABLE_KEYS, "cef")
    assert first.kind == "sha256"
    assert fields.observable("hash", digest, "fileHash").kind == "hash"


# ---- whole records: the same events cold and warm, as the reference parsers gave ------------------
@pytest.mark.parametrize("gen, parse", [(gen_cef, cef.parse_cef), (gen_leef, leef.parse_leef),
                                        (gen_syslog, syslog.parse_syslog)])
def test_events_are_the_same_whether_observables_are_shared_or_fresh(gen, parse):
    rng = random.Random(5)
    lines = [gen(rng, i) for i in range(300)] * 2
    fields._SHARED.clear()
    warm = [parse(line, received_at=NOW) for line in lines]
    fresh = []
    for line in lines:
        fields._SHARED.clear()
        fresh.append(parse(line, received_at=NOW))
    assert [e.model_dump() for e in warm] == [e.model_dump() for e in fresh]
    for e in warm:   # the constructed event is what validation makes of the same values
        assert type(e).model_validate(e.model_dump()) == e


# ---- CEF extensions: the backslash check once per record ------------------------------------------
ext_char = st.sampled_from(list("ab =\\nr|") + ["\\=", "\\\\", "\\n", "\\r", "\\|", "\\x"])


@FAST
@given(pairs=st.lists(st.tuples(st.from_regex(r"[a-z]{1,4}", fullmatch=True),
                                st.lists(ext_char, max_size=6).map("".join)), max_size=5))
def test_split_cef_unescapes_as_before(pairs):
    line = "CEF:0|v|p|1|s|n|5|" + " ".join(f"{k}={v}" for k, v in pairs)
    try:
        got = cef.split_cef(line)
    except InvalidEvent as exc:
        got = ("error", exc.field)
    # the reference: every value checked on its own
    try:
        m = cef._HEADER.match(line)
        assert m is not None
        ext_text = line[m.end():]
        ref_ext: dict[str, str] = {}
        if ext_text.strip(" "):
            parts = cef._KEY.split(ext_text)
            if parts[0]:
                raise InvalidEvent("not a pair", field="extension")
            keys = parts[1::2]
            ref_ext = dict(zip(keys, parts[2::2]))
            if len(ref_ext) != len(keys):
                seen: set[str] = set()
                dup = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
                raise InvalidEvent("twice", field=f"extension.{dup}")
            for key, value in ref_ext.items():
                if "\\" in value:
                    ref_ext[key] = cef._unescape_ext(value, key)
        ref = cef.CefRecord(0, "v", "p", "1", "s", "n", "5", ref_ext)
    except InvalidEvent as exc:
        ref = ("error", exc.field)
    assert got == ref


# ---- the garbage collector's pause --------------------------------------------------------------------
@pytest.fixture()
def gc_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_the_collector_is_off_inside_and_back_on_after(gc_on):
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_an_exception_still_turns_it_back_on(gc_on):
    with pytest.raises(RuntimeError):
        with paused_gc():
            raise RuntimeError("parse failed")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(gc_on):
    gc.disable()
    with paused_gc():
        pass
    assert not gc.isenabled()


def test_overlapping_batches_in_threads_resume_only_after_the_last(gc_on):
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with paused_gc():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with paused_gc():
            second_in.set()
            first_out.wait(5)
            seen["after the first left"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"after the first left": False}
    assert gc.isenabled()


# ---- RFC 5424 time stamps: the strict form read directly ------------------------------------------------
rfc3339 = st.builds(
    lambda d, frac, zone: d.replace(microsecond=0).isoformat() + frac + zone,
    st.datetimes(dt.datetime(1, 1, 1), dt.datetime(9999, 12, 30)),
    st.just("") | st.from_regex(r"\.[0-9]{1,6}", fullmatch=True),
    st.just("Z") | st.from_regex(r"[+-](0[0-9]|1[0-9]|2[0-3]):[0-5][0-9]", fullmatch=True))
impossible = st.from_regex(r"[0-9]{4}-(0[0-9]|1[0-9])-[0-3][0-9]T[0-2][0-9]:[0-6][0-9]:[0-6][0-9](\.[0-9]{1,6})?"
                           r"(Z|[+-][0-9]{2}:[0-9]{2})", fullmatch=True)


@FAST
@given(ts=rfc3339 | impossible | st.sampled_from(["٢٠٢٤-05-01T12:00:00Z", "2024-05-01T12:00:00.٥Z"]))
def test_rfc3339_fast_path_matches_parse_iso(ts):
    from ray_qalloc.integration import syslog_header, times

    assert syslog_header._RFC3339.fullmatch(ts)
    try:
        ref = times.parse_iso(ts)
    except (ValueError, OverflowError) as exc:
        ref = ("error", type(exc), str(exc))
    try:
        got = times.parse_rfc3339(ts)
    except (ValueError, OverflowError) as exc:
        got = ("error", type(exc), str(exc))
    assert got == ref
    if not isinstance(got, tuple):
        assert got.tzinfo is times.UTC and ref.tzinfo is times.UTC


def test_a_leef_record_without_sev_dumps_without_warnings():
    import warnings

    from ray_qalloc.integration.events import SeverityId

    e = leef.parse_leef("LEEF:1.0|Acme|FW|1|deny|src=10.0.0.2\tdst=10.0.0.3", received_at=NOW)
    assert e.severity_id is SeverityId.UNKNOWN
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e.model_dump()


@FAST
@given(names=st.lists(st.tuples(st.none() | st.text(max_size=300), st.none() | st.text(max_size=8),
                                st.none() | st.sampled_from(["1", "2.0"])), min_size=1, max_size=6))
def test_shared_products_equal_fresh_ones(names):
    from ray_qalloc.integration import events
    from ray_qalloc.integration.events import Product

    for vendor, name, version in names * 2:   # cold, then shared
        got = Product.of(vendor, name, version)
        assert got == Product(vendor_name=vendor, name=name, version=version)
        assert len(events._PRODUCTS) <= events._PRODUCTS_MAX
