"""A throw-away certificate authority for the test SMTP server.

``ensure_tls_files(directory)`` leaves in ``directory`` everything the test server and
its clients need to run STARTTLS with real certificate verification:

- ``ca.pem``: the CA that tests trust (``ssl.create_default_context(cafile=...)``);
- ``server.pem`` / ``server.key``: the server certificate it signed;
- ``other-ca.pem``, ``other-server.pem`` / ``other-server.key``: the same kind of server
  certificate signed by a second CA that nobody trusts, for the "certificate from an
  unknown CA" fault.

Everything is generated with ``cryptography`` (no ``openssl`` command): EC P-256 keys,
which take milliseconds to create. The CA private keys are never written anywhere: a CA
is only needed to sign the two server certificates, and a key that does not exist cannot
leak. Both CAs carry name constraints limited to the requested host names, so even a
``ca.pem`` that ends up in a trust store by mistake can vouch for nothing but localhost.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: generation is not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = ["DEFAULT_HOSTNAMES", "TLSFiles", "ensure_tls_files"]

DEFAULT_HOSTNAMES: tuple[str, ...] = ("localhost", "127.0.0.1")

CA_VALIDITY_DAYS = 825
SERVER_CERT_VALIDITY_DAYS = 730
# Files whose server certificate expires within this margin are generated again, so a
# long-lived tests directory never hands out a certificate that dies mid-run.
RENEW_BEFORE_DAYS = 30
# Certificates start a little in the past: a client whose clock lags ours must not see a
# certificate that is "not yet valid".
BACKDATE = datetime.timedelta(hours=1)

_FILE_NAMES = {
    "ca_cert": "ca.pem",
    "server_cert": "server.pem",
    "server_key": "server.key",
    "other_ca_cert": "other-ca.pem",
    "other_server_cert": "other-server.pem",
    "other_server_key": "other-server.key",
}


@dataclass(frozen=True)
class TLSFiles:
    """Paths of the PEM files written by :func:`ensure_tls_files`.

    ``server_cert``/``server_key`` are signed by ``ca_cert`` (the CA tests trust);
    ``other_server_cert``/``other_server_key`` are signed by ``other_ca_cert``, which no
    one is meant to trust. Both server certificates carry the same subject alternative
    names and the ``serverAuth`` extended key usage.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path
    other_server_cert: Path
    other_server_key: Path

    @classmethod
    def in_directory(cls, directory: Path) -> TLSFiles:
        """The paths ``ensure_tls_files`` uses in ``directory`` (nothing is created)."""
        directory = Path(directory)
        return cls(**{field: directory / name for field, name in _FILE_NAMES.items()})


def ensure_tls_files(directory: Path, hostnames: Sequence[str] = DEFAULT_HOSTNAMES) -> TLSFiles:
    """Make sure ``directory`` holds a usable CA and server certificates; return their paths.

    Idempotent: existing files are kept as long as they are complete, belong together,
    name exactly ``hostnames`` and are not about to expire; otherwise the whole set is
    generated again (a new CA included, so reload ``ca_cert`` after a change).

    ``hostnames`` are DNS names or IP address literals; each becomes a subject
    alternative name of both server certificates and a permitted subtree of both CAs.
    The directory is created with mode 0700 if missing; private keys are written 0600.
    Concurrent callers (e.g. pytest-xdist workers sharing one directory) are serialised
    with a lock file on POSIX, so they never mix files from two generations.

    Raises ``ValueError`` for an empty ``hostnames``.
    """
    names = _normalise_hostnames(hostnames)
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = TLSFiles.in_directory(directory)
    with _exclusive_lock(directory / ".lock"):
        if not _files_are_current(files, names):
            _generate(files, names)
    return files


# --- generation -------------------------------------------------------------------------


def _normalise_hostnames(hostnames: Sequence[str]) -> tuple[str, ...]:
    if isinstance(hostnames, str):
        # A bare string would otherwise be read as a sequence of one-letter host names.
        hostnames = (hostnames,)
    names = tuple(dict.fromkeys(name.strip().lower() for name in hostnames if name.strip()))
    if not names:
        raise ValueError("ensure_tls_files() needs at least one host name")
    return names


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def _permitted_subtrees(names: Sequence[str]) -> list[x509.GeneralName]:
    subtrees: list[x509.GeneralName] = []
    for general_name in _general_names(names):
        if isinstance(general_name, x509.IPAddress):
            # In name constraints an IP address is a network: one host is a /32 (or /128).
            subtrees.append(x509.IPAddress(ipaddress.ip_network(general_name.value)))
        else:
            subtrees.append(general_name)
    return subtrees


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(
    common_name: str, names: Sequence[str], now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailgov.testing"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=_permitted_subtrees(names), excluded_subtrees=None
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        # Python 3.13's default client context sets VERIFY_X509_STRICT, which wants the
        # key identifiers present; they cost nothing.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_server_cert(
    names: Sequence[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    # Not a host name on purpose: verification must rest on the subject alternative
    # names alone, and OpenSSL then has no reason to apply name constraints to the CN.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailgov.testing"),
            x509.NameAttribute(NameOID.COMMON_NAME, "mailgov test SMTP server"),
        ]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=SERVER_CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _generate(files: TLSFiles, names: Sequence[str]) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca_cert, ca_key = _make_ca("mailgov test CA", names, now)
    server_cert, server_key = _make_server_cert(names, ca_cert, ca_key, now)
    other_ca_cert, other_ca_key = _make_ca("mailgov untrusted test CA", names, now)
    other_cert, other_key = _make_server_cert(names, other_ca_cert, other_ca_key, now)

    # Keys first, then certificates: a reader that races a regeneration sees at worst a
    # new key with an old certificate and fails loudly instead of trusting a stale CA.
    _write_atomic(files.server_key, _key_pem(server_key), mode=0o600)
    _write_atomic(files.other_server_key, _key_pem(other_key), mode=0o600)
    _write_atomic(files.server_cert, _cert_pem(server_cert), mode=0o644)
    _write_atomic(files.other_server_cert, _cert_pem(other_cert), mode=0o644)
    _write_atomic(files.other_ca_cert, _cert_pem(other_ca_cert), mode=0o644)
    _write_atomic(files.ca_cert, _cert_pem(ca_cert), mode=0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    ``mkstemp`` creates the file 0600, so a private key is never readable by others,
    not even for the moment between creation and ``chmod``.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


# --- checking existing files ------------------------------------------------------------


def _files_are_current(files: TLSFiles, names: Sequence[str]) -> bool:
    pairs = (
        (files.ca_cert, files.server_cert, files.server_key),
        (files.other_ca_cert, files.other_server_cert, files.other_server_key),
    )
    try:
        return all(_pair_is_current(*paths, names) for paths in pairs)
    except Exception:
        # Missing, unreadable or corrupt files (OSError, ValueError, UnsupportedAlgorithm,
        # ExtensionNotFound...): whatever is wrong, a fresh set is the cure.
        return False


def _pair_is_current(ca_path: Path, cert_path: Path, key_path: Path, names: Sequence[str]) -> bool:
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc - now < datetime.timedelta(days=RENEW_BEFORE_DAYS):
        return False
    if ca_cert.not_valid_after_utc < cert.not_valid_after_utc:
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if set(san) != set(_general_names(names)):
        return False
    if key.public_key() != cert.public_key():
        return False
    # Raises (ValueError, InvalidSignature) when the certificate does not belong to this
    # CA, e.g. after a crash between two writes of a regeneration.
    cert.verify_directly_issued_by(ca_cert)
    return True


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
