"""The ``fedscale`` command line: ``simulate``, ``server``, ``edge-client``.

This is the top layer: it may import every package; nothing imports it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from fedscale import __version__
from fedscale.exceptions import FedscaleError
from fedscale.settings import RunSettings

from .metrics import MetricsLinger, MetricsPort, both, round_metrics
from .output import (
    JsonOutput,
    Output,
    Quiet,
    ensure_port_free,
    missing_training_module,
    output_mode,
    print_error,
    print_interrupted,
    print_report,
)
from .progress import install_round_handler

if TYPE_CHECKING:  # the engine loads Flower: only when a command runs it
    from fedscale.simulations.workers import Workers

__all__ = ["app", "run"]

console = Console(stderr=True)
stdout = Console()
app = typer.Typer(
    name="fedscale",
    help="Federated and edge learning on Flower: simulate, serve, train at the edge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
_D = RunSettings()

# Options shared by `simulate` and `server` (the run's settings).
Rounds = Annotated[int, typer.Option("--rounds", help="Federated rounds.")]
PerRound = Annotated[int, typer.Option("--per-round", help="Clients sampled per round.")]
DatasetOpt = Annotated[
    str,
    typer.Option(
        help="digits, mnist5k, synthetic:<alpha>,<beta>, shakespeare, a .npz/.csv path, "
        "or MODULE:ATTR returning arrays."
    ),
]
PartitionOpt = Annotated[str, typer.Option(help="iid, dirichlet:<alpha> or shards:<k>.")]
ModelOpt = Annotated[
    str,
    typer.Option(help="mlp, cnn, char-lstm, char-lstm-small, or MODULE:ATTR (a model factory)."),
]
LocalEpochs = Annotated[int, typer.Option(help="Local epochs per round.")]
BatchSize = Annotated[int, typer.Option(help="Local minibatch size.")]
LearningRate = Annotated[float, typer.Option("--lr", help="Local SGD learning rate.")]
Seed = Annotated[int, typer.Option(help="Seed for data split, partitions, init, sampling.")]
DeviceOpt = Annotated[
    str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps.")
]
OutOpt = Annotated[
    Path | None,
    typer.Option(help="Run folder (default: runs/<dataset>-<model>-<time>)."),
]
FractionEvaluate = Annotated[
    float, typer.Option(help="Fraction of clients that also evaluate each round.")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's own logs.")]
MinReplies = Annotated[
    int,
    typer.Option(
        min=1, help="Usable replies a round needs to update the global model (else it keeps it)."
    ),
]
Resume = Annotated[
    bool,
    typer.Option(
        help="Continue the run in --out from its last completed round; options given "
        "must match its config.toml, except --rounds, which may grow."
    ),
]
StrategyOpt = Annotated[
    str,
    typer.Option(
        help="Flower's fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, qfedavg, "
        "fedmedian, fedtrimmedavg, krum, multikrum or bulyan; or fedscale's asynchronous "
        "fedbuff (docs/fedbuff.md)."
    ),
]
StrategyArgs = Annotated[
    list[str] | None,
    typer.Option(
        "--strategy-arg",
        help="A strategy parameter, key=value (repeatable): --strategy-arg proximal-mu=0.1.",
        show_default=False,
    ),
]
KeepModels = Annotated[
    int, typer.Option(help="ONNX models kept in the run's models/ folder (the newest).")
]
ExportOnnx = Annotated[
    bool,
    typer.Option(help="Export each round's global model to ONNX (models/), checked against torch."),
]
MaxExamples = Annotated[
    int, typer.Option(help="Reject updates claiming more num-examples than this.")
]
MaxUpdateBytes = Annotated[
    int, typer.Option(help="Reject updates larger than this (0: twice the model plus 1 MiB).")
]
# Differential privacy (fedscale.privacy, docs/privacy.md).
DpOpt = Annotated[
    str,
    typer.Option(
        "--dp",
        help="Differential privacy: server-fixed, server-adaptive, client-fixed, "
        "client-adaptive (central, clipped where named) or local; '' for none.",
    ),
]
DpNoise = Annotated[
    float,
    typer.Option(help="With --dp: Gaussian noise's std over the clipping norm's sensitivity."),
]
DpClip = Annotated[
    float,
    typer.Option(help="With --dp: L2 clipping norm of an update (the initial one if adaptive)."),
]
DpDelta = Annotated[
    float,
    typer.Option(help="With --dp: delta epsilon is reported for (0: min(1e-5, clients^-1.1))."),
]
DpQuantile = Annotated[
    float, typer.Option(help="Adaptive --dp: fraction of updates the norm should clip.")
]
DpClipLr = Annotated[float, typer.Option(help="Adaptive --dp: learning rate of the norm.")]
DpCountStd = Annotated[
    float,
    typer.Option(help="Adaptive --dp: noise on the clipped count (0: max(per-round/20, noise))."),
]
# Update compression (fedscale.compression, docs/compression.md).
CompressionOpt = Annotated[
    str,
    typer.Option(
        help="Send client updates compressed: fp16, int8 (per-tensor scale) or topk:<fraction> "
        "(error feedback on the client); '' for none."
    ),
]

# Secure aggregation with Flower's SecAgg+ (fedscale.server.secagg, docs/secagg.md).
SecAggOpt = Annotated[
    bool,
    typer.Option(
        "--secagg/--no-secagg",
        help="Secure aggregation with Flower's SecAgg+: the server sees only the sum of a "
        "round's updates (FedAvg; see docs/secagg.md for what does not combine).",
    ),
]
SecAggShares = Annotated[
    float,
    typer.Option(
        help="With --secagg: shares of each client's secrets, a whole number >= 3 or a "
        "fraction of the round's clients."
    ),
]
SecAggThreshold = Annotated[
    float,
    typer.Option(
        help="With --secagg: shares that recover a secret (a dropped client's masks), a whole "
        "number >= 2 below --secagg-num-shares or a fraction of them."
    ),
]
SecAggClip = Annotated[
    float,
    typer.Option(help="With --secagg: weighted update entries are clipped to [-this, this]."),
]
SecAggQuantization = Annotated[
    int, typer.Option(help="With --secagg: quantization levels over the clipping range.")
]
SecAggMaxWeight = Annotated[
    float, typer.Option(help="With --secagg: the most examples one update is weighted by.")
]


def _version(value: bool) -> None:
    if value:
        stdout.print(f"fedscale {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Fedscale: federated and edge learning on Flower."""


