"""The durable outbox: the store (the only owner of the row format), its one-daemon lock, and the on-site admin."""
