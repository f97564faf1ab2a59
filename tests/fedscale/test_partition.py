import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedscale.exceptions import PartitionError
from fedscale.partition import label_skew, parse_scheme, partition_indices

LABELS = np.random.default_rng(7).integers(0, 10, size=1500)


def _assert_disjoint_cover(parts, n):
    merged = np.concatenate(parts)
    assert len(merged) == n, "every sample is assigned"
    assert len(np.unique(merged)) == n, "no sample is assigned twice"
    assert all(len(p) >= 1 for p in parts), "every client has a sample"


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "dirichlet:0.05", "shards:2"])
@pytest.mark.parametrize("clients", [5, 7, 100, 1500])
def test_partitions_are_disjoint_cover_and_nonempty(scheme, clients):
    parts = partition_indices(LABELS, clients, scheme, seed=3)
    assert len(parts) == clients
    _assert_disjoint_cover(parts, len(LABELS))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "shards:3"])
def test_same_seed_same_partitions_other_seed_differs(scheme):
    a = partition_indices(LABELS, 20, scheme, seed=1)
    b = partition_indices(LABELS, 20, scheme, seed=1)
    c = partition_indices(LABELS, 20, scheme, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skews = [
        np.mean(
            [
                label_skew(LABELS, partition_indices(LABELS, 50, f"dirichlet:{a}", seed=s))
                for s in range(3)
            ]
        )
        for a in (100.0, 1.0, 0.3, 0.05)
    ]
    assert skews == sorted(skews), skews
    assert skews[0] < 0.15 < 0.5 < skews[-1]


def test_iid_is_balanced_and_unskewed():
    parts = partition_indices(LABELS, 10, "iid", seed=0)
    assert {len(p) for p in parts} == {150}
    assert label_skew(LABELS, parts) < 0.1


@pytest.mark.parametrize("k", [1, 2, 5])
def test_shards_give_each_client_k_classes(k):
    parts = partition_indices(LABELS, 40, f"shards:{k}", seed=0)
    assert all(len(np.unique(LABELS[p])) == k for p in parts)


def test_more_clients_than_samples_is_an_error_naming_the_counts():
    with pytest.raises(
        PartitionError,
        match=r"2000 clients.*only 1500 samples.*allow-duplicate-samples",
    ):
        partition_indices(LABELS, 2000, "iid", seed=0)


def test_duplication_opt_in_repeats_partitions_documented_way():
    parts = partition_indices(LABELS, 3100, "iid", seed=0, allow_duplicates=True)
    assert len(parts) == 3100
    assert np.array_equal(parts[5], parts[5 + 1500])
    _assert_disjoint_cover(parts[:1500], 1500)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "iid:3",
        "dirichlet",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:x",
        "shards:0",
        "shards:1.5",
        "shards:\u00b2",
        "random",
    ],
)
def test_bad_scheme_is_a_clear_error(spec):
    with pytest.raises(PartitionError, match=r"expected iid, dirichlet:<alpha>.*got"):
        parse_scheme(spec)


def test_shards_with_too_few_clients_to_cover_classes_is_an_error():
    with pytest.raises(PartitionError, match="covers 4 of 10 classes"):
        partition_indices(LABELS, 2, "shards:2", seed=0)
    with pytest.raises(PartitionError, match="k <= the number of classes"):
        partition_indices(LABELS, 20, "shards:11", seed=0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    classes=st.integers(1, 12),
    clients=st.integers(1, 40),
    alpha=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**31),
)
def test_dirichlet_property_disjoint_cover_nonempty(n, classes, clients, alpha, seed):
    labels = np.random.default_rng(seed).integers(0, classes, size=n)
    if clients > n:
        with pytest.raises(PartitionError):
            partition_indices(labels, clients, f"dirichlet:{alpha}", seed=seed)
        return
    parts = partition_indices(labels, clients, f"dirichlet:{alpha}", seed=seed)
    _assert_disjoint_cover(parts, n)
