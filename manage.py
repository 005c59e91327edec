#!/usr/bin/env python
"""Django's command-line utility for administrative tasks.

The default settings are the demo site's. The demo authorization server ships
in the package (``mailgov.testing.authserver``) and runs with
``python -m django <command> --settings=mailgov.testing.authserver.settings``.
"""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
