"""What every HTTP room shares: the one error shape (``errors``), API keys and the caller's
authentication (``api_keys``, ``callers``), request bodies (``bodies``) and the bound on a
request's PostgreSQL work (``bounds``). Here, below the rooms, because ``enforcement`` and
``recharge`` both serve routes of the one API and may not import each other."""
