"""Drive an OAuth2 authorization-code request through a real server, without a browser.

``authorize()`` plays the user's browser against an authorization server with a
login form and a consent form (the demo server in ``mailgov.testing.authserver``, or any
server whose pages follow the same shape): it signs in, answers the consent page
with Allow or Deny, and stops at the redirect back to the client, returning what
the client's callback would receive. It does not exchange the code: in a test, the
application under test does that itself.

Nothing here prints or puts in an exception message a password, a code or a
redirect URL that carries one.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import requests

__all__ = [
    "AuthorizationFlowError",
    "AuthorizationResponse",
    "StateMismatchError",
    "authorize",
]

DISCOVERY_PATH = "/.well-known/openid-configuration"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_HOPS = 10


class AuthorizationFlowError(RuntimeError):
    """The flow did not reach the client's redirect URI as a browser would.

    For instance: the sign-in was refused, the server showed an error page
    (unknown client, unregistered redirect URI), or redirected somewhere else.
    """


class StateMismatchError(AuthorizationFlowError):
    """The ``state`` in the redirect differs from the one sent (RFC 6749 §10.12)."""


@dataclass(frozen=True)
class AuthorizationResponse:
    """What the client's redirect URI received.

    Exactly one of ``code`` and ``error`` is set. ``state`` has been checked
    against the one sent, and ``iss`` (RFC 9207), when present, against the
    issuer in the discovery document. ``redirect_url`` is the whole Location, as
    the callback view would see it.
    """

    code: str | None = field(repr=False)
    state: str | None
    error: str | None
    redirect_url: str = field(repr=False)
    error_description: str | None = None
    iss: str | None = None

    @property
    def ok(self) -> bool:
        return self.code is not None


@dataclass
class _Form:
    action: str
    method: str
    attrs: dict[str, str]
    fields: list[tuple[str, str]]
    buttons: list[tuple[str | None, str]]

    def has_field(self, name: str) -> bool:
        return any(field_name == name for field_name, _ in self.fields)


class _FormParser(HTMLParser):
    """Collects each form's successful controls, as a browser would submit them:
    named inputs (checkboxes and radios only when checked) and submit buttons."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[_Form] = []
        self._form: _Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {key: value if value is not None else "" for key, value in attrs}
        if tag == "form":
            self._form = _Form(
                action=a.get("action", ""),
                method=(a.get("method") or "get").lower(),
                attrs=a,
                fields=[],
                buttons=[],
            )
            self.forms.append(self._form)
            return
        if self._form is None or "disabled" in a:
            return
        name = a.get("name") or None
        if tag == "input":
            kind = (a.get("type") or "text").lower()
            if kind == "submit":
                self._form.buttons.append((name, a.get("value", "")))
            elif kind in ("checkbox", "radio"):
                if name and "checked" in a:
                    self._form.fields.append((name, a.get("value", "on")))
            elif name and kind not in ("button", "reset", "image", "file"):
                self._form.fields.append((name, a.get("value", "")))
        elif tag == "button" and (a.get("type") or "submit").lower() == "submit":
            self._form.buttons.append((name, a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None


def _forms(html: str) -> list[_Form]:
    parser = _FormParser()
    parser.feed(html)
    parser.close()
    return parser.forms


def _page_text(html: str, limit: int = 300) -> str:
    """A short plain-text excerpt of an error page, for an exception message."""
    body = re.sub(r"(?is)<(script|style|head)\b.*?</\1>", " ", html)
    text = re.sub(r"\s+", " ", re.sub(r"(?s)<[^>]+>", " ", body)).strip()
    return text[:limit]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class _Browser:
    """A ``requests.Session`` that follows redirects itself, stopping at the client."""

    def __init__(self, server_origin: str, redirect_uri: str, timeout: float) -> None:
        self.session = requests.Session()
        # Proxies and .netrc from the environment have no business in a test flow.
        self.session.trust_env = False
        self.server_origin = server_origin
        self.redirect_target = _without_query(redirect_uri)
        self.timeout = timeout

    def close(self) -> None:
        self.session.close()

    def navigate(
        self, method: str, url: str, data: list[tuple[str, str]] | None = None
    ) -> tuple[requests.Response, str | None]:
        """Request ``url`` and follow redirects on the server.

        Returns ``(response, None)`` for a page, or ``(response, location)`` once a
        redirect points at the client's redirect URI (which is not followed).
        """
        headers = {"Origin": self.server_origin, "Referer": url} if method == "POST" else {}
        for _ in range(MAX_HOPS):
            response = self.session.request(
                method, url, data=data, headers=headers, allow_redirects=False, timeout=self.timeout
            )
            if response.status_code not in REDIRECT_STATUSES:
                return response, None
            location = urljoin(response.url, response.headers.get("Location", ""))
            if _without_query(location) == self.redirect_target:
                return response, location
            if _origin(location) != self.server_origin:
                raise AuthorizationFlowError(
                    f"the server redirected to {_without_query(location)}, which is neither "
                    f"itself nor the redirect URI"
                )
            method, url, data, headers = "GET", location, None, {}
        raise AuthorizationFlowError(f"more than {MAX_HOPS} redirects")


def _parse_redirect(location: str) -> dict[str, str]:
    parts = urlsplit(location)
    # A code flow answers in the query; read the fragment too so that a server
    # answering in the wrong place fails on content rather than silently.
    params = parse_qs(parts.fragment) | parse_qs(parts.query)
    return {key: values[0] for key, values in params.items()}


def authorize(
    server_url: str,
    *,
    client_id: str,
    redirect_uri: str,
    scopes: list[str],
    username: str,
    password: str,
    allow: bool = True,
    code_challenge: str | None,
    code_challenge_method: str | None = "S256",
    state: str | None = None,
    extra_params: Mapping[str, str] | None = None,
    form_overrides: Mapping[str, str] | None = None,
    timeout: float = 10,
) -> AuthorizationResponse:
    """Sign in as ``username`` and answer the consent page; return the redirect's content.

    Finds the authorization endpoint in ``server_url``'s OIDC discovery document,
    requests ``response_type=code`` with ``scopes`` and ``state`` (random when
    ``None``), signs in through the login form the server redirects to (CSRF token
    and all), then submits the consent form with every field it carries and the
    Allow (or, with ``allow=False``, the Deny) button. The final redirect to
    ``redirect_uri`` is not followed.

    ``code_challenge`` or ``code_challenge_method`` set to ``None`` leaves that
    parameter out (for negative tests). ``extra_params`` are added to the
    authorization request (and may replace the standard ones); ``form_overrides``
    replace or add consent-form fields before submitting, as a user editing the
    page could.

    Raises ``StateMismatchError`` if the returned state differs,
    ``AuthorizationFlowError`` if the sign-in fails, the server shows an error page
    instead of redirecting, sends the browser elsewhere, or answers with a
    mismatched ``iss``. ``requests`` exceptions propagate.
    """
    server_url = server_url.rstrip("/")
    sent_state = state if state is not None else secrets.token_urlsafe(16)
    browser = _Browser(_origin(server_url), redirect_uri, timeout)
    try:
        discovery = browser.session.get(server_url + DISCOVERY_PATH, timeout=timeout)
        discovery.raise_for_status()
        metadata = discovery.json()

        params: dict[str, str] = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(scopes),
            "state": sent_state,
        }
        if code_challenge is not None:
            params["code_challenge"] = code_challenge
        if code_challenge_method is not None:
            params["code_challenge_method"] = code_challenge_method
        params.update(extra_params or {})
        authorization_url = f"{metadata['authorization_endpoint']}?{urlencode(params)}"

        response, location = browser.navigate("GET", authorization_url)
        if location is None:
            login = _find_form(response, lambda form: form.has_field("password"))
            if login is not None:
                fields = [(k, v) for k, v in login.fields if k not in ("username", "password")]
                fields += [("username", username), ("password", password)]
                response, location = browser.navigate(
                    "POST", urljoin(response.url, login.action or response.url), fields
                )
                if location is None and _find_form(response, lambda f: f.has_field("password")):
                    raise AuthorizationFlowError(f"signing in as {username!r} was refused")

        if location is None:
            consent = _find_form(
                response,
                lambda form: (
                    form.attrs.get("id") == "authorizationForm"
                    or (form.method == "post" and form.has_field("response_type"))
                ),
            )
            if consent is None:
                raise AuthorizationFlowError(
                    f"expected the consent page, got HTTP {response.status_code}: "
                    f"{_page_text(response.text)}"
                )
            response, location = browser.navigate(
                "POST",
                urljoin(response.url, consent.action or response.url),
                _consent_fields(consent, allow=allow, overrides=form_overrides or {}),
            )
            if location is None:
                raise AuthorizationFlowError(
                    f"the consent form did not redirect to the client: HTTP "
                    f"{response.status_code}: {_page_text(response.text)}"
                )
    finally:
        browser.close()

    params_back = _parse_redirect(location)
    result = AuthorizationResponse(
        code=params_back.get("code"),
        state=params_back.get("state"),
        error=params_back.get("error"),
        redirect_url=location,
        error_description=params_back.get("error_description"),
        iss=params_back.get("iss"),
    )
    if result.state != sent_state:
        raise StateMismatchError("the state in the redirect is not the one sent")
    if result.iss is not None and result.iss != metadata.get("issuer"):
        raise AuthorizationFlowError(
            f"the redirect's iss {result.iss!r} is not the issuer {metadata.get('issuer')!r}"
        )
    if (result.code is None) == (result.error is None):
        raise AuthorizationFlowError("the redirect carries neither a code nor an error, or both")
    return result


def _find_form(response: requests.Response, predicate: Callable[[_Form], bool]) -> _Form | None:
    if "html" not in response.headers.get("Content-Type", ""):
        return None
    return next((form for form in _forms(response.text) if predicate(form)), None)


def _consent_fields(
    form: _Form, *, allow: bool, overrides: Mapping[str, str]
) -> list[tuple[str, str]]:
    fields = [(name, overrides.get(name, value)) for name, value in form.fields]
    present = {name for name, _ in fields}
    fields += [(name, value) for name, value in overrides.items() if name not in present]
    if allow:
        button = next((b for b in form.buttons if b[0] == "allow"), None)
        if button is None:
            raise AuthorizationFlowError("the consent page has no Allow button (name='allow')")
    else:
        # Our template's Deny is name="deny"; DOT's stock Cancel has no name.
        button = next((b for b in form.buttons if b[0] == "deny"), None) or next(
            (b for b in form.buttons if b[0] != "allow"), None
        )
        if button is None:
            raise AuthorizationFlowError("the consent page has no Deny button")
    if button[0]:
        fields.append((button[0], button[1]))
    return fields
