"""Issue 20, item 4: every command's command line says and does the same thing.

``--resume`` with a saved ``training_args.json`` continues the run however it started; each
``--help`` footer holds only that command's options; the README's command forms are the usage
lines; one STL-10 split name; ``mvmr-push`` names the real repository in the pushed card; a
repeated comma-list option means all of its lists. Bad input: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import ClassVar

import huggingface_hub
import pytest
import yaml
from conftest import read_metrics, snapshot, tiny_args
from huggingface_hub import EvalResult, ModelCard

from mvmr_hf.cli import parse_arguments
from mvmr_hf.cli import release as release_cli
from mvmr_hf.cli import train as train_cli
from mvmr_hf.cli.release import align_main, evaluate_main, export_main, push_main
from mvmr_hf.cli.train import DISTILL_GROUPS, distill_main, pretrain_main
from mvmr_hf.config import (
    AlignArguments,
    CommaListAction,
    DataArguments,
    EvalDataArguments,
    EvaluateArguments,
    ExportArguments,
    FinetuneArguments,
    PretrainModelArguments,
    PushArguments,
    TrainingArguments,
)
from mvmr_hf.errors import ConfigError
from mvmr_hf.models.student import build_student
from mvmr_hf.release.card import CardInfo
from mvmr_hf.release.export import export_student, update_card

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]
EVALUATE_GROUPS = [EvaluateArguments, EvalDataArguments, FinetuneArguments]
COMMANDS = {
    "mvmr-distill": distill_main,
    "mvmr-pretrain": pretrain_main,
    "mvmr-export": export_main,
    "mvmr-evaluate": evaluate_main,
    "mvmr-align": align_main,
    "mvmr-push": push_main,
}
ALL_GROUPS = [
    *DISTILL_GROUPS, PretrainModelArguments, DataArguments, TrainingArguments, ExportArguments,
    *EVALUATE_GROUPS, AlignArguments, PushArguments,
]  # fmt: skip


def _help(main, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _one_line_error(main, argv: list[str], capsys, folder: Path) -> str:
    before = snapshot(folder)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert snapshot(folder) == before, "a rejected command must not write anything"
    return err


# ----------------------------------------------------------------------------- --resume with a saved run


def test_resume_with_the_saved_arguments_of_an_overwriting_run(digits, tmp_path, capsys):
    """The demo's run starts with --overwrite; its training_args.json then continues it with --resume."""
    run = tmp_path / "run"
    assert (
        pretrain_main(tiny_args(digits, run, "--max-steps", "1", "--handcrafted", "lsd", "--overwrite")) == 0
    )
    assert json.loads((run / "training_args.json").read_text())["overwrite"] is True
    assert pretrain_main([str(run / "training_args.json"), "--resume", "--max-steps", "2"]) == 0
    assert [line["step"] for line in read_metrics(run) if "loss" in line][-1] == 2
    capsys.readouterr()  # the two runs' progress
    err = _one_line_error(
        pretrain_main, [str(run / "training_args.json"), "--resume", "--overwrite"], capsys, tmp_path
    )
    assert "--resume and --overwrite contradict each other" in err


@pytest.mark.parametrize(
    ("groups", "saved"),
    [
        pytest.param(DISTILL_GROUPS, {"output_dir": "runs/kd"}, id="distill"),
        pytest.param(EVALUATE_GROUPS, {"model": "m", "dataset": "d", "protocol": "finetune"}, id="finetune"),
    ],
)
def test_the_command_line_decides_between_resume_and_overwrite(tmp_path, groups, saved):
    config = tmp_path / "training_args.json"
    config.write_text(json.dumps({**saved, "overwrite": True, "resume": None}))
    *_, arguments = parse_arguments(groups, [str(config), "--resume"], prog="t")
    assert (arguments.resume, arguments.overwrite) == ("latest", False)
    config.write_text(json.dumps({**saved, "overwrite": False, "resume": "latest"}))
    *_, arguments = parse_arguments(groups, [str(config), "--overwrite"], prog="t")
    assert (arguments.resume, arguments.overwrite) == (None, True)
    *_, arguments = parse_arguments(groups, [str(config)], prog="t")  # the file alone keeps its own
    assert (arguments.resume, arguments.overwrite) == ("latest", False)


# ----------------------------------------------------------------------------- --help and usage


