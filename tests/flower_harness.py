"""A real Flower deployment on loopback for tests: one SuperLink and N SuperNodes started as
processes on free ports, each stopped by its pid afterwards, also when the test fails."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedhello.engine.flower.runner import flwr_home_entry
from fedhello.environment import OFFLINE_ENV

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        **OFFLINE_ENV, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })  # fmt: skip
    return env


@dataclass
class Deployment:
    address: str
    home: Path
    superlink: subprocess.Popen
    supernodes: list[subprocess.Popen] = field(default_factory=list)
    ca: Path | None = None

    def stop(self) -> None:
        for proc in [*self.supernodes, self.superlink]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in [*self.supernodes, self.superlink]:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost (cryptography)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("fedhello test CA")).issuer_name(name("fedhello test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=False).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))  # fmt: skip
    return paths


@contextmanager
def deployment(
    tmp: Path, nodes: int, tls: bool = False, node_extra: dict[int, str] | None = None,
    registered: set[int] | None = None,
) -> Iterator[Deployment]:  # fmt: skip
    """``registered``: node authentication (``--enable-supernode-auth``, TLS): every node has
    a key pair, and only the public keys of these nodes are registered with the SuperLink."""
    with ExitStack() as logs:
        yield from _deployment(tmp, nodes, tls, logs, node_extra or {}, registered)


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format (what `ssh-keygen -t ecdsa -b 384` makes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ))  # fmt: skip
    return private, public


def _deployment(
    tmp: Path, nodes: int, tls: bool, files: ExitStack, node_extra: dict[int, str],
    registered: set[int] | None,
) -> Iterator[Deployment]:  # fmt: skip
    home = tmp / "flwr-home"
    env = flower_env(home)
    port = free_port()
    security = ["--insecure"]
    node_security = ["--insecure"]
    ca = None
    if tls:
        ca, cert, key = make_certificates(tmp / "certs")
        security = [
            "--ssl-ca-certfile",
            str(ca),
            "--ssl-certfile",
            str(cert),
            "--ssl-keyfile",
            str(key),
        ]
        node_security = ["--root-certificates", str(ca)]
    if registered is not None:
        assert tls, "node authentication needs TLS"
        security.append("--enable-supernode-auth")
    logs = tmp / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    superlink = subprocess.Popen(
        [str(BIN / "flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=files.enter_context(open(logs / "superlink.log", "w")),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    dep = Deployment(
        f"127.0.0.1:{port}" if not tls else f"localhost:{port}", home, superlink, ca=ca
    )
    try:
        wait_for_port(port, superlink)
        keys = {}
        if registered is not None:
            assert ca is not None
            flwr_home_entry(home, "auth-admin", dep.address, str(ca))
            for i in range(nodes):
                keys[i] = make_node_keys(tmp / "keys", f"site{i}")
                if i in registered:
                    subprocess.run(
                        [str(BIN / "flwr"), "supernode", "register", str(keys[i][1]),
                         "auth-admin"],
                        env=env, check=True, capture_output=True, timeout=60,
                    )  # fmt: skip
        for i in range(nodes):
            log = files.enter_context(open(logs / f"supernode{i}.log", "w"))  # noqa: SIM115
            extra = node_extra.get(i, "")
            # a real site gives its data file and no partition id: the server assigns one
            node_config = extra if "data=" in extra else f"partition-id={i} {extra}".strip()
            auth = ["--auth-supernode-private-key", str(keys[i][0])] if i in keys else []
            dep.supernodes.append(subprocess.Popen(
                [str(BIN / "flower-supernode"), *node_security, *auth, "--superlink",
                 dep.address, "--port", str(free_port()), "--node-config", node_config],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        yield dep
    finally:
        dep.stop()


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the SuperLink exited at start"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}")
