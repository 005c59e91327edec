"""Optional integrations, each kept in one place."""
