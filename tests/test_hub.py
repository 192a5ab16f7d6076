"""Hub ids end to end: load_model and run.py download from a mock hub on 127.0.0.1 (tests/mock_hub.py).

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, and
conftest.py switches the hub off for this process. Every load therefore runs in a
child process whose endpoint is the mock hub. Each child gets its own Hugging Face
and specqa cache folders under the module's temporary folder, except the cached
load, which reuses those of the first load.

There are three kinds of child. A load runs `experiments.models.load_model` and
saves the logits of a fixed prompt. An error batch runs `load_model` on several bad
configs and saves each ModelLoadError message. A CLI case runs `run.py` as a user
would. The children are independent, so the module fixture runs them in parallel,
and each test checks one result.

The mock hub serves a tiny Llama saved with save_pretrained (seed 0). A second repo
has that model on its branch `main` and a tiny Llama drawn from seed 1 on its branch
`v2`. Other repos contain the seed-0 Llama as a GGUF file only, or are gated.
"""

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from cli_helpers import PROJECT_ROOT, run_cli, save_tiny_model, stderr_lines
from mock_hub import HubRequest, MockHub, commit_hash
from tiny import make_tiny_model, random_prompt
from tiny_gguf import write_tiny_gguf
from tiny_tokenizers import make_tiny_tokenizer

TINY_REPO = "specqa-tests/tiny-llama"
BRANCHES_REPO = "specqa-tests/tiny-llama-branches"
GGUF_REPO = "specqa-tests/tiny-llama-gguf"
GATED_REPO = "specqa-tests/tiny-llama-gated"
# Copies of the repos above for the other cases, so that each case's requests are recorded separately.
ERRORS_REPO = "specqa-tests/tiny-llama-errors"
GGUF_ONLY_REPO = "specqa-tests/tiny-llama-gguf-errors"
GGUF_CLI_REPO = "specqa-tests/tiny-llama-gguf-cli"
BRANCHES_CLI_REPO = "specqa-tests/tiny-llama-branches-cli"
MISSING_REPO = "specqa-tests/no-such-model"
MISSING_GGUF_REPO = "specqa-tests/no-such-gguf-model"
GGUF_NAME = "tiny-llama.gguf"
PROMPT = random_prompt(12)
FIX = (
    "Use a local folder (name_or_path=/path/to/model), a GGUF file (gguf_file=/path/to/model.gguf), "
    "or a packaged preset (model=smollm2-135m-instruct or model=gemma3-270m)"
)

# Loads the model config `sys.argv[1]` (JSON) and saves the logits of the prompt
# `sys.argv[2]` (token ids as JSON) with the tokenizer's vocabulary into `sys.argv[3]`.
LOAD_SCRIPT = """
import json, sys
import torch
from experiments.models import load_model

loaded = load_model(json.loads(sys.argv[1]))
with torch.inference_mode():
    logits = loaded.model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits
torch.save({"logits": logits, "vocab": loaded.tokenizer.get_vocab()}, sys.argv[3])
"""

# Loads each config of the JSON object `sys.argv[1]` ({case: config}) and writes
# {case: ModelLoadError message, or "loaded"} as JSON into `sys.argv[2]`.
ERRORS_SCRIPT = """
import json, sys
from experiments.models import ModelLoadError, load_model

messages = {}
for name, config in json.loads(sys.argv[1]).items():
    try:
        load_model(config)
        messages[name] = "loaded"
    except ModelLoadError as error:
        messages[name] = str(error)
with open(sys.argv[2], "w") as out:
    json.dump(messages, out)
"""


@dataclass
class Case:
    """One child process: a load_model config, a batch of bad configs, or run.py overrides."""

    name: str
    config: dict | None = None
    bad_configs: dict[str, dict] | None = None
    overrides: list[str] = field(default_factory=list)
    # the case whose Hugging Face and specqa caches this case reuses
    caches_of: str | None = None
    unreachable: bool = False


