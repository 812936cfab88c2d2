#!/usr/bin/env bash
# Build the local images the Docker-backed tests use, with no registry: each is a root filesystem
# assembled from this host's files and loaded with `docker import`.
#
#   switcher-test/postgres:15  PostgreSQL 15 from the host's Debian packages; its entrypoint honours
#                              POSTGRES_USER/PASSWORD/DB like the official image (testcontainers needs that)
#   switcher-test/agent:1      busybox; prints its environment, then sleeps until SIGTERM (a stand-in agent)
#
# Usage: tests/images/build.sh [--force]   (images that exist are kept unless --force)
set -euo pipefail

force=${1:-}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

have() { [[ $force != --force ]] && docker image inspect "$1" >/dev/null 2>&1; }

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

busybox_root() {
    local root=$1
    mkdir -p "$root"/{bin,etc,tmp} && chmod 1777 "$root/tmp"
    cp /bin/busybox "$root/bin/busybox"
    for tool in sh env cat sleep echo ls mkdir rm chmod id printf; do ln -sf busybox "$root/bin/$tool"; done
}

build_agent() {
    local image=switcher-test/agent:1 root=$work/agent
    have "$image" && return
    busybox_root "$root"
    echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/bin' \
        --change 'CMD ["sh", "-c", "trap \"exit 0\" TERM INT; env; sleep 2147483647 & wait"]' - "$image" >/dev/null
    echo "built $image"
}

build_postgres() {
    local image=switcher-test/postgres:15 root=$work/postgres
    have "$image" && return
    local bindir libdir sharedir
    bindir=$(pg_config --bindir) libdir=$(pg_config --pkglibdir) sharedir=$(pg_config --sharedir)
    busybox_root "$root"
    for binary in postgres initdb pg_ctl psql; do put "$root" "$bindir/$binary"; done
    put_libs "$root" "$bindir"/{postgres,initdb,pg_ctl,psql}
    put "$root" "$sharedir"
    put "$root" "$libdir"
    rm -rf "$root$libdir/bitcode" "$root$libdir"/llvmjit*  # no JIT in the image
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
}

build_agent
build_postgres
