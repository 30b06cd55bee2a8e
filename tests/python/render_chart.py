"""Renders a Helm chart with the real Helm engine (helm-python-sdk embeds Helm's Go library)
and prints the result as JSON: {"lint": [...], "templates": {path: text}}.

usage: render_chart.py CHART_DIR VALUES_FILE RELEASE NAMESPACE
"""
import json
import sys

import helm_python
from helm_python import Chart


def main() -> None:
    chart_dir, values_file, release, namespace = sys.argv[1:5]
    values = helm_python.values_from_yaml(open(values_file).read())
    chart = Chart.load(chart_dir)
    try:
        templates = chart.render(values=values, name=release, namespace=namespace)
    except helm_python.HelmError as e:
        print(json.dumps({"error": str(e)}))
        return
    lint = helm_python.lint(chart_dir, values=values, strict=True, quiet=True)
    print(json.dumps({"lint": lint, "templates": templates}, default=str))


if __name__ == "__main__":
    main()
