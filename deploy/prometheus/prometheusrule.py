"""Write k8s/components/monitoring/prometheusrule.yaml from deploy/prometheus/chashd-rules.yaml.

    python deploy/prometheus/prometheusrule.py          # rewrite the PrometheusRule
    python deploy/prometheus/prometheusrule.py --check  # exit 1 when it differs (tests/deploy/test_monitoring.py)

The rules file is the one source: Prometheus loads it as it is (rule_files), the Prometheus Operator through
the PrometheusRule, whose spec.groups are the same groups.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "chashd-rules.yaml"
TARGET = ROOT / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# Written by python deploy/prometheus/prometheusrule.py from deploy/prometheus/chashd-rules.yaml (the one
# source of the rules; tests/deploy/test_monitoring.py checks that they agree). Edit the rules there.
"""


def render() -> str:
    """The PrometheusRule document."""
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "chashd", "labels": {"app.kubernetes.io/name": "chashd", "release": "prometheus"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(rule, sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} is stale: run python deploy/prometheus/prometheusrule.py", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
