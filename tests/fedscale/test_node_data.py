"""Which data a node gets: partitions of a pooled dataset, or natural clients built on demand."""

import numpy as np
import pytest

from fedscale.exceptions import ConfigError
from fedscale.node_data import has_natural_clients, natural_provider, node_data
from fedscale.settings import RunSettings
from fedscale.shakespeare import Shakespeare
from fedscale.synthetic import Synthetic


def _node(settings, pid, count):
    return node_data(settings, {"partition-id": pid, "num-partitions": count})


def test_synthetic_clients_get_their_own_generated_data():
    settings = RunSettings(dataset="synthetic:1,1", seed=4)
    got = _node(settings, 123_456, 1_000_000)
    expected = Synthetic(1.0, 1.0, seed=4).client_data(123_456)
    for ours, theirs in (
        (got.x_train, expected.x_train),
        (got.y_train, expected.y_train),
        (got.x_eval, expected.x_test),
        (got.y_eval, expected.y_test),
    ):
        np.testing.assert_array_equal(ours, theirs)
    assert got.source == "synthetic:1,1 client 123456"
    # The latest clients are cached: asking again builds nothing.
    assert _node(settings, 123_456, 1_000_000) is got
    # Another seed is another federation.
    other = _node(settings.replace(seed=5), 123_456, 1_000_000)
    assert not np.array_equal(other.x_train[:1], got.x_train[:1])


def test_shakespeare_clients_are_roles_and_bounded_by_their_number():
    settings = RunSettings(dataset="shakespeare")
    corpus = Shakespeare.load()
    got = _node(settings, 7, corpus.num_clients)
    np.testing.assert_array_equal(got.y_train, corpus.client_data(7).y_train)
    assert got.x_train.shape[1:] == (80,) and got.x_train.dtype == np.uint8
    with pytest.raises(ConfigError, match=r"clients: expected at most 1165 .*got 1166"):
        _node(settings, 0, corpus.num_clients + 1)


def test_pooled_datasets_are_partitioned_as_before():
    assert not has_natural_clients("digits") and has_natural_clients("synthetic:0,0")
    settings = RunSettings(dataset="digits")
    parts = [_node(settings, i, 4) for i in range(4)]
    assert sum(len(p.y_train) for p in parts) == 1438  # digits: 1,797 less a 20% test split
    with pytest.raises(ConfigError, match=r"expected one with natural clients"):
        natural_provider(settings)
