"""Adapters between writeguard and the outside world.

Debezium (decoding its change events, rendering its connector), the messages writeguard publishes, PostgreSQL
enforcement and the pause webhook.
"""
