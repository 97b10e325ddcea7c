"""finqa-trl: teach Llama-family models to write executable FinQA programs with TRL + PEFT.

Kept import-light on purpose: `python -m finqa_trl.score` must not pull in torch.
"""

__version__ = "0.1.0"
