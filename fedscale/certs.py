"""Development TLS certificates and SuperNode key pairs, in the files Flower reads.

``fedscale certs DIR`` makes what a SuperLink needs to serve over TLS: a
development certificate authority (``ca.crt``, ``ca.key``) and a server
certificate signed by it (``server.pem``, ``server.key``) that names
``127.0.0.1``, ``::1`` and ``localhost`` plus the hosts given. Flower's
``flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` take the
three files a server needs; SuperNodes and ``flwr`` trust ``ca.crt``.

``fedscale certs DIR --node NAME`` makes a SuperNode's authentication key pair
in the format Flower 1.42 reads: an ECDSA P-384 private key in OpenSSH format
(``NAME.key``, for ``flower-supernode --auth-supernode-private-key``) and its
OpenSSH public key (``NAME.pub``, for ``flwr supernode register``).

Private keys are written 0600; nothing that exists is overwritten unless asked
(``force``), and then each file is replaced atomically.

``cryptography`` (a dependency of flwr) is imported here only, when called, so
that importing :mod:`fedscale` stays light.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .exceptions import ConfigError
from .files import atomic_write

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "DEFAULT_HOSTS",
    "SERVER_CERT",
    "SERVER_KEY",
    "NodeKeyFiles",
    "ServerCertificates",
    "check_root_certificate",
    "create_certificates",
    "create_node_keys",
    "node_key_files",
    "check_node_private_key",
    "node_public_keys",
    "server_certificates",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
# Every server certificate names the loopback addresses: `flwr run`, the SuperLink's
# own ServerApp processes and local SuperNodes connect there.
DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RESERVED_NODE_NAMES = {"ca", "server"}


@dataclass(frozen=True)
class ServerCertificates:
    """The files a TLS SuperLink reads, and the CA certificate its clients trust."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyFiles:
    """A SuperNode's authentication key pair: OpenSSH private key and public key."""

    private_key: Path
    public_key: Path


def create_certificates(
    directory: Path | str,
    *,
    hosts: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
) -> ServerCertificates:
    """Create a development CA and a server certificate for ``hosts`` in ``directory``.

    The server certificate's subject alternative names are the loopback names
    (:data:`DEFAULT_HOSTS`) and ``hosts`` (IP addresses or DNS names). Refuses,
    before writing anything, when one of the four files exists and ``force`` is
    false.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise ConfigError(f"days: expected a validity of at least 1 day, got {days}")
    names = _subject_alt_names([*DEFAULT_HOSTS, *hosts])
    directory = Path(directory)
    targets = [directory / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    _refuse_existing(targets, force)

    now = datetime.datetime.now(datetime.UTC)
    # A minute of slack for clocks that are slightly behind this one.
    not_before, not_after = now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedscale development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedscale development CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedscale development"),
                    x509.NameAttribute(NameOID.COMMON_NAME, _common_name(hosts)),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    # Keys first: a certificate without its key is useless, the reverse is harmless.
    atomic_write(directory / CA_KEY, _private_pem(ca_key), mode=0o600)
    atomic_write(directory / SERVER_KEY, _private_pem(server_key), mode=0o600)
    atomic_write(directory / CA_CERT, _cert_pem(ca_cert), mode=0o644)
    atomic_write(directory / SERVER_CERT, _cert_pem(server_cert), mode=0o644)
    return ServerCertificates(
        ca_cert=directory / CA_CERT,
        server_cert=directory / SERVER_CERT,
        server_key=directory / SERVER_KEY,
    )


def create_node_keys(directory: Path | str, name: str, *, force: bool = False) -> NodeKeyFiles:
    """Create SuperNode ``name``'s ECDSA P-384 key pair (OpenSSH format) in ``directory``.

    ``NAME.key`` (0600) is the node's: ``fedscale edge-client --auth-key``.
    ``NAME.pub`` is what the server registers (``fedscale server --auth-keys``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    files = node_key_files(directory, name, force=force)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    atomic_write(files.private_key, private, mode=0o600)
    atomic_write(files.public_key, public + f" fedscale-node-{name}\n".encode(), mode=0o644)
    return files


def node_key_files(directory: Path | str, name: str, *, force: bool = False) -> NodeKeyFiles:
    """Return where node ``name``'s key pair goes, refusing a bad name or existing files."""
    if not _NODE_NAME.match(name) or name in _RESERVED_NODE_NAMES:
        raise ConfigError(
            f"node name: expected 1-64 letters, digits, '.', '_' or '-' (starting with a "
            f"letter or digit; not 'ca' or 'server'), got {name!r}"
        )
    directory = Path(directory)
    files = NodeKeyFiles(directory / f"{name}.key", directory / f"{name}.pub")
    _refuse_existing([files.private_key, files.public_key], force)
    return files


def server_certificates(directory: Path | str, *, host: str | None = None) -> ServerCertificates:
    """Return the TLS files in ``directory``, checked, for a SuperLink serving ``host``.

    Checks that ``ca.crt``, ``server.pem`` and ``server.key`` are there and
    parse, that the server certificate is signed by the CA, is valid now,
    belongs to the key, and (with ``host``) names ``host``: Flower would
    otherwise start and only its clients would fail, with a TLS error.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(
            f"certificates: expected a folder holding {CA_CERT}, {SERVER_CERT} and "
            f"{SERVER_KEY} (fedscale certs DIR makes one), found no folder at {directory}"
        )
    files = ServerCertificates(
        ca_cert=directory / CA_CERT,
        server_cert=directory / SERVER_CERT,
        server_key=directory / SERVER_KEY,
    )
    missing = [
        p.name for p in (files.ca_cert, files.server_cert, files.server_key) if not p.is_file()
    ]
    if missing:
        raise ConfigError(
            f"certificates {directory}: expected {CA_CERT}, {SERVER_CERT} and {SERVER_KEY}, "
            f"missing {', '.join(missing)} (fedscale certs DIR makes them)"
        )
    ca = _load_certificate(files.ca_cert)
    cert = _load_certificate(files.server_cert)
    try:
        key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"{files.server_key}: expected an unencrypted PEM private key: {err}"
        ) from err
    if key.public_key() != cert.public_key():
        raise ConfigError(
            f"{files.server_key}: expected the private key of {files.server_cert}, got another key"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise ConfigError(
            f"{files.server_cert}: expected a certificate signed by {files.ca_cert}, "
            f"it is not ({type(err).__name__}{': ' if str(err) else ''}{err})"
        ) from err
    _check_validity(files.server_cert, cert)
    _check_validity(files.ca_cert, ca)
    if host is not None:
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans = x509.SubjectAlternativeName([])
        if not _names_host(sans, host):
            named = [str(n.value) for n in sans]
            raise ConfigError(
                f"{files.server_cert}: expected a certificate naming {host!r}, it names "
                f"{', '.join(named) or 'nothing'}; fedscale certs DIR --host {host} --force "
                "makes a new one"
            )
    return files


def check_root_certificate(path: Path | str) -> Path:
    """Return ``path`` after checking it holds a PEM CA certificate valid now."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"root certificates: expected the server's CA certificate (ca.crt), found no "
            f"file at {path}"
        )
    _check_validity(path, _load_certificate(path))
    return path


