"""sapid: a certificate authority that signs PKCS#10 requests over a Unix socket.

A client sends its certificate signing request with ``PUT /api/csr/<client_id>``; sapid checks it,
runs the operator's hooks (``/etc/sapid/hooks.py``: authorize, presign, postsign), signs it with
the CA key, records it durably and answers JSON whose ``signed_x509_pem`` holds the certificate.
nginx terminates TLS in front of the socket; systemd starts sapid, hands it the socket and the
key's passphrase.

Commands: ``sapid init`` creates a CA identity, ``sapid serve`` runs the daemon, ``sapid sign``
signs one request offline through the same pipeline, ``sapid check`` validates a setup.
See sapid(8), sapid.conf(5) and sapid-hooks(5).
"""

from __future__ import annotations

import argparse
import ast
import base64
import bisect
import collections
import configparser
import contextlib
import ctypes
import dataclasses
import datetime
import difflib
import errno
import functools
import getpass
import grp
import hashlib
import http
import importlib.util
import inspect
import itertools
import ipaddress
import json
import logging
import mmap
import os
import queue
import re
import resource
import secrets
import select
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
import types
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import cryptography

# The first release that releases the GIL while signing, and has every name used below. An
# older one (Debian 12's python3-cryptography is 38) would fail on one of those names with a
# traceback; the one line here is for whoever runs sapid, so it ends the program at import.
CRYPTOGRAPHY_NEEDED = 47
if int(cryptography.__version__.split(".")[0]) < CRYPTOGRAPHY_NEEDED:
    raise SystemExit(f"sapid: error: cryptography {cryptography.__version__} (from "
                     f"{os.path.dirname(cryptography.__file__)}) is too old: sapid needs "
                     f"{CRYPTOGRAPHY_NEEDED} or newer; install sapid in a virtual environment "
                     "(python3 -m venv /opt/sapid && /opt/sapid/bin/pip install .) and run "
                     "its bin/sapid")

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from cryptography.x509.oid import (AuthorityInformationAccessOID, CRLEntryExtensionOID,
                                   ExtendedKeyUsageOID, ExtensionOID, NameOID)

__version__ = "0.1.0"

log = logging.getLogger("sapid")

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

DEFAULT_CONFIG = "/etc/sapid/sapid.conf"
DEFAULT_HOOKS = "/etc/sapid/hooks.py"

# The identity folder's files; ``ca.crt.pem`` is ssl_api's name for the certificate.
KEY_FILE = "ca.private_key.pem"
CERT_FILES = ("ca.cert.pem", "ca.crt.pem")
CHAIN_FILE = "ca.chain.pem"
CSR_FILE = "ca.csr.pem"
PUBLIC_KEY_FILE = "ca.public_key.pem"

# ssl_api's rule for client ids, with an upper bound so a path cannot grow without limit.
CLIENT_ID = re.compile(r"[A-Za-z0-9]{1,128}\Z")

MIN_PASSPHRASE_CHARS = 12
# OWASP's 2023 figure for PBKDF2-HMAC-SHA256; cryptography alone would write 2,048.
KDF_ITERATIONS = 600_000

# RFC 5280 caps serials at 20 octets and they must be positive: 159 bits always fit.
SERIAL_BITS = 159
# A custom serial_number hook that keeps returning used serials must not loop forever.
SERIAL_ATTEMPTS = 8

# nginx's own default for large_client_header_buffers is 4 x 8k; a CSR request needs far less.
MAX_HEAD_BYTES = 16384
# Connections held open at once (idle ones cost a few hundred bytes, no thread).
MAX_CONNECTIONS = 4096
LISTEN_BACKLOG = 1024

# Content-Types a CSR may come with; curl's default for -d/-T is form-urlencoded.
CSR_MEDIA_TYPES = frozenset({
    "application/pkcs10", "application/x-pem-file", "application/octet-stream", "text/plain",
    "application/x-www-form-urlencoded",
})

# Headers set by a TLS-terminating proxy; hooks see them only when the proxy is trusted.
PROXY_HEADER_PREFIXES = ("x-forwarded-", "x-ssl-client", "x-real-ip", "forwarded")

KEY_TYPES = ("p256", "p384", "rsa2048", "rsa3072", "rsa4096", "ed25519")

# X.509 name attributes by the short names openssl and ssl_api's ``-f FIELD VALUE`` use.
NAME_FIELDS = {
    "C": NameOID.COUNTRY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME, "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME, "emailAddress": NameOID.EMAIL_ADDRESS,
    "serialNumber": NameOID.SERIAL_NUMBER, "DC": NameOID.DOMAIN_COMPONENT,
    "street": NameOID.STREET_ADDRESS, "title": NameOID.TITLE, "GN": NameOID.GIVEN_NAME,
    "SN": NameOID.SURNAME, "initials": NameOID.INITIALS, "pseudonym": NameOID.PSEUDONYM,
    "UID": NameOID.USER_ID, "postalCode": NameOID.POSTAL_CODE,
    "dnQualifier": NameOID.DN_QUALIFIER, "businessCategory": NameOID.BUSINESS_CATEGORY,
    "organizationIdentifier": NameOID.ORGANIZATION_IDENTIFIER,
}

# The only general names a CSR may ask for; the rest (otherName, directoryName, ...) are refused.
SAN_TYPES = (x509.DNSName, x509.IPAddress, x509.RFC822Name, x509.UniformResourceIdentifier)
EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


# ---------------------------------------------------------------------------------------------
# Errors: turned into responses by SigningHandler and into one line by main(), nowhere else.
# ---------------------------------------------------------------------------------------------

class SapidError(Exception):
    """Anything sapid refuses, with a message meant for a person."""


class ConfigError(SapidError):
    """A configuration, identity, passphrase or hooks file that sapid cannot work with."""


class HookError(SapidError):
    """An operator's hook failed; the client learns no detail."""


class StoreError(SapidError):
    """A certificate could not be made durable; it is not returned."""


class RequestError(SapidError):
    """A request refused with an HTTP status and one of the API's error codes."""

    def __init__(self, status: int, code: str, message: str, headers: tuple = ()):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers
        self.path = None        # the request's, once known: OCSP clients get OCSP errors


class NotAuthorized(SapidError):
    """Raised by a hook to refuse a request: 403 with this message."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

def _yes_no(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"expected yes or no, not {value!r}")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (systemd's ``CPUAffinity=``, a
    container's cpuset), less what a cgroup v2 quota (``CPUQuota=``) leaves; 1 to 64."""
    cores = len(os.sched_getaffinity(0))
    try:
        with open("/proc/self/cgroup", encoding="ascii") as file:
            group = next(line[3:].strip() for line in file if line.startswith("0::"))
        with open(f"/sys/fs/cgroup{group}/cpu.max", encoding="ascii") as file:
            quota, period = file.read().split()
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, StopIteration, ValueError):
        pass        # no cgroup v2, or no quota: the affinity alone
    return max(1, min(cores, 64))


def _workers(value: str) -> int:
    if value == "auto":
        return usable_cores()
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise ValueError(f"expected 1 to 64 processes, or auto (one per core), not {value!r}")
    return int(value)


def _bounded(kind, low, high):
    def parse(value: str):
        number = kind(value)
        if not low <= number <= high:
            raise ValueError(f"{value!r} is outside {low}..{high}")
        return number
    return parse


def _http_url(value: str) -> str:
    """An http(s) URL with a host, to go into issued certificates (crl_url, ocsp_url)."""
    if not value:
        return value
    if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(/[\x21-\x7e]*)?", value):
        raise ValueError(f"{value!r}: an http:// (or https://) URL with a host name, no spaces")
    return value


def _store_uri(value: str) -> str:
    if value and not value.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"{value!r}: a postgresql:// URI, or unset for SQLite in the state "
                         "folder")
    return value


# key -> parser; the order is that of sapid.conf(5).
CONFIG_KEYS = {
    "identity": str,
    "state": str,
    "hooks": str,
    "socket": str,
    "validity_days": _bounded(int, 1, 36500),
    "backdate_seconds": _bounded(int, 0, 86400),
    "max_request_bytes": _bounded(int, 1024, 16 * 1024 * 1024),
    "request_timeout": _bounded(float, 0.1, 3600),
    "max_threads": _bounded(int, 1, 1024),
    "workers": _workers,
    "hook_timeout": _bounded(float, 0.1, 3600),
    "trusted_proxy": _yes_no,
    "strict_files": _yes_no,
    "store": _store_uri,
    "crl_url": _http_url,
    "ocsp_url": _http_url,
    "crl_days": _bounded(int, 1, 366),
}
PATH_KEYS = ("identity", "state", "hooks", "socket")


@dataclasses.dataclass(frozen=True)
class Config:
    """sapid.conf, section ``[sapid]``; see sapid.conf(5)."""

    path: str | None = None
    identity: str = "/etc/sapid/identity"
    state: str = "/var/lib/sapid"
    hooks: str | None = None        # None: unset; "": built-in hooks
    socket: str = "/run/sapid/sapid.sock"
    validity_days: int = 365
    backdate_seconds: int = 300
    max_request_bytes: int = 65536
    request_timeout: float = 10.0
    max_threads: int = 32
    workers: int = 1
    hook_timeout: float = 30.0
    trusted_proxy: bool = False
    strict_files: bool = True
    store: str = ""                 # "": SQLite in ``state``; or a postgresql:// URI
    crl_url: str = ""               # put as CRL distribution point into issued certificates
    ocsp_url: str = ""              # put as AIA OCSP entry into issued certificates
    crl_days: int = 7               # a CRL's nextUpdate: thisUpdate + crl_days

    @classmethod
    def load(cls, path: str | None = None) -> Config:
        """Read ``path``, else ``$SAPID_CONFIG``, else /etc/sapid/sapid.conf if it exists."""
        explicit = path or os.environ.get("SAPID_CONFIG")
        path = explicit or DEFAULT_CONFIG
        parser = configparser.ConfigParser(interpolation=None, default_section="\0")
        parser.optionxform = str
        try:
            with open(path, encoding="utf-8") as file:
                parser.read_file(file)
        except FileNotFoundError:
            if explicit:
                raise ConfigError(f"{path}: no such configuration file") from None
            return cls()
        except (OSError, UnicodeDecodeError, configparser.Error) as e:
            raise ConfigError(f"{path}: {_one_line(e)}") from None
        extra = [s for s in parser.sections() if s != "sapid"]
        if extra:
            raise ConfigError(f"{path}: unknown section [{extra[0]}]; sapid reads [sapid] only")
        values = {"path": os.path.abspath(path)}
        base = os.path.dirname(os.path.abspath(path))
        for key, raw in (parser["sapid"].items() if parser.has_section("sapid") else ()):
            if key not in CONFIG_KEYS:
                near = difflib.get_close_matches(key, CONFIG_KEYS, 1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise ConfigError(f"{path}: unknown key {key!r}{hint}")
            try:
                value = CONFIG_KEYS[key](raw.strip())
            except ValueError as e:
                raise ConfigError(f"{path}: {key}: {e}") from None
            if key in PATH_KEYS and value:
                value = os.path.join(base, value)   # relative paths: from the file's folder
            values[key] = value
        return cls(**values)

    def hooks_path(self) -> str | None:
        """The hooks file to load, or None for the built-in hooks."""
        if self.hooks is None:
            return DEFAULT_HOOKS if os.path.exists(DEFAULT_HOOKS) else None
        return self.hooks or None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ---------------------------------------------------------------------------------------------
# Passphrase and secrets
# ---------------------------------------------------------------------------------------------

PR_SET_DUMPABLE = 4


def disable_core_dumps() -> None:
    """Keep the CA key out of core dumps and away from ptrace by other processes of our user."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError):
        log.warning("could not set RLIMIT_CORE to 0")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("could not clear the dumpable flag; core dumps are still off")


def _strip_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def read_passphrase(*, confirm: bool = False, interactive: bool = True) -> str | None:
    """The CA key's passphrase from the first source that has one (see sapid(8)).

    ``$CA_PASSPHRASE`` leaves the environment whichever source wins.  Non-interactive callers
    get None when only a terminal or systemd-ask-password could answer.
    """
    from_env = os.environ.pop("CA_PASSPHRASE", None)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        try:
            with open(os.path.join(credentials, "passphrase"), "rb") as file:
                return _strip_newline(file.read().decode("utf-8"))
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"credential 'passphrase': {_one_line(e)}") from None
    if from_env is not None:
        try:
            from_env.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError("$CA_PASSPHRASE is not valid UTF-8") from None
        return _strip_newline(from_env)
    if not interactive:
        return None
    if sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass("CA key passphrase: ")
        if confirm and getpass.getpass("Again: ") != first:
            raise ConfigError("the two passphrases differ")
        return first
    if os.environ.get("INVOCATION_ID") and not confirm:
        try:
            done = subprocess.run(
                ["systemd-ask-password", "--no-tty", "--id=sapid:passphrase",
                 "Passphrase for the sapid CA key:"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=300, check=True)
            return _strip_newline(done.stdout.decode("utf-8"))
        except (OSError, subprocess.SubprocessError, UnicodeDecodeError) as e:
            log.warning("systemd-ask-password gave no passphrase: %s", _one_line(e))
    raise ConfigError(
        "no passphrase for the CA key: provide the systemd credential 'passphrase' "
        "($CREDENTIALS_DIRECTORY), set $CA_PASSPHRASE, run on a terminal, "
        "or run under systemd where systemd-ask-password can ask")


# ---------------------------------------------------------------------------------------------
# DER: just enough to write and inspect PBES2-encrypted PKCS#8 keys.
# ---------------------------------------------------------------------------------------------

OID_PBES2 = "1.2.840.113549.1.5.13"
OID_PBKDF2 = "1.2.840.113549.1.5.12"
OID_HMAC_SHA256 = "1.2.840.113549.2.9"
STRONG_PRFS = (OID_HMAC_SHA256, "1.2.840.113549.2.10", "1.2.840.113549.2.11")  # SHA-256/384/512
OID_AES256_CBC = "2.16.840.1.101.3.4.1.42"


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(octets))) + octets + content


def _der_oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray((40 * arcs[0] + arcs[1],))
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        body.extend(reversed(chunk))
    return _der(0x06, bytes(body))


def _der_seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def _der_read(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the element at ``pos``."""
    tag, size = data[pos], data[pos + 1]
    pos += 2
    if size & 0x80:
        count = size & 0x7F
        size = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + size > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + size


def encrypt_private_key(key, passphrase: str) -> bytes:
    """PEM ``ENCRYPTED PRIVATE KEY``: PBES2, PBKDF2-HMAC-SHA256 x 600,000, AES-256-CBC.

    cryptography's BestAvailableEncryption uses 2,048 iterations and offers no knob for
    PKCS#8, so the EncryptedPrivateKeyInfo is built here (RFC 8018 appendix A.4, C).
    """
    plain = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    salt, iv = os.urandom(16), os.urandom(16)
    kek = PBKDF2HMAC(hashes.SHA256(), 32, salt, KDF_ITERATIONS).derive(passphrase.encode())
    padder = sym_padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(kek), modes.CBC(iv)).encryptor()
    sealed = encryptor.update(padder.update(plain) + padder.finalize()) + encryptor.finalize()
    kdf = _der_seq(_der_oid(OID_PBKDF2), _der_seq(
        _der(0x04, salt), _der(0x02, KDF_ITERATIONS.to_bytes(3, "big")),
        _der_seq(_der_oid(OID_HMAC_SHA256), b"\x05\x00")))
    scheme = _der_seq(_der_oid(OID_AES256_CBC), _der(0x04, iv))
    der = _der_seq(_der_seq(_der_oid(OID_PBES2), _der_seq(kdf, scheme)), _der(0x04, sealed))
    return _pem("ENCRYPTED PRIVATE KEY", der)


def _pem(label: str, der: bytes) -> bytes:
    body = base64.b64encode(der)
    lines = b"\n".join([body[i:i + 64] for i in range(0, len(body), 64)])
    return b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label.encode(), lines,
                                                             label.encode())


def key_protection(pem: bytes) -> str | None:
    """Why an encrypted key's KDF is weaker than DESIGN asks, or None when it is fine."""
    if b"Proc-Type: 4,ENCRYPTED" in pem:
        return "uses OpenSSL's legacy key derivation (one MD5 round)"
    try:
        body = pem.split(b"-----BEGIN ENCRYPTED PRIVATE KEY-----", 1)[1].split(b"-----END", 1)[0]
        data = base64.b64decode(body)
        _, pos, _ = _der_read(data, 0)             # EncryptedPrivateKeyInfo
        _, pos, _ = _der_read(data, pos)           # AlgorithmIdentifier
        _, start, end = _der_read(data, pos)       # OID
        if data[start - 2:end] != _der_oid(OID_PBES2):
            return "is not PBES2-encrypted"
        _, pos, _ = _der_read(data, end)           # PBES2-params
        _, pos, _ = _der_read(data, pos)           # keyDerivationFunc
        _, start, end = _der_read(data, pos)
        if data[start - 2:end] != _der_oid(OID_PBKDF2):
            return None                            # scrypt: fine
        _, pos, params_end = _der_read(data, end)  # PBKDF2-params
        _, _, salt_end = _der_read(data, pos)
        _, start, end = _der_read(data, salt_end)
        rounds = int.from_bytes(data[start:end], "big")
        pos, prf = end, None                       # None: HMAC-SHA1, the default
        if pos < params_end and data[pos] == 0x02:
            pos = _der_read(data, pos)[2]          # optional keyLength
        if pos < params_end:
            _, inner, _ = _der_read(data, pos)     # prf AlgorithmIdentifier
            _, start, end = _der_read(data, inner)
            prf = data[start - 2:end]
    except (IndexError, ValueError):
        return None
    if rounds < KDF_ITERATIONS:
        return f"uses {rounds:,} PBKDF2 iterations"
    if prf not in {_der_oid(oid) for oid in STRONG_PRFS}:
        return "uses PBKDF2 with HMAC-SHA1"
    return None


# ---------------------------------------------------------------------------------------------
# X.509 helpers
# ---------------------------------------------------------------------------------------------

def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def serial_hex(serial: int) -> str:
    """Upper-case hex of even length, as ``openssl x509 -serial`` prints it."""
    text = format(serial, "X")
    return "0" + text if len(text) % 2 else text


def iso_time(moment: datetime.datetime) -> str:
    m = moment.astimezone(datetime.timezone.utc)
    return f"{m.year:04}-{m.month:02}-{m.day:02}T{m.hour:02}:{m.minute:02}:{m.second:02}Z"


def signature_hash(key):
    """The hash a CA key signs with: SHA-256, SHA-384 for P-384, SHA-512 for P-521, none for EdDSA."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {384: hashes.SHA384(), 521: hashes.SHA512()}.get(key.curve.key_size,
                                                               hashes.SHA256())
    return hashes.SHA256()


# RFC 5280 4.1.2.5: validity dates through 2049 are UTCTime, whose years start at 1950.
EARLIEST_TIME = datetime.datetime(1950, 1, 1, tzinfo=datetime.timezone.utc)


def check_ca_key(key) -> None:
    """ValueError for a CA key that cannot sign certificates here (DSA, X25519, ...)."""
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey,
                            ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        raise ValueError(f"a {key_description(key.public_key())} key cannot sign certificates "
                         "here: the CA key must be RSA, EC, Ed25519 or Ed448")


def generate_key(kind: str):
    if kind.startswith("rsa"):
        return rsa.generate_private_key(65537, int(kind[3:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key({"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[kind])


def spki_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def random_serial() -> int:
    """159 random bits: far more than the 64 that CA/Browser Forum rules ask for."""
    while not (serial := secrets.randbits(SERIAL_BITS)):
        pass
    return serial


def key_description(public_key) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    return type(public_key).__name__.replace("PublicKey", "").lstrip("_")


def check_csr_key(public_key) -> None:
    """The key policy of DESIGN: strong RSA, the NIST curves, EdDSA; anything else is 400."""
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        if not 2048 <= public_key.key_size <= 16384:
            raise RequestError(400, "key_refused",
                               f"RSA-{public_key.key_size} key refused: 2048 to 16384 bits")
        if numbers.e < 65537 or not numbers.e % 2:
            raise RequestError(400, "key_refused",
                               f"RSA public exponent {numbers.e} refused: odd and >= 65537")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, EC_CURVES):
            raise RequestError(400, "key_refused",
                               f"curve {public_key.curve.name} refused: P-256, P-384 or P-521")
    elif not isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        raise RequestError(400, "key_refused", f"{key_description(public_key)} key refused: "
                           "RSA, EC P-256/P-384/P-521, Ed25519 or Ed448")


# RFC 7468 3: an encapsulation boundary, "-----BEGIN " label "-----", where the label is
# printable ASCII but "-", single spaces or hyphens between.  Found anywhere: RFC 7468 2 lets
# explanatory text stand before and after the block (``openssl req -text`` writes it).
PEM_BEGIN = re.compile(rb"-----BEGIN ((?:[!-,.-~](?:[- ]?[!-,.-~])*)?)-----")
# RFC 7468 7; openssl and ssl_api's clients also write the older NEW CERTIFICATE REQUEST.
CSR_LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
# What other labels hold, for a message that says what was sent instead.
PEM_KINDS = {b"CERTIFICATE": "a certificate", b"X509 CRL": "a CRL",
             b"PRIVATE KEY": "a private key", b"ENCRYPTED PRIVATE KEY": "a private key",
             b"RSA PRIVATE KEY": "a private key", b"EC PRIVATE KEY": "a private key",
             b"PUBLIC KEY": "a public key", b"PKCS7": "a PKCS#7 bundle"}


def parse_csr(body: bytes) -> x509.CertificateSigningRequest:
    """A CSR from PEM (with any explanatory text around the block) or DER, told apart by
    content.  Every refusal says in words what is wrong; the parser's own words go to the log."""
    if not body.strip():
        raise RequestError(400, "not_a_csr", "empty body: send a PKCS#10 CSR in PEM or DER")
    begins = list(PEM_BEGIN.finditer(body))
    if not begins:
        return _parse_csr_der(body, "")
    if len(begins) > 1:
        raise _not_a_csr(f"the body holds {len(begins)} PEM blocks: send one CSR")
    label, start = begins[0][1], begins[0].end()
    if label not in CSR_LABELS:
        kind = PEM_KINDS.get(label, f"a PEM block labelled {label[:40].decode()!r}")
        raise _not_a_csr(f"{kind}, not a certificate request: send the CSR "
                         "(-----BEGIN CERTIFICATE REQUEST-----)")
    end = body.find(b"-----END " + label + b"-----", start)
    if end < 0:
        raise _not_a_csr("truncated PEM: the block has no END line")
    try:
        der = base64.b64decode(b"".join(body[start:end].split()), validate=True)
    except ValueError:
        raise _not_a_csr("the PEM block's base64 is broken") from None
    return _parse_csr_der(der, "the PEM block: ")


def _not_a_csr(message: str) -> RequestError:
    return RequestError(400, "not_a_csr", f"not a PKCS#10 CSR: {message}")


def _parse_csr_der(der: bytes, where: str) -> x509.CertificateSigningRequest:
    if der[:1] != b"\x30":
        raise _not_a_csr(f"{where}not DER" if where else "neither PEM (no -----BEGIN line) "
                         "nor DER")
    if der[1:2] == b"\x80":
        raise _not_a_csr(f"{where}BER with an indefinite length, not DER")
    try:
        _, _, end = _der_read(der, 0)
    except IndexError:
        raise _not_a_csr(f"{where}truncated DER: the body ends inside its first tag") from None
    except ValueError:
        raise _not_a_csr(f"{where}truncated DER: shorter than its own length says") from None
    if end != len(der):
        raise _not_a_csr(f"{where}{len(der) - end} bytes after the end of the DER")
    try:
        return x509.load_der_x509_csr(der)
    except (ValueError, x509.InvalidVersion) as e:      # InvalidVersion is no ValueError
        detail = _one_line(e)
    try:
        x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        log.info("a CSR refused as malformed: %s", detail)
        raise _not_a_csr(f"{where}its DER is not a CertificationRequest (RFC 2986)") from None
    raise _not_a_csr(f"{where}a certificate, not a certificate request: send the CSR")


EXTENSION_REQUEST_OIDS = (_der_oid("1.2.840.113549.1.9.14"), _der_oid("1.3.6.1.4.1.311.2.1.14"))


def _csr_parts(csr) -> tuple[bytes, list]:
    """The CSR's SubjectPublicKeyInfo as sent, and the OIDs (DER) of its attributes."""
    data = csr.tbs_certrequest_bytes
    _, pos, end = _der_read(data, 0)
    _, _, pos = _der_read(data, pos)              # version
    _, _, pos = _der_read(data, pos)              # subject
    _, _, spki_end = _der_read(data, pos)
    spki, pos = data[pos:spki_end], spki_end
    oids = []
    if pos < end:
        _, pos, end = _der_read(data, pos)        # [0] attributes
        while pos < end:
            _, start, pos = _der_read(data, pos)
            _, _, oid_end = _der_read(data, start)
            oids.append(data[start:oid_end])
    return spki, oids


def _names_its_curve(spki: bytes) -> bool:
    _, pos, _ = _der_read(spki, 0)
    _, pos, end = _der_read(spki, pos)            # AlgorithmIdentifier
    _, _, pos = _der_read(spki, pos)              # id-ecPublicKey
    return pos < end and spki[pos] == 0x06        # namedCurve: an OID


@dataclasses.dataclass(frozen=True)
class CheckedCSR:
    """A CSR that passed the policy, with what the pipeline takes from it."""

    csr: x509.CertificateSigningRequest
    public_key: object
    subject: x509.Name
    subject_alt_names: tuple
    spki: bytes


EDDSA_SIGNATURES = {ed25519.Ed25519PublicKey: x509.SignatureAlgorithmOID.ED25519,
                    ed448.Ed448PublicKey: x509.SignatureAlgorithmOID.ED448}


def _signed_by(csr: x509.CertificateSigningRequest, public_key) -> bool:
    """``csr.is_signature_valid`` with the key already loaded (that property loads it again),
    the signature algorithm the CSR names being one for that key."""
    parameters, data, signature = (csr.signature_algorithm_parameters,
                                   csr.tbs_certrequest_bytes, csr.signature)
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            if not isinstance(parameters, (asym_padding.PKCS1v15, asym_padding.PSS)):
                return False
            public_key.verify(signature, data, parameters, csr.signature_hash_algorithm)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(parameters, ec.ECDSA):
                return False
            public_key.verify(signature, data, parameters)
        else:
            for kind, oid in EDDSA_SIGNATURES.items():
                if isinstance(public_key, kind):
                    if csr.signature_algorithm_oid != oid:
                        return False
                    public_key.verify(signature, data)
                    break
            else:
                return False
    except InvalidSignature:
        return False
    return True


