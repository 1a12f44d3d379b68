"""Registries that want credentials: HTTP basic (htpasswd) and the bearer-token flow
(the registry's own `token` auth, with a small token service signing JWTs)."""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import subprocess
import threading
import urllib.parse
import uuid
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from .registry import Registry, free_port

USER, PASSWORD = "physicist", "s3cret-Pa55word"


def htpasswd_registry(workdir: Path, storage: Path) -> Registry:
    htpasswd = workdir / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", str(htpasswd), USER, PASSWORD], check=True,
                   capture_output=True)
    auth = f"  htpasswd:\n    realm: test\n    path: {htpasswd}\n"
    return Registry(workdir, auth=auth, storage=storage)


class TokenService:
    """Issues pull tokens to USER/PASSWORD, as Docker Hub's or GitLab's token service."""

    def __init__(self, workdir: Path) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazypod test tokens")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(1)
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .sign(self.key, hashes.SHA256()))
        self.bundle = workdir / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.port = free_port()
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self.requests: list[dict[str, str]] = []
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(self.path).query))
                service.requests.append(query)
                header = self.headers.get("Authorization", "")
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if header != expected:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"token": service.token(query.get("scope", ""))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def token(self, scope: str) -> str:
        access = []
        if scope:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = datetime.datetime.now(datetime.UTC)
        claims = {"iss": "lazypod-test-issuer", "sub": USER, "aud": "lazypod-test-registry",
                  "exp": now + datetime.timedelta(minutes=5), "nbf": now, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        x5c = [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"x5c": x5c})

    def registry(self, workdir: Path, storage: Path) -> Registry:
        auth = (f"  token:\n    realm: {self.realm}\n    service: lazypod-test-registry\n"
                f"    issuer: lazypod-test-issuer\n    rootcertbundle: {self.bundle}\n")
        return Registry(workdir, auth=auth, storage=storage)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
