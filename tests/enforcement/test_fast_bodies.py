"""The authorization's msgspec bodies must be the pydantic models' exact stand-ins: a body the
fast decoder accepts, ``AuthorizationIn`` accepts with the same values (anything else goes to
pydantic, whose answer stands), and the answer's JSON is ``AuthorizationOut``'s, byte for
byte."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from enforcement.http.authorizations import _DECODE_IN, _ENCODE, _FastOut, parse_authorization
from enforcement.http.models import AuthorizationIn, AuthorizationOut
from infra.http.errors import ApiError

BASE: dict[str, Any] = {
    "account_id": "acc_1",
    "call_id": "a84b4c76e66710@pc33.example.com",
    "direction": "outbound",
    "from": "+14155550100",
    "to": "+442071234567",
}

TRICKY = [
    "",
    "a",
    "acc_1\n",
    "c1\n",
    "\n",
    "acc 1",
    "ácc",
    "a" * 64,
    "a" * 65,
    "x" * 256,
    "x" * 257,
    'q"uote\\',
    "inbound",
    "outbound",
    "Outbound",
    "\ud800",
    "\x00",
    "|",
    "~",
    "{}",
    "-a",
]

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False),
    st.text(max_size=300),
    st.sampled_from(TRICKY),
    st.lists(st.integers(), max_size=2),
)
fields = st.sampled_from(
    ["account_id", "call_id", "direction", "from", "to", "outbound_profile_id", "from_", "x"]
)


def _pydantic(raw: bytes) -> AuthorizationIn | None:
    try:
        return AuthorizationIn.model_validate_json(raw)
    except ValidationError:
        return None


def _fast(raw: bytes) -> Any:
    try:
        return _DECODE_IN.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def _same(fast: Any, slow: AuthorizationIn) -> None:
    for name in ("account_id", "call_id", "direction", "from_", "to", "outbound_profile_id"):
        assert getattr(fast, name) == getattr(slow, name), name


def _check(raw: bytes) -> None:
    fast = _fast(raw)
    if fast is None:
        return
    slow = _pydantic(raw)
    assert slow is not None, f"msgspec accepted what pydantic rejects: {raw!r}"
    _same(fast, slow)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(fields, values, max_size=4), st.sets(fields, max_size=2))
def test_msgspec_never_accepts_what_pydantic_rejects(
    changes: dict[str, Any], dropped: set[str]
) -> None:
    body = {k: v for k, v in (BASE | changes).items() if k not in dropped}
    try:
        raw = orjson.dumps(body)
    except TypeError:
        return  # not JSON (a lone surrogate orjson refuses): sent as text below
    _check(raw)


@pytest.mark.parametrize("field", ["account_id", "call_id", "direction", "from", "to"])
@pytest.mark.parametrize("value", TRICKY)
def test_each_field_at_its_edges(field: str, value: str) -> None:
    if value == "\ud800":  # not encodable: sent escaped, as a client could
        _check(orjson.dumps(BASE | {field: "@@"}).replace(b"@@", b"\\ud800"))
    else:
        _check(orjson.dumps(BASE | {field: value}))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"account_id":"acc_1","account_id":"acc_2","call_id":"c","direction":"inbound",'
        b'"from":"a","to":"b"}',
        b'{"account_id":"acc_1","call_id":"c","direction":"inbound","from":"a","to":"b"} x',
        b'\xef\xbb\xbf{"account_id":"acc_1","call_id":"c","direction":"inbound","from":"a",'
        b'"to":"b"}',
        b'{"account_id":"acc\\u005f1","call_id":"c","direction":"inbound","from":"a","to":"b"}',
        b'{"account_id":"acc_1","call_id":"c\\n","direction":"inbound","from":"a","to":"b"}',
        b'{"account_id":"acc_1","call_id":"c","direction":"inbound","from":"a","to":"\\ud800"}',
        b'{"account_id":"acc_1","call_id":"c","direction":"inbound","from":"a","to":"b",'
        b'"outbound_profile_id":null}',
        b"[]",
        b"null",
        b"  ",
    ],
)
def test_odd_json(raw: bytes) -> None:
    _check(raw)


def test_what_msgspec_refuses_is_answered_by_pydantic() -> None:
    with pytest.raises(ApiError) as e:
        parse_authorization(orjson.dumps(BASE | {"account_id": "acc_1\n"}))
    assert (e.value.status, e.value.field) == (422, "account_id")
    with pytest.raises(ApiError) as e:
        parse_authorization(b"{")
    assert e.value.status == 400
    assert parse_authorization(orjson.dumps(BASE)).call_id == BASE["call_id"]


@pytest.mark.parametrize(
    "out",
    [
        _FastOut("allow", "ok", 300, 'acc_1:q"uote\\~', datetime.fromtimestamp(1_795_300_360, UTC)),
        _FastOut("allow", "ok", 14_400, "a:b", datetime(2028, 2, 29, 23, 59, 59, tzinfo=UTC)),
        _FastOut("deny", "insufficient_credit", 0, None, None),
        _FastOut("deny", "concurrent_call_limit", 0, None, None),
    ],
)
def test_the_answer_is_authorization_outs_json(out: _FastOut) -> None:
    model = AuthorizationOut(
        decision=out.decision,  # type: ignore[arg-type]
        reason=out.reason,  # type: ignore[arg-type]
        max_duration_s=out.max_duration_s,
        reservation_id=out.reservation_id,
        expires_at=out.expires_at,
    )
    assert _ENCODE.encode(out) == model.model_dump_json().encode()