def check_csr(csr: x509.CertificateSigningRequest) -> CheckedCSR:
    """Proof of possession, signature hash, key and name policy; RequestError otherwise."""
    try:
        digest = csr.signature_hash_algorithm
    except UnsupportedAlgorithm as e:
        raise RequestError(400, "bad_csr_signature",
                           f"unsupported CSR signature algorithm: {_one_line(e)}") from None
    if isinstance(digest, (hashes.MD5, hashes.SHA1)):
        raise RequestError(400, "weak_csr_signature",
                           f"CSR signed with {digest.name.upper()}: sign it with SHA-256 or better")
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise RequestError(400, "key_refused", f"CSR key refused: {_one_line(e)}") from None
    check_csr_key(public_key)
    try:
        spki, attribute_oids = _csr_parts(csr)
    except (IndexError, ValueError):
        raise RequestError(400, "not_a_csr", "the CSR's structure cannot be read") from None
    if isinstance(public_key, ec.EllipticCurvePublicKey) and not _names_its_curve(spki):
        raise RequestError(400, "key_refused", "EC key with explicit curve parameters refused: "
                           "the key must name its curve (RFC 5480)")
    if sum(oid in EXTENSION_REQUEST_OIDS for oid in attribute_oids) > 1:
        raise RequestError(400, "not_a_csr", "CSR has more than one extensionRequest attribute")
    try:
        valid = _signed_by(csr, public_key)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise RequestError(400, "bad_csr_signature", f"CSR signature: {_one_line(e)}") from None
    if not valid:
        raise RequestError(400, "bad_csr_signature",
                           "the CSR's signature does not verify with its own key")
    try:
        subject = csr.subject
        for attribute in subject:
            attribute.value  # noqa: B018 -- decodes it, raising on a broken string
        extensions = csr.extensions
        try:
            names = tuple(extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            names = ()
    except x509.DuplicateExtension as e:
        raise RequestError(400, "not_a_csr", f"CSR has a duplicate extension {e.oid.dotted_string}"
                           ) from None
    except (ValueError, UnicodeError, KeyError, TypeError) as e:
        # cryptography: KeyError for a name value of an unexpected ASN.1 type or an unknown
        # TLS feature, TypeError for a BIT STRING value outside x500UniqueIdentifier.
        raise RequestError(400, "name_refused", f"CSR names cannot be read: {_one_line(e)}"
                           ) from None
    for name in names:
        if not isinstance(name, SAN_TYPES):
            raise RequestError(400, "name_refused", f"subjectAltName {type(name).__name__} "
                               "refused: DNS, IP, email and URI only")
        if isinstance(name, x509.IPAddress) and not isinstance(
                name.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            raise RequestError(400, "name_refused", f"subjectAltName IP {name.value} refused: "
                               "an address of 4 or 16 octets, not a network")
    if not len(subject) and not names:
        raise RequestError(400, "name_refused", "the CSR has neither a subject nor a subjectAltName")
    return CheckedCSR(csr, public_key, subject, names, spki)


def subject_text(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except (ValueError, UnicodeError):
        return "(unreadable)"


# ---------------------------------------------------------------------------------------------
# systemd: sd_notify and socket activation, implemented here (no libsystemd needed)
# ---------------------------------------------------------------------------------------------

SD_LISTEN_FDS_START = 3


def sd_notify(message: str) -> bool:
    """Send ``message`` to $NOTIFY_SOCKET; a no-op outside systemd and never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except (OSError, UnicodeError):
        return False


def listen_fds() -> list[tuple[int, str]]:
    """Sockets passed by systemd as (fd, name), trusted only when LISTEN_PID is ours."""
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    fds = []
    for index in range(max(count, 0)):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        fds.append((fd, names[index] if index < len(names) else "unknown"))
    return fds


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ---------------------------------------------------------------------------------------------
# Hooks: the operator's file overrides these documented no-ops.
# ---------------------------------------------------------------------------------------------

class SigningHooks:
    """One instance per request; subclass it as ``Hooks`` in the hooks file (sapid-hooks(5)).

    Before ``authorize`` sapid sets: ``client_id`` (alias ``client_hash``), ``public_key_hash``
    (lower-case hex SHA-1 of the CSR's DER SubjectPublicKeyInfo), ``csr``, ``csr_pem``, ``peer``
    ((pid, uid, gid) of the socket peer, None over TCP), ``headers`` (read-only,
    case-insensitive; proxy headers only with ``trusted_proxy = yes``) and ``est`` (a
    ``sapid.Est`` when the request came by EST, else None).
    """

    def __init__(self, client_hash=None, public_key_hash=None, csr_tuple=None):
        # ssl_api's factory call shape: (client_hash, public_key_hash, CsrTuple(csr_m, csr_o,
        # csr_pem)); sapid passes its CSR as csr_m and csr_o.
        self.client_id = client_hash
        self.public_key_hash = public_key_hash
        self._csr_tuple = csr_tuple
        self.csr, self.csr_pem = (csr_tuple.csr_m, csr_tuple.csr_pem) if csr_tuple else (
            None, None)
        self.peer = self.est = None
        self.headers = Headers({})

    @property
    def client_hash(self):
        return self.client_id

    @client_hash.setter
    def client_hash(self, value):
        self.client_id = value

    def authorize(self, subject_alt_names):
        """Decide: None (default validity), a timedelta, or False / raise NotAuthorized."""
        return None

    def presign(self, draft):
        """Edit the ``Draft`` in place before it is signed."""

    def postsign(self, certificate):
        """See the signed certificate (already recorded); raising withholds it."""

    def authorize_revocation(self, certificate, reason):
        """Decide a ``POST /api/revoke/<client_id>``: True revokes ``certificate`` (an
        x509.Certificate; ``self.record`` is its sapid.Record, with the client id it was
        issued to) for ``reason`` (an RFC 5280 name, e.g. "keyCompromise").  Anything else,
        or raising NotAuthorized, refuses (403).  The built-in hook refuses every request:
        revoke with ``sapid revoke`` or write this hook."""
        return False


def boot(authority):
    """Called at each (re)load with the CA's public side; raising refuses the load."""


def serial_number():
    """A serial for a new certificate: int in 1 .. 2**159-1 with >= 64 random bits."""
    return random_serial()


@dataclasses.dataclass
class Draft:
    """The certificate before signing, as ``presign`` sees and edits it."""

    subject: x509.Name
    public_key: object
    serial_number: int
    not_valid_before: datetime.datetime
    not_valid_after: datetime.datetime
    extensions: dict

    def add_extension(self, value: x509.ExtensionType, critical: bool) -> None:
        """Add ``value``, replacing an extension with the same OID."""
        self.extensions[value.oid] = x509.Extension(value.oid, critical, value)

    def remove_extension(self, oid: x509.ObjectIdentifier) -> None:
        self.extensions.pop(oid, None)


class Headers(Mapping):
    """Request headers for hooks: read-only, names case-insensitive."""

    __slots__ = ("_items",)

    def __init__(self, items: dict):
        self._items = items        # lower-case name -> value

    def __getitem__(self, name):
        return self._items[name.lower()]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        # A hook that logs its headers must not log the password of an HTTP Basic client.
        shown = {k: "(hidden)" if k == "authorization" else v for k, v in self._items.items()}
        return f"Headers({shown!r})"


@dataclasses.dataclass(frozen=True)
class AuthorityInfo:
    """What ``boot`` sees of the CA: its certificate, chain and configuration, never the key."""

    certificate: x509.Certificate
    chain: tuple
    config: Config


HOOK_METHODS = {"authorize": 1, "presign": 1, "postsign": 1, "authorize_revocation": 2}
# The hooks that run for a signing (authorize_revocation runs for revocations alone).
SIGNING_HOOKS = frozenset({"__init__", "authorize", "presign", "postsign", "serial_number"})
HOOK_FUNCTIONS = {"boot": 1, "serial_number": 0}
SSL_API_NAMES = {"API_CSR_HOOKS_FACTORY": 3, "HOOKS_FACTORY": 3, "CUSTOM_BOOT_CB": 0,
                 "SERIAL_NUMBER_GENERATOR_CB": 0}
KNOWN_TOP_LEVEL = {"Hooks", *HOOK_FUNCTIONS, *SSL_API_NAMES}


@dataclasses.dataclass(frozen=True)
class HookSet:
    """The hooks in force: a per-request factory and the module-level functions."""

    path: str | None
    factory: object
    boot: object
    serial_number: object
    # Which phases run operator code: phases that do not are called inline, without a timeout.
    custom: frozenset

    def new(self, client_id, public_key_hash, csr, csr_pem):
        instance = self.factory(client_id, public_key_hash, CsrTuple(csr, csr, csr_pem))
        if not isinstance(instance, SigningHooks):
            raise HookError(f"the hooks factory returned {type(instance).__name__}, "
                            "not a sapid.SigningHooks")
        instance.client_id, instance.public_key_hash = client_id, public_key_hash
        instance.csr, instance.csr_pem = csr, csr_pem
        return instance

    def draw_serial(self) -> int:
        return normalize_serial(self.serial_number())


BUILTIN_HOOKS = HookSet(None, SigningHooks, boot, serial_number, frozenset())


def normalize_serial(value) -> int:
    """An int, or ssl_api's hex string; >= 2**159 is masked to 159 bits as ssl_api's default needs."""
    if isinstance(value, str):
        try:
            value = int(value, 16)
        except ValueError:
            raise HookError(f"serial_number returned {value!r}, not hex") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise HookError(f"serial_number returned {type(value).__name__}, not an int")
    if value >= 1 << SERIAL_BITS:
        value &= (1 << SERIAL_BITS) - 1
    if value < 1:
        raise HookError(f"serial_number returned {value}, not in 1 .. 2**159-1")
    return value


# ssl_api's names, for its hooks to run unchanged ---------------------------------------------

SSL_API_SAN_LABELS = {x509.DNSName: "DNS", x509.IPAddress: "IP Address", x509.RFC822Name: "email",
                      x509.UniformResourceIdentifier: "URI"}
CsrTuple = collections.namedtuple("CsrTuple", ["csr_m", "csr_o", "csr_pem"])


class SigningHooksBase(SigningHooks):
    """ssl_api's ``sapi.config.api.signing_hooks_base.SigningHooksBase``, for hooks written
    against it: ``authorize`` gets ssl_api's lists (see ``ssl_api_names``), ``presign`` and
    ``postsign`` a small M2Crypto-like certificate (``M2Certificate``), ``csr_tuple`` has
    ``csr_pem``.  Its authorize signs for the configured validity, as ssl_api's one year."""

    ssl_api_shapes = True

    def authorize(self, subject_alt_name_exts):
        """None: the configured validity (ssl_api's default was a year)."""
        return None

    def presign(self, certificate):
        """An M2Certificate over the draft, before signing."""

    def postsign(self, signed_certificate):
        """An M2Certificate over the signed certificate."""

    @property
    def public_key_hash(self):
        return self._public_key_hash

    @public_key_hash.setter
    def public_key_hash(self, value):
        self._public_key_hash = value

    @property
    def csr_tuple(self):
        return self._csr_tuple


def ssl_api_names(names) -> list:
    """ssl_api's ``authorize`` argument: each subjectAltName extension as openssl prints it,
    split into [type, value] pairs: [[['DNS', 'a.example'], ['IP Address', '10.0.0.1']]]."""
    if not names:
        return []
    return [[[SSL_API_SAN_LABELS[type(name)], str(name.value)] for name in names]]


class M2Extension:
    """What ``M2Crypto.X509.new_extension(name, value, critical)`` made."""

    def __init__(self, name: str, value: str, critical: int = 0):
        self.name, self.value, self.critical = name, value, critical

    def get_name(self) -> str:
        return self.name

    def get_value(self) -> str:
        return self.value

    def get_critical(self) -> int:
        return self.critical

    def set_critical(self, critical: int = 1) -> None:
        self.critical = critical


# M2Crypto's names of the calls sapid's certificate stand-in has no answer for, with what to
# write instead.
M2_EQUIVALENTS = {
    "set_subject": "draft.subject = x509.Name(...)",
    "set_issuer": "nothing: the issuer is the CA's subject",
    "set_pubkey": "nothing: the key is the CSR's",
    "set_not_before": "draft.not_valid_before = datetime",
    "set_not_after": "draft.not_valid_after = datetime, or return a timedelta from authorize",
    "sign": "nothing: sapid signs after presign",
    "get_pubkey": "self.csr.public_key() (a cryptography key), or self.public_key_hash",
    "get_not_before": "draft.not_valid_before, or certificate.not_valid_before_utc",
    "get_not_after": "draft.not_valid_after, or certificate.not_valid_after_utc",
}


class M2Unsupported(HookError, AttributeError):
    """An M2Crypto call the stand-in does not provide (an AttributeError too, so that
    ``hasattr`` and ``getattr(..., default)`` work as on the real object)."""


class M2Certificate:
    """The M2Crypto.X509.X509 calls ssl_api's README names, over the sapid.Draft that presign
    edits or the certificate postsign sees: add_ext, set_version, get_version,
    get_serial_number, set_serial_number, get_subject, get_issuer, get_fingerprint, as_pem,
    as_der.  Any other call fails with its name and what to write in sapid instead."""

    def __init__(self, draft: Draft | None = None, certificate: x509.Certificate | None = None):
        self._draft, self._certificate = draft, certificate

    def add_ext(self, extension) -> int:
        if self._draft is None:
            raise HookError("M2Crypto X509.add_ext in postsign: the certificate is signed "
                            "already; add extensions in presign")
        value, critical = extension.get_value(), bool(extension.get_critical())
        if value.startswith("critical,"):          # openssl's spelling of the flag
            value, critical = value[len("critical,"):], True
        self._draft.add_extension(openssl_extension(extension.get_name(), value), critical)
        return 1

    def set_version(self, version: int) -> int:
        if version != 2:
            raise HookError(f"M2Crypto X509.set_version({version}): sapid issues X.509 v3 "
                            "(version 2) only")
        return 1

    def get_version(self) -> int:
        return 2

    def get_serial_number(self) -> int:
        return (self._draft.serial_number if self._draft is not None
                else self._certificate.serial_number)

    def set_serial_number(self, serial: int) -> int:
        if self._draft is None:
            raise HookError("M2Crypto X509.set_serial_number in postsign: set it in presign")
        self._draft.serial_number = serial
        return 1

    def get_subject(self) -> M2Name:
        return M2Name(self._draft.subject if self._draft is not None
                      else self._certificate.subject)

    def get_issuer(self) -> M2Name:
        if self._certificate is None:
            raise HookError("M2Crypto X509.get_issuer in presign: the issuer is the CA's "
                            "subject, authority.certificate.subject in boot")
        return M2Name(self._certificate.issuer)

    def _signed(self, call: str) -> x509.Certificate:
        if self._certificate is None:
            raise HookError(f"M2Crypto X509.{call} in presign: the certificate is not signed "
                            "yet; call it in postsign")
        return self._certificate

    def get_fingerprint(self, md: str = "md5") -> str:
        algorithm = {"md5": hashes.MD5, "sha1": hashes.SHA1, "sha256": hashes.SHA256,
                     "sha384": hashes.SHA384, "sha512": hashes.SHA512}.get(md)
        if algorithm is None:
            raise HookError(f"M2Crypto X509.get_fingerprint({md!r}): md5, sha1 or sha2 names")
        return self._signed("get_fingerprint").fingerprint(algorithm()).hex().upper()

    def as_pem(self) -> bytes:
        return self._signed("as_pem").public_bytes(serialization.Encoding.PEM)

    def as_der(self) -> bytes:
        return self._signed("as_der").public_bytes(serialization.Encoding.DER)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        instead = M2_EQUIVALENTS.get(name, "derive the hooks class from sapid.SigningHooks: "
                                     "presign then gets a sapid.Draft, postsign an "
                                     "x509.Certificate")
        raise M2Unsupported(f"M2Crypto X509.{name} is not one of the calls sapid provides to "
                            f"ssl_api hooks; in sapid: {instead}")


class M2Name:
    """An M2Crypto.X509.X509_Name: ``as_text()`` and attributes by short name (``.CN``)."""

    _short = {oid: short for short, oid in NAME_FIELDS.items()}

    def __init__(self, name: x509.Name):
        object.__setattr__(self, "_name", name)

    def __setattr__(self, short: str, value) -> None:
        raise M2Unsupported(f"M2Crypto X509_Name.{short} = ...: the stand-in's names are read "
                            "only; in sapid: draft.subject = x509.Name(...)")

    def _parts(self) -> list[str]:
        return [f"{self._short.get(a.oid, a.oid.dotted_string)}={a.value}" for a in self._name]

    def as_text(self) -> str:
        return ", ".join(self._parts())

    def __str__(self) -> str:
        return "".join(f"/{part}" for part in self._parts())

    def __getattr__(self, short: str):
        oid = NAME_FIELDS.get(short)
        if oid is None:
            raise AttributeError(short)
        found = self._name.get_attributes_for_oid(oid)
        return found[0].value if found else None


def openssl_extension(name: str, value: str) -> x509.ExtensionType:
    """The extension an openssl-style ``new_extension(name, value)`` meant, for the names
    ssl_api hooks used; HookError for the rest, naming what to write instead."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    try:
        if name == "subjectAltName":
            return x509.SubjectAlternativeName([_openssl_general_name(item) for item in items])
        if name == "crlDistributionPoints":
            return x509.CRLDistributionPoints([x509.DistributionPoint(
                [_openssl_general_name(item)], None, None, None) for item in items])
        if name == "authorityInfoAccess":
            methods = {"OCSP": AuthorityInformationAccessOID.OCSP,
                       "caIssuers": AuthorityInformationAccessOID.CA_ISSUERS}
            return x509.AuthorityInformationAccess([x509.AccessDescription(
                methods[method], _openssl_general_name(where))
                for method, _, where in (item.partition(";") for item in items)])
        if name == "extendedKeyUsage":
            usages = {"serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
                      "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
                      "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
                      "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
                      "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING}
            # Not OCSPSigning: a delegated responder could vouch for revoked certificates.
            return x509.ExtendedKeyUsage([usages[item] for item in items])
        if name == "keyUsage":
            flags = {"digitalSignature": "digital_signature",
                     "nonRepudiation": "content_commitment",
                     "keyEncipherment": "key_encipherment",
                     "dataEncipherment": "data_encipherment", "keyAgreement": "key_agreement"}
            chosen = {flags[item] for item in items}
            return x509.KeyUsage(**{flag: flag in chosen for flag in flags.values()},
                                 key_cert_sign=False, crl_sign=False, encipher_only=False,
                                 decipher_only=False)
        if name == "basicConstraints" and value.replace(" ", "").upper() == "CA:FALSE":
            return x509.BasicConstraints(ca=False, path_length=None)
        if name == "nsComment":
            return x509.UnrecognizedExtension(x509.ObjectIdentifier("2.16.840.1.113730.1.13"),
                                              _der(0x16, value.encode("ascii")))
    except (KeyError, ValueError, UnicodeError) as e:
        raise HookError(f"M2Crypto new_extension({name!r}, {value!r}): {_one_line(e)} is not "
                        "understood") from None
    raise HookError(f"M2Crypto new_extension({name!r}, ...) is not one sapid translates "
                    "(subjectAltName, crlDistributionPoints, authorityInfoAccess, "
                    "extendedKeyUsage, keyUsage, basicConstraints CA:FALSE, nsComment); in "
                    "sapid: draft.add_extension(<a cryptography x509 extension>, critical)")


def _openssl_general_name(item: str) -> x509.GeneralName:
    kind, _, value = item.partition(":")
    kinds = {"DNS": x509.DNSName, "URI": x509.UniformResourceIdentifier,
             "email": x509.RFC822Name}
    if kind in ("IP", "IP Address"):
        return x509.IPAddress(ipaddress.ip_address(value))
    return kinds[kind](value)


def install_ssl_api_names() -> None:
    """Make importable what ssl_api hooks import: ``sapi.exceptions`` (its CsrNotAuthedError
    refuses with 403, as NotAuthorized), ``sapi.config.api.signing_hooks_base`` and
    ``M2Crypto.X509`` with ``new_extension``.  No package named sapi is installed: these live
    in the daemon's process only."""
    if "sapi.config.api.signing_hooks_base" in sys.modules:
        return

    def module(name: str, package: bool = False, **names) -> types.ModuleType:
        made = types.ModuleType(name, f"ssl_api's {name}, as sapid provides it to its hooks")
        if package:
            made.__path__ = []
        made.__dict__.update(names)
        sys.modules[name] = made
        return made

    class SapiException(Exception):
        pass

    class ApiException(SapiException):
        pass

    class ApiError(ApiException):
        pass

    class CsrNotAuthedError(ApiError, NotAuthorized):
        pass

    class CaUpdateCancelledException(SapiException):
        pass

    exceptions = module("sapi.exceptions", SapiException=SapiException,
                        ApiException=ApiException, ApiError=ApiError,
                        CsrNotAuthedError=CsrNotAuthedError,
                        CaUpdateCancelledException=CaUpdateCancelledException)
    base = module("sapi.config.api.signing_hooks_base", SigningHooksBase=SigningHooksBase)
    api = module("sapi.config.api", True, signing_hooks_base=base)
    config = module("sapi.config", True, api=api)
    module("sapi", True, exceptions=exceptions, config=config)
    # Always the stand-in, even beside a real M2Crypto: the real extensions' get_value() is
    # OpenSSL's printed text, not the value given to new_extension.
    m2_x509 = module("M2Crypto.X509", new_extension=M2Extension, X509_Extension=M2Extension)
    module("M2Crypto", True, X509=m2_x509)


# The hooks' module name: ``logging.getLogger(__name__)`` in a hooks file is a child of sapid's
# logger, so its lines go through sapid's handler, with sapid's prefix and level.
HOOKS_MODULE = "sapid.hooks"
# An ssl_api hooks package: sapi_custom_ca/ with ca.py (CUSTOM_BOOT_CB, SERIAL_NUMBER_GENERATOR_CB)
# and api.py (API_CSR_HOOKS_FACTORY), loaded in the order ssl_api imported them.
SSL_API_PACKAGE = "sapi_custom_ca"
SSL_API_FILES = ("ca.py", "api.py")


def load_hooks(path: str | None, strict: bool = True) -> HookSet:
    """Load an operator's hooks file, or an ssl_api ``sapi_custom_ca`` package (a folder);
    ConfigError names the file and line of what is wrong."""
    if path is None:
        return BUILTIN_HOOKS
    _check_trusted_file(path, strict)
    if os.path.isdir(path):
        return _load_ssl_api_package(path, strict)
    tree = _parse_hooks(path)
    install_ssl_api_names()          # an ssl_api hooks file may import them too
    previous = sys.modules.get(HOOKS_MODULE)
    try:
        module = _exec_hooks(HOOKS_MODULE, path)
        return _hook_set(vars(module), path, _locations(tree, path), _used_names(tree))
    except ConfigError:
        _restore_module(HOOKS_MODULE, previous)
        raise


def _parse_hooks(path: str) -> ast.Module:
    try:
        with open(path, "rb") as file:
            source = file.read()
        return ast.parse(source, path)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: {_one_line(e)}") from None


def _exec_hooks(name: str, path: str, package: list | None = None) -> types.ModuleType:
    """Run the operator's file ``path`` as module ``name`` (a package when ``package`` lists
    its folder), registered in sys.modules as imports and dataclasses expect."""
    spec = importlib.util.spec_from_file_location(name, path,
                                                  submodule_search_locations=package)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # the operator's code: any failure is a load error
        sys.modules.pop(name, None)
        raise ConfigError(f"{path}:{_error_line(e, path)}: {type(e).__name__}: {_one_line(e)}"
                          ) from None
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module


def _restore_module(name: str, previous) -> None:
    """After a failed reload, the module in force stays the one sys.modules names."""
    if previous is not None:
        sys.modules[name] = previous
    else:
        sys.modules.pop(name, None)


def _locations(tree: ast.Module, path: str) -> dict:
    """'file:line' of each name the file defines (see _definition_lines)."""
    return {name: f"{path}:{line}" for name, line in _definition_lines(tree).items()}


def _load_ssl_api_package(folder: str, strict: bool) -> HookSet:
    """An unmodified ssl_api ``sapi_custom_ca`` package: its ``ca.py`` and ``api.py`` run as
    submodules of one package, with ssl_api's ``sapi`` names and sapid's M2Crypto stand-in to
    import.  Only ssl_api's names count as hooks: a helper the package calls ``boot`` is its
    own business, as it was under ssl_api."""
    files = [os.path.join(folder, name) for name in SSL_API_FILES
             if os.path.exists(os.path.join(folder, name))]
    if not files:
        raise ConfigError(f"{folder}: a hooks folder is an ssl_api {SSL_API_PACKAGE} package, "
                          f"with {' and/or '.join(SSL_API_FILES)}; none is here")
    # Every Python file of the package is run or may be imported: each must be trusted.
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            _check_trusted_file(os.path.join(folder, name), strict)
    init = os.path.join(folder, "__init__.py")
    trees = {path: _parse_hooks(path) for path in files}
    install_ssl_api_names()
    # A reload runs the package afresh, its helper modules too; a failed one puts back the
    # modules in force.
    previous = _take_package_modules()
    values, locations, used = {}, {}, set()
    try:
        if os.path.exists(init):
            package = _exec_hooks(HOOKS_MODULE, init, [folder])
        else:
            package = sys.modules[HOOKS_MODULE] = types.ModuleType(HOOKS_MODULE)
            package.__path__ = [folder]
        sys.modules[SSL_API_PACKAGE] = package     # its files may import their package by name
        for path in files:
            stem = os.path.basename(path)[:-3]
            module = _exec_hooks(f"{HOOKS_MODULE}.{stem}", path)
            sys.modules[f"{SSL_API_PACKAGE}.{stem}"] = module
            setattr(package, stem, module)
            values.update({name: value for name, value in vars(module).items()
                           if name not in ("Hooks", *HOOK_FUNCTIONS)})
            locations.update(_locations(trees[path], path))
            used |= _used_names(trees[path])
        return _hook_set(values, folder, locations, used)
    except ConfigError:
        _take_package_modules()
        sys.modules.update(previous)
        raise


def _take_package_modules() -> dict:
    """Take the hooks package's modules, its helpers too, out of sys.modules; what was taken."""
    names = [name for name in sys.modules if name in (HOOKS_MODULE, SSL_API_PACKAGE)
             or name.startswith((HOOKS_MODULE + ".", SSL_API_PACKAGE + "."))]
    return {name: sys.modules.pop(name) for name in names}


def _check_trusted_file(path: str, strict: bool, writable_ok: bool = False) -> os.stat_result:
    """A file sapid runs or trusts: with ``strict_files`` (the default) a regular file or folder,
    not a symbolic link, owned by root or sapid's user; never writable by others."""
    try:
        info = os.lstat(path)
        if not strict and stat.S_ISLNK(info.st_mode):
            info = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{path}: a symbolic link; sapid reads only real files "
                          "(strict_files = no allows links)")
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise ConfigError(f"{path}: not a regular file")
    if strict and info.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{path}: owned by uid {info.st_uid}, neither root nor sapid's user "
                          "(strict_files = no allows other owners)")
    if info.st_mode & (0o002 if writable_ok else 0o022):
        raise ConfigError(f"{path}: writable by {'others' if writable_ok else 'group or others'} "
                          f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod go-w it")
    return info


def _definition_lines(tree: ast.Module) -> dict:
    """Line of each top-level name, and of each method as 'Class.method'."""
    lines = {}
    for node in tree.body:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            targets = [node.name]
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        lines[f"{node.name}.{item.name}"] = item.lineno
        elif isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        for target in targets:
            lines.setdefault(target, node.lineno)
    return lines


def _used_names(tree: ast.Module) -> set:
    """Names the file's own code reads: helpers, whatever they are called, not misspelt hooks."""
    return {node.id for node in ast.walk(tree)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


def _error_line(error: BaseException, path: str) -> int | str:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f.filename == path]
    return frames[-1].lineno if frames else "?"


def _near_miss(name: str, known) -> str | None:
    if name in known or name.startswith("_"):
        return None
    lowered = {k.lower(): k for k in known}
    match = difflib.get_close_matches(name.lower(), lowered, 1, 0.75)
    return lowered[match[0]] if match else None


def _check_arity(function, count: int, what: str, where: str) -> None:
    if not callable(function):
        raise ConfigError(f"{where}: {what} is not callable")
    try:
        inspect.signature(function).bind(*range(count))
    except TypeError:
        raise ConfigError(f"{where}: {what} must take {count} argument"
                          f"{'' if count == 1 else 's'}") from None
    except ValueError:
        pass  # builtins without a signature: trust them


def _hook_set(values: dict, path: str, lines: dict, used=frozenset()) -> HookSet:
    """The HookSet of a loaded file's (or package's) ``values``; ``lines`` holds 'file:line'
    of each name it defines."""
    where = lambda name: lines.get(name, f"{path}:?")  # noqa: E731
    for name, value in values.items():
        # A hook is a callable the file defines and leaves for sapid to call: a constant, or a
        # class or function the file itself uses (an ssl_api factory's class), is a helper.
        if name in lines and name not in used and callable(value) and (
                near := _near_miss(name, KNOWN_TOP_LEVEL)):
            raise ConfigError(f"{where(name)}: {name!r} is not a hook name; did you mean {near!r}?")
    custom = set()
    factory = SigningHooks
    hooks_class = values.get("Hooks")
    if hooks_class is not None:
        if not (isinstance(hooks_class, type) and issubclass(hooks_class, SigningHooks)):
            raise ConfigError(f"{where('Hooks')}: Hooks must be a subclass of sapid.SigningHooks")
        for attribute in vars(hooks_class):
            if near := _near_miss(attribute, HOOK_METHODS):
                raise ConfigError(f"{where('Hooks.' + attribute)}: Hooks.{attribute} is not a "
                                  f"hook; did you mean {near!r}?")
        for method, count in HOOK_METHODS.items():
            function = getattr(hooks_class, method)
            if function is not getattr(SigningHooks, method):
                _check_arity(function, count + 1, f"Hooks.{method}", where(f"Hooks.{method}"))
                custom.add(method)
        if hooks_class.__init__ is not SigningHooks.__init__:
            custom.add("__init__")       # operator code runs when each instance is made
        factory = hooks_class
    for alias in ("API_CSR_HOOKS_FACTORY", "HOOKS_FACTORY"):
        if alias in values and hooks_class is None:
            factory = values[alias]
            _check_arity(factory, 3, alias, where(alias))
            custom.update(HOOK_METHODS)   # a factory's class is known only per request
            break
    functions = {}
    serial_where = path
    for name, alias in (("boot", "CUSTOM_BOOT_CB"), ("serial_number", "SERIAL_NUMBER_GENERATOR_CB")):
        function = values.get(name, values.get(alias))
        if function is None:
            functions[name] = globals()[name]
            continue
        shown = name if name in values else alias
        if name == "serial_number":
            serial_where = where(shown)
        if function is globals()[name]:
            functions[name] = function
            continue
        count = HOOK_FUNCTIONS[name] if name in values else SSL_API_NAMES[alias]
        _check_arity(function, count, shown, where(shown))
        if name == "boot" and alias in values and name not in values:
            functions[name] = lambda authority, cb=function: cb()
        else:
            functions[name] = function
        custom.add(name)
    hook_set = HookSet(path, factory, functions["boot"], functions["serial_number"],
                       frozenset(custom))
    try:
        hook_set.draw_serial()
    except HookError as e:
        raise ConfigError(f"{serial_where}: {e}") from None
    except (Exception, SystemExit) as e:
        raise ConfigError(f"{path}:{_error_line(e, path)}: serial_number raised "
                          f"{type(e).__name__}: {_one_line(e)}") from None
    return hook_set


# ---------------------------------------------------------------------------------------------
# Identity: the CA's own files, read only
# ---------------------------------------------------------------------------------------------

def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None


@dataclasses.dataclass(frozen=True)
class Identity:
    """The CA certificate, its chain (issuer first) and, once decrypted, its key."""

    folder: str
    certificate: x509.Certificate
    chain: tuple
    key: object = dataclasses.field(repr=False, default=None)

    @classmethod
    def load(cls, folder: str, passphrase: str | None, strict: bool = True) -> Identity:
        """Load and check the identity; without a passphrase the key stays encrypted (None)."""
        if not os.path.isdir(folder):
            raise ConfigError(f"{folder}: no identity folder (create one with 'sapid init')")
        _check_trusted_file(folder, strict, writable_ok=True)
        cert_path = next((os.path.join(folder, name) for name in CERT_FILES
                          if os.path.lexists(os.path.join(folder, name))),
                         os.path.join(folder, CERT_FILES[0]))
        _check_trusted_file(cert_path, strict)
        try:
            certificate = x509.load_pem_x509_certificate(_read(cert_path))
        except ValueError as e:
            raise ConfigError(f"{cert_path}: not a PEM certificate: {_one_line(e)}") from None
        _check_ca_certificate(certificate, cert_path)
        chain_path = os.path.join(folder, CHAIN_FILE)
        chain = ()
        if os.path.lexists(chain_path):
            _check_trusted_file(chain_path, strict)
            try:
                chain = tuple(x509.load_pem_x509_certificates(_read(chain_path)))
            except ValueError as e:
                raise ConfigError(f"{chain_path}: {_one_line(e)}") from None
            child = certificate
            for position, parent in enumerate(chain, 1):
                try:
                    child.verify_directly_issued_by(parent)
                except (ValueError, TypeError, Exception) as e:  # InvalidSignature included
                    raise ConfigError(f"{chain_path}: certificate {position} did not issue the one "
                                      f"before it ({type(e).__name__}: {_one_line(e)})") from None
                child = parent
        key = None
        key_path = os.path.join(folder, KEY_FILE)
        mode = stat.S_IMODE(_check_trusted_file(key_path, strict, writable_ok=True).st_mode)
        if mode & 0o027:
            raise ConfigError(f"{key_path}: mode {mode:04o} lets others read or the group write "
                              f"it; chmod 0640 {key_path}")
        pem = _read(key_path)
        if b"ENCRYPTED" not in pem:
            raise ConfigError(
                f"{key_path}: the CA key is not encrypted; encrypt it with 'openssl pkcs8 -topk8 "
                f"-v2 aes-256-cbc -iter 600000 -in {key_path} -out {key_path}.new' and move "
                "the new file in place")
        if passphrase is not None:
            try:
                key = serialization.load_pem_private_key(pem, passphrase.encode("utf-8"))
            except (ValueError, TypeError, UnsupportedAlgorithm) as e:
                message = _one_line(e)
                if "decrypt" in message.lower() or "password" in message.lower():
                    message = "wrong passphrase"
                elif isinstance(e, ValueError) and not isinstance(e, UnicodeError):
                    # CBC: about one wrong passphrase in 170 yields valid padding, and the
                    # parser then fails on the noise instead of the decryption.
                    message = f"wrong passphrase (or a damaged key file: {message})"
                raise ConfigError(f"{key_path}: cannot load the CA key: {message}") from None
            try:
                check_ca_key(key)
            except ValueError as e:
                raise ConfigError(f"{key_path}: {e}") from None
            if spki_der(key.public_key()) != spki_der(certificate.public_key()):
                raise ConfigError(f"{key_path}: the key does not match {cert_path}")
            if weakness := key_protection(pem):
                log.warning("%s %s; re-wrap it with 'openssl pkcs8 -topk8 -v2 aes-256-cbc "
                            "-iter 600000'", key_path, weakness)
        return cls(folder, certificate, chain, key)

    def pem(self) -> bytes:
        """The CA certificate followed by its chain."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM)
                        for c in (self.certificate, *self.chain))


def _aware(moment) -> datetime.datetime:
    """A draft's time in UTC; a naive one is taken as UTC, as cryptography does."""
    if not isinstance(moment, datetime.datetime):
        raise TypeError(f"{type(moment).__name__} where a datetime belongs")
    if moment.tzinfo is None:
        return moment.replace(tzinfo=datetime.timezone.utc)
    return moment.astimezone(datetime.timezone.utc)


def _check_ca_certificate(certificate: x509.Certificate, path: str) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(f"{path}: not a CA certificate (basicConstraints CA:TRUE is missing)")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            raise ConfigError(f"{path}: keyUsage lacks keyCertSign; this certificate cannot sign")
    except x509.ExtensionNotFound:
        pass  # RFC 5280 asks for keyUsage in CA certificates; its absence allows every use
    now = utcnow()
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise ConfigError(f"{path}: not valid now (valid {iso_time(certificate.not_valid_before_utc)}"
                          f" to {iso_time(certificate.not_valid_after_utc)})")


# ---------------------------------------------------------------------------------------------
# The store: every certificate signed, committed before its answer leaves
# ---------------------------------------------------------------------------------------------

STORE_FILE = "sapid.db"
# How long a commit waits for another writer (a worker, ``sapid sign``, an operator's sqlite3)
# to let go of an SQLite store before it fails with store_failed.
STORE_BUSY_SECONDS = 5.0
# Rows per INSERT: 9 values each stays far below SQLite's 32,766 bound parameters.
INSERT_ROWS = 500
# libpq settings a URI may override: a PostgreSQL that is gone fails a commit in seconds,
# not after the kernel's TCP timeouts of a quarter of an hour.
# A commit that waits on another session's lock fails as an SQLite one does, after 5 s.
POSTGRES_LIMITS = ("lock_timeout=5000", "statement_timeout=30000")
POSTGRES_DEFAULTS = {"connect_timeout": "5", "keepalives_idle": "10", "keepalives_interval": "3",
                     "keepalives_count": "3", "tcp_user_timeout": "15000",
                     "options": " ".join(f"-c {limit}" for limit in POSTGRES_LIMITS)}
# The store of a fleet is created once: hosts starting together take this lock to migrate it.
POSTGRES_MIGRATION_LOCK = 0x5A91D
# Files of sapid 0.1, imported into the store once.
LEGACY_JOURNAL, LEGACY_INDEX, LEGACY_ASIDE = "issued.pem", "issued", "unjournaled"
LEGACY_HEADER = re.compile(rb"# serial ([0-9A-F]+) client ([A-Za-z0-9]*) at (\S+)\n")
LEGACY_NAME = re.compile(r"[0-9A-F]+\.pem")
IMPORT_ROWS = 5000
# A commit's sync costs about as much CPU as 4 to 8 rows (measured: bench/README.md), so the
# reception loop lets signings gather while it has other work, up to this many or this long.
FLUSH_RECORDS = 16
FLUSH_SECONDS = 0.002
IMPORT_EXTEND_USEC = 30_000_000    # asked of systemd each time the import reports progress
PEM_END = b"-----END CERTIFICATE-----\n"

# The schema, in one place: the statements of entry N bring a store from version N to N + 1.
# {time}, {blob} and {int} are TEXT (ISO 8601, which sorts as time does), BLOB and INTEGER in
# SQLite, TIMESTAMPTZ, BYTEA and BIGINT in PostgreSQL.  Serials are the API's upper-case hex.
MIGRATIONS = (
    (
        "CREATE TABLE certificates ("
        " serial TEXT PRIMARY KEY,"
        " client_id TEXT NOT NULL,"
        " subject TEXT NOT NULL,"                  # RFC 4514
        " sans TEXT NOT NULL,"                     # JSON list: ["DNS:a.example", "IP:10.0.0.1"]
        " not_before {time} NOT NULL,"
        " not_after {time} NOT NULL,"
        " sha256 TEXT NOT NULL,"                   # lower-case hex over the DER
        " der {blob} NOT NULL,"
        " issued_at {time} NOT NULL,"
        " revoked_at {time},"
        " revocation_reason TEXT)",
        "CREATE INDEX certificates_by_client ON certificates (client_id)",
        "CREATE INDEX certificates_by_not_after ON certificates (not_after)",
        "CREATE INDEX certificates_revoked ON certificates (revoked_at)"
        " WHERE revoked_at IS NOT NULL",
        # Certificates added, per writing process: counting them is a sum over a few rows, not
        # a scan of the store, and no two hosts update one row.
        "CREATE TABLE tally (writer TEXT PRIMARY KEY, issued {int} NOT NULL)",
    ),
    (
        # Revocations ever made, on one row: a process that caches a CRL reads this one number
        # to learn whether any worker or host has revoked since it built the CRL.
        "CREATE TABLE revocation_changes (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " changes {int} NOT NULL)",
        "INSERT INTO revocation_changes (id, changes) VALUES (1, 0)",
        # Listings page through these in their order (sapid list, --client, --expiring):
        # each page is a range of an index, not a sort of the whole table.
        "CREATE INDEX certificates_by_issue ON certificates (issued_at, serial)",
        "DROP INDEX certificates_by_client",
        "CREATE INDEX certificates_by_client ON certificates (client_id, issued_at, serial)",
        "DROP INDEX certificates_by_not_after",
        "CREATE INDEX certificates_by_not_after ON certificates (not_after, serial)",
        # What a CRL lists, in the index itself: building one reads no certificate rows.
        "DROP INDEX certificates_revoked",
        "CREATE INDEX certificates_revoked ON certificates"
        " (revoked_at, not_after, serial, revocation_reason) WHERE revoked_at IS NOT NULL",
    ),
)
COLUMNS = ("serial", "client_id", "subject", "sans", "not_before", "not_after", "sha256", "der",
           "issued_at", "revoked_at", "revocation_reason")
NEW_COLUMNS = COLUMNS[:9]       # what an issuance writes


@dataclasses.dataclass(frozen=True)
class Record:
    """One issued certificate as the store keeps it."""

    serial: str
    client_id: str
    subject: str
    sans: tuple
    not_before: datetime.datetime
    not_after: datetime.datetime
    sha256: str
    der: bytes
    issued_at: datetime.datetime
    revoked_at: datetime.datetime | None = None
    revocation_reason: str | None = None

    @classmethod
    def of(cls, certificate: x509.Certificate, der: bytes, client_id: str,
           issued_at: datetime.datetime | None = None) -> Record:
        try:
            names = certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            names = ()
        return cls(serial_hex(certificate.serial_number), client_id,
                   certificate.subject.rfc4514_string(), tuple(map(san_text, names)),
                   certificate.not_valid_before_utc, certificate.not_valid_after_utc,
                   hashlib.sha256(der).hexdigest(), der, issued_at or utcnow())

    def status(self, now: datetime.datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.not_after < now else "valid"

    def document(self, now: datetime.datetime) -> dict:
        """What ``sapid list --json`` and ``sapid show --json`` print of it."""
        return {"serial": self.serial, "client_id": self.client_id, "subject": self.subject,
                "sans": list(self.sans), "not_before": iso_time(self.not_before),
                "not_after": iso_time(self.not_after), "sha256_fingerprint": self.sha256,
                "issued_at": iso_time(self.issued_at), "status": self.status(now),
                "revoked_at": self.revoked_at and iso_time(self.revoked_at),
                "revocation_reason": self.revocation_reason}


SAN_PREFIXES = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.RFC822Name: "email",
                x509.UniformResourceIdentifier: "URI"}


def san_text(name: x509.GeneralName) -> str:
    """``DNS:a.example``, as openssl prints a subjectAltName entry."""
    return f"{SAN_PREFIXES.get(type(name), type(name).__name__)}:{name.value}"


class Store:
    """The issued certificates, behind one interface: ``add`` a batch in one transaction,
    ``get`` by serial, ``select`` by client or expiry, ``count``.  ``SQLiteStore`` and
    ``PostgresStore`` differ in how they connect and in a few words of SQL.

    Two connections at most, each used by one thread at a time: one that writes (the
    committer's) and one that reads, so that a read never waits for a commit (SQLite and libpq
    connections are not for sharing at once).  A connection that failed is dropped and the
    next use opens a new one, so that service resumes by itself once the database does.  Not
    for use across fork: close the store before forking, each process then connects anew."""

    types = {"time": "TEXT", "blob": "BLOB", "int": "INTEGER"}
    begin_write = "BEGIN IMMEDIATE"
    # Whether a kept connection that fails at BEGIN is worth replacing at once (a server's
    # connection may have been closed by a restart; an SQLite file's failure is the file's).
    _reconnects = False
    # SQLite's "+column": a term no index may serve.  Without statistics SQLite would read
    # the revoked certificates through the index of every certificate's not_after (a million
    # rows for 100,000 revoked, 17 times slower) instead of the index of revoked ones.
    _unindexed = "+"

    def __init__(self, where: str):
        self.where = where
        self.known = 0          # the count last seen: for status lines, which must not wait
        self._connections = {True: None, False: None}       # by ``write``
        self._locks = {True: threading.Lock(), False: threading.Lock()}
        self._inserts = {}      # the INSERT of n rows, by n
        self._writer = None

    @staticmethod
    def open(config: Config) -> Store:
        """The store ``config`` names: PostgreSQL for a ``postgresql://`` URI, else SQLite.
        Nothing is connected yet."""
        if config.store:
            return PostgresStore(config.store)
        return SQLiteStore(os.path.join(config.state, STORE_FILE))

    # Connections --------------------------------------------------------------------------

    def _connect(self, create: bool):
        raise NotImplementedError

    def _errors(self) -> tuple:
        raise NotImplementedError

    def _stale(self, connection) -> bool:
        return False

    def _check_writable(self) -> None:
        pass

    def _drop(self, write: bool) -> None:
        connection, self._connections[write] = self._connections[write], None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def close(self) -> None:
        """Close both connections (before a fork, and at the end); later use reconnects."""
        for write in (True, False):
            with self._locks[write]:
                self._drop(write)

    @contextlib.contextmanager
    def _session(self, write: bool = False, create: bool = True):
        """A cursor in a transaction, committed at the end; any failure of the database is a
        StoreError naming the store, the connection dropped, nothing half-written."""
        with self._locks[write]:
            cursor = None
            try:
                cursor = self._begin(write, create)
                yield cursor
                cursor.execute("COMMIT")
            except self._errors() as e:
                if cursor is not None:
                    with contextlib.suppress(Exception):
                        cursor.execute("ROLLBACK")
                self._drop(write)
                raise StoreError(f"{self.where}: {_one_line(e)}") from None
            except BaseException:
                if cursor is not None:
                    with contextlib.suppress(Exception):
                        cursor.execute("ROLLBACK")
                raise

    def _begin(self, write: bool, create: bool):
        """A cursor in a new transaction.  A connection kept from before that fails at BEGIN
        (nothing sent yet: a PostgreSQL restarted meanwhile closed it) is replaced once."""
        for kept in (True, False):
            connection = self._connections[write]
            if connection is not None and self._stale(connection):
                self._drop(write)
                connection = None
            if connection is None:
                kept = False
                connection = self._connections[write] = self._connect(create)
                if write:
                    # This process's row of the tally: a forked worker connects anew.
                    self._writer = f"{socket.gethostname()}/{os.getpid()}"
            if write:
                self._check_writable()
            cursor = connection.cursor()
            try:
                cursor.execute(self.begin_write if write else "BEGIN")
                return cursor
            except self._errors():
                if not kept or not self._reconnects:
                    raise
                self._drop(write)
        raise AssertionError("unreachable")

    def _sql(self, text: str) -> str:
        return text

    # Schema -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the schema or bring it forward; refuse a store newer than this sapid."""
        with self._session(write=True) as cursor:
            self._lock_migration(cursor)
            # Looked for first: creating it "if not exists" would need the right to create
            # tables, which a role that only reads and writes a prepared store lacks.
            if not self._has_meta(cursor):
                cursor.execute("CREATE TABLE sapid_meta"
                               " (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            cursor.execute(self._sql("SELECT value FROM sapid_meta WHERE name = ?"), ("schema",))
            row = cursor.fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(f"{self.where}: schema version {version} is newer than this "
                                 f"sapid's ({len(MIGRATIONS)}); run a newer sapid")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    cursor.execute(statement.format(**self.types))
            if version < len(MIGRATIONS):
                self._set_meta(cursor, "schema", str(len(MIGRATIONS)))
                log.info("%s: schema %s", self.where,
                         f"brought from version {version} to {len(MIGRATIONS)}" if version
                         else f"version {len(MIGRATIONS)} created")
            self.known = self._count(cursor)

    def _lock_migration(self, cursor) -> None:
        pass            # SQLite: BEGIN IMMEDIATE already holds the only write lock

    @staticmethod
    def _has_meta(cursor) -> bool:
        cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sapid_meta'")
        return cursor.fetchone() is not None

    def _set_meta(self, cursor, name: str, value: str) -> None:
        cursor.execute(self._sql("INSERT INTO sapid_meta (name, value) VALUES (?, ?) ON CONFLICT"
                                 " (name) DO UPDATE SET value = excluded.value"), (name, value))

    def meta(self, name: str) -> str | None:
        with self._session(create=False) as cursor:
            cursor.execute(self._sql("SELECT value FROM sapid_meta WHERE name = ?"), (name,))
            row = cursor.fetchone()
        return row[0] if row else None

    def set_meta(self, name: str, value: str) -> None:
        with self._session(write=True) as cursor:
            self._set_meta(cursor, name, value)

    # Writing ------------------------------------------------------------------------------

    def add(self, records: list[Record]) -> set[int]:
        """Add ``records`` in one transaction, durable on return; the positions in ``records``
        of those not added, their serial being in the store already (or earlier in the
        list: the first of two is the one added).  StoreError: none is added."""
        taken, seen, fresh = set(), set(), []
        for position, record in enumerate(records):
            if record.serial in seen:
                taken.add(position)
            else:
                seen.add(record.serial)
                fresh.append((position, record))
        added = 0
        with self._session(write=True) as cursor:
            for start in range(0, len(fresh), INSERT_ROWS):
                part = fresh[start:start + INSERT_ROWS]
                cursor.execute(self._insert(len(part)),
                               [value for _, record in part for value in self._row(record)])
                added += cursor.rowcount
                if cursor.rowcount != len(part):
                    # Some serials were there already (the rare case, read only then, so
                    # that a batch is one statement step and not one per row): a record
                    # whose row is not the stored one was not added.
                    cursor.execute(self._sql(
                        "SELECT serial, client_id, sha256, issued_at FROM certificates WHERE "
                        f"serial IN ({', '.join(['?'] * len(part))})"),
                        [record.serial for _, record in part])
                    stored = {row[0]: tuple(row[1:]) for row in cursor.fetchall()}
                    taken.update(position for position, record in part
                                 if stored.get(record.serial) != (
                                     record.client_id, record.sha256,
                                     self._instant(record.issued_at)))
            if added:
                cursor.execute(self._sql(
                    "INSERT INTO tally (writer, issued) VALUES (?, ?) ON CONFLICT (writer)"
                    " DO UPDATE SET issued = tally.issued + excluded.issued"),
                    (self._writer, added))
        self.known += added     # others' additions show at the next count()
        return taken

    def _insert(self, rows: int) -> str:
        if (text := self._inserts.get(rows)) is None:
            values = "(" + ", ".join([self._sql("?")] * len(NEW_COLUMNS)) + ")"
            text = self._inserts[rows] = (
                f"INSERT INTO certificates ({', '.join(NEW_COLUMNS)}) VALUES "
                f"{', '.join([values] * rows)} ON CONFLICT (serial) DO NOTHING")
        return text

    def _row(self, record: Record) -> tuple:
        return (record.serial, record.client_id, record.subject, json.dumps(list(record.sans)),
                self._time(record.not_before), self._time(record.not_after), record.sha256,
                record.der, self._instant(record.issued_at))


    def revoke(self, serial: str, reason: str, at: datetime.datetime) -> tuple[Record | None, bool]:
        """Mark ``serial`` revoked at ``at`` for ``reason``, durable on return: its record
        (None when the store has no such serial) and whether this call revoked it (False: it
        was revoked already, and its first date and reason stand).  A store that does not
        exist yet is not created (``sapid revoke`` as root would make it root's)."""
        with self._session(write=True, create=False) as cursor:
            cursor.execute(self._sql("UPDATE certificates SET revoked_at = ?, revocation_reason = ?"
                                     " WHERE serial = ? AND revoked_at IS NULL"),
                           (self._instant(at), reason, serial))
            revoked = cursor.rowcount == 1
            if revoked:
                cursor.execute("UPDATE revocation_changes SET changes = changes + 1 WHERE id = 1")
            cursor.execute(self._sql(f"SELECT {', '.join(COLUMNS)} FROM certificates"
                                     " WHERE serial = ?"), (serial,))
            row = cursor.fetchone()
        return (self._record(row) if row else None), revoked

    # Reading ------------------------------------------------------------------------------

    def count(self) -> int:
        """Certificates in the store, whoever added them."""
        with self._session(create=False) as cursor:
            self.known = self._count(cursor)
        return self.known

    @staticmethod
    def _count(cursor) -> int:
        cursor.execute("SELECT COALESCE(SUM(issued), 0) FROM tally")
        return int(cursor.fetchone()[0])

    def get(self, serial: str) -> Record | None:
        with self._session(create=False) as cursor:
            cursor.execute(self._sql(f"SELECT {', '.join(COLUMNS)} FROM certificates"
                                     " WHERE serial = ?"), (serial,))
            row = cursor.fetchone()
        return self._record(row) if row else None

    def revocation_changes(self) -> int:
        """How many revocations the store has seen, by anyone: a CRL built when it was N
        is current while it is N."""
        with self._session(create=False) as cursor:
            cursor.execute("SELECT changes FROM revocation_changes WHERE id = 1")
            return int(cursor.fetchone()[0])

    def revocation(self, serial: str) -> tuple[bool, datetime.datetime | None, str | None]:
        """What OCSP says of ``serial``: (known, revoked_at, reason), one lookup by key."""
        with self._session(create=False) as cursor:
            cursor.execute(self._sql("SELECT revoked_at, revocation_reason FROM certificates"
                                     " WHERE serial = ?"), (serial,))
            row = cursor.fetchone()
        if row is None:
            return False, None, None
        return True, row[0] and self._from_time(row[0]), row[1]

    def revoked(self, since: datetime.datetime) -> tuple[int, list[tuple]]:
        """The revocation count (as ``revocation_changes``) and every revoked certificate that
        has not expired before ``since``, as (serial, revoked_at, reason), read in one
        transaction: what a CRL lists.  Read through the partial index of revoked
        certificates, not the whole store."""
        with self._session(create=False) as cursor:
            cursor.execute("SELECT changes FROM revocation_changes WHERE id = 1")
            changes = int(cursor.fetchone()[0])
            cursor.execute(self._sql("SELECT serial, revoked_at, revocation_reason FROM"
                                     " certificates WHERE revoked_at IS NOT NULL AND"
                                     f" {self._unindexed}not_after >= ?"), (self._time(since),))
            entries = []
            while rows := cursor.fetchmany(10000):
                entries += [(serial, self._from_time(at), reason) for serial, at, reason in rows]
        return changes, entries

    def present(self, serials: list[str]) -> set[str]:
        """Which of ``serials`` the store holds."""
        found = set()
        with self._session(create=False) as cursor:
            for start in range(0, len(serials), INSERT_ROWS):
                part = serials[start:start + INSERT_ROWS]
                marks = ", ".join([self._sql("?")] * len(part))
                cursor.execute(f"SELECT serial FROM certificates WHERE serial IN ({marks})", part)
                found.update(row[0] for row in cursor.fetchall())
        return found

    def select(self, client_id: str | None = None, expiring: datetime.datetime | None = None,
               revoked: bool = False, page: int = 1000):
        """Records by issuance, or with ``expiring`` those valid now that expire before it,
        soonest first; a page at a time, so that a million certificates take no more memory
        than a thousand."""
        now = utcnow()
        where, values = [], []
        if client_id is not None:
            where.append("client_id = ?")
            values.append(client_id)
        if expiring is not None:          # valid now: neither expired nor revoked
            where += ["not_after >= ?", "not_after <= ?", "revoked_at IS NULL"]
            values += [self._time(now), self._time(expiring)]
        if revoked:
            where.append("revoked_at IS NOT NULL")
        order = "not_after" if expiring is not None else "issued_at"
        after = None
        while True:
            keyset = list(where)
            if after is not None:
                keyset.append(f"({order}, serial) > (?, ?)")
            query = (f"SELECT {', '.join(COLUMNS)} FROM certificates"
                     f"{' WHERE ' + ' AND '.join(keyset) if keyset else ''}"
                     f" ORDER BY {order}, serial LIMIT {page}")
            with self._session(create=False) as cursor:
                cursor.execute(self._sql(query), values + (list(after) if after else []))
                rows = cursor.fetchall()
            for row in rows:
                yield self._record(row)
            if len(rows) < page:
                return
            last = rows[-1]
            after = (last[COLUMNS.index(order)], last[0])

    def _record(self, row) -> Record:
        values = dict(zip(COLUMNS, row))
        for name in ("not_before", "not_after", "issued_at", "revoked_at"):
            if values[name] is not None:
                values[name] = self._from_time(values[name])
        values["sans"] = tuple(json.loads(values["sans"]))
        values["der"] = bytes(values["der"])
        return Record(**values)

    @staticmethod
    def _time(moment: datetime.datetime):
        return moment

    @staticmethod
    def _instant(moment: datetime.datetime):
        """A time to the microsecond (issued_at: listings keep the order of issuance)."""
        return moment

    @staticmethod
    def _from_time(value) -> datetime.datetime:
        return value.astimezone(datetime.timezone.utc)


class SQLiteStore(Store):
    """One file, ``<state>/sapid.db``: WAL, so that readers (``sapid list``, a backup) never
    hold up a commit, and ``synchronous=FULL``, so that a commit is on disk when it returns."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path

    def _errors(self) -> tuple:
        return (sqlite3.Error,)

    def _connect(self, create: bool):
        folder = os.path.dirname(self.path) or "."
        try:
            if create:
                os.makedirs(folder, mode=0o750, exist_ok=True)
                # The file made here, not by SQLite: its mode is the store's, whatever the
                # umask; SQLite gives its -wal and -shm files the same mode.
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_CLOEXEC, 0o640))
            elif not os.path.exists(self.path):
                raise StoreError(f"{self.path}: no store here yet (sapid creates it at its "
                                 "first start)")
            connection = sqlite3.connect(self.path, timeout=STORE_BUSY_SECONDS,
                                         isolation_level=None, check_same_thread=False,
                                         factory=_SQLiteConnection)
        except OSError as e:
            raise StoreError(f"{e.filename or self.path}: {e.strerror}") from None
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: {_one_line(e)}") from None
        try:
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"journal mode {mode}, WAL expected")
            connection.execute("PRAGMA synchronous = FULL")
            # A batch's INSERT keeps a statement journal (the pages it changed, to undo it
            # alone); in a file, each commit would create, write and delete one in /var/tmp.
            connection.execute("PRAGMA temp_store = MEMORY")
            connection.inode = os.stat(self.path).st_ino
        except (sqlite3.Error, OSError) as e:
            connection.close()
            raise StoreError(f"{self.path}: {_one_line(e)}") from None
        return connection

    @staticmethod
    def _time(moment: datetime.datetime) -> str:
        return iso_time(moment)

    @staticmethod
    def _instant(moment: datetime.datetime) -> str:
        return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    @staticmethod
    def _from_time(value: str) -> datetime.datetime:
        # fromisoformat reads the trailing Z (Python 3.11), thirty times faster than strptime:
        # a CRL reads a time per revoked certificate.
        return datetime.datetime.fromisoformat(value)

    def _check_writable(self) -> None:
        """Refuse to write when the state folder was made read-only (remounted, or a read-only
        bind mount put over it for maintenance): the descriptors SQLite holds would write on
        regardless, behind the operator's back."""
        try:
            read_only = os.statvfs(os.path.dirname(self.path) or ".").f_flag & os.ST_RDONLY
        except OSError as e:
            raise StoreError(f"{self.path}: {e.strerror}") from None
        if read_only:
            raise StoreError(f"{self.path}: Read-only file system")

    def _stale(self, connection) -> bool:
        """Whether the store file was replaced (a backup put back) under this connection,
        which would go on writing into the old file."""
        try:
            return os.stat(self.path).st_ino != connection.inode
        except OSError:
            return True


class _SQLiteConnection(sqlite3.Connection):
    """A connection that remembers which file (inode) it opened."""

    inode = None


class PostgresStore(Store):
    """A PostgreSQL database that several sapid hosts share (``store = postgresql://...``).
    Its password, if it needs one, is never in the configuration: peer authentication,
    ``PGPASSFILE``, or the systemd credential ``store-password``."""

    types = {"time": "TIMESTAMPTZ", "blob": "BYTEA", "int": "BIGINT"}
    begin_write = "BEGIN"
    _reconnects = True
    _unindexed = ""         # PostgreSQL plans from the statistics it keeps

    def __init__(self, uri: str):
        super().__init__(_redacted_uri(uri))
        self.uri = uri

    def _errors(self) -> tuple:
        try:
            import psycopg
        except ImportError:
            return ()
        return (psycopg.Error,)

    def _connect(self, create: bool):
        try:
            import psycopg
        except ImportError:
            raise ConfigError("store = postgresql://... needs psycopg: install sapid with the "
                              "postgresql extra (pip install 'sapid[postgresql]')") from None
        settings = dict(POSTGRES_DEFAULTS)
        password = _credential("store-password")
        if password is not None:
            settings["password"] = password
        try:
            given = psycopg.conninfo.conninfo_to_dict(self.uri)
            settings = {key: value for key, value in settings.items() if key not in given}
            if "options" in given:
                # The URI's own options (a search_path, say) keep the timeouts it does not set.
                settings["options"] = " ".join(
                    [given["options"]] + [f"-c {limit}" for limit in POSTGRES_LIMITS
                                          if limit.split("=")[0] not in given["options"]])
            return psycopg.connect(self.uri, autocommit=True, **settings)
        except psycopg.Error as e:
            raise StoreError(f"{self.where}: {_one_line(e)}") from None

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def _lock_migration(self, cursor) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (POSTGRES_MIGRATION_LOCK,))

    @staticmethod
    def _has_meta(cursor) -> bool:
        cursor.execute("SELECT to_regclass('sapid_meta') IS NOT NULL")
        return bool(cursor.fetchone()[0])


def _redacted_uri(uri: str) -> str:
    """``uri`` for messages: a password in it is not repeated."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", uri)


def _credential(name: str) -> str | None:
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return None
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as file:
            return _strip_newline(file.read())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"credential {name}: {_one_line(e)}") from None


class Ticket:
    """Where one record stands: ``done`` once its batch was committed or failed, then
    ``taken`` (its serial was in the store already) or ``error`` (a StoreError) say how."""

    __slots__ = ("done", "error", "queued_at", "record", "taken", "_settled")

    def __init__(self, record: Record):
        self.record, self.done, self.taken, self.error = record, False, False, None
        self.queued_at = time.monotonic()
        # Held until done: a thread waiting for this ticket sleeps on it alone, so that a
        # commit wakes the waiters of its own records, not every waiting thread.
        self._settled = threading.Lock()
        self._settled.acquire()

    def mark_done(self) -> None:
        self.done = True
        self._settled.release()

    def wait(self) -> None:
        self._settled.acquire()
        self._settled.release()


class Committer:
    """Group commit: records submitted from any thread are added by one thread, each batch
    in one transaction, so that issuances made while a commit runs share the next one and
    none waits longer than one commit for another's.  After each batch ``fileno()`` becomes
    readable, for a loop that polls; ``wait`` returns, for a thread that blocks."""

    def __init__(self, store: Store, metrics: Metrics | None = None):
        self.store, self._metrics = store, metrics
        self._start()

    def _start(self) -> None:
        self._lock = threading.Condition(threading.Lock())
        self._queue = []
        self._busy = self._wanted = False
        self._closing = False
        self._thread = None
        self._event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.batches = 0        # transactions committed or failed, in this process

    def forked(self) -> None:
        """Start afresh in a forked worker: no thread, no queue of the parent's."""
        with contextlib.suppress(OSError):
            os.close(self._event)
        self._start()

    def fileno(self) -> int:
        return self._event

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._event)

    def submit(self, record: Record) -> Ticket:
        """Queue ``record`` for the next commit: see ``flush`` and ``wait``."""
        ticket = Ticket(record)
        with self._lock:
            if self._closing and not (self._thread and self._thread.is_alive()):
                # Closed: nothing would commit it, and a waiter must not wait for ever.
                ticket.error = StoreError(f"{self.store.where}: closed")
                ticket.mark_done()
                return ticket
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sapid-commit",
                                                daemon=True)
                self._thread.start()
            self._queue.append(ticket)
        return ticket

    @property
    def queued(self) -> int:
        """Records waiting for a commit that has not begun."""
        return len(self._queue)

    def due(self, now: float) -> bool:
        """Whether a loop with more work at hand should flush anyway: enough records, or the
        first of them waiting long enough (see ``SigningServer.serve``)."""
        queue = self._queue
        return bool(queue) and (len(queue) >= FLUSH_RECORDS
                                or now - queue[0].queued_at >= FLUSH_SECONDS)

    def flush(self) -> None:
        """Have what was submitted committed, unless a commit runs (the records then go in
        the next).  A commit's sync costs the CPU of several certificates, so the reception
        loop flushes when it has nothing else at hand, or when ``due``: the signings it
        made meanwhile share one commit."""
        with self._lock:
            if self._queue and not self._busy:
                self._wanted = True
                self._lock.notify_all()

    def wait(self, ticket: Ticket) -> None:
        """Block until ``ticket`` is done, its batch begun now if no commit runs (or right
        after the one that does)."""
        if not ticket.done:
            with self._lock:
                self._wanted = True
                self._lock.notify()
            ticket.wait()

    def close(self) -> None:
        """Commit what was submitted, then end the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with contextlib.suppress(OSError):
            os.close(self._event)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._queue and self._wanted) and not self._closing:
                    self._lock.wait()
                if not self._queue:
                    return
                batch, self._queue, self._busy = self._queue, [], True
                self._wanted = False
            taken, error = set(), None
            started = time.monotonic()
            try:
                taken = self.store.add([ticket.record for ticket in batch])
            except Exception as e:  # noqa: BLE001 -- any failure is store_failed, never a hang
                error = e if isinstance(e, StoreError) else StoreError(
                    f"{self.store.where}: {_one_line(e)}")
                if not isinstance(e, StoreError):
                    log.exception("committing %d certificates failed", len(batch))
            if self._metrics is not None:
                self._metrics.observe("commit", time.monotonic() - started)
            with self._lock:
                for position, ticket in enumerate(batch):
                    ticket.taken, ticket.error = position in taken, error
                    ticket.mark_done()
                self.batches += 1
                self._busy = False
            with contextlib.suppress(OSError):
                os.eventfd_write(self._event, 1)


def prepare_store(store: Store, config: Config, progress=None) -> None:
    """Bring the store's schema forward and import an earlier sapid's files: once the rest of
    a start has succeeded, so that a setup that cannot start leaves no store behind.
    ``progress(count)`` is called as the import goes (see ``import_legacy``)."""
    try:
        store.prepare()
        import_legacy(store, config.state, progress or (lambda count: None))
    except BaseException:
        store.close()
        raise


def import_legacy(store: Store, folder: str, progress) -> None:
    """Bring sapid 0.1's records in ``folder`` (the journal ``issued.pem``, the index
    ``issued/`` and ``unjournaled/``) into the store, once: the store notes how the files
    looked, and imports again only when they changed.  The old files stay where they are."""
    journal = os.path.join(folder, LEGACY_JOURNAL)
    if not os.path.exists(journal):
        return
    look = json.dumps(_legacy_look(folder))
    # Per host and folder: hosts sharing a PostgreSQL store each import their own once.
    mark = f"legacy_import:{socket.gethostname()}:{os.path.realpath(folder)}"
    if store.meta(mark) == look:
        return
    found = added = 0
    batch = []

    def flush():
        nonlocal added
        if batch:
            added += len(batch) - len(store.add(batch))
            batch.clear()
            progress(found)

    for record in _journal_records(journal):
        found += 1
        batch.append(record)
        if len(batch) >= IMPORT_ROWS:
            flush()
    flush()
    journaled = found
    for sub in (LEGACY_INDEX, LEGACY_ASIDE):
        for records in _index_records(store, os.path.join(folder, sub)):
            found += len(records)
            batch.extend(records)
            flush()
    store.set_meta(mark, look)
    log.info("%s: imported %d certificates from %d journal records and %d index files of an "
             "earlier sapid into %s; the old files are left in place", folder, added, journaled,
             found - journaled, store.where)


def _legacy_look(folder: str) -> list:
    look = []
    for name in (LEGACY_JOURNAL, LEGACY_INDEX, LEGACY_ASIDE):
        try:
            info = os.stat(os.path.join(folder, name))
            look.append([name, info.st_ino, info.st_size, info.st_mtime_ns])
        except FileNotFoundError:
            pass
    return look


def _journal_records(path: str):
    """The whole records of a sapid 0.1 journal, read a piece at a time."""
    rest = b""
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            rest += chunk
            cut = rest.rfind(PEM_END) + len(PEM_END) if PEM_END in rest else 0
            matches = list(LEGACY_HEADER.finditer(rest, 0, cut))
            for match, following in zip(matches, [*matches[1:], None]):
                # A record ends at its PEM's end, never past the next header: a header whose
                # write was torn must not take the next record's certificate.
                end = rest.find(PEM_END, match.end(), following.start() if following else cut)
                if end < 0:
                    log.warning("%s: a record of serial %s without its certificate, not "
                                "imported", path, match[1].decode())
                    continue
                record = _legacy_record(rest[match.end():end + len(PEM_END)],
                                        match[2].decode(), match[3].decode())
                if record is not None and record.serial != match[1].decode():
                    log.warning("%s: the record of serial %s holds certificate %s; not "
                                "imported", path, match[1].decode(), record.serial)
                elif record is not None:
                    yield record
            rest = rest[cut:]
    if rest.strip():
        log.warning("%s: %d bytes of an unfinished last record, not imported", path, len(rest))


def _index_records(store: Store, folder: str):
    """Batches of the records of index files that the store lacks (a crash between an index
    file and its journal record left them: signed, never returned, client unknown).  The
    folder is read as it is listed, a batch at a time: a million names are never held."""
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        return
    with entries:
        while True:
            part = [entry.name[:-4] for entry in itertools.islice(
                (entry for entry in entries if LEGACY_NAME.fullmatch(entry.name)), INSERT_ROWS)]
            if not part:
                return
            yield _missing_records(store, folder, part)


def _missing_records(store: Store, folder: str, part: list[str]) -> list[Record]:
    present = store.present(part)
    records = []
    for serial in part:
        if serial in present:
            continue
        path = os.path.join(folder, f"{serial}.pem")
        try:
            moment = datetime.datetime.fromtimestamp(os.stat(path).st_mtime,
                                                     datetime.timezone.utc)
            pem = _read(path)
        except (OSError, ConfigError) as e:
            log.warning("%s: %s; not imported", path, e)
            continue
        record = _legacy_record(pem, "", iso_time(moment))
        if record is not None:
            records.append(record)
    return records


def _legacy_record(pem: bytes, client_id: str, at: str) -> Record | None:
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        issued_at = datetime.datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc)
        return Record.of(certificate, certificate.public_bytes(serialization.Encoding.DER),
                         client_id, issued_at)
    except ValueError as e:     # its extensions, too, are read only here
        log.warning("a record of an earlier sapid is not a certificate (%s); not imported", e)
        return None


# ---------------------------------------------------------------------------------------------
# Revocation: the store says what is revoked; the CRL and OCSP answers say it, signed by the CA
# ---------------------------------------------------------------------------------------------

# RFC 5280 5.3.1 CRLReason, by the names the RFC gives them.
REVOCATION_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
# The two RFC 5280 names sapid does not revoke with, and why.
UNOFFERED_REASONS = {
    "certificateHold": "a hold is meant to be released, and sapid's revocations are final",
    "removeFromCRL": "it belongs in delta CRLs only, which sapid does not publish",
}
# RFC 5280 5.3.1: the reason code SHOULD be absent rather than unspecified.
CRL_REASON_EXTENSIONS = {
    name: [x509.Extension(CRLEntryExtensionOID.CRL_REASON, False, x509.CRLReason(flag))]
    for name, flag in REVOCATION_REASONS.items() if flag is not x509.ReasonFlags.unspecified}
# A CRL is built again once this share of its life (thisUpdate to nextUpdate) has passed, so
# that relying parties that fetch it now and then never hold an expired one.
CRL_REFRESH = 0.5
# An OCSP answer is good for this long (its nextUpdate); nginx's stapling and other clients
# cache it that long at most.
OCSP_VALIDITY = datetime.timedelta(hours=1)
# Answers to requests without a nonce are reused for this long, while the status they state
# is still the store's: an RSA signature costs a millisecond.
OCSP_REUSE_SECONDS = 60.0
OCSP_CACHE_ENTRIES = 4096
# RFC 8954 2.1: a nonce of 1 to 32 octets; a longer one is refused as malformed.
OCSP_NONCE_OCTETS = 32
OCSP_MEDIA_TYPE = "application/ocsp-response"
# RFC 6960 4.2.1: the unsigned answers for a request that gets no status.
OCSP_ERRORS = {
    status: ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER)
    for status in (ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
                   ocsp.OCSPResponseStatus.INTERNAL_ERROR, ocsp.OCSPResponseStatus.TRY_LATER)}


def signs_crls(certificate: x509.Certificate) -> bool:
    """Whether relying parties accept CRLs signed with this CA certificate's key."""
    try:
        return certificate.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign
    except x509.ExtensionNotFound:
        return True              # RFC 5280 4.2.1.3: no keyUsage, no restriction