@app.command()
def simulate(
    ctx: typer.Context,
    scenario: Annotated[
        str | None,
        typer.Argument(
            help="A scenario file (simulations/*.toml) or a shipped scenario's name; "
            "options given here win over it.",
            show_default=False,
        ),
    ] = None,
    clients: Annotated[
        int, typer.Option(help="Virtual clients in the federation.")
    ] = _D.num_clients,
    per_round: PerRound = _D.clients_per_round,
    rounds: Rounds = _D.num_rounds,
    dataset: DatasetOpt = _D.dataset,
    partition: PartitionOpt = _D.partition,
    model: ModelOpt = _D.model,
    local_epochs: LocalEpochs = _D.local_epochs,
    batch_size: BatchSize = _D.batch_size,
    lr: LearningRate = _D.lr,
    engine: Annotated[
        str, typer.Option(help="inprocess (fedscale's engine) or ray (Flower's).")
    ] = "inprocess",
    ray_address: Annotated[
        str | None,
        typer.Option(help="With --engine ray: a running Ray cluster's address."),
    ] = None,
    seed: Seed = _D.seed,
    device: DeviceOpt = _D.device,
    fraction_evaluate: FractionEvaluate = _D.fraction_evaluate,
    keep_models: KeepModels = _D.keep_models,
    export_onnx: ExportOnnx = _D.export_onnx,
    max_examples: MaxExamples = _D.max_examples,
    max_update_bytes: MaxUpdateBytes = _D.max_update_bytes,
    min_replies: MinReplies = _D.min_replies,
    device_mix: Annotated[
        str,
        typer.Option(
            help="Simulated devices: uniform, mobile-always-on, mobile (daily availability "
            "and churn), or a .csv/.json trace file; '' for none (no virtual clock)."
        ),
    ] = _D.device_mix,
    deadline: Annotated[
        float, typer.Option(help="With --device-mix: drop clients slower than this (s; 0: none).")
    ] = _D.deadline,
    overcommit: Annotated[
        float,
        typer.Option(help="With --device-mix: offer work to this fraction more clients, keep k."),
    ] = _D.overcommit,
    compute_scale: Annotated[
        float,
        typer.Option(help="With --device-mix: the model's cost per sample relative to the mix's."),
    ] = _D.compute_scale,
    target_accuracy: Annotated[
        float, typer.Option(help="Report the (simulated) time to reach this accuracy (0: none).")
    ] = _D.target_accuracy,
    strategy: StrategyOpt = _D.strategy,
    strategy_args: StrategyArgs = None,
    attack: Annotated[
        str,
        typer.Option(
            help="Make --attack-fraction of the clients Byzantine: sign-flip, scale:<factor> "
            "or noise:<std> (their updates, after training); '' for none."
        ),
    ] = _D.attack,
    attack_fraction: Annotated[
        float, typer.Option(help="With --attack: the fraction of clients that are Byzantine.")
    ] = _D.attack_fraction,
    dp: DpOpt = _D.dp,
    dp_noise_multiplier: DpNoise = _D.dp_noise_multiplier,
    dp_clipping_norm: DpClip = _D.dp_clipping_norm,
    dp_delta: DpDelta = _D.dp_delta,
    dp_target_quantile: DpQuantile = _D.dp_target_quantile,
    dp_clip_lr: DpClipLr = _D.dp_clip_lr,
    dp_clipped_count_stddev: DpCountStd = _D.dp_clipped_count_stddev,
    compression: CompressionOpt = _D.compression,
    secagg: SecAggOpt = _D.secagg,
    secagg_num_shares: SecAggShares = _D.secagg_num_shares,
    secagg_reconstruction_threshold: SecAggThreshold = _D.secagg_reconstruction_threshold,
    secagg_clipping_range: SecAggClip = _D.secagg_clipping_range,
    secagg_quantization_range: SecAggQuantization = _D.secagg_quantization_range,
    secagg_max_weight: SecAggMaxWeight = _D.secagg_max_weight,
    fast_path: Annotated[
        bool,
        typer.Option(
            help="In-process engine: train each round's clients as one cohort when the model "
            "allows it (same results within float rounding); --no-fast-path: one by one."
        ),
    ] = True,
    workers: Annotated[
        str,
        typer.Option(
            help="In-process engine: worker processes for the clients trained one by one "
            "(same results). auto: one per CPU core once a client's call costs 8x its wire form; "
            "N: that many (1: this process alone; 0: one per core).",
        ),
    ] = "auto",
    out: OutOpt = None,
    resume: Resume = False,
    metrics_port: MetricsPort = 0,
    metrics_linger: MetricsLinger = 0.0,
    server_app: Annotated[
        str | None,
        typer.Option(help="Run a third-party ServerApp (MODULE:ATTR) instead."),
    ] = None,
    client_app: Annotated[
        str | None,
        typer.Option(help="Run a third-party ClientApp (MODULE:ATTR) instead."),
    ] = None,
    run_config: Annotated[
        str | None,
        typer.Option(help="Run config for third-party apps: 'key=value key2=value2'."),
    ] = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
    json_output: JsonOutput = False,
) -> None:
    """Simulate a federation on this machine (in-process by default, or on Ray).

    SCENARIO is a scenario file (simulations/*.toml) or a shipped scenario's name:
    quickstart, noniid-1k, cross-device-100k, shakespeare. Options given on the
    command line win over it.
    """
    _setup_logging(verbose)
    with _output(quiet, json_output) as output, _errors():
        if server_app or client_app or run_config:
            if scenario:
                from fedscale.exceptions import ConfigError

                raise ConfigError(
                    "scenario: expected either a scenario or third-party apps "
                    "(--server-app, --client-app), got both"
                )
            _simulate_third_party(server_app, client_app, run_config, clients, engine, ray_address)
            return
        from fedscale.simulations import simulate as run_simulation

        options = locals()
        if resume:
            if scenario:
                from fedscale.exceptions import ConfigError

                raise ConfigError(
                    f"resume: the run folder's config.toml is the scenario, got {scenario!r} too"
                )
            settings = _resume_settings(ctx, out, options)
        elif scenario:
            settings = _scenario_settings(ctx, scenario, options)
        else:
            settings = _settings_from_options(options)
        if out:
            settings = settings.replace(out=str(out.absolute()))
        with round_metrics(console, "127.0.0.1", metrics_port, metrics_linger) as feed:
            with output.progress(console, total=settings.num_rounds) as progress:
                install_round_handler(both(progress.update, feed))
                result = run_simulation(
                    settings,
                    engine=_engine(engine),
                    ray_address=ray_address,
                    fast_path=fast_path,
                    workers=_workers(workers),
                )
            output.summary(
                result.rounds,
                result.run_dir.path,
                target_accuracy=settings.target_accuracy or None,
            )


