"""The usage stream processor (the hot path) and its worker.

``processor`` ties one batch's steps, each in a module of its own: ``validate`` (the checks and
dead-letter reasons), ``rate`` (hangups and messages into charges), ``numbers`` (number fees),
``calls`` (live-call updates and the reservation sweep), ``apply`` (debits in the balance
store, the ledger write, compensation), ``publish`` (dead letters and signals behind the
``SignalPublisher`` seam); ``batch`` holds the values they pass along. ``worker`` is the
consume -> process -> commit loop, ``isolate`` finds a record no retry gets through, ``decode``
the fast decoding of the charged event types.
"""
