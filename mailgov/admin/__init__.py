"""The governance portal, on the Django admin of the host site.

It adds to the host's admin (a "Mail governance" section with the
dashboard, the inventory, the outbox, incidents, jobs and the audit trail)
without replacing its index or its site. See the README's "Governance
portal" section.
"""

# Importing each module registers its model admins.
from mailgov.admin import audit, dashboard, incidents, inventory, jobs, outbox  # noqa: F401
