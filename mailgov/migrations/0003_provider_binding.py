"""Bind every mailbox to the identity of its provider (type, issuer, SMTP host).

Mailboxes connected before this migration are bound to their provider as it
is configured when the migration runs: the best knowledge there is of what
issued their tokens. A mailbox whose provider id is not configured then stays
unbound, and mailgov refuses to use its tokens until an operator binds it
(``manage.py mailgov_providers bind <provider id>``) or its owner reconnects.
"""

from django.db import migrations, models

# The live code on purpose, not a copy: a mailbox is bound to its provider's
# identity exactly as mailgov computes it when it checks the binding.
from mailgov.models import current_identity


def bind_existing(apps, schema_editor):
    Mailbox = apps.get_model("mailgov", "Mailbox")
    db = schema_editor.connection.alias
    provider_ids = Mailbox.objects.using(db).values_list("provider", flat=True).distinct()
    for provider_id in list(provider_ids):
        identity = current_identity(provider_id)
        if identity:
            Mailbox.objects.using(db).filter(provider=provider_id, provider_binding="").update(
                provider_binding=identity
            )


class Migration(migrations.Migration):
    dependencies = [
        ("mailgov", "0002_consent_receipts"),
    ]

    operations = [
        migrations.AddField(
            model_name="mailbox",
            name="provider_binding",
            field=models.TextField(
                blank=True, editable=False, verbose_name="provider identity at connect time"
            ),
        ),
        migrations.RunPython(bind_existing, migrations.RunPython.noop),
    ]
