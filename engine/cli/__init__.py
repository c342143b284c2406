"""The `soldout` command: serve, admin, export and bench (see engine/cli/main.py)."""
