"""The adapter's shortcuts give what Flower's own code gives."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedscale.simulations._flower import (
    copy_record_dict,
    decode_message,
    decode_records,
    encode_message,
    encode_records,
    fast_array_codec,
    fast_record_views,
)


def _records():
    return RecordDict(
        {
            "arrays": ArrayRecord([np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2)]),
            "config": ConfigRecord({"lr": 0.1, "names": ["a", "b"], "raw": b"x"}),
            "metrics": MetricRecord({"n": 3, "losses": [0.5, 0.25]}),
        }
    )


def test_copy_equals_the_original_and_is_independent():
    original = _records()
    copy = copy_record_dict(original)
    assert copy == original
    assert all(copy[k].object_id == original[k].object_id for k in original)
    copy["config"]["names"].append("c")
    copy["metrics"]["n"] = 4
    copy["arrays"]["new"] = Array(np.zeros(1))
    copy["arrays"]["0"].shape = (6,)
    del copy["config"]
    assert original == _records()


def test_fast_codec_is_scoped_and_gives_flowers_results():
    reference = ArrayRecord([np.linspace(0, 1, 7).astype(np.float16), np.eye(3)])
    original_numpy = Array.numpy
    with fast_array_codec():
        assert Array.numpy is not original_numpy
        fast = ArrayRecord([np.linspace(0, 1, 7).astype(np.float16), np.eye(3)])
        decoded = [a.numpy() for a in reference.values()]
    assert Array.numpy is original_numpy
    assert fast == reference
    for got, array in zip(decoded, reference.values(), strict=True):
        np.testing.assert_array_equal(got, array.numpy())


def test_fast_record_views_are_scoped_and_behave_as_flowers():
    from flwr.app.message.recorddict import _SyncedDict

    original_views = {
        name: RecordDict.__dict__[name]
        for name in ("array_records", "metric_records", "config_records")
    }
    reference = _records()
    expected = {
        name: (type(view), list(view.items()))
        for name in original_views
        for view in [getattr(reference, name)]
    }
    with fast_record_views():
        assert RecordDict.__dict__["array_records"] is not original_views["array_records"]
        records = _records()
        for name, (kind, items) in expected.items():
            view = getattr(records, name)
            assert type(view) is kind is _SyncedDict
            assert [k for k, _ in view.items()] == [k for k, _ in items]
            assert list(view.values()) == [v for _, v in items]
        # Writes go through to the RecordDict, and are type-checked, as Flower's do.
        records.metric_records["extra"] = MetricRecord({"m": 1.0})
        assert records["extra"] == MetricRecord({"m": 1.0})
        del records.array_records["arrays"]
        assert "arrays" not in records
        with pytest.raises(TypeError, match="Expected `ConfigRecord`"):
            records.config_records["bad"] = MetricRecord({"m": 1.0})
        assert "bad" not in records
    assert {n: RecordDict.__dict__[n] for n in original_views} == original_views


def _message(content=None, error=None):
    from flwr.app import Message, Metadata

    metadata = Metadata(
        run_id=77,
        message_id="m" * 64,
        src_node_id=3,
        dst_node_id=1,
        reply_to_message_id="r" * 64,
        group_id="2",
        created_at=1_700_000_000.5,
        ttl=30.0,
        message_type="train",
    )
    return Message(metadata=metadata, content=content, error=error)


def test_decoding_gives_what_flowers_serde_gives():
    from flwr.app import Error
    from flwr.common.serde import message_from_proto, recorddict_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    records = _records()
    records["empty"] = ArrayRecord()
    records["more"] = ArrayRecord(
        {"bool": Array(np.array([True, False])), "0-d": Array(np.array(2))}
    )
    data = encode_records(records)
    ours, flowers = decode_records(data), recorddict_from_proto(ProtoRecordDict.FromString(data))
    assert ours == flowers == records
    assert list(ours) == list(flowers)
    assert ours.object_id == flowers.object_id
    for key in flowers:
        assert type(ours[key]) is type(flowers[key])
        assert ours[key].object_id == flowers[key].object_id
    # A decoded record is a normal one: checked writes, arrays that decode.
    with pytest.raises(TypeError):
        ours["bad"] = {"not": "a record"}
    np.testing.assert_array_equal(ours["more"]["bool"].numpy(), [True, False])

    for message in (_message(content=records), _message(error=Error(code=3, reason="no"))):
        wire = encode_message(message)
        got, want = decode_message(wire), message_from_proto(ProtoMessage.FromString(wire))
        assert got.metadata == want.metadata
        assert got.has_content() == want.has_content()
        if want.has_content():
            assert got.content == want.content
            assert got.content.object_id == want.content.object_id
        else:
            assert (got.error.code, got.error.reason) == (want.error.code, want.error.reason)
