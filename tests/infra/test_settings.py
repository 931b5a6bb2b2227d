"""Settings are parsed once, at the edge, and refuse what they cannot use."""

from __future__ import annotations

import itertools
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

import pytest

from infra.settings import CallControl, Settings, SettingsError
from infra.settings_reference import COMMAND, DOCS_PATH, env_name, reference, setting_docs
from metering.worker import Connections, build_processor
from rating.catalog import Catalog


def test_defaults_and_overrides() -> None:
    s = Settings.from_env(
        {
            "METER_BATCH_MAX_RECORDS": "100",
            "METER_DATA_DIR": "/tmp/x",
            "METER_REDIS_URL": "redis://127.0.0.1:1/0",
            "PATH": "/bin",
        }
    )
    assert s.batch_max_records == 100 and s.data_dir == Path("/tmp/x")
    assert s.redis_url == "redis://127.0.0.1:1/0" and s.kafka_bootstrap == ""


def test_unknown_setting_is_an_error() -> None:
    with pytest.raises(SettingsError, match="METER_BATCH_MAX_RECORD"):
        Settings.from_env({"METER_BATCH_MAX_RECORD": "100"})  # typo


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("METER_BATCH_MAX_RECORDS", "many"),
        ("METER_BATCH_MAX_RECORDS", "0"),
        ("METER_MAX_CALL_S", "-1"),
        ("METER_REDIS_TIMEOUT_S", "soon"),
        ("METER_API_PORT", "70000"),
        ("METER_AUTHORIZE_DEADLINE_S", "0"),
        ("METER_AUTHORIZE_GRANT_S", "0"),
        ("METER_REDIS_WAIT_REPLICAS", "-1"),
        ("METER_REDIS_WAIT_REPLICAS", "17"),
        ("METER_REDIS_WAIT_REPLICAS", "one"),
        ("METER_REDIS_WAIT_TIMEOUT_MS", "0"),
        ("METER_REDIS_WAIT_TIMEOUT_MS", "0.1"),
    ],
)
def test_bad_values_are_errors(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_the_wait_settings_read_as_given_and_bounded_by_the_redis_timeout() -> None:
    s = Settings.from_env({"METER_REDIS_WAIT_REPLICAS": "2", "METER_REDIS_WAIT_TIMEOUT_MS": "250"})
    assert (s.redis_wait_replicas, s.redis_wait_timeout_ms) == (2, 250)
    assert (Settings().redis_wait_replicas, Settings().redis_wait_timeout_ms) == (0, 100)
    with pytest.raises(SettingsError, match="METER_REDIS_WAIT_TIMEOUT_MS must be below"):
        Settings.from_env({"METER_REDIS_WAIT_REPLICAS": "1", "METER_REDIS_WAIT_TIMEOUT_MS": "5000"})
    with pytest.raises(SettingsError, match="METER_REDIS_WAIT_TIMEOUT_MS must be below"):
        Settings.from_env({"METER_REDIS_WAIT_REPLICAS": "1", "METER_REDIS_TIMEOUT_S": "0.1"})
    # Off, the wait's timeout bounds nothing: a short Redis timeout stays allowed.
    assert Settings.from_env({"METER_REDIS_TIMEOUT_S": "0.05"}).redis_timeout_s == 0.05


# --- Every setting is documented, in one generated table ------------------------------------

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / DOCS_PATH


def env_names() -> dict[str, str]:
    """``METER_<FIELD>`` -> field, the mapping ``Settings.from_env`` reads by."""
    return {f"METER_{f.name.upper()}": f.name for f in fields(Settings)}


def test_the_settings_reference_is_generated_from_the_settings_as_they_are() -> None:
    assert REFERENCE.read_text() == reference(), (
        f"{DOCS_PATH} is stale: regenerate it with `{COMMAND}` and commit it"
    )


def settings_table() -> list[list[str]]:
    """The cells of every row of the reference's table, which must be the page's only one and
    unbroken: a blank line inside it would leave the rows after it out of the table."""
    lines = REFERENCE.read_text().splitlines()
    headers = [i for i, x in enumerate(lines) if x.startswith("| variable |")]
    assert len(headers) == 1, "the settings reference has one table"
    rows = list(itertools.takewhile(lambda x: x.startswith("|"), lines[headers[0] :]))
    assert set(rows[1]) <= {"|", "-"}
    assert not [x for x in lines[headers[0] + len(rows) :] if x.startswith("|")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[2:]]


def test_the_settings_table_lists_every_setting_once_with_its_default_and_meaning() -> None:
    known = env_names()
    table = settings_table()
    documented = [re.fullmatch(r"`(METER_[A-Z0-9_]+)`", row[0]) for row in table]
    names = [m[1] for m in documented if m]
    assert len(names) == len(table), "a row without one variable"
    assert len(names) == len(set(names)), "a variable is listed twice"
    assert sorted(set(known) - set(names)) == [], "settings the table does not document"
    assert sorted(set(names) - set(known)) == [], "the table documents unknown settings"
    defaults = Settings()
    for name, (_, type_, default, meaning) in zip(names, table, strict=True):
        value = getattr(defaults, known[name])
        assert type_ == type(value).__name__.removeprefix("Posix"), name
        assert default == (f"`{value}`" if value != "" else "empty"), name
        # a default the environment could not spell back would be a wrong reference
        if value != "":
            env_value = getattr(Settings.from_env({name: str(value)}), known[name])
            assert env_value == value, name
        assert len(meaning) > 10, f"{name}: no meaning"


def test_every_setting_has_a_description_of_its_own() -> None:
    docs = setting_docs()
    assert [d.field for d in docs] == [f.name for f in fields(Settings)]
    assert all(d.description and d.env == env_name(d.field) for d in docs)


def docs_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_meter_variable_the_docs_name_is_a_setting() -> None:
    for page in docs_pages():
        named = set(re.findall(r"\bMETER_[A-Z][A-Z0-9_]*", page.read_text()))
        assert sorted(named - set(env_names())) == [], page.relative_to(ROOT)


def test_settings_are_listed_in_the_reference_only() -> None:
    for page in docs_pages():
        if page != REFERENCE:
            rows = re.findall(r"^\| `METER_\w+`", page.read_text(), flags=re.M)
            assert rows == [], f"{page.relative_to(ROOT)} lists settings: link {DOCS_PATH}"


# --- One CallControl, from the settings, for the API and the processor ---------------------

NON_DEFAULT = Settings(
    authorize_grant_s=123,
    authorize_grace_s=45,
    authorize_max_s=6_789,
    max_message_bytes=1_111,
    max_call_s=2_222,
    max_clock_skew_s=33,
)


def test_call_control_comes_from_the_authorize_settings() -> None:
    assert NON_DEFAULT.call_control() == CallControl(grant_s=123, grace_s=45, max_s=6_789)
    # The two defaults agree, so an unset variable means the same on both sides.
    assert Settings().call_control() == CallControl()


def test_every_setting_of_the_processor_reaches_the_one_run_metering_builds() -> None:
    conns = Connections(
        pool=cast(Any, None),
        redis=cast(Any, None),
        producer=cast(Any, None),
        balances=cast(Any, None),
    )
    p = build_processor(NON_DEFAULT, conns, Catalog(cast(Any, None)))
    # Private attributes on purpose: the processor has no other way to show what it was given,
    # and each of these silently falls back to a default when dropped.
    assert p._call_control == CallControl(grant_s=123, grace_s=45, max_s=6_789)
    assert (p._max_bytes, p._max_call_s, p._skew_s) == (1_111, 2_222, 33)
    assert p._call_control != CallControl()  # the test would prove nothing with the defaults