def revocation_reason(text: str | None) -> str:
    """The RFC 5280 name of a reason given in any letter case (None: unspecified);
    ValueError naming the choices."""
    if text is None:
        return "unspecified"
    by_lower = {name.lower(): name for name in [*REVOCATION_REASONS, *UNOFFERED_REASONS]}
    name = by_lower.get(str(text).lower())
    if name in UNOFFERED_REASONS:
        raise ValueError(f"{name} is not offered: {UNOFFERED_REASONS[name]}")
    if name is None:
        raise ValueError(f"{str(text)[:60]!r} is not a revocation reason; use one of "
                         f"{', '.join(REVOCATION_REASONS)}")
    return name


def parse_serial(text) -> str:
    """A serial as the store keys it (upper-case hex, even length) from hex as people write
    it (any case, colons allowed); ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError("a serial number is a string of hex digits")
    digits = text.strip().replace(":", "")
    if not re.fullmatch(r"[0-9A-Fa-f]{1,40}", digits):
        raise ValueError(f"{text[:60]!r} is not a serial number (hex, as sapid prints them)")
    value = int(digits, 16)
    if value == 0:
        raise ValueError("serial 00 is not a certificate's serial number")
    return serial_hex(value)


@dataclasses.dataclass(frozen=True)
class CRL:
    """A CRL built from the store when it had seen ``changes`` revocations."""

    der: bytes
    number: int
    this_update: datetime.datetime
    next_update: datetime.datetime
    changes: int
    entries: int

    @functools.cached_property
    def pem(self) -> bytes:
        return _pem("X509 CRL", self.der)


class Revocations:
    """What relying parties ask of the CA, answered from the store: the CRL, built when a
    revocation happened (in any worker or host) or half its life has passed and never per
    request, and OCSP answers, each from a lookup of the store, so that a revocation shows
    in the next one.  Both are signed by the CA key with cryptography's builders."""

    def __init__(self, identity: Identity, store: Store | None, crl_days: int,
                 authority_key_id: x509.Extension):
        self._certificate, self._key = identity.certificate, identity.key
        self._hash = signature_hash(identity.key) if identity.key is not None else None
        self._store = store
        self._crl_life = datetime.timedelta(days=crl_days)
        self._aki = authority_key_id
        self._crl = None
        self._crl_lock = threading.Lock()
        self._last_number = 0
        self._issuer_hashes = {}     # hash algorithm name -> (issuer name hash, key hash)
        self._answers = {}           # see _reusable
        self.signs_crls = signs_crls(identity.certificate)

    # The CRL ------------------------------------------------------------------------------

    def crl(self) -> CRL:
        """The current CRL.  StoreError only when the store cannot be read and no CRL built
        earlier is still within its nextUpdate (that one is served meanwhile)."""
        if not self.signs_crls:
            raise RequestError(404, "not_found", "this CA's certificate lacks the cRLSign key "
                               "usage, so it publishes no CRL")
        now = utcnow()
        crl, seen = self._crl, -1
        if crl is not None and now < crl.this_update + self._crl_life * CRL_REFRESH:
            try:
                seen = self._store.revocation_changes()
            except StoreError as e:
                log.error("CRL: %s; serving the one of %s", e, iso_time(crl.this_update))
                return crl
            if seen == crl.changes:       # not <=: a backup put back counts from lower
                return crl
        with self._crl_lock:           # one build at a time: who waited takes the one built
            if self._crl is not crl and (seen < 0 or self._crl.changes == seen):
                return self._crl
            try:
                built = self._build_crl(utcnow())
            except StoreError as e:
                if crl is not None and now < crl.next_update:
                    log.error("CRL: %s; serving the one of %s", e, iso_time(crl.this_update))
                    return crl
                raise
            self._crl = built
            return built

    def _build_crl(self, now: datetime.datetime) -> CRL:
        # RFC 5280 3.3: an entry stays until a CRL issued after its certificate expired has
        # listed it; CRLs are built as they are asked for, so it stays a CRL's life longer.
        changes, rows = self._store.revoked(now - self._crl_life)
        started = time.monotonic()
        # cRLNumber: thisUpdate in microseconds since 1970 (thisUpdate itself is encoded to the
        # second).  No counter is shared: hosts and restarts agree as their clocks do, and in
        # one process it never goes back even when the clock does.
        number = max(int(now.timestamp() * 1_000_000), self._last_number + 1)
        self._last_number = number
        this_update = now.replace(microsecond=0)
        entries = [x509.RevokedCertificateBuilder(
            int(serial, 16), at.replace(microsecond=0), CRL_REASON_EXTENSIONS.get(reason, [])
        ).build() for serial, at, reason in rows]
        # The builder is given its entries at once: add_revoked_certificate copies the list
        # each time, which would make a CRL of n entries cost n squared.
        builder = x509.CertificateRevocationListBuilder(
            issuer_name=self._certificate.subject, last_update=this_update,
            next_update=this_update + self._crl_life,
            extensions=[x509.Extension(ExtensionOID.CRL_NUMBER, False, x509.CRLNumber(number)),
                        self._aki],
            revoked_certificates=entries)
        der = builder.sign(self._key, self._hash).public_bytes(serialization.Encoding.DER)
        log.info("CRL %d built: %d revoked certificates, %d bytes, in %.3f s", number,
                 len(entries), len(der), time.monotonic() - started)
        return CRL(der, number, this_update, this_update + self._crl_life, changes, len(entries))

    # OCSP ---------------------------------------------------------------------------------

    def ocsp(self, der: bytes) -> bytes:
        """The DER OCSPResponse to the DER OCSPRequest ``der`` (RFC 6960): good, revoked or
        unknown (a serial this CA never issued, or another CA's certificate), the nonce
        echoed; malformedRequest for what cannot be read, tryLater when the store cannot."""
        try:
            request = ocsp.load_der_ocsp_request(der)
            algorithm = request.hash_algorithm
            name_hash, key_hash = request.issuer_name_hash, request.issuer_key_hash
            serial = request.serial_number
            nonce = None
            for extension in request.extensions:
                if isinstance(extension.value, x509.OCSPNonce):
                    nonce = extension.value
        except (ValueError, UnsupportedAlgorithm, NotImplementedError) as e:
            # NotImplementedError: more than one certificate in a request, which
            # cryptography's builders do not answer; TLS stacks ask for one at a time.
            log.info("OCSP: malformed request: %s", _one_line(e))
            return OCSP_ERRORS[ocsp.OCSPResponseStatus.MALFORMED_REQUEST]
        if nonce is not None and not 1 <= len(nonce.nonce) <= OCSP_NONCE_OCTETS:
            log.info("OCSP: a nonce of %d octets (RFC 8954: 1 to 32)", len(nonce.nonce))
            return OCSP_ERRORS[ocsp.OCSPResponseStatus.MALFORMED_REQUEST]
        known, revoked_at, reason = False, None, None
        if (name_hash, key_hash) == self._issuer_hash(algorithm) and 0 < serial < 1 << 160:
            try:
                known, revoked_at, reason = self._store.revocation(serial_hex(serial))
            except (StoreError, ConfigError) as e:
                log.error("OCSP: %s", e)
                return OCSP_ERRORS[ocsp.OCSPResponseStatus.TRY_LATER]
        key = (algorithm.name, name_hash, key_hash, serial, known, revoked_at, reason)
        if nonce is None and (answer := self._reusable(key)) is not None:
            return answer
        if not known:
            status = ocsp.OCSPCertStatus.UNKNOWN
        else:
            status = ocsp.OCSPCertStatus.REVOKED if revoked_at else ocsp.OCSPCertStatus.GOOD
        now = utcnow().replace(microsecond=0)
        flag = REVOCATION_REASONS.get(reason) if revoked_at else None
        try:
            builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
                name_hash, key_hash, serial, algorithm, status, now, now + OCSP_VALIDITY,
                revoked_at and revoked_at.replace(microsecond=0),
                None if flag is x509.ReasonFlags.unspecified else flag,
            ).responder_id(ocsp.OCSPResponderEncoding.HASH, self._certificate)
            if nonce is not None:
                builder = builder.add_extension(nonce, critical=False)
            answer = builder.sign(self._key, self._hash).public_bytes(serialization.Encoding.DER)
        except ValueError as e:            # hashes of the wrong length for their algorithm
            log.info("OCSP: malformed request: %s", _one_line(e))
            return OCSP_ERRORS[ocsp.OCSPResponseStatus.MALFORMED_REQUEST]
        if nonce is None:
            self._keep(key, answer)
        return answer

    def _issuer_hash(self, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
        """RFC 6960 4.1.1 CertID: the hashes of this CA's name (DER) and of its public key
        (the subjectPublicKey BIT STRING's value, without its unused-bits octet)."""
        if (known := self._issuer_hashes.get(algorithm.name)) is None:
            spki = spki_der(self._certificate.public_key())
            _, pos, _ = _der_read(spki, 0)          # SubjectPublicKeyInfo
            _, _, end = _der_read(spki, pos)        # AlgorithmIdentifier
            _, start, end = _der_read(spki, end)    # subjectPublicKey
            known = tuple(_digest(algorithm, data) for data in (
                self._certificate.subject.public_bytes(), spki[start + 1:end]))
            self._issuer_hashes[algorithm.name] = known
        return known

    def _reusable(self, key: tuple) -> bytes | None:
        kept = self._answers.get(key)
        if kept is not None and time.monotonic() - kept[1] < OCSP_REUSE_SECONDS:
            return kept[0]
        return None

    def _keep(self, key: tuple, answer: bytes) -> None:
        answers = self._answers
        if len(answers) >= OCSP_CACHE_ENTRIES:
            answers.clear()        # simpler than LRU, and the answers are a minute's worth
        answers[key] = (answer, time.monotonic())


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    digest = hashes.Hash(algorithm)
    digest.update(data)
    return digest.finalize()


# ---------------------------------------------------------------------------------------------
# EST (RFC 7030): enrolment as devices and network gear speak it, behind the TLS proxy that
# authenticates them; the same pipeline as /api/csr, other envelopes.
# ---------------------------------------------------------------------------------------------

EST_PREFIX = "/.well-known/est/"
# RFC 7030 3.2.2: the operation path segments sapid serves, with their methods.
EST_OPERATIONS = {"cacerts": ("GET", "HEAD"), "csrattrs": ("GET", "HEAD"),
                  "simpleenroll": ("POST",), "simplereenroll": ("POST",)}
# The optional operations sapid does not offer: 501 (RFC 7030 4.3, 4.4: server key generation
# would hold clients' private keys, which a CA must not; Full CMC is a protocol of its own).
EST_NOT_OFFERED = frozenset({"fullcmc", "serverkeygen"})
# RFC 7030 4.2.1: a PKCS#10 request comes as application/pkcs10; curl -d sends its own default.
EST_MEDIA_TYPES = ("application/pkcs10", "application/x-www-form-urlencoded")
# RFC 7030 4.1.3, 4.2.3: certs-only CMC Simple PKI Responses, base64 (RFC 8951 3.2: the body is
# base64 whatever Content-Transfer-Encoding says; older clients still look for the header).
EST_CACERTS_MEDIA_TYPE = "application/pkcs7-mime"
EST_CERTS_ONLY_MEDIA_TYPE = "application/pkcs7-mime; smime-type=certs-only"
EST_BASE64 = (("Content-Transfer-Encoding", "base64"),)
EST_ERROR_MEDIA_TYPE = "text/plain; charset=utf-8"
# The client id of an enrolment without a label (RFC 7030 3.2.2's optional path segment).
EST_CLIENT_ID = "est"
EST_REALM = "sapid EST"
# RFC 4648 4, once the line breaks RFC 7030 4.2.1 allows (RFC 2045 6.8) are taken out: each
# a single pass, linear in the body.
EST_LINE_BREAKS = re.compile(rb"[\r\n\t ]+")
EST_BASE64_BODY = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
EST_LINE = 64


@dataclasses.dataclass(frozen=True)
class Est:
    """How an EST enrolment came, as hooks see it in ``self.est`` (None for /api/csr)."""

    operation: str                  # "simpleenroll" or "simplereenroll"
    label: str | None               # the path's label, which is also the client id
    # The TLS client certificate the proxy verified and forwarded (trusted_proxy = yes only).
    client_certificate: x509.Certificate | None
    # This CA's record of that certificate, when it issued it and it is unexpired and unrevoked.
    current: Record | None
    # HTTP Basic credentials as sent: the proxy (nginx's auth_basic) or the hooks check them.
    username: str | None
    password: str | None = dataclasses.field(repr=False)     # never in a log line


def est_operation(path: str) -> tuple[str | None, str]:
    """(label, operation) of a path under /.well-known/est/ (RFC 7030 3.2.2); RequestError
    for a path that names no operation sapid serves."""
    segments = path[len(EST_PREFIX):].split("/")
    label, operation = (None, segments[0]) if len(segments) == 1 else (
        segments if len(segments) == 2 else (None, ""))
    if operation in EST_NOT_OFFERED:
        raise RequestError(501, "not_implemented", f"EST {operation} is not offered here: "
                           "enrol with simpleenroll")
    if operation not in EST_OPERATIONS:
        raise RequestError(404, "not_found", f"no such EST resource: {path[:100]}")
    if label is not None and not CLIENT_ID.match(label):
        raise RequestError(400, "bad_client_id",
                           "the EST label must be 1 to 128 letters and digits")
    return label, operation


def est_csr(body: bytes) -> bytes:
    """The DER of the PKCS#10 request an EST body carries as base64 (RFC 7030 4.2.1)."""
    if body.lstrip().startswith(b"-----BEGIN"):
        raise RequestError(400, "not_a_csr", "EST takes the CSR as base64 DER without PEM "
                           "lines: send the text between BEGIN and END, or "
                           "openssl req -outform DER | base64")
    compact = EST_LINE_BREAKS.sub(b"", body)
    if not EST_BASE64_BODY.fullmatch(compact):
        raise RequestError(400, "not_a_csr", "the body is not base64: EST takes a DER PKCS#10 "
                           "request in base64 (RFC 7030 4.2.1)")
    try:
        der = base64.b64decode(compact, validate=True)
    except ValueError:
        der = b""
    if not der:
        raise RequestError(400, "not_a_csr", "the body's base64 is cut short or empty: EST "
                           "takes a DER PKCS#10 request in base64 (RFC 7030 4.2.1)")
    return der


def est_certs_only(certificates) -> bytes:
    """A certs-only CMC Simple PKI Response (RFC 5272 4.1, RFC 7030 4.1.3), base64 in lines."""
    encoded = base64.b64encode(pkcs7.serialize_certificates(list(certificates),
                                                            serialization.Encoding.DER))
    return b"".join(encoded[i:i + EST_LINE] + b"\r\n" for i in range(0, len(encoded), EST_LINE))


def basic_credentials(value: str | None) -> tuple[str, str] | None:
    """(user-id, password) of an ``Authorization: Basic`` header (RFC 7617 2), else None."""
    scheme, _, token = (value or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except ValueError:              # UnicodeDecodeError is one too
        decoded = ""
    user, colon, password = decoded.partition(":")
    if not colon:
        raise RequestError(400, "bad_request", "the Authorization header's Basic credentials "
                           "are not base64 of user-id:password (RFC 7617 2)")
    return user, password


def renewing(certificate: x509.Certificate, checked: CheckedCSR) -> None:
    """RFC 7030 4.2.2: a re-enrolment keeps the Subject and subjectAltName of the certificate
    it renews; 400 name_refused otherwise."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = ()
    if checked.subject != certificate.subject:
        raise RequestError(400, "name_refused", "simplereenroll keeps the subject of the "
                           f"certificate it renews ({subject_text(certificate.subject)!r}); the "
                           f"CSR asks for {subject_text(checked.subject)!r} (RFC 7030 4.2.2)")
    if set(names) != set(checked.subject_alt_names):
        raise RequestError(400, "name_refused", "simplereenroll keeps the subjectAltName of the "
                           f"certificate it renews ({', '.join(map(san_text, names)) or 'none'});"
                           " the CSR asks for "
                           f"{', '.join(map(san_text, checked.subject_alt_names)) or 'none'} "
                           "(RFC 7030 4.2.2)")


def forwarded_certificate(headers: dict) -> x509.Certificate | None:
    """The TLS client certificate a trusted proxy verified: X-SSL-Client-Verify SUCCESS and
    X-SSL-Client-Cert, its PEM URL-encoded (nginx's $ssl_client_escaped_cert)."""
    if headers.get("x-ssl-client-verify") != "SUCCESS" or not headers.get("x-ssl-client-cert"):
        return None
    try:
        return x509.load_pem_x509_certificate(
            urllib.parse.unquote(headers["x-ssl-client-cert"]).encode("latin-1"))
    except ValueError:
        raise RequestError(400, "bad_request", "the proxy's X-SSL-Client-Cert is not a URL-"
                           "encoded PEM certificate (nginx: $ssl_client_escaped_cert)") from None


# ---------------------------------------------------------------------------------------------
# Metrics: counters and histograms the forked workers share, for GET /api/metrics
# ---------------------------------------------------------------------------------------------

# Seconds; Prometheus' client defaults, which span a signature (a millisecond) to a slow hook.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Every error code of the API (sapid(8)), in the order of its table.
ERROR_CODES = ("bad_request", "bad_client_id", "not_a_csr", "bad_csr_signature",
               "weak_csr_signature", "key_refused", "name_refused", "not_authenticated",
               "not_authorized", "not_found", "method_not_allowed", "request_timeout",
               "length_required", "too_large", "unsupported_media_type", "hook_error",
               "internal_error", "not_implemented", "hook_timeout", "store_failed",
               "shutting_down")
HISTOGRAMS = {
    "request": ("sapid_request_duration_seconds",
                "Time from a request's last byte to its answer, each request read whole."),
    "commit": ("sapid_store_commit_duration_seconds",
               "Time of one store commit of a batch of certificates."),
    "hook": ("sapid_hook_duration_seconds", "Time of one call of operator hook code."),
}
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Counters and histograms of every process, in anonymous shared memory made before the
    workers are forked: each process adds to its own slot, under its own lock (no lock is
    shared between processes), and a scrape, whichever worker takes it, sums the slots."""

    def __init__(self, workers: int = 1):
        self._index = {"issued": 0, "workers": 1}
        for code in ERROR_CODES:
            self._index[f"refused:{code}"] = len(self._index)
        for name in HISTOGRAMS:
            for bucket in range(len(LATENCY_BUCKETS) + 1):       # the last one: +Inf
                self._index[f"{name}:{bucket}"] = len(self._index)
            self._index[f"{name}:sum"] = len(self._index)
        self._size, self._workers = len(self._index), workers
        self._memory = mmap.mmap(-1, 8 * self._size * workers)
        self._lock = threading.Lock()
        self.slot = 0
        self.set_workers(1 if workers == 1 else 0)    # the supervisor counts those it forks

    def _add(self, *pairs) -> None:
        """Add each (key, amount) to this process's slot, under one taking of the lock."""
        base = self.slot * self._size
        with self._lock:
            for key, amount in pairs:
                offset = 8 * (base + self._index[key])
                value, = struct.unpack_from("d", self._memory, offset)
                struct.pack_into("d", self._memory, offset, value + amount)

    def issued(self) -> None:
        self._add(("issued", 1))

    def refused(self, code: str) -> None:
        if f"refused:{code}" in self._index:
            self._add((f"refused:{code}", 1))

    def observe(self, histogram: str, seconds: float) -> None:
        self._add((f"{histogram}:{bisect.bisect_left(LATENCY_BUCKETS, seconds)}", 1),
                  (f"{histogram}:sum", seconds))

    def set_workers(self, alive: int) -> None:
        """The supervisor's count of live workers (slot 0's cell; the others stay 0)."""
        struct.pack_into("d", self._memory, 8 * self._index["workers"], float(alive))

    def _sums(self) -> list[float]:
        values = struct.unpack_from(f"{self._size * self._workers}d", self._memory)
        return [sum(values[slot * self._size + n] for slot in range(self._workers))
                for n in range(self._size)]

    def text(self, store: Store) -> str:
        """The Prometheus text format (0.0.4) of it all, with what the store holds."""
        sums, index = self._sums(), self._index
        lines = []

        def family(name: str, kind: str, help_text: str, samples) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        family("sapid_certificates_issued_total", "counter",
               "Certificates signed, committed to the store and answered.",
               [("", sums[index["issued"]])])
        family("sapid_requests_refused_total", "counter",
               "Requests answered with an error, by its code.",
               [(f'{{code="{code}"}}', sums[index[f"refused:{code}"]]) for code in ERROR_CODES])
        for name, (metric, help_text) in HISTOGRAMS.items():
            counts = [sums[index[f"{name}:{n}"]] for n in range(len(LATENCY_BUCKETS) + 1)]
            running, samples = 0.0, []
            for bound, count in zip([*map(_number, LATENCY_BUCKETS), "+Inf"], counts):
                running += count
                samples.append((f'_bucket{{le="{bound}"}}', running))
            samples += [("_sum", sums[index[f"{name}:sum"]]), ("_count", running)]
            lines.extend([f"# HELP {metric} {help_text}", f"# TYPE {metric} histogram"])
            lines.extend(f"{metric}{suffix} {_number(value)}" for suffix, value in samples)
        family("sapid_workers_alive", "gauge", "Processes serving requests.",
               [("", sums[index["workers"]])])
        try:
            count, revoked = store.count(), store.revocation_changes()
            up = 1
        except (StoreError, ConfigError) as e:
            log.error("metrics: %s", e)
            up = 0
        family("sapid_store_up", "gauge", "Whether the store could be read for this scrape.",
               [("", up)])
        if up:
            family("sapid_certificates_stored", "gauge",
                   "Certificates in the store, whoever added them.", [("", count)])
            family("sapid_revocations_total", "counter",
                   "Revocations in the store, whoever made them.", [("", revoked)])
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ---------------------------------------------------------------------------------------------
# Hook runner: operator code on daemon threads, so a hung hook costs a thread, not the daemon
# ---------------------------------------------------------------------------------------------

class ThreadPool:
    """Up to ``limit`` daemon threads, started on demand, running tasks in order.  Daemon
    threads, unlike ThreadPoolExecutor's, are not joined at exit: one that a hook holds for
    ever cannot keep the daemon from stopping.

    With ``spawn_after``, a thread is added only when no task was taken for that long while
    some wait (see ``tick``): fast tasks then share a thread or two instead of waking one
    each (every waking thread contends for the GIL), and slow ones still get more."""

    def __init__(self, limit: int, name: str, spawn_after: float = 0.0):
        self._limit, self._name, self._spawn_after = limit, name, spawn_after
        self._tasks = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = self._pending = 0
        self._taken = 0.0              # when a thread last took a task

    def submit(self, function, *args) -> None:
        with self._lock:
            self._pending += 1
            self._spawn(time.monotonic())
        self._tasks.put((function, args))

    @property
    def waiting(self) -> bool:
        """Whether tasks wait for a thread."""
        return self._pending > self._idle

    def tick(self, now: float) -> None:
        """Add a thread if the tasks waiting have been left waiting ``spawn_after``."""
        if self._pending > self._idle:
            with self._lock:
                self._spawn(now)

    def _spawn(self, now: float) -> None:
        if self._pending > self._idle and self._threads < self._limit and (
                not self._threads or now - self._taken >= self._spawn_after):
            self._threads += 1
            self._taken = now
            threading.Thread(target=self._work, name=self._name, daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            function, args = self._tasks.get()
            with self._lock:
                self._idle -= 1
                self._pending -= 1
                self._taken = time.monotonic()
            try:
                function(*args)
            except BaseException:   # noqa: BLE001 -- each task handles its own; this keeps
                log.exception("internal error in %s", self._name)      # the thread


class HookRunner:
    """Runs hook calls with a timeout on a bounded set of daemon threads started on demand,
    for callers that block (pool threads, ``sapid sign``); the reception thread runs its
    requests' hooks as HookCalls instead (SigningServer._run_hook)."""

    def __init__(self, limit: int, metrics: Metrics | None = None):
        self.metrics = metrics
        self.threads = ThreadPool(limit, "sapid-hook")

    def call(self, timeout: float, function, *args):
        future = Future()
        self.threads.submit(self._run, future, function, args)
        started = time.monotonic()
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise RequestError(503, "hook_timeout",
                               f"a hook did not finish within {timeout:g} s") from None
        finally:
            if self.metrics is not None:
                self.metrics.observe("hook", time.monotonic() - started)

    @staticmethod
    def _run(future: Future, function, args) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(function(*args))
            except BaseException as e:  # handed to the waiting request
                future.set_exception(e)


# ---------------------------------------------------------------------------------------------
# Authority: the signing pipeline
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Issued:
    """A signed certificate and what the reply says of it."""

    certificate: x509.Certificate
    pem: bytes
    serial: str
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class Pending:
    """A certificate signed and on its way into the store: ``Authority.issue`` returns it,
    and once ``ticket.done``, ``Authority.settle`` tells what to answer."""

    issued: Issued
    ticket: Ticket
    authority: Authority
    client_id: str
    subject: str                  # the CSR's, as audited
    csr_subject: x509.Name
    csr_fingerprint: str
    draft: Draft
    hooks: SigningHooks | None
    attempt: int = 1


@dataclasses.dataclass(frozen=True)
class Signing:
    """One signing request as the pipeline takes it."""

    body: bytes
    client_id: str
    peer: tuple | None = None
    headers: Headers | None = None
    est: Est | None = None


class Revoking(Signing):
    """One ``POST /api/revoke/<client_id>`` as the pipeline takes it: the same parts."""


@dataclasses.dataclass(frozen=True)
class HookCall:
    """Operator code that a signing runs next, which may block: ``run`` it on a thread that
    may wait (a pool thread, or a hook thread for the reception thread, which keeps the
    time), then ``resume`` with what it gave, on the thread that asked.  ``audit`` is the
    refusal's audit line but its code and reason."""

    authority: Authority
    phase: str
    function: Callable
    args: tuple
    then: Callable                # the hook's result -> what follows (Pending, Issued, ...)
    audit: tuple

    def run(self) -> tuple:
        """(result, None) or (None, the exception), after running the hook here."""
        try:
            return self.function(*self.args), None
        except BaseException as e:  # noqa: BLE001 -- judged by resume, on the asking thread
            return None, e

    def run_with_timeout(self) -> tuple:
        """``run`` on a hook thread, waiting at most ``hook_timeout`` (RequestError then)."""
        runner = self.authority.runner
        try:
            return runner.call(self.authority.config.hook_timeout, self.function,
                               *self.args), None
        except BaseException as e:  # noqa: BLE001
            return None, e

    def resume(self, result, error: BaseException | None):
        """What follows: ``then(result)``, or the refusal ``error`` makes, audited."""
        if error is None:
            return self.then(result)
        refusal = self.authority.hook_refusal(self.phase, error)
        audit(*self.audit, refusal.code, refusal.message)
        raise refusal


EXTENSION_LEAF = x509.Extension(ExtensionOID.BASIC_CONSTRAINTS, True,
                                x509.BasicConstraints(ca=False, path_length=None))
EXTENSION_EKU = x509.Extension(ExtensionOID.EXTENDED_KEY_USAGE, False, x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]))


def _key_usage(key_encipherment: bool) -> x509.Extension:
    return x509.Extension(ExtensionOID.KEY_USAGE, True, x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=key_encipherment,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False))


EXTENSION_USAGE_RSA = _key_usage(True)
EXTENSION_USAGE = _key_usage(False)


class Authority:
    """The CA at work: identity, hooks, configuration and the committer into the store, fixed
    until a reload."""

    def __init__(self, config: Config, identity: Identity, hooks: HookSet,
                 committer: Committer | None, runner: HookRunner, store: Store | None = None):
        self.config, self.identity, self.hooks = config, identity, hooks
        self.committer, self.runner, self.store = committer, runner, store
        # Per-request constants, worked out once.
        certificate = identity.certificate
        self._issuer = certificate.subject
        self._not_after_limit = certificate.not_valid_after_utc
        self._hash = signature_hash(identity.key) if identity.key is not None else None
        try:
            ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(certificate.public_key())
        self._aki = x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki)
        self.revocations = Revocations(identity, store, config.crl_days, self._aki)
        # Where relying parties learn of revocations, named in each certificate.
        self._pointers = {}
        if config.crl_url:
            self._pointers[ExtensionOID.CRL_DISTRIBUTION_POINTS] = x509.Extension(
                ExtensionOID.CRL_DISTRIBUTION_POINTS, False, x509.CRLDistributionPoints([
                    x509.DistributionPoint([x509.UniformResourceIdentifier(config.crl_url)],
                                           None, None, None)]))
        if config.ocsp_url:
            self._pointers[ExtensionOID.AUTHORITY_INFORMATION_ACCESS] = x509.Extension(
                ExtensionOID.AUTHORITY_INFORMATION_ACCESS, False,
                x509.AuthorityInformationAccess([x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP,
                    x509.UniformResourceIdentifier(config.ocsp_url))]))
        self.ca_pem = identity.pem()
        self.ca_pem_json = json.dumps(self.ca_pem.decode())
        self.est_cacerts = est_certs_only((certificate, *identity.chain))
        self._backdate = datetime.timedelta(seconds=config.backdate_seconds)
        self._validity = datetime.timedelta(days=config.validity_days)

    @classmethod
    def open(cls, config: Config, passphrase: str | None, runner: HookRunner,
             committer: Committer | None, store: Store | None = None) -> Authority:
        """Load identity and hooks, call ``boot``; sign into ``committer``, revoke in and
        answer for ``store`` (the committer's)."""
        identity = Identity.load(config.identity, passphrase, config.strict_files)
        if config.crl_url and not signs_crls(identity.certificate):
            raise ConfigError(f"crl_url is set, but the CA certificate in {identity.folder} "
                              "lacks the cRLSign key usage: relying parties would refuse "
                              "its CRLs")
        hooks = load_hooks(config.hooks_path(), config.strict_files)
        try:
            hooks.boot(AuthorityInfo(identity.certificate, identity.chain, config))
        except (Exception, SystemExit) as e:
            where = hooks.path or "built-in hooks"
            raise ConfigError(f"{where}:{_error_line(e, where)}: boot refused: "
                              f"{type(e).__name__}: {_one_line(e)}") from None
        return cls(config, identity, hooks, committer, runner, store)

    # The pipeline -----------------------------------------------------------------------------

    def issue(self, signing: Signing) -> Pending | HookCall:
        """Check, authorize, draft, presign, sign, and submit to the store: the certificate
        and its durability ticket, or first the HookCall of authorize and presign when the
        hooks define them.  Refusals raise RequestError; each is audited."""
        subject = csr_fingerprint = None
        try:
            csr = parse_csr(signing.body)
            csr_fingerprint = hashlib.sha256(signing.body).hexdigest()
            checked = check_csr(csr)
            subject = subject_text(checked.subject)
            if signing.est is not None and signing.est.operation == "simplereenroll":
                renewing(signing.est.client_certificate, checked)
            then = functools.partial(self._sign_prepared, signing.client_id, checked, subject,
                                     csr_fingerprint)
            if self.hooks.custom & (SIGNING_HOOKS - {"postsign"}):
                return HookCall(self, "authorize/presign", self._prepare, (signing, checked),
                                then, ("refused", signing.client_id, subject, None,
                                       csr_fingerprint))
            prepared = self._prepare(signing, checked)
        except RequestError as e:
            audit("refused", signing.client_id, subject, None, csr_fingerprint, e.code, e.message)
            raise
        return then(prepared)

    def _sign_prepared(self, client_id: str, checked: CheckedCSR, subject: str,
                       csr_fingerprint: str, prepared: tuple) -> Pending:
        instance, draft = prepared
        return self._submit(draft, client_id, (checked.subject, subject), csr_fingerprint,
                            instance)

    def settle(self, pending: Pending) -> Issued | Pending | HookCall:
        """What a done ticket means: the certificate (audited; first the HookCall of
        postsign when there is one), a new Pending when its serial was taken (signed again
        with another), or RequestError."""
        ticket, issued = pending.ticket, pending.issued
        subject, client_id = pending.subject, pending.client_id
        if ticket.taken and pending.attempt < SERIAL_ATTEMPTS:
            log.warning("serial %s is taken; drawing another", issued.serial)
            redraw = functools.partial(self._resubmit, pending)
            if "serial_number" in self.hooks.custom:
                return HookCall(self, "serial_number", self.hooks.draw_serial, (), redraw,
                                ("refused", client_id, subject, None, pending.csr_fingerprint))
            return redraw(self.hooks.draw_serial())
        if ticket.taken or ticket.error is not None:
            if ticket.taken:
                error = RequestError(503, "store_failed", "no unused serial number could be drawn")
            else:
                log.error("certificate %s not recorded, so not returned: %s", issued.serial,
                          ticket.error)
                error = RequestError(503, "store_failed",
                                     "the CA cannot record certificates right now")
            audit("refused", client_id, subject, None, pending.csr_fingerprint, error.code,
                  error.message)
            raise error
        audit("issued", client_id, subject, issued.serial, issued.fingerprint)
        if "postsign" in self.hooks.custom:
            certificate = issued.certificate
            if getattr(pending.hooks, "ssl_api_shapes", False):
                certificate = M2Certificate(certificate=certificate)
            return HookCall(self, "postsign", pending.hooks.postsign, (certificate,),
                            lambda _: issued, ("withheld", client_id, subject, issued.serial,
                                               issued.fingerprint))
        return issued

    def _resubmit(self, pending: Pending, serial) -> Pending:
        pending.draft.serial_number = serial
        return self._submit(pending.draft, pending.client_id,
                            (pending.csr_subject, pending.subject), pending.csr_fingerprint,
                            pending.hooks, pending.attempt + 1)

    def wait(self, outcome: Pending | HookCall) -> Issued:
        """Block until ``outcome`` is a certificate (a pool thread, ``sapid sign``): hooks
        run with the timeout, tickets waited for, then settled."""
        while not isinstance(outcome, Issued):
            if isinstance(outcome, HookCall):
                outcome = outcome.resume(*outcome.run_with_timeout())
            else:
                self.committer.wait(outcome.ticket)
                outcome = self.settle(outcome)
        return outcome

    def revoke(self, revoking: Revoking) -> dict:
        """Revoke for a client over the API, as the hook ``authorize_revocation`` decides (the
        built-in one refuses): what the reply says.  Refusals raise RequestError; each
        outcome is audited."""
        client_id, record = revoking.client_id, None
        try:
            try:
                try:
                    asked = json.loads(revoking.body)
                except ValueError:
                    asked = None
                if not isinstance(asked, dict) or set(asked) - {"serial", "reason"}:
                    raise ValueError('the body is not a JSON object {"serial": "...", '
                                     '"reason": "..."}')
                serial = parse_serial(asked.get("serial"))
                reason = revocation_reason(asked.get("reason"))
            except ValueError as e:         # JSONDecodeError and UnicodeDecodeError included
                raise RequestError(400, "bad_request", _one_line(e)) from None
            if "authorize_revocation" not in self.hooks.custom:
                # Before the store is read: the answer tells nothing of which serials exist.
                raise RequestError(403, "not_authorized", "revocation over the API is off: "
                                   "this CA's hooks have no authorize_revocation (sapid-hooks(5))")
            try:
                record = self.store.get(serial)
            except (StoreError, ConfigError) as e:     # ConfigError: an unreadable credential
                log.error("revocation of %s: %s", serial, e)
                raise RequestError(503, "store_failed", "the CA cannot read its store right "
                                   "now") from None
            if record is None:
                raise RequestError(404, "not_found", f"this CA issued no certificate with "
                                   f"serial {serial}")
            answer = self._call("authorize_revocation", self._authorize_revocation, revoking,
                                record, reason)
            if answer is not True:
                if answer is not False and answer is not None:
                    log.error("hook authorize_revocation returned %s: True or False expected; "
                              "refused", type(answer).__name__)
                raise RequestError(403, "not_authorized", "not authorized to revoke this "
                                   "certificate")
            try:
                record, revoked = self.store.revoke(serial, reason, utcnow())
            except (StoreError, ConfigError) as e:
                log.error("revocation of %s: %s", serial, e)
                raise RequestError(503, "store_failed", "the CA cannot record revocations right "
                                   "now") from None
        except RequestError as e:
            audit("revocation_refused", client_id, record and record.subject,
                  record and record.serial, record and record.sha256, e.code, e.message)
            raise
        audit("revoked" if revoked else "already_revoked", record.client_id, record.subject,
              record.serial, record.sha256, revocation_reason=record.revocation_reason,
              by=f"client {client_id} (POST /api/revoke)")
        return {"serial": record.serial, "status": "revoked",
                "revoked_at": iso_time(record.revoked_at),
                "revocation_reason": record.revocation_reason, "already_revoked": not revoked}

    def _authorize_revocation(self, revoking: Revoking, record: Record, reason: str):
        instance = self.hooks.new(revoking.client_id, None, None, None)
        instance.peer, instance.record = revoking.peer, record
        if revoking.headers is not None:
            instance.headers = revoking.headers
        return instance.authorize_revocation(x509.load_der_x509_certificate(record.der), reason)

    def est(self, operation: str, label: str | None, headers: dict) -> Est:
        """What an EST enrolment shows of its client, checked as far as sapid can: the
        forwarded certificate against this CA and its records (a store read)."""
        certificate = forwarded_certificate(headers) if self.config.trusted_proxy else None
        basic = basic_credentials(headers.get("authorization"))
        current, why = self._standing(certificate) if certificate is not None else (None, None)
        est = Est(operation, label, certificate, current, *(basic or (None, None)))
        self._admit(est, why)
        return est

    def _standing(self, certificate: x509.Certificate) -> tuple[Record | None, str | None]:
        """(this CA's record of ``certificate``, None) when it is this CA's, unexpired and
        unrevoked; else (None, why not)."""
        ca = self.identity.certificate
        try:
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return None, "the client certificate was not issued by this CA"
        now = utcnow()
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            return None, "the client certificate is not valid now"
        try:
            record = self.store.get(serial_hex(certificate.serial_number))
        except (StoreError, ConfigError) as e:
            log.error("EST: %s", e)
            raise RequestError(503, "store_failed", "the CA cannot read its store right "
                               "now") from None
        if record is None or record.der != certificate.public_bytes(serialization.Encoding.DER):
            return None, "the client certificate is not in this CA's records"
        if record.revoked_at is not None:
            return None, "the client certificate is revoked"
        return record, None

    def _admit(self, est: Est, why: str | None) -> None:
        """RFC 7030 4.2.2: re-enrolment renews the certificate the client shows, under its
        client id.  Any enrolment shows a certificate the proxy verified or Basic credentials
        (401 asks for them: the challenge EST clients answer).  Which suffice, the hook
        ``authorize`` decides; the built-in one takes a current certificate of this CA, or
        Basic credentials (checked by the trusted proxy).  A certificate the proxy verified
        that is not a current one of this CA is refused, whatever comes with it and whatever
        the hooks: revoked, expired, unknown, or another CA's (a parent's, say)."""
        if est.operation == "simplereenroll":
            if est.current is None:
                unseen = ("none was shown, or the proxy did not verify it" if
                          self.config.trusted_proxy else "sapid believes the proxy's word on "
                          "it only with trusted_proxy = yes")
                raise RequestError(403, "not_authorized", "simplereenroll renews the "
                                   "certificate shown as the TLS client certificate: " + (
                                       why or unseen))
            if est.label is not None and est.label != est.current.client_id:
                raise RequestError(403, "not_authorized", "simplereenroll renews under the "
                                   "client id of the certificate it renews, "
                                   f"{est.current.client_id!r}, not {est.label!r}")
        custom = "authorize" in self.hooks.custom
        if not custom and not self.config.trusted_proxy:
            raise RequestError(403, "not_authorized", "EST enrolment with the built-in hooks "
                               "needs trusted_proxy = yes: the TLS proxy in front of sapid "
                               "authenticates EST clients")
        if why is not None:
            raise RequestError(403, "not_authorized", why)
        if est.client_certificate is None and est.username is None:
            raise RequestError(401, "not_authenticated", "EST enrolment needs a client "
                               "certificate of this CA or HTTP Basic credentials",
                               (("WWW-Authenticate", f'Basic realm="{EST_REALM}"'),))

    def _call(self, phase: str, function, *args):
        """Run operator code with the hook timeout, blocking; its failures become 403 or 500."""
        try:
            return self.runner.call(self.config.hook_timeout, function, *args)
        except BaseException as e:        # noqa: BLE001 -- every failure of operator code
            raise self.hook_refusal(phase, e) from None

    def hook_refusal(self, phase: str, error: BaseException) -> RequestError:
        """What a hook's failure answers: its RequestError, 403 for NotAuthorized, else 500
        (logged with its traceback; sys.exit() in a hook must not leave the client hanging,
        nor stop the thread that reads requests)."""
        if isinstance(error, RequestError):
            return error
        if isinstance(error, NotAuthorized):
            return RequestError(403, "not_authorized", str(error) or "not authorized")
        # Whatever else it raised (SystemExit, KeyboardInterrupt, CancelledError included:
        # hooks run on threads of their own, where nothing of that kind is the daemon's).
        log.error("hook %s failed (%s)", phase, self.hooks.path, exc_info=error)
        return RequestError(500, "hook_error", "a hook of this CA failed; its log has the details")

    def _prepare(self, signing: Signing, checked: CheckedCSR):
        """Hooks instance, authorize, draft and presign: everything before the key is used.
        With the built-in hooks no instance is made: nothing would read it."""
        custom = self.hooks.custom
        instance = self._hooks_instance(signing, checked) if custom else None
        validity = self._validity
        ssl_api = getattr(instance, "ssl_api_shapes", False)
        if "authorize" in custom:
            names = list(checked.subject_alt_names)
            try:
                answer = instance.authorize(ssl_api_names(names) if ssl_api else names)
            except NotAuthorized as e:
                raise RequestError(403, "not_authorized", str(e) or "not authorized") from None
            if answer is False:
                raise RequestError(403, "not_authorized", "not authorized")
            if isinstance(answer, datetime.timedelta):
                if answer <= datetime.timedelta(0):
                    raise HookError(f"authorize returned a validity of {answer}, not positive")
                validity = answer
            elif answer is not None and answer is not True:
                raise HookError(f"authorize returned {type(answer).__name__}: None, a timedelta "
                                "or False expected")
        draft = self.draft(checked, validity)
        if "presign" in custom:
            instance.presign(M2Certificate(draft=draft) if ssl_api else draft)
        return instance, draft

    def _hooks_instance(self, signing: Signing, checked: CheckedCSR) -> SigningHooks:
        csr = checked.csr
        pem = signing.body.decode("ascii", "replace") if signing.body.lstrip()[:1] == b"-" else (
            csr.public_bytes(serialization.Encoding.PEM).decode())
        instance = self.hooks.new(signing.client_id, hashlib.sha1(checked.spki).hexdigest(), csr,
                                  pem)
        instance.peer, instance.est = signing.peer, signing.est
        if signing.headers is not None:
            instance.headers = signing.headers
        return instance

    def draft(self, checked: CheckedCSR, validity: datetime.timedelta) -> Draft:
        """The default profile of DESIGN.md for this CSR."""
        now = utcnow()
        public_key = checked.public_key
        extensions = {
            ExtensionOID.BASIC_CONSTRAINTS: EXTENSION_LEAF,
            ExtensionOID.KEY_USAGE: (EXTENSION_USAGE_RSA if isinstance(public_key, rsa.RSAPublicKey)
                                     else EXTENSION_USAGE),
            ExtensionOID.EXTENDED_KEY_USAGE: EXTENSION_EKU,
            ExtensionOID.SUBJECT_KEY_IDENTIFIER: x509.Extension(
                ExtensionOID.SUBJECT_KEY_IDENTIFIER, False,
                x509.SubjectKeyIdentifier.from_public_key(public_key)),
            ExtensionOID.AUTHORITY_KEY_IDENTIFIER: self._aki,
        }
        if checked.subject_alt_names:
            extensions[ExtensionOID.SUBJECT_ALTERNATIVE_NAME] = x509.Extension(
                ExtensionOID.SUBJECT_ALTERNATIVE_NAME, not len(checked.subject),
                x509.SubjectAlternativeName(checked.subject_alt_names))
        extensions.update(self._pointers)
        return Draft(checked.subject, public_key, self.hooks.draw_serial(), now - self._backdate,
                     min(now + validity, self._not_after_limit), extensions)

    def sign(self, draft: Draft) -> x509.Certificate:
        """Sign ``draft`` with cryptography's CertificateBuilder: a CA signs what its X.509
        library built.  Validity is clamped to the CA's own whatever presign did."""
        try:
            not_before = _aware(draft.not_valid_before)
            not_after = min(_aware(draft.not_valid_after), self._not_after_limit)
            if not_after <= not_before:
                raise HookError("the draft's not_valid_after is not after its not_valid_before")
            if not_before < EARLIEST_TIME:
                # cryptography 48 panics (a BaseException) on a time before 1950.
                raise ValueError(f"not_valid_before {not_before} is before 1950")
            if not isinstance(draft.subject, x509.Name):
                raise TypeError(f"subject is {type(draft.subject).__name__}, not an x509.Name")
            for extension in draft.extensions.values():
                if not isinstance(extension, x509.Extension):
                    raise TypeError(f"{type(extension).__name__} in the extensions, not an "
                                    "x509.Extension")
            builder = x509.CertificateBuilder(
                issuer_name=self._issuer, subject_name=draft.subject,
                public_key=draft.public_key,
                serial_number=normalize_serial(draft.serial_number),
                not_valid_before=not_before, not_valid_after=not_after,
                extensions=list(draft.extensions.values()))
            return builder.sign(self.identity.key, self._hash)
        except (TypeError, ValueError, AttributeError, NotImplementedError) as e:
            raise HookError(f"the draft cannot be signed: {_one_line(e)}") from None

    def _submit(self, draft: Draft, client_id: str, subject: tuple, csr_fingerprint: str,
                instance: SigningHooks | None, attempt: int = 1) -> Pending:
        """Sign ``draft`` and submit its record (a refusal audited).  ``subject`` is the CSR's
        name and its text: the record takes its names from the draft that was signed, not by
        parsing the certificate again (a tenth of a request's CPU)."""
        name, text = subject
        try:
            certificate = self.sign(draft)
        except HookError:
            log.exception("presign left a draft that cannot be signed")
            error = RequestError(500, "hook_error",
                                 "a hook of this CA failed; its log has the details")
            audit("refused", client_id, text, None, csr_fingerprint, error.code, error.message)
            raise error from None
        der = certificate.public_bytes(serialization.Encoding.DER)
        names = draft.extensions.get(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        record = Record(serial_hex(certificate.serial_number), client_id,
                        text if draft.subject is name else subject_text(draft.subject),
                        tuple(map(san_text, names.value)) if names is not None else (),
                        certificate.not_valid_before_utc, certificate.not_valid_after_utc,
                        hashlib.sha256(der).hexdigest(), der, utcnow())
        issued = Issued(certificate, _pem("CERTIFICATE", der), record.serial, record.sha256)
        return Pending(issued, self.committer.submit(record), self, client_id, text, name,
                       csr_fingerprint, draft, instance, attempt)


def audit(outcome: str, client_id, subject, serial, fingerprint, code=None, reason=None,
          revocation_reason=None, by=None) -> None:
    """One line per issuance, revocation or refusal, values JSON-quoted (subjects can hold
    newlines).  ``by``: who revoked on the command line (the client id says whose
    certificate it was)."""
    fields = {"SAPID_OUTCOME": outcome, "SAPID_CLIENT_ID": client_id or "",
              "SAPID_SERIAL": serial or "", "SAPID_FINGERPRINT": fingerprint or ""}
    text = (f"audit outcome={outcome} client_id={json.dumps(client_id)} "
            f"subject={json.dumps(subject)} serial={json.dumps(serial)} "
            f"sha256={json.dumps(fingerprint)}")
    if revocation_reason:
        text += f" revocation_reason={json.dumps(revocation_reason)}"
        fields["SAPID_REVOCATION_REASON"] = revocation_reason
    if by:
        text += f" by={json.dumps(by)}"
    if code:
        text += f" code={json.dumps(code)} reason={json.dumps(reason)}"
    if (len(handlers := log.handlers) == 1
            and (prefix := getattr(handler := handlers[0], "audit_prefix", None)) is not None
            and log.isEnabledFor(logging.INFO)):
        # What the stream handler would write, without the LogRecord it would make first:
        # a tenth of an issuance's Python (bench/README.md).
        try:
            with handler.lock:
                handler.stream.write(f"{prefix}{text}\n")
                handler.stream.flush()
            return
        except (OSError, ValueError):
            pass                    # what logging does with it: its own error report
    log.info("%s", text, extra=fields)


# ---------------------------------------------------------------------------------------------
# HTTP/1.1: requests are read whole by one thread that waits on every connection at once, and
# answered there (their hooks and store reads on bounded pools).  Idle, slow or half-sent
# connections hold no thread.
# ---------------------------------------------------------------------------------------------

PHRASES = {status.value: status.phrase for status in http.HTTPStatus}

# The request grammar of RFC 9110 and RFC 9112, one rule a line, each beside its section.  The
# rules match bytes: a head is decoded (as latin-1, RFC 9110 5.5's obs-text) only once it is
# known to be well formed.

# RFC 9110 5.6.2: token = 1*tchar
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
TOKEN = re.compile(_TOKEN + rb"\Z")
# RFC 9110 5.6.4: quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE
_QUOTED_STRING = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
# RFC 9112 3: request-line = method SP request-target SP HTTP-version, single spaces;
# RFC 9112 2.3: HTTP-version = HTTP-name "/" DIGIT "." DIGIT, case-sensitive.
REQUEST_LINE = re.compile(rb"(%s) ([^ ]+) (HTTP/([0-9])\.([0-9]))\Z" % _TOKEN)
# RFC 3986 3.3, 3.4: the characters of a path and a query: pchar / "/" / "?"
_URI_CHARS = rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*"
# RFC 9112 3.2.1: origin-form = absolute-path [ "?" query ]
ORIGIN_FORM = re.compile(rb"/" + _URI_CHARS + rb"\Z")
# RFC 9112 3.2.2: absolute-form = absolute-URI (a server MUST accept it); only http(s) here.
ABSOLUTE_FORM = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?#]*)(" + _URI_CHARS + rb")\Z")
# RFC 9110 7.2, RFC 3986 3.2.2-3: Host = uri-host [ ":" port ]; IP-literal / IPv4 / reg-name.
HOST = re.compile(rb"(?:\[[0-9A-Za-z:.\-_~!$&'()*+,;=]+\]"
                  rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?\Z")
# RFC 9110 5.5: field-value = *field-content, of field-vchar (VCHAR / obs-text) with SP and
# HTAB between them; CR, LF and NUL MUST be refused, other controls are invalid too.
FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
# RFC 9112 5: field-line = field-name ":" OWS field-value OWS, the value without its OWS: one
# match for a well-formed line; ``_field`` says what is wrong with any other.
FIELD_LINE = re.compile(rb"(%s):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*"
                        rb"[\x21-\x7e\x80-\xff])?)?)[ \t]*\Z" % _TOKEN)
# RFC 9112 2.2: a bare CR, or a LF not preceded by CR (a bare LF as a line end).
BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# RFC 9112 7.1: chunk = chunk-size [ chunk-ext ] CRLF ...; chunk-size = 1*HEXDIG;
# RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] ),
# chunk-ext-name = token, chunk-ext-val = token / quoted-string.  Extensions are ignored.
CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)((?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*)\Z"
                        % (_TOKEN, _TOKEN, _QUOTED_STRING))
# A chunk size of more than 16 hex digits overflows 64 bits, where parsers disagree.
CHUNK_SIZE_DIGITS = 16
# A chunk line (size and extensions) longer than this is refused: nothing legitimate needs it.
MAX_CHUNK_LINE = 1024
# The digits of a Content-Length past which the value is over any limit (and no int is made).
CONTENT_LENGTH_DIGITS = 18


def _bad(message: str) -> RequestError:
    return RequestError(400, "bad_request", message)


@dataclasses.dataclass(frozen=True)
class Request:
    """A whole request; ``body`` is None when it came with neither length nor chunks."""

    method: str
    path: str
    version: str
    headers: dict       # lower-case name -> value
    body: bytes | None
    peer: tuple | None
    keep_alive: bool
    received: float = 0.0   # time.monotonic() when it was whole

    @property
    def framed(self) -> bool:
        """Whether the request announced a body (Content-Length or chunked)."""
        return self.body is not None


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple = ()
    code: str | None = None         # an error's code, for the metrics


def json_response(status: int, document: dict, headers: tuple = (),
                  code: str | None = None) -> Response:
    return Response(status, (json.dumps(document) + "\n").encode(), headers=headers, code=code)


def error_response(error: RequestError) -> Response:
    """The API's JSON error; for an OCSP request, the OCSP error an OCSP client can read
    (RFC 6960 4.2.1), with the same HTTP status; for EST, text."""
    path = error.path and error.path.split("?", 1)[0]
    if path and (path == "/ocsp" or path.startswith("/ocsp/")):
        status = (ocsp.OCSPResponseStatus.TRY_LATER if error.status == 503 else
                  ocsp.OCSPResponseStatus.INTERNAL_ERROR if error.status == 500 else
                  ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        return Response(error.status, OCSP_ERRORS[status], OCSP_MEDIA_TYPE, error.headers,
                        error.code)
    if path and path.startswith(EST_PREFIX):
        # RFC 7030 4.2.3: an EST client reads a human-readable text body; but a 401 is a
        # challenge that clients close unread, and Bouncy Castle's fails on one with a body
        # (its message is in the audit line).
        body = b"" if error.status == 401 else f"{error.message}\n".encode()
        return Response(error.status, body, EST_ERROR_MEDIA_TYPE, error.headers, error.code)
    return json_response(error.status, {"error": error.code, "message": error.message},
                         error.headers, error.code)


@dataclasses.dataclass(frozen=True)
class Head:
    """A request line and its header fields, checked; the body still to come."""

    method: str
    path: str
    version: str             # HTTP/1.1 or HTTP/1.0
    headers: dict            # lower-case name -> value (latin-1), repeated fields joined
    length: int | None       # Content-Length, or None
    chunked: bool
    keep_alive: bool
    expects_continue: bool

    @property
    def framed(self) -> bool:
        return self.length is not None or self.chunked


def _line_end_error(data: bytes) -> RequestError | None:
    """RFC 9112 2.2: lines end with CRLF; a bare CR or bare LF is refused, not guessed at."""
    match = BARE_CR_OR_LF.search(data)
    return None if match is None else _bare(match[0])


def _bare(char: bytes) -> RequestError:
    if char == b"\n":
        return _bad("a line ends with a bare LF: HTTP lines end with CRLF (RFC 9112 2.2)")
    return _bad("a bare CR in the request: CR only comes before LF (RFC 9112 2.2)")


def _request_target(method: bytes, target: bytes) -> str:
    """The path (and query) a request-target names (RFC 9112 3.2)."""
    if ORIGIN_FORM.match(target):
        return target.decode("ascii")
    if (match := ABSOLUTE_FORM.match(target)) is not None:
        if not HOST.match(match[1]):
            raise _bad("the request-target's authority is not a host (RFC 9112 3.2.2)")
        return match[2].decode("ascii") or "/"
    if target == b"*" and method == b"OPTIONS":        # 3.2.4: asterisk-form
        return "*"
    raise _bad("the request-target is not a path or an http URI (RFC 9112 3.2)")


def _field(line: bytes) -> tuple[bytes, bytes]:
    """(name, value) of one field line: field-name ":" OWS field-value OWS (RFC 9112 5)."""
    if line[:1] in (b" ", b"\t"):
        raise _bad("obs-fold: a header line starts with whitespace, continuing the one before; "
                   "folding is refused (RFC 9112 5.2)")
    name, colon, value = line.partition(b":")
    if not colon:
        raise _bad("a header line without a colon (RFC 9112 5)")
    if name != name.rstrip(b" \t"):
        raise _bad("whitespace between a header name and its colon (RFC 9112 5.1)")
    if not TOKEN.match(name):
        raise _bad("a header name that is not a token (RFC 9110 5.1)")
    value = value.strip(b" \t")
    if not FIELD_VALUE.match(value):
        what = "NUL" if b"\0" in value else "a control character"
        raise _bad(f"{what} in the value of header {name[:40].decode()} (RFC 9110 5.5)")
    return name, value


def _list(value: str) -> list[str]:
    """The members of a comma-separated list field (RFC 9110 5.6.1), empty ones dropped."""
    return [member.strip(" \t") for member in value.split(",") if member.strip(" \t")]


def parse_head(raw: bytes, limit: int) -> Head:
    """A request head without its final empty line, checked to the letter of RFC 9112;
    RequestError (400, or 413/501/505 as the RFCs say) for anything it refuses."""
    if (error := _line_end_error(raw)) is not None:
        raise error
    line, *field_lines = raw.split(b"\r\n")
    if (match := REQUEST_LINE.match(line)) is None:
        if line.startswith((b" ", b"\t")) or b"  " in line:
            raise _bad("the request line has extra whitespace: method SP target SP version "
                       "(RFC 9112 3)")
        raise _bad("malformed request line: method SP target SP HTTP-version (RFC 9112 3)")
    method, target, version, major, minor = match.groups()
    if major != b"1":
        # RFC 9110 15.6.6: a major version the server does not support.
        raise RequestError(505, "bad_request", f"{version.decode()} is not supported: send "
                           "HTTP/1.1 or HTTP/1.0")
    # RFC 9110 2.5: a higher minor version is processed as the highest one implemented.
    version = "HTTP/1.0" if minor == b"0" else "HTTP/1.1"
    path = _request_target(method, target)
    try:
        return _parse_fields(method, path, version, field_lines, limit)
    except RequestError as e:
        e.path = path
        raise


def _parse_fields(method: bytes, path: str, version: str, field_lines: list,
                  limit: int) -> Head:
    headers = {}
    for field_line in field_lines:
        if (match := FIELD_LINE.match(field_line)) is not None:
            name, value = match.groups()
        else:
            name, value = _field(field_line)
        name = name.decode("ascii").lower()
        if name == "host":
            # RFC 9112 3.2: more than one Host, or an invalid one: 400.
            if name in headers:
                raise _bad("more than one Host header (RFC 9112 3.2)")
            if not HOST.match(value):
                raise _bad("the Host header is not a host[:port] (RFC 9110 7.2)")
        value = value.decode("latin-1")
        if name in headers:
            value = f"{headers[name]}, {value}"     # RFC 9110 5.3: combined as a list
        headers[name] = value
    if version == "HTTP/1.1" and "host" not in headers:
        raise _bad("an HTTP/1.1 request without a Host header (RFC 9112 3.2)")
    length = _content_length(headers.get("content-length"), limit)
    chunked = False
    if "transfer-encoding" in headers:
        chunked = _chunked(headers["transfer-encoding"], version)
        # RFC 9112 6.3 (3): both is how requests are smuggled; refused, then closed.
        if length is not None:
            raise _bad("both Content-Length and Transfer-Encoding (RFC 9112 6.3)")
    tokens = {token.lower() for token in _list(headers.get("connection", ""))}
    # RFC 9112 9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive".
    keep_alive = "close" not in tokens and (version == "HTTP/1.1" or "keep-alive" in tokens)
    # RFC 9110 10.1.1: an HTTP/1.0 request's 100-continue expectation is ignored.
    expects = (version == "HTTP/1.1"
               and "100-continue" in (member.lower() for member in _list(headers.get("expect", ""))))
    return Head(method.decode("ascii"), path, version, headers, length, chunked, keep_alive,
                expects)


def _content_length(value: str | None, limit: int) -> int | None:
    """RFC 9110 8.6: Content-Length = 1*DIGIT; repeated identical values are one value, two
    different ones are refused (RFC 9112 6.3 (5))."""
    if value is None:
        return None
    if value.isdigit() and value.isascii() and len(value) <= CONTENT_LENGTH_DIGITS:
        if (length := int(value)) > limit:
            raise RequestError(413, "too_large", f"a body of {length} bytes is over the limit "
                               f"of {limit}")
        return length
    members = [member.strip(" \t") for member in value.split(",")]
    if not all(member.isascii() and member.isdigit() for member in members):
        raise _bad("Content-Length is not a number of decimal digits (RFC 9110 8.6)")
    if len(set(member.lstrip("0") for member in members)) > 1:
        raise _bad("two different Content-Length values (RFC 9112 6.3)")
    text = members[0].lstrip("0") or "0"
    if len(text) > CONTENT_LENGTH_DIGITS or int(text) > limit:
        raise RequestError(413, "too_large", f"a body of {text[:24]} bytes is over the limit "
                           f"of {limit}")
    return int(text)


def _chunked(value: str, version: str) -> bool:
    """Whether Transfer-Encoding is chunked, as the only coding (RFC 9112 6.1); anything the
    body's length cannot be told from is 400, a coding sapid does not decode 501."""
    if version == "HTTP/1.0":
        raise _bad("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)")
    codings = [member.split(";", 1)[0].strip(" \t").lower() for member in _list(value)]
    if not codings or not all(TOKEN.match(coding.encode("latin-1")) for coding in codings):
        raise _bad("malformed Transfer-Encoding (RFC 9112 6.1)")
    if codings[-1] != "chunked":
        raise _bad(f"Transfer-Encoding ends in {codings[-1][:40]!r}, not chunked: the body's "
                   "length cannot be told (RFC 9112 6.1)")
    if codings.count("chunked") > 1:
        raise _bad("chunked applied more than once (RFC 9112 6.1)")
    if len(codings) > 1:
        # RFC 9112 6.1: a transfer coding the server does not understand: 501.
        raise RequestError(501, "bad_request", f"Transfer-Encoding {codings[0][:40]!r} is not "
                           "supported: send the body with Content-Length or chunked alone")
    return True


class RequestReader:
    """One connection's bytes turned into requests, incrementally (RFC 9112).

    The state is explicit: ``HEAD`` (looking for the empty line), then ``LENGTH``,
    ``CHUNK_SIZE``, ``CHUNK_DATA``, ``CHUNK_END`` and ``TRAILERS`` for the body, then
    ``DONE``.  Each call goes on from where the last one stopped, so every byte is examined a
    bounded number of times whatever pieces it arrives in: a body costs time linear in its
    size, however small its chunks.
    """

    HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILERS, DONE = (
        "head", "length", "chunk-size", "chunk-data", "chunk-end", "trailers", "done")
    COMPACT = 65536     # consumed bytes dropped from the front of the buffer past this

    __slots__ = ("limit", "buffer", "state", "head", "_pos", "_scan", "_body", "_left",
                 "_extensions", "_trailers")

    def __init__(self, limit: int):
        self.limit = limit
        self.buffer = bytearray()
        self._pos = 0
        self._next()

    def _next(self) -> None:
        self.state, self.head, self._body = self.HEAD, None, None
        self._scan = self._pos      # where the next search resumes
        self._left = self._extensions = self._trailers = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def clear(self) -> None:
        """Forget everything: after a refusal, nothing more is read."""
        self.buffer.clear()
        self._pos = 0
        self._next()

    @property
    def pending(self) -> bool:
        """Whether bytes of a request not yet taken are here."""
        return self._pos < len(self.buffer) or self.state != self.HEAD

    @property
    def pending_body(self) -> bool:
        """Whether bytes past the head are here already (a client that did not wait)."""
        return self._pos < len(self.buffer)

    def read_head(self) -> Head | None:
        """The head, once all of it is here; None until then."""
        buffer, pos = self.buffer, self._pos
        # RFC 9112 2.2: empty lines before the request line are ignored.
        while buffer[pos:pos + 2] == b"\r\n":
            pos += 2
        self._pos = pos
        start = max(pos, self._scan - 3)
        end = buffer.find(b"\r\n\r\n", start, pos + MAX_HEAD_BYTES + 4)
        if end < 0:
            # A bare LF or CR is refused as it arrives, not when the head ends (it may never);
            # a CR at the very end may still get its LF.  parse_head checks a whole head.
            match = BARE_CR_OR_LF.search(buffer, max(pos, self._scan - 1))
            if match is not None and match.end() < len(buffer):
                raise _bare(match[0])
            if len(buffer) - pos > MAX_HEAD_BYTES:
                raise RequestError(431, "too_large", f"request head over {MAX_HEAD_BYTES} bytes")
            self._scan = len(buffer)
            return None
        head = parse_head(bytes(buffer[pos:end]), self.limit)
        self._pos = self._scan = end + 4
        self.head = head
        if head.chunked:
            self.state, self._body = self.CHUNK_SIZE, bytearray()
        elif head.length is not None:
            self.state, self._left = self.LENGTH, head.length
        else:
            self.state = self.DONE
        return head

    def read_body(self) -> bool:
        """Decode what has come of the body; True once it is whole."""
        buffer, pos, state = self.buffer, self._pos, self.state
        while state != self.DONE:
            if state == self.LENGTH:             # taken whole, in one copy
                if len(buffer) - pos < self._left:
                    break
                with memoryview(buffer) as view:
                    self._body = bytes(view[pos:pos + self._left])
                pos, state = pos + self._left, self.DONE
            elif state == self.CHUNK_DATA:
                take = min(self._left, len(buffer) - pos)
                self._body += buffer[pos:pos + take]
                pos, self._left = pos + take, self._left - take
                if self._left:
                    break
                state = self.CHUNK_END
            elif state == self.CHUNK_END:
                if len(buffer) - pos < 2:
                    break
                if buffer[pos:pos + 2] != b"\r\n":
                    raise _bad("a chunk's data is not followed by CRLF (RFC 9112 7.1)")
                pos = self._scan = pos + 2
                state = self.CHUNK_SIZE
            elif state == self.CHUNK_SIZE:
                eol = buffer.find(b"\r\n", max(pos, self._scan - 1), pos + MAX_CHUNK_LINE + 2)
                if eol < 0:
                    if len(buffer) - pos > MAX_CHUNK_LINE:
                        raise _bad(f"a chunk line over {MAX_CHUNK_LINE} bytes (RFC 9112 7.1)")
                    self._scan = len(buffer)
                    break
                size = self._chunk_size(bytes(buffer[pos:eol]))
                pos = self._scan = eol + 2
                if size == 0:
                    self._trailers = pos
                    state = self.TRAILERS
                    continue
                if len(self._body) + size > self.limit:
                    raise RequestError(413, "too_large",
                                       f"body is over the limit of {self.limit} bytes")
                state, self._left = self.CHUNK_DATA, size
            else:                                   # TRAILERS: field lines, then CRLF
                eol = buffer.find(b"\r\n", max(pos, self._scan - 1))
                if (len(buffer) if eol < 0 else eol) - self._trailers > MAX_HEAD_BYTES:
                    raise RequestError(431, "too_large",
                                       f"trailer fields over {MAX_HEAD_BYTES} bytes")
                if eol < 0:
                    self._scan = len(buffer)
                    break
                if eol == pos:
                    state, self._body = self.DONE, bytes(self._body)
                else:       # RFC 9112 7.1.2: trailer fields, checked as fields, then ignored
                    if (error := _line_end_error(bytes(buffer[pos:eol]))) is not None:
                        raise error
                    _field(bytes(buffer[pos:eol]))
                pos = self._scan = eol + 2
        self._pos, self.state = pos, state
        return state == self.DONE

    def _chunk_size(self, line: bytes) -> int:
        if (match := CHUNK_LINE.match(line)) is None:
            if (error := _line_end_error(line)) is not None:
                raise error
            raise _bad("malformed chunk line: chunk-size in hex, then ;name=value extensions "
                       "(RFC 9112 7.1)")
        digits, extensions = match.groups()
        if len(digits.lstrip(b"0")) > CHUNK_SIZE_DIGITS:
            raise _bad("a chunk size over 64 bits (RFC 9112 7.1)")
        self._extensions += len(extensions)
        if self._extensions > MAX_HEAD_BYTES:
            raise RequestError(413, "too_large", f"chunk extensions over {MAX_HEAD_BYTES} bytes")
        return int(digits, 16)

    def take(self) -> tuple[Head, bytes | None]:
        """The whole request read; the reader is ready for the next one behind it."""
        head, body = self.head, self._body
        if self._pos >= len(self.buffer):
            self.buffer.clear()
            self._pos = 0
        elif self._pos > self.COMPACT:
            del self.buffer[:self._pos]
            self._pos = 0
        self._next()
        return head, body


class _HttpDate:
    """The Date header, formatted once a second."""

    def __init__(self):
        self._second, self._text = None, ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._text = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        return self._text


http_date = _HttpDate()


def encode_response(response: Response, head_only: bool, close: bool, version: str) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {PHRASES.get(response.status, 'Unknown')}",
             f"Server: sapid/{__version__}", f"Date: {http_date()}",
             f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}", "Cache-Control: no-store"]
    if response.status == 204:
        del lines[3:5]      # RFC 9110 8.6, 15.3.5: no content, so neither of its fields
    if close:
        lines.append("Connection: close")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


class SigningHandler:
    """Maps requests to the API of sapid(8); the one place where errors become responses."""

    def __init__(self, server: SigningServer):
        self.server = server

    def respond(self, request: Request) -> Response | Pending | HookCall:
        """The response, or for a signing the Pending to ``finish`` once its ticket is done,
        or the HookCall to run and ``resume``."""
        return self._next(functools.partial(self._route, request), self.server.authority,
                          request)

    def finish(self, pending: Pending, request: Request) -> Response | Pending | HookCall:
        """The response to a signing whose ticket is done (or a new Pending or HookCall: see
        settle)."""
        return self._next(lambda: pending.authority.settle(pending), pending.authority, request)

    def resume(self, call: HookCall, request: Request, result,
               error: BaseException | None) -> Response | Pending | HookCall:
        """The response, or what comes next, once ``call`` has run."""
        return self._next(lambda: call.resume(result, error), call.authority, request)

    def _next(self, step, authority: Authority, request: Request):
        """What ``step()`` gives, a certificate put in its envelope (JSON, or certs-only for
        EST); the one place where errors become responses."""
        try:
            outcome = step()
            if isinstance(outcome, Issued):
                if request.path.startswith(EST_PREFIX):
                    return Response(200, est_certs_only((outcome.certificate,)),
                                    EST_CERTS_ONLY_MEDIA_TYPE, EST_BASE64)
                return self._issued(outcome, authority)
            return outcome
        except RequestError as e:
            e.path = request.path
            return error_response(e)
        except Exception:
            return self._internal_error(request)

    @staticmethod
    def _internal_error(request: Request) -> Response:
        log.exception("internal error answering %s %s", request.method, request.path[:200])
        error = RequestError(500, "internal_error", "internal error; the CA's log has the details")
        error.path = request.path
        return error_response(error)

    def refusal(self, head: Head) -> RequestError | None:
        """What the head alone refuses, so that its body need not be read (RFC 9110 10.1.1:
        the final answer to an ``Expect: 100-continue`` request, instead of 100)."""
        try:
            self._check(head)
        except RequestError as e:
            e.path = head.path
            return e
        return None

    def _check(self, request: Head | Request) -> str:
        """The path (without query) a request's head names, once its method and headers are
        fit for it; RequestError otherwise.  The same checks for a head and a whole request."""
        path = request.path.split("?", 1)[0]
        if path.startswith("/api/csr/"):
            self._check_signing(request, path[9:])
            return path
        if path in ("/api/ca", "/api/health", "/api/metrics", "/api/crl", "/api/crl.pem") or (
                path.startswith("/ocsp/")):
            _allow(request, ("GET", "HEAD"))
            return path
        if path.startswith("/api/revoke/"):
            _allow(request, ("POST",))
            try:
                if not CLIENT_ID.match(path[12:]):
                    raise RequestError(400, "bad_client_id",
                                       "client id must be 1 to 128 letters and digits")
                # curl -d sends its default Content-Type, as for a CSR.
                self._check_body(request, ("application/json",
                                           "application/x-www-form-urlencoded"),
                                 "the revocation as JSON")
            except RequestError as e:
                audit("revocation_refused", path[12:140], None, None, None, e.code, e.message)
                raise
            return path
        if path == "/ocsp":
            _allow(request, ("POST",))
            self._check_body(request, ("application/ocsp-request",), "the OCSP request")
            return path
        if path.startswith(EST_PREFIX):
            self._check_est(request, path)
            return path
        raise RequestError(404, "not_found", f"no such resource: {path[:100]}")

    def _check_body(self, request: Head | Request, media_types: tuple, what: str) -> None:
        if not request.framed:
            raise RequestError(411, "length_required", f"send {what} with a Content-Length")
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media and media not in media_types:
            raise RequestError(415, "unsupported_media_type", f"Content-Type {media[:60]!r} "
                               f"refused: send {' or '.join(media_types)}")
        if self.server.stopping:
            raise RequestError(503, "shutting_down", "the CA is shutting down; retry shortly")

    def _check_est(self, request: Head | Request, path: str) -> None:
        label, operation = est_operation(path)
        _allow(request, EST_OPERATIONS[operation])
        if operation.startswith("simple"):
            try:
                self._check_body(request, EST_MEDIA_TYPES, "the CSR as base64 DER")
            except RequestError as e:
                audit("refused", label or EST_CLIENT_ID, None, None, None, e.code, e.message)
                raise

    def _check_signing(self, request: Head | Request, client_id: str) -> None:
        try:
            _allow(request, ("PUT", "POST"))
            if not CLIENT_ID.match(client_id):
                raise RequestError(400, "bad_client_id",
                                   "client id must be 1 to 128 letters and digits")
            if not request.framed:
                raise RequestError(411, "length_required", "send the CSR with a Content-Length")
            media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media and media not in CSR_MEDIA_TYPES:
                raise RequestError(415, "unsupported_media_type", f"Content-Type {media[:60]!r} "
                                   "refused: send application/pkcs10 or PEM text")
            if self.server.stopping:
                raise RequestError(503, "shutting_down", "the CA is shutting down; retry shortly")
        except RequestError as e:
            if e.code != "method_not_allowed":
                audit("refused", client_id[:128], None, None, None, e.code, e.message)
            raise

    def _route(self, request: Request) -> Response | Pending:
        path = self._check(request)
        authority = self.server.authority
        if path.startswith("/api/csr/"):
            return authority.issue(Signing(request.body, path[9:], request.peer,
                                           self._hook_headers(request.headers, authority)))
        if path == "/api/ca":
            return Response(200, authority.ca_pem, "application/pem-certificate-chain")
        if path == "/api/health":
            return self._health()
        if path == "/api/metrics":
            return Response(200, self.server.metrics.text(self.server.store).encode(),
                            METRICS_MEDIA_TYPE)
        if path.startswith("/api/revoke/"):
            return json_response(200, authority.revoke(Revoking(
                request.body, path[12:], request.peer,
                self._hook_headers(request.headers, authority))))
        revocations = authority.revocations
        if path.startswith("/api/crl"):
            try:
                crl = revocations.crl()
            except (StoreError, ConfigError) as e:
                log.error("CRL: %s", e)
                raise RequestError(503, "store_failed", "the CA cannot read its store right "
                                   "now") from None
            if path == "/api/crl":
                return Response(200, crl.der, "application/pkix-crl")
            return Response(200, crl.pem, "application/x-pem-file")
        if path == "/ocsp":
            return Response(200, revocations.ocsp(request.body), OCSP_MEDIA_TYPE)
        if path.startswith("/ocsp/"):
            return Response(200, revocations.ocsp(_ocsp_get(path[6:])), OCSP_MEDIA_TYPE)
        return self._est(request, path, authority)

    def _est(self, request: Request, path: str, authority: Authority) -> Response | Pending:
        label, operation = est_operation(path)
        if operation == "cacerts":
            return Response(200, authority.est_cacerts, EST_CACERTS_MEDIA_TYPE, EST_BASE64)
        if operation == "csrattrs":
            # RFC 7030 4.5.2: the profile asks nothing of a CSR beyond what any CSR holds.
            return Response(204, b"")
        client_id = label or EST_CLIENT_ID
        try:
            est = authority.est(operation, label, request.headers)
            body = est_csr(request.body)
        except RequestError as e:
            audit("refused", client_id, None, None, None, e.code, e.message)
            raise
        if est.operation == "simplereenroll":
            client_id = est.current.client_id
        return authority.issue(Signing(body, client_id, request.peer,
                                       self._hook_headers(request.headers, authority), est))

    def _health(self) -> Response:
        """Ready or stopping, and what the store holds (read on a pool thread: see
        ``SigningServer.blocks``)."""
        if self.server.stopping:
            return json_response(503, {"status": "stopping"})
        try:
            count = self.server.store.count()
        except (StoreError, ConfigError) as e:      # ConfigError: an unreadable credential
            log.error("health: %s", e)
            return json_response(503, {"status": "store_failed", "error": "store_failed",
                                       "message": "the CA cannot read its store right now"})
        return json_response(200, {
            "status": "ok", "version": __version__,
            "ca_subject": subject_text(self.server.authority.identity.certificate.subject),
            "certificates_issued": count})

    @staticmethod
    def _issued(issued: Issued, authority: Authority) -> Response:
        """What ``json_response`` would make of the document, put together from its parts:
        the CA's chain is JSON-encoded once per Authority, the rest are hex and times."""
        certificate = issued.certificate
        return Response(200, (
            f'{{"signed_x509_pem": {json.dumps(issued.pem.decode())}, '
            f'"ca_x509_pem": {authority.ca_pem_json}, "serial": "{issued.serial}", '
            f'"not_before": "{iso_time(certificate.not_valid_before_utc)}", '
            f'"not_after": "{iso_time(certificate.not_valid_after_utc)}", '
            f'"sha256_fingerprint": "{issued.fingerprint}"}}\n').encode())

    @staticmethod
    def _hook_headers(headers: dict, authority: Authority) -> Headers | None:
        """The headers hooks see; None when only the built-in hooks run."""
        if not authority.hooks.custom:
            return None
        if authority.config.trusted_proxy:
            return Headers(headers)
        return Headers({k: v for k, v in headers.items() if not k.startswith(PROXY_HEADER_PREFIXES)})


def _ocsp_get(encoded: str) -> bytes:
    """RFC 6960 A.1: GET {url}/{url-encoding of base-64 encoding of the DER OCSPRequest}.
    Some clients send the URL-safe alphabet, or drop the padding: both are read.  What is not
    base64 at all is handed on as it is, to be answered malformedRequest."""
    text = urllib.parse.unquote(encoded)
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/")
                                + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        return text.encode("latin-1", "replace")


def _allow(request: Head | Request, methods: tuple) -> None:
    if request.method not in methods:
        raise RequestError(405, "method_not_allowed", f"{request.method[:20]} not allowed here; "
                           f"use {' or '.join(methods)}", (("Allow", ", ".join(methods)),))


class Connection:
    """One client connection. Owned by the reception thread while it waits for a request, by
    one worker while its request is answered: one-shot epoll events keep the two apart."""

    __slots__ = ("sock", "fd", "peer", "reader", "deadline", "started", "lingering", "busy",
                 "outbox", "keep")

    def __init__(self, sock: socket.socket, peer, deadline: float, limit: int):
        self.sock, self.fd, self.peer, self.deadline = sock, sock.fileno(), peer, deadline
        self.reader = RequestReader(limit)
        self.started = self.lingering = self.busy = self.keep = False
        self.outbox = b""     # the rest of an answer the client has not taken yet


ONE_SHOT = select.EPOLLIN | select.EPOLLONESHOT
# Events the reception thread takes per turn of its loop.  A turn's signings share one journal
# write and are answered after it, so a long turn delays every answer in it; the events left
# wait in the kernel's ready list, in order, for the next turn.
TURN_EVENTS = 16
# A hook thread more is started when the hooks queued have waited this long for one: fast
# hooks share a few threads (each thread woken costs a GIL hand-off), slow ones get more.
HOOK_SPAWN_SECONDS = 0.02
ONE_SHOT_OUT = select.EPOLLOUT | select.EPOLLONESHOT
LISTEN_EVENTS = select.EPOLLIN


BALANCE_SLACK = 16


class Balance:
    """Open connections per worker, in memory the forked workers share: a worker with more
    than the fewest lets the others accept first, so keep-alive clients spread over them."""

    def __init__(self, workers: int):
        self.workers, self.slot = workers, 0
        self.memory = mmap.mmap(-1, 8 * workers)

    def update(self, count: int) -> None:
        struct.pack_into("Q", self.memory, 8 * self.slot, count)

    def fair(self, count: int) -> bool:
        """Whether a worker with ``count`` connections may take one more: not more than the
        fewest plus one and a sixteenth of them all.  That slack lets a worker that is free
        take several while another is busy signing (it accepts only between turns), instead
        of leaving new clients waiting for it; a few clients still spread about evenly."""
        counts = struct.unpack_from(f"{self.workers}Q", self.memory)
        return count <= min(counts) + 1 + sum(counts) // BALANCE_SLACK


class SigningServer:
    """Accepts on one listening socket; one thread reads, checks, signs and answers requests,
    up to ``max_threads`` run their hooks' calls, and as many answer what reads the store.

    The stdlib's ThreadingMixIn gives each connection a thread for its whole life, so idle and
    slow clients would hold threads; here they hold only a buffer.  A pool thread that has
    answered re-arms its connection's one-shot epoll event itself, so a keep-alive client's
    next request costs the reception thread one wake-up, not two.
    """

    def __init__(self, listener: socket.socket, authority: Authority, store: Store,
                 committer: Committer, max_threads: int, balance: Balance | None = None,
                 metrics: Metrics | None = None):
        self.listener = listener
        self.store, self.committer = store, committer
        self.metrics = metrics or Metrics()
        self.balance = balance
        self.stopping = False
        self.handler = SigningHandler(self)
        self._pool = ThreadPool(max_threads, "sapid-worker")
        self._hooks = ThreadPool(max_threads, "sapid-hook", HOOK_SPAWN_SECONDS)
        self._hooked = {}                        # conn -> (deadline, request, HookCall)
        self._hook_results = queue.SimpleQueue()  # (conn, request, call, result, error)
        self._asleep = False                     # whether this thread waits in epoll
        self._hook_due = 0.25                    # seconds to the next hook deadline
        self._epoll = select.epoll()
        self._connections: dict[int, Connection] = {}
        self._closing = queue.SimpleQueue()     # connections pool threads are done with
        self._reception = None                   # the reception thread's ident
        self._waiting = collections.deque()      # (conn, request, Pending) of this thread
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w, listener):
            sock.setblocking(False)
        self.authority = authority
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._epoll.register(committer.fileno(), select.EPOLLIN)
        self._epoll.register(listener.fileno(), LISTEN_EVENTS)
        self._listen_fd, self._wake_fd = listener.fileno(), self._wake_r.fileno()
        self._commit_fd = committer.fileno()
        self._unix = listener.family == socket.AF_UNIX
        self._accept_paused_until = 0.0

    @property
    def wake_fd(self) -> int:
        return self._wake_w.fileno()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass   # full: already awake

    # The reception loop -----------------------------------------------------------------------

    def serve(self, tick) -> None:
        """Serve until stopped and every request in flight has its answer; ``tick`` runs each turn."""
        connections = self._connections
        self._reception = threading.get_ident()
        while not (self.stopping and not connections):
            wait = 0.25
            if self._accept_paused_until:
                wait = min(wait, max(0.0, self._accept_paused_until - time.monotonic()))
            if self._hooked:
                # To answer a hook's timeout on time, and to add a hook thread in time.
                wait = min(wait, self._hook_due)
                if self._hooks.waiting:
                    wait = min(wait, HOOK_SPAWN_SECONDS)
            events = self._poll(0 if self.committer.queued else wait)
            if not events and self.committer.queued:
                # Nothing else to do: have this thread's signings committed now.
                self.committer.flush()
                events = self._poll(wait)
            for fd, _ in events:
                if fd == self._listen_fd:
                    self._accept()
                elif fd == self._wake_fd:
                    self._drain_wake()
                elif fd == self._commit_fd:
                    self._settle()
                elif (conn := connections.get(fd)) is not None:
                    if conn.outbox:
                        self._send(conn)
                    else:
                        self._receive(conn)
            self._take_closing()
            now = time.monotonic()
            self._resume_hooked(now)
            if self._hooked:
                self._hooks.tick(now)
            self._hook_due = self._hooks_late(now)
            if self.committer.due(now):
                self.committer.flush()
            if self._accept_paused_until and now >= self._accept_paused_until:
                self._accept_paused_until = 0.0
                if not self.stopping:        # stop closed the listener meanwhile
                    self._epoll.register(self._listen_fd, LISTEN_EVENTS)
            self._expire(now)
            tick()
        self._take_closing()
        self._epoll.close()

    def _poll(self, wait: float) -> list:
        """The next events; while this thread waits for them, hook threads that return wake
        it (``_run_hook``), and only then: a wake-up costs two system calls."""
        if wait:
            self._asleep = True
            if not self._hook_results.empty():
                wait = 0
        try:
            return self._epoll.poll(wait, TURN_EVENTS)
        finally:
            self._asleep = False

    def stop(self) -> None:
        """Stop accepting and reading; requests already read still get their answers."""
        if self.stopping:
            return
        self.stopping = True
        with contextlib.suppress(OSError):
            if not self._accept_paused_until:
                self._epoll.unregister(self._listen_fd)
        self.listener.close()
        for conn in list(self._connections.values()):
            if conn.busy or conn.outbox:
                continue         # its answer is on its way; closed after that
            if conn.started and not conn.lingering and conn.reader.pending:
                self._reject(conn, RequestError(503, "shutting_down", "the CA is shutting down"))
            self._close(conn)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        now = time.monotonic()
        for _ in range(64):
            if self.balance is not None and not self.balance.fair(len(self._connections)):
                # Another worker has fewer connections: let it take the next ones.
                self._epoll.unregister(self._listen_fd)
                self._accept_paused_until = now + 0.002
                return
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept connections: %s; pausing 0.1 s", e.strerror)
                    self._epoll.unregister(self._listen_fd)
                    self._accept_paused_until = now + 0.1
                    return
                if e.errno == errno.ECONNABORTED:
                    continue
                raise
            if len(self._connections) >= MAX_CONNECTIONS:
                sock.close()
                continue
            sock.setblocking(False)
            peer = None
            if self._unix:
                with contextlib.suppress(OSError):
                    peer = struct.unpack("3i", sock.getsockopt(
                        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            config = self.authority.config
            conn = Connection(sock, peer, now + config.request_timeout, config.max_request_bytes)
            self._connections[conn.fd] = conn
            if self.balance is not None:
                self.balance.update(len(self._connections))
            self._epoll.register(conn.fd, ONE_SHOT)

    def _receive(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            self._rearm(conn)
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if conn.lingering:
            self._rearm(conn)   # draining what a refused client still sends
            return
        if not conn.started:
            conn.started = True
            conn.deadline = time.monotonic() + self.authority.config.request_timeout
        conn.reader.feed(data)
        if (request := self._advance(conn)) is not None:
            self._handle(conn, request)
        else:
            self._rearm(conn)

    def _rearm(self, conn: Connection, events: int = ONE_SHOT) -> None:
        try:
            self._epoll.modify(conn.fd, events)
        except (OSError, ValueError):
            pass    # closed meanwhile

    def _advance(self, conn: Connection) -> Request | None:
        """The next whole request in the connection's bytes, or None while it is partial (or
        refused: then the connection lingers to be closed)."""
        reader = conn.reader
        try:
            if reader.head is None:
                if (head := reader.read_head()) is None:
                    return None
                if not reader.read_body():
                    # RFC 9110 10.1.1: a request the head already refuses is answered now,
                    # its body unread; one that may go on is told to send its body.
                    if (refusal := self.handler.refusal(head)) is not None:
                        self._reject(conn, refusal)
                        return None
                    if head.expects_continue and not reader.pending_body:
                        with contextlib.suppress(OSError):
                            conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    return None
            elif not reader.read_body():
                return None
        except RequestError as e:
            if e.path is None and reader.head is not None:
                e.path = reader.head.path        # a body refused: answered as its path wants
            self._reject(conn, e)
            return None
        head, body = reader.take()
        conn.busy = True
        return Request(head.method, head.path, head.version, head.headers, body, conn.peer,
                       head.keep_alive, time.monotonic())

    def _reject(self, conn: Connection, error: RequestError) -> None:
        """Answer an unreadable request; the connection lingers, draining what the client still
        sends, until it closes or two seconds pass."""
        log.info("refused a request: %s", error.message)
        self.metrics.refused(error.code)
        data = encode_response(error_response(error), False, True, "HTTP/1.1")
        conn.lingering = True
        conn.reader.clear()
        conn.deadline = time.monotonic() + 2.0
        try:
            conn.sock.send(data)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass    # the expiry sweep closes it

    def _expire(self, now: float) -> None:
        for conn in list(self._connections.values()):
            if conn.busy or now < conn.deadline:
                continue
            if conn.started and not conn.lingering and not conn.outbox and conn.reader.pending:
                late = RequestError(408, "request_timeout", "the request did not arrive in time")
                if conn.reader.head is not None:
                    late.path = conn.reader.head.path     # answered as its path wants
                self._reject(conn, late)
                self._rearm(conn)
            else:
                self._close(conn)     # idle, lingering, or not reading its answer

    def _close(self, conn: Connection) -> None:
        if self.balance is not None:
            self.balance.update(len(self._connections) - (conn.fd in self._connections))
        if self._connections.pop(conn.fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(conn.fd)
        conn.sock.close()

    @property
    def authority(self) -> Authority:
        return self._authority

    @authority.setter
    def authority(self, authority: Authority) -> None:
        """Serve with ``authority`` from now on (at start and on each reload)."""
        self._authority = authority

    def _settle(self) -> None:
        """Answer the signings of this thread whose records are committed (or failed).  One
        committer writes them in the order they were submitted, so the done ones come first."""
        self.committer.drain()
        waiting = self._waiting
        while waiting and waiting[0][2].ticket.done:
            conn, request, pending = waiting.popleft()
            self._proceed(conn, request, self.handler.finish(pending, request))

    def _proceed(self, conn: Connection, request: Request, outcome) -> None:
        """Carry a request of this thread on from ``outcome``: its ticket waited for
        (Pending), its hook run on a hook thread (HookCall), or its answer sent (Response),
        then the next request pipelined behind it."""
        try:
            if isinstance(outcome, Pending):
                self._waiting.append((conn, request, outcome))
            elif isinstance(outcome, HookCall):
                deadline = time.monotonic() + outcome.authority.config.hook_timeout
                self._hooked[conn] = (deadline, request, outcome)
                self._hooks.submit(self._run_hook, conn, request, outcome)
            elif self._deliver(conn, request, outcome):
                self._handle(conn, self._advance(conn) if conn.reader.pending else None)
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.path[:200])
            self._close(conn)          # never a connection left waiting for nothing

    def _run_hook(self, conn: Connection, request: Request, call: HookCall) -> None:
        """A hook thread: run ``call`` for the reception thread, which resumes the request;
        not at all if it waited past its deadline (the client has had its 503)."""
        entry = self._hooked.get(conn)
        if entry is None or entry[2] is not call:
            return
        started = time.monotonic()
        result, error = call.run()
        self.metrics.observe("hook", time.monotonic() - started)
        self._hook_results.put((conn, request, call, result, error))
        if self._asleep:            # read after the put: see _poll
            self.wake()

    def _resume_hooked(self, now: float) -> None:
        """Go on with the requests whose hooks returned in time."""
        while not self._hook_results.empty():
            conn, request, call, result, error = self._hook_results.get()
            entry = self._hooked.get(conn)
            if entry is None or entry[2] is not call:
                continue                 # answered 503 meanwhile: what the hook did is dropped
            if now >= entry[0]:
                continue                 # too late: _hooks_late answers it
            del self._hooked[conn]
            self._proceed(conn, request, self.handler.resume(call, request, result, error))

    def _hooks_late(self, now: float) -> float:
        """Answer 503 hook_timeout for a hook past ``hook_timeout``: a hook cannot be
        interrupted, so its thread stays with it, and what it returns at last is dropped
        (before signing nothing is signed; after, the certificate is withheld).  The
        seconds until the next deadline."""
        following = 0.25
        for conn, (deadline, request, call) in list(self._hooked.items()):
            if now >= deadline:
                del self._hooked[conn]
                late = RequestError(503, "hook_timeout", "a hook did not finish within "
                                    f"{call.authority.config.hook_timeout:g} s")
                self._proceed(conn, request, self.handler.resume(call, request, None, late))
            else:
                following = min(following, deadline - now)
        return following

    def _take_closing(self) -> None:
        while True:
            try:
                conn = self._closing.get_nowait()
            except queue.Empty:
                return
            self._close(conn)

    # Answering ----------------------------------------------------------------------------------

    def _handle(self, conn: Connection, request: Request) -> None:
        """Answer on the reception thread what waits for nothing: there a signing costs no
        thread hand-off, and its answer leaves from this thread too once its record is
        committed.  Its hooks run on hook threads, one hand-off each way (a slow hook holds
        one thread, not everyone); what reads or writes the store goes to the pool."""
        while request is not None:
            if self.blocks(request):
                self._pool.submit(self._answer, conn, request)
                return
            outcome = self.handler.respond(request)
            if isinstance(outcome, (Pending, HookCall)):
                self._proceed(conn, request, outcome)
                return                    # answered by _settle or _resume_hooked
            if not self._deliver(conn, request, outcome):
                return
            request = self._advance(conn) if conn.reader.pending else None
        conn.busy = False
        self._rearm(conn)

    def blocks(self, request: Request) -> bool:
        """Whether answering ``request`` may block: the store is read (health, metrics, CRL,
        OCSP, an EST client's certificate) or written (revocations, whose hook runs there
        too).  The one place that decides inline or pool; a signing's hooks run as HookCalls."""
        return request.path.startswith(("/api/health", "/api/metrics", "/api/revoke/",
                                        "/api/crl", "/ocsp", EST_PREFIX))

    def _answer(self, conn: Connection, request: Request) -> None:
        """A pool thread: answer ``request`` and any whole requests pipelined behind it."""
        try:
            while request is not None:
                # A signing pipelined behind the request that came here is answered here too.
                outcome = self.handler.respond(request)
                while isinstance(outcome, (Pending, HookCall)):
                    if isinstance(outcome, HookCall):
                        outcome = self.handler.resume(outcome, request,
                                                      *outcome.run_with_timeout())
                    else:
                        self.committer.wait(outcome.ticket)
                        outcome = self.handler.finish(outcome, request)
                if not self._deliver(conn, request, outcome):
                    return
                request = self._advance(conn) if conn.reader.pending else None
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.path[:200])
            self._release(conn)            # never a connection left waiting for nothing
            return
        conn.busy = False
        self._rearm(conn)

    def _deliver(self, conn: Connection, request: Request, response: Response) -> bool:
        """Send ``response``; True when the connection is ready for its next request.  Nobody
        waits for a client here: what the socket does not take, the reception thread sends."""
        keep = request.keep_alive and not self.stopping
        metrics = self.metrics
        if response.code is not None:
            metrics.refused(response.code)
        elif response.status == 200 and (request.path.startswith("/api/csr/")
                                         or response.content_type == EST_CERTS_ONLY_MEDIA_TYPE):
            metrics.issued()
        metrics.observe("request", time.monotonic() - request.received)
        data = encode_response(response, request.method == "HEAD", not keep, request.version)
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            data, sent, keep = b"", 0, False
        conn.deadline = time.monotonic() + self.authority.config.request_timeout
        if sent < len(data):
            conn.outbox, conn.keep, conn.busy = memoryview(data)[sent:], keep, False
            self._rearm(conn, ONE_SHOT_OUT)
            return False
        if not keep:
            self._release(conn)
            return False
        conn.started = conn.reader.pending
        return True

    def _release(self, conn: Connection) -> None:
        """Close a connection: on the reception thread, which owns the table of connections."""
        conn.busy = False
        if threading.get_ident() == self._reception:
            self._close(conn)
        else:
            self._closing.put(conn)
            self.wake()

    def _send(self, conn: Connection) -> None:
        """More of an answer to a client that reads slowly (reception thread)."""
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if conn.outbox:
            self._rearm(conn, ONE_SHOT_OUT)
        elif not conn.keep or self.stopping:
            self._close(conn)
        else:
            conn.outbox = b""
            conn.started = conn.reader.pending
            conn.deadline = time.monotonic() + self.authority.config.request_timeout
            if conn.reader.pending and (request := self._advance(conn)) is not None:
                self._handle(conn, request)
            else:
                self._rearm(conn)

    def close(self) -> None:
        for conn in list(self._connections.values()):
            conn.sock.close()
        self._connections.clear()
        for sock in (self._wake_r, self._wake_w):
            sock.close()


# ---------------------------------------------------------------------------------------------
# The daemon: sockets, signals, readiness, reload
# ---------------------------------------------------------------------------------------------

def open_listener(config: Config, listen: str | None) -> tuple[socket.socket, str, bool]:
    """(socket, where, whether we bound a path we must remove): systemd's, TCP, or our own."""
    passed = listen_fds()
    if passed:
        fd, name = next(((fd, name) for fd, name in passed if name == "sapid"), passed[0])
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET,
                                                                   socket.SO_ACCEPTCONN):
            raise ConfigError(f"socket {name!r} passed by systemd is not a listening stream socket")
        where = sock.getsockname() or name
        return sock, f"{where} (from systemd)", False
    if listen:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        try:
            address = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
            port_number = int(port)
        except ValueError:
            raise ConfigError(f"--listen {listen!r}: expected ADDRESS:PORT, e.g. 127.0.0.1:8080"
                              ) from None
        if not address.is_loopback:
            raise ConfigError(f"--listen {listen!r}: loopback addresses only; put nginx in front")
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((str(address), port_number))
        except OSError as e:
            sock.close()
            raise ConfigError(f"--listen {listen}: {e.strerror}") from None
        sock.listen(LISTEN_BACKLOG)
        return sock, f"http://{listen}", False
    path = config.socket
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o117)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
    except OSError as e:
        sock.close()
        raise ConfigError(f"{path}: cannot listen: {e.strerror}") from None
    finally:
        os.umask(previous)
    sock.listen(LISTEN_BACKLOG)
    return sock, path, True


