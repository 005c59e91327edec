"""Email backends."""