@dataclass
class Outcome:
    """Result of one child process, with what it saved."""

    result: subprocess.CompletedProcess
    # logits and vocabulary, or error messages
    saved: dict | None = None
    # requests for TINY_REPO that the server had seen before this case started
    requests_before: int | None = None


def closed_port() -> int:
    """Return a port on 127.0.0.1 that was free a moment ago and has nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env(endpoint: str, caches: Path) -> dict[str, str]:
    env = dict(os.environ)
    # A proxy could carry a request meant for 127.0.0.1 to another host, so none is used. No token is sent.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(caches / "hf-home"),
        HF_HUB_CACHE=str(caches / "hf-home" / "hub"),
        SPECQA_CACHE_DIR=str(caches / "specqa"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(PROJECT_ROOT),
        WANDB_SILENT="true",
    )
    return env


def run_case(case: Case, root: Path, endpoint: str) -> Outcome:
    slug = case.name.replace(" ", "-")
    env = child_env(endpoint, root / "caches" / (case.caches_of or case.name).replace(" ", "-"))
    out = root / "saved" / slug
    out.parent.mkdir(parents=True, exist_ok=True)

    if case.config is not None:
        command = [sys.executable, "-c", LOAD_SCRIPT, json.dumps(case.config), json.dumps(PROMPT.tolist()), str(out)]
    elif case.bad_configs is not None:
        command = [sys.executable, "-c", ERRORS_SCRIPT, json.dumps(case.bad_configs), str(out)]
    else:
        overrides = [*case.overrides, "modes=[greedy]", "prompts=[Hi]", "wandb.mode=disabled",
                     f"hydra.run.dir={root / 'runs' / slug}"]
        # run_cli sets HF_HUB_OFFLINE=1, so it is set back to 0 here.
        result = run_cli("run.py", overrides, timeout=120, **{**env, "HF_HUB_OFFLINE": "0"})
        return Outcome(result)

    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return Outcome(result)
    saved = torch.load(out) if case.config is not None else json.loads(out.read_text())
    return Outcome(result, saved)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Start the mock hub. Its list of requests is complete once `outcomes` has run."""
    repos = tmp_path_factory.mktemp("repos")
    save_tiny_model(repos / "seed-0", seed=0)
    save_tiny_model(repos / "seed-1", seed=1)
    (repos / "gguf").mkdir()
    write_tiny_gguf(repos / "gguf" / GGUF_NAME)
    served = {
        TINY_REPO: {"main": repos / "seed-0"},
        BRANCHES_REPO: {"main": repos / "seed-0", "v2": repos / "seed-1"},
        GGUF_REPO: {"main": repos / "gguf"},
        GATED_REPO: {"main": repos / "seed-0"},
        ERRORS_REPO: {"main": repos / "seed-0"},
        GGUF_ONLY_REPO: {"main": repos / "gguf"},
        GGUF_CLI_REPO: {"main": repos / "gguf"},
        BRANCHES_CLI_REPO: {"main": repos / "seed-0", "v2": repos / "seed-1"},
    }
    with MockHub(served, gated=(GATED_REPO,)) as mock:
        yield mock


BAD_CONFIGS = {
    "missing revision": {"name_or_path": ERRORS_REPO, "revision": "no-such-branch"},
    "missing gguf": {"name_or_path": ERRORS_REPO, "gguf_file": "absent.gguf"},
    "missing gguf repo": {"name_or_path": MISSING_GGUF_REPO, "gguf_file": GGUF_NAME},
    "gated": {"name_or_path": GATED_REPO},
    "gguf repo without gguf_file": {"name_or_path": GGUF_ONLY_REPO},
}


