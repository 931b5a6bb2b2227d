"""Rating: price lists, plans and minute buckets, and what a call or a message costs."""
