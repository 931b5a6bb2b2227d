"""The web portal for people: tenant admins and users, managers and operators sign in with
email and password and see their billing pages (docs/design/portal.md). Served by the API
process (``meter.apiserver``), over the API's own routes and permission table.

A room of its own, above ``enforcement`` and ``recharge`` (its pages show both rooms' routes:
a balance and a payment history on one page) and below ``meter`` (which serves it). Modules:
``passwords`` (argon2id), ``sessions`` (sign-in, lockout, sessions: the one writer of their
tables), ``web`` (router, cookie, CSRF, templates), ``calls`` (the API's routes called
in-process), ``pages`` (an account's pages), ``console`` (operators, managers), ``routes``
(all of it as one router).
"""
