"""Run one container of a rendered Kubernetes pod on this machine, as closely as one machine
allows (used by the image and chart tests).

What the kubelet and the container runtime would do, done with util-linux in a private mount
namespace (``unshare --mount``), so nothing of it is visible outside the process:

- every volume mount of the container is a bind mount of a host directory (or file) at the
  manifest's own ``mountPath``, read-only where the manifest says ``readOnly``; a directory
  that does not exist on this machine (``/etc/sidekey``) is made inside an overlay of its
  parent, whose changes go to a scratch directory and never reach the host;
- ``readOnlyRootFilesystem: true``: the root file system (and every overlay) is remounted
  read-only, so only the mounted volumes are writable, as in the pod;
- the process runs as the manifest's ``runAsUser``/``runAsGroup`` with ``fsGroup`` and
  ``supplementalGroups`` as its groups, ``no_new_privs`` (``allowPrivilegeEscalation:
  false``), and no capability at all (``drop: [ALL]``), through ``setpriv``;
- its environment is the container's ``env`` (values and the pod-name field) and PATH only;
- its command is the container's ``command`` + ``args``, found on the given PATH (the
  image's binaries are the ones on this machine: the wheel-installed venv, Debian's psql).

Not reproduced: the pod's own network namespace (the process uses this machine's loopback,
so listeners are bound to 127.0.0.1 and free ports by the values the tests pass), the pid
namespace, cgroup limits and the seccomp profile. Needs root (CI runs as root); the tests
that use it are skipped otherwise, with the reason.

    run = PodContainer(spec, "sidekey", volumes={"sidekey-config": config_dir, ...},
                       scratch=tmp, path=[venv / "bin"])
    proc = run.popen(stdout=..., stderr=...)   # the container's process, by its own PID
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin")


def require_root() -> None:
    """Skip unless this process may make mount namespaces (root, as in CI)."""
    if os.geteuid() != 0:
        pytest.skip("running a pod's container needs root (mount namespaces, setpriv)")
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is not installed")


@dataclass(frozen=True)
class Bind:
    """`source` on the host appears at `target` in the container."""

    target: str
    source: Path
    read_only: bool = False


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.realpath(path))
    while not path.exists():
        path = path.parent
    return path


@dataclass
class Sandbox:
    """A command in a private mount namespace with binds, a read-only root, and dropped
    privileges. `scratch` holds the overlays' upper layers (a host directory; emptied by the
    caller)."""

    binds: Sequence[Bind]
    scratch: Path
    uid: int
    gid: int
    groups: Sequence[int] = ()
    read_only_root: bool = True
    env: Mapping[str, str] = field(default_factory=dict)

    def script(self) -> str:
        assert not any(
            self.scratch == Path(b.target) or Path(b.target) in self.scratch.parents
            for b in self.binds
        ), f"{self.scratch}: the scratch directory must not be under a mount (use /var/tmp)"
        lines = ["set -e"]
        overlays: list[Path] = []
        for bind in self.binds:
            target = Path(bind.target)
            if Path(os.path.realpath(target)).exists():
                continue
            parent = _nearest_existing(target)
            if parent == Path("/"):
                raise ValueError(f"{target}: no parent below / to overlay; mount it elsewhere")
            if not any(parent == o or o in parent.parents for o in overlays):
                overlays.append(parent)
        for i, parent in enumerate(overlays):
            upper, work = (
                self.scratch / f"overlay-{i}" / "upper",
                self.scratch / f"overlay-{i}" / "work",
            )
            upper.mkdir(parents=True, exist_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            shutil.copystat(parent, upper)
            lines.append(
                f"mount -t overlay overlay -o lowerdir={q(parent)},upperdir={q(upper)},"
                f"workdir={q(work)} {q(parent)}"
            )
        # Every source is first bound into the scratch directory, so a volume mounted over a
        # source's path (a pod's /tmp over a socket under /tmp) does not hide it.
        staged: dict[int, Path] = {}
        for i, bind in enumerate(self.binds):
            stage = self.scratch / f"source-{i}"
            if bind.source.is_dir():
                stage.mkdir(parents=True, exist_ok=True)
            else:
                stage.parent.mkdir(parents=True, exist_ok=True)
                stage.touch()
            lines.append(f"mount --bind {q(bind.source)} {q(stage)}")
            staged[id(bind)] = stage
        # Outer mounts first, so a mount inside another volume lands in it.
        for bind in sorted(self.binds, key=lambda b: len(Path(b.target).parts)):
            if bind.source.is_dir():
                lines.append(f"mkdir -p {q(bind.target)}")
            else:
                lines.append(f"mkdir -p {q(str(Path(bind.target).parent))}")
                lines.append(f"[ -e {q(bind.target)} ] || touch {q(bind.target)}")
            lines.append(f"mount --bind {q(staged[id(bind)])} {q(bind.target)}")
        for bind in self.binds:
            if bind.read_only:
                lines.append(f"mount -o remount,bind,ro {q(bind.target)}")
        if self.read_only_root:
            lines.append("mount -o remount,bind,ro /")
            lines += [f"mount -o remount,ro {q(p)}" for p in overlays]
        groups = ",".join(str(g) for g in self.groups) if self.groups else None
        setpriv = [
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
            f"--groups={groups}" if groups else "--clear-groups",
            "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--",
        ]  # fmt: skip
        env = ["env", "-i", *(f"{k}={v}" for k, v in self.env.items())]
        lines.append(f'exec {" ".join(q(a) for a in setpriv + env)} "$@"')
        return "\n".join(lines)

    def argv(self, command: Sequence[str]) -> list[str]:
        return [
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", self.script(), "sandbox", *command,
        ]  # fmt: skip


class PodContainer:
    """One container of a pod spec, run by `Sandbox` with the pod's volumes as host paths.

    `volumes` maps a volume name to the host directory (or file) that stands for it; `files`
    adds file binds inside a volume's mount (e.g. a real agent socket into the SPIFFE volume).
    Every volume the container mounts must be given.
    """

    def __init__(
        self,
        spec: Mapping[str, Any],
        name: str,
        *,
        volumes: Mapping[str, Path],
        scratch: Path,
        path: Sequence[Path | str] = (),
        files: Mapping[str, Path] | None = None,
        pod_name: str = "pod-0",
    ) -> None:
        every = [*spec.get("initContainers", []), *spec["containers"]]
        matches = [c for c in every if c["name"] == name]
        assert len(matches) == 1, f"no container {name} in the pod"
        self.container: dict[str, Any] = matches[0]
        pod_sc = spec.get("securityContext", {})
        sc = {**pod_sc, **self.container.get("securityContext", {})}
        assert sc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot is not set"
        uid, gid = int(sc["runAsUser"]), int(sc.get("runAsGroup", sc["runAsUser"]))
        groups = [int(pod_sc["fsGroup"])] if "fsGroup" in pod_sc else []
        groups += [int(g) for g in pod_sc.get("supplementalGroups", [])]
        binds = []
        for mount in self.container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{name}: no host path for volume {mount['name']}"
            assert "subPath" not in mount, "subPath is not reproduced"
            source = volumes[mount["name"]]
            if "subPathExpr" in mount:
                assert mount["subPathExpr"] == "$(POD_NAME)", mount
                source = source / pod_name
                source.mkdir(exist_ok=True)
                _fs_group(source, groups)
            binds.append(Bind(mount["mountPath"], source, bool(mount.get("readOnly", False))))
        for target, source in (files or {}).items():
            binds.append(Bind(target, source))
        env = {"PATH": ":".join([*(str(p) for p in path), *SYSTEM_PATH])}
        for var in self.container.get("env", []):
            if "value" in var:
                env[var["name"]] = str(var["value"])
            elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[var["name"]] = pod_name
            else:
                raise AssertionError(f"{name}: env {var['name']} is not reproduced: {var}")
        self.env = env
        self.sandbox = Sandbox(
            binds=binds,
            scratch=scratch / name,
            uid=uid,
            gid=gid,
            groups=groups,
            read_only_root=bool(sc.get("readOnlyRootFilesystem", False)),
            env=env,
        )

    @property
    def command(self) -> list[str]:
        return [*self.container.get("command", []), *self.container.get("args", [])]

    def argv(self, command: Sequence[str] | None = None) -> list[str]:
        """The host command line that runs `command` (default: the container's own) in it."""
        return self.sandbox.argv(self.command if command is None else command)

    def popen(self, command: Sequence[str] | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(command), start_new_session=True, **kwargs)

    def run(self, command: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command), capture_output=True, text=True, timeout=timeout, check=False
        )


def empty_dir(path: Path, groups: Sequence[int]) -> Path:
    """A directory standing for an emptyDir volume: what the kubelet makes with fsGroup set
    (group-owned by it, setgid, group-writable)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o777)
    _fs_group(path, groups)
    return path


def _fs_group(path: Path, groups: Sequence[int]) -> None:
    if groups:
        os.chown(path, -1, groups[0])
        os.chmod(path, 0o2777)


def q(value: object) -> str:
    return shlex.quote(str(value))
