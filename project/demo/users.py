"""The demo's users (the same on the site and the demo authorization server)."""

DEMO_USERS = {
    "alice": ("alice@example.test", "alice-demo-password"),
    "bob": ("bob@example.test", "bob-demo-password"),
}
