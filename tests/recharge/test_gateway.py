"""The payment-gateway contract, run against the sandbox and against the Stripe adapter talking
to a local fake of Stripe's API; then the Stripe adapter's failure mapping, one fault at a time."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest
import stripe

from recharge.gateway import (
    ChargeRequest,
    ChargeResult,
    GatewayUnavailable,
    OutcomeUnknown,
    PaymentGateway,
    RefundRequest,
    SavedMethod,
    expiry_of,
    refund_key,
)
from recharge.sandbox import SandboxGateway
from recharge.stripe_gateway import StripeGateway
from tests.stripe_fake import API_KEY, StripeFake

TIMEOUT_S = 2.0
PI_PATH = "/v1/payment_intents"


@dataclass
class Harness:
    gateway: PaymentGateway
    charges: Callable[[], int]  # charges that captured money, as the processor counts them
    captured: Callable[[], int]  # micro-units captured in total
    attempts: Callable[[], int]  # charge attempts the processor made, declines in, replays out
    sent: Callable[[], int]  # charge requests sent (the sandbox sends none: its attempts)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[StripeFake]:
    # stripe-python otherwise writes a telemetry id under ~/.config/stripe on the first request.
    monkeypatch.setattr(stripe, "enable_telemetry", False)
    with StripeFake() as f:
        yield f


@pytest.fixture
async def stripe_gw(fake: StripeFake) -> AsyncIterator[StripeGateway]:
    gw = StripeGateway(API_KEY, api_base=fake.url, timeout_s=TIMEOUT_S)
    yield gw
    await gw.close()


@pytest.fixture(params=["sandbox", "stripe"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "sandbox":
        sandbox = SandboxGateway()
        yield Harness(
            sandbox,
            charges=lambda: sandbox.charge_count,
            captured=lambda: sandbox.total_captured,
            attempts=lambda: sandbox.attempt_count,
            sent=lambda: sandbox.attempt_count,
        )
        await sandbox.close()
        return
    fake: StripeFake = request.getfixturevalue("fake")
    gw = StripeGateway(API_KEY, api_base=fake.url, timeout_s=TIMEOUT_S)
    try:
        yield Harness(
            gw,
            charges=lambda: len(fake.charges),
            captured=lambda: sum(pi["amount_received"] for pi in fake.charges) * 10_000,
            attempts=lambda: len(fake.payment_intents),
            sent=lambda: len(fake.requests_to("POST", PI_PATH)),
        )
    finally:
        await gw.close()


def charge_request(
    saved: SavedMethod, key: str, amount: int = 12_500_000, currency: str = "USD"
) -> ChargeRequest:
    return ChargeRequest(
        account_id="acct-1",
        amount=amount,
        currency=currency,
        customer_ref=saved.customer_ref,
        method_ref=saved.method_ref,
        idempotency_key=key,
        description="Auto-recharge acct-1",
    )


# -- the contract: both gateways -------------------------------------------------------------


async def test_save_and_charge_captures_the_amount(harness: Harness) -> None:
    gw = harness.gateway
    saved = await gw.save_method("acct-1", "pm_card_visa")
    assert saved.customer_ref.startswith("cus_")
    assert saved.method_ref.startswith("pm_")
    assert (saved.brand, saved.last4) == ("visa", "4242")
    # PaymentMethod.card.exp_month / exp_year, as the fake Stripe (and the sandbox) give them
    assert (saved.exp_month, saved.exp_year) == (12, 2034)
    assert saved.expires() == (2034, 12)

    result = await gw.charge(charge_request(saved, "rc-1", amount=12_500_000))

    assert result.status == "succeeded"
    assert result.captured == 12_500_000
    assert result.gateway_ref.startswith("pi_")
    assert result.decline_code == ""
    assert (harness.charges(), harness.captured()) == (1, 12_500_000)


async def test_mastercard_reports_its_brand(harness: Harness) -> None:
    saved = await harness.gateway.save_method("acct-1", "pm_card_mastercard")
    assert (saved.brand, saved.last4) == ("mastercard", "4444")


@pytest.mark.parametrize(
    ("token", "last4", "decline_code"),
    [
        ("pm_card_chargeDeclined", "0002", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "9995", "insufficient_funds"),
        ("pm_card_authenticationRequired", "3184", "authentication_required"),
    ],
)
async def test_decline_is_a_result_and_captures_nothing(
    harness: Harness, token: str, last4: str, decline_code: str
) -> None:
    gw = harness.gateway
    saved = await gw.save_method("acct-1", token)
    assert saved.last4 == last4

    result = await gw.charge(charge_request(saved, "rc-declined"))
    assert result.status == "declined"
    assert result.captured == 0
    assert result.decline_code == decline_code
    assert result.gateway_ref.startswith("pi_")
    assert result.message

    # A retry of the same recharge answers the same decline without a second attempt.
    assert await gw.charge(charge_request(saved, "rc-declined")) == result
    assert (harness.charges(), harness.captured(), harness.attempts()) == (0, 0, 1)


async def test_same_key_twice_charges_once(harness: Harness) -> None:
    gw = harness.gateway
    saved = await gw.save_method("acct-1", "pm_card_visa")
    first = await gw.charge(charge_request(saved, "rc-7", amount=5_000_000))
    again = await gw.charge(charge_request(saved, "rc-7", amount=5_000_000))

    assert first.status == again.status == "succeeded"
    assert again.gateway_ref == first.gateway_ref
    assert again.captured == first.captured == 5_000_000
    assert (harness.charges(), harness.captured()) == (1, 5_000_000)

    other = await gw.charge(charge_request(saved, "rc-8", amount=5_000_000))
    assert other.gateway_ref != first.gateway_ref
    assert harness.charges() == 2


async def test_key_reused_for_another_amount_is_outcome_unknown(harness: Harness) -> None:
    gw = harness.gateway
    saved = await gw.save_method("acct-1", "pm_card_visa")
    await gw.charge(charge_request(saved, "rc-9", amount=5_000_000))
    # The first use of the key charged; answering "not charged" here would be a lie.
    with pytest.raises(OutcomeUnknown):
        await gw.charge(charge_request(saved, "rc-9", amount=6_000_000))
    assert (harness.charges(), harness.captured()) == (1, 5_000_000)


@pytest.mark.parametrize("amount", [12_345_678, 1, 0, -10_000])
async def test_amount_not_in_whole_cents_is_refused_before_any_request(
    harness: Harness, amount: int
) -> None:
    saved = await harness.gateway.save_method("acct-1", "pm_card_visa")
    with pytest.raises(ValueError, match="whole number of cents"):
        await harness.gateway.charge(charge_request(saved, "rc-odd", amount=amount))
    assert harness.sent() == 0


async def test_amount_under_stripes_minimum_is_refused(harness: Harness) -> None:
    saved = await harness.gateway.save_method("acct-1", "pm_card_visa")
    with pytest.raises(GatewayUnavailable, match="at least"):
        await harness.gateway.charge(charge_request(saved, "rc-small", amount=490_000))
    assert harness.charges() == 0
    result = await harness.gateway.charge(charge_request(saved, "rc-min", amount=500_000))
    assert (result.status, result.captured) == ("succeeded", 500_000)


async def test_unknown_token_is_refused(harness: Harness) -> None:
    with pytest.raises(GatewayUnavailable, match="No such PaymentMethod: 'pm_card_bogus'"):
        await harness.gateway.save_method("acct-1", "pm_card_bogus")


async def test_deleted_method_cannot_be_charged_and_can_be_saved_again(
    harness: Harness,
) -> None:
    gw = harness.gateway
    saved = await gw.save_method("acct-1", "pm_card_visa")
    await gw.delete_method(saved)
    with pytest.raises(GatewayUnavailable):
        await gw.charge(charge_request(saved, "rc-after-delete"))
    assert harness.charges() == 0

    again = await gw.save_method("acct-1", "pm_card_visa")
    assert again.method_ref != saved.method_ref
    result = await gw.charge(charge_request(again, "rc-after-resave"))
    assert result.status == "succeeded"
    assert harness.charges() == 1


# -- Stripe only: what goes over the wire, and each fault ------------------------------------


async def test_charge_request_on_the_wire(fake: StripeFake, stripe_gw: StripeGateway) -> None:
    saved = await stripe_gw.save_method("acct-1", "pm_card_visa")
    result = await stripe_gw.charge(charge_request(saved, "rc-wire", amount=12_500_000))

    [sent] = fake.requests_to("POST", PI_PATH)
    assert sent.headers["idempotency-key"] == "rc-wire"
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["content-type"] == "application/x-www-form-urlencoded"
    p = sent.params
    assert p["amount"] == "1250"
    assert p["currency"] == "usd"
    assert p["off_session"] == "true"
    assert p["confirm"] == "true"
    assert p["customer"] == saved.customer_ref
    assert p["payment_method"] == saved.method_ref
    assert p["metadata[account_id]"] == "acct-1"
    assert p["description"] == "Auto-recharge acct-1"
    assert result.gateway_ref == fake.charges[0]["id"]


async def test_save_makes_the_method_the_customers_default(
    fake: StripeFake, stripe_gw: StripeGateway
) -> None:
    saved = await stripe_gw.save_method("acct-42", "pm_card_visa")
    customer = fake.customer(saved.customer_ref)
    assert customer["metadata"] == {"account_id": "acct-42"}
    assert customer["invoice_settings"]["default_payment_method"] == saved.method_ref
    [attach] = fake.requests_to("POST", "/v1/payment_methods/*/attach")
    assert attach.path == "/v1/payment_methods/pm_card_visa/attach"
    assert attach.params == {"customer": saved.customer_ref}


async def test_server_error_is_outcome_unknown_and_retry_charges_once(
    fake: StripeFake, stripe_gw: StripeGateway
) -> None:
    saved = await stripe_gw.save_method("acct-1", "pm_card_visa")
    fake.fail_next(PI_PATH, status=500)

    with pytest.raises(OutcomeUnknown):
        await stripe_gw.charge(charge_request(saved, "rc-500"))
    assert len(fake.requests_to("POST", PI_PATH)) == 1  # no retry inside stripe-python

    result = await stripe_gw.charge(charge_request(saved, "rc-500"))
    assert result.status == "succeeded"
    assert len(fake.payment_intents) == 1
    assert result.gateway_ref == fake.payment_intents[0]["id"]


async def test_network_retries_when_asked_for(fake: StripeFake) -> None:
    gw = StripeGateway(API_KEY, api_base=fake.url, timeout_s=TIMEOUT_S, max_network_retries=1)
    try:
        saved = await gw.save_method("acct-1", "pm_card_visa")
        fake.fail_next(PI_PATH, status=500)
        result = await gw.charge(charge_request(saved, "rc-500-retried"))
    finally:
        await gw.close()
    assert result.status == "succeeded"
    sent = fake.requests_to("POST", PI_PATH)
    assert [r.status for r in sent] == [500, 200]
    assert {r.headers["idempotency-key"] for r in sent} == {"rc-500-retried"}
    assert len(fake.payment_intents) == 1


async def test_stored_server_error_replays_as_outcome_unknown(
    fake: StripeFake, stripe_gw: StripeGateway
) -> None:
    saved = await stripe_gw.save_method("acct-1", "pm_card_visa")
    fake.fail_next(PI_PATH, status=500, stored=True)

    for _ in range(2):
        with pytest.raises(OutcomeUnknown):
            await stripe_gw.charge(charge_request(saved, "rc-500-stored"))
    assert [r.replayed for r in fake.requests_to("POST", PI_PATH)] == [False, True]
    assert fake.payment_intents == []


async def test_timeout_after_success_then_retry_returns_the_same_charge(
    fake: StripeFake,
) -> None:
    gw = StripeGateway(API_KEY, api_base=fake.url, timeout_s=0.5)
    try:
        saved = await gw.save_method("acct-1", "pm_card_visa")
        fake.delay_next(PI_PATH, seconds=3.0)

        started = time.monotonic()
        with pytest.raises(OutcomeUnknown):
            await gw.charge(charge_request(saved, "rc-slow"))
        assert time.monotonic() - started < 1.5  # one attempt, given up at the timeout
        [intent] = fake.payment_intents
        assert intent["status"] == "succeeded"  # Stripe did charge

        result = await gw.charge(charge_request(saved, "rc-slow"))
        assert result.status == "succeeded"
        assert result.gateway_ref == intent["id"]
        assert result.captured == 12_500_000
        assert len(fake.payment_intents) == 1
        assert [r.replayed for r in fake.requests_to("POST", PI_PATH)] == [False, True]
    finally:
        await gw.close()


async def test_rate_limited_is_unavailable(fake: StripeFake, stripe_gw: StripeGateway) -> None:
    saved = await stripe_gw.save_method("acct-1", "pm_card_visa")
    fake.fail_next(PI_PATH, status=429)
    with pytest.raises(GatewayUnavailable):
        await stripe_gw.charge(charge_request(saved, "rc-429"))
    assert fake.payment_intents == []


async def test_bad_api_key_is_unavailable(fake: StripeFake, stripe_gw: StripeGateway) -> None:
    saved = await stripe_gw.save_method("acct-1", "pm_card_visa")
    wrong = StripeGateway("sk_test_wrong", api_base=fake.url, timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(GatewayUnavailable, match="Invalid API Key"):
            await wrong.save_method("acct-1", "pm_card_visa")
        with pytest.raises(GatewayUnavailable, match="Invalid API Key"):
            await wrong.charge(charge_request(saved, "rc-401"))
    finally:
        await wrong.close()
    assert fake.payment_intents == []
    assert {r.status for r in fake.requests if r.headers["authorization"].endswith("wrong")} == {
        401
    }


async def test_connection_refused_is_unavailable(fake: StripeFake) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = StripeGateway(API_KEY, api_base=f"http://127.0.0.1:{port}", timeout_s=TIMEOUT_S)
    saved = SavedMethod("cus_x", "pm_x", "visa", "4242")
    try:
        with pytest.raises(GatewayUnavailable, match="cannot reach Stripe"):
            await gw.charge(charge_request(saved, "rc-refused"))
    finally:
        await gw.close()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        ("requires_action", "declined"),
        ("requires_payment_method", "declined"),
        ("processing", "unknown"),
        ("requires_capture", "unknown"),
    ],
)
async def test_unsettled_payment_intent_status(
    fake: StripeFake, stripe_gw: StripeGateway, status: str, outcome: str
) -> None:
    saved = await stripe_gw.save_method("acct-1", "pm_card_visa")
    fake.force_status(status)
    if outcome == "unknown":
        with pytest.raises(OutcomeUnknown, match=status):
            await stripe_gw.charge(charge_request(saved, "rc-forced"))
        return
    result = await stripe_gw.charge(charge_request(saved, "rc-forced"))
    assert result == ChargeResult(
        "declined", 0, fake.payment_intents[0]["id"], "authentication_required", result.message
    )
    assert result.message


async def test_card_error_carries_stripes_payment_intent_and_message(
    fake: StripeFake, stripe_gw: StripeGateway
) -> None:
    saved = await stripe_gw.save_method("acct-1", "pm_card_chargeDeclinedInsufficientFunds")
    result = await stripe_gw.charge(charge_request(saved, "rc-nsf"))
    [intent] = fake.payment_intents
    assert result == ChargeResult(
        "declined", 0, intent["id"], "insufficient_funds", "Your card has insufficient funds."
    )
    assert [r.status for r in fake.requests_to("POST", PI_PATH)] == [402]


# -- refunds: both gateways, then Stripe's wire and faults -----------------------------------

REFUNDS_PATH = "/v1/refunds"


def refund_request(charge_ref: str, key: str, amount: int) -> RefundRequest:
    return RefundRequest(
        account_id="acct-1",
        charge_ref=charge_ref,
        amount=amount,
        currency="USD",
        idempotency_key=key,
        reason="disputed call",
    )


async def test_refunds_never_give_back_more_than_the_charge_captured(harness: Harness) -> None:
    gw = harness.gateway
    saved = await gw.save_method("acct-1", "pm_card_visa")
    charge = await gw.charge(charge_request(saved, "rc-r1", amount=20_000_000))

    first = await gw.refund(refund_request(charge.gateway_ref, "rf-1", 5_000_000))
    assert (first.status, first.refunded) == ("succeeded", 5_000_000)
    assert first.gateway_ref.startswith("re_")
    # the same key again is the same refund, not a second one
    assert await gw.refund(refund_request(charge.gateway_ref, "rf-1", 5_000_000)) == first
    with pytest.raises(GatewayUnavailable, match="greater than unrefunded amount"):
        await gw.refund(refund_request(charge.gateway_ref, "rf-2", 15_010_000))
    rest = await gw.refund(refund_request(charge.gateway_ref, "rf-3", 15_000_000))
    assert (rest.status, rest.refunded) == ("succeeded", 15_000_000)
    assert rest.gateway_ref != first.gateway_ref
    with pytest.raises(GatewayUnavailable):
        await gw.refund(refund_request(charge.gateway_ref, "rf-4", 10_000))


async def test_refund_key_reused_for_another_amount_is_outcome_unknown(harness: Harness) -> None:
    gw = harness.gateway
    saved = await gw.save_method("acct-1", "pm_card_visa")
    charge = await gw.charge(charge_request(saved, "rc-r2", amount=20_000_000))
    await gw.refund(refund_request(charge.gateway_ref, "rf-9", 5_000_000))
    with pytest.raises(OutcomeUnknown):
        await gw.refund(refund_request(charge.gateway_ref, "rf-9", 6_000_000))


@pytest.mark.parametrize("amount", [12_345_678, 0, -10_000])
async def test_refund_not_in_whole_cents_is_refused_before_any_request(
    harness: Harness, amount: int
) -> None:
    with pytest.raises(ValueError, match="whole number of cents"):
        await harness.gateway.refund(refund_request("pi_x", "rf-odd", amount))


async def test_refund_on_the_wire(fake: StripeFake, stripe_gw: StripeGateway) -> None:
    saved = await stripe_gw.save_method("acct-1", "pm_card_visa")
    charge = await stripe_gw.charge(charge_request(saved, "rc-rw", amount=12_500_000))
    key = refund_key("acct-1", "r1")
    result = await stripe_gw.refund(refund_request(charge.gateway_ref, key, 2_500_000))

    [sent] = fake.requests_to("POST", REFUNDS_PATH)
    assert sent.headers["idempotency-key"] == "acct-1/refund/r1"
    p = sent.params
    assert (p["payment_intent"], p["amount"]) == (charge.gateway_ref, "250")
    assert p["metadata[account_id]"] == "acct-1"
    assert p["metadata[idempotency_key]"] == key
    assert p["metadata[reason]"] == "disputed call"
    [refund] = fake.refunds
    assert (refund["id"], refund["status"]) == (result.gateway_ref, "succeeded")
    assert refund["amount"] == 250


async def test_refund_timeout_after_success_then_retry_is_the_same_refund(
    fake: StripeFake,
) -> None:
    gw = StripeGateway(API_KEY, api_base=fake.url, timeout_s=0.5)
    try:
        saved = await gw.save_method("acct-1", "pm_card_visa")
        charge = await gw.charge(charge_request(saved, "rc-rt", amount=12_500_000))
        fake.delay_next(REFUNDS_PATH, seconds=3.0)
        with pytest.raises(OutcomeUnknown):
            await gw.refund(refund_request(charge.gateway_ref, "rf-slow", 12_500_000))
        [refund] = fake.refunds
        assert refund["status"] == "succeeded"  # Stripe did refund
        again = await gw.refund(refund_request(charge.gateway_ref, "rf-slow", 12_500_000))
        assert (again.status, again.gateway_ref) == ("succeeded", refund["id"])
        assert len(fake.refunds) == 1
        assert [r.replayed for r in fake.requests_to("POST", REFUNDS_PATH)] == [False, True]
    finally:
        await gw.close()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        ("pending", "succeeded"),
        ("failed", "failed"),
        ("canceled", "failed"),
        ("requires_action", "unknown"),
    ],
)
async def test_refund_status_mapping(
    fake: StripeFake, stripe_gw: StripeGateway, status: str, outcome: str
) -> None:
    saved = await stripe_gw.save_method("acct-1", "pm_card_visa")
    charge = await stripe_gw.charge(charge_request(saved, "rc-rs", amount=12_500_000))
    fake.force_refund_status(status)
    if outcome == "unknown":
        with pytest.raises(OutcomeUnknown, match=status):
            await stripe_gw.refund(refund_request(charge.gateway_ref, "rf-s", 1_000_000))
        return
    result = await stripe_gw.refund(refund_request(charge.gateway_ref, "rf-s", 1_000_000))
    assert (result.status, result.gateway_status) == (outcome, status)
    assert result.refunded == (1_000_000 if outcome == "succeeded" else 0)


async def test_refund_of_an_unknown_or_declined_charge_is_refused(
    fake: StripeFake, stripe_gw: StripeGateway
) -> None:
    with pytest.raises(GatewayUnavailable, match="No such payment_intent"):
        await stripe_gw.refund(refund_request("pi_nobody", "rf-n", 1_000_000))
    saved = await stripe_gw.save_method("acct-1", "pm_card_chargeDeclined")
    declined = await stripe_gw.charge(charge_request(saved, "rc-rd"))
    with pytest.raises(GatewayUnavailable, match="does not have a successful charge"):
        await stripe_gw.refund(refund_request(declined.gateway_ref, "rf-d", 1_000_000))
    assert fake.refunds == []


@pytest.mark.parametrize(
    ("month", "year", "kept"),
    [
        (12, 2034, (12, 2034)),
        (1, 2000, (1, 2000)),
        (0, 2034, (0, 0)),
        (13, 2034, (0, 0)),
        (12, 34, (0, 0)),  # two digits: not a year Stripe sends
        (12, 99999, (0, 0)),
        ("12", 2034, (0, 0)),
        (True, 2034, (0, 0)),
        (None, None, (0, 0)),
    ],
)
def test_a_gateways_card_expiry_is_kept_only_when_it_is_a_month_and_a_year(
    month: object, year: object, kept: tuple[int, int]
) -> None:
    assert expiry_of(month, year) == kept
    assert SavedMethod("cus", "pm", "visa", "4242", *kept).expires() == (
        None if kept == (0, 0) else (kept[1], kept[0])
    )
