"""Measuring a deployment: raw WebSocket subscribers, a paced publisher, the figures.

``wsbroker bench`` (for users, against any URL) and the ``benchmarks/``
harness (for us, against peers on one machine) share this code, so a figure
means the same thing wherever it was taken.
"""
