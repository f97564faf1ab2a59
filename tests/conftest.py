"""Test-wide setup: offline, quiet, no telemetry, and helpers to run processes."""

from __future__ import annotations

import os

# Before anything imports Flower or Hugging Face libraries.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