def check_node_private_key(path: Path | str) -> Path:
    """Return ``path`` after checking it holds an OpenSSH ECDSA private key on a NIST curve.

    That is what ``flower-supernode --auth-supernode-private-key`` accepts;
    checking here turns Flower's "Unable to parse the private key file" into a
    message that says what is wrong.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"auth key: expected a SuperNode private key file, found none at {path}")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(
            f"auth key {path}: expected an unencrypted OpenSSH ECDSA private key "
            f"(fedscale certs DIR --node NAME, or ssh-keygen -t ecdsa -b 384 -N ''): {err}"
        ) from err
    _check_nist_ec(path, key)
    return path


def node_public_keys(path: Path | str) -> list[Path]:
    """Return the SuperNode public keys at ``path`` (one ``.pub`` file, or a folder's).

    Each must be an OpenSSH ECDSA public key on a NIST curve, what ``flwr
    supernode register`` accepts. A folder with no ``*.pub`` file is an error:
    a server with node authentication on and no node registered can train nobody.
    """
    path = Path(path)
    if path.is_dir():
        keys = sorted(p for p in path.glob("*.pub") if p.is_file())
        if not keys:
            raise ConfigError(
                f"auth keys: expected SuperNode public keys (*.pub) in {path}, found none"
            )
    elif path.is_file():
        keys = [path]
    else:
        raise ConfigError(
            f"auth keys: expected a SuperNode public key file or a folder of *.pub files, "
            f"found nothing at {path}"
        )
    for key in keys:
        _load_public_key(key)
    return keys


# ---------------------------------------------------------------------- helpers


def _load_public_key(path: Path) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(
            f"auth key {path}: expected an OpenSSH ECDSA public key "
            f"('ecdsa-sha2-nistp384 AAAA...'): {err}"
        ) from err
    _check_nist_ec(path, key)


def _check_nist_ec(path: Path, key: object) -> None:
    # Flower accepts EC keys on NIST curves only (flwr.supercore.primitives.asymmetric).
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        raise ConfigError(
            f"auth key {path}: expected an ECDSA key (Flower's node authentication "
            f"uses elliptic curves), got a {type(key).__name__}"
        )
    if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise ConfigError(
            f"auth key {path}: expected a NIST curve (P-256, P-384, P-521), got {key.curve.name}"
        )


def _refuse_existing(targets: Iterable[Path], force: bool) -> None:
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"expected no existing files (pass --force to replace them), found "
            f"{', '.join(existing)}"
        )


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    from cryptography import x509

    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in hosts:
        host = raw.strip().strip("[]")
        if not host:
            raise ConfigError(f"host: expected an IP address or DNS name, got {raw!r}")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                raise ConfigError(
                    f"host: expected an IP address or DNS name, got {raw!r}"
                ) from None
            key = host.lower()
            if key not in seen:
                names.append(x509.DNSName(key))
        else:
            key = str(ip)
            if key not in seen:
                names.append(x509.IPAddress(ip))
        seen.add(key)
    return names


def _common_name(hosts: Sequence[str]) -> str:
    # Clients check the SANs, never the CN; it only makes the certificate readable.
    return (hosts[0] if hosts else "localhost").strip("[]")[:64]


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _load_certificate(path: Path) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise ConfigError(f"{path}: expected a PEM certificate: {err}") from err


def _check_validity(path: Path, cert: x509.Certificate) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError(
            f"{path}: expected a certificate valid now ({now:%Y-%m-%d %H:%M} UTC), it is "
            f"valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )


def _names_host(sans: x509.SubjectAlternativeName, host: str) -> bool:
    from cryptography import x509

    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        wanted = host.lower()
        for name in sans.get_values_for_type(x509.DNSName):
            name = name.lower()
            if name == wanted:
                return True
            if name.startswith("*.") and wanted.count(".") >= 2:
                if wanted.split(".", 1)[1] == name[2:]:
                    return True
        return False
    return ip in sans.get_values_for_type(x509.IPAddress)
