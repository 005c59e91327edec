"""Test peers shipped with mailgov, for mailgov's own tests and for projects that use it.

- ``mailgov.testing.ca``: a throw-away local certificate authority (``ensure_tls_files``).
- ``mailgov.testing.smtpserver``: a real SMTP submission server that requires STARTTLS,
  validates XOAUTH2 bearer tokens by RFC 7662 introspection and can inject faults
  (``SubmissionServer``, ``Faults``); also runnable as
  ``python -m mailgov.testing.smtpserver``.

The SMTP server needs the optional extra ``mailgov[testing]`` (aiosmtpd). This package
imports nothing on purpose, so that importing it never requires the extra.
"""
