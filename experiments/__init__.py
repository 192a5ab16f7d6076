"""Model loading, prompts, data, scoring, evaluation and W&B logging for specqa experiments."""