@pytest.mark.parametrize("command", COMMANDS)
def test_every_footer_example_uses_the_commands_own_options(command, capsys):
    text = _help(COMMANDS[command], capsys)
    footer = text.split("\n\n")[-1]
    example = re.search(r"`(mvmr-\S+) run\.yaml (--[a-z-]+) ([A-Z_]+)`", " ".join(footer.split()))
    assert example is not None, footer
    assert example.group(1) == command
    usage = text.split("\n\n")[0]
    assert f"[{example.group(2)} {example.group(3)}]" in " ".join(usage.split())
    if command not in ("mvmr-distill", "mvmr-pretrain"):
        assert "--max-steps" not in text


class _CalledError(Exception):
    """What a command gave :func:`parse_arguments`, raised instead of parsing and running it."""

    def __init__(self, groups: list[type], options: dict) -> None:
        super().__init__()
        self.groups, self.options = groups, options


def _parser_of(command: str, monkeypatch) -> tuple[list[type], dict]:
    """The argument groups and parse options (prog, positionals) the command parses its ``argv`` with."""

    def record(groups, argv, **options):
        raise _CalledError(list(groups), options)

    with monkeypatch.context() as patch:
        patch.setattr(release_cli, "parse_arguments", record)
        patch.setattr(train_cli, "parse_arguments", record)
        with pytest.raises(_CalledError) as called:
            COMMANDS[command]([])
    return called.value.groups, called.value.options


def _parsed(groups: list[type], options: dict, argv: list[str]) -> dict:
    """Every argument's value, as the command's parser reads ``argv``."""
    values: dict = {}
    for group in parse_arguments(groups, argv, **options):
        values.update(asdict(group))
    return values


FOOTER = re.compile(
    r"keys are the option names with underscores \((?P<key>\w+)(?:; also (?P<positions>[\w, ]+), given by "
    r"position)?\): pass it first \(`(?P<command>\S+) run\.yaml (?P<flag>--[a-z-]+) [A-Z_]+`\) or with "
    r"--config; options on the command line override the file\."
)
LISTS_SENTENCE = re.compile(
    r"A comma-list option given several times means all of its lists \(`(--[a-z-]+) A \1 B` is `\1 A,B`\)\."
)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_footer_says_what_its_command_does(command, tmp_path, monkeypatch, capsys):
    """Each sentence of each command's --help footer, done: a file of its keys with the typed flag (first,
    or with --config before or after the flags) and the typed flag winning; the keys given by position;
    the comma-list sentence exactly where the command has a comma list; --debug raising the error."""
    footer = " ".join(_help(COMMANDS[command], capsys).split("\n\n")[-1].split())
    match = FOOTER.search(footer)
    assert match is not None, footer
    key, flag = match["key"], match["flag"]
    assert (match["command"], flag) == (command, "--" + key.replace("_", "-"))
    groups, options = _parser_of(command, monkeypatch)
    by_position = match["positions"].split(", ") if match["positions"] else []
    assert by_position == list(options.get("positionals", ()))
    every = {item.name: item for group in groups for item in fields(group)}
    required = {name: f"file-{name}" for name, item in every.items() if item.default is MISSING}
    assert set(by_position) <= set(required)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**required, key: "file-value"}))
    from_file = _parsed(groups, options, [str(config)])
    assert {name: from_file[name] for name in required} == required
    assert from_file[key] == "file-value"
    for argv in (
        [str(config), flag, "typed"],
        ["--config", str(config), flag, "typed"],
        [flag, "typed", "--config", str(config)],
    ):
        assert _parsed(groups, options, argv) == {**from_file, key: "typed"}, argv
    lists = {name for name, item in every.items() if item.metadata.get("action") is CommaListAction}
    sentence = LISTS_SENTENCE.search(footer)
    assert (sentence is not None) == bool(lists), footer
    if sentence is not None:
        assert sentence[1][2:].replace("-", "_") in lists
    assert footer.endswith("--debug shows full tracebacks of errors.")
    assert COMMANDS[command](["--no-such-option"]) == 2
    capsys.readouterr()
    with pytest.raises(ConfigError):  # the same error, raised with its traceback
        COMMANDS[command](["--no-such-option", "--debug"])


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ("mvmr-export", "[--output-dir OUTPUT_DIR] [--overwrite [OVERWRITE]] RUN_OR_CHECKPOINT"),
        ("mvmr-push", "[--commit-message COMMIT_MESSAGE] FOLDER ORG/NAME"),
    ],
)
def test_usage_lines_are_the_readme_forms(command, usage, capsys):
    text = " ".join(_help(COMMANDS[command], capsys).split("\n\n")[0].split())
    assert usage in text
    options = re.findall(r"--[\w-]+", text)
    assert not {"--checkpoint", "--folder", "--repo-id"} & set(options)
    assert not [option for option in options if "_" in option]  # the README's dashes


