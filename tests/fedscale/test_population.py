"""The lazy population: memory that does not grow with the federation, seeded sampling."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedscale.datasets import load_dataset
from fedscale.devices import (
    Availability,
    DeviceProfile,
    FixedDevices,
    builtin_mix,
    load_trace,
)
from fedscale.exceptions import ConfigError, DataError, PartitionError
from fedscale.partition import partition_indices
from fedscale.population import LazyPermutation, PartitionedData, Population, data_provider
from fedscale.synthetic import Synthetic

MIB = 1024 * 1024


def test_a_million_clients_are_created_and_sampled_in_a_few_mebibytes():
    tracemalloc.start()
    try:
        population = Population(
            1_000_000, Synthetic(1.0, 1.0, seed=0), builtin_mix("mobile", seed=0), seed=0
        )
        plain = population.sample(0, 1_000)
        online = population.sample(1, 1_000, available_at=7 * 3600.0)
        tasks = population.tasks(online, 1)
        data = population.client_data(int(online[0]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(plain) == len(online) == len(tasks) == 1_000
    assert data.num_train > 0
    # The bound the issue sets is 1 GiB; per-client storage would already cost
    # more than 32 MiB (32 bytes a client).
    assert peak < 32 * MIB, f"peak traced memory {peak / MIB:.1f} MiB"


def test_a_million_client_partition_of_an_in_memory_dataset_stores_indices_once():
    dataset = load_dataset("digits", seed=0, test_fraction=0.2)
    tracemalloc.start()
    try:
        data = PartitionedData(dataset, 1_000_000, "iid", seed=0, allow_duplicates=True)
        population = Population(1_000_000, data, builtin_mix("uniform"), seed=0)
        ids = population.sample(0, 100)
        for cid in ids:
            population.client_data(int(cid))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * MIB, f"peak traced memory {peak / MIB:.1f} MiB"


@pytest.mark.parametrize(("clients", "scheme"), [(7, "iid"), (20, "dirichlet:0.5"), (5000, "iid")])
def test_partitioned_clients_get_what_partition_indices_gives_them(clients, scheme):
    dataset = load_dataset("digits", seed=0, test_fraction=0.2)
    data = PartitionedData(dataset, clients, scheme, seed=3, allow_duplicates=True)
    train = partition_indices(dataset.y_train, clients, scheme, 3, allow_duplicates=True)
    test = partition_indices(dataset.y_test, clients, "iid", 3, allow_duplicates=True)
    for cid in (0, 1, clients // 2, clients - 1):
        got = data.client_data(cid)
        assert np.array_equal(got.x_train, dataset.x_train[train[cid]])
        assert np.array_equal(got.y_train, dataset.y_train[train[cid]])
        assert np.array_equal(got.y_test, dataset.y_test[test[cid]])
        assert data.num_train_samples(cid) == len(train[cid])
        assert not got.x_train.flags.writeable


def test_partition_errors_surface():
    dataset = load_dataset("digits", seed=0, test_fraction=0.2)
    with pytest.raises(PartitionError, match=r"allow-duplicate-samples"):
        PartitionedData(dataset, 5000, "iid")
    data = PartitionedData(dataset, 10, "iid")
    with pytest.raises(DataError, match=r"client id: expected an integer in 0..9, got 10"):
        data.client_data(10)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), key=st.integers(0, 2**63))
def test_lazy_permutation_is_a_permutation(n, key):
    values = LazyPermutation(n, key)[np.arange(n)]
    assert np.array_equal(np.sort(values), np.arange(n))


def test_lazy_permutation_looks_random():
    perm = LazyPermutation(1_000_000, 9)[np.arange(10_000)]
    assert np.abs(np.mean(perm) / 1_000_000 - 0.5) < 0.01
    assert abs(np.corrcoef(perm[:-1], perm[1:])[0, 1]) < 0.05
    # positions map one to one, so any slice can be evaluated on its own
    assert np.array_equal(LazyPermutation(1_000_000, 9)[np.arange(5_000, 5_010)], perm[5_000:5_010])


def test_sampling_is_seeded_distinct_and_uniform():
    population = Population(1_000, Synthetic(1.0, 1.0), builtin_mix("uniform"), seed=4)
    a = population.sample(3, 50)
    assert np.array_equal(a, population.sample(3, 50))
    assert not np.array_equal(a, population.sample(4, 50))
    other = Population(1_000, Synthetic(1.0, 1.0), builtin_mix("uniform"), seed=5)
    assert not np.array_equal(a, other.sample(3, 50))
    assert len(set(a.tolist())) == 50 and a.min() >= 0 and a.max() < 1_000
    assert len(population.sample(0, 5_000)) == 1_000  # at most the whole federation
    # every client is drawn about equally often over many rounds
    small = Population(20, Synthetic(1.0, 1.0), builtin_mix("uniform"), seed=0)
    counts = np.bincount(np.concatenate([small.sample(r, 5) for r in range(1_000)]), minlength=20)
    assert np.all(np.abs(counts / 250 - 1) < 0.2)  # expected 1000 * 5 / 20 = 250 each (sd 14)


def test_available_sampling_returns_only_online_clients():
    population = Population(100_000, Synthetic(1.0, 1.0), builtin_mix("mobile", seed=2), seed=2)
    t = 13 * 3600.0
    ids = population.sample(0, 500, available_at=t)
    assert len(ids) == 500 and len(set(ids.tolist())) == 500
    # checked through each client's own profile, not the vectorised path
    assert all(population.profile(int(c)).availability.is_online(t) for c in ids)
    assert np.array_equal(ids, population.sample(0, 500, available_at=t))


def test_available_sampling_ends_with_fewer_when_few_are_online(tmp_path):
    trace = tmp_path / "devices.csv"
    rows = ["client_id,compute_speed,download_kbps,upload_kbps,availability,period_s"]
    for cid in range(300):
        window = "0-100" if cid in (3, 7, 250) else "500-600"
        rows.append(f"{cid},10,100,100,{window},1000")
    trace.write_text("\n".join(rows) + "\n")
    population = Population(300, Synthetic(1.0, 1.0), load_trace(trace), seed=0)
    assert sorted(population.sample(0, 10, available_at=50.0).tolist()) == [3, 7, 250]
    assert len(population.sample(0, 10, available_at=550.0)) == 10
    tasks = population.tasks(np.array([3, 7]), 0)
    assert [t.profile.availability.windows for t in tasks] == [((0.0, 100.0),)] * 2
    offline = DeviceProfile(1.0, 1.0, 1.0, Availability(((0.0, 1.0),), 10.0))
    nobody = Population(1_000, Synthetic(1.0, 1.0), FixedDevices(offline), seed=0)
    assert len(nobody.sample(0, 10, available_at=5.0)) == 0


def test_tasks_carry_samples_profiles_and_seeded_churn():
    population = Population(1_000, Synthetic(1.0, 1.0), builtin_mix("mobile", seed=1), seed=1)
    ids = population.sample(2, 20)
    tasks = population.tasks(ids, 2)
    assert [t.client_id for t in tasks] == ids.tolist()
    assert all(t.num_samples == population.num_train_samples(t.client_id) for t in tasks)
    assert all(t.profile == population.profile(t.client_id) for t in tasks)
    assert all(0 < t.interrupt_after_s < float("inf") for t in tasks)
    assert [t.interrupt_after_s for t in population.tasks(ids, 2)] == [
        t.interrupt_after_s for t in tasks
    ]
    assert [t.interrupt_after_s for t in population.tasks(ids, 3)] != [
        t.interrupt_after_s for t in tasks
    ]
    calm = Population(1_000, Synthetic(1.0, 1.0), builtin_mix("mobile-always-on"), seed=1)
    assert all(t.interrupt_after_s == float("inf") for t in calm.tasks(ids, 2))


def test_population_limits_and_errors():
    dataset = load_dataset("digits", seed=0, test_fraction=0.2)
    with pytest.raises(ConfigError, match=r"at most 10 for this dataset.*got 11"):
        Population(11, PartitionedData(dataset, 10, "iid"), builtin_mix("uniform"))
    population = Population(10, Synthetic(1.0, 1.0), builtin_mix("uniform"))
    with pytest.raises(DataError, match=r"expected an integer in 0..9, got 10"):
        population.client_data(10)
    with pytest.raises(ConfigError, match=r"clients: expected an integer >= 1, got 0"):
        Population(0, Synthetic(1.0, 1.0), builtin_mix("uniform"))
    with pytest.raises(ConfigError, match=r"clients per round: expected an integer >= 0"):
        population.sample(0, -1)


def test_data_provider_partitions_pooled_datasets():
    provider = data_provider("digits", num_clients=30, seed=0, partition="shards:2")
    assert isinstance(provider, PartitionedData)
    assert provider.num_classes == 10 and provider.sample_shape == (1, 8, 8)
    labels = {int(v) for v in provider.client_data(0).y_train}
    assert len(labels) == 2
    x, y = provider.test_set(30)
    assert len(x) == len(y) == len(load_dataset("digits", seed=0, test_fraction=0.2).y_test)
