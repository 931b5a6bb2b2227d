"""Rating: hand-computed cases and properties (billed seconds, rounding up, monotonicity),
versions in force at answered_at (outbound rates) or the event's time (inbound, SMS, fees),
and the price-list CSV."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rating.pricelist_csv import CSV_COLUMNS, PriceListCsvError, export_csv, parse_csv
from rating.rating import (
    MAX_RATE_PER_MIN,
    NoRate,
    PriceList,
    PriceVersion,
    VoiceRate,
    billed_seconds,
    time_cost,
    voice_cost,
)


@pytest.mark.parametrize(
    ("d", "initial", "subsequent", "billed"),
    [
        (0, 6, 6, 0),  # zero seconds bills nothing
        (1, 6, 6, 6),
        (6, 6, 6, 6),  # exactly on an increment
        (7, 6, 6, 12),  # one second past it
        (59, 60, 6, 60),  # 60/6 with a 59 s call
        (61, 60, 6, 66),
        (120, 60, 6, 120),
        (1, 1, 1, 1),
        (37, 1, 1, 37),
        (61, 60, 60, 120),
    ],
)
def test_billed_seconds_table(d: int, initial: int, subsequent: int, billed: int) -> None:
    assert billed_seconds(d, initial, subsequent) == billed


@pytest.mark.parametrize(
    ("d", "rate", "cost"),
    [
        # 0.007/min for 6 s = 0.0007 -> 700 micro-units
        (6, VoiceRate("1", 7_000), 700),
        (7, VoiceRate("1", 7_000), 1_400),
        # 0.0123/min * 6 s = 0.00123 exactly
        (6, VoiceRate("1", 12_300), 1_230),
        # 0.0001/min * 6 s = 0.00001 -> 10; 1 s at 1/1 = 1.666.. -> rounds up to 2
        (1, VoiceRate("1", 100, initial_s=1, subsequent_s=1), 2),
        # connect fee once, plus time
        (30, VoiceRate("447", 35_000, connect_fee=5_000, initial_s=60, subsequent_s=6), 40_000),
        # zero duration: no connect fee either (nothing billed)
        (0, VoiceRate("447", 35_000, connect_fee=5_000), 0),
    ],
)
def test_voice_cost_table(d: int, rate: VoiceRate, cost: int) -> None:
    assert voice_cost(d, rate)[0] == cost


def test_longest_prefix_wins_and_no_rate_is_an_error() -> None:
    pl = PriceList("p", "USD", VoiceRate("", 3_500), 4_000)
    for prefix, r in (("44", 15_000), ("447", 35_000), ("4479", 50_000)):
        pl.add_outbound(VoiceRate(prefix, r))
    assert pl.outbound_rate("+447911123456").prefix == "4479"
    assert pl.outbound_rate("+447011123456").prefix == "447"
    assert pl.outbound_rate("sip:+442071234567@carrier.example").prefix == "44"
    with pytest.raises(NoRate):
        pl.outbound_rate("+12125550100")
    with pytest.raises(NoRate):
        pl.outbound_rate("anonymous")
    assert pl.rate_call("inbound", "+12125550100", 60) == (3_500, 60)
    assert pl.rate_message(3) == 12_000


increments = st.sampled_from([(6, 6), (60, 6), (1, 1), (30, 6), (60, 60)])


@given(st.integers(min_value=0, max_value=100_000), increments)
def test_billed_is_a_whole_number_of_increments_and_covers_the_call(
    d: int, inc: tuple[int, int]
) -> None:
    initial, subsequent = inc
    b = billed_seconds(d, initial, subsequent)
    assert b >= d
    if d > 0:
        assert b >= initial
        assert (b - initial) % subsequent == 0
        assert b - d < max(initial, subsequent)  # never a whole extra increment


@given(
    st.integers(min_value=0, max_value=50_000),
    st.integers(min_value=0, max_value=50_000),
    st.integers(min_value=0, max_value=10_000_000),
    st.integers(min_value=0, max_value=1_000_000),
    increments,
)
def test_cost_is_monotonic_and_never_below_exact(
    d1: int, d2: int, rate: int, fee: int, inc: tuple[int, int]
) -> None:
    vr = VoiceRate("1", rate, fee, *inc)
    lo, hi = sorted((d1, d2))
    c_lo, b_lo = voice_cost(lo, vr)
    c_hi, _ = voice_cost(hi, vr)
    assert c_lo <= c_hi
    # exact cost of the billed time, as a fraction: cost * 60 >= fee * 60 + rate * billed
    if b_lo:
        assert c_lo * 60 >= fee * 60 + rate * b_lo
        assert (c_lo - 1) * 60 < fee * 60 + rate * b_lo  # and rounded up by less than 1 micro


# -- versions, fees, CSV -------------------------------------------------------------------

MIDNIGHT = 1_767_225_600  # 2026-01-01T00:00:00Z


def _versioned() -> PriceList:
    pl = PriceList("v", "USD", VoiceRate("", 3_500), 4_000)
    pl.add_outbound(VoiceRate("44", 15_000))
    pl.add_outbound(VoiceRate("44", 20_000, effective_from=MIDNIGHT))  # a rise at midnight
    pl.add_outbound(VoiceRate("447", 35_000, 5_000, 60, 6, effective_from=MIDNIGHT))  # new
    return pl


@pytest.mark.parametrize(
    ("answered_at", "to", "seconds", "cost"),
    [
        # one second before midnight: the old rate, and 447 does not exist yet (44 matches)
        (MIDNIGHT - 1, "+447911123456", 6, 1_500),
        (MIDNIGHT - 1, "+442071234567", 60, 15_000),
        # at midnight exactly: the new versions (connect fee + 60/6 on 447)
        (MIDNIGHT, "+442071234567", 60, 20_000),
        (MIDNIGHT, "+447911123456", 59, 5_000 + 35_000),
        (MIDNIGHT + 86_400, "+447911123456", 61, 5_000 + 38_500),
        # a call answered before midnight and ending after: rated by answered_at
        (MIDNIGHT - 30, "+442071234567", 120, 30_000),
    ],
)
def test_a_rate_change_at_midnight_rates_by_answered_at(
    answered_at: int, to: str, seconds: int, cost: int
) -> None:
    assert _versioned().rate_call("outbound", to, seconds, answered_at)[0] == cost


def test_a_prefix_whose_versions_all_start_later_does_not_match() -> None:
    pl = PriceList("v", "USD", VoiceRate("", 0), 0)
    pl.add_outbound(VoiceRate("33", 16_000, effective_from=MIDNIGHT))
    with pytest.raises(NoRate):
        pl.outbound_rate("+33142685300", MIDNIGHT - 1)
    assert pl.outbound_rate("+33142685300", MIDNIGHT).rate_per_min == 16_000


def test_fees_and_sms() -> None:
    pl = PriceList(
        "f",
        "USD",
        VoiceRate("", 0),
        4_000,
        number_monthly_fee=1_000_000,
        one_time_fees={"number_setup": 500_000},
    )
    assert pl.rate_numbers(3) == 3_000_000
    assert pl.one_time_fee("number_setup") == 500_000
    assert pl.rate_message(2) == 8_000
    with pytest.raises(NoRate):
        pl.one_time_fee("port_in")


def _repriced() -> PriceList:
    """Inbound 0.0035/min 6/6, SMS 0.004, 1.00/number, setup 0.50 until midnight; then inbound
    0.01/min 60/60, SMS 0.006, 2.00/number, setup 1.50 and a port-in fee; a day later SMS
    0.005 and no port-in fee."""
    pl = PriceList(
        "r",
        "USD",
        VoiceRate("", 3_500),
        4_000,
        number_monthly_fee=1_000_000,
        one_time_fees={"number_setup": 500_000},
    )
    # added newest first: the order of addition must not matter
    pl.add_prices(
        PriceVersion(
            MIDNIGHT + 86_400,
            VoiceRate("", 10_000, 0, 60, 60, MIDNIGHT + 86_400),
            5_000,
            2_000_000,
            {"number_setup": 1_500_000},
        )
    )
    pl.add_prices(
        PriceVersion(
            MIDNIGHT,
            VoiceRate("", 10_000, 0, 60, 60, MIDNIGHT),
            6_000,
            2_000_000,
            {"number_setup": 1_500_000, "port_in": 250_000},
        )
    )
    return pl


@pytest.mark.parametrize(
    ("at", "what", "cost"),
    [
        # a 61 s inbound call: 66 s at 0.0035/min before midnight, 120 s at 0.01/min after
        (MIDNIGHT - 1, "inbound 61", 3_850),
        (MIDNIGHT, "inbound 61", 20_000),
        # a call answered before midnight is rated by its answered_at, however long it lasts
        (MIDNIGHT - 30, "inbound 3600", 210_000),
        (MIDNIGHT - 1, "sms 3", 12_000),
        (MIDNIGHT, "sms 3", 18_000),
        (MIDNIGHT + 86_399, "sms 3", 18_000),
        (MIDNIGHT + 86_400, "sms 3", 15_000),
        (MIDNIGHT - 1, "numbers 2", 2_000_000),
        (MIDNIGHT, "numbers 2", 4_000_000),
        (MIDNIGHT - 1, "fee number_setup", 500_000),
        (MIDNIGHT, "fee number_setup", 1_500_000),
        (MIDNIGHT, "fee port_in", 250_000),
        # outbound prefixes are untouched by these versions
        (MIDNIGHT - 1, "outbound 6", 0),
    ],
)
def test_inbound_sms_and_fees_are_rated_with_the_version_in_force(
    at: int, what: str, cost: int
) -> None:
    pl = _repriced()
    kind, arg = what.split()
    if kind == "inbound":
        assert pl.rate_call("inbound", "+14155550100", int(arg), at)[0] == cost
    elif kind == "sms":
        assert pl.rate_message(int(arg), at) == cost
    elif kind == "numbers":
        assert pl.rate_numbers(int(arg), at) == cost
    elif kind == "fee":
        assert pl.one_time_fee(arg, at) == cost
    else:
        with pytest.raises(NoRate):
            pl.rate_call("outbound", "+14155550100", int(arg), at)


def test_a_fee_missing_from_the_version_in_force_is_no_rate() -> None:
    pl = _repriced()
    with pytest.raises(NoRate):
        pl.one_time_fee("port_in", MIDNIGHT - 1)
    with pytest.raises(NoRate):
        pl.one_time_fee("port_in", MIDNIGHT + 86_400)


def test_the_first_price_version_covers_earlier_times() -> None:
    pl = PriceList("e", "USD", VoiceRate("", 3_500, effective_from=MIDNIGHT), 4_000)
    pl.add_prices(PriceVersion(MIDNIGHT + 60, VoiceRate("", 9_000), 9_000))
    assert [v.effective_from for v in pl.price_versions()] == [MIDNIGHT, MIDNIGHT + 60]
    assert pl.rate_message(1, 0) == 4_000
    assert pl.voice_rate("inbound", "", MIDNIGHT - 1).rate_per_min == 3_500
    assert pl.rate_message(1, MIDNIGHT + 60) == 9_000


def test_a_price_version_with_the_same_start_replaces_it() -> None:
    pl = _repriced()
    pl.add_prices(PriceVersion(MIDNIGHT, VoiceRate("", 1), 7_000))
    assert len(pl.price_versions()) == 3
    assert pl.rate_message(1, MIDNIGHT) == 7_000
    with pytest.raises(NoRate):
        pl.one_time_fee("number_setup", MIDNIGHT)


def test_now_is_the_default_time() -> None:
    pl = PriceList("n", "USD", VoiceRate("", 3_500), 4_000)
    pl.add_prices(PriceVersion(4_000_000_000, VoiceRate("", 9_000), 9_000, 9_000))  # in 2096
    assert (pl.inbound.rate_per_min, pl.sms_per_part, pl.number_monthly_fee) == (3_500, 4_000, 0)
    assert (pl.rate_message(1), pl.rate_numbers(), pl.rate_call("inbound", "", 60)) == (
        4_000,
        0,
        (3_500, 60),
    )
    assert pl.rate_message(1, 4_000_000_000) == 9_000


@given(
    st.lists(
        st.tuples(st.integers(0, 1_000), st.integers(0, 1_000_000)),
        min_size=1,
        max_size=12,
    ),
    st.integers(-10, 1_010),
)
def test_prices_at_is_the_last_version_started_whatever_the_order_added(
    versions: list[tuple[int, int]], at: int
) -> None:
    first, *rest = versions
    pl = PriceList("h", "USD", VoiceRate("", 0, effective_from=first[0]), first[1])
    for start, sms in rest:
        pl.add_prices(PriceVersion(start, VoiceRate("", 0, effective_from=start), sms))
    latest = dict(versions)  # the same start: the last added wins
    started = [s for s in latest if s <= at]
    expected = latest[max(started)] if started else latest[min(latest)]
    assert pl.rate_message(1, at) == expected
    assert [v.effective_from for v in pl.price_versions()] == sorted(latest)


def test_csv_round_trip() -> None:
    pl = _versioned()
    pl.add_outbound(VoiceRate("1", 7_000, description='US, "48" states'))
    text = export_csv(pl.versions())
    back = parse_csv(text, default_from=0)
    assert back == pl.versions()
    assert export_csv(back) == text
    assert text.splitlines()[0] == ",".join(CSV_COLUMNS)


def test_csv_defaults_and_optional_columns() -> None:
    rates = parse_csv("prefix,rate_per_min\n+44,0.015\n", default_from=123)
    assert rates == [VoiceRate("44", 15_000, 0, 6, 6, 123)]


def test_bad_csv_rows_are_refused_whole_with_their_line_numbers() -> None:
    text = (
        "prefix,description,rate_per_min,connect_fee,initial_s,subsequent_s,effective_from\n"
        "44,UK,0.015,0,6,6,2026-01-01T00:00:00Z\n"  # line 2: fine
        "4x,bad prefix,0.015,0,6,6,\n"  # 3
        "45,float money,1e-3,0,6,6,\n"  # 4
        "46,too precise,0.0000001,0,6,6,\n"  # 5
        "47,zero increment,0.01,0,0,6,\n"  # 6
        "48,naive time,0.01,0,6,6,2026-01-01T00:00:00\n"  # 7
        "44,duplicate,0.02,0,6,6,2026-01-01T00:00:00+00:00\n"  # 8
        "49,short row\n"  # 9
        "50,negative,-0.01,0,6,6,\n"  # 10
    )
    with pytest.raises(PriceListCsvError) as err:
        parse_csv(text, default_from=0)
    assert [line for line, _ in err.value.errors] == [3, 4, 5, 6, 7, 8, 9, 10]
    assert "line 2" in err.value.errors[5][1]


def test_csv_header_is_checked() -> None:
    with pytest.raises(PriceListCsvError) as err:
        parse_csv("prefix,price\n44,0.01\n", default_from=0)
    assert err.value.errors[0][0] == 1 and "rate_per_min" in err.value.errors[0][1]


rates_st = st.builds(
    VoiceRate,
    st.from_regex(r"[1-9][0-9]{0,5}", fullmatch=True),
    st.integers(0, MAX_RATE_PER_MIN),
    st.integers(0, 10_000_000),
    st.integers(1, 3600),
    st.integers(1, 3600),
    st.integers(0, 4_000_000_000),
    st.text(max_size=20).filter(lambda t: t == t.strip() and "\r" not in t),
)


@given(st.lists(rates_st, max_size=20, unique_by=lambda r: (r.prefix, r.effective_from)))
def test_csv_round_trip_property(rates: list[VoiceRate]) -> None:
    rates.sort(key=lambda r: (r.prefix, r.effective_from))
    assert parse_csv(export_csv(rates), default_from=0) == rates


@given(
    st.integers(min_value=1, max_value=20_000),
    st.integers(min_value=0, max_value=MAX_RATE_PER_MIN),
    st.integers(min_value=0, max_value=20_000),
)
def test_overage_after_included_seconds_is_never_below_exact(
    billed: int, rate: int, drawn: int
) -> None:
    drawn = min(drawn, billed)
    over = billed - drawn
    c = time_cost(over, rate)
    assert c * 60 >= rate * over > (c - 1) * 60 or (over == 0 and c == 0) or rate == 0
