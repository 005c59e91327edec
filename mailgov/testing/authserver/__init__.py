"""The demo OAuth2/OIDC authorization server: a Django project of its own.

Run it with ``python -m django <command> --settings=mailgov.testing.authserver.settings``
(``migrate``, ``authserver_seed``, then ``runserver 127.0.0.1:8001``), or from
tests with :func:`mailgov.testing.peers.start_authserver`.
"""
