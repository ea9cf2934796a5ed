"""The Faust worker, the replay runner, the CLI and the demo: where detection meets Kafka and files."""
