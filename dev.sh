#!/usr/bin/env bash
# The project's two entry points, each setting up (or reusing) the virtual environment .venv first:
#   ./dev.sh demo [demo options]    start a local cluster and run example_demo.py against it
#   ./dev.sh test [pytest options]  lint, type-check and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

die() { echo "dev.sh: $*" >&2; exit 1; }

# Tools the deployment tests (tests/deploy) run besides the PyPI ones: systemd-analyze (Debian's systemd
# package: only its offline verify/security commands are used, nothing is booted) and kubectl with
# kustomize v5 (it comes with the machine; Debian's kubernetes-client is too old for k8s/).
setup_deploy_tools() {
    if ! command -v systemd-analyze >/dev/null; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
            echo "dev.sh: installing systemd (for systemd-analyze) with apt-get" >&2
            { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd; } \
                >"$VENV/apt-systemd.log" 2>&1 \
                || { tail -n 20 "$VENV/apt-systemd.log" >&2; die "apt-get install systemd failed"; }
        else
            die "systemd-analyze is missing: install the systemd package (as root: apt-get install systemd)"
        fi
    fi
    command -v kubectl >/dev/null \
        || die "kubectl is missing: install kubectl 1.27 or newer (tests/deploy renders k8s/ with kubectl kustomize)"
}

# apt_install PACKAGE BINARY WHY: install the Debian package PACKAGE (as root, or with passwordless sudo) unless
# BINARY is already on the PATH; returns non-zero, with apt's last lines on stderr, when it cannot.
apt_install() {
    local package=$1 binary=$2 why=$3
    command -v "$binary" >/dev/null && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo -n true 2>/dev/null || { echo "dev.sh: $binary is missing and we are not root: apt-get install -y $package" >&2; return 1; }
        sudo="sudo -n"
    fi
    command -v apt-get >/dev/null || { echo "dev.sh: $binary is missing and there is no apt-get to install $package" >&2; return 1; }
    echo "dev.sh: installing $package (Debian package) for $why" >&2
    # Keep apt from starting a service of the package (memcached would hold 127.0.0.1:11211, prometheus :9090).
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod +x "$policy" && made_policy=1
    fi
    local log="${TMPDIR:-/tmp}/chashd-apt.log" status=0
    { [ -n "$(find /var/lib/apt/lists -name '*Packages*' -print -quit 2>/dev/null)" ] || $sudo apt-get update; } \
        >"$log" 2>&1 || status=$?
    if [ "$status" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "$package" >>"$log" 2>&1 \
            || { $sudo apt-get update >>"$log" 2>&1 \
                 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "$package" >>"$log" 2>&1; } \
            || status=$?
    fi
    [ -n "$made_policy" ] && $sudo rm -f "$policy"
    [ "$status" -eq 0 ] && command -v "$binary" >/dev/null \
        || { tail -n 20 "$log" >&2; echo "dev.sh: cannot install $package; the apt output is in $log" >&2; return 1; }
}

setup_test_tools() {
    # tests/integration/test_memcache_compat.py compares our line protocol with a real memcached: required.
    apt_install memcached memcached "the differential test" || die "memcached is needed by the tests"
    # tests/integration/test_libmemcached_tools.py runs libmemcached's command-line tools against both roles;
    # where the package cannot be installed, those tests are skipped and say why.
    apt_install libmemcached-tools memcstat "the libmemcached tools' tests" \
        || echo "dev.sh: going on without libmemcached-tools (its tests will be skipped)" >&2
    # tests/deploy/test_monitoring.py checks and unit-tests the alert rules with promtool: required.
    apt_install prometheus promtool "promtool (the alert rules' tests)" || die "promtool is needed by the tests"
    # tests/integration/test_status_page.py loads the status page in headless Chromium; where it cannot be
    # installed, that test is skipped and says why.
    apt_install chromium chromium "the status page's browser test" \
        || echo "dev.sh: going on without Chromium (the status page's browser test will be skipped)" >&2
    # tests/integration/test_faults.py cuts links with iptables inside a private network namespace (tests/faults);
    # without it (or without root) those tests are skipped and say why. iptables lives in sbin.
    PATH="$PATH:/usr/sbin:/sbin" apt_install iptables iptables "the fault-injection tests" \
        || echo "dev.sh: going on without iptables (the fault-injection tests will be skipped)" >&2
}

setup_venv() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" --version 2>&1))"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || die "cannot create the virtual environment $VENV"
    # Reinstall only when the package's metadata or this script changed. The compat editable mode
    # puts the clone itself on sys.path (one .pth file), which is where Twisted's plugin scan finds
    # twisted/plugins/; the default (lenient) mode's import hook is invisible to that scan, and the strict mode
    # left a copy of the package in build/ (removed here from clones set up before).
    local stamp
    stamp=$(cat setup.cfg pyproject.toml dev.sh | cksum)
    if [ "$(cat "$VENV/.chashd-stamp" 2>/dev/null)" != "$stamp" ]; then
        echo "dev.sh: installing chashd and its test tools into $VENV" >&2
        local log="$VENV/pip.log"
        { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip \
          && "$VENV/bin/python" -m pip install --disable-pip-version-check \
                 -e '.[test]' --config-settings editable_mode=compat; } >"$log" 2>&1 \
            || { tail -n 20 "$log" >&2; die "pip install failed; the whole output is in $log"; }
        rm -rf build/__editable__.chashd-* build/lib build/bdist.*
        rmdir build 2>/dev/null || true
        "$VENV/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
        echo "$stamp" > "$VENV/.chashd-stamp"
    fi
}