@app.command()
def server(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port of the SuperLink (SuperNodes connect here).")
    ] = 8000,
    insecure: Annotated[
        bool, typer.Option(help="Allow plaintext on a non-loopback address.")
    ] = False,
    certificates: Annotated[
        Path | None,
        typer.Option(
            help="Serve over TLS with this folder's ca.crt, server.pem and server.key "
            "(fedscale certs DIR).",
        ),
    ] = None,
    auth_keys: Annotated[
        Path | None,
        typer.Option(
            help="Admit only SuperNodes whose public key is here (a .pub file or a folder "
            "of them); needs --certificates.",
        ),
    ] = None,
    min_clients: Annotated[
        int, typer.Option(help="SuperNodes to wait for before round 1.")
    ] = _D.min_clients,
    per_round: PerRound = _D.clients_per_round,
    rounds: Rounds = _D.num_rounds,
    dataset: DatasetOpt = _D.dataset,
    partition: PartitionOpt = _D.partition,
    model: ModelOpt = _D.model,
    local_epochs: LocalEpochs = _D.local_epochs,
    batch_size: BatchSize = _D.batch_size,
    lr: LearningRate = _D.lr,
    seed: Seed = _D.seed,
    device: DeviceOpt = _D.device,
    fraction_evaluate: FractionEvaluate = _D.fraction_evaluate,
    keep_models: KeepModels = _D.keep_models,
    export_onnx: ExportOnnx = _D.export_onnx,
    max_examples: MaxExamples = _D.max_examples,
    max_update_bytes: MaxUpdateBytes = _D.max_update_bytes,
    min_replies: MinReplies = _D.min_replies,
    strategy: StrategyOpt = _D.strategy,
    strategy_args: StrategyArgs = None,
    dp: DpOpt = _D.dp,
    dp_noise_multiplier: DpNoise = _D.dp_noise_multiplier,
    dp_clipping_norm: DpClip = _D.dp_clipping_norm,
    dp_delta: DpDelta = _D.dp_delta,
    dp_target_quantile: DpQuantile = _D.dp_target_quantile,
    dp_clip_lr: DpClipLr = _D.dp_clip_lr,
    dp_clipped_count_stddev: DpCountStd = _D.dp_clipped_count_stddev,
    compression: CompressionOpt = _D.compression,
    secagg: SecAggOpt = _D.secagg,
    secagg_num_shares: SecAggShares = _D.secagg_num_shares,
    secagg_reconstruction_threshold: SecAggThreshold = _D.secagg_reconstruction_threshold,
    secagg_clipping_range: SecAggClip = _D.secagg_clipping_range,
    secagg_quantization_range: SecAggQuantization = _D.secagg_quantization_range,
    secagg_max_weight: SecAggMaxWeight = _D.secagg_max_weight,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for replies (and for SuperNodes).")
    ] = _D.round_timeout,
    out: OutOpt = None,
    resume: Resume = False,
    models_port: Annotated[
        int,
        typer.Option(help="Publish the run's models/ over HTTP on this port (0: off)."),
    ] = 0,
    metrics_port: MetricsPort = 0,
    metrics_linger: MetricsLinger = 0.0,
    verbose: Verbose = False,
    quiet: Quiet = False,
    json_output: JsonOutput = False,
) -> None:
    """Start a Flower SuperLink and run fedscale's ServerApp on it."""
    _setup_logging(verbose)
    with _sigterm_unwinds(), _output(quiet, json_output) as output, _errors():
        from fedscale.server.app import default_run_dir
        from fedscale.server.launcher import ServerOptions, serve_federation

        options = ServerOptions(
            host=host,
            port=port,
            insecure=insecure,
            models_port=models_port,
            certificates=str(certificates) if certificates else None,
            auth_keys=str(auth_keys) if auth_keys else None,
        )
        ensure_port_free(options.connect_host, port, "--port")
        if resume:
            settings = _resume_settings(ctx, out, locals())
        else:
            settings = _settings_from_options(locals())
        run_dir = out.absolute() if out else default_run_dir(settings)
        settings = settings.replace(out=str(run_dir))
        console.print(
            f"SuperLink on {host}:{port}; waiting for {settings.min_clients} SuperNodes "
            f"(fedscale edge-client --server {options.connect_host}:{port}"
            + (f" --root-certificates {options.tls.ca_cert}" if options.tls else "")
            + (" --auth-key NODE.key" if auth_keys else "")
            + " ...)"
        )
        if models_port:
            console.print(f"models published at http://{options.connect_host}:{models_port}/")
        if metrics_port and metrics_port in (port, models_port):
            from fedscale.exceptions import ConfigError

            raise ConfigError(
                f"metrics port: expected a port other than the SuperLink's and the models' "
                f"({port}, {models_port}), got {metrics_port}"
            )
        with round_metrics(console, host, metrics_port, metrics_linger) as feed:
            with output.progress(console, total=settings.num_rounds) as progress:
                result = serve_federation(settings, options, on_round=both(progress.update, feed))
            output.summary(result.read_metrics(), result.path)


