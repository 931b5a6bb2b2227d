"""A local stand-in for the part of Stripe's v1 API the adapter uses, for tests.

It runs an ``http.server`` in a background thread, so the test's event loop can await the real
stripe client against it. It reads form-encoded bodies exactly as stripe-python sends them
(``metadata[account_id]=...``, ``off_session=true``), answers in Stripe's JSON shapes, checks
the bearer key, and implements Stripe's idempotency rules (same key + same request: the stored
response replayed with ``Idempotent-Replayed: true``; same key + other parameters: 400
``idempotency_error``).

Its test cards are its own table, not the sandbox's, so the two gateways are checked against
independent models of Stripe.

Fault knobs: ``fail_next`` (5xx/429 answered in front of the API, nothing stored, unless
``stored=True`` which mimics Stripe replaying a 500 from inside the endpoint); ``delay_next``
(process and store, then hold the response past the client's timeout); ``force_status`` (the
next PaymentIntent ends in the given status with HTTP 200); ``force_refund_status`` (the same
for the next Refund).

``server``: the HTTP side (the key, idempotency, the knobs, the record of requests);
``resources``: the objects and the endpoints' rules (customers, methods, PaymentIntents, Refunds).
"""

from tests.stripe_fake.resources import TEST_METHODS
from tests.stripe_fake.server import API_KEY, RecordedRequest, StripeFake

__all__ = ["API_KEY", "TEST_METHODS", "RecordedRequest", "StripeFake"]
