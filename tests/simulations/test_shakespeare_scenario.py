"""The Shakespeare scenario beats always predicting the most common character."""

import numpy as np
import pytest

from fedscale.shakespeare import Shakespeare, encode
from fedscale.simulations import load_scenario, simulate

pytestmark = pytest.mark.slow


def test_three_rounds_of_the_scenario_beat_the_unigram_baseline_by_5_points(tmp_path):
    settings = load_scenario("shakespeare", num_rounds=3, export_onnx=False, device="cpu")
    assert settings.model == "char-lstm-small" and settings.num_clients == 1165
    rows = simulate(settings, out=str(tmp_path / "run")).rounds

    corpus = Shakespeare.load()
    best_char, on_all_tests = corpus.unigram_baseline()
    assert best_char == " "
    # The same constant guess on the server's own test set (20 windows a client).
    _, y_test = corpus.test_set(settings.num_clients)
    on_server_test = float(np.mean(y_test == encode(" ")[0]))
    baseline = max(on_all_tests, on_server_test)
    assert 0.15 < baseline < 0.2
    assert rows[-1]["accuracy"] >= baseline + 0.05, [r["accuracy"] for r in rows]
