"""Bad input through the real CLI: one `error:` line on stderr, non-zero exit, no traceback, nothing lost.

Every case runs `evaluate.py` or `run.py` as a subprocess on the tiny model. The
cases are independent processes, so the module fixture runs them two at a time
and each test checks one case's result.

Where the error is raised before the run touches its folder (config, dataset and
Hydra errors), the case runs in a copy of a finished run's folder, and the test
checks that results.jsonl and summary.json keep every byte. A case that fails
while loading a model runs in a fresh folder and must leave no results.jsonl.

Set SPECQA_HARDENING_TABLE=<file> to also write a markdown table of every case
and the line it printed.
"""

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest

from cli_helpers import run_cli, stderr_lines, tiny_overrides
from experiments.data import QAItem, load_dataset
from hardening_helpers import shared_tiny_dir

# the tiny models' max_position_embeddings
TINY_CONTEXT = 256
# parallel CLI processes; each is mostly single-threaded Python start-up
WORKERS = 2
HYDRA_HINT = "(docs/USAGE.md lists the keys and their types; HYDRA_FULL_ERROR=1 shows Hydra's full report)"


@dataclass
class Case:
    """One bad input: the script, its overrides, extra environment and the phrase its error line must contain."""

    name: str
    script: str
    overrides: list[str]
    phrase: str
    exit_code: int = 1
    # run in a copy of a finished run's folder and check that its outputs are unchanged
    seeded: bool = False
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Paths:
    """Files and folders the cases point at, made once per module."""

    root: Path
    tiny: Path
    other_vocab: Path
    seed_run: Path

    def data(self, name: str) -> Path:
        return self.root / "data" / name


# --- inputs -----------------------------------------------------------------------------


def write_datasets(folder: Path) -> None:
    """Write one dataset file per dataset case."""
    folder.mkdir(parents=True)
    good = '{"id": "q%d", "question": "What is %d + 1?", "answer": ["%d"]}\n'
    files = {
        "empty.jsonl": "",
        "not_json.txt": "question: What is the capital of France?\nanswer: Paris\n",
        "broken_line.jsonl": good % (1, 1, 2) + good % (2, 2, 3) + '{"question": "What is 3 + 1?", "answer": ["4"\n',
        "no_question.jsonl": good % (1, 1, 2) + '{"id": "q2", "answer": ["3"]}\n',
        "no_answer.jsonl": '{"id": "q1", "question": "What is 1 + 1?"}\n',
        "answer_number.jsonl": '{"id": "q1", "question": "What is 1 + 1?", "answer": 2}\n',
        "answer_empty_list.jsonl": '{"id": "q1", "question": "What is 1 + 1?", "answer": []}\n',
        "question_empty.jsonl": '{"id": "q1", "question": "   ", "answer": ["2"]}\n',
        "question_too_long.jsonl": json.dumps({"id": "long", "question": "why " * 100, "answer": ["x"]}) + "\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")


