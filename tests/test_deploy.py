"""docker/: the compose file passes a real Compose implementation's config check, runs the commands
and settings of `make airflow` (deploy/stack.py), reads only settings .env.example lists, and its
images build from pinned bases with nothing fetched when a container starts."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.stack import SERVICES, airflow_settings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_NAMES = {
    "api-server": ["airflow-apiserver"],
    "scheduler": ["airflow-scheduler"],
    "dag-processor": ["airflow-dag-processor"],
    "triggerer": ["airflow-triggerer"],
    "worker": ["airflow-worker"],
    "ascend-worker": ["airflow-ascend-worker", "airflow-ascend-worker-cpu"],
}
# compose-only settings: the admin password the init service writes, and where it writes it
COMPOSE_ONLY = {"SIMPLE_AUTH_ADMIN_PASSWORD", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"}


def env_example() -> dict[str, str]:
    """KEY=VALUE lines of .env.example (comments and blank lines skipped)."""
    lines = (DOCKER / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if "=" in line and not line.lstrip().startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose (Debian's Compose implementation) is not installed: .ci/run installs it")
    proc = subprocess.run(
        [tool, "--env-file", str(DOCKER / ".env.example"), "-f", str(DOCKER / "docker-compose.yaml"),
         "--profile", "ascend", "--profile", "cpu", "config"],
        capture_output=True, text=True, cwd=DOCKER,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def expected_settings(env: dict[str, str], db: str, redis: str, api: str) -> dict[str, str]:
    """The stack's settings for a component reaching PostgreSQL at `db`, Redis at `redis` and the API
    server at `api`, with .env.example's secrets."""
    return airflow_settings(
        db_url=f"postgresql+psycopg2://airflow:{env['POSTGRES_PASSWORD']}@{db}/airflow",
        broker_url=f"redis://:{env['REDIS_PASSWORD']}@{redis}/0",
        api_url=api,
        secrets_={
            "fernet_key": env["FERNET_KEY"],
            "api_secret_key": env["API_SECRET_KEY"],
            "jwt_secret": env["JWT_SECRET"],
        },
        dags_folder="/opt/llama-lora-flow/dags",
        work_root="/data",
        pipelines="/opt/llama-lora-flow/pipelines",
    )


def test_every_service_runs_the_stacks_command(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, compose_names in COMPOSE_NAMES.items():
        for compose_name in compose_names:
            assert services[compose_name]["command"] == SERVICES[name], compose_name
    assert {"postgres", "redis", "airflow-init"} <= set(services)


def test_every_airflow_service_has_the_stacks_settings(compose: dict[str, Any]) -> None:
    env = env_example()
    control_plane = expected_settings(env, "postgres:5432", "redis:6379", "http://airflow-apiserver:8080")
    addr = env["CONTROL_PLANE_ADDR"]
    on_host_network = expected_settings(
        env, f"{addr}:{env['POSTGRES_PORT']}", f"{addr}:{env['REDIS_PORT']}", f"http://{addr}:8080"
    )
    for compose_names in COMPOSE_NAMES.values():
        for compose_name in compose_names:
            got = {k: str(v) for k, v in compose["services"][compose_name]["environment"].items()}
            want = on_host_network if compose_name == "airflow-ascend-worker" else control_plane
            ours = {k: v for k, v in got.items() if k.startswith(("AIRFLOW__", "LLAMA_LORA_"))}
            extra = set(ours) - set(want) - COMPOSE_ONLY - {"LLAMA_LORA_NODE_ADDR"}
            assert not extra, f"{compose_name}: settings the stack lacks: {sorted(extra)}"
            for key, value in want.items():
                assert got.get(key) == value, (
                    f"{compose_name}: {key} is {got.get(key)!r}, the stack's {value!r}"
                )
    ascend = compose["services"]["airflow-ascend-worker"]
    assert ascend["environment"]["LLAMA_LORA_NODE_ADDR"] == env["NODE_ADDR"]
    assert len([d for d in ascend["devices"] if "davinci" in str(d) and str(d)[-1].isdigit()]) == 8


def test_env_example_lists_every_setting_the_compose_file_reads() -> None:
    text = (DOCKER / "docker-compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))  # $${X} is the container's own
    assert used, "no ${VAR} in the compose file?"
    missing = used - set(env_example())
    assert not missing, f"not in .env.example: {sorted(missing)}"


def test_images_are_pinned_and_fetch_nothing_at_run_time(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
    for dockerfile in DOCKER.glob("Dockerfile.*"):
        text = dockerfile.read_text()
        for arg in re.findall(r"^ARG (\w+)=(\S+)", text, re.M):
            assert ":" in arg[1] and "latest" not in arg[1], f"{dockerfile.name}: {arg}"
        for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
            for path in src.split():
                assert (REPO / path).exists(), f"{dockerfile.name}: COPY {path}: not in the repository"
    entrypoint = (DOCKER / "entrypoint-worker.sh").read_text()
    assert not re.search(r"\b(pip|curl|wget|apt-get)\b", entrypoint)


def test_the_stack_cli_parses_every_action_and_says_when_there_is_no_stack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deploy.stack import main

    assert main(["demo", "--root", str(tmp_path), "--nodes", "2"]) == 1
    assert capsys.readouterr().err == f"error: no stack in {tmp_path}: make airflow first\n"
    assert main(["status", "--root", str(tmp_path)]) == 0
    assert main(["stop", "--root", str(tmp_path)]) == 0  # nothing to stop is not an error


def test_the_demo_waits_for_an_api_server_and_names_it_when_it_does_not_answer(tmp_path: Path) -> None:
    from deploy.demo import rest_session
    from deploy.stack import Stack, StackState
    from llama_core.launch.preflight import free_port

    stack = Stack(tmp_path)
    port = free_port()  # nothing listens there
    stack.state = StackState(port, 1, 2, 3, 4, {"admin_password": "x"})
    stack.save()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        rest_session(stack, wait_s=2)
    assert 2 <= time.monotonic() - t0 < 10  # it waited, then gave up
    assert f"api-server at http://127.0.0.1:{port} did not answer within 2 s" in str(info.value)
    assert str(tmp_path / "logs" / "api-server.log") in str(info.value)
