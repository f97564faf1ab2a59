"""Test-wide setup: offline, quiet, no telemetry, and helpers to run processes."""

from __future__ import annotations

import os

# Before anything imports Flower or Hugging Face libraries.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


import pytest  # noqa: E402 - after the environment above


@pytest.fixture
def fixed_run_id(monkeypatch):
    """Give every in-process run the same run id, as two runs compared byte for byte need.

    Flower draws a random 63-bit run id per run, and every message carries it as a
    varint: about one run in 128 draws an id a byte shorter, so two otherwise equal
    runs would differ in `bytes_sent`/`bytes_received` by one byte a message.
    """
    from fedscale.simulations import engine

    monkeypatch.setattr(engine, "new_run_id", lambda: 0x5EED_0000_0000_0001)
