"""Transport security and SuperNode authentication.

The unit tests check the files `fedscale certs` writes with `cryptography` and
with the loaders Flower itself uses, and how the server and edge-client options
turn into Flower's command lines. The integration test runs `fedscale server`
over TLS with node authentication on 127.0.0.1 and three `fedscale edge-client`s
against it: a plaintext one and one with an unregistered key are refused, the
registered one trains a round. Every process is stopped by its PID.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from fedscale.certs import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    check_node_private_key,
    check_root_certificate,
    create_certificates,
    create_node_keys,
    node_public_keys,
    server_certificates,
)
from fedscale.cli.main import app
from fedscale.edge_client.supernode import EdgeClientOptions, supernode_argv
from fedscale.exceptions import ConfigError
from fedscale.processes import flower_executable, free_port, start, stop
from fedscale.runs import RunDirectory
from fedscale.server.launcher import ServerOptions, flwr_home_config, superlink_argv

FEDSCALE = [sys.executable, "-m", "fedscale.cli"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    create_certificates(directory, hosts=["fl.example.org", "10.1.2.3"], days=30)
    create_node_keys(directory, "alice")
    create_node_keys(directory, "bob")
    return directory


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ------------------------------------------------------------------ certificates


def test_server_certificate_is_signed_by_the_ca_and_names_loopback_and_the_hosts(certs):
    ca, server = _load(certs / CA_CERT), _load(certs / SERVER_CERT)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    }
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    key = serialization.load_pem_private_key((certs / SERVER_KEY).read_bytes(), password=None)
    assert key.public_key() == server.public_key()


def test_certificates_are_valid_from_now_for_the_days_asked(certs):
    now = datetime.datetime.now(datetime.UTC)
    for cert in (_load(certs / CA_CERT), _load(certs / SERVER_CERT)):
        assert cert.not_valid_before_utc <= now
        lifetime = cert.not_valid_after_utc - now
        assert datetime.timedelta(days=29) < lifetime <= datetime.timedelta(days=30)


def test_private_keys_are_readable_by_their_owner_only(certs):
    for name in (CA_KEY, SERVER_KEY, "alice.key"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600, name
    for name in (CA_CERT, SERVER_CERT, "alice.pub"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o644, name


def test_existing_files_are_never_overwritten_without_force(tmp_path):
    (tmp_path / SERVER_KEY).write_text("a key somebody keeps")
    with pytest.raises(ConfigError, match=r"pass --force.*server\.key"):
        create_certificates(tmp_path)
    assert (tmp_path / SERVER_KEY).read_text() == "a key somebody keeps"
    assert sorted(p.name for p in tmp_path.iterdir()) == [SERVER_KEY], "nothing else written"
    create_certificates(tmp_path, force=True)
    server_certificates(tmp_path, host="127.0.0.1")  # a matching key replaced it


def test_node_keys_load_with_flowers_own_loaders(certs):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    private = serialization.load_ssh_private_key((certs / "alice.key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    # What `flwr supernode register` sends is the key the SuperNode signs with.
    assert try_load_public_key(certs / "alice.pub") == public_key_to_bytes(private.public_key())
    assert check_node_private_key(certs / "alice.key") == certs / "alice.key"
    assert node_public_keys(certs) == [certs / "alice.pub", certs / "bob.pub"]
    assert node_public_keys(certs / "bob.pub") == [certs / "bob.pub"]


def test_node_key_names_and_existing_keys_are_refused(tmp_path):
    for name in ("", "../x", "ca", "-a", "a b"):
        with pytest.raises(ConfigError, match="node name: expected"):
            create_node_keys(tmp_path, name)
    create_node_keys(tmp_path, "n1")
    before = (tmp_path / "n1.key").read_bytes()
    with pytest.raises(ConfigError, match=r"pass --force.*n1\.key"):
        create_node_keys(tmp_path, "n1")
    assert (tmp_path / "n1.key").read_bytes() == before


def test_bad_keys_and_key_folders_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"expected SuperNode public keys \(\*\.pub\) in"):
        node_public_keys(tmp_path)
    with pytest.raises(ConfigError, match="found nothing at"):
        node_public_keys(tmp_path / "missing")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pub").write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    with pytest.raises(ConfigError, match="expected an ECDSA key.*got a _?RSAPublicKey"):
        node_public_keys(tmp_path)
    (tmp_path / "rsa.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="expected an OpenSSH ECDSA public key"):
        node_public_keys(tmp_path)
    (tmp_path / "pem.key").write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="expected an unencrypted OpenSSH ECDSA private key"):
        check_node_private_key(tmp_path / "pem.key")


def test_server_certificates_are_checked_before_anything_starts(tmp_path, certs):
    with pytest.raises(ConfigError, match="missing ca.crt, server.pem, server.key"):
        server_certificates(tmp_path)
    with pytest.raises(ConfigError, match=r"expected a certificate naming '10\.9\.9\.9'"):
        server_certificates(certs, host="10.9.9.9")
    for host in ("127.0.0.1", "::1", "localhost", "fl.example.org", "10.1.2.3"):
        server_certificates(certs, host=host)
    # A server certificate from another CA than the ca.crt beside it.
    other = tmp_path / "other"
    create_certificates(other)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(certs / CA_CERT, mixed / CA_CERT)
    shutil.copy(other / SERVER_CERT, mixed / SERVER_CERT)
    shutil.copy(other / SERVER_KEY, mixed / SERVER_KEY)
    with pytest.raises(ConfigError, match="expected a certificate signed by"):
        server_certificates(mixed)
    shutil.copy(certs / SERVER_KEY, mixed / SERVER_KEY)
    with pytest.raises(ConfigError, match="expected the private key of"):
        server_certificates(mixed)


def test_an_expired_root_certificate_is_refused(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "old.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="expected a certificate valid now"):
        check_root_certificate(tmp_path / "old.crt")
    with pytest.raises(ConfigError, match="found no file at"):
        check_root_certificate(tmp_path / "none.crt")


def test_certs_command_writes_the_ca_and_server_files_or_node_keys(tmp_path):
    runner = CliRunner()
    out = tmp_path / "certs"
    done = runner.invoke(app, ["certs", str(out), "--host", "edge.example.org", "--days", "3"])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY]
    )
    server_certificates(out, host="edge.example.org")
    again = runner.invoke(app, ["certs", str(out)])
    assert again.exit_code == 2
    assert "pass --force" in again.output
    done = runner.invoke(app, ["certs", str(out), "--node", "d1", "--node", "d2"])
    assert done.exit_code == 0, done.output
    assert node_public_keys(out) == [out / "d1.pub", out / "d2.pub"]
    # One existing key pair refuses the whole command: d3 is not written either.
    done = runner.invoke(app, ["certs", str(out), "--node", "d3", "--node", "d1"])
    assert done.exit_code == 2
    assert not (out / "d3.key").exists()
    done = runner.invoke(app, ["certs", str(out), "--node", "d4", "--host", "x"])
    assert done.exit_code == 2
    assert "expected no --host with --node" in done.output


# ------------------------------------------------------------- server options


def test_plaintext_is_loopback_only_unless_insecure_or_tls(certs):
    with pytest.raises(ConfigError, match="pass --insecure .* or --certificates DIR"):
        ServerOptions(host="0.0.0.0")
    ServerOptions(host="0.0.0.0", insecure=True)
    ServerOptions(host="0.0.0.0", certificates=str(certs))
    with pytest.raises(ConfigError, match="expected either --certificates DIR .* got both"):
        ServerOptions(host="0.0.0.0", certificates=str(certs), insecure=True)
    with pytest.raises(ConfigError, match="--auth-keys: expected --certificates DIR too"):
        ServerOptions(auth_keys=str(certs))
    with pytest.raises(ConfigError, match=r"naming '10\.9\.9\.9'"):
        ServerOptions(host="10.9.9.9", certificates=str(certs))


def test_superlink_argv_serves_tls_and_authenticates_nodes(certs):
    tls = ServerOptions(certificates=str(certs)).tls
    assert tls is not None
    argv = superlink_argv(9000, tls=tls, supernode_auth=True)
    assert "--insecure" not in argv
    assert argv[argv.index("--ssl-ca-certfile") + 1] == str(certs / CA_CERT)
    assert argv[argv.index("--ssl-certfile") + 1] == str(certs / SERVER_CERT)
    assert argv[argv.index("--ssl-keyfile") + 1] == str(certs / SERVER_KEY)
    assert "--enable-supernode-auth" in argv
    plain = superlink_argv(9000)
    assert "--insecure" in plain
    assert not any(a.startswith("--ssl") or a == "--enable-supernode-auth" for a in plain)
    with pytest.raises(ConfigError, match="expected TLS certificates"):
        superlink_argv(9000, supernode_auth=True)


def test_flwr_home_config_trusts_the_ca_for_tls():
    from flwr.cli.flower_config import parse_superlink_connection

    tls = tomllib.loads(flwr_home_config("127.0.0.1:9000", root_certificates="/c/ca.crt"))
    connection = tls["superlink"]["fedscale"]
    assert connection == {
        "address": "127.0.0.1:9000",
        "root-certificates": "/c/ca.crt",
        "insecure": False,
    }
    parsed = parse_superlink_connection(connection, "fedscale")
    assert (parsed.root_certificates, parsed.insecure) == ("/c/ca.crt", False)
    plain = tomllib.loads(flwr_home_config("127.0.0.1:9000"))
    assert plain["superlink"]["fedscale"] == {"address": "127.0.0.1:9000", "insecure": True}


# -------------------------------------------------------- edge-client options


def _edge(**kwargs: object) -> EdgeClientOptions:
    base: dict[str, object] = {
        "server": "10.1.2.3:9092",
        "clientappio_port": 9999,
        "partition_id": 0,
        "num_partitions": 2,
    }
    return EdgeClientOptions(**{**base, **kwargs})


def test_edge_client_connects_over_tls_with_its_key(certs):
    argv = supernode_argv(
        _edge(root_certificates=str(certs / CA_CERT), auth_key=str(certs / "alice.key"))
    )
    assert "--insecure" not in argv
    assert argv[argv.index("--root-certificates") + 1] == str(certs / CA_CERT)
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(certs / "alice.key")
    assert argv[argv.index("--superlink") + 1] == "10.1.2.3:9092"
    loopback = supernode_argv(_edge(server="127.0.0.1:9092"))
    assert "--insecure" in loopback and "--root-certificates" not in loopback


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "pass --insecure to connect without TLS, or --root-certificates CA"),
        ({"insecure": True, "root_certificates": "CA"}, "got both"),
        ({"server": "127.0.0.1:1", "auth_key": "KEY"}, "--auth-key: expected --root-certificates"),
        ({"root_certificates": "MISSING"}, "found no file at"),
        ({"root_certificates": "CA", "auth_key": "PUB"}, "expected an unencrypted OpenSSH"),
    ],
)
def test_edge_client_tls_options_are_clear_errors(certs, kwargs, message):
    files = {
        "CA": str(certs / CA_CERT),
        "KEY": str(certs / "alice.key"),
        "PUB": str(certs / "alice.pub"),
        "MISSING": str(certs / "none.crt"),
    }
    resolved = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=re.escape(message)):
        _edge(**resolved)


# -------------------------------------------------- a TLS deployment, for real


def _wait_for(log: Path, pattern: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and re.search(pattern, log.read_text(errors="replace")):
            return
        if process.poll() is not None:
            break
        time.sleep(0.2)
    text = log.read_text(errors="replace") if log.exists() else ""
    raise AssertionError(f"no {pattern!r} within {timeout} s (exit {process.poll()}):\n{text}")


def _nodes(env: dict[str, str]) -> list[dict[str, object]]:
    done = subprocess.run(
        [flower_executable("flwr"), "supernode", "ls", "fedscale", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    nodes: list[dict[str, object]] = json.loads(done.stdout[done.stdout.index("{") :])["nodes"]
    return nodes


@pytest.mark.integration
@pytest.mark.slow
def test_tls_server_refuses_plaintext_and_unregistered_nodes_and_trains_a_registered_one(
    tmp_path, certs
):
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    # Our own view of the SuperLink, to list its nodes through the Control API.
    address = f"127.0.0.1:{port}"
    (home / "config.toml").write_text(flwr_home_config(address, root_certificates=certs / CA_CERT))
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "COLUMNS": "200",
    }
    run = tmp_path / "run"
    server_log = tmp_path / "server.log"
    server = start(
        [
            *FEDSCALE,
            "server",
            "--port",
            str(port),
            "--certificates",
            str(certs),
            "--auth-keys",
            str(certs / "alice.pub"),
            "--rounds",
            "1",
            "--min-clients",
            "1",
            "--per-round",
            "1",
            "--round-timeout",
            "120",
            "--no-export-onnx",
            "--out",
            str(run),
            "--verbose",
        ],
        log_file=server_log,
        env=env,
    )
    processes = [server]

    def edge_client(name: str, *args: str) -> subprocess.Popen[bytes]:
        process = start(
            [
                *FEDSCALE,
                "edge-client",
                "--server",
                address,
                "--partition-id",
                "0",
                "--num-partitions",
                "2",
                "--port",
                str(free_port()),
                *args,
            ],
            log_file=tmp_path / f"{name}.log",
            env=env,
        )
        processes.append(process)
        return process

    try:
        _wait_for(server_log, r"registered SuperNode key", server, timeout=120)
        # Plaintext on loopback is allowed by fedscale, so this one tries; TLS turns it away.
        plain = edge_client("plain", "--max-wait-time", "10")
        unregistered = edge_client(
            "bob",
            "--root-certificates",
            str(certs / CA_CERT),
            "--auth-key",
            str(certs / "bob.key"),
            "--max-wait-time",
            "60",
        )
        assert plain.wait(timeout=120) != 0
        assert "could not establish a connection" in (tmp_path / "plain.log").read_text()
        assert unregistered.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "bob.log").read_text()
        nodes = _nodes(env)
        assert len(nodes) == 1, nodes  # alice's registration; neither refused node is there
        assert nodes[0]["status"] == "registered", "nobody has connected with alice's key yet"
        assert (
            not RunDirectory(run).metrics_path.exists()
            or len(RunDirectory(run).read_metrics()) <= 1
        ), "no round ran without a node"

        registered = edge_client(
            "alice",
            "--root-certificates",
            str(certs / CA_CERT),
            "--auth-key",
            str(certs / "alice.key"),
            "--max-wait-time",
            "60",
        )
        code = server.wait(timeout=300)
        assert code == 0, server_log.read_text()
        rows = RunDirectory(run).read_metrics()
        assert [r["round"] for r in rows] == [0, 1]
        assert rows[1]["clients_replied"] == 1 and rows[1]["clients_failed"] == 0
        assert registered.poll() is None, "the registered edge client keeps serving"
        superlink_log = (run / "logs" / "superlink.log").read_text()
        assert "https://127.0.0.1" in superlink_log
    finally:
        for process in reversed(processes):
            stop(process)
    assert all(p.poll() is not None for p in processes)
