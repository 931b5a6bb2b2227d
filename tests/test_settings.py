"""Settings are parsed once, at the edge, and refuse what they cannot use."""

from __future__ import annotations

from pathlib import Path

import pytest

from meter.settings import Settings, SettingsError


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
