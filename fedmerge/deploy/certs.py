"""Local test PKI: an own certificate authority, a SuperLink server certificate, and SuperNode auth key pairs.

Layout written under ``out``::

    ca.crt / ca.key              self-signed CA (the file SuperNodes and ``flwr`` trust: --root-certificates)
    server.crt / server.key      SuperLink certificate signed by the CA, SANs for the given hosts
    nodes/node-<i>  / .pub       SuperNode keys: EC SECP384R1, OpenSSH format (what Flower's node auth expects)

Private keys are written with mode 0600 from creation, through a fresh temporary name (never an existing file or
symlink). Everything is for loopback testing; a production CA is kept offline.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmerge.errors import FedmergeError

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")  # in every server certificate (make_server_cert)
DEFAULT_HOSTS = LOOPBACK_HOSTS


@dataclass(frozen=True)
class NodeKeys:
    """One SuperNode's authentication key pair (paths)."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the generated PKI."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    nodes: tuple[NodeKeys, ...]


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Atomic write through a fresh temporary name (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600 from creation);
    public files are made 0644 before the rename, private keys stay 0600 whatever the umask."""
    from fedmerge.storage import write_bytes_atomic  # imported here: storage needs torch, --help must not

    write_bytes_atomic(path, data, mode=0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """IP SANs for literal addresses, DNS SANs for names."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(common_name: str = "fedmerge local CA", days: int = 30) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA key and certificate (basicConstraints CA:TRUE, keyCertSign)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str], days: int = 30
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server key and certificate signed by the CA, valid for ``hosts`` (serverAuth) and the loopback names
    :data:`LOOPBACK_HOSTS` (the SuperLink's own SuperExec connects to it on 127.0.0.1 over TLS), for ``days`` days
    but never past the CA's own end (the chain would break then); FedmergeError for an expired CA."""
    if not hosts:
        raise ValueError("at least one host name or IP address is needed for the server certificate")
    hosts = [*hosts, *(h for h in LOOPBACK_HOSTS if h not in hosts)]
    now = dt.datetime.now(dt.timezone.utc)
    if ca_cert.not_valid_after_utc <= now:
        raise FedmergeError(f"the CA certificate expired on {ca_cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: make a "
                            "new CA (without --ca); every data owner then needs its ca.crt")
    until = now + dt.timedelta(days=days)
    if until > ca_cert.not_valid_after_utc + dt.timedelta(days=1):  # a CA made with the same --days ends seconds before
        logger.warning("the server certificate ends with its CA on %s UTC, not after the %d days asked",
                       f"{ca_cert.not_valid_after_utc:%Y-%m-%d %H:%M}", days)
    until = min(until, ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_node_keys(out_dir: Path, name: str) -> NodeKeys:
    """An EC SECP384R1 key pair in OpenSSH format: ``<name>`` (private, 0600) and ``<name>.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = out_dir / name
    public = out_dir / f"{name}.pub"
    _write(
        private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        private=True,
    )
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return NodeKeys(private, public)


def load_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key and certificate in ``folder`` (``ca.key`` + ``ca.crt``, as :func:`generate` writes them); a
    FedmergeError when either is missing, unreadable, not a CA, or the key does not belong to the certificate."""
    cert_path, key_path = Path(folder) / "ca.crt", Path(folder) / "ca.key"
    for path in (cert_path, key_path):
        if not path.is_file():
            raise FedmergeError(f"{folder}: no {path.name} (a CA folder holds ca.crt and ca.key, as `fedmerge deploy "
                                "certs --out` writes them)")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise FedmergeError(f"{folder}: unreadable CA ({exc}); an unencrypted PEM ca.key and ca.crt are "
                            "needed") from exc
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise FedmergeError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE)")
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and key_belongs_to(key, cert)):
        raise FedmergeError(f"{key_path} does not belong to {cert_path}")
    return key, cert


