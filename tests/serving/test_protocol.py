"""Request parsing and response building of the v2 REST protocol, without a server."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedscale.modelstore import Manifest, sha256_hex
from fedscale.serving import LoadedModel, RequestError, SessionSettings
from fedscale.serving.protocol import json_response, parse_json_request, run_inference

from .helpers import ort_outputs, two_input_model

pytest.importorskip("onnx")  # builds the two-input test model


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    data, inputs, outputs = two_input_model()
    manifest = Manifest(
        round=9,
        file="model-0009.onnx",
        sha256=sha256_hex(data),
        size=len(data),
        opset=17,
        inputs=inputs,
        outputs=outputs,
    )
    return LoadedModel.build(manifest, data, SessionSettings())


def _request(image, mask, **extra) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": list(image.shape), "datatype": "FP32",
                 "data": image.tolist()},
                {"name": "mask", "shape": list(mask.shape), "datatype": "INT64",
                 "data": mask.ravel().tolist()},
            ],
            **extra,
        }
    ).encode()  # fmt: skip


batches = st.integers(1, 6)
floats32 = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_subnormal=False)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), batch=batches, binary=st.booleans(), binary_out=st.booleans())
def test_any_valid_request_round_trips_to_onnxruntimes_answer(
    model, data, batch, binary, binary_out
):
    image = data.draw(hnp.arrays(np.float32, (batch, 4), elements=floats32))
    mask = data.draw(hnp.arrays(np.int64, (batch, 4), elements=st.integers(-(2**40), 2**40)))
    if binary:
        header = orjson.dumps(
            {
                "id": "p",
                "inputs": [
                    {"name": "mask", "shape": [batch, 4], "datatype": "INT64",
                     "parameters": {"binary_data_size": mask.nbytes}},
                    {"name": "image", "shape": [batch, 4], "datatype": "FP32",
                     "parameters": {"binary_data_size": image.nbytes}},
                ],
                "parameters": {"binary_data_output": binary_out},
            }
        )  # fmt: skip
        body = header + mask.astype("<i8").tobytes() + image.astype("<f4").tobytes()
        request = parse_json_request(model, body, len(header), max_batch=8)
    else:
        body = _request(image, mask, id="p", parameters={"binary_data_output": binary_out})
        request = parse_json_request(model, body, None, max_batch=8)
    np.testing.assert_array_equal(request.feeds["image"], image)
    np.testing.assert_array_equal(request.feeds["mask"], mask)
    assert request.outputs == ["score"] and request.binary == [binary_out]
    expected = ort_outputs(two_input_model()[0], {"image": image, "mask": mask})[0]
    content, json_length = json_response(model, request, run_inference(model, request))
    if binary_out:
        assert json_length is not None
        answer = json.loads(content[:json_length])
        (output,) = answer["outputs"]
        assert output["parameters"] == {"binary_data_size": expected.nbytes}
        got = np.frombuffer(content[json_length:], dtype="<f4").reshape(output["shape"])
    else:
        assert json_length is None
        answer = json.loads(content)
        (output,) = answer["outputs"]
        got = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    assert answer["model_name"] == "fedscale" and answer["model_version"] == "9"
    assert answer["id"] == "p" and output["datatype"] == "FP32"
    np.testing.assert_array_equal(got, expected)


def test_requested_outputs_override_the_request_wide_binary_flag(model):
    image, mask = np.ones((1, 4), np.float32), np.ones((1, 4), np.int64)
    body = _request(
        image,
        mask,
        outputs=[{"name": "score", "parameters": {"binary_data": False}}],
        parameters={"binary_data_output": True},
    )
    assert parse_json_request(model, body, None, 8).binary == [False]
    body = _request(image, mask, outputs=[{"name": "score"}])
    assert parse_json_request(model, body, None, 8).binary == [False]


def test_integers_are_accepted_for_float_inputs_and_nested_data(model):
    body = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [2, 4], "datatype": "FP32",
                 "data": [[1, 2, 3, 4], [5, 6, 7, 8]]},
                {"name": "mask", "shape": [2, 4], "datatype": "INT64", "data": [1] * 8},
            ]
        }
    ).encode()  # fmt: skip
    request = parse_json_request(model, body, None, 0)  # 0: no batch limit
    assert request.feeds["image"].dtype == np.float32
    assert request.feeds["image"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_batch_limit_applies_to_the_dynamic_axis_only(model):
    image, mask = np.zeros((3, 4), np.float32), np.zeros((3, 4), np.int64)
    with pytest.raises(RequestError, match="expected at most 2") as raised:
        parse_json_request(model, _request(image, mask), None, 2)
    assert raised.value.status == 400
    assert parse_json_request(model, _request(image, mask), None, 3).feeds["image"].shape == (3, 4)
