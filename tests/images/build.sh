#!/usr/bin/env bash
# Build the PostgreSQL image the container tests use, with no registry: a root filesystem assembled from
# this host's Debian packages and loaded with `docker import`. Its entrypoint honours POSTGRES_USER,
# POSTGRES_PASSWORD and POSTGRES_DB like the official image (testcontainers needs that).
# (The agent image is built by the package itself, from the host's static busybox: switcher/demo/image.py.)
#
# Usage: tests/images/build.sh [--force]   (an image that exists is kept unless --force)
set -euo pipefail

force=${1:-}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

image=switcher-test/postgres:15-jit
if [[ $force != --force ]] && docker image inspect "$image" >/dev/null 2>&1; then
    exit 0
fi

# Copy a file or a directory tree to the same path under $root.
put() {
    local root=$1 path=$2
    mkdir -p "$root$(dirname "$path")"
    cp -rL "$path" "$root$path"
}

# Copy every shared library the given binaries link against (and the dynamic loader) into $root.
put_libs() {
    local root=$1; shift
    ldd "$@" 2>/dev/null | awk '/=> \//{print $3} $1 ~ /^\/.*ld-linux/{print $1}' | sort -u |
        while read -r lib; do put "$root" "$lib"; done
}

root=$work/postgres
bindir=$(pg_config --bindir) libdir=$(pg_config --pkglibdir) sharedir=$(pg_config --sharedir)
mkdir -p "$root"/{bin,etc,tmp} && chmod 1777 "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for tool in sh env cat sleep echo ls mkdir rm chmod id printf; do ln -sf busybox "$root/bin/$tool"; done
for binary in postgres initdb pg_ctl psql; do put "$root" "$bindir/$binary"; done
put_libs "$root" "$bindir"/{postgres,initdb,pg_ctl,psql}
put "$root" "$sharedir"
put "$root" "$libdir"
# JIT included, as in PostgreSQL's official images (see postgres-entrypoint.sh).
put_libs "$root" "$root$libdir"/*.so
put "$root" /usr/share/zoneinfo/UTC
put "$root" /usr/share/zoneinfo/Etc/UTC
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
echo 'postgres:x:999:999:postgres:/var/lib/postgresql:/bin/sh' >> "$root/etc/passwd"
printf 'root:x:0:\npostgres:x:999:\n' > "$root/etc/group"
mkdir -p "$root/var/lib/postgresql" "$root/var/run/postgresql"
chown -R 999:999 "$root/var/lib/postgresql" "$root/var/run/postgresql"
install -m 755 "$here/postgres-entrypoint.sh" "$root/entrypoint.sh"
tar -C "$root" -c . | docker import \
    --change "ENV PATH=$bindir:/bin TZ=UTC PGDATA=/var/lib/postgresql/data" \
    --change 'USER postgres' \
    --change 'EXPOSE 5432' \
    --change 'ENTRYPOINT ["/entrypoint.sh"]' - "$image" >/dev/null
echo "built $image"
