"""Call control: authorization, estimates and the HTTP API."""
