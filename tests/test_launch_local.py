"""The local Ray runtime: advertised on 127.0.0.1, token authentication on, its files in a private folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_session_runtime_is_loopback_only_and_refuses_clients_without_its_token(ray_runtime, tmp_path):
    import ray

    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) >= 32
    assert any(ray_runtime.glob("session_*")), "Ray's session files are not in the private temp folder"
    from ibbench.launch.local import ray_temp_dir

    folder = ray_temp_dir()  # what `ibbench sweep` gives Ray: a folder of its own inside a private one
    assert folder.parent.stat().st_mode & 0o777 == 0o700 and folder.parent.name.startswith("ibbench-ray-")
    folder.parent.rmdir()
    gcs = ray.get_runtime_context().gcs_address
    intruder = textwrap.dedent(
        f"""
        import ray
        try:
            ray.init(address={gcs!r}, log_to_driver=False)
        except Exception as exc:
            print("refused:", type(exc).__name__)
        else:
            print("accepted", ray.cluster_resources())
        """
    )

    def attempt(env: dict) -> tuple[str, str]:
        try:
            proc = subprocess.run([sys.executable, "-c", intruder], env=env, capture_output=True, text=True,
                                  timeout=25)  # fmt: skip
            return proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:  # Ray keeps retrying a refused connection: it never got in
            return (exc.stdout or b"").decode(errors="replace"), (exc.stderr or b"").decode(errors="replace")

    # Another local user: no token in the environment, a home without ~/.ray/auth_token.
    stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    for mode in ("token", None):
        env = stranger | ({"RAY_AUTH_MODE": mode} if mode else {})
        out, err = attempt(env)
        assert "accepted" not in out, (mode, out, err[-2000:])
        assert "auth" in (out + err).lower(), (mode, out, err[-2000:])  # refused for want of the token
    # The control: with the runtime's token the same client gets in, so the refusals above are the token's doing.
    out, err = attempt(stranger | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]})
    assert "accepted" in out, err[-2000:]


def test_a_temp_folder_too_deep_for_ray_sockets_falls_back_to_tmp(tmp_path, monkeypatch):
    import tempfile

    from ibbench.launch.local import SOCKET_PATH_MAX, ray_temp_dir

    deep = tmp_path / ("d" * 60)  # a job's nested scratch folder, say
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    folder = ray_temp_dir()
    try:
        longest = folder / "session_2026-11-29_20-31-14_019691_4194304" / "sockets" / "plasma_store"
        assert len(str(longest)) <= SOCKET_PATH_MAX, longest
        assert folder.parent.parent == Path("/tmp") and folder.parent.stat().st_mode & 0o777 == 0o700
    finally:
        folder.parent.rmdir()
    shallow = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))  # short enough: kept
    monkeypatch.setattr(tempfile, "tempdir", str(shallow))
    try:
        assert ray_temp_dir().parent.parent == shallow
    finally:
        shutil.rmtree(shallow)