def _remove_stale_socket(path: str) -> None:
    """Unlink ``path`` only if it is a socket nobody answers on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path}: exists and is not a socket; not touching it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise ConfigError(f"{path}: another process is serving on it")


class Daemon:
    """``sapid serve``: one service to systemd, whether it serves in one process or in
    ``workers`` processes forked after the key is loaded, all accepting on the same socket."""

    def __init__(self, config_path: str | None, socket_path: str | None, listen: str | None):
        self.config_path, self.socket_path, self.listen = config_path, socket_path, listen
        self._signals = []
        self._watchdog_interval = None
        self._next_watchdog = self._next_status = 0.0
        self._status = None
        self._reload_failed = None     # when the last reload failed, until one succeeds
        self.server = None
        self.workers = {}          # pid -> slot, in the supervising process
        self.stopping = False

    def _config(self) -> Config:
        config = Config.load(self.config_path)
        return dataclasses.replace(config, socket=self.socket_path) if self.socket_path else config

    def run(self) -> int:
        # A hook's print() reaches the journal line by line, not when a block buffer fills.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(line_buffering=True)
        config = self._config()
        disable_core_dumps()
        self._passphrase = read_passphrase()
        self._raise_file_limit()
        # Shared with the workers forked later: made before them.
        self.metrics = Metrics(config.workers)
        # Its threads start on demand, so none exists yet when workers are forked.
        self.runner = HookRunner(config.max_threads * 2, self.metrics)
        self.store = Store.open(config)
        self.committer = Committer(self.store, self.metrics)
        self.authority = Authority.open(config, self._passphrase, self.runner, self.committer,
                                        self.store)
        prepare_store(self.store, config, self._importing)
        if self.authority.hooks.path is None:
            log.warning("no hooks file: every valid CSR is signed (set 'hooks' in %s)",
                        config.path or DEFAULT_CONFIG)
        self.listener, self.where, bound = open_listener(config, self.listen)
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        previous = {signum: signal.signal(signum, self._queue_signal) for signum in handled}
        wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", "0"))
            if usec > 0 and os.environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
                self._watchdog_interval = usec / 2e6
        except ValueError:
            pass
        log.info("serving on %s with CA %s, store %s%s", self.where,
                 subject_text(self.authority.identity.certificate.subject), self.store.where,
                 f", {config.workers} workers" if config.workers > 1 else "")
        try:
            if config.workers == 1:
                self._serve()
            else:
                self.store.close()        # each worker connects for itself
                self._supervise(config.workers)
        finally:
            signal.set_wakeup_fd(wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if bound:
                with contextlib.suppress(OSError):
                    os.unlink(config.socket)
            self.committer.close()
            self.store.close()
        log.info("stopped")
        return 0

    def _importing(self, count: int) -> None:
        """While an earlier sapid's records are imported (a million take minutes), keep
        systemd from taking the start for hung: more time, the watchdog fed, a status line."""
        now = time.monotonic()
        if now >= self._next_status:
            sd_notify(f"EXTEND_TIMEOUT_USEC={IMPORT_EXTEND_USEC}\nWATCHDOG=1\n"
                      f"STATUS=importing an earlier sapid's records: {count} read")
            self._next_status = now + 2.0

    def _serve(self, balance: Balance | None = None) -> None:
        """Serve in this process until stopped."""
        self.server = SigningServer(self.listener, self.authority, self.store, self.committer,
                                    self.authority.config.max_threads, balance, self.metrics)
        signal.set_wakeup_fd(self.server.wake_fd, warn_on_full_buffer=False)
        sd_notify(f"READY=1\nSTATUS={self._status_text()}\nMAINPID={os.getpid()}")
        try:
            self.server.serve(self._tick)
        finally:
            self.server.close()

    # Workers ------------------------------------------------------------------------------------

    def _supervise(self, count: int) -> None:
        """Fork ``count`` workers, pass them reloads and stops, replace any that dies."""
        self.balance = Balance(count)
        for slot in range(count):
            self._spawn(slot)
        sd_notify(f"READY=1\nSTATUS={self._status_text()}\nMAINPID={os.getpid()}")
        deaths = []
        while not (self.stopping and not self.workers):
            select.select([self._wake_r], [], [], 0.25)
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
            self._tick()
            while self.workers:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if not pid:
                    break
                slot = self.workers.pop(pid, None)
                self.metrics.set_workers(len(self.workers))
                if slot is None or self.stopping:
                    continue
                log.error("worker %d (pid %d) ended unexpectedly (%s); starting another", slot,
                          pid, _wait_text(status))
                now = time.monotonic()
                deaths = [t for t in deaths if now - t < 10] + [now]
                if len(deaths) > 3 * len(self.workers) + 3:
                    log.error("workers keep dying; stopping")
                    self.handle_term(signal.SIGTERM)
                    continue
                self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid:
            self.workers[pid] = slot
            self.metrics.set_workers(len(self.workers))
            return
        code = 1
        try:
            # A worker is not what systemd watches: only the supervisor notifies.
            for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(variable, None)
            self._watchdog_interval = None
            self._signals.clear()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self.workers = {}
            self.committer.forked()
            self._wake_r.close()
            self._wake_w.close()
            self.balance.slot = self.metrics.slot = slot
            self.balance.update(0)
            self._serve(self.balance)
            code = 0
        except BaseException:
            log.exception("worker %d failed", slot)
        finally:
            os._exit(code)

    # Signals ------------------------------------------------------------------------------------

    @staticmethod
    def _raise_file_limit() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = min(hard, MAX_CONNECTIONS + 256)
        if soft < wanted:
            with contextlib.suppress(OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    def _queue_signal(self, signum, frame) -> None:
        self._signals.append(signum)   # only queued: handled by _tick in the main loop

    def _tick(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self.handle_hup()
            elif signum != signal.SIGCHLD:      # SIGCHLD only wakes the supervisor up
                self.handle_term(signum)
        now = time.monotonic()
        if self._watchdog_interval and now >= self._next_watchdog:
            sd_notify("WATCHDOG=1")
            self._next_watchdog = now + self._watchdog_interval
        if now >= self._next_status and not self.stopping:
            status = self._status_text()
            if status != self._status:
                sd_notify(f"STATUS={status}")
                self._status = status
            self._next_status = now + 5.0

    def _status_text(self) -> str:
        """What systemctl status shows; never waits for the store (the count is the last one
        seen, which the supervisor of workers reads each time it writes the status)."""
        workers = f" with {len(self.workers)} workers" if self.workers else ""
        if self.workers:
            with contextlib.suppress(StoreError):
                self.store.count()
            self.store.close()    # the supervisor forks again: no connection across a fork
        failed = (f"reload failed at {self._reload_failed}, serving with the previous setup "
                  if self._reload_failed else "serving ")
        return f"{failed}on {self.where}{workers}, {_count(self.store.known, 'certificate')} in " \
            "the store"

    def handle_hup(self) -> None:
        """Reload config, identity and hooks; on any error keep serving with the old ones."""
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}\nSTATUS=reloading")
        old = self.authority
        try:
            config = dataclasses.replace(self._config(), socket=old.config.socket,
                                         max_threads=old.config.max_threads,
                                         workers=old.config.workers)
            self.authority = Authority.open(config, self._passphrase, self.runner,
                                            self.committer, self.store)
            if self.server is not None:
                self.server.authority = self.authority
            if Store.open(config).where != self.store.where:
                log.warning("reload: the store stays %s until a restart", self.store.where)
            log.info("reloaded: CA %s, hooks %s",
                     subject_text(self.authority.identity.certificate.subject),
                     self.authority.hooks.path or "built-in")
            for pid in self.workers:         # each worker reloads the same files itself
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGHUP)
            self._reload_failed = None
        except SapidError as e:
            log.error("reload failed, still serving with the previous setup: %s", e)
            self._reload_failed = time.strftime("%H:%M")
        self._status = None
        sd_notify(f"READY=1\nSTATUS={self._status_text()}")

    def handle_term(self, signum: int) -> None:
        log.info("%s: finishing the requests in flight", signal.Signals(signum).name)
        sd_notify("STOPPING=1\nSTATUS=stopping")
        self.stopping = True
        if self.server is not None:
            self.server.stop()
        for pid in self.workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _wait_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


# ---------------------------------------------------------------------------------------------
# Logging: journald fields when systemd-python is there, else syslog-prefixed lines on stderr
# ---------------------------------------------------------------------------------------------

SYSLOG_LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                 logging.CRITICAL: 2}


class _PrefixFormatter(logging.Formatter):
    """``<N>message``: journald reads the priority from the prefix."""

    def format(self, record):
        text = super().format(record)
        level = SYSLOG_LEVELS.get(record.levelno, 6)
        return "\n".join(f"<{level}>{line}" for line in text.splitlines())


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(2)
        return stream == f"{info.st_dev}:{info.st_ino}"
    except OSError:
        return False


def setup_logging() -> None:
    """One handler for sapid's loggers.  A plain stream's handler gets ``audit_prefix``, what
    its format puts before a message, so that audit lines can skip the LogRecord."""
    root = logging.getLogger("sapid")
    if root.handlers:
        return
    handler = None
    if _stderr_is_journal():
        try:
            from systemd.journal import JournalHandler
            handler = JournalHandler(SYSLOG_IDENTIFIER="sapid")
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_PrefixFormatter("%(message)s"))
            handler.audit_prefix = f"<{SYSLOG_LEVELS[logging.INFO]}>"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("sapid: %(levelname)s: %(message)s"))
        handler.audit_prefix = "sapid: INFO: "
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def _add_years(moment: datetime.datetime, years: int) -> datetime.datetime:
    try:
        return moment.replace(year=moment.year + years)
    except ValueError:            # 29 February
        return moment.replace(year=moment.year + years, day=28)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _create_file(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        _write_all(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def command_init(args) -> int:
    """Create a CA identity: key, self-signed certificate, CSR for a parent, public key."""
    folder = args.dir or Config.load(args.config).identity
    names = []
    for field, value in args.field or ():
        oid = NAME_FIELDS.get(field) or {k.lower(): v for k, v in NAME_FIELDS.items()}.get(
            field.lower())
        if oid is None:
            raise ConfigError(f"-f {field}: unknown name field; use one of "
                              f"{', '.join(NAME_FIELDS)}")
        try:
            names.append(x509.NameAttribute(oid, value))
        except ValueError as e:
            raise ConfigError(f"-f {field} {value!r}: {_one_line(e)}") from None
    if not names:
        raise ConfigError("give the CA a name: -f CN 'Example CA' (and -f O, -f C, ...)")
    if args.years < 1:
        raise ConfigError(f"-v {args.years}: the CA must be valid for at least a year")
    if utcnow().year + args.years > 9999:
        raise ConfigError(f"-v {args.years}: X.509 times end in 9999; give at most "
                          f"{9999 - utcnow().year} years")
    paths = {name: os.path.join(folder, name)
             for name in (KEY_FILE, CERT_FILES[0], CSR_FILE, PUBLIC_KEY_FILE)}
    for path in [*paths.values(), os.path.join(folder, CERT_FILES[1])]:
        if os.path.lexists(path):
            raise ConfigError(f"{path}: exists; sapid init never overwrites an identity")
    disable_core_dumps()
    passphrase = read_passphrase(confirm=True)
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise ConfigError(f"the passphrase has {len(passphrase)} characters; "
                          f"{MIN_PASSPHRASE_CHARS} at least")
    key = generate_key(args.key)
    subject = x509.Name(names)
    now = utcnow()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    constraints = x509.BasicConstraints(ca=True, path_length=None)
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(_add_years(now, args.years))
        .add_extension(constraints, critical=True)
        .add_extension(usage, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, signature_hash(key)))
    request = (
        x509.CertificateSigningRequestBuilder().subject_name(subject)
        .add_extension(constraints, critical=True).add_extension(usage, critical=True)
        .sign(key, signature_hash(key)))
    try:
        os.makedirs(folder, mode=0o750, exist_ok=True)
        os.chmod(folder, 0o750)
        previous = os.umask(0o077)
        try:
            _create_file(paths[KEY_FILE], encrypt_private_key(key, passphrase), 0o640)
        finally:
            os.umask(previous)
        _create_file(paths[CERT_FILES[0]], certificate.public_bytes(serialization.Encoding.PEM),
                     0o644)
        _create_file(paths[CSR_FILE], request.public_bytes(serialization.Encoding.PEM), 0o644)
        _create_file(paths[PUBLIC_KEY_FILE], key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    except OSError as e:
        raise ConfigError(f"{e.filename or folder}: {e.strerror}") from None
    _group_to_sapid(folder, paths.values())
    print(f"created CA {subject_text(subject)} ({args.key}, valid until "
          f"{iso_time(certificate.not_valid_after_utc)}) in {folder}\n"
          f"SHA-256 fingerprint {certificate.fingerprint(hashes.SHA256()).hex()}")
    return 0


def _group_to_sapid(folder: str, paths) -> None:
    """As root, give the identity to group sapid (if it exists) so the service can read it."""
    if os.geteuid() != 0:
        return
    try:
        gid = grp.getgrnam("sapid").gr_gid
    except KeyError:
        return
    for path in (folder, *paths):
        os.chown(path, 0, gid)


def command_serve(args) -> int:
    return Daemon(args.config, args.socket, args.listen).run()


def command_sign(args) -> int:
    """Sign one CSR offline through the daemon's pipeline and hooks; print the certificate."""
    config = Config.load(args.config)
    if not CLIENT_ID.match(args.client_id):
        raise ConfigError(f"--client-id {args.client_id!r}: 1 to 128 letters and digits")
    try:
        body = sys.stdin.buffer.read() if args.csr == "-" else _read(args.csr)
    except OSError as e:
        raise ConfigError(f"{args.csr}: {e.strerror}") from None
    disable_core_dumps()
    passphrase = read_passphrase()
    store = Store.open(config)
    committer = Committer(store)
    try:
        authority = Authority.open(config, passphrase, HookRunner(1), committer, store)
        prepare_store(store, config)
        issued = authority.wait(authority.issue(Signing(body, args.client_id)))
    except RequestError as e:
        raise SapidError(f"{args.csr}: {e.code}: {e.message}") from None
    finally:
        committer.close()
        store.close()
    sys.stdout.write(issued.pem.decode())
    return 0