@pytest.fixture(scope="module")
def outcomes(hub, tmp_path_factory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("hub-cases")
    unreachable = f"http://127.0.0.1:{closed_port()}"
    first = [
        Case("hub id", config={"name_or_path": TINY_REPO}),
        Case("revision", config={"name_or_path": BRANCHES_REPO, "revision": "v2"}),
        Case("gguf", config={"name_or_path": GGUF_REPO, "gguf_file": GGUF_NAME}),
        Case("bad configs", bad_configs=BAD_CONFIGS),
        Case("cli hub id", overrides=[f"model.name_or_path={BRANCHES_CLI_REPO}", "model.revision=v2"]),
        Case("cli missing repo", overrides=[f"model.name_or_path={MISSING_REPO}"]),
        # gguf_file and name_or_path set on top of the default (packaged) preset
        Case("cli gguf", overrides=[f"model.name_or_path={GGUF_CLI_REPO}", f"model.gguf_file={GGUF_NAME}"]),
    ]
    # This runs in a new process after "hub id" has filled the caches.
    second = [Case("cached", config={"name_or_path": TINY_REPO}, caches_of="hub id")]
    slow = Case("cli unreachable", overrides=[f"model.name_or_path={TINY_REPO}"], unreachable=True)

    def run(case: Case) -> tuple[str, Outcome]:
        return case.name, run_case(case, root, unreachable if case.unreachable else hub.endpoint)

    # The unreachable case mostly sleeps between retries, so it runs beside the two workers.
    with ThreadPoolExecutor(max_workers=1) as side, ThreadPoolExecutor(max_workers=2) as pool:
        waiting = side.submit(run, slow)
        results = dict(pool.map(run, first))
        requests_before = len(hub.requests_for(TINY_REPO))
        results.update(pool.map(run, second))
        results.update([waiting.result()])
    results["cached"].requests_before = requests_before
    return results


def saved(outcome: Outcome) -> dict:
    assert outcome.result.returncode == 0, outcome.result.stderr
    return outcome.saved


def source_logits(seed: int) -> torch.Tensor:
    with torch.inference_mode():
        return make_tiny_model("llama", seed=seed)(input_ids=PROMPT).logits


def resolved(requests: list[HubRequest]) -> list[HubRequest]:
    return [request for request in requests if request.route == "resolve"]


# --- loads ----------------------------------------------------------------------------


def test_hub_id_logits_equal_source(outcomes):
    assert torch.equal(saved(outcomes["hub id"])["logits"], source_logits(0))


def test_hub_id_tokenizer_vocab(outcomes):
    assert saved(outcomes["hub id"])["vocab"] == make_tiny_tokenizer("chatml").get_vocab()


def test_hub_id_downloads_weights(outcomes, hub):
    saved(outcomes["hub id"])
    paths = {request.path for request in resolved(hub.requests_for(TINY_REPO)) if request.method == "GET"}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= paths


def test_hub_id_pins_main_commit(outcomes, hub):
    saved(outcomes["hub id"])
    revisions = {request.revision for request in resolved(hub.requests_for(TINY_REPO))}
    assert revisions == {commit_hash(TINY_REPO, "main")}


def test_cached_logits_equal_source(outcomes):
    assert torch.equal(saved(outcomes["cached"])["logits"], source_logits(0))


def test_cached_sends_no_request(outcomes, hub):
    saved(outcomes["cached"])
    assert len(hub.requests_for(TINY_REPO)) == outcomes["cached"].requests_before


def test_revision_logits_equal_branch(outcomes):
    assert torch.equal(saved(outcomes["revision"])["logits"], source_logits(1))


def test_revision_requested_by_name(outcomes, hub):
    saved(outcomes["revision"])
    requested = {request.revision for request in hub.requests_for(BRANCHES_REPO) if request.route == "info"}
    assert requested == {"v2"}


def test_revision_files_from_branch_commit(outcomes, hub):
    saved(outcomes["revision"])
    revisions = {request.revision for request in resolved(hub.requests_for(BRANCHES_REPO))}
    assert revisions == {commit_hash(BRANCHES_REPO, "v2")}


def test_gguf_logits_equal_source(outcomes):
    assert torch.equal(saved(outcomes["gguf"])["logits"], source_logits(0))


def test_gguf_downloads_only_its_file(outcomes, hub):
    saved(outcomes["gguf"])
    requests = [(request.method, request.revision, request.path) for request in resolved(hub.requests_for(GGUF_REPO))]
    assert requests == [("HEAD", "main", GGUF_NAME), ("GET", "main", GGUF_NAME)]


# --- load_model errors ----------------------------------------------------------------


def reason_message(model: str, reason: str) -> str:
    return f"model {model!r}: {reason}. {FIX}"


EXPECTED_MESSAGES = {
    "missing revision": reason_message(
        "custom", f"revision 'no-such-branch' of hub repository {ERRORS_REPO!r} does not exist; set revision",
    ),
    "missing gguf": reason_message(
        "custom", f"file 'absent.gguf' not found in hub repository {ERRORS_REPO!r}; check gguf_file",
    ),
    "missing gguf repo": reason_message(
        "custom",
        f"hub repository {MISSING_GGUF_REPO!r} does not exist or is private (check the id, or run `hf auth login`)",
    ),
    "gated": reason_message(
        "custom", f"hub repository {GATED_REPO!r} is gated; accept its licence on the hub and run `hf auth login`",
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_MESSAGES))
def test_error_message(outcomes, name):
    assert saved(outcomes["bad configs"])[name] == EXPECTED_MESSAGES[name]


def test_gguf_repo_error_not_unreachable(outcomes):
    # The hub was reached: the repo exists and contains a GGUF file but no config.json.
    message = saved(outcomes["bad configs"])["gguf repo without gguf_file"]
    assert "the hub could not be reached" not in message


def test_gguf_repo_error_names_gguf_file(outcomes):
    message = saved(outcomes["bad configs"])["gguf repo without gguf_file"]
    assert f"gguf_file={GGUF_NAME!r}" in message


# --- run.py ---------------------------------------------------------------------------


def test_cli_hub_id_runs(outcomes):
    assert outcomes["cli hub id"].result.returncode == 0, outcomes["cli hub id"].result.stderr


def test_cli_hub_id_prints_answer(outcomes):
    assert "=== prompt 0 | greedy ===" in outcomes["cli hub id"].result.stdout


def test_cli_gguf_runs(outcomes):
    assert outcomes["cli gguf"].result.returncode == 0, stderr_lines(outcomes["cli gguf"].result)


def error_line(model: str, reason: str) -> str:
    return f"error: {reason_message(model, reason)}"


EXPECTED_LINES = {
    "cli missing repo": error_line(
        MISSING_REPO,
        f"hub repository {MISSING_REPO!r} does not exist or is private (check the id, or run `hf auth login`)",
    ),
    "cli unreachable": error_line(
        TINY_REPO,
        f"hub id {TINY_REPO!r} is not in the local Hugging Face cache and the hub could not be reached "
        "([Errno 111] Connection refused), and no local folder of that name exists",
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_LINES))
def test_cli_error_exit_status(outcomes, name):
    assert outcomes[name].result.returncode == 1, outcomes[name].result.stderr


@pytest.mark.parametrize("name", sorted(EXPECTED_LINES))
def test_cli_error_last_line(outcomes, name):
    assert stderr_lines(outcomes[name].result)[-1:] == [EXPECTED_LINES[name]]


@pytest.mark.parametrize("name", sorted(EXPECTED_LINES))
def test_cli_error_is_one_line(outcomes, name):
    assert stderr_lines(outcomes[name].result) == [EXPECTED_LINES[name]]


def test_cli_missing_repo_asks_server(outcomes, hub):
    requests = {(request.method, request.revision, request.path) for request in resolved(hub.requests_for(MISSING_REPO))}
    assert requests == {("HEAD", "main", "config.json")}


def test_cli_unreachable_does_not_retry(outcomes):
    result = outcomes["cli unreachable"].result
    assert "Retrying in" not in result.stdout + result.stderr
