"""The tutorial baseline that bench/serve.py measures fedscale serve against.

A model server as the usual Flask tutorial writes one: Flask's threaded
development server, the torch model called eagerly in ``/predict``, a JSON list
of 784 floats in, JSON out, torch left at its default thread count. Nothing is
tuned on purpose: this is what the issue's "about 700 requests/s" describes.

The model is fedscale's ``cnn`` (LeNet-like) for 1x28x28 images; its weights come
from a safetensors file (no pickle), written by bench/serve.py so that both
servers run the same weights::

    python bench/serve_baseline.py WEIGHTS.safetensors PORT
    curl -s -X POST -H 'Content-Type: application/json' \
        -d '{"input": [0.0, ...784 floats]}' http://127.0.0.1:PORT/predict
"""

import sys

import torch
from flask import Flask, jsonify, request
from safetensors.torch import load_file

from fedscale.models import build_model

weights, port = sys.argv[1], int(sys.argv[2])

app = Flask(__name__)
model = build_model("cnn", (1, 28, 28), 10)
model.load_state_dict(load_file(weights))
model.eval()


@app.route("/predict", methods=["POST"])
def predict():
    data = request.get_json()
    x = torch.tensor(data["input"], dtype=torch.float32).reshape(1, 1, 28, 28)
    with torch.no_grad():
        logits = model(x)
    return jsonify({"prediction": int(logits.argmax(dim=1)), "logits": logits[0].tolist()})


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=port, threaded=True)
