"""Thin typed wrappers over confluent_kafka: clients, topics, lag."""
