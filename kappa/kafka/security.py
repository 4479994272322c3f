"""Client credentials, taken from the environment (or a config file it names), never from argv.

Secrets passed on a command line end up in `ps` output and shell history; environment
variables and a 0600 file do not. Every kappa process, workers included, reads the same
variables, so a supervisor's children inherit them.

    KAPPA_SECURITY_PROTOCOL   PLAINTEXT (default), SASL_PLAINTEXT, SASL_SSL or SSL
    KAPPA_SASL_MECHANISM      PLAIN (default), SCRAM-SHA-256 or SCRAM-SHA-512
    KAPPA_SASL_USERNAME / KAPPA_SASL_PASSWORD
    KAPPA_SSL_CAFILE / KAPPA_SSL_CERTFILE / KAPPA_SSL_KEYFILE    (for SSL and SASL_SSL)
    KAPPA_CLIENT_CONFIG       a file of KEY=VALUE lines with the same names (environment wins)
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kappa.errors import KappaError

PROTOCOLS = {"PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"}


@dataclass(frozen=True)
class Security:
    protocol: str = "PLAINTEXT"
    mechanism: str = "PLAIN"
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL")

    @property
    def uses_ssl(self) -> bool:
        return self.protocol.endswith("SSL")

    def librdkafka(self) -> dict[str, str]:
        """Settings for confluent-kafka clients."""
        config: dict[str, Any] = {"security.protocol": self.protocol}
        if self.uses_sasl:
            config.update(
                {"sasl.mechanism": self.mechanism, "sasl.username": self.username, "sasl.password": self.password}
            )
        if self.uses_ssl:
            for key, value in (
                ("ssl.ca.location", self.cafile),
                ("ssl.certificate.location", self.certfile),
                ("ssl.key.location", self.keyfile),
            ):
                if value:
                    config[key] = value
        return config

    def faust_options(self) -> dict:
        """Settings for the Faust app (aiokafka underneath)."""
        import faust

        context = None
        if self.uses_ssl:
            context = ssl.create_default_context(cafile=self.cafile)
            if self.certfile:
                context.load_cert_chain(self.certfile, self.keyfile)
        if self.uses_sasl:
            credentials = faust.SASLCredentials(
                username=self.username, password=self.password, mechanism=self.mechanism, ssl_context=context
            )
            return {"broker_credentials": credentials}
        if context is not None:
            return {"broker_credentials": faust.SSLCredentials(context)}
        return {}


def _file_values(path: str) -> dict[str, str]:
    values = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise KappaError(f"cannot read KAPPA_CLIENT_CONFIG file {path!r}: {exc.strerror}") from None
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def from_environment() -> Security:
    values = _file_values(os.environ["KAPPA_CLIENT_CONFIG"]) if os.environ.get("KAPPA_CLIENT_CONFIG") else {}
    values.update({k: v for k, v in os.environ.items() if k.startswith("KAPPA_")})
    protocol = values.get("KAPPA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
    if protocol not in PROTOCOLS:
        raise KappaError(f"KAPPA_SECURITY_PROTOCOL is {protocol!r}; expected one of {', '.join(sorted(PROTOCOLS))}")
    security = Security(
        protocol=protocol,
        mechanism=values.get("KAPPA_SASL_MECHANISM", "PLAIN").upper(),
        username=values.get("KAPPA_SASL_USERNAME"),
        password=values.get("KAPPA_SASL_PASSWORD"),
        cafile=values.get("KAPPA_SSL_CAFILE"),
        certfile=values.get("KAPPA_SSL_CERTFILE"),
        keyfile=values.get("KAPPA_SSL_KEYFILE"),
    )
    if security.uses_sasl and not (security.username and security.password):
        raise KappaError(
            f"KAPPA_SECURITY_PROTOCOL={protocol} needs KAPPA_SASL_USERNAME and KAPPA_SASL_PASSWORD "
            "(in the environment or the KAPPA_CLIENT_CONFIG file)"
        )
    return security
