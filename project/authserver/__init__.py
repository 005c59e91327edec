"""The demo OAuth2/OIDC authorization server: a Django project of its own.

Run with ``python manage.py runserver 127.0.0.1:8001 --settings=project.authserver.settings``
after ``migrate`` and ``authserver_seed`` with the same settings.
"""
