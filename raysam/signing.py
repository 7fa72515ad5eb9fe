"""Late signing of asset hrefs (Planetary Computer SAS tokens), right before a read.

Owns :class:`HrefSigner` (one cached SAS token per Azure Blob Storage container, refreshed
near expiry or after a 403), the token fetcher over ``planetary_computer.sas``, and the
key-free :class:`SignerSpec` that Ray tasks get instead of the :class:`~raysam.stac.StacConfig`:
a worker's signer reads the key from its own environment, so the key is never in a task
argument that Ray could spill to disk. Items keep unsigned hrefs; readers call the signer
from :func:`make_href_signer` right before opening an asset.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlparse

from raysam.deadline import bounded
from raysam.errors import DataError
from raysam.stac import StacConfig

__all__ = ["HrefSigner", "SignerSpec", "TokenFetcher", "make_href_signer", "pc_token_fetcher", "signer_spec"]

BLOB_DOMAIN = ".blob.core.windows.net"  # planetary_computer.sas.BLOB_STORAGE_DOMAIN
TokenFetcher = Callable[[str, str, bool], tuple[str, datetime]]


def _blob_container(href: str) -> tuple[str, str] | None:
    """(account, container) of an Azure Blob Storage URL, else None."""
    parsed = urlparse(href)
    if not parsed.netloc.endswith(BLOB_DOMAIN) or parsed.query:
        return None
    parts = parsed.path.lstrip("/").split("/", 1)
    return (parsed.netloc[: -len(BLOB_DOMAIN)], parts[0]) if parts[0] else None


@dataclass(frozen=True)
class SignerSpec:
    """What signs asset hrefs, without the key: picklable, so it can travel in Ray task arguments.

    A signer built from it (:func:`make_href_signer`) reads the key from its own process's
    ``PC_SDK_SUBSCRIPTION_KEY`` (Ray workers inherit the job's environment; on a cluster, keep
    the key in the cluster's environment).

    Attributes:
        sign: sign Azure Blob Storage hrefs with Planetary Computer SAS tokens; False: identity.
        retries: retries of a token request (``stac.retries``).
        backoff_s: backoff factor between those retries (``stac.backoff_s``).
        timeout_s: per try of a token request (``stac.timeout_s``).
    """

    sign: bool
    retries: int
    backoff_s: float
    timeout_s: float = 30.0


def signer_spec(cfg: StacConfig) -> SignerSpec:
    """The key-free description of ``cfg``'s href signing, for workers."""
    return SignerSpec(sign=cfg.kind == "planetary_computer" and cfg.sign, retries=cfg.retries, backoff_s=cfg.backoff_s,
                      timeout_s=cfg.timeout_s)


def pc_token_fetcher(spec: SignerSpec, pc_key: str | None = None) -> TokenFetcher:
    """A fetcher of SAS tokens through ``planetary_computer.sas.get_token`` (its own cache too).

    Args:
        spec: the token requests' retries and backoff.
        pc_key: the subscription key; None: this process's ``PC_SDK_SUBSCRIPTION_KEY``, read
            when a token is fetched (none: anonymous requests).
    """

    def fetch(account: str, container: str, fresh: bool) -> tuple[str, datetime]:
        import planetary_computer
        from planetary_computer import sas
        from planetary_computer.settings import Settings

        key = pc_key or os.environ.get("PC_SDK_SUBSCRIPTION_KEY")
        if key:
            planetary_computer.set_subscription_key(key)
        if fresh:
            sas.TOKEN_CACHE.pop(f"{Settings.get().sas_url}/{account}/{container}", None)
        def request() -> Any:
            return sas.get_token(account, container, retry_total=spec.retries, retry_backoff_factor=spec.backoff_s)

        limit_s = (spec.retries + 1) * spec.timeout_s  # get_token's requests have no timeout of their own
        try:
            token = bounded(request, limit_s, lambda: DataError(
                f"the Planetary Computer SAS token service did not answer within {limit_s:g} s for {account}/{container}: "
                "check the network, or raise stac.timeout_s"))
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - requests errors never carry the key (it is a header)
            status = getattr(getattr(err, "response", None), "status_code", None)
            raise DataError(f"could not get a Planetary Computer SAS token for {account}/{container}"
                            f"{f' (HTTP {status})' if status else ''}: {type(err).__name__}: check the network "
                            "and PC_SDK_SUBSCRIPTION_KEY / stac.pc_key") from None
        return token.token, token.expiry

    return fetch


class HrefSigner:
    """Signs asset hrefs right before reading, caching one SAS token per container until near expiry.

    Call it with an unsigned href; call :meth:`resign` after an HTTP 403 to force a fresh token.
    Hrefs that ``container_of`` does not place in a container pass through unchanged (by
    default: everything but Azure Blob Storage URLs, e.g. local paths and other hosts).

    Args:
        fetch: token fetcher ``(account, container, fresh) -> (token, expiry)``; None: no signing.
        refresh_margin_s: fetch a new token when the cached one expires within this margin.
        container_of: ``href -> (account, container)`` or None for hrefs that need no token.
    """

    def __init__(self, fetch: TokenFetcher | None, refresh_margin_s: float = 300.0,
                 container_of: Callable[[str], tuple[str, str] | None] | None = None):
        self._fetch = fetch
        self._container_of = container_of or _blob_container
        self._margin = timedelta(seconds=refresh_margin_s)
        self._tokens: dict[tuple[str, str], tuple[str, datetime]] = {}

    def __repr__(self) -> str:
        return f"HrefSigner(signing={self._fetch is not None}, cached_tokens={len(self._tokens)})"

    def _token(self, container: tuple[str, str], fresh: bool) -> str:
        cached = self._tokens.get(container)
        expiring = cached is not None and cached[1] - datetime.now(timezone.utc) < self._margin
        if fresh or expiring or cached is None:
            # An expiring token must bypass planetary_computer's own cache (it keeps tokens to 60 s).
            cached = self._fetch(*container, fresh or expiring)
            self._tokens[container] = cached
        return cached[0]

    def _sign(self, href: str, fresh: bool) -> str:
        container = self._container_of(href) if self._fetch else None
        return href if container is None else f"{href}?{self._token(container, fresh)}"

    def __call__(self, href: str) -> str:
        """The signed href (a cached token if it is valid for more than the margin)."""
        return self._sign(href, fresh=False)

    def resign(self, href: str) -> str:
        """The href signed with a freshly fetched token (after a 403)."""
        return self._sign(href, fresh=True)


def make_href_signer(cfg: StacConfig | SignerSpec, fetch: TokenFetcher | None = None,
                     container_of: Callable[[str], tuple[str, str] | None] | None = None) -> HrefSigner:
    """The href signer for a config: identity for ``local`` or ``sign=False``, else Planetary Computer SAS.

    Args:
        cfg: the STAC config (its ``pc_key``, else ``PC_SDK_SUBSCRIPTION_KEY``, is used, never
            shown), or on a worker its key-free :class:`SignerSpec` (the key then comes from
            the worker's ``PC_SDK_SUBSCRIPTION_KEY``).
        fetch: token fetcher ``(account, container, fresh) -> (token, expiry)``; defaults to
            ``planetary_computer``'s.
        container_of: which hrefs need a token, and for which (account, container); defaults
            to Azure Blob Storage URLs.
    """
    spec = cfg if isinstance(cfg, SignerSpec) else signer_spec(cfg)
    if not spec.sign:
        return HrefSigner(None)
    pc_key = cfg.pc_key if isinstance(cfg, StacConfig) else None
    return HrefSigner(fetch or pc_token_fetcher(spec, pc_key), container_of=container_of)