def _readme_commands() -> list[tuple[str, list[str]]]:
    """Each ``mvmr-*`` command line of the README's bash blocks: (command, its arguments)."""
    text = (REPO / "README.md").read_text()
    lines = " ".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        words = shlex.split(line.split("#")[0])
        for index, word in enumerate(words):
            if word in COMMANDS:
                commands.append((word, words[index + 1 :]))
    return commands


def test_every_readme_option_is_one_of_its_commands(capsys):
    commands = _readme_commands()
    assert {command for command, _ in commands} >= {"mvmr-distill", "mvmr-push", "mvmr-evaluate"}
    helps = {command: _help(main, capsys) for command, main in COMMANDS.items()}
    for command, argv in commands:
        for option in (word.split("=")[0] for word in argv if word.startswith("--")):
            assert re.search(rf"{option}\b", helps[command]), f"{command} {option}"


def test_every_readme_command_line_parses_as_its_command(tmp_path, monkeypatch):
    """Each README command line, its positional arguments included, is one its command accepts (the
    option test above only looks up names); a line cut short with ... is left out. Its saved
    training_args.json is an overwriting run's, which the README's --resume continues."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "kd").mkdir(parents=True)
    saved = {"output_dir": "runs/kd", "overwrite": True, "resume": None}
    (tmp_path / "runs" / "kd" / "training_args.json").write_text(json.dumps(saved))
    parsers = {command: _parser_of(command, monkeypatch) for command in COMMANDS}
    lines = [(command, argv) for command, argv in _readme_commands() if "..." not in argv]
    assert len(lines) >= 15
    for command, argv in lines:
        values = _parsed(*parsers[command], argv)
        if "--resume" in argv:
            assert (values["resume"], values["overwrite"]) == ("latest", False)


def test_the_usage_forms_of_the_readme_and_the_code_are_the_usage_lines(capsys):
    """`mvmr-export RUN_OR_CHECKPOINT`, `mvmr-push FOLDER ORG/NAME`: every such form in the README, the
    docs and the code's help and messages names exactly the arguments its usage line takes by position."""
    positions = {}
    for command, main in COMMANDS.items():
        usage = " ".join(_help(main, capsys).split("\n\n")[0].split())
        positions[command] = usage.rsplit("]", 1)[-1].split()
    sources = [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("mvmr_hf/**/*.py")]
    sources += [*REPO.glob("mvmr_hf/release/templates/*"), *REPO.glob("examples/**/*.py")]
    forms = [
        (match[1], match[2].split(), path.name)
        for path in sources
        for match in re.finditer(
            r"\b(mvmr-[a-z]+)((?: [A-Z][A-Z0-9_]*(?:/[A-Z][A-Z0-9_]*)?)+)\b", path.read_text()
        )
    ]
    assert {command for command, _, _ in forms} >= {"mvmr-export", "mvmr-push"}
    for command, words, where in forms:
        assert words == positions[command], f"{where}: {command} {' '.join(words)}"


def test_the_readme_forms_and_the_old_spellings_reach_the_library(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        release_cli, "push_to_hub", lambda folder, repo, **kw: calls.append((folder, repo, kw))
    )
    monkeypatch.setattr(release_cli, "export_run", lambda run, folder, **kw: calls.append((run, folder, kw)))
    (push,) = [argv for command, argv in _readme_commands() if command == "mvmr-push"]
    assert push_main(push) == 0
    assert push_main(["--folder", "runs/kd/student", "--repo_id", "ORG/NAME", "--private"]) == 0
    assert push_main(["runs/kd/student", "--repo-id", "ORG/NAME", "--private"]) == 0
    private = {"private": True, "revision": None, "commit_message": None}
    assert calls == [("runs/kd/student", "ORG/NAME", private)] * 3
    calls.clear()
    config = tmp_path / "export.yaml"
    config.write_text("checkpoint: runs/kd\n")
    for argv in (["runs/kd"], ["--checkpoint", "runs/kd"], [str(config)], ["--config", str(config)]):
        assert export_main(argv) == 0
    assert calls == [("runs/kd", None, {"overwrite": False})] * 4


