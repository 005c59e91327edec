"""Consent receipts say when their grant ended by its mailbox row's deletion,
so that their retention runs from then (not from the receipt's date) once the
mailbox row is gone. Receipts whose mailbox went before this migration keep
the older rule (from the receipt's date): when their grant ended is unknown."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("mailgov", "0009_kept_connections"),
    ]

    operations = [
        migrations.AddField(
            model_name="consentreceipt",
            name="grant_ended_at",
            field=models.DateTimeField(blank=True, null=True, verbose_name="grant ended"),
        ),
    ]
