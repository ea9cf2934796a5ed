"""Adapters between writeguard and the outside world: Kafka, Debezium, the messages writeguard publishes."""
