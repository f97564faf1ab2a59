"""docs/quickstart.md, run as written: every ```bash block in order, in a temporary folder.

The install block is marked skip (this environment is the install). The serving
ports 8080 and 8081 are swapped for free ones, since the machine running the tests
may have them taken; nothing else in the commands changes.
"""

import json
from contextlib import ExitStack

import pytest

from fedscale.processes import free_port, wait_for_port
from fedscale.runs import RunDirectory

from .doc_commands import ROOT, Doc, bash_blocks

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUICKSTART = ROOT / "docs" / "quickstart.md"


def test_the_quickstart_runs_as_written(tmp_path):
    http, grpc = free_port(), free_port()
    doc = Doc(QUICKSTART, tmp_path, substitute={"8080": str(http), "8081": str(grpc)})
    blocks = bash_blocks(QUICKSTART)
    assert [b.marker for b in blocks].count("skip") == 1 and blocks[0].marker == "skip"
    assert [b.marker for b in blocks].count("background") == 1

    with ExitStack() as stack:
        for block in blocks:
            if block.marker == "skip":
                continue
            if block.marker == "background":
                [(server, log)] = stack.enter_context(doc.background(block))
                wait_for_port(
                    "127.0.0.1",
                    http,
                    timeout=60,
                    process=server,
                    what="fedscale serve",
                    log_file=log,
                )
                continue
            doc.run_block(block)
        health, metadata, answer = doc.outputs[-2].splitlines() + doc.outputs[-1].splitlines()
    simulate, json_demo, listing, report, export, _ = doc.outputs[:6]

    # 2. The default federation: 100 rounds of digits, the accuracy the doc states.
    run = RunDirectory(tmp_path / "runs" / "quickstart")
    rows = run.read_metrics()
    assert [r["round"] for r in rows] == list(range(101))
    assert rows[-1]["accuracy"] >= 0.88, "the doc says about 0.92"
    assert simulate.strip().splitlines()[-1] == f"final test accuracy: {rows[-1]['accuracy']:.4f}"
    summary = json.loads(json_demo)
    assert summary["event"] == "summary" and summary["rounds"] == 5

    # 3-5. The listing shows what the doc describes; report and export wrote their files.
    for name in ("config.toml", "metrics.jsonl", "checkpoints", "models", "manifest.json"):
        assert name in listing
    assert (run.path / "report" / "index.html").is_file() and "index.html" in report
    assert (run.path / "exported" / "model-0050.onnx").is_file()
    assert (run.path / "exported" / "model-0100-int8.onnx").is_file() and "int8" in export

    # 6. The served model answers: ready, its metadata, and digit 0 classified as 0.
    assert health == "200"
    described = json.loads(metadata)
    assert described["versions"] == ["100"]
    assert described["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    logits = json.loads(answer)["outputs"][0]["data"]
    assert len(logits) == 10 and logits.index(max(logits)) == 0
