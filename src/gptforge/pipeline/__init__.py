"""How work is driven: configs, the Accelerate trainer, evaluation, the stage runner."""
