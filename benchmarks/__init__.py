"""wsbroker benchmark harness: wsbroker versus a plain-websockets "floor" server.

Run it with ``python -m benchmarks`` (see ``benchmarks/README.md``). Every process
it starts (redis-server, the server under test, the load generator, the publisher)
talks only over 127.0.0.1 and stops on its own or when the harness exits.
"""