@pytest.mark.parametrize(
    ("main", "argv", "match"),
    [
        (push_main, ["runs/kd/student"], "required: ORG/NAME"),
        (push_main, [], "required: FOLDER, ORG/NAME"),
        (export_main, [], "required: RUN_OR_CHECKPOINT"),
        (push_main, ["a", "b/c", "d"], "unrecognized arguments: d"),
    ],
)
def test_missing_positional_arguments_are_one_line(main, argv, match, capsys, tmp_path):
    assert match in _one_line_error(main, argv, capsys, tmp_path)


def test_one_split_name_for_stl10s_unlabeled_images():
    """Every split named unlabel... in the README, the docs, the examples (scripts, SLURM, configs), the
    library, its card templates, the benchmarks and the Makefile, as a flag (`--split unlabeled`,
    `--split=...`) or as a value (`split="..."`, `split: ...`), is one name: the README's `unlabeled`."""
    sources = [REPO / "README.md", REPO / "Makefile", *REPO.glob("docs/**/*.md"), *REPO.glob("examples/**/*")]
    sources += [
        *REPO.glob("mvmr_hf/**/*.py"),
        *REPO.glob("mvmr_hf/release/templates/*"),
        *REPO.glob("benchmarks/**/*"),
    ]
    texts = [path.read_text(errors="replace") for path in sources if path.is_file()]
    assert any("--split unlabeled" in text for text in texts)
    pattern = r"split[\"']?(?:\s*[=:]\s*|\s+)[\"']?(unlabel\w*)"
    names = {name for text in texts for name in re.findall(pattern, text, flags=re.I)}
    assert names == {"unlabeled"}


# ----------------------------------------------------------------------------- mvmr-push and the card


def _content(path_or_bytes: Path | bytes) -> bytes:
    return path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()


class _FakeHub:
    """HfApi for one push: it records the commit instead of sending it."""

    commits: ClassVar[list] = []

    def __init__(self, **_: object) -> None:
        pass

    def create_repo(self, repo_id: str, **_: object):
        return type("Repo", (), {"repo_id": repo_id})()

    def create_commit(self, *, repo_id: str, operations: list, **_: object):
        files = {op.path_in_repo: _content(op.path_or_fileobj) for op in operations}
        _FakeHub.commits.append((repo_id, files))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


def _push(monkeypatch, folder: Path, repo_id: str) -> tuple[str, dict[str, bytes]]:
    """``mvmr-push FOLDER REPO_ID`` against a fake Hub: the one commit's repository and files."""
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("mvmr_hf.release.hub.HfApi", _FakeHub)
    _FakeHub.commits = []
    assert push_main([str(folder), repo_id]) == 0
    ((pushed_to, files),) = _FakeHub.commits
    return pushed_to, files


def test_push_names_the_real_repository_in_the_card(tmp_path, monkeypatch, capsys):
    student = build_student("test_resnet", projector="8", image_size=32).eval()
    folder = export_student(
        student, tmp_path / "student", training_args={"student": "test_resnet"}, card_info=CardInfo(step=3)
    )
    assert "hf-hub:ORG/" in (folder / "README.md").read_text()  # trained without --push-to-hub
    before = snapshot(folder)
    repo_id, files = _push(monkeypatch, folder, "me/tiny-mvmr")
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/tiny-mvmr/commit/0"
    assert repo_id == "me/tiny-mvmr"
    assert set(files) == {path.name for path in folder.iterdir()}
    card = files["README.md"].decode()
    assert 'timm.create_model("hf-hub:me/tiny-mvmr"' in card
    assert 'AutoModel.from_pretrained("me/tiny-mvmr")' in card
    assert "ORG/" not in card
    assert json.loads(files["run_info.json"])["repo_id"] == "me/tiny-mvmr"
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert snapshot(folder) == before, "pushing only reads the release folder"


def test_push_to_another_repository_than_the_run_was_exported_for_names_only_that_one(tmp_path, monkeypatch):
    """A release trained with --push-to-hub old/name, evaluated, then pushed to me/new: the pushed card and
    run_info.json name me/new alone and keep the evaluation; the folder still names old/name."""
    student = build_student("test_resnet", projector="8", image_size=32).eval()
    folder = export_student(
        student,
        tmp_path / "student",
        training_args={"student": "test_resnet"},
        card_info=CardInfo(step=3, repo_id="old/name"),
    )
    result = EvalResult(
        task_type="image-classification", dataset_type="digits", dataset_name="digits",
        metric_type="accuracy", metric_value=12.5, metric_name="linear top-1",
    )  # fmt: skip
    update_card(folder, [result])
    assert 'timm.create_model("hf-hub:old/name"' in (folder / "README.md").read_text()
    before = snapshot(folder)
    repo_id, files = _push(monkeypatch, folder, "me/new")
    card = files["README.md"].decode()
    assert repo_id == "me/new"
    assert 'timm.create_model("hf-hub:me/new"' in card
    assert 'AutoModel.from_pretrained("me/new")' in card
    assert "old/name" not in card
    assert json.loads(files["run_info.json"])["repo_id"] == "me/new"
    (pushed,) = ModelCard(card).data.eval_results
    assert (pushed.metric_name, pushed.metric_value) == ("linear top-1", 12.5)
    assert snapshot(folder) == before


