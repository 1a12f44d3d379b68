"""The command table (`cli.app.COMMANDS`, `ALIASES`): commands are loaded when named,
so the table must name every command its modules define, and each where it is."""

from __future__ import annotations

import importlib

import click

from lazypod.cli import main
from lazypod.cli.app import ALIASES, COMMANDS


def test_every_command_is_where_the_table_says_and_nothing_else_is() -> None:
    ctx = click.Context(main)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name, name
    for module in set(COMMANDS.values()):
        importlib.import_module(f"lazypod.cli.{module}")
    assert set(main.commands) == set(COMMANDS)  # no command outside the table
    assert main.list_commands(ctx) == sorted(COMMANDS)


def test_aliases_name_commands() -> None:
    ctx = click.Context(main)
    for alias, name in ALIASES.items():
        command = main.get_command(ctx, alias)
        assert command is not None and command.name == name, alias
    assert main.get_command(ctx, "no-such-command") is None
