"""The README and docs/ say what the code does: the two commands are the ones CI runs, every command works as
written (or is marked as needing what this machine lacks), every link and image resolves, every path in the code
map exists, and the key reference is generated from the schema."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Hand-written pages: every command in them is checked. Pages that `av-td3 compare` writes (docs/<study>/) are
# checked for links only.
PAGES = sorted([README, *(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "results").glob("*.md")])
GENERATED = sorted((ROOT / "docs").glob("*/comparison.md"))

# The README's two commands, exactly (the brief of the architecture issue keeps them as they are).
TWO_COMMANDS = """```bash
make train   # sets up .venv (CPU torch + this package) and trains TD3 on the embedded simulator (default config)
make test    # adds the development extras to .venv and runs the test suite (what CI runs: .ci/run)
```"""

# `<!-- needs: what -->` right before a fenced block: its commands need something a test machine lacks (a CARLA
# server, Docker, a GPU, a cluster). Their launch.py overrides are still checked against the schema.
NEEDS = re.compile(r"<!--\s*needs:\s*(.+?)\s*-->")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------------------------- the two commands
def test_the_readme_is_short() -> None:
    assert len(_read(README).splitlines()) <= 150


def test_the_two_commands_are_as_they_were_and_ci_runs_the_test_command() -> None:
    text = _read(README)
    assert TWO_COMMANDS in text, "the README's two commands changed"
    test_command = next(line.split("#")[0].strip() for line in TWO_COMMANDS.splitlines()
                        if line.startswith("make test"))
    ci = [line.strip() for line in _read(ROOT / ".ci" / "run").splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [test_command], f".ci/run must run exactly the README's test command `{test_command}`, runs {ci}"


def _recipe(makefile: str, target: str) -> list[str]:
    """The commands of ``target``'s recipe, with the Makefile's ``:=`` variables expanded once."""
    variables = dict(re.findall(r"^(\w+)\s*:=\s*(.*)$", makefile, flags=re.M))
    lines = makefile.split(f"\n{target}:", 1)[1].splitlines()[1:]
    recipe = [line.strip() for line in lines[:next((i for i, line in enumerate(lines) if not line.startswith("\t")),
                                                   len(lines))]]
    return [re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line) for line in recipe]


def test_the_test_target_lints_before_the_suite() -> None:
    """`make test` (what CI runs) stops at a lint or type finding before running pytest: ruff, mypy and pytest are
    separate recipe lines, in that order, and make stops at the first that fails."""
    recipe = _recipe(_read(ROOT / "Makefile"), "test")
    tools = [next((i for i, line in enumerate(recipe) if f" -m {tool}" in line), None)
             for tool in ("ruff check", "mypy", "pytest")]
    assert None not in tools and tools == sorted(tools), recipe
    ruff = shlex.split(recipe[tools[0]])
    assert set(ruff[ruff.index("check") + 1:]) == {"av_td3", "tests", "scripts", "launch.py"}
    mypy = shlex.split(recipe[tools[1]])
    assert mypy[mypy.index("mypy") + 1:] == ["av_td3"]  # its settings are pyproject.toml's [tool.mypy]
    assert not any(line.startswith("-") or "|| true" in line for line in recipe), "a step whose failure is ignored"


# -------------------------------------------------------------------------------------------------------- links
def _strip_code(text: str) -> str:
    """The text without fenced blocks and inline code (a link there is an example, not a link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", _read(path), flags=re.M | re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+?)\s*$", text, flags=re.M)}


def _links(path: Path) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _strip_code(_read(path)))


