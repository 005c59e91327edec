"""Encrypted model fields bound to their row.

``Field.from_db_value()`` is not given the model instance, and
``QuerySet.update()`` / ``bulk_update()`` skip ``pre_save()``, so a value bound
to its row cannot be decrypted or encrypted inside the usual field hooks.
Instead:

* a value read from the database stays *sealed* (a :class:`Sealed` holding the
  ciphertext) in the instance's ``__dict__``;
* the field's descriptor decrypts it on attribute access, where the row is
  known (so listing or counting rows never decrypts anything);
* assigning a ``str`` marks new plaintext, which ``pre_save()`` encrypts for
  this row on ``save()``;
* writing plaintext any other way (``update()``, ``bulk_update()``, a filter)
  raises instead of storing it in clear: only :class:`Sealed` values, which
  were encrypted for a known row, reach the database.

Serialization (``dumpdata``) writes the ciphertext, never the plaintext, and
``loaddata`` reads it back sealed.
"""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models.query_utils import DeferredAttribute

from mailgov import crypto


class Sealed:
    """A ciphertext as stored. Its repr and str never show the value."""

    __slots__ = ("ciphertext",)

    def __init__(self, ciphertext: str):
        self.ciphertext = ciphertext

    def __repr__(self) -> str:
        return "<Sealed>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sealed) and other.ciphertext == self.ciphertext

    __hash__ = None  # mutable holder; never a dict key


class Decrypted(str):
    """A decrypted value that remembers the ciphertext it came from.

    Writing it back unchanged (``loaddata``'s raw save, ``bulk_update()`` of
    other fields) stores that same ciphertext instead of refusing plaintext;
    assigned to another row it is encrypted afresh by ``pre_save()``.
    """

    __slots__ = ("sealed",)

    def __new__(cls, value: str, sealed: Sealed) -> Decrypted:
        self = super().__new__(cls, value)
        self.sealed = sealed
        return self


class EncryptedAttribute(DeferredAttribute):
    """Decrypts on read; keeps assignments as pending plaintext until save."""

    def __get__(self, instance: models.Model | None, cls: type | None = None) -> Any:
        if instance is None:
            return self
        value = super().__get__(instance, cls)  # loads a deferred column
        if isinstance(value, Sealed):
            return Decrypted(self.field.decrypt_for(instance, value.ciphertext), value)
        return value

    def __set__(self, instance: models.Model, value: Any) -> None:
        instance.__dict__[self.field.attname] = value


class EncryptedTextField(models.TextField):
    """A text column holding an AES-256-GCM value bound to model, field and row.

    The row's primary key must be set before the value is encrypted: use a
    model whose primary key is a UUID with a default, or a one-to-one primary
    key, so it is known before the first ``INSERT``.
    """

    descriptor_class = EncryptedAttribute

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("editable", False)
        kwargs.setdefault("blank", True)
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("editable", None)
        if kwargs.get("blank") is True:
            kwargs.pop("blank")
        return name, path, args, kwargs

    # -- binding ----------------------------------------------------------
    def binding(self, pk: Any) -> str:
        """What a value of this field in row ``pk`` is bound to."""
        if pk is None:
            raise ValueError(
                f"{self.model._meta.label}.{self.name}: the row needs a primary key before "
                "a value can be encrypted for it."
            )
        return crypto.binding(self.model._meta.label_lower, self.name, pk)

    def decrypt_for_pk(self, pk: Any, ciphertext: str) -> str:
        """Decrypt ``ciphertext`` stored in this field of row ``pk``."""
        return crypto.decrypt(ciphertext, self.binding(pk))

    def seal_for_pk(self, pk: Any, plaintext: str) -> Sealed:
        """Encrypt ``plaintext`` for this field of row ``pk`` (the one write path)."""
        return Sealed(crypto.encrypt(plaintext, self.binding(pk)))

    def decrypt_for(self, instance: models.Model, ciphertext: str) -> str:
        return self.decrypt_for_pk(instance.pk, ciphertext)

    def seal_for(self, instance: models.Model, plaintext: str) -> Sealed:
        return self.seal_for_pk(instance.pk, plaintext)

    # -- database round trip ----------------------------------------------
    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> Any:
        if value is None or value == "":
            return None
        return Sealed(value)

    def pre_save(self, model_instance: models.Model, add: bool) -> Any:
        value = model_instance.__dict__.get(self.attname)
        if isinstance(value, str):
            # New plaintext (a Decrypted from another row is plaintext here too).
            value = self.seal_for(model_instance, value)
            # Keep the instance consistent with what is now stored.
            model_instance.__dict__[self.attname] = value
        return value

    def get_prep_value(self, value: Any) -> Any:
        if value is None or value == "":
            return None
        if isinstance(value, Sealed):
            return value.ciphertext
        if isinstance(value, Decrypted):
            # Read from a row and written back unchanged: the stored
            # ciphertext, still bound to the row it came from.
            return value.sealed.ciphertext
        raise TypeError(
            f"{self.model._meta.label}.{self.name} is encrypted: assign plaintext to an "
            "instance and save() it, or pass a value sealed with seal_for(); plaintext "
            "is never written through update(), bulk_update() or a lookup."
        )

    #: The only lookups an encrypted column takes: equality with a stored
    #: ciphertext (a value read from a row), membership, null. Pattern and
    #: range lookups (``startswith``, ``iexact``, ``regex``, ``gt`` ...) would
    #: compare plaintext with ciphertext, and Django hands the pattern ones
    #: their argument without get_prep_value(): into the SQL parameters, and
    #: from there into the database's log and django.db.backends' DEBUG log.
    ALLOWED_LOOKUPS = frozenset({"exact", "in", "isnull"})

    def get_lookup(self, lookup_name: str) -> Any:
        if lookup_name not in self.ALLOWED_LOOKUPS:
            raise TypeError(
                f"{self.model._meta.label}.{self.name} is encrypted: the {lookup_name!r} "
                "lookup cannot be used on it (only exact with a stored value, in and "
                "isnull); plaintext is never used in a lookup."
            )
        return super().get_lookup(lookup_name)

    def to_python(self, value: Any) -> Any:
        # Used by deserializers (loaddata): what dumpdata wrote is ciphertext.
        if isinstance(value, str) and crypto.is_envelope(value):
            return Sealed(value)
        return value

    def value_from_object(self, obj: models.Model) -> Any:
        # Serializers and model_to_dict read through this: give them the
        # ciphertext, never the plaintext.
        value = obj.__dict__.get(self.attname)
        if isinstance(value, str):
            value = self.seal_for(obj, value)
        return value.ciphertext if isinstance(value, Sealed) else value

    def formfield(self, **kwargs: Any) -> None:
        return None
