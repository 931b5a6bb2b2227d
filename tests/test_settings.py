"""Settings are parsed once, at the edge, and refuse what they cannot use."""

from __future__ import annotations

import itertools
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

import pytest

from infra.settings import CallControl, Settings, SettingsError
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
    ],
)
def test_bad_values_are_errors(name: str, value: str) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({name: value})


# --- Every setting is documented -----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def env_names() -> dict[str, str]:
    """``METER_<FIELD>`` -> field, the mapping ``Settings.from_env`` reads by."""
    return {f"METER_{f.name.upper()}": f.name for f in fields(Settings)}


def settings_table() -> list[tuple[list[str], str]]:
    """The README's settings table: (variables, default) per row, up to its first non-row
    line, so a table cut in two by a blank line documents only its first half."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("## Settings (environment, read once in `infra/settings.py`)")
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    rows = list(itertools.takewhile(lambda x: x.startswith("|"), lines[first:]))
    assert rows[0].startswith("| variable | default |") and set(rows[1]) <= {"|", "-"}
    table = []
    for row in rows[2:]:
        name_cell, default_cell = (c.strip() for c in row.strip("|").split("|")[:2])
        names = re.findall(r"`(METER_[A-Z0-9_]+)`", name_cell)
        assert names, row
        table.append((names, default_cell))
    return table


def documented_default(value: object) -> str:
    if value == "":
        return "empty"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_the_readme_settings_table_lists_every_setting_and_nothing_else() -> None:
    known = env_names()
    documented = [n for names, _ in settings_table() for n in names]
    assert len(documented) == len(set(documented)), "a variable is listed twice"
    assert sorted(set(known) - set(documented)) == [], "settings the table does not document"
    assert sorted(set(documented) - set(known)) == [], "the table documents unknown settings"


def test_the_readme_settings_table_gives_each_setting_its_real_default() -> None:
    defaults = Settings()
    for names, cell in settings_table():
        parts = [p.strip().strip("`") for p in cell.split(" / ")]
        if len(parts) == 1:
            parts *= len(names)
        assert len(parts) == len(names), f"{names}: defaults {cell!r}"
        for name, part in zip(names, parts, strict=True):
            want = documented_default(getattr(defaults, env_names()[name]))
            assert part.startswith(want), f"{name}: README says {part!r}, Settings has {want!r}"


def test_every_meter_variable_the_readme_names_is_a_setting() -> None:
    named = set(re.findall(r"\bMETER_[A-Z][A-Z0-9_]*", (ROOT / "README.md").read_text()))
    assert sorted(named - set(env_names())) == []


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
