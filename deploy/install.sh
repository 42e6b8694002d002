#!/bin/sh
# Install chashd on this host for systemd, from this source tree (run as root):
#
#   deploy/install.sh
#
# - a virtual environment in /opt/chashd with chashd (not editable) and its twistd plugin cache built,
#   plus the chash-kvstore-instance helper of chash-kvstore@.service;
# - the units (chash-gateway.service, chash-kvstore.service, chash-kvstore@.service, chash.target)
#   in /etc/systemd/system, and the system user chashd (/etc/sysusers.d/chashd.conf);
# - /etc/chashd/gateway.yaml, kvstore.yaml and chashd.env (random Raft password and token), only where
#   they do not exist yet: a re-install (an upgrade) never overwrites your configuration.
#
# Then edit /etc/chashd/*.yaml and: systemctl enable --now chash.target chash-gateway.service chash-kvstore.service
#
# Variables: PYTHON (the Python 3.11+ to build the venv with; default python3), DESTDIR (install under this
# directory instead of /, for packaging and tests: no user is created and systemd is not told; the venv
# there only works from that path).
set -eu

SOURCE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
PREFIX=/opt/chashd
VENV="$DESTDIR$PREFIX"
UNITDIR="$DESTDIR/etc/systemd/system"
CONFDIR="$DESTDIR/etc/chashd"

say() { echo "install.sh: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or set DESTDIR to install into a staging directory)"
fi
command -v "$PYTHON" > /dev/null || die "$PYTHON not found; set PYTHON to a Python 3.11 or newer"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" --version 2>&1); chashd needs Python 3.11 or newer"

# -- the virtual environment ------------------------------------------------------------------------
say "installing chashd from $SOURCE into $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || die "cannot create the virtual environment $VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check --no-input --quiet "$@"; }
# Dependencies first, then chashd itself again: an upgrade of the same version must still replace its files.
pip install "$SOURCE" || die "pip install $SOURCE failed"
pip install --force-reinstall --no-deps "$SOURCE" || die "pip install --force-reinstall $SOURCE failed"
# twistd finds chash-gateway and chash-kvstore through its plugin cache, which the daemons (with a
# read-only /opt under ProtectSystem=strict) cannot write themselves.
"$VENV/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' \
    || die "building the twistd plugin cache failed"
for role in chash-gateway chash-kvstore; do
    "$VENV/bin/twistd" "$role" --help > /dev/null || die "twistd does not know $role after the install"
done
install -m 0755 "$SOURCE/deploy/chash-kvstore-instance" "$VENV/bin/chash-kvstore-instance"
install -d -m 0755 "$VENV/share/doc/chashd"
install -m 0644 "$SOURCE/README.md" "$VENV/share/doc/chashd/README.md"
install -m 0644 "$SOURCE/systemd/README.md" "$VENV/share/doc/chashd/systemd.md"

# -- units and user ---------------------------------------------------------------------------------
install -d -m 0755 "$UNITDIR" "$DESTDIR/etc/sysusers.d"
for unit in chash-gateway.service chash-kvstore.service chash-kvstore@.service chash.target; do
    install -m 0644 "$SOURCE/systemd/$unit" "$UNITDIR/$unit"
done
install -m 0644 "$SOURCE/systemd/chashd.sysusers" "$DESTDIR/etc/sysusers.d/chashd.conf"
if [ -z "$DESTDIR" ] && ! getent passwd chashd > /dev/null; then
    if command -v systemd-sysusers > /dev/null; then
        systemd-sysusers /etc/sysusers.d/chashd.conf || die "systemd-sysusers could not create the user chashd"
    else
        useradd --system --user-group --home-dir /var/lib/chashd --no-create-home --shell /usr/sbin/nologin \
            chashd || die "useradd could not create the user chashd"
    fi
fi

# -- configuration (never overwritten) --------------------------------------------------------------
install -d -m 0750 "$CONFDIR"
for file in gateway.yaml kvstore.yaml; do
    if [ -e "$CONFDIR/$file" ]; then
        say "keeping the existing $CONFDIR/$file"
    else
        install -m 0640 "$SOURCE/deploy/etc/$file" "$CONFDIR/$file"
    fi
done
if [ -e "$CONFDIR/chashd.env" ]; then
    say "keeping the existing $CONFDIR/chashd.env"
else
    random_hex() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }
    raft_password=$(random_hex)
    token=$(random_hex)
    [ "${#raft_password}" -eq 64 ] && [ "${#token}" -eq 64 ] || die "cannot read random bytes from /dev/urandom"
    umask 077
    sed -e "s/^CHASHD_RAFT_PASSWORD=\$/CHASHD_RAFT_PASSWORD=$raft_password/" -e "s/^CHASHD_TOKEN=\$/CHASHD_TOKEN=$token/" \
        "$SOURCE/deploy/etc/chashd.env" > "$CONFDIR/chashd.env"
    chmod 0600 "$CONFDIR/chashd.env"
    say "wrote $CONFDIR/chashd.env with a random Raft password and token (copy it to the cluster's other hosts)"
fi
if [ -z "$DESTDIR" ]; then
    # The daemons read the YAML files as chashd; systemd reads chashd.env as root.
    chgrp chashd "$CONFDIR" "$CONFDIR/gateway.yaml" "$CONFDIR/kvstore.yaml"
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || die "systemctl daemon-reload failed"
    fi
fi

say "done. Edit $CONFDIR/gateway.yaml and $CONFDIR/kvstore.yaml, then:"
say "  systemctl enable --now chash.target chash-gateway.service chash-kvstore.service  (or chash-kvstore@kv1 ...)"