def command_check(args) -> int:
    """Like ``nginx -t``: load everything, decrypt the key if that needs no prompt."""
    config = Config.load(args.config)
    disable_core_dumps()
    passphrase = read_passphrase(interactive=False)
    authority = Authority.open(config, passphrase, HookRunner(1), None)
    store = Store.open(config)
    try:
        if config.store or os.path.exists(store.where):
            held = _count(store.count(), "certificate")
        elif os.path.exists(config.state) and not os.access(config.state, os.W_OK):
            raise ConfigError(f"{config.state}: the state folder is not writable")
        else:
            held = "created at the first start"
    finally:
        store.close()
    key = "key decrypted" if passphrase is not None else (
        "key not decrypted: no passphrase source that needs no prompt")
    print(f"sapid: {config.path or 'built-in defaults'}: ok; CA "
          f"{subject_text(authority.identity.certificate.subject)}, {key}, hooks "
          f"{authority.hooks.path or 'built-in'}, store {store.where} ({held})")
    return 0


def command_list(args) -> int:
    """Print the store's certificates, a line each (or JSON), page by page."""
    config = Config.load(args.config)
    if args.client_id is not None and not CLIENT_ID.match(args.client_id):
        raise ConfigError(f"--client {args.client_id!r}: 1 to 128 letters and digits")
    now = utcnow()
    expiring = now + datetime.timedelta(days=args.expiring) if args.expiring is not None else None
    store = Store.open(config)
    out = sys.stdout
    try:
        records = store.select(args.client_id, expiring, args.revoked)
        if args.json:
            out.write("[")
            for n, record in enumerate(records):
                out.write(("," if n else "") + "\n" + json.dumps(record.document(now)))
            out.write("\n]\n")
        else:
            for record in records:
                out.write(f"{record.serial}  {iso_time(record.not_after)}  "
                          f"{record.status(now):7}  {record.client_id or '-'}  "
                          f"{json.dumps(record.subject)}\n")
    except BrokenPipeError:         # | head: not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    finally:
        store.close()
    return 0


