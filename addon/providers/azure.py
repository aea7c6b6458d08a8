"""Azure OpenAI: the real key as `api-key`; the URL is built per key from its resource endpoint.

Two URL forms (Azure serves both):
- a key with `deployment` (or a `deployments` map, model name -> deployment) uses the deployment
  form: `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version={api_version}`
  (`api_version` required); the body's `model` is not used by Azure to route.
- a key without a deployment uses Azure's newer v1 form: `{endpoint}/openai/v1/chat/completions`
  (no dated api-version: `?api-version=` only for "preview" or "latest"); the body's `model`
  names the deployment.
The Responses API has only the v1 form (`/openai/v1/responses`, its `model` is the deployment).
`AzureTarget` is parsed by the keys file (policy/keys_parse.py) from the key's fields, or the
`providers.azure` entry's; pure, no mitmproxy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Protocol
from urllib.parse import urlsplit

from addon.providers.base import CatalogProvider
from addon.wire.errors import GatewayError

V1_VERSIONS = frozenset({"preview", "latest"})
FIELDS = frozenset({"endpoint", "deployment", "deployments", "api_version"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.-]{0,31}")


@dataclass(frozen=True)
class AzureTarget:
    endpoint: str  # https://{resource}.openai.azure.com, no trailing slash
    deployment: str | None = None  # used for a model not in `deployments`
    deployments: Mapping[str, str] | None = None  # model name -> deployment
    api_version: str | None = None

    @property
    def deployment_form(self) -> bool:
        return self.deployment is not None or bool(self.deployments)

    def display_url(self, path: str) -> str:
        """The chat URL for the operator's listing (a map's deployments shown as {deployment})."""
        if self.deployments and self.deployment is None:
            return f"{self.endpoint}/openai/deployments/{{deployment}}{path}?api-version={self.api_version}"
        return self.url(path, None)

    def url(self, path: str, model: str | None) -> str:
        """Where a request for `path` ("/chat/completions", "/embeddings", "/responses...") goes."""
        if not self.deployment_form or path.startswith("/responses"):
            # the v1 form takes no dated api-version; "preview" (or "latest") opts into previews
            version = f"?api-version={self.api_version}" if self.api_version in V1_VERSIONS else ""
            return f"{self.endpoint}/openai/v1{path}{version}"
        deployment = (self.deployments or {}).get(model or "", self.deployment)
        if deployment is None:
            raise GatewayError(400, f"model {model!r} has no Azure deployment for this virtual key "
                               f"(deployments: {', '.join(sorted(self.deployments or {}))})",
                               param="model", code="model_not_found")
        return f"{self.endpoint}/openai/deployments/{deployment}{path}?api-version={self.api_version}"


def parse_target(fields: Mapping[str, object], where: str, error: type[Exception]) -> AzureTarget:
    """The key's Azure fields (the key's own over the providers.azure entry's); raises `error`
    with one line naming `where`."""
    endpoint = fields.get("endpoint")
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise error(f"{where}: provider azure needs \"endpoint\": the resource URL, "
                    f"e.g. \"https://my-resource.openai.azure.com\" (no query)")
    deployment = fields.get("deployment")
    if deployment is not None and not (isinstance(deployment, str) and _NAME.fullmatch(deployment)):
        raise error(f"{where}: deployment must be an Azure deployment name (letters, digits, . _ -)")
    deployments = fields.get("deployments")
    if deployments is not None:
        if not isinstance(deployments, dict) or not deployments or not all(
                isinstance(m, str) and m and isinstance(d, str) and _NAME.fullmatch(d) for m, d in deployments.items()):
            raise error(f"{where}: deployments must map model names to Azure deployment names")
        deployments = dict(deployments)
    version = fields.get("api_version")
    if version is not None and not (isinstance(version, str) and _VERSION.fullmatch(version)):
        raise error(f"{where}: api_version must look like \"2024-10-21\" (or \"preview\")")
    if (deployment or deployments) and version is None:
        raise error(f"{where}: a deployment needs api_version (e.g. \"2024-10-21\"); "
                    f"leave deployment out to use Azure's /openai/v1 URLs")
    return AzureTarget(endpoint.rstrip("/"), deployment, deployments, version)


class AzureEndpoint(Protocol):
    """What the Azure provider needs of a key's target: its parsed Azure fields."""

    azure: AzureTarget


class AzureProvider(CatalogProvider):
    def __init__(self) -> None:
        super().__init__("azure")

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key}

    def upstream_url(self, key: AzureEndpoint, path: str, model: str | None) -> str:
        return key.azure.url(path, model)
