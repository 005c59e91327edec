"""Consent receipts outlive their user's account (pseudonymised by an
erasure), and both portal groups may see the erasure records."""

import django.db.models.deletion
from django.conf import settings
from django.contrib.auth.management import create_permissions
from django.db import migrations, models

GROUPS = ("Mail auditors", "Mail security officers")


def let_groups_see_erasures(apps, schema_editor):
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    view = Permission.objects.filter(
        content_type__app_label="mailgov", codename="view_erasurerecord"
    )
    for group in Group.objects.filter(name__in=GROUPS):
        group.permissions.add(*view)


class Migration(migrations.Migration):
    dependencies = [
        ("mailgov", "0007_erasure"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AlterField(
            model_name="consentreceipt",
            name="user",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="mailgov_receipts",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.RunPython(let_groups_see_erasures, migrations.RunPython.noop),
    ]
