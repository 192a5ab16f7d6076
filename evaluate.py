"""Evaluate greedy, beam and speculative decoding on a QA dataset.

    python evaluate.py                                 # qa30, all three modes
    python evaluate.py dataset=nq_open dataset.limit=50
    python evaluate.py -m speculative.k=1,2,4 speculative.temperature=0,0.7

docs/USAGE.md lists every override. The work is done by
`experiments.evaluation.evaluate`, which tests call with a composed config.
"""

import hydra
from omegaconf import DictConfig

from experiments.cli import JobContext, run_cli, run_job
from experiments.evaluation import evaluate


def evaluate_job(cfg: DictConfig, context: JobContext) -> None:
    result = evaluate(cfg, context.run_dir, context.sweep_dir)
    # the final table is the command's output, so it is printed rather than logged
    print(f"\n{result.table}\n\nresults: {result.run_dir}")


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig) -> None:
    run_job(cfg, "evaluate", evaluate_job)


if __name__ == "__main__":
    run_cli(main)
