"""The README stays true: its recipe reference is the one the schema generates, and it
starts with the two commands .ci/run relies on."""
import re
from pathlib import Path

from builder.recipe.docs import (BEGIN, CHECKS_BEGIN, CHECKS_END, END, TEMPLATES_BEGIN, TEMPLATES_END,
                          checks_reference, reference, templates_reference)

ROOT = Path(__file__).resolve().parent.parent


def test_readme_recipe_reference_is_generated_from_schema():
    text = (ROOT / "README.md").read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == reference(), "run: python -m builder.recipe.docs --update (README is stale)"
    start, end = text.index(TEMPLATES_BEGIN), text.index(TEMPLATES_END) + len(TEMPLATES_END)
    assert text[start:end] == templates_reference(), "run: python -m builder.recipe.docs --update (README is stale)"
    start, end = text.index(CHECKS_BEGIN), text.index(CHECKS_END) + len(CHECKS_END)
    assert text[start:end] == checks_reference(), "run: python -m builder.recipe.docs --update (README is stale)"


def test_readme_starts_with_the_two_commands_and_ci_runs_them():
    head = (ROOT / "README.md").read_text().split("## ", 1)[0]
    assert "make demo" in head and "make test" in head
    # The one prerequisite line, which .ci/fresh-check runs on a clean Debian before the two.
    assert re.search(r"^sudo apt-get install -y [a-z0-9 .+-]*\bmake\b", head, re.M)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert [ln.strip() for ln in ci if ln.strip().startswith("make ")] == [
        "make test", "make fresh-check"]


def test_readme_command_summary_lists_every_option():
    """Every option of build, lock, vendor, schema, verify and boot appears in the README's command summary."""
    import typer
    from builder.cli import app
    text = (ROOT / "README.md").read_text()
    summary = text[text.index("## Commands"):text.index("A build writes")]
    group = typer.main.get_command(app)
    for name in ("build", "lock", "vendor", "schema", "verify", "boot"):
        for param in group.commands[name].params:
            if param.__class__.__name__.endswith("Option"):
                assert any(o in summary for o in param.opts), \
                    f"{name}: {param.opts} missing from the README's command summary"
