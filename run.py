"""Generate answers to a few prompts with each decoding mode and print them with their stats.

    python run.py
    python run.py prompts='[Who painted the Mona Lisa?]' modes=[greedy,speculative]
    python run.py debug.render_input_text=true

The work is done by `experiments.generation.run_prompts`, which tests call with a
composed config.
"""

import json

import hydra
from omegaconf import DictConfig

from experiments.cli import JobContext, run_cli, run_job
from experiments.generation import run_prompts


def run_prompts_job(cfg: DictConfig, context: JobContext) -> None:
    for answer in run_prompts(cfg):
        print(f"=== prompt {answer.index} | {answer.mode} ===")
        if cfg.debug.render_input_text:
            print(f"[Rendered prompt]\n{answer.output.prompt_text}")
        else:
            print(f"[Prompt] {answer.prompt}")
        print(f"[Output] {answer.output.output_text}")
        print(f"[Stats] {json.dumps(answer.output.stats)}\n")


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig) -> None:
    run_job(cfg, "run", run_prompts_job)


if __name__ == "__main__":
    run_cli(main)