@app.command("edge-client")
def edge_client(
    server: Annotated[str, typer.Option(help="The server's SuperLink, HOST:PORT.")],
    partition_id: Annotated[
        int | None, typer.Option(help="Demo federation: this node's partition.")
    ] = None,
    num_partitions: Annotated[
        int | None, typer.Option(help="Demo federation: number of partitions.")
    ] = None,
    data_path: Annotated[
        Path | None,
        typer.Option(help="This device's own data (.npz with x, y, or .csv)."),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="Train on auto, cpu, cuda:N or mps (default: the run's device)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Local port for the SuperNode's Runtime API (default: a free one)."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Allow plaintext to a non-loopback server.")
    ] = False,
    root_certificates: Annotated[
        Path | None,
        typer.Option(help="Connect over TLS, trusting this CA certificate (the server's ca.crt)."),
    ] = None,
    auth_key: Annotated[
        Path | None,
        typer.Option(
            help="This SuperNode's private key, for a server with --auth-keys "
            "(fedscale certs DIR --node NAME); needs --root-certificates.",
        ),
    ] = None,
    max_wait_time: Annotated[
        float | None,
        typer.Option(help="Give up if the server is unreachable this long (s)."),
    ] = None,
    model_dir: Annotated[
        Path | None,
        typer.Option(help="Write each received global model here as ONNX (a model directory)."),
    ] = None,
    serve_port: Annotated[
        int | None,
        typer.Option(help="Also serve --model-dir's newest model: its HTTP (KServe v2) port."),
    ] = None,
    serve_grpc_port: Annotated[
        int, typer.Option(help="With --serve-port: its gRPC port (0: no gRPC).")
    ] = 0,
    serve_host: Annotated[
        str, typer.Option(help="With --serve-port: the address to serve on.")
    ] = "127.0.0.1",
    serve_arg: Annotated[
        list[str] | None,
        typer.Option(
            help="With --serve-port: one more option for the fedscale serve it runs, "
            "e.g. --serve-arg=--api-key-file=/etc/fedscale/key (repeatable)."
        ),
    ] = None,
    warm: Annotated[
        bool,
        typer.Option(
            help="Run each round's ClientApp in a fork of one warm process (torch imported "
            "once); --no-warm: Flower's default, a fresh interpreter per message."
        ),
    ] = True,
) -> None:
    """Start a Flower SuperNode that trains with fedscale's ClientApp (and serve its models)."""
    with _sigterm_raises(), _errors():
        try:
            _run_edge_client(
                server=server,
                partition_id=partition_id,
                num_partitions=num_partitions,
                data_path=data_path,
                device=device,
                port=port,
                insecure=insecure,
                root_certificates=str(root_certificates) if root_certificates else None,
                auth_key=str(auth_key) if auth_key else None,
                max_wait_time=max_wait_time,
                model_dir=model_dir,
                serve_port=serve_port,
                serve_grpc_port=serve_grpc_port,
                serve_host=serve_host,
                serve_args=tuple(serve_arg or ()),
                warm=warm,
            )
        except _Terminated:
            console.print("stopped on SIGTERM", markup=False)
            raise typer.Exit(0) from None


