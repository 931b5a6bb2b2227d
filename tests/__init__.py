"""The test suite, in folders by room; the shared harness modules beside conftest.py."""

import pytest

# The shared harness modules fail with pytest's assertion messages, as test modules do: they
# are registered before any of them is imported (a new one belongs in this list).
pytest.register_assert_rewrite(
    "tests.api",
    "tests.calendar",
    "tests.calls",
    "tests.harness",
    "tests.helpers",
    "tests.infra.embedded_probes",
    "tests.metering.accounts",
    "tests.recharge.world",
)
