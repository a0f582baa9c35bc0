"""SMTP side: the local submission front, the upstream relay and the durable outbox."""