def _run_edge_client(
    *,
    port: int | None,
    data_path: Path | None,
    model_dir: Path | None,
    **options: Any,
) -> None:
    from fedscale.edge_client.supernode import EdgeClientOptions, run_edge_client
    from fedscale.processes import free_port

    edge = EdgeClientOptions(
        clientappio_port=port or free_port(),
        data_path=str(data_path) if data_path else None,
        model_dir=str(model_dir.absolute()) if model_dir else None,
        **options,
    )
    console.print(
        f"SuperNode -> {edge.server}, node config {edge.node_config}"
        + ("" if edge.warm else " (Flower's SuperExec: a fresh interpreter per message)"),
        markup=False,
        soft_wrap=True,
    )
    run_edge_client(
        edge,
        on_started=lambda child, pid: console.print(
            f"started {child.name}: pid {pid}", markup=False, soft_wrap=True
        ),
    )


class _Terminated(Exception):
    """SIGTERM asked ``edge-client`` to stop: a clean stop, exit code 0."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`_Terminated`, so `finally` blocks stop child processes."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------- helpers


def _simulate_third_party(
    server_app: str | None,
    client_app: str | None,
    run_config: str | None,
    clients: int,
    engine: str,
    ray_address: str | None,
) -> None:
    from flwr.common.config import parse_config_args

    from fedscale.exceptions import ConfigError
    from fedscale.simulations import run_apps

    if not (server_app and client_app):
        raise ConfigError(
            "third-party apps: expected both --server-app and --client-app (MODULE:ATTR)"
        )
    try:
        config = parse_config_args([run_config]) if run_config else {}
    except ValueError as err:
        raise ConfigError(
            f"--run-config: expected 'key=value ...', got {run_config!r}: {err}"
        ) from err
    # Like `flwr run`, import the user's modules from the current directory.
    sys.path.insert(0, os.getcwd())
    run_apps(
        server_app,
        client_app,
        clients=clients,
        run_config=config,
        engine=_engine(engine),
        ray_address=ray_address,
    )
    stdout.print(f"run finished: {server_app} with {clients} clients of {client_app}")


# CLI option names that differ from RunSettings field names.
_OPTION_TO_FIELD = {
    "rounds": "num_rounds",
    "per_round": "clients_per_round",
    "clients": "num_clients",
}


def _settings_from_options(options: dict[str, Any]) -> RunSettings:
    """Build the run's settings from a command's options (its ``locals()``).

    Options named like a ``RunSettings`` field (or mapped in ``_OPTION_TO_FIELD``)
    become that field; ``out`` is a path the command resolves itself.
    """
    names = {f.name for f in dataclasses.fields(RunSettings)} - {"out"}
    kwargs = {_OPTION_TO_FIELD.get(k, k): _option_value(k, v) for k, v in options.items()}
    return RunSettings(**{k: v for k, v in kwargs.items() if k in names})


def _scenario_settings(ctx: typer.Context, scenario: str, options: dict[str, Any]) -> RunSettings:
    """Return a scenario file's settings with the options given on the command line applied."""
    from fedscale.simulations.scenarios import load_scenario

    return load_scenario(scenario, **_given_overrides(ctx, options))


