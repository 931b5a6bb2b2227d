"""Rating: hand-computed cases and properties (billed seconds, rounding up, monotonicity)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.rating import NoRate, PriceList, VoiceRate, billed_seconds, voice_cost


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
