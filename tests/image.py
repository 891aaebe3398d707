"""The container image without a container engine: the Dockerfile's two stages, replayed on
this machine into a fresh venv that stands for the image's Python.

There is no Docker daemon here, so the `image` fixture reads the Dockerfile and does what its
stages do, with their own commands:

- build stage: its COPY sources (and nothing else of the work tree) into a clean directory,
  then its RUN commands there (``pip wheel ... '.[fast]'``) with the stage's ENV, in a fresh
  venv, writing the wheels to a temporary directory that stands for ``/wheels``;
- run stage: its RUN command (``pip install --no-index --find-links /wheels 'sidekey[fast]'``,
  then ``sidekey --version``) in another fresh venv, from those wheels alone. The
  ``groupadd``/``useradd`` of the image's user are left out (they would change this machine);
  the tests run the result as that uid instead (tests/pod.py).

One liberty: pip's download cache is allowed (``--no-cache-dir`` and PIP_NO_CACHE_DIR are
dropped), which changes how long the download takes, not what is installed. Everything lives
in a world-readable directory under /var/tmp, so processes under the image's uid can read it
and a pod's /tmp mounted over /tmp does not hide it.

    def test_x(image):
        image.venv / "bin" / "sidekey"; image.env; image.user; image.healthcheck
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# Building the wheels downloads every dependency once per machine (pip's cache keeps them);
# ~1 min on an idle box with an empty cache, and CI's box is shared.
BUILD_SECONDS = 900.0
# The commands of the run stage that set up the image's user; replaced by running as its uid.
USER_SETUP = ("groupadd", "useradd")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: tuple[str, ...]
    value: str


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for ins in self.instructions:
            if ins.keyword == "ENV":
                for word in shlex.split(ins.value):
                    key, _, value = word.partition("=")
                    env[key] = value
        return env

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile: instructions with their --flags, continuations joined."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    stages: list[Stage] = []
    base, name, body = "", None, []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        keyword = keyword.upper()
        flags = []
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
        if keyword == "FROM":
            if base:
                stages.append(Stage(base, name, tuple(body)))
            words = rest.split()
            base, name = words[0], words[2] if len(words) > 2 else None
            body = []
        else:
            body.append(Instruction(keyword, tuple(flags), rest.strip()))
    stages.append(Stage(base, name, tuple(body)))
    return stages


@dataclass(frozen=True)
class Image:
    """The run stage, as a venv: `venv` is the image's Python, `env` its ENV, `user` its
    USER (uid, gid), `healthcheck` its HEALTHCHECK command, `entrypoint` + `cmd` its start."""

    base: Path
    venv: Path
    wheels: Path
    env: dict[str, str]
    user: tuple[int, int]
    healthcheck: list[str]
    entrypoint: list[str]
    cmd: list[str]

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def _exec_form(value: str) -> list[str]:
    words = __import__("json").loads(value)
    assert isinstance(words, list), value
    return [str(w) for w in words]


def _no_cache(command: str) -> str:
    return command.replace(" --no-cache-dir", "")


def _run(command: str, cwd: Path, env: dict[str, str], what: str) -> None:
    done = subprocess.run(
        ["sh", "-ec", command], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=BUILD_SECONDS, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"{what}: `{command}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}")


def image_python() -> str:
    """A Python 3.11 every uid may run, as the image's is: Debian's (python3-venv is in
    scripts/system-deps.sh), since a venv made from one under root's 0700 home (pyenv) is
    unusable by the image's uid."""
    debian = Path("/usr/bin/python3")
    if debian.is_file():
        return str(debian)
    return sys.executable


def _venv(path: Path) -> None:
    subprocess.run([image_python(), "-m", "venv", str(path)], check=True, timeout=BUILD_SECONDS)


def build_image(base: Path) -> Image:
    build, run = parse_dockerfile(DOCKERFILE.read_text())
    assert build.name == "build" and run.name is None, "expected a build stage and a run stage"
    assert build.base == run.base, "both stages on one Python"
    wheels = base / "wheels"
    wheels.mkdir()

    # The build stage: a clean copy of what it COPYs, then its RUN commands.
    (workdir,) = build.all("WORKDIR")
    src = base / "src"
    src.mkdir()
    for copy in build.all("COPY"):
        *sources, dest = copy.value.split()
        target = src / dest.removeprefix(workdir.value).lstrip("/").removeprefix("./")
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, target / path.name if dest.endswith("/") else target,
                                ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
    build_venv = base / "build-venv"
    _venv(build_venv)
    env = {**os.environ, **build.env(), "PATH": f"{build_venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("PIP_NO_CACHE_DIR", None)
    for ins in build.all("RUN"):
        _run(_no_cache(ins.value).replace("/wheels", str(wheels)), src, env, "build stage")
    assert list(wheels.glob("sidekey-*.whl")), "the build stage made no sidekey wheel"

    # The run stage: the wheels installed into a fresh venv, without the source tree.
    venv = base / "venv"
    _venv(venv)
    env = {**os.environ, **run.env(), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("PIP_NO_CACHE_DIR", None)
    for ins in run.all("RUN"):
        assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in ins.flags, ins
        steps = [s.strip() for s in ins.value.split("&&")]
        kept = [s for s in steps if not s.startswith(USER_SETUP)]
        assert len(kept) < len(steps), "the run stage makes the image's user"
        _run(" && ".join(_no_cache(s).replace("/wheels", str(wheels)) for s in kept),
             Path("/"), env, "run stage")  # fmt: skip

    (user,) = run.all("USER")
    uid, _, gid = user.value.partition(":")
    (health,) = run.all("HEALTHCHECK")
    found = re.search(r"CMD (\[.*\])$", health.value)
    assert found, health.value
    (entrypoint,) = run.all("ENTRYPOINT")
    (cmd,) = run.all("CMD")
    return Image(
        base=base,
        venv=venv,
        wheels=wheels,
        env=run.env(),
        user=(int(uid), int(gid or uid)),
        healthcheck=_exec_form(found.group(1)),
        entrypoint=_exec_form(entrypoint.value),
        cmd=_exec_form(cmd.value),
    )


@pytest.fixture(scope="session")
def image() -> Iterator[Image]:
    """The Dockerfile's image as a venv (see the module docstring); built once per session."""
    base = Path(tempfile.mkdtemp(prefix="sidekey-image-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    try:
        yield build_image(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