@pytest.mark.parametrize("page", PAGES + GENERATED, ids=_rel)
def test_every_relative_link_and_image_resolves(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: {path} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading with the anchor #{anchor} in {_rel(path)}")
    assert not broken, "\n".join(broken)


def test_every_page_under_docs_is_linked_from_the_readme_or_another_page() -> None:
    linked = {(page.parent / link.partition("#")[0]).resolve() for page in PAGES for link in _links(page)
              if not re.match(r"^[a-z]+:", link)}
    orphans = [_rel(p) for p in PAGES if p != README and p.resolve() not in linked]
    assert not orphans, f"pages nobody links to: {orphans}"


# ----------------------------------------------------------------------------------------------------- code map
def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_every_path_in_the_code_map_exists() -> None:
    rows = [line for line in _section(_read(README), "Code map").splitlines() if line.startswith("| `")]
    paths = [p for row in rows for p in re.findall(r"`([^`\s]+)`", row.split("|")[1])]
    assert len(paths) >= 20, paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the README's code map names paths that do not exist: {missing}"


def test_the_code_map_names_the_files_a_newcomer_looks_for() -> None:
    """The file that owns the update, the clip modes, the reward, the env contract, the run-folder format, the
    loop, the schema: each is named in the map, next to words that say so."""
    owns = {row.split("|")[2].lower(): row.split("|")[1] for row in _section(_read(README), "Code map").splitlines()
            if row.startswith("| `")}
    for words in ("td3 update", "clip modes", "reward", "env contract", "run-folder format", "training loop",
                  "schema", "agent protocol"):
        assert any(words in what for what in owns), f"no code-map line says where the {words} lives"


# ------------------------------------------------------------------------------------------- configuration keys
def _load_script():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_key_reference_is_generated_from_the_schema() -> None:
    script = _load_script()
    page = _read(script.PAGE)
    assert script.render(page) == page, ("docs/configuration.md's generated key table differs from the schema: "
                                         "run .venv/bin/python scripts/config_reference.py")


def _documented_keys(cell: str) -> list[str]:
    """`env.image.height` / `.width` / `.stack`, `env.carla.camera.{x,y}`, `env.reward.*` -> dotted keys."""
    keys: list[str] = []
    for item in re.findall(r"`([a-z_.{},*]+)`", cell):
        if item.startswith(".") and keys:
            item = keys[-1].rsplit(".", 1)[0] + item
        if "{" in item:
            head, body, tail = re.match(r"(.*)\{(.*)\}(.*)", item).groups()
            keys += [f"{head}{b}{tail}" for b in body.split(",")]
        else:
            keys.append(item)
    return keys


@pytest.mark.parametrize("page", ["docs/configuration.md", "docs/carla.md"])
def test_every_key_the_meaning_tables_name_is_in_the_schema(page: str) -> None:
    from av_td3.config import schema_keys

    schema = schema_keys()
    rows = [line for line in _read(ROOT / page).split("<!-- BEGIN generated")[0].splitlines()
            if line.startswith("| `") and "." in line.split("|")[1]]
    assert rows
    unknown = []
    for row in rows:
        for key in _documented_keys(row.split("|")[1]):
            if key.endswith(".*"):
                ok = key[:-2] in schema
            else:
                ok = key in schema or key == "logger"
            if not ok:
                unknown.append(key)
    assert not unknown, f"{page} documents keys the schema does not have: {unknown}"


# ------------------------------------------------------------------------------------------------------ commands
@dataclass
class Command:
    page: Path
    line: int
    text: str
    needs: str | None  # what it needs that this machine lacks, from the block's marker
    inline: bool = False

    def __str__(self) -> str:
        return f"{_rel(self.page)}:{self.line}: {self.text}"


PROGRAMS = {"make", "launch.py", "av-td3", "pytest"}
INLINE = re.compile(r"`((?:\.venv/bin/python launch\.py|python launch\.py|\.venv/bin/av-td3|av-td3|make) [^`]+)`")


def _commands(page: Path) -> list[Command]:
    lines = _read(page).splitlines()
    out: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```bash"):
            needs = None
            if i and (m := NEEDS.search(lines[i - 1])):
                needs = m.group(1)
            j = i + 1
            pending, start = "", j
            while not lines[j].startswith("```"):
                code = lines[j]
                if not pending:
                    start = j
                pending += code.rstrip("\\") + " " if code.endswith("\\") else code
                if not code.endswith("\\"):
                    if pending.strip():
                        out.append(Command(page, start + 1, pending.strip(), needs))
                    pending = ""
                j += 1
            i = j + 1
            continue
        if not line.startswith("```"):
            for m in INLINE.finditer(line):
                out.append(Command(page, i + 1, m.group(1), None, inline=True))
        i += 1
    return out


COMMANDS = [c for page in PAGES for c in _commands(page)]


def _words(text: str) -> list[str]:
    words = shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", text), comments=True)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value before the program
        words.pop(0)
    return [w for w in words if w != "&"]


def _program(words: list[str]) -> tuple[str, list[str]]:
    if words[:1] == ["make"]:
        return "make", words[1:]
    for i, w in enumerate(words):
        if w.endswith("launch.py"):
            return "launch.py", words[i + 1:]
        if w.endswith("av-td3"):
            return "av-td3", words[i + 1:]
        if w == "av_td3.cli" and words[i - 1] == "-m":
            return "av-td3", words[i + 1:]
        if w == "pytest" and words[i - 1] == "-m":
            return "pytest", words[i + 1:]
    return words[0], words[1:]


def test_the_commands_are_found() -> None:
    programs = [_program(_words(c.text))[0] for c in COMMANDS]
    assert programs.count("launch.py") >= 20 and programs.count("av-td3") >= 10 and "make" in programs


def _check_launch(args: list[str], compose: bool) -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sys.path.insert(0, str(ROOT))
    import launch

    from av_td3.config import CONF_DIR, check_group_overrides, to_config

    args = [a for a in args if a != "..."]
    check_group_overrides(args)
    launch.check_override_keys(args)
    launch.check_sweep_presets(args)
    if not compose:
        return
    overrides = []
    for o in OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")]):
        value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
        overrides.append(f"{o.get_key_element()}={value}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra_compose("config", overrides=overrides, return_hydra_config=True)
        to_config(hydra_compose("config", overrides=[o for o in overrides if not o.startswith("hydra")]))


def _run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    if "--out" in args:
        args = [*args[:args.index("--out") + 1], str(tmp_path / "out"), *args[args.index("--out") + 2:]]
    return subprocess.run([sys.executable, "-m", "av_td3.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _check_cli(args: list[str], tmp_path: Path) -> None:
    from av_td3.cli import build_parser

    try:
        ns = build_parser().parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"av-td3 refuses {args} (exit {e.code})") from None
    paths = list(getattr(ns, "dirs", None) or []) + ([ns.path] if getattr(ns, "path", None) else [])
    readable = args[0] in ("compare", "validate") and paths and not any("PLACEHOLDER" in str(p) for p in paths)
    if readable and all((ROOT / p).exists() for p in paths):  # committed runs: run it, writing to tmp_path
        proc = _run_cli(args, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]


def _needs_plugin(args: list[str]) -> str | None:
    plugins = {"launcher=local_parallel": "hydra_plugins.hydra_joblib_launcher",
               "launcher=slurm": "hydra_plugins.hydra_submitit_launcher",
               "hydra/launcher=submitit_local": "hydra_plugins.hydra_submitit_launcher",
               "launcher=ray": "hydra_plugins.hydra_ray_launcher",
               "hparams_search=optuna": "hydra_plugins.hydra_optuna_sweeper"}
    for arg, module in plugins.items():
        if arg in args and importlib.util.find_spec(module) is None:
            return module
    return None


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_command_in_the_readme_and_docs_works_as_written(command: Command, tmp_path: Path) -> None:
    words = _words(command.text)
    program, args = _program(words)
    if command.inline and program == "av-td3" and len(args) <= 1:
        pytest.skip("names a subcommand, no command to run")
    if program == "launch.py":
        plugin = _needs_plugin(args)
        if plugin and not command.needs:
            pytest.skip(f"{plugin} is an optional install")
        _check_launch(args, compose=command.needs is None)
    elif program == "av-td3":
        _check_cli(args, tmp_path)
    elif program == "make":
        proc = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    elif program == "pytest":
        files = [a for a in args if a.endswith(".py")]
        assert files and all((ROOT / f).exists() for f in files), files
        if "-m" in args:
            marker = args[args.index("-m") + 1]
            assert f'"{marker}:' in _read(ROOT / "pyproject.toml"), f"pytest marker {marker} is not registered"
    else:
        assert command.needs, (f"{command}: `{program}` is not a command these tests can check; mark its block "
                               "with <!-- needs: ... --> saying what it needs")
    # a command inside another one (docker compose run ... python launch.py ...) is checked for its keys
    if program not in ("launch.py",) and "launch.py" in " ".join(words[1:]):
        inner = words[[i for i, w in enumerate(words) if w.endswith("launch.py")][0] + 1:]
        _check_launch(inner, compose=False)


def test_the_readme_example_output_is_what_compare_prints(tmp_path: Path) -> None:
    text = _read(README)
    command = next(c for c in _commands(README) if "compare results/" in c.text)
    proc = _run_cli(_program(_words(command.text))[1], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = text.split(command.text, 1)[1].split("```\n")[2]  # the output block after the command's block
    flat = re.sub(r"\s+", " ", proc.stdout)
    rows = [line for line in shown.splitlines() if line.startswith("| `")]
    assert rows
    for row in rows:
        for cell in (c.strip() for c in row.strip("|").split("|")):
            assert cell in flat, f"the README shows {cell!r}, which compare no longer prints"
    # the verdicts and notes shown: each line, wrapped or not, is a piece of the flattened output
    sections = re.split(r"^(?:Verdicts|Notes and warnings):$", shown, flags=re.M)[1:]
    for line in "\n".join(part.split("\n\n")[0] for part in sections).strip().splitlines():
        assert re.sub(r"\s+", " ", line.strip()) in flat, f"the README shows {line.strip()!r}, not printed now"