def command_revoke(args) -> int:
    """Revoke one certificate in the store: every worker and host sharing it answers so from
    the next request on.  Needs no key: the daemon signs the CRL and OCSP answers."""
    config = Config.load(args.config)
    try:
        serial = parse_serial(args.serial)
        reason = revocation_reason(args.reason)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    store = Store.open(config)
    try:
        version = store.meta("schema")
        if version != str(len(MIGRATIONS)):
            raise SapidError(f"{store.where} is at schema version {version}, this sapid's is "
                             f"{len(MIGRATIONS)}: restart the daemon (it brings the store "
                             "forward), then revoke")
        record, revoked = store.revoke(serial, reason, utcnow())
    finally:
        store.close()
    if record is None:
        raise SapidError(f"no certificate with serial {serial} in {store.where}")
    audit("revoked" if revoked else "already_revoked", record.client_id, record.subject,
          record.serial, record.sha256, revocation_reason=record.revocation_reason,
          by=f"{os.environ.get('SUDO_USER') or getpass.getuser()} (sapid revoke)")
    if revoked:
        print(f"revoked {serial} ({record.revocation_reason}) at {iso_time(record.revoked_at)}")
    else:
        print(f"{serial} was revoked already, at {iso_time(record.revoked_at)} "
              f"({record.revocation_reason}); that date and reason stand")
    return 0