run_tests() {
    echo "== ruff" >&2
    "$VENV/bin/ruff" check . && "$VENV/bin/ruff" format --check -q . || die "ruff found problems (ruff format . fixes the formatting)"
    echo "== mypy" >&2
    # Strict for the package, its plugins, its tests and its benchmarks (setup.cfg's [mypy] says where a
    # dependency without annotations relaxes it, and why).
    "$VENV/bin/mypy" chashd twisted/plugins tests bench || die "mypy failed"
    echo "== pytest" >&2
    # Two pytest processes (pytest-xdist), each running whole modules (--dist loadfile: a module's cluster
    # fixture starts once): the integration tests mostly wait on their daemons, so two of them overlap well
    # on two cores. Every test has its own ports (free_ports), directories (tmp_path) and namespaces; add -n 0
    # to run in one process. --no-loadscope-reorder hands the modules out in collection order (tests/deploy,
    # tests/integration, then the many short tests/unit modules, which fill in until both processes finish):
    # xdist's default order, most tests first, left the longest modules (the fault injection's 4 tests, the
    # two venv installs, a handful of 1-3 test cluster modules) for the end, where one process ran them while
    # the other sat idle.
    # Bytecode goes to $VENV/pycache (PYTHONPYCACHEPREFIX), written even where PYTHONDONTWRITEBYTECODE is set
    # (containers often set it), and never into the clone: without it every pytest process compiled and rewrote
    # every test module again (collecting took 10 s of CPU in each process at load 5, 2 s with the cache) and
    # every daemon the tests start compiled chashd again. What the temporary venvs and copies under /tmp left
    # there goes once the run is over.
    local status=0 pycache
    pycache="$(cd "$VENV" && pwd)/pycache"
    if [ -z "${PYTHONPYCACHEPREFIX:-}" ]; then
        export PYTHONPYCACHEPREFIX="$pycache"
        unset PYTHONDONTWRITEBYTECODE
    fi
    "$VENV/bin/python" -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@" || status=$?
    local tmp
    for tmp in /tmp "${TMPDIR:-/tmp}"; do
        tmp=$(cd "$tmp" 2>/dev/null && pwd -P) || continue
        case "$PWD/" in "$tmp"/*) ;; *) rm -rf "${pycache:?}$tmp" ;; esac
    done
    if [ "$status" -eq 5 ]; then
        die "pytest collected no tests"
    fi
    return "$status"
}

case "${1:-}" in
    demo) shift; setup_venv; exec "$VENV/bin/python" example_demo.py "$@" ;;
    test) shift; setup_venv; setup_deploy_tools; setup_test_tools; run_tests "$@" ;;
    *) echo "usage: ./dev.sh demo|test [options]" >&2; exit 2 ;;
esac