def _resume_settings(ctx: typer.Context, out: Path | None, options: dict[str, Any]) -> RunSettings:
    """Return the settings of the run in ``out`` to resume, with the options given applied.

    The run's own ``config.toml`` is the base, so a resume needs no options at
    all; one given anyway must agree with it (only ``--rounds`` may change:
    the ServerApp refuses any other difference, naming it).
    """
    from fedscale.exceptions import ConfigError
    from fedscale.runs import RunDirectory

    if out is None:
        raise ConfigError("resume: expected --out naming the run folder to continue, got none")
    stored = RunDirectory(out.absolute()).read_config()
    base = RunSettings.from_run_config(stored)
    return base.replace(**_given_overrides(ctx, options), resume=True, out=str(out.absolute()))


def _given_overrides(ctx: typer.Context, options: dict[str, Any]) -> dict[str, Any]:
    """Return the run settings among ``options`` that were given on the command line.

    An option counts as given when click saw it on the command line (or in an
    environment variable), not when it merely holds its default.
    """
    from click.core import ParameterSource

    implicit = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
    given = {name for name in ctx.params if ctx.get_parameter_source(name) not in implicit}
    names = {f.name for f in dataclasses.fields(RunSettings)} - {"out", "resume"}
    return {
        _OPTION_TO_FIELD.get(k, k): _option_value(k, v)
        for k, v in options.items()
        if k in given and _OPTION_TO_FIELD.get(k, k) in names
    }


