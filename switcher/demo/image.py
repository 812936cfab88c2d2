"""The demo's agent image, built from this package and the host's static busybox: no registry needed.

``switcher-demo/agent:1`` prints its environment, then sleeps until SIGTERM; its busybox has ``cat``,
``sh`` and friends, which the hot-reload hook (``cat > /tmp/credential``) needs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
from typing import Any

AGENT_IMAGE = "switcher-demo/agent:1"
PT_INTERP = 3
AGENT_COMMAND = ["sh", "-c", 'trap "exit 0" TERM INT; env; sleep 2147483647 & wait']


class ImageUnavailable(Exception):
    """The agent image is not here and cannot be built (the message says why)."""


def ensure_agent_image(client: Any, image: str = AGENT_IMAGE) -> str:
    """The agent image, built from the host's static busybox when missing."""
    import docker

    try:
        client.images.get(image)
        return image
    except docker.errors.ImageNotFound:
        pass
    busybox = shutil.which("busybox")
    if busybox is None or not _static(busybox):
        raise ImageUnavailable(
            f"no image {image}, and no static busybox on this host to build one from "
            "(Debian: apt-get install busybox-static)"
        )
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    repository, tag = image.rsplit(":", 1)
    client.api.import_image_from_data(
        _root_filesystem(busybox, applets),
        repository=repository,
        tag=tag,
        changes=["ENV PATH=/bin", f"CMD {json.dumps(AGENT_COMMAND)}"],
    )
    return image


def _static(path: str) -> bool:
    """True when ``path`` is a 64-bit little-endian ELF without an interpreter (PT_INTERP): statically
    linked, so it runs in an image that holds nothing else."""
    with open(os.path.realpath(path), "rb") as f:
        header = f.read(64)
        if header[:6] != b"\x7fELF\x02\x01":
            return False
        offset, size, count = (
            struct.unpack_from("<Q", header, 0x20)[0],
            *struct.unpack_from("<HH", header, 0x36),
        )
        f.seek(offset)
        table = f.read(size * count)
    return all(struct.unpack_from("<I", table, i * size)[0] != PT_INTERP for i in range(count))


def _root_filesystem(busybox: str, applets: list[str]) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for directory, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777)):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in applets:
            if applet != "busybox":
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        passwd = b"root:x:0:0:root:/:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))
    return data.getvalue()