def command_show(args) -> int:
    """Print one certificate's record and its PEM."""
    config = Config.load(args.config)
    try:
        serial = parse_serial(args.serial)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    store = Store.open(config)
    try:
        record = store.get(serial)
    finally:
        store.close()
    if record is None:
        raise SapidError(f"no certificate with serial {serial} in {store.where}")
    document = record.document(utcnow())
    if args.json:
        document["pem"] = _pem("CERTIFICATE", record.der).decode()
        print(json.dumps(document, indent=2))
        return 0
    for name, value in document.items():
        if value is not None:
            print(f"{name}: {', '.join(value) if isinstance(value, list) else value}")
    sys.stdout.write(_pem("CERTIFICATE", record.der).decode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sapid", description="A certificate authority that signs CSRs over a Unix socket.")
    parser.add_argument("--version", action="version", version=f"sapid {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("-c", "--config", metavar="CONFIG",
                        help="configuration file (default: $SAPID_CONFIG or /etc/sapid/sapid.conf)")

    init = commands.add_parser("init", parents=[config], help="create a CA identity")
    init.add_argument("-d", "--dir", metavar="DIR", help="identity folder (default: the configured)")
    init.add_argument("-f", "--field", nargs=2, action="append", metavar=("FIELD", "VALUE"),
                      help="a name attribute of the CA, e.g. -f CN 'Example CA'; repeat")
    init.add_argument("-v", "--years", type=int, default=10, metavar="YEARS",
                      help="validity in years (default 10)")
    init.add_argument("--key", choices=KEY_TYPES, default="p256", help="key type (default p256)")
    init.set_defaults(run=command_init)

    serve = commands.add_parser("serve", parents=[config], help="run the daemon")
    serve.add_argument("--socket", metavar="PATH", help="Unix socket to listen on")
    serve.add_argument("--listen", metavar="ADDRESS:PORT",
                       help="plain TCP on a loopback address, for development")
    serve.set_defaults(run=command_serve)

    sign = commands.add_parser("sign", parents=[config], help="sign one CSR offline")
    sign.add_argument("--client-id", default="local", metavar="ID",
                      help="client id the hooks see (default: local)")
    sign.add_argument("csr", metavar="CSR_FILE", help="PEM or DER CSR; - for standard input")
    sign.set_defaults(run=command_sign)

    check = commands.add_parser("check", parents=[config], help="check the setup and exit")
    check.set_defaults(run=command_check)

    listing = commands.add_parser("list", parents=[config], help="list issued certificates")
    listing.add_argument("--client", dest="client_id", metavar="ID",
                         help="only those issued to this client id")
    listing.add_argument("--expiring", type=int, metavar="DAYS",
                         help="only those valid now that expire within DAYS days, soonest first")
    listing.add_argument("--revoked", action="store_true", help="only revoked certificates")
    listing.add_argument("--json", action="store_true", help="a JSON array of records")
    listing.set_defaults(run=command_list)

    revoke = commands.add_parser("revoke", parents=[config], help="revoke a certificate")
    revoke.add_argument("serial", metavar="SERIAL", help="hex, as in the API's serial")
    revoke.add_argument("--reason", metavar="REASON",
                        help="an RFC 5280 reason: " + ", ".join(REVOCATION_REASONS)
                        + " (default unspecified)")
    revoke.set_defaults(run=command_revoke)

    show = commands.add_parser("show", parents=[config], help="show one issued certificate")
    show.add_argument("serial", metavar="SERIAL", help="hex, as in the API's serial")
    show.add_argument("--json", action="store_true", help="the record as JSON, PEM included")
    show.set_defaults(run=command_show)
    return parser


def ca_create_identity(argv=None) -> int:
    """ssl_api's ``ca_create_identity -f FIELD VALUE ... [-v YEARS]``: ``sapid init``."""
    return main(["init", *(sys.argv[1:] if argv is None else argv)])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return args.run(args)
    except SapidError as e:
        print(f"sapid: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Hooks files import ``sapid``: run that module, not a second copy named __main__.
    import sapid
    sys.exit(sapid.main())