def key_belongs_to(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """Whether ``cert`` certifies the public half of ``key`` (their SubjectPublicKeyInfo encodings are equal)."""
    def spki(public: PublicKeyTypes) -> bytes:
        return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    return spki(key.public_key()) == spki(cert.public_key())


def check_server_cert(ca_path: Path, cert_path: Path, key_path: Path, host: str = "127.0.0.1") -> None:
    """FedmergeError naming what keeps ``cert_path`` from serving a SuperLink on ``host``: a certificate outside its
    validity period (now), one that does not name ``host`` (the SuperLink's own SuperExec connects on the loopback),
    one ``ca_path`` did not sign, or a key ``key_path`` of another certificate. Flower reports each of these only as
    "Connection to the SuperLink is unavailable", after the processes started."""
    def certificate(file: Path) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(file.read_bytes())
        except ValueError as exc:
            raise FedmergeError(f"{file}: not a PEM certificate ({exc})") from None

    ca, cert = certificate(ca_path), certificate(cert_path)
    now = dt.datetime.now(dt.timezone.utc)
    for file, checked in ((ca_path, ca), (cert_path, cert)):
        if now > checked.not_valid_after_utc:
            raise FedmergeError(f"{file} expired on {checked.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; make new "
                                "certificates with `fedmerge deploy certs --force` (--ca to keep the CA)")
        if now < checked.not_valid_before_utc:
            raise FedmergeError(f"{file} is not valid before {checked.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                                "(is this machine's clock right?)")
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        named = [str(n) for n in names.get_values_for_type(x509.IPAddress)] + names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        named = []
    if host not in named:
        raise FedmergeError(f"{cert_path} does not name {host} (its subject alternative names: {named or 'none'}); "
                            "the SuperLink's own SuperExec connects to it there: make it with `fedmerge deploy certs`, "
                            "which adds the loopback names to every server certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise FedmergeError(f"{cert_path} is not signed by {ca_path}: SuperNodes trusting that CA would refuse "
                            "the SuperLink") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise FedmergeError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    if not key_belongs_to(key, cert):
        raise FedmergeError(f"{key_path} does not belong to {cert_path}")


def generate(
    out: Path, n_nodes: int = 3, hosts: Sequence[str] = DEFAULT_HOSTS, *, overwrite: bool = False, days: int = 30,
    ca: Path | None = None,
) -> TlsFiles:
    """Write a CA, a server certificate for ``hosts`` and ``n_nodes`` SuperNode key pairs under ``out``; the
    certificates are valid for ``days`` days. With ``ca`` (a folder holding ``ca.crt`` + ``ca.key``, e.g. an earlier
    ``out`` kept offline) the server certificate is signed by that CA instead: ``out`` gets a copy of its ``ca.crt``
    and no ``ca.key`` (the returned ``ca_key`` is the one in ``ca``)."""
    if n_nodes < 0:
        raise ValueError(f"n_nodes must be >= 0, got {n_nodes}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    out = Path(out)
    ca_cert_path, ca_key_path = out / "ca.crt", out / "ca.key"
    server_cert_path, server_key_path = out / "server.crt", out / "server.key"
    if not overwrite and (any(p.exists() for p in (ca_cert_path, ca_key_path, server_cert_path, server_key_path))
                          or node_key_files(out / "nodes")):
        raise FedmergeError(f"{out} already holds certificates; --force (overwrite=True in Python) replaces them, the CA "
                             "included unless --ca names the one to keep, so every data owner would need a new ca.crt")
    empty = [h for h in hosts if not str(h).strip()]
    if empty:
        raise ValueError(f"host names must be non-empty, got {list(hosts)!r}")
    if ca is not None:
        ca_key, ca_cert = load_ca(Path(ca))
        ca_key_path = Path(ca) / "ca.key"
    else:
        ca_key, ca_cert = make_ca(days=days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, list(hosts), days=days)  # before anything is written
    if ca is None:
        _write(ca_key_path, _pem_key(ca_key), private=True)
    _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(server_key_path, _pem_key(server_key), private=True)
    _write(server_cert_path, server_cert.public_bytes(serialization.Encoding.PEM))
    if ca is not None and Path(ca).resolve() != out.resolve():  # --force --ca: the replaced CA's key must not stay
        (out / "ca.key").unlink(missing_ok=True)
    expected = {f"node-{i}{suffix}" for i in range(n_nodes) for suffix in ("", ".pub")}
    if (out / "nodes").is_dir():  # an earlier generation's other node keys (node-5, node-01, a lone .pub): never used
        for stale in (out / "nodes").iterdir():
            if stale.name not in expected and re.fullmatch(r"node-\d+", stale.name.removesuffix(".pub")):
                stale.unlink()
    nodes = tuple(make_node_keys(out / "nodes", f"node-{i}") for i in range(n_nodes))
    logger.info("wrote CA, server certificate for %s and %d node key pairs to %s", ", ".join(hosts), n_nodes, out)
    return TlsFiles(ca_cert_path, ca_key_path, server_cert_path, server_key_path, nodes)


def load_tls_dir(path: Path) -> TlsFiles:
    """The files of a directory written by :func:`generate`; a clear error if any is missing or the server
    certificate cannot work (:func:`check_server_cert`). ``ca.key`` may be absent (``deploy certs --ca`` keeps the
    CA's key where it was, offline; a deployment never reads it)."""
    path = Path(path)
    files = [path / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")]
    missing = [str(f) for f in files if not f.is_file() and f.name != "ca.key"]
    if missing:
        raise FedmergeError(f"TLS directory {path} lacks {', '.join(missing)}; create it with `fedmerge deploy certs`")
    check_server_cert(files[0], files[2], files[3])
    nodes = tuple(NodeKeys(p, p.with_name(p.name + ".pub")) for p in node_key_files(path / "nodes"))
    return TlsFiles(*files, nodes)


def node_key_files(nodes_dir: Path) -> list[Path]:
    """The private node keys ``node-<i>`` in ``nodes_dir`` (none when it does not exist), by ``i``; other files
    (``node-0.bak``, an editor's ``node-0~``) are not keys."""
    if not nodes_dir.is_dir():
        return []
    numbered = {}
    for path in nodes_dir.iterdir():
        match = NODE_KEY.fullmatch(path.name)
        if match:
            numbered[int(match.group(1))] = path
    return [numbered[i] for i in sorted(numbered)]


NODE_KEY = re.compile(r"node-(0|[1-9]\d*)")  # node-01 is no key of node 1
