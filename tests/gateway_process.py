"""The HTTP gateway as its own process for tests: `fluxmesh serve http` with torch imports blocked,
so every test that uses it also proves the gateway runs without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from fluxmesh.cli.lifeline import child_environment
from fluxmesh.cli.supervisor import free_port
from mesh import Mesh, exited, wait_until

# Any import of torch, diffusers or transformers fails in the gateway process; once stopped it
# prints whether torch got into sys.modules anyway. (uvicorn shuts down on SIGTERM, then raises
# the signal again for the handler it found installed: this one.)
LAUNCHER = textwrap.dedent("""
    import signal, sys
    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith(("torch.", "diffusers", "transformers")):
                raise ImportError(f"{name} is blocked in the gateway's tests")
    sys.meta_path.insert(0, BlockTorch())
    def stopped(*_):
        print("torch-free" if "torch" not in sys.modules else "torch imported", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stopped)
    from fluxmesh.cli.main import main
    main()
""")


class Gateway:
    def __init__(self, orchestrator: str, *extra: str, log: Path, scheme: str = "http", verify=True):
        self.port = free_port()
        self.log = log
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.verify = verify
        command = [
            sys.executable,
            "-c",
            LAUNCHER,
            "serve",
            "http",
            "--orchestrator",
            orchestrator,
            "--port",
            str(self.port),
            *extra,
        ]
        with open(log, "ab") as output:  # a file, not a pipe: a full pipe would stall the gateway
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=child_environment())
        self._wait_ready()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_ready(self, timeout: float = 60.0) -> None:
        def answers() -> bool:
            try:
                return httpx.get(f"{self.url}/health", timeout=1.0, verify=self.verify).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(answers, timeout, what=f"the gateway on {self.url}", alive=exited(self.process, self.output))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> str:
        """SIGTERM, wait, and return everything it printed."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.output()


@contextmanager
def token_orchestrator(
    stage_addresses: dict[str, str], stage_token: str, folder: Path, token: str, *flags: str
) -> Iterator[str]:
    """An orchestrator of its own on the shared cluster's stages that demands `token` (plus
    `flags`), serving when this yields its address."""
    (folder / "tokens").write_text(f"{token}\n")
    args = {"orchestrator": ["--token-file", str(folder / "tokens"), *flags]}
    mesh = Mesh(logs=folder, stages=stage_addresses, stage_token=stage_token, extra_args=args)
    with mesh.start_all(timeout=60):
        yield mesh.address
