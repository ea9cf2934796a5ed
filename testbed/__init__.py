"""For trying and testing writeguard on one machine; not part of the product (neither wheel nor image ships it).

The local services the demos, the integration tests and the benchmarks run, each a real one: a Kafka broker
(:mod:`testbed.broker`), Kafka Connect with Debezium (:mod:`testbed.connect`), PostgreSQL
(:mod:`testbed.postgres`), all of them together with a worker (:mod:`testbed.stack`); a simulated fleet of
agents (:mod:`testbed.fleet`); the demos (:mod:`testbed.demo`, :mod:`testbed.demo_postgres`); and the worker
in a child process (:mod:`testbed.process`). Its command line is ``python -m testbed``.
"""
