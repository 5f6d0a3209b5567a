"""Download stage: resumable, verified, cached fetch of weights, tokenizer and data from any store.

from llama_core.fetch import fetch, Credentials
result = fetch("s3://bucket/llama2_7b.ckpt", "work/", sha256="...",
               credentials=Credentials(key=..., secret=..., endpoint_url="https://obs...."))
result.files[0].path, result.files[0].sha256
"""

from llama_core.fetch.core import fetch
from llama_core.fetch.redact import redact
from llama_core.fetch.remote import FetchError
from llama_core.fetch.results import FetchedFile, FetchResult
from llama_core.fetch.source import HF_SYNTAX, Credentials, RetryPolicy, Timeouts, parse_source

__all__ = [
    "HF_SYNTAX",
    "Credentials",
    "FetchError",
    "FetchResult",
    "FetchedFile",
    "RetryPolicy",
    "Timeouts",
    "fetch",
    "parse_source",
    "redact",
]
