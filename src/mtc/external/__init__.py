"""Scripts that run in another tool's own virtualenv (started by mtc as subprocesses); mtc itself
imports nothing from here."""
