"""Flower deployment helpers: TLS certificates, node keys, and a SuperLink + N SuperNodes on one host.

On real machines each piece runs on its own host (README, "Run on real machines"); `LocalDeployment`
starts them all on loopback, as separate processes, for a demo and for tests. Nothing here is
insecure by default: the SuperLink serves TLS with a certificate from a CA made by `make_certs`,
and every SuperNode authenticates with its own key, registered with the SuperLink before it joins.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.certs import Certificates, make_certs
from fedpeft.config import Spec
from fedpeft.spec_io import to_run_config

__all__ = [
    "Certificates",
    "make_certs",
    "LocalDeployment",
    "flwr_simulation",
    "free_port",
    "run_config_arg",
    "stop_processes_started_with",
]


NODE_IDS = "federation.node_ids"


def registered_node_id(output: str) -> int:
    """The node id in what `flwr supernode register --format json` printed."""
    match = re.search(r'"node-id":\s*(\d+)', output) or re.search(r"SuperNode (\d+) registered", output)
    if match is None:
        raise RuntimeError(f"no node id in the output of flwr supernode register:\n{output[-2000:]}")
    return int(match.group(1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_config_arg(spec: Spec, out: str | Path) -> str:
    """`spec` and the output directory as one `flwr run --run-config` argument (TOML values)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    flat = {**to_run_config(spec), "out": str(out)}
    return " ".join(f"{k}={value(v)}" for k, v in flat.items())


def stop_processes_started_with(key: str, value: str) -> int:
    """SIGTERM every process of this user whose environment has `key=value` (Linux /proc): the
    processes this project started with that environment, e.g. the local SuperLink `flwr run`
    starts in the background (and detaches) under the FLWR_HOME directory we made for it. A process
    that merely mentions the path on its command line is left alone."""
    stopped = 0
    marker = f"{key}={value}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # another user's process, or gone
            continue
        if marker in environ and int(entry.name) != os.getpid():
            try:
                os.kill(int(entry.name), signal.SIGTERM)
                stopped += 1
            except OSError:
                pass
    return stopped


