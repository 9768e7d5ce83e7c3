"""Hub ids without a network: a clear error in seconds, instead of a minute of retries.

A name that is not a local path is a Hugging Face hub id. Before transformers or datasets are asked for one,
the hub is asked once (per id and process) whether it answers, with a short timeout:

- it answers (whatever the answer: the repo, a 404, a gated repo): loading goes on exactly as it would have;
  transformers' own message covers a typo or a private repo;
- it cannot be reached, and the model's files are in the local cache: they are loaded from there
  (``local_files_only=True``), with one line saying so;
- it cannot be reached and nothing is cached: a SepoError saying to check the path or id, or to set
  ``HF_HUB_OFFLINE=1`` for cached files.

With ``HF_HUB_OFFLINE=1`` nothing is asked: the libraries read their cache and fail fast themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sepo.errors import SepoError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
# names of the transport errors of requests and httpx (no common base class with OSError for httpx)
_NETWORK_ERRORS = ("ConnectionError", "ConnectError", "ConnectTimeout", "TimeoutException", "Timeout",
                   "NetworkError", "TransportError", "ProxyError", "SSLError")
_probed: dict[tuple[str, str, str | None], BaseException | None] = {}


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _unreachable(err: BaseException) -> bool:
    """True for a failure to talk to the hub at all; False when it answered (an HTTP status, a bad id)."""
    if getattr(err, "response", None) is not None:
        return False
    if type(err).__name__ in ("HFValidationError", "OfflineModeIsEnabled"):
        return False
    return isinstance(err, (OSError, TimeoutError)) or any(c.__name__ in _NETWORK_ERRORS for c in type(err).__mro__)


def probe(repo_id: str, repo_type: str = "model", revision: str | None = None) -> BaseException | None:
    """The error that kept the hub from answering about ``repo_id``, or None when it answered. Asked once."""
    key = (repo_type, repo_id, revision)
    if key not in _probed:
        from huggingface_hub import HfApi

        try:
            HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=PROBE_TIMEOUT_S)
            _probed[key] = None
        except Exception as e:  # requests / httpx / huggingface_hub errors: classified, never raised here
            _probed[key] = e if _unreachable(e) else None
    return _probed[key]


def _cached(repo_id: str, repo_type: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    names = ("config.json", "tokenizer_config.json") if repo_type == "model" else ("README.md",)
    return any(isinstance(try_to_load_from_cache(repo_id, n, revision=revision, repo_type=repo_type), str)
               for n in names)


def unreachable_error(kind: str, name: str, err: BaseException) -> SepoError:
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return SepoError(
        f"{kind} '{name}' is not a local path, and the Hugging Face hub ({hub_endpoint()}) cannot be reached to "
        f"fetch it as a hub id ({type(err).__name__}: {first}). Check the spelling or the path; for files already "
        "in your Hugging Face cache set HF_HUB_OFFLINE=1; or download it where there is a network and pass its "
        "folder")


def hub_hint() -> str:
    """What to check when a hub id could not be loaded."""
    if hub_offline():
        return ("HF_HUB_OFFLINE is set, so only your Hugging Face cache was searched and it is not there: check "
                "the spelling or the path, or unset HF_HUB_OFFLINE to download it")
    return ("as a hub id it could not be fetched: check the spelling or the path, and the name on the hub (a "
            "private or gated repo needs `hf auth login`)")


def hub_kwargs(kind: str, name: str, *, repo_type: str = "model", revision: str | None = None) -> dict:
    """Extra ``from_pretrained`` keyword arguments for ``name``: ``{}`` for a local path, in offline mode, or
    when the hub answers; ``{"local_files_only": True}`` when it cannot be reached but the files are cached.
    Raises SepoError when it cannot be reached and nothing is cached."""
    if Path(name).expanduser().exists() or hub_offline():
        return {}
    err = probe(name, repo_type, revision)
    if err is None:
        return {}
    if repo_type == "model" and _cached(name, repo_type, revision):
        if (repo_type, name, "logged") not in _probed:
            _probed[(repo_type, name, "logged")] = None
            log.info("the hub cannot be reached; loading %s from the local cache", name)
        return {"local_files_only": True}
    raise unreachable_error(kind, name, err)
