"""What each ``meter`` subcommand does, grouped by what it acts on.

- ``processes``: ``meter run metering|ops|api|recharge``, the service's long-running processes;
- ``accounts``: ``meter seed``, ``meter keys``, ``meter bundle buy``;
- ``pricing``: ``meter pricelist import|export``, ``meter estimate``;
- ``admin``: ``meter migrate``, ``meter reconcile``, ``meter contracts export-schema``;
- ``benches``: ``meter demo``, ``meter bench``.

Each command returns the process's exit code and prints what the command line promises (the
result on stdout, ``meter: ...`` errors on stderr). The parser is ``meter.parser``; each module
imports what its commands need inside them, so that ``meter --help`` stays fast and a command
loads only its own rooms.
"""
