"""The invariants' own tests, run again on the session's Redis Cluster (tests/cluster/conftest.py
points ``redis_url``, hence every process's client, at it): the hot path's exactly-once tests
(events published twice, a replay after a crash between Redis and the ledger, the hold signal
once, Redis lost and rebuilt, a worker process SIGKILLed mid-stream), a thousand concurrent
authorizations never reserving more than the credit, and the auto-recharge trigger fired once
and charged. Imported, not copied: pytest runs each here on this room's fixtures."""

from __future__ import annotations

import pytest

from tests.api import api
from tests.enforcement.test_authorizations import (
    test_a_thousand_concurrent_authorizations_never_reserve_more_than_the_credit,
)
from tests.metering.test_crash import (
    test_killed_mid_stream_and_restarted_charges_every_event_once,
)
from tests.metering.test_processor import (
    test_duplicate_applied_in_redis_but_missing_in_ledger_gets_its_row,
    test_every_event_published_twice_is_charged_once,
    test_hold_is_published_once_when_an_account_runs_dry,
    test_lost_redis_state_is_rebuilt_from_the_ledger,
)
from tests.recharge.conftest import balances, pool, world
from tests.recharge.test_auto_recharge import (
    test_a_trigger_charges_up_to_threshold_plus_recharge_and_credits_it,
    test_concurrent_events_crossing_the_threshold_fire_one_trigger,
    test_two_workers_on_one_trigger_charge_the_card_once,
)

pytestmark = pytest.mark.redis_cluster

__all__ = [
    "api",
    "balances",
    "pool",
    "test_a_thousand_concurrent_authorizations_never_reserve_more_than_the_credit",
    "test_a_trigger_charges_up_to_threshold_plus_recharge_and_credits_it",
    "test_concurrent_events_crossing_the_threshold_fire_one_trigger",
    "test_duplicate_applied_in_redis_but_missing_in_ledger_gets_its_row",
    "test_every_event_published_twice_is_charged_once",
    "test_hold_is_published_once_when_an_account_runs_dry",
    "test_killed_mid_stream_and_restarted_charges_every_event_once",
    "test_lost_redis_state_is_rebuilt_from_the_ledger",
    "test_two_workers_on_one_trigger_charge_the_card_once",
    "world",
]