def _option_value(name: str, value: Any) -> Any:
    # Repeated --strategy-arg options make the one strategy-args string a run config holds.
    if name == "strategy_args":
        return " ".join(value or ())
    return value


def _workers(value: str) -> Workers:
    """``--workers``: auto, or a count of worker processes (0: one per CPU core)."""
    if value == "auto":  # fedscale.simulations.workers.AUTO, not imported before it runs
        return "auto"
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise typer.BadParameter(
            f"expected 'auto' or an integer >= 0 (0: one per CPU core), got {value!r}",
            param_hint="--workers",
        )
    return count


def _engine(name: str) -> Any:
    from fedscale.exceptions import ConfigError

    if name not in ("inprocess", "ray"):
        raise ConfigError(f"--engine: expected inprocess or ray, got {name!r}")
    return name


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    handler = RichHandler(console=console, show_path=False, show_time=False)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    root = logging.getLogger("fedscale")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)  # round records reach the progress bar; the handler filters
    root.propagate = False
    import flwr  # noqa: F401 - Flower sets up its logger on import; quiet it after

    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so `finally` blocks stop child processes."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _output(quiet: bool, json_output: bool) -> AbstractContextManager[Output]:
    """Enter the output mode ``--quiet``/``--json`` ask for, on this module's consoles."""
    return output_mode(quiet, json_output, consoles=(console, stdout), stdout=stdout)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn fedscale errors into a red line with a hint (JSON with --json) and exit code 2."""
    try:
        yield
    except FedscaleError as exc:
        print_error(console, exc)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        print_interrupted(console)
        raise typer.Exit(130) from None


from . import certs as certs_command  # noqa: E402 - registers after the app's own commands
from . import export  # noqa: E402
from . import report as report_command  # noqa: E402
from . import serve as serve_command  # noqa: E402

export.register(app)
serve_command.register(app)
report_command.register(app)
certs_command.register(app)


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except ModuleNotFoundError as exc:
        # A serve-only install running a training command: say what to install. The
        # import may fail before the command enters its output mode, hence the argv.
        report = missing_training_module(exc)
        if report is None:
            raise
        print_report(console, report, json_output="--json" in sys.argv[1:])
        raise SystemExit(2) from None
