"""The signal bridge (``meter run bridge``): consumes ``billing.control-signals`` and enforces
them on the switch (Kamailio, through its JSON-RPC): ``enforce`` what each signal means,
``switch`` the seam before the switch, ``worker`` the consume -> enforce -> commit loop."""
