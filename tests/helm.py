"""The Helm chart under test (deploy/helm/sidekey) rendered by a real helm.

helm is built once from the Go module proxy by ``scripts/build-helm.sh`` (``make helm``, a
dependency of ``make test``) into ``~/.cache/sidekey/helm-<version>/``; the tests call it as a
user would:

    def test_x(helm):
        docs = helm.template("examples/sidecar.yaml")      # the objects, as dicts
        helm.lint("examples/gateway.yaml")
        err = helm.template_error({"mode": "nope"})        # helm's message when it refuses

Values are values files under the chart (relative paths) or dicts, written to a file and
passed with ``-f`` after the others (so a dict overrides what comes before it, and replaces
lists whole, as Helm does).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

HELM_VERSION = "v4.3.2"
HELM = (
    Path(os.environ.get("SIDEKEY_CACHE", Path.home() / ".cache" / "sidekey"))
    / f"helm-{HELM_VERSION}"
    / "bin"
    / "helm"
)
CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "sidekey"
EXAMPLES = sorted(p.relative_to(CHART).as_posix() for p in (CHART / "examples").glob("*.yaml"))
RELEASE = "sk"
NAMESPACE = "sidekey-test"
# helm template of this chart takes well under a second; this covers a loaded CI box.
HELM_SECONDS = 120.0

Values = str | Mapping[str, Any]


@dataclass(frozen=True)
class Helm:
    binary: Path
    chart: Path = CHART

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            timeout=HELM_SECONDS,
            check=False,
            # helm keeps caches and its config under HOME; none of it is needed to render.
            env={**os.environ, "HELM_CACHE_HOME": tempfile.gettempdir() + "/sidekey-helm-cache"},
        )

    def _value_args(self, values: Iterable[Values], workdir: Path) -> list[str]:
        args: list[str] = []
        for i, value in enumerate(values):
            if isinstance(value, str):
                args += ["-f", str(self.chart / value)]
            else:
                path = workdir / f"values-{i}.yaml"
                path.write_text(yaml.safe_dump(dict(value), sort_keys=False))
                args += ["-f", str(path)]
        return args

    def template_text(self, *values: Values, namespace: str = NAMESPACE) -> str:
        """`helm template` output; fails the test with helm's error if it refuses."""
        done = self._template(values, namespace)
        if done.returncode != 0:
            pytest.fail(f"helm template failed: {done.stderr}")
        return done.stdout

    def template(self, *values: Values, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        """The rendered objects (empty documents dropped)."""
        text = self.template_text(*values, namespace=namespace)
        return [doc for doc in yaml.safe_load_all(text) if doc]

    def template_error(self, *values: Values) -> str:
        """helm's error for values the chart must refuse (fails the test if it renders)."""
        done = self._template(values, NAMESPACE)
        if done.returncode == 0:
            pytest.fail("helm template rendered values the chart should refuse")
        return done.stderr

    def _template(
        self, values: Iterable[Values], namespace: str
    ) -> subprocess.CompletedProcess[str]:
        with tempfile.TemporaryDirectory(prefix="sidekey-values-") as tmp:
            args = self._value_args(values, Path(tmp))
            return self.run("template", RELEASE, str(self.chart), "-n", namespace, *args)

    def lint(self, *values: Values) -> str:
        with tempfile.TemporaryDirectory(prefix="sidekey-values-") as tmp:
            args = self._value_args(values, Path(tmp))
            done = self.run("lint", "--strict", str(self.chart), "-n", NAMESPACE, *args)
        if done.returncode != 0:
            pytest.fail(f"helm lint failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout


@pytest.fixture(scope="session")
def helm() -> Iterator[Helm]:
    if not HELM.is_file():
        pytest.fail(f"{HELM} is missing: build it with `make helm` (scripts/build-helm.sh)")
    yield Helm(HELM)


def find(docs: Iterable[Mapping[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of `kind` (and `name`, when given) among `docs`."""
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} named {name}: {found}"
    return dict(found[0])


def config_of(docs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The rendered sidekey.yaml, parsed."""
    data = yaml.safe_load(find(docs, "ConfigMap")["data"]["sidekey.yaml"])
    assert isinstance(data, dict)
    return data


def pod_spec(docs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The pod template of the one Deployment (the gateway's, or the app's in sidecar mode)."""
    spec = find(docs, "Deployment")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def containers(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every container of a pod spec, init containers (and so native sidecars) first."""
    return [*spec.get("initContainers", []), *spec["containers"]]
