"""testbed/build-images.sh and the test bed's own images: the contracts the real cluster relies on.

File-level checks, no buildah: `--list` names the tarballs the cluster imports; the Dockerfiles
are built as they are (the local base goes through their PYTHON_IMAGE/PYTHON_DIGEST args); the
SMTP sink's command is one smtp.py accepts and its stop signal is one it handles as PID 1; the
RabbitMQ image runs as the user deploy/rabbitmq/statefulset.yaml asks for.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "testbed" / "build-images.sh"
IMAGES = REPO / "testbed" / "images"
SMTP = REPO / "testbed" / "emailqueue_testbed" / "smtp.py"


def _instructions(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _json_instruction(path: Path, keyword: str) -> list[str]:
    (line,) = [i for i in _instructions(path) if i.startswith(f"{keyword} ")]
    return [str(word) for word in yaml.safe_load(line[len(keyword) + 1:])]


def _version() -> str:
    text = (REPO / "operator" / "emailqueue_operator" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "(.*)"$', text, re.M)
    assert match
    return match.group(1)


def _versions_env() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (REPO / "testbed" / "versions.env").read_text().splitlines()
             if line and not line.startswith("#"))
    return dict(pairs)


def test_list_names_one_tarball_per_image_under_the_cache(tmp_path: Path) -> None:
    """`make cluster-up` imports exactly these files (`--list | cut -d= -f2`); listing builds nothing."""
    result = subprocess.run(
        [str(SCRIPT), "--list"], capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "EQ_TESTBED_CACHE": str(tmp_path)},
    )
    listed = dict(line.split("=", 1) for line in result.stdout.splitlines())
    version, rabbitmq = _version(), _versions_env()["RABBITMQ4_DEB_VERSION"]
    assert listed == {
        "operator": f"{tmp_path}/images/emailqueue-operator-{version}.tar",
        "worker": f"{tmp_path}/images/email-worker-{version}.tar",
        "smtp-sink": f"{tmp_path}/images/smtp-sink-{version}.tar",
        "rabbitmq": f"{tmp_path}/images/rabbitmq-{rabbitmq}.tar",
    }
    assert not (tmp_path / "images").exists()


def test_builds_run_without_network_and_the_dockerfiles_unchanged() -> None:
    script = SCRIPT.read_text(encoding="utf-8")
    buds = [line for line in script.splitlines() if re.search(r"\bbah bud\b", line)]
    assert len(buds) == 3 and all("--network none" in b and "--pull=never" in b for b in buds), buds
    # The upstream FROM ${PYTHON_IMAGE}@${PYTHON_DIGEST} is satisfied by the local base, not edited.
    assert '--build-arg "PYTHON_IMAGE=$BASE_REPO" --build-arg "PYTHON_DIGEST=$(base_digest)"' in script
    assert "--require-hashes --only-binary=:all:" in script


def _smtp_sink_command() -> list[str]:
    containerfile = IMAGES / "smtp-sink" / "Containerfile"
    return _json_instruction(containerfile, "ENTRYPOINT") + _json_instruction(containerfile, "CMD")


def test_smtp_sink_command_is_one_smtp_py_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's ENTRYPOINT + CMD parse, and listen on every interface on the Service's ports."""
    from emailqueue_testbed import smtp as module

    assert Path(module.__file__ or "").resolve() == SMTP.resolve(), "the image copies this file"
    served: list[tuple[Any, ...]] = []
    monkeypatch.setattr(module, "serve", lambda *args, **kwargs: served.append((*args, kwargs)))
    command = _smtp_sink_command()
    assert command[:2] == ["python3", "/app/eqsmtp.py"]
    module.main(command[2:])
    assert served == [("0.0.0.0", 2525, 8025, {"record_bodies": True})]


def test_smtp_sink_needs_only_what_its_base_has_and_stops_on_its_stop_signal() -> None:
    """The base has Debian's python3 and python3-aiosmtpd only; smtp.py installs no SIGTERM handler,
    which PID 1 would ignore, so the image stops it with SIGINT (KeyboardInterrupt)."""
    tree = ast.parse(SMTP.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported - set(sys.stdlib_module_names) == {"aiosmtpd"}
    instructions = _instructions(IMAGES / "smtp-sink" / "Containerfile")
    assert "STOPSIGNAL SIGINT" in instructions
    assert "USER 65532:65532" in instructions


def test_rabbitmq_image_runs_as_the_statefulsets_user_and_execs_the_server() -> None:
    statefulset = yaml.safe_load((REPO / "deploy" / "rabbitmq" / "statefulset.yaml").read_text())
    pod = statefulset["spec"]["template"]["spec"]
    context = pod["securityContext"]
    instructions = _instructions(IMAGES / "rabbitmq" / "Containerfile")
    assert f"USER {context['runAsUser']}:{context['runAsGroup']}" in instructions
    run = " ".join(i for i in instructions if i.startswith("RUN "))
    assert f"usermod -u {context['runAsUser']}" in run and f"groupmod -g {context['runAsGroup']}" in run
    (container,) = pod["containers"]
    env = {e["name"] for e in container["env"]}
    entrypoint = (IMAGES / "rabbitmq" / "entrypoint.sh").read_text(encoding="utf-8")
    for name in env:
        assert name in entrypoint, f"the entrypoint does not mention {name}, which the StatefulSet sets"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][0] == "rabbitmq-diagnostics"
    assert "/usr/sbin" in " ".join(i for i in instructions if i.startswith("ENV "))
    last = [line for line in entrypoint.splitlines() if line.strip()][-1]
    assert last.startswith("exec "), "the server must replace the shell to be PID 1"
    assert os.access(IMAGES / "rabbitmq" / "entrypoint.sh", os.X_OK)


def test_rabbitmq_entrypoint_is_valid_sh() -> None:
    subprocess.run(["sh", "-n", str(IMAGES / "rabbitmq" / "entrypoint.sh")], check=True, timeout=30)
