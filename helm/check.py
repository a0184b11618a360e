"""Print what the chart's checks see, for people rather than pytest: `python helm/check.py`.

Lints the chart strictly, renders it with the defaults and with every option (the same values as
tests/test_helm.py), validates each object strictly against the Kubernetes versions the tests use,
shows three bad values refused by the schema, and lists the dashboard's panels. Needs the dev
extra (helm-python-sdk, kubernetes-validate); nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# This folder holds the chart's folder `tureen/`, which would shadow the package: tests/ replaces it.
sys.path[0] = str(Path(__file__).resolve().parents[1] / "tests")

import helm_python as helm  # noqa: E402
import kubernetes_validate  # noqa: E402
from test_helm import CHART, container, full_values, kube_versions, render  # noqa: E402


def main() -> None:
    for label, values in (("defaults", None), ("full options", full_values())):
        for version in kube_versions():
            report = helm.lint(CHART, values, strict=True, namespace="default", kube_version=f"v{version}")
            notes = [f"{m['path']}: {m['error']}" for m in report["messages"]]
            print(f"lint --strict, {label}, Kubernetes {version}: errors {report['errors']}, messages {notes}")
        objects = render(values)
        print(f"render, {label}: " + ", ".join(sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)))
        for version in kube_versions():
            checked = [o for o in objects if not o["apiVersion"].startswith("monitoring.coreos.com/")]
            for obj in checked:
                kubernetes_validate.validate({k: v for k, v in obj.items() if k != "__template"}, version, strict=True)
            print(f"  validate --strict, Kubernetes {version}: {len(checked)} objects valid (a ServiceMonitor is a CRD)")
        print(f"  container: {container(objects).get('command')} {container(objects)['args']}")
    for bad in ({"replicaCount": "three"}, {"surprise": 1}, {"resources": {"limits": {"memory": "a lot"}}}):
        try:
            render(bad)
            print(f"ACCEPTED {bad}")
        except helm.HelmError as exc:
            print(f"refused {bad}: {' '.join(line.strip() for line in str(exc).splitlines()[1:3])}")
    dashboard = json.loads((CHART / "dashboards" / "tureen.json").read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    print(f"dashboard {dashboard['title']!r}, schemaVersion {dashboard['schemaVersion']}: {titles}")


if __name__ == "__main__":
    main()
