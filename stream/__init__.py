"""The Faust worker, the replay runner, the config and the CLI: where detection meets Kafka and files."""
