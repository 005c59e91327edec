"""The demo authorization server, tested over HTTP as mailgov will use it.

One real server per module (``start_authserver`` in a temporary directory); the
authorization step goes through ``mailgov.testing.oauth.authorize``, the token
endpoint is called with ``requests`` as a client would. No test touches the
app's own database.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
from jwcrypto import jwk, jwt

from mailgov.testing.oauth import (
    AuthorizationFlowError,
    AuthorizationResponse,
    StateMismatchError,
    authorize,
)
from mailgov.testing.peers import (
    AuthServer,
    PeerStartError,
    ServerProcess,
    free_port,
    port_is_free,
    start_authserver,
)

pytestmark = pytest.mark.slow

# Port 9 is "discard": nothing answers there, and the driver never follows it.
REDIRECT_URI = "http://127.0.0.1:9/mailgov/callback/"
ALL_SCOPES = ["openid", "email", "profile", "mail.send"]
ACCESS_TOKEN_SECONDS = 300


def pkce_pair() -> tuple[str, str]:
    """RFC 7636 S256, inline so these tests do not depend on mailgov.pkce."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@pytest.fixture(scope="module")
def authserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    server = start_authserver(
        tmp_path_factory.mktemp("authserver"),
        redirect_uris=[REDIRECT_URI],
        access_token_seconds=ACCESS_TOKEN_SECONDS,
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def metadata(authserver: AuthServer) -> dict:
    return authserver.metadata()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False
        yield session


@dataclass
class Grant:
    response: AuthorizationResponse
    verifier: str


def sign_in(
    authserver: AuthServer,
    *,
    user: str = "alice",
    scopes: list[str] | None = None,
    **kwargs: object,
) -> Grant:
    verifier, challenge = pkce_pair()
    kwargs.setdefault("code_challenge", challenge)
    response = authorize(
        authserver.url,
        client_id=authserver.client_id,
        redirect_uri=REDIRECT_URI,
        scopes=ALL_SCOPES if scopes is None else scopes,
        username=user,
        password=authserver.users[user].password,
        **kwargs,  # type: ignore[arg-type]
    )
    return Grant(response, verifier)


def token_request(
    http: requests.Session, authserver: AuthServer, metadata: dict, **data: str
) -> requests.Response:
    return http.post(
        metadata["token_endpoint"],
        data=data,
        auth=(authserver.client_id, authserver.client_secret),
        timeout=10,
    )


def exchange(
    http: requests.Session, authserver: AuthServer, metadata: dict, grant: Grant, **overrides: str
) -> requests.Response:
    assert grant.response.code
    data = {
        "grant_type": "authorization_code",
        "code": grant.response.code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": grant.verifier,
        **overrides,
    }
    return token_request(http, authserver, metadata, **data)


def tokens_for(
    http: requests.Session, authserver: AuthServer, metadata: dict, **kwargs: object
) -> dict:
    grant = sign_in(authserver, **kwargs)  # type: ignore[arg-type]
    response = exchange(http, authserver, metadata, grant)
    assert response.status_code == 200, response.text
    return response.json()


def refresh(
    http: requests.Session, authserver: AuthServer, metadata: dict, refresh_token: str
) -> requests.Response:
    return token_request(
        http, authserver, metadata, grant_type="refresh_token", refresh_token=refresh_token
    )


def introspect(http: requests.Session, authserver: AuthServer, metadata: dict, token: str) -> dict:
    response = http.post(
        metadata["introspection_endpoint"],
        data={"token": token},
        auth=(authserver.smtp_client_id, authserver.smtp_client_secret),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


# -- discovery ---------------------------------------------------------------


def test_discovery_document(authserver: AuthServer, metadata: dict) -> None:
    url = authserver.url
    assert metadata["issuer"] == url
    assert metadata["authorization_endpoint"] == f"{url}/o/authorize/"
    assert metadata["token_endpoint"] == f"{url}/o/token/"
    assert metadata["revocation_endpoint"] == f"{url}/o/revoke_token/"
    assert metadata["introspection_endpoint"] == f"{url}/o/introspect/"
    assert metadata["userinfo_endpoint"] == f"{url}/o/userinfo/"
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["response_types_supported"] == ["code"]
    assert set(metadata["scopes_supported"]) == set(ALL_SCOPES)
    assert {"email", "email_verified", "name"} <= set(metadata["claims_supported"])
    assert metadata["id_token_signing_alg_values_supported"] == ["RS256"]
    assert "implicit" not in metadata["grant_types_supported"]
    assert "password" not in metadata["grant_types_supported"]


def test_jwks_publishes_the_rs256_key(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    keys = http.get(metadata["jwks_uri"], timeout=10).json()["keys"]
    assert [(key["kty"], key["alg"], key["use"]) for key in keys] == [("RSA", "RS256", "sig")]
    assert "d" not in keys[0], "the private exponent must never be published"
    key_file = authserver.data_dir / "oidc_rsa_private_key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (authserver.data_dir / "secret_key").stat().st_mode & 0o777 == 0o600


# -- authorization code with PKCE ------------------------------------------------


def test_code_flow_with_pkce_s256(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    nonce = secrets.token_urlsafe(16)
    grant = sign_in(authserver, extra_params={"nonce": nonce})
    assert grant.response.error is None
    assert grant.response.code
    assert grant.response.iss == authserver.url  # RFC 9207

    response = exchange(http, authserver, metadata, grant)
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    tokens = response.json()
    assert tokens["token_type"] == "Bearer"
    assert tokens["access_token"]
    assert tokens["refresh_token"]
    assert tokens["expires_in"] == ACCESS_TOKEN_SECONDS
    assert set(tokens["scope"].split()) == set(ALL_SCOPES)

    keyset = jwk.JWKSet.from_json(http.get(metadata["jwks_uri"], timeout=10).text)
    id_token = jwt.JWT(
        jwt=tokens["id_token"],
        key=keyset,
        algs=["RS256"],
        check_claims={"iss": authserver.url, "aud": authserver.client_id, "exp": None},
    )
    claims = json.loads(id_token.claims)
    assert claims["nonce"] == nonce
    assert claims["email"] == "alice@example.test"
    assert claims["email_verified"] is True
    assert claims["name"] == "Alice Example"

    userinfo = http.get(
        metadata["userinfo_endpoint"],
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
        timeout=10,
    ).json()
    assert userinfo["sub"] == claims["sub"]
    assert userinfo["email"] == "alice@example.test"


def test_claims_follow_the_granted_scopes(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    tokens = tokens_for(http, authserver, metadata, user="bob", scopes=["openid", "mail.send"])
    payload = tokens["id_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"]
    assert "email" not in claims
    assert "name" not in claims


def test_missing_pkce_is_refused_before_consent(authserver: AuthServer) -> None:
    grant = sign_in(authserver, code_challenge=None)
    assert grant.response.code is None
    assert grant.response.error == "invalid_request"
    assert grant.response.iss == authserver.url


@pytest.mark.parametrize("method", ["plain", None], ids=["plain", "method-omitted"])
def test_plain_pkce_is_refused(authserver: AuthServer, method: str | None) -> None:
    # oauthlib treats an omitted method as "plain", so both must be refused.
    verifier, _ = pkce_pair()
    grant = sign_in(authserver, code_challenge=verifier, code_challenge_method=method)
    assert grant.response.code is None
    assert grant.response.error == "invalid_request"


def test_plain_pkce_slipped_into_the_consent_form_is_refused(authserver: AuthServer) -> None:
    # DOT's consent POST takes the request from hidden fields a user can edit.
    verifier, _ = pkce_pair()
    grant = sign_in(
        authserver,
        form_overrides={"code_challenge": verifier, "code_challenge_method": "plain"},
    )
    assert grant.response.code is None
    assert grant.response.error == "invalid_request"


def test_pkce_removed_from_the_consent_form_still_binds_the_code(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    # DOT fills the request from the form's non-empty fields and the URL the form
    # posts back to; blanking the fields leaves the challenge of the URL in force.
    grant = sign_in(authserver, form_overrides={"code_challenge": "", "code_challenge_method": ""})
    assert grant.response.code
    without = token_request(
        http,
        authserver,
        metadata,
        grant_type="authorization_code",
        code=grant.response.code,
        redirect_uri=REDIRECT_URI,
    )
    assert without.status_code == 400
    assert exchange(http, authserver, metadata, grant).status_code == 200


def test_wrong_verifier_is_invalid_grant(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    grant = sign_in(authserver)
    other_verifier, _ = pkce_pair()
    response = exchange(http, authserver, metadata, grant, code_verifier=other_verifier)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    # A wrong verifier does not consume the code: the real client, holding the
    # right verifier, can still redeem it (once).
    assert exchange(http, authserver, metadata, grant).status_code == 200


def test_missing_verifier_is_refused(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    grant = sign_in(authserver)
    response = token_request(
        http,
        authserver,
        metadata,
        grant_type="authorization_code",
        code=grant.response.code or "",
        redirect_uri=REDIRECT_URI,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_code_is_single_use(http: requests.Session, authserver: AuthServer, metadata: dict) -> None:
    grant = sign_in(authserver)
    assert exchange(http, authserver, metadata, grant).status_code == 200
    again = exchange(http, authserver, metadata, grant)
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"


def test_code_needs_the_client_secret(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    grant = sign_in(authserver)
    response = http.post(
        metadata["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": grant.response.code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": grant.verifier,
        },
        auth=(authserver.client_id, "not-the-secret"),
        timeout=10,
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


# -- consent -------------------------------------------------------------------


def test_deny_gives_access_denied(authserver: AuthServer) -> None:
    grant = sign_in(authserver, allow=False, state="deny-state")
    assert grant.response.code is None
    assert grant.response.error == "access_denied"
    assert grant.response.state == "deny-state"
    assert grant.response.iss == authserver.url


def test_consent_page(http: requests.Session, authserver: AuthServer, metadata: dict) -> None:
    _, challenge = pkce_pair()
    query = urlencode(
        {
            "response_type": "code",
            "client_id": authserver.client_id,
            "redirect_uri": REDIRECT_URI,
            "scope": " ".join(ALL_SCOPES),
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    authorization_url = f"{metadata['authorization_endpoint']}?{query}"
    login_page = http.get(authorization_url, timeout=10)  # redirected to the login form
    assert login_page.url.startswith(f"{authserver.url}/accounts/login/")
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login_page.text)
    assert csrf
    http.post(
        login_page.url,
        data={
            "csrfmiddlewaretoken": csrf.group(1),
            "username": "bob",
            "password": authserver.users["bob"].password,
        },
        headers={"Origin": authserver.url},
        timeout=10,
    )
    # Named apart from the demo site's cookies on the same host (ports share cookies).
    assert {"authserver_sessionid", "authserver_csrftoken"} <= set(http.cookies.keys())

    page = http.get(authorization_url, timeout=10)
    assert page.status_code == 200
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "no-store" in page.headers["Cache-Control"]
    assert "mailgov demo site" in page.text
    for text in ("Send email as you", "See your email address", "See your name"):
        assert text in page.text
    assert 'name="allow"' in page.text
    assert 'name="deny"' in page.text
    assert 'name="csrfmiddlewaretoken"' in page.text


def test_unregistered_redirect_uri_is_not_redirected_to(authserver: AuthServer) -> None:
    _, challenge = pkce_pair()
    with pytest.raises(AuthorizationFlowError, match="400"):
        authorize(
            authserver.url,
            client_id=authserver.client_id,
            redirect_uri="http://127.0.0.1:9/evil/",
            scopes=["openid"],
            username="alice",
            password=authserver.users["alice"].password,
            code_challenge=challenge,
        )


def test_wrong_password_fails_the_flow(authserver: AuthServer) -> None:
    _, challenge = pkce_pair()
    with pytest.raises(AuthorizationFlowError, match="refused") as excinfo:
        authorize(
            authserver.url,
            client_id=authserver.client_id,
            redirect_uri=REDIRECT_URI,
            scopes=["openid"],
            username="alice",
            password="wrong-password",
            code_challenge=challenge,
        )
    assert "wrong-password" not in str(excinfo.value)


def test_driver_checks_the_returned_state(authserver: AuthServer) -> None:
    # extra_params replaces the state the server sees, not the one the driver expects.
    with pytest.raises(StateMismatchError):
        sign_in(authserver, state="expected", extra_params={"state": "something-else"})


# -- refresh tokens ------------------------------------------------------------


def test_refresh_rotates_and_reuse_revokes_the_family(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    first = tokens_for(http, authserver, metadata)

    rotated = refresh(http, authserver, metadata, first["refresh_token"])
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert introspect(http, authserver, metadata, second["access_token"])["active"] is True

    reused = refresh(http, authserver, metadata, first["refresh_token"])
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"

    # Reuse means the token leaked: the whole family is dead, the new pair too.
    after = refresh(http, authserver, metadata, second["refresh_token"])
    assert after.status_code == 400
    assert after.json()["error"] == "invalid_grant"
    assert introspect(http, authserver, metadata, second["access_token"]) == {"active": False}


# -- revocation (RFC 7009) and introspection (RFC 7662) ---------------------------


def revoke(
    http: requests.Session,
    metadata: dict,
    token: str,
    hint: str,
    auth: tuple[str, str],
) -> requests.Response:
    return http.post(
        metadata["revocation_endpoint"],
        data={"token": token, "token_type_hint": hint},
        auth=auth,
        timeout=10,
    )


def test_introspection_shows_the_owner_and_scopes(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    tokens = tokens_for(http, authserver, metadata)
    before = int(time.time())
    response = http.post(
        metadata["introspection_endpoint"],
        data={"token": tokens["access_token"]},
        auth=(authserver.smtp_client_id, authserver.smtp_client_secret),
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    info = response.json()
    assert info["active"] is True
    assert info["email"] == "alice@example.test"
    assert info["username"] == "alice"
    assert info["client_id"] == authserver.client_id
    assert "mail.send" in info["scope"].split()
    assert info["token_type"] == "Bearer"
    assert before < info["exp"] <= before + ACCESS_TOKEN_SECONDS + 5


def test_introspection_needs_client_credentials(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    tokens = tokens_for(http, authserver, metadata)
    endpoint = metadata["introspection_endpoint"]
    data = {"token": tokens["access_token"]}
    assert http.post(endpoint, data=data, timeout=10).status_code in (401, 403)
    wrong = (authserver.smtp_client_id, "not-the-secret")
    assert http.post(endpoint, data=data, auth=wrong, timeout=10).status_code in (401, 403)
    # A token is not a credential for introspecting itself.
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert http.post(endpoint, data=data, headers=bearer, timeout=10).status_code in (401, 403)
    # GET would put the token in a URL.
    smtp = (authserver.smtp_client_id, authserver.smtp_client_secret)
    assert http.get(endpoint, params=data, auth=smtp, timeout=10).status_code == 405


def test_unknown_token_is_inactive(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    assert introspect(http, authserver, metadata, "no-such-token") == {"active": False}


def test_revoking_the_access_token(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    tokens = tokens_for(http, authserver, metadata)
    client = (authserver.client_id, authserver.client_secret)
    response = revoke(http, metadata, tokens["access_token"], "access_token", client)
    assert response.status_code == 200
    assert introspect(http, authserver, metadata, tokens["access_token"]) == {"active": False}
    # DOT also revokes the refresh token bound to it.
    assert refresh(http, authserver, metadata, tokens["refresh_token"]).status_code == 400
    # RFC 7009 §2.2: an already-invalid token is still answered 200.
    again = revoke(http, metadata, tokens["access_token"], "access_token", client)
    assert again.status_code == 200


def test_revoking_the_refresh_token_ends_the_grant(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    tokens = tokens_for(http, authserver, metadata)
    client = (authserver.client_id, authserver.client_secret)
    response = revoke(http, metadata, tokens["refresh_token"], "refresh_token", client)
    assert response.status_code == 200
    assert introspect(http, authserver, metadata, tokens["access_token"]) == {"active": False}
    denied = refresh(http, authserver, metadata, tokens["refresh_token"])
    assert denied.json()["error"] == "invalid_grant"


def test_another_client_cannot_revoke_the_token(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    tokens = tokens_for(http, authserver, metadata)
    smtp = (authserver.smtp_client_id, authserver.smtp_client_secret)
    assert revoke(http, metadata, tokens["access_token"], "access_token", smtp).status_code == 200
    assert introspect(http, authserver, metadata, tokens["access_token"])["active"] is True


def test_machine_client_gets_no_user_scopes(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    smtp = (authserver.smtp_client_id, authserver.smtp_client_secret)
    asked = http.post(
        metadata["token_endpoint"],
        data={"grant_type": "client_credentials", "scope": "mail.send"},
        auth=smtp,
        timeout=10,
    )
    assert asked.status_code == 400
    assert asked.json()["error"] == "invalid_scope"


# -- what the server keeps -------------------------------------------------------


def test_tokens_and_secrets_stay_out_of_the_log_and_the_database(
    http: requests.Session, authserver: AuthServer, metadata: dict
) -> None:
    grant = sign_in(authserver)
    tokens = exchange(http, authserver, metadata, grant).json()
    rotated = refresh(http, authserver, metadata, tokens["refresh_token"]).json()
    values = {
        "code": grant.response.code,
        "verifier": grant.verifier,
        "access token": tokens["access_token"],
        "refresh token": tokens["refresh_token"],
        "rotated access token": rotated["access_token"],
        "rotated refresh token": rotated["refresh_token"],
        "client secret": authserver.client_secret,
        "SMTP client secret": authserver.smtp_client_secret,
    }
    log = authserver.log_path.read_bytes()
    stored = b"".join(
        path.read_bytes()
        for path in authserver.data_dir.iterdir()
        if path.name.startswith("db.sqlite3")
    )
    for name, value in values.items():
        assert value
        assert value.encode() not in log, f"{name} in the server log"
        assert value.encode() not in stored, f"{name} stored in clear"


# -- the process helpers ---------------------------------------------------------


def test_free_ports_are_below_the_ephemeral_range() -> None:
    """No outgoing connection can be given the port before its server binds it."""
    from mailgov.testing.peers import _ephemeral_low

    low = _ephemeral_low()
    if sys.platform == "linux":
        assert low is not None
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # picked at random, not one port for every caller
    for port in ports:
        assert port_is_free(port)
        assert low is None or 10000 <= port < low


def test_server_process_reports_an_early_exit(tmp_path: Path) -> None:
    process = ServerProcess(
        [sys.executable, "-c", "print('cannot bind'); raise SystemExit(3)"],
        log_path=tmp_path / "early.log",
        ready_port=free_port(),
        timeout=10,
    )
    with pytest.raises(PeerStartError, match=r"(?s)status 3.*cannot bind"):
        process.start()
    assert process.returncode == 3


def test_server_process_times_out_and_stops_the_group(tmp_path: Path) -> None:
    process = ServerProcess(
        [sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(60)"],
        log_path=tmp_path / "slow.log",
        ready_port=free_port(),
        timeout=5,  # time for a loaded machine to start Python and print
    )
    with pytest.raises(PeerStartError, match=r"(?s)not ready after 5 s.*waiting"):
        process.start()
    assert process.returncode is not None  # stopped, not left running


def test_server_process_waits_for_the_port(tmp_path: Path) -> None:
    port = free_port()
    script = (
        "import socket, time\n"
        "time.sleep(0.3)\n"
        f"s = socket.create_server(('127.0.0.1', {port}))\n"
        "time.sleep(60)\n"
    )
    with ServerProcess(
        [sys.executable, "-c", script], log_path=tmp_path / "ok.log", ready_port=port
    ) as process:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        assert process.returncode is None
    assert process.returncode == -signal.SIGTERM