# ----------------------------------------------------------------------------- repeated comma lists

LIST_VALUES = {
    "handcrafted": ("hog", "lsd"),
    "teacher": ("org/a", "org/b"),
    "teacher_output": ("cls", "mean"),
    "teacher_names": ("x", "y"),
    "augmentations": ("crop", "flip"),
    "representation_weights": ("hog=1", "lsd=2"),
    "log_with": ("tensorboard", "wandb"),
    "stop_signals": ("SIGTERM", "SIGUSR1"),
    "protocol": ("linear", "knn"),
}
REQUIRED = {"dataset": "d", "output_dir": "o", "model": "m"}
TWO_TEACHERS = {"teacher_output", "teacher_names"}  # one value per teacher


def _value(groups: list[type], argv: list[str], name: str, options: dict | None = None) -> str:
    parsed = parse_arguments(groups, argv, **(options or {"prog": "t"}))
    (value,) = [getattr(group, name) for group in parsed if hasattr(group, name)]
    return value


def test_every_comma_list_option_is_in_this_table():
    lists = {
        f.name for group in ALL_GROUPS for f in fields(group) if f.metadata.get("action") is CommaListAction
    }
    assert lists == set(LIST_VALUES)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_repeated_list_option_means_all_of_its_lists(command, tmp_path, monkeypatch):
    """Every comma list of every command, through the parser the command calls (pretraining's
    --handcrafted and --stop-signals are fields of their own, not distillation's)."""
    groups, options = _parser_of(command, monkeypatch)
    every = {item.name: item for group in groups for item in fields(group)}
    required = [
        f"--{name}={REQUIRED.get(name, name)}" for name, item in every.items() if item.default is MISSING
    ]
    lists = [name for name, item in every.items() if item.metadata.get("action") is CommaListAction]
    assert bool(lists) == (command in ("mvmr-distill", "mvmr-pretrain", "mvmr-evaluate"))
    for name in lists:
        argv = [*required, *(["--teacher=org/a,org/b"] if name in TWO_TEACHERS else [])]
        first, second = LIST_VALUES[name]
        flag, spelling = f"--{name.replace('_', '-')}", f"--{name}"
        joined = _value(groups, [*argv, flag, f"{first},{second}"], name, options)
        assert joined == f"{first},{second}"
        assert type(joined) is str
        assert _value(groups, [*argv, flag, first, spelling, second], name, options) == joined, name
        config = tmp_path / "run.yaml"
        config.write_text(f"{name}: {second},{first}\n")
        assert _value(groups, [str(config), *argv], name, options) == _value(
            groups, [*argv, flag, f"{second},{first}"], name, options
        )
        # The command line replaces the file's list rather than extending it.
        assert _value(groups, [str(config), *argv, flag, first, flag, second], name, options) == joined


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--handcrafted", "lsd", "--handcrafted", "lsd"], "--handcrafted lists lsd twice"),
        (["--stop-signals", "SIGTERM", "--stop-signals", "SIGTERM"], "--stop-signals lists SIGTERM twice"),
        (["--representation-weights", "lsd=1", "--representation-weights", "lsd=2"], "gives lsd two weights"),
    ],
)
def test_a_list_that_names_one_entry_twice_is_refused(digits, tmp_path, capsys, extra, match):
    argv = tiny_args(digits, tmp_path / "run", "--max-steps", "1", *extra)
    assert match in _one_line_error(pretrain_main, argv, capsys, tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_protocol_listed_twice_is_refused_before_the_model_loads(tmp_path, capsys):
    """`--protocol linear --protocol knn,linear` would run linear once and report one row for two."""
    argv = ["--model", str(tmp_path / "missing"), "--dataset", str(tmp_path / "none")]
    argv += ["--protocol", "linear", "--protocol", "knn,linear", "--cache-dir", str(tmp_path / "cache")]
    err = _one_line_error(evaluate_main, argv, capsys, tmp_path)
    assert "--protocol lists linear twice" in err
