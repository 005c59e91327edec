"""The governance portal, on the Django admin of the host site.

It adds to the host's admin (a "Mail governance" section with the
dashboard, the inventory, the outbox, incidents, jobs and the audit trail)
without replacing its index or its site. See the README's "Governance
portal" section.
"""

from mailgov.admin import inventory  # noqa: F401  (registers the model admins)
