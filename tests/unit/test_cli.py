"""The command line as a reader first meets it: `lorafleet --help`."""

from click.testing import CliRunner

from lorafleet.cli import cli


def test_help_lists_every_command_with_a_whole_line():
    shown = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    assert shown.exit_code == 0, shown.output
    listed = shown.output.split("Commands:\n")[1].splitlines()
    assert {line.split()[0] for line in listed} == set(cli.commands)
    assert all(len(line.split(maxsplit=1)) == 2 and not line.endswith("...") for line in listed), shown.output
