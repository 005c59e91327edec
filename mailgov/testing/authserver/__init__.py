"""The demo OAuth2/OIDC authorization server: a Django project of its own.

Run it with ``python -m django <command> --settings=mailgov.testing.authserver.settings``
(``migrate``, ``authserver_seed``, then ``runserver 127.0.0.1:8001``), or from
tests with :func:`mailgov.testing.peers.start_authserver`.

Tests can make its token and revocation endpoints answer ``503`` (or another
status) and then recover, without a restart: ``AuthServer.set_faults(token=503)``
and ``clear_faults()`` (see :mod:`mailgov.testing.authserver.faults`).
"""
