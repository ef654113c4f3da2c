#!/usr/bin/env python3
"""Helm's own engine (the PyPI package helm-python-sdk, which bundles Helm's Go library) for the tests.

    helm.py lint CHART VALUES_JSON              -> the lint report (strict), as JSON
    helm.py render CHART VALUES_JSON RELEASE NS -> {template path: manifest}, as JSON (values checked first)
    helm.py validate CHART VALUES_JSON          -> exit 0, or 1 with the schema error on stderr
"""
import json
import sys

import helm_python as helm


def main(argv):
    command, chart, values = argv[1], argv[2], json.loads(argv[3])
    if command == "lint":
        print(json.dumps(helm.lint(chart, values, strict=True, kube_version="v1.34.0")))
    elif command == "render":
        with helm.Chart.load(chart) as loaded:
            loaded.validate_schema(values)
            rendered = loaded.render(values, name=argv[4], namespace=argv[5], is_install=True)
        print(json.dumps(rendered))
    elif command == "validate":
        with helm.Chart.load(chart) as loaded:
            try:
                loaded.validate_schema(values)
            except helm.HelmError as error:
                print(error, file=sys.stderr)
                return 1
    else:
        print(f"unknown command {command}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