def write_truncated_gguf(path: Path) -> None:
    """Write a small valid GGUF file with one float32 tensor, then cut its tensor data short."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((300, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def seed_run(tiny: Path, run_dir: Path) -> None:
    """Finish one evaluation, whose folder the seeded cases start from."""
    result = run_cli("evaluate.py", [*evaluate_base(tiny), f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr
    assert len((run_dir / "results.jsonl").read_text().splitlines()) == 2


def evaluate_base(tiny: Path) -> list[str]:
    return tiny_overrides(tiny, "modes=[greedy]", "wandb.mode=disabled")


def run_base(tiny: Path) -> list[str]:
    return tiny_overrides(tiny, "modes=[greedy]", "wandb.mode=disabled", "prompts=[Hi]")


# --- cases ------------------------------------------------------------------------------


def dataset_cases(paths: Paths) -> list[Case]:
    base = evaluate_base(paths.tiny)

    def case(name: str, file: str, phrase: str) -> Case:
        return Case(name, "evaluate.py", [*base, f"dataset.path={paths.data(file)}"], phrase, seeded=True)

    missing = paths.data("missing.jsonl")
    return [
        Case("dataset missing", "evaluate.py", [*base, f"dataset.path={missing}"],
             f"dataset file not found: {missing} (set dataset.path to an existing .json or .jsonl file)", seeded=True),
        case("dataset empty", "empty.jsonl", f"dataset {paths.data('empty.jsonl')} is empty"),
        case("dataset not JSON", "not_json.txt",
             f"dataset {paths.data('not_json.txt')} line 1 is not valid JSON: Expecting value at column 1"),
        case("dataset JSONL broken line 3", "broken_line.jsonl",
             f"dataset {paths.data('broken_line.jsonl')} line 3 is not valid JSON"),
        case("record without question", "no_question.jsonl",
             f'dataset {paths.data("no_question.jsonl")} line 2: record has no "question" field'),
        case("record without answer", "no_answer.jsonl",
             f'dataset {paths.data("no_answer.jsonl")} line 1: record has no "answer" field'),
        case("answer is a number", "answer_number.jsonl",
             '"answer" must be a string or a list of strings, got a JSON number 2'),
        case("answer is an empty list", "answer_empty_list.jsonl",
             '"answer" is an empty list; give at least one accepted answer'),
        case("question is empty", "question_empty.jsonl", '"question" must be a non-empty string'),
    ]


def mode_cases(paths: Paths) -> list[Case]:
    base = evaluate_base(paths.tiny)
    return [
        Case("unknown mode", "evaluate.py", [*base, "modes=[greedy,fastest]"],
             "unknown mode 'fastest' in modes; choose from greedy, beam, speculative", seeded=True),
        Case("empty modes", "evaluate.py", [*base, "modes=[]"],
             "modes is empty; list at least one of greedy, beam, speculative", seeded=True),
        Case("duplicate modes", "evaluate.py", [*base, "modes=[greedy,greedy]"],
             "mode 'greedy' is listed twice in modes=['greedy', 'greedy']; list each mode once", seeded=True),
    ]


def model_cases(paths: Paths) -> list[Case]:
    base = evaluate_base(paths.tiny)
    missing = paths.root / "moved-model"
    not_a_model = paths.root / "not-a-model"
    truncated = paths.root / "truncated.gguf"
    hub_id = "specqa-tests/no-such-model"
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(paths.root / "empty-hf-home")}
    gguf_source = ["model.name_or_path=null", "model.package=null", f"model.gguf_file={truncated}"]
    return [
        Case("unknown model preset", "evaluate.py", [*base, "model=no-such-preset"],
             "In 'config': Could not find 'model/no-such-preset'; available: ", exit_code=2),
        # The seeded folder's results were made with this folder, which has since been moved.
        # Beam search has no results there yet, so the model must load.
        Case("model path does not exist", "evaluate.py", [*base, "modes=[greedy,beam]", f"model.name_or_path={missing}"],
             f"local path '{missing}' does not exist; set name_or_path to a save_pretrained folder or a hub id",
             seeded=True),
        Case("model path empty", "evaluate.py", [*base, "model.name_or_path="],
             "name_or_path is empty; set it to a hub id or a local folder"),
        Case("folder is not a model", "evaluate.py", [*base, f"model.name_or_path={not_a_model}"],
             f"folder '{not_a_model}' is not a transformers model (config.json is missing)"),
        Case("hub id offline without cache", "evaluate.py", [*base, f"model.name_or_path={hub_id}"],
             f"hub id '{hub_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set", env=offline),
        Case("truncated GGUF file", "evaluate.py", [*base, *gguf_source],
             f"GGUF file '{truncated}' is truncated or corrupt (37560 bytes"),
        Case("draft vocabulary differs", "evaluate.py",
             [*base, "modes=[speculative]", f"draft.name_or_path={paths.other_vocab}"],
             f"target '{paths.tiny}' and draft '{paths.other_vocab}' have different vocabularies (same size 300, but "
             "token '<pad>' is absent in the target and id 0 in the draft)"),
    ]


def setting_cases(paths: Paths) -> list[Case]:
    base = evaluate_base(paths.tiny)
    settings = [
        ("k zero", "speculative.k=0", "speculative.k must be >= 1, got 0 (set speculative.k)"),
        ("k negative", "speculative.k=-2", "speculative.k must be >= 1, got -2 (set speculative.k)"),
        ("k not an integer", "speculative.k=1.5",
         "speculative.k must be an integer >= 1 or 'auto', got 1.5 (set speculative.k)"),
        ("temperature negative", "speculative.temperature=-0.5",
         "speculative.temperature must be >= 0 (0 means greedy), got -0.5 (set speculative.temperature)"),
        ("top_p zero", "speculative.top_p=0",
         "speculative.top_p must be in (0, 1] (1 turns nucleus filtering off), got 0.0 (set speculative.top_p)"),
        ("top_p above one", "speculative.top_p=1.5",
         "speculative.top_p must be in (0, 1] (1 turns nucleus filtering off), got 1.5 (set speculative.top_p)"),
        ("top_k negative", "speculative.top_k=-1",
         "speculative.top_k must be >= 0 (0 turns top-k filtering off), got -1 (set speculative.top_k)"),
        ("num_beams zero", "beam.num_beams=0", "beam.num_beams must be >= 1, got 0 (set beam.num_beams)"),
        ("max_new_tokens zero", "generation.max_new_tokens=0",
         "generation.max_new_tokens must be >= 1, got 0 (set generation.max_new_tokens)"),
        ("max_new_tokens fills the context", f"generation.max_new_tokens={TINY_CONTEXT}",
         f"generation.max_new_tokens={TINY_CONTEXT} leaves no room for a prompt in the context"),
    ]
    cases = []
    for name, override, phrase in settings:
        # the checks of a mode apply when the mode runs
        mode = "modes=[beam]" if override.startswith("beam.") else "modes=[greedy,speculative]"
        seeded = not override.endswith(f"={TINY_CONTEXT}")
        cases.append(Case(name, "evaluate.py", [*base, mode, override], phrase, seeded=seeded))
    return cases


def prompt_cases(paths: Paths) -> list[Case]:
    base = evaluate_base(paths.tiny)
    max_prompt = TINY_CONTEXT - 6  # tiny_overrides sets generation.max_new_tokens=6
    too_long = f"more than max_length={max_prompt} (the model's context); shorten the prompt"
    return [
        Case("question longer than the context", "evaluate.py",
             [*base, f"dataset.path={paths.data('question_too_long.jsonl')}"],
             f"question 'long' is 490 tokens long after rendering, {too_long}"),
        Case("run.py prompt longer than the context", "run.py", [*run_base(paths.tiny), f"prompts=[{'x' * 300}]"],
             f"prompts[0] is 390 tokens long after rendering, {too_long}"),
        Case("run.py empty prompt", "run.py", [*run_base(paths.tiny), "prompts=['  ']"],
             "prompts[0] is empty; remove it or write a question"),
    ]


def hydra_cases(paths: Paths) -> list[Case]:
    base = evaluate_base(paths.tiny)
    unwritable = paths.root / "a-file.txt" / "run"
    unwritable_fix = "(set hydra.run.dir, or hydra.sweep.dir for -m, to a writable folder)"
    return [
        Case("misspelled key", "evaluate.py", [*base, "speculative.tempreature=0.5"],
             f"Could not override 'speculative.tempreature': Key 'tempreature' not in 'SpeculativeConfig' {HYDRA_HINT}",
             exit_code=2, seeded=True),
        Case("integer key given a word", "evaluate.py", [*base, "generation.max_new_tokens=many"],
             "Value 'many' of type 'str' could not be converted to Integer", exit_code=2, seeded=True),
        Case("run.py misspelled key", "run.py", [*run_base(paths.tiny), "promts=[Hi]"],
             "Could not override 'promts': Key 'promts' not in 'SpecQAConfig'", exit_code=2),
        Case("output folder under a file", "evaluate.py", [*base, f"hydra.run.dir={unwritable}"],
             f"cannot write {unwritable}: Not a directory {unwritable_fix}"),
    ]


def all_cases(paths: Paths) -> list[Case]:
    return [
        *dataset_cases(paths), *mode_cases(paths), *model_cases(paths), *setting_cases(paths),
        *prompt_cases(paths), *hydra_cases(paths),
    ]


# --- running ----------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    result: subprocess.CompletedProcess
    run_dir: Path
    # the finished run that a seeded case's folder was copied from
    seed_dir: Path


def run_case(case: Case, paths: Paths, number: int) -> Outcome:
    run_dir = paths.root / "runs" / f"{number:02d}"
    if case.seeded:
        shutil.copytree(paths.seed_run, run_dir)
    overrides = list(case.overrides)
    if not any(override.startswith("hydra.run.dir=") for override in overrides):
        overrides.append(f"hydra.run.dir={run_dir}")
    result = run_cli(case.script, overrides, timeout=300, **case.env)
    return Outcome(case, result, run_dir, paths.seed_run)


def prepare(root: Path, tiny: Path, other_vocab: Path) -> Paths:
    paths = Paths(root=root, tiny=tiny, other_vocab=other_vocab, seed_run=root / "seed-run")
    write_datasets(root / "data")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "notes.txt").write_text("weights were never saved here\n")
    (root / "empty-hf-home").mkdir()
    (root / "a-file.txt").write_text("a regular file, so no folder can be made under it\n")
    write_truncated_gguf(root / "truncated.gguf")

    seed_run(tiny, paths.seed_run)
    # the seeded copy of this folder must pass the config check before the model loads
    run_config = json.loads((paths.seed_run / "run_config.json").read_text())
    run_config["model"]["name_or_path"] = str(root / "moved-model")
    moved = root / "seed-run-moved-model"
    shutil.copytree(paths.seed_run, moved)
    (moved / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    return paths


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("bad-input")
    tiny = shared_tiny_dir(tmp_path_factory)
    other_vocab = shared_tiny_dir(tmp_path_factory, "llama-gemma-tokenizer", tokenizer_style="gemma")
    paths = prepare(root, tiny, other_vocab)
    cases = all_cases(paths)

    def run_numbered(number_and_case: tuple[int, Case]) -> Outcome:
        number, case = number_and_case
        if case.name == "model path does not exist":
            return run_case(case, Paths(root, tiny, other_vocab, root / "seed-run-moved-model"), number)
        return run_case(case, paths, number)

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = list(pool.map(run_numbered, enumerate(cases)))

    by_name = {outcome.case.name: outcome for outcome in results}
    table_path = os.environ.get("SPECQA_HARDENING_TABLE")
    if table_path:
        write_table(Path(table_path), results)
    return by_name


def write_table(path: Path, results: list[Outcome]) -> None:
    """Write each case's script, exit status and printed line as a markdown table."""
    lines = ["| case | script | exit | message (stderr) |", "|---|---|---:|---|"]
    for outcome in results:
        printed = " / ".join(stderr_lines(outcome.result)).replace("|", "\\|")
        lines.append(f"| {outcome.case.name} | {outcome.case.script} | {outcome.result.returncode} | `{printed}` |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# The names are listed here, rather than computed, because pytest needs them before the fixture runs.
CASE_NAMES = [
    "dataset missing", "dataset empty", "dataset not JSON",
    "dataset JSONL broken line 3", "record without question", "record without answer", "answer is a number",
    "answer is an empty list", "question is empty",
    "unknown mode", "empty modes", "duplicate modes",
    "unknown model preset", "model path does not exist", "model path empty", "folder is not a model",
    "hub id offline without cache", "truncated GGUF file", "draft vocabulary differs",
    "k zero", "k negative", "k not an integer", "temperature negative", "top_p zero",
    "top_p above one", "top_k negative", "num_beams zero", "max_new_tokens zero", "max_new_tokens fills the context",
    "question longer than the context", "run.py prompt longer than the context", "run.py empty prompt",
    "misspelled key", "integer key given a word",
    "run.py misspelled key", "output folder under a file",
]


def test_case_names_cover_every_case(outcomes):
    assert sorted(outcomes) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_line(outcomes, name):
    outcome = outcomes[name]
    result, case = outcome.result, outcome.case
    printed = stderr_lines(result)

    assert result.returncode == case.exit_code, result.stderr
    assert len(printed) == 1, result.stderr
    assert printed[0].startswith("error: ")
    assert case.phrase in printed[0]
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout
    assert "HYDRA_FULL_ERROR=1 for a complete stack trace" not in result.stderr


@pytest.mark.parametrize("name", [name for name in CASE_NAMES if not name.startswith("run.py")])
def test_bad_input_keeps_results(outcomes, name):
    outcome = outcomes[name]
    if not outcome.case.seeded:
        # nothing was written before, and a failed start must not leave a partial results file
        assert not (outcome.run_dir / "results.jsonl").exists()
        return
    for file in ("results.jsonl", "summary.json", "run_config.json"):
        assert (outcome.run_dir / file).read_bytes() == (outcome.seed_dir / file).read_bytes(), file


def test_traceback_switch_shows_traceback(outcomes, tmp_path):
    case = outcomes["k zero"].case
    result = run_cli(case.script, [*case.overrides, "debug.traceback=true", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "error: speculative.k must be >= 1, got 0 (set speculative.k)"
    assert "Traceback (most recent call last):" in result.stderr
    assert "experiments.schema.ConfigError: speculative.k must be >= 1" in result.stderr


def test_dataset_with_byte_order_mark_loads(tmp_path):
    # the positive counterpart of "dataset not JSON": a BOM written by an editor is not an error
    path = tmp_path / "bom.json"
    path.write_bytes(b'\xef\xbb\xbf[{"question": "What is 1 + 1?", "answer": ["2"]}]')
    assert load_dataset(path) == [QAItem(id="1", question="What is 1 + 1?", answers=("2",))]
