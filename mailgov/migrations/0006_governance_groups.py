"""The portal's two groups, with the permissions they hold at this version.

*Mail auditors* look and export; *mail security officers* also act (revoke,
suspend, release, incidents). Key rotation is for superusers alone. The
lists are frozen here, as a migration must be; later versions that add a
permission add it to the groups in a migration of their own.
"""

from django.contrib.auth.management import create_permissions
from django.db import migrations

AUDITORS = "Mail auditors"
OFFICERS = "Mail security officers"

VIEW = [
    ("mailgov", "view_mailbox"),
    ("mailgov", "view_sendlog"),
    ("mailgov", "view_consentreceipt"),
    ("mailgov", "view_outboxmessage"),
    ("mailgov", "view_outboxattempt"),
    ("mailgov", "view_incident"),
    ("mailgov", "view_incidentevent"),
    ("mailgov", "view_adminjob"),
    ("mailgov", "view_auditentry"),
    ("mailgov", "view_refreshevent"),
    ("mailgov", "view_pendingrevocation"),
    ("mailgov", "view_dashboard"),
    ("mailgov", "export_data"),
]
ACT = [
    ("mailgov", "govern_mailbox"),
    ("mailgov", "manage_outbox"),
    ("mailgov", "manage_incident"),
    ("mailgov", "add_incident"),
    ("mailgov", "change_incident"),
]


def create_groups(apps, schema_editor):
    # Permissions are normally created after migrations (post_migrate); the
    # groups need them now, on a fresh database too.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")

    def permissions(pairs):
        found = []
        for app_label, codename in pairs:
            found.extend(
                Permission.objects.filter(content_type__app_label=app_label, codename=codename)
            )
        return found

    auditors, _ = Group.objects.get_or_create(name=AUDITORS)
    auditors.permissions.add(*permissions(VIEW))
    officers, _ = Group.objects.get_or_create(name=OFFICERS)
    officers.permissions.add(*permissions(VIEW + ACT))


def remove_groups(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=[AUDITORS, OFFICERS]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("mailgov", "0005_governance"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_groups, remove_groups)]
