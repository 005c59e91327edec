from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.mail import get_connection, send_mail
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from mailgov.exceptions import MailgovConfigurationError, MailgovError
from mailgov.models import Mailbox
from project.demo import inbox as demo_inbox


def home(request):
    mailboxes = []
    if request.user.is_authenticated:
        mailboxes = Mailbox.objects.filter(owner=request.user)
    return render(
        request,
        "demo/home.html",
        {
            "mailboxes": mailboxes,
            "authserver_url": settings.AUTHSERVER_URL,
            "smtp_port": settings.DEMO_SMTP_PORT,
        },
    )


@login_required
def inbox(request):
    return render(request, "demo/inbox.html", {"messages_": demo_inbox.list_messages()})


@login_required
def message(request, key: str):
    item = demo_inbox.get_message(key)
    if item is None:
        raise Http404("No such message")
    return render(request, "demo/message.html", {"item": item})


@login_required
@require_POST
def send_test(request):
    mailbox = Mailbox.objects.filter(
        owner=request.user, pk=request.POST.get("mailbox"), status=Mailbox.Status.ACTIVE
    ).first()
    if mailbox is None:
        messages.error(request, "Choose one of your active mailboxes.")
        return redirect("demo:home")
    queued = request.POST.get("queued") == "1"
    try:
        if queued:
            # Stored in the outbox in this request; a Celery worker sends it.
            send_mail(
                "A queued test message from the mailgov demo",
                "Stored in mailgov's outbox, then sent by a Celery worker with XOAUTH2 "
                "over verified TLS.",
                mailbox.address,
                [mailbox.address],
                connection=get_connection("mailgov.backends.queued.EmailBackend"),
            )
        else:
            send_mail(
                "A test message from the mailgov demo",
                "Sent with XOAUTH2 over verified TLS by mailgov's email backend.",
                mailbox.address,
                [mailbox.address],
            )
    except (MailgovError, MailgovConfigurationError, OSError) as exc:
        messages.error(request, f"Not sent: {type(exc).__name__}: {exc}")
    else:
        messages.success(
            request,
            "Queued: a worker sends it within seconds; reload the inbox."
            if queued
            else "Sent. It is in the demo inbox.",
        )
    return redirect("demo:inbox")
