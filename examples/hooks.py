"""Hooks of a sapid CA for a fleet of devices: copy to /etc/sapid/hooks.py and adapt.

The file must be owned by root and not writable by group or others (``chmod 0644``); it runs
inside the CA and sees every request, so guard it as the key. See sapid-hooks(5).

What it does:

- Only enrolled devices get certificates: their client ids are listed in ``clients.allow``
  next to this file, one per line, ``#`` starting a comment. The list is read when the hooks
  are loaded: after editing it, ``systemctl reload sapid`` (a list that cannot be read keeps
  sapid from starting, and on reload keeps the previous hooks and list).
- Every name in a certificate is a DNS name under one of ``ALLOWED_DOMAINS``; a common name,
  if the CSR has one, must be one of those DNS names.
- Devices in the lab (client ids starting with ``lab``) get certificates for a week only.
- A device may revoke the certificate it shows nginx as its TLS client certificate
  (``POST /api/revoke/<client_id>``, with ``trusted_proxy = yes``), say when it is retired;
  the operator revokes any with ``sapid revoke``. Where relying parties find the
  CRL and the OCSP responder is sapid.conf's ``crl_url`` and ``ocsp_url``.
- Each issuance is logged with its serial, in the form ``openssl x509 -serial`` prints it,
  so the operator can find it with ``sapid show <SERIAL>``.
"""

import datetime
import logging
import os

from cryptography import x509
from cryptography.x509.oid import NameOID

import sapid

# Loggers under "sapid" write to sapid's own log (the journal under systemd).
log = logging.getLogger("sapid.hooks")

# The enrolled client ids, next to this file: /etc/sapid/clients.allow.
CLIENTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clients.allow")

# Names are allowed in these domains and below them, never in their parents.
ALLOWED_DOMAINS = ("devices.example.com", "lab.example.com")

# Lab devices are reflashed often: their certificates should not outlive a test campaign.
LAB_PREFIX = "lab"
LAB_VALIDITY = datetime.timedelta(days=7)

# How long before the CA certificate runs out the operator should hear about it at each load.
CA_EXPIRY_WARNING = datetime.timedelta(days=60)


def read_client_list(path):
    """The client ids in ``path``: one a line, blank lines and ``#`` comments skipped."""
    with open(path, encoding="utf-8") as file:
        lines = (line.split("#", 1)[0].strip() for line in file)
        return frozenset(line for line in lines if line)


# Read once per load: sapid loads this file again (with a fresh module) on each reload. A list
# that cannot be read is a load error, which sapid reports with this file's name and line.
ALLOWED_CLIENTS = read_client_list(CLIENTS_FILE)


def in_allowed_domain(name):
    """True when the DNS ``name`` is strictly below one of ALLOWED_DOMAINS."""
    name = name.lower().rstrip(".")
    return any(name.endswith("." + domain) for domain in ALLOWED_DOMAINS)


def boot(authority):
    """At each load: say how many clients are enrolled; warn of a CA certificate near its end."""
    log.info("hooks: %d enrolled clients from %s", len(ALLOWED_CLIENTS), CLIENTS_FILE)
    left = authority.certificate.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    if left < CA_EXPIRY_WARNING:
        log.warning("hooks: the CA certificate expires in %d days: renew it", left.days)


class Hooks(sapid.SigningHooks):
    """One instance per request; sapid has set client_id, csr, headers, ... before authorize."""

    def authorize(self, subject_alt_names):
        if self.client_id not in ALLOWED_CLIENTS:
            raise sapid.NotAuthorized(f"client {self.client_id} is not enrolled at this CA")
        dns_names = []
        for name in subject_alt_names:
            if not isinstance(name, x509.DNSName):
                # IP addresses, e-mail addresses and URIs are not part of this fleet's names.
                raise sapid.NotAuthorized(f"subjectAltName {name.value} refused: DNS names only")
            if "*" in name.value:
                raise sapid.NotAuthorized(f"{name.value}: wildcard names are not issued")
            if not in_allowed_domain(name.value):
                raise sapid.NotAuthorized(f"{name.value} is outside "
                                          f"{' and '.join(ALLOWED_DOMAINS)}")
            dns_names.append(name.value.lower().rstrip("."))
        if not dns_names:
            raise sapid.NotAuthorized("the CSR must name the device in a DNS subjectAltName")
        # sapid copies the subject from the CSR: a common name must not smuggle in another name.
        for attribute in self.csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            if attribute.value.lower().rstrip(".") not in dns_names:
                raise sapid.NotAuthorized(f"common name {attribute.value} is not one of the "
                                          "CSR's DNS names")
        if self.client_id.startswith(LAB_PREFIX):
            return LAB_VALIDITY
        return None  # the validity_days of sapid.conf

    def postsign(self, certificate):
        # The certificate is already in the records; raising here would only withhold it.
        serial = format(certificate.serial_number, "X")
        serial = "0" * (len(serial) % 2) + serial      # as openssl and sapid print serials
        log.info("hooks: issued serial %s to client %s for %s, not after %s", serial,
                 self.client_id, self.csr.subject.rfc4514_string(),
                 certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"))

    def authorize_revocation(self, certificate, reason):
        # The client id in the path is a claim; the certificate nginx verified is a proof. A
        # device revokes the certificate it holds the key of, issued to the id it gives.
        if self.client_id not in ALLOWED_CLIENTS:
            raise sapid.NotAuthorized(f"client {self.client_id} is not enrolled at this CA")
        shown = self.headers.get("x-ssl-client-serial")
        if self.headers.get("x-ssl-client-verify") != "SUCCESS" or shown is None:
            raise sapid.NotAuthorized("show the certificate to revoke as the TLS client "
                                      "certificate")
        if int(shown, 16) != certificate.serial_number or self.record.client_id != self.client_id:
            raise sapid.NotAuthorized("a client may revoke only the certificate it shows")
        return True