def _flower_env(flwr_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        # Flower's processes start further Flower executables (flower-superexec, flwr-serverapp,
        # flwr-clientapp) by name: this environment's bin directory must come first on PATH
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # app dependencies are this environment's; never `uv sync` a second torch per run
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def flwr_simulation(
    app: str | Path, run_config: str, nodes: int, flwr_home: str | Path, timeout: float = 3600.0
) -> subprocess.CompletedProcess:
    """`flwr run APP --stream` in Flower's simulation runtime with `nodes` SuperNodes, through a local
    SuperLink of its own (FLWR_HOME=flwr_home, free ports), stopped afterwards."""
    home = Path(flwr_home).resolve()
    env = {
        **_flower_env(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    cmd = [_bin("flwr"), "run", str(app), "--stream", "--federation-config", f"num-supernodes={nodes}"]
    try:
        return subprocess.run(
            [*cmd, "--run-config", run_config], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    finally:
        stop_processes_started_with("FLWR_HOME", str(home))


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (works without an activated venv)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


@dataclass
class LocalDeployment:
    """A TLS SuperLink and `nodes` authenticated SuperNodes on loopback, each its own process.

    Node k gets `--node-config "partition-id=k num-partitions=N state-dir=<dir>/node-k"`: its own
    data partition and a disk for its privacy ledger. `flwr` commands run with FLWR_HOME=<dir>/flwr,
    whose config.toml names this SuperLink as the connection `fedpeft-local`. The node ids the
    SuperLink gives at registration are kept (`node_ids`) and every run is bound to them
    (federation.node_ids): a node that connects first cannot take another's partition.
    """

    directory: Path
    nodes: int
    port: int = 0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    certs: Certificates | None = None
    node_ids: list[int] = field(default_factory=list)  # node k's id, given by the SuperLink at registration
    node_config: str = ""  # more node config for every node, e.g. 'max-epsilon=6' (its privacy policy)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.env = _flower_env(self.directory / "flwr")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _log(self, name: str):  # noqa: ANN202
        return open(self.directory / f"{name}.log", "ab")  # noqa: SIM115

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with self._log(name) as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = proc
        return proc

    def start(self, timeout: float = 60.0) -> None:
        """Certificates, the SuperLink, node registration, then the SuperNodes."""
        self.certs = make_certs(self.directory / "certs", nodes=self.nodes)
        flwr_home = self.directory / "flwr"
        flwr_home.mkdir(exist_ok=True)
        (flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "fedpeft-local"\n\n[superlink.fedpeft-local]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.certs.ca}"\n'
        )
        self._spawn(
            "superlink",
            [
                _bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.server_cert),
                "--ssl-keyfile", str(self.certs.server_key), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation", "--database", str(self.directory / "superlink.db"),
            ],
        )  # fmt: skip
        self._wait_for_superlink(timeout)
        for k in range(self.nodes):
            public = str(self.certs.node_keys[k].with_suffix(".pub"))
            done = self.flwr(["supernode", "register", public, "fedpeft-local", "--format", "json"])
            self.node_ids.append(registered_node_id(done.stdout + done.stderr))
        for k in range(self.nodes):
            self.start_node(k)

    def start_node(self, k: int) -> subprocess.Popen:
        assert self.certs is not None, "start() first"
        state = self.directory / f"node-{k}"
        return self._spawn(
            f"node-{k}",
            [
                _bin("flower-supernode"), "--superlink", self.address, "--root-certificates", str(self.certs.ca),
                "--auth-supernode-private-key", str(self.certs.node_keys[k]), "--port", str(free_port()),
                "--node-config", f'partition-id={k} num-partitions={self.nodes} state-dir="{state}" {self.node_config}'.strip(),
            ],
        )  # fmt: skip

    def restart_node(
        self, k: int, timeout: float = 180.0, settle: float = 10.0, pause: float = 5.0
    ) -> subprocess.Popen:
        """Start node k again after it died. Until the SuperLink expires the dead session (Flower's
        heartbeat: 2 x 30 s) it refuses the same key, and the SuperNode exits (code 305) instead of
        retrying; so it is started again every `pause` s until one stays up `settle` s (connected), or
        RuntimeError after `timeout`. On a real machine a supervisor does the same (systemd
        `Restart=on-failure`, `RestartSec=15`)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.start_node(k)
            try:
                code = proc.wait(timeout=settle)
            except subprocess.TimeoutExpired:
                return proc
            self.processes.pop(f"node-{k}", None)
            if time.monotonic() + pause > deadline:
                raise RuntimeError(f"node {k} kept exiting (last code {code}); see {self.directory / f'node-{k}.log'}")
            time.sleep(pause)

    def kill_node(self, k: int) -> None:
        """The node dies without a goodbye (SIGKILL to its whole process group)."""
        proc = self.processes.pop(f"node-{k}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _wait_for_superlink(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes["superlink"].poll() is not None:
                raise RuntimeError(f"SuperLink exited; see {self.directory / 'superlink.log'}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"SuperLink not up after {timeout:g} s; see {self.directory / 'superlink.log'}")

    def flwr(
        self, args: list[str], timeout: float = 120.0, check: bool = True, capture: bool = True
    ) -> subprocess.CompletedProcess:
        """Run a `flwr` command against this deployment (capture=False: its output goes to ours)."""
        result = subprocess.run(
            [_bin("flwr"), *args], env=self.env, capture_output=capture, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def run_command(self, app: str | Path, run_config: str) -> list[str]:
        """`flwr run` of `run_config` (fedpeft.deploy.run_config_arg), bound to this deployment's nodes
        unless it names federation.node_ids itself."""
        if self.node_ids and f'{NODE_IDS}=""' in run_config:
            run_config = run_config.replace(f'{NODE_IDS}=""', f'{NODE_IDS}="{",".join(map(str, self.node_ids))}"')
        return [_bin("flwr"), "run", str(app), "fedpeft-local", "--stream", "--run-config", run_config]

    def run(
        self, app: str | Path, run_config: str, timeout: float = 600.0, capture: bool = True
    ) -> subprocess.CompletedProcess:
        """`flwr run APP fedpeft-local --stream --run-config ...`; returns when the run has finished."""
        return self.flwr(self.run_command(app, run_config)[1:], timeout=timeout, capture=capture)

    def stop(self) -> None:
        for proc in reversed(list(self.processes.values())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.processes.clear()

    def __enter__(self) -> LocalDeployment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
