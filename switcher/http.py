"""POST JSON to a URL: switch notifications (webhooks) and hot-reload hooks (``switcher.reload-url``).

URLs here often carry a token (chat webhooks do), so they never appear in a log line or an error.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from .errors import Undeliverable


def post_json(url: str, body: Mapping[str, Any], *, timeout: float, headers: Mapping[str, str] = {}) -> int:
    """POST ``body``; the HTTP status. Raises ``OSError`` when nothing answers within ``timeout`` (or the
    answer is not HTTP), ``Undeliverable`` for a URL that can never work -- neither message quoting it."""
    if not url.startswith(("http://", "https://")):
        raise Undeliverable("the URL must start with http:// or https://")
    request = urllib.request.Request(
        url,
        data=json.dumps(body, default=str).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "switcher", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        return int(error.code)
    except (ValueError, http.client.InvalidURL) as error:  # their messages quote the URL, token and all
        raise Undeliverable(f"the URL is not valid ({type(error).__name__})") from None
    except http.client.HTTPException as error:
        raise OSError(f"not an HTTP answer ({type(error).__name__})") from None
