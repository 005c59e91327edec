"""mailgov: govern how a Django application sends email on its users' behalf through OAuth2."""

__version__ = "0.1.0"
