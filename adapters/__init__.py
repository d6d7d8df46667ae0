"""Adapters: the clients and process plumbing every radstream process shares.

``schemas`` says what the data is; ``adapters`` talks to the things that hold or move
it: the claim-check blob stores (local, S3), the warehouse client, Kafka topic admin
and exact end offsets, structured logging and metrics, and process start-up. They
import ``schemas`` and third-party clients, never ``gateways``, ``streams`` or the CLI.
"""
