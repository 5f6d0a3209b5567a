"""One redaction function for everything fetch prints, raises, returns or records.

Credentials reach a fetch in URL userinfo (`https://user:pass@host/...`), in query parameters
(`?token=...`, presigned `X-Amz-Signature=...`, OBS `AccessKeyId=...&Signature=...`) or as
explicit values; `redact` hides all three wherever they occur in a text, including the bare
`/path?query` that HTTP client errors quote.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"

# userinfo: "scheme://user:pass@" (stops at "/" so an "@" later in the path is not touched)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")
# a query parameter whose name says it carries a secret; its value ends at &, #, space or quote
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;](?:x-amz-[\w-]*|x-obs-[\w-]*|x-goog-[\w-]*|[\w.-]*(?:token|secret|signature|sig|"
    r"passw(?:or)?d|pwd|key|auth|credential|session)[\w.-]*)=)[^&#\s'\"]*",
    re.IGNORECASE,
)


def redact(text: object, secrets: Iterable[str | None] = ()) -> str:
    """`text` with URL userinfo, secret-looking query values and each of `secrets` masked."""
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", str(text))
    out = _SECRET_PARAM.sub(lambda m: f"{m['name']}{MASK}", out)
    for secret in secrets:
        if secret and len(secret) >= 4:  # a 1-3 character "secret" would mask random text
            out = out.replace(secret, MASK)
    return out
