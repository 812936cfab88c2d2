#!/usr/bin/env bash
# Make a Docker engine answer on this machine and build the local test images (no registry needed).
# Installs Debian's docker.io (and busybox-static for the agent image) when missing; starts dockerd
# in the background when it is not running. Used by .ci/run and `make docker-up`.
set -euo pipefail

if ! command -v dockerd >/dev/null || ! command -v busybox >/dev/null; then
    if [[ $(id -u) != 0 ]]; then
        echo "docker-up: dockerd or busybox is missing; install docker.io and busybox-static" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io busybox-static >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    log=${TMPDIR:-/tmp}/switcher-dockerd.log
    nohup dockerd >"$log" 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { echo "docker-up: dockerd did not start; see $log" >&2; exit 1; }
fi

"$(dirname "$0")/build.sh"
