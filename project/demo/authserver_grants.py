"""Real grants at the demo authorization server for the demo's seeded mailboxes.

Run by ``manage.py demo_seed`` as ``python -m project.demo.authserver_grants
<client id>`` in the authorization server's own Django (its settings and data
directory in the environment), with a JSON list of addresses on standard
input. Each address becomes a user of that server (no usable password: nobody
signs in as it) with one grant to the demo site, an access and a refresh
token stored as the token endpoint stores them (``authserver_mint_tokens``).
So a seeded mailbox behaves as a connected one: the site refreshes its token
there, sends as it through the demo SMTP server (whose token introspection
names the address), and revokes it there when an incident contains it.

Prints ``{"expires_in": ..., "scope": ..., "tokens": {address: [access,
refresh]}}`` on standard output, a pipe to ``demo_seed``: the tokens are
never written to a file.
"""

from __future__ import annotations

import io
import json
import sys

SCOPE = "openid email profile mail.send"


def main(client_id: str) -> None:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.core.management import call_command

    addresses = json.load(sys.stdin)
    User = get_user_model()
    known = set(User.objects.filter(username__in=addresses).values_list("username", flat=True))
    User.objects.bulk_create(
        User(username=address, email=address, password=make_password(None))
        for address in addresses
        if address not in known
    )
    tokens: dict[str, list[str]] = {}
    expires_in = None
    for address in addresses:
        out = io.StringIO()
        call_command(
            "authserver_mint_tokens",
            count=1,
            username=address,
            client_id=client_id,
            scope=SCOPE,
            stdout=out,
        )
        minted = json.loads(out.getvalue())
        tokens[address] = minted["tokens"][0]
        expires_in = minted["expires_in"]
    json.dump({"expires_in": expires_in, "scope": SCOPE, "tokens": tokens}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
